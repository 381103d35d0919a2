"""`python -m training ilf-sweep --model NAME`: screen ILF settings with short distillations.

For each (loop span, ILF steps) it distils a module for a few hundred updates, then measures
fidelity to the 20-step DDIM image (PSNR, same seeds and conditions) on the validation seeds (never
the image yardstick's), beside plain DDIM at the same number of block evaluations, the comparison
that decides whether ILF pays for its loop. Prints a table and writes JSON; the best settings are then trained fully with
`python -m training ilf`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from server.imaging.backbones import load_image_backbone
from server.imaging.ilf import LoadedILF
from server.imaging.sampler import SampleJob, sample
from server.manifest import BuiltManifest
from training.eval.images import Protocol, eval_set
from training.metrics import psnr
from training.ilf_distill import VALIDATION_SEED_BASE, ILFTraining, distil

SPANS = ((2, 3), (5, 6), (8, 9), (4, 7))  # first screened at 10 steps
STEPS = (8, 12)  # then the best span at these step counts


def sampled_images(backbone, data, scheduler, steps, guidance, mode="baseline"):
    """The eval set's images, 50 a batch, one guidance for all."""
    size = backbone.native_size
    out = [sample(backbone, SampleJob(data.conditions[i:i + 50], data.seeds[i:i + 50], steps, guidance, size, size,
                                      scheduler, mode)).images for i in range(0, len(data.seeds), 50)]
    return torch.cat(out)


def run_sweep(manifests: BuiltManifest, model: str, updates: int, out: Path, per_class: int = 10) -> list[dict]:
    torch.set_grad_enabled(True)
    spec = next(m for m in manifests.read().image if m.name == model)
    backbone = load_image_backbone(spec.model_copy(update={"ilf": None}), manifests.resolver(), "cpu")
    guidance = spec.default_guidance_scale
    data = eval_set(backbone, Protocol(per_class=per_class, seed_base=VALIDATION_SEED_BASE))  # not the yardstick's
    with torch.no_grad():
        reference = sampled_images(backbone, data, "ddim", 20, guidance)
    n = backbone.num_blocks
    rows = []

    def screen(start: int, end: int, steps: int) -> None:
        cfg = ILFTraining(loop_start=start, loop_end=end, steps=steps, updates=updates)
        began = time.perf_counter()
        feedback, config, history = distil(backbone, cfg, desc=f"ilf {start}-{end} x{steps}")
        backbone.ilf = LoadedILF(feedback, config)
        with torch.no_grad():
            ilf_psnr = psnr(sampled_images(backbone, data, "ddim", steps, guidance, "ilf"), reference).mean().item()
            # plain DDIM with (about) the same block evaluations
            matched = round(steps * config.blocks_per_step / n)
            ddim_psnr = psnr(sampled_images(backbone, data, "ddim", matched, guidance), reference).mean().item()
            short_psnr = psnr(sampled_images(backbone, data, "ddim", steps, guidance), reference).mean().item()
        backbone.ilf = None
        rows.append({"loop_start": start, "loop_end": end, "steps": steps, "updates": updates,
                     "blocks": steps * config.blocks_per_step, "psnr_ilf": ilf_psnr,
                     "psnr_ddim_same_steps": short_psnr, "ddim_matched_steps": matched,
                     "psnr_ddim_matched_blocks": ddim_psnr, "final_loss": [h for h in history if "loss" in h][-1]["loss"],
                     "seconds": time.perf_counter() - began})
        print(format_row(rows[-1]), flush=True)

    for start, end in SPANS:
        screen(start, end, 10)
    best = max(rows, key=lambda r: r["psnr_ilf"])
    for steps in STEPS:
        screen(best["loop_start"], best["loop_end"], steps)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"ilf-sweep-{model}.json").write_text(json.dumps(rows, indent=1))
    return rows


def format_row(r: dict) -> str:
    return (f"loop {r['loop_start']:>2}-{r['loop_end']:<2} steps {r['steps']:>2}  blocks {r['blocks']:>4}  "
            f"PSNR ILF {r['psnr_ilf']:6.2f}  DDIM-{r['steps']} {r['psnr_ddim_same_steps']:6.2f}  "
            f"DDIM-{r['ddim_matched_steps']} (same blocks) {r['psnr_ddim_matched_blocks']:6.2f}  "
            f"loss {r['final_loss']:.2e}  {r['seconds']:.0f}s")
