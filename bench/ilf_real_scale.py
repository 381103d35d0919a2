"""ILF against the 20-step sampler on backbones of real size, with random weights.

Speed does not depend on weight values, so this times the server's own sampling loop on a
DiT-XL/2-shaped transformer (28 blocks, width 1152, 16 heads, patch 2, a 32x32x4 latent as for
256px images, 1000 classes, guidance on) and a PixArt-alpha-shaped one at the same latent with
random caption embeddings (120 tokens x 4096), each with an ILF module of the configuration chosen
on the zoo (loop blocks 2-3 of 12, scaled to 28 blocks: a 2-block loop from block 5). The ideal
speedup is the block ratio 20*N / (S*(N+L+1)); what the measured ratio loses to it is the work
outside the blocks.

    python -m bench.ilf_real_scale                       # CPU, batch 1 (a few minutes on 2 cores)
    python -m bench.ilf_real_scale --device cuda --dtype bf16 --batch 1 16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel, PixArtTransformer2DModel
from diffusers.utils import logging as diffusers_logging
from tqdm import tqdm

from server.imaging.backbones import ImageBackbone
from server.imaging.ilf import FeedbackModule, ILFConfig, LoadedILF
from server.imaging.sampler import SampleJob, sample
from server.manifest import ImageModel, Source, TextEncoder

SHAPES = {
    "dit-xl-2": dict(kind="dit", blocks=28, width=1152, heads=16, latent=32, channels=4, classes=1000),
    "pixart-256": dict(kind="pixart", blocks=28, width=1152, heads=16, latent=32, channels=4, tokens=120,
                       caption=4096),
    # seconds on any machine: what the test runs
    "tiny-dit": dict(kind="dit", blocks=6, width=32, heads=2, latent=8, channels=4, classes=10),
    "tiny-pixart": dict(kind="pixart", blocks=6, width=32, heads=2, latent=8, channels=4, tokens=8, caption=16),
}
ZOO_LOOP = (2, 3, 12)  # loop start, loop end, backbone depth of the configuration chosen on the zoo


def scaled_loop(blocks: int) -> tuple[int, int]:
    start, end, depth = ZOO_LOOP
    first = max(1, round(start * blocks / depth))
    return first, first + (end - start)


class RandomCaptions(ImageBackbone):
    """PixArt conditioning without T5: random caption states of the real shape."""

    caption_tokens: int = 120

    def conditioning(self, conditions: list, guided: bool) -> dict:
        n = len(conditions) * (2 if guided else 1)
        generator = torch.Generator().manual_seed(0)
        channels = self.transformer.config.caption_channels
        states = torch.randn(n, self.caption_tokens, channels, generator=generator)
        mask = torch.ones(n, self.caption_tokens, dtype=torch.long)
        return {"encoder_hidden_states": states.to(self.device, self.dtype), "encoder_attention_mask": mask.to(self.device)}


def build(name: str, device: str, dtype: torch.dtype) -> ImageBackbone:
    shape = SHAPES[name]
    torch.manual_seed(0)
    common = dict(num_attention_heads=shape["heads"], attention_head_dim=shape["width"] // shape["heads"],
                  in_channels=shape["channels"], out_channels=2 * shape["channels"], num_layers=shape["blocks"],
                  sample_size=shape["latent"], patch_size=2)
    if shape["kind"] == "dit":
        transformer = DiTTransformer2DModel(num_embeds_ada_norm=shape["classes"], **common)
        spec = ImageModel(name=name, kind="dit", source=Source(path="."))
        cls = ImageBackbone
    else:
        transformer = PixArtTransformer2DModel(cross_attention_dim=shape["width"], caption_channels=shape["caption"],
                                               use_additional_conditions=False, **common)
        spec = ImageModel(name=name, kind="pixart", source=Source(path="."),
                          text_encoder=TextEncoder(kind="t5", source=Source(path=".")))
        cls = type("RandomCaptionsBackbone", (RandomCaptions,), {"caption_tokens": shape.get("tokens", 120)})
    transformer.to(device, dtype).eval().requires_grad_(False)
    loop_start, loop_end = scaled_loop(shape["blocks"])
    # the step count is metadata here: the same random module is timed at every ILF step count
    config = ILFConfig.for_transformer(transformer, name, loop_start=loop_start, loop_end=loop_end, steps=8)
    feedback = FeedbackModule.for_backbone(transformer, config)
    with torch.no_grad():
        feedback.scale.normal_(0, 0.01)  # a trained module's s is non-zero; the cost is the same either way
    feedback.to(device, dtype).eval().requires_grad_(False)
    scheduler = dict(DDIMScheduler(beta_schedule="linear", timestep_spacing="trailing").config)
    return cls(spec, transformer, scheduler, None, None, device, dtype, LoadedILF(feedback, config))


def timed(backbone: ImageBackbone, steps: int, mode: str, batch: int, repeats: int) -> tuple[float, int]:
    """Seconds per call (fastest of `repeats`, after a warm-up call) and block evaluations per image."""
    size = backbone.native_size
    conditions = [i % (backbone.num_classes or 10) for i in range(batch)]
    job = SampleJob(conditions, list(range(batch)), steps, 4.0, size, size, "ddim", mode)
    times = []
    for _ in range(repeats + 1):
        if backbone.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = sample(backbone, job)
        if backbone.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times[1:]), result.block_evaluations


@torch.no_grad()
def run(shapes: list[str], device: str, dtype: torch.dtype, batches: list[int], ilf_steps: list[int],
        repeats: int) -> list[dict]:
    rows = []
    diffusers_logging.set_verbosity_error()
    for name in shapes:
        backbone = build(name, device, dtype)
        config = backbone.ilf.config
        for batch in batches:
            runs = [(20, "baseline")] + [(steps, "ilf") for steps in ilf_steps]
            measured = [timed(backbone, steps, mode, batch, repeats)
                        for steps, mode in tqdm(runs, desc=f"{name} batch {batch}", unit="sampler")]
            base_s, base_blocks = measured[0]
            for steps_ilf, (ilf_s, ilf_blocks) in zip(ilf_steps, measured[1:]):
                rows.append({
                    "shape": name, "device": device, "dtype": str(dtype).removeprefix("torch."), "batch": batch,
                    "loop_blocks": f"{config.loop_start}-{config.loop_end}", "ilf_steps": steps_ilf,
                    "baseline_seconds": base_s, "ilf_seconds": ilf_s,
                    "baseline_block_evaluations": base_blocks, "ilf_block_evaluations": ilf_blocks,
                    "ideal_speedup": base_blocks / ilf_blocks, "speedup": base_s / ilf_s,
                })
        del backbone
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'shape':<12}{'device':>7}{'dtype':>9}{'batch':>6}{'loop':>6}{'ILF steps':>10}{'DDIM-20 s':>11}"
             f"{'ILF s':>9}{'blocks':>10}{'ideal':>7}{'speedup':>9}"]
    for r in rows:
        lines.append(f"{r['shape']:<12}{r['device']:>7}{r['dtype']:>9}{r['batch']:>6}{r['loop_blocks']:>6}"
                     f"{r['ilf_steps']:>10}{r['baseline_seconds']:>11.3f}{r['ilf_seconds']:>9.3f}"
                     f"{r['baseline_block_evaluations']:>5}/{r['ilf_block_evaluations']:<4}"
                     f"{r['ideal_speedup']:>6.2f}x{r['speedup']:>8.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["dit-xl-2", "pixart-256"], choices=list(SHAPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--ilf-steps", type=int, nargs="+", default=[8, 10])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/ilf_real_scale.json"))
    args = parser.parse_args(argv)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    rows = run(args.shapes, args.device, dtype, args.batch, args.ilf_steps, args.repeats)
    print(format_table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": f"{torch.get_num_threads()} torch threads", "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
