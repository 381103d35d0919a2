"""`python -m training ilf --model NAME`: distil an Inner Loop Feedback module for a frozen backbone.

Teacher: the frozen backbone sampling with DDIM at 2x the student's steps (20 for a 10-step
student): the quality the product promises. Student: the same backbone with the feedback loop, on
the short schedule. The student's trajectory points are the teacher's (teacher forcing): from the
teacher's x at student timestep t_i, one student step, run through the *same* scheduler step the
server runs (DDIM, with its x0 clipping), must land on the teacher's x at t_{i+1}. The loss is in
x-space for that reason (an epsilon target obtained by inverting an unclipped step trains the
module the wrong way where clipping is active). Only the feedback block and s receive gradients.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from server.imaging.backbones import ImageBackbone, load_image_backbone
from server.imaging.ilf import FeedbackModule, ILFConfig, ilf_enabled, save_ilf
from server.imaging.sampler import SampleJob, denoise_step, make_scheduler, sample
from server.artifacts import write_atomically
from server.manifest import BuiltManifest, ILFArtifact
from training.artifacts import runs_folder
from training.data.digits import TRAIN_TEMPLATES, caption


@dataclass(frozen=True)
class ILFTraining:
    # Chosen by `training ilf-sweep` on digits-dit (docs/ilf.md): an early two-block loop, 8 steps.
    loop_start: int = 2
    loop_end: int = 3
    steps: int = 8
    updates: int = 1000
    batch_size: int = 32
    pool_size: int = 256  # teacher trajectories generated per refresh
    refresh_every: int = 300  # updates between pool refreshes (fresh noise and conditions)
    lr: float = 1e-3
    feedback_init: str = "copy"
    guidance_scale: float | None = None  # default: the model's
    seed: int = 0


# Every code path in seconds, on the micro image zoo's 2-block backbones (tests, `zoo all --micro`).
MICRO_ILF = ILFTraining(loop_start=1, loop_end=1, steps=2, updates=6, batch_size=4, pool_size=8, refresh_every=3)


def _conditions(backbone: ImageBackbone, n: int, rng: random.Random) -> list:
    digits = [rng.randrange(10) for _ in range(n)]
    if backbone.spec.kind == "dit":
        return digits
    return [caption(rng.choice(TRAIN_TEMPLATES), d) for d in digits]


@torch.no_grad()
def teacher_pool(backbone: ImageBackbone, cfg: ILFTraining, guidance: float, rng: random.Random,
                 seed_offset: int) -> tuple[torch.Tensor, list]:
    """Teacher trajectories at the student's timesteps: [pool, steps + 1, C, H, W]."""
    teacher_steps = 2 * cfg.steps
    conditions = _conditions(backbone, cfg.pool_size, rng)
    states = []
    for start in range(0, cfg.pool_size, 64):
        chunk = conditions[start : start + 64]
        seeds = [cfg.seed * 1_000_000 + seed_offset + start + i for i in range(len(chunk))]
        size = backbone.native_size
        trajectory: list[torch.Tensor] = []
        sample(backbone, SampleJob(chunk, seeds, teacher_steps, guidance, size, size, "ddim"), trajectory=trajectory)
        states.append(torch.stack(trajectory[::2], dim=1))  # every other teacher point = student grid
    return torch.cat(states), conditions


def distil(backbone: ImageBackbone, cfg: ILFTraining, desc: str = "ilf") -> tuple[FeedbackModule, ILFConfig, list[dict]]:
    guidance = cfg.guidance_scale if cfg.guidance_scale is not None else backbone.spec.default_guidance_scale
    t = backbone.transformer
    config = ILFConfig.for_transformer(
        t, backbone.name, loop_start=cfg.loop_start, loop_end=cfg.loop_end, steps=cfg.steps, scheduler="ddim",
        teacher_steps=2 * cfg.steps, guidance_scale=guidance, feedback_init=cfg.feedback_init,
    )
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    feedback = FeedbackModule.for_backbone(t, config, seed=cfg.seed)
    feedback.eval()  # no dropout of labels or activations inside the copied block; still trainable
    opt = torch.optim.AdamW(feedback.parameters(), lr=cfg.lr, weight_decay=0.0)

    student = make_scheduler("ddim", backbone.scheduler_config)
    student.set_timesteps(cfg.steps)
    teacher = make_scheduler("ddim", backbone.scheduler_config)
    teacher.set_timesteps(2 * cfg.steps)
    if not torch.equal(teacher.timesteps[::2], student.timesteps):
        raise ValueError("the schedule's timestep spacing does not nest the student's steps in the teacher's; "
                         "use timestep_spacing='trailing'")

    history: list[dict] = []
    start = time.perf_counter()
    pool, conditions = None, None
    bar = tqdm(range(cfg.updates), desc=desc, unit="update", mininterval=2.0)
    for update in bar:
        if update % cfg.refresh_every == 0:
            pool, conditions = teacher_pool(backbone, cfg, guidance, rng, seed_offset=update * 1000)
        idx = rng.sample(range(cfg.pool_size), cfg.batch_size)
        i = rng.randrange(cfg.steps)
        x_t, target = pool[idx, i], pool[idx, i + 1]
        cond = backbone.conditioning([conditions[j] for j in idx], guidance > 1.0)
        with ilf_enabled(t, feedback, config):
            x_next = denoise_step(backbone, student, x_t, student.timesteps[i], cond, guidance)
        loss = F.mse_loss(x_next, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if update % 20 == 0 or update == cfg.updates - 1:
            history.append({"update": update, "loss": loss.item(), "step_index": i,
                            "seconds": time.perf_counter() - start})
            bar.set_postfix(loss=f"{loss.item():.2e}")
    return feedback.eval().requires_grad_(False), config, history


def write_ilf_history(out_dir: Path, cfg: ILFTraining, config: ILFConfig, history: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "training.json").write_text(json.dumps({"training": asdict(cfg), "config": asdict(config),
                                                       "history": history}, indent=1))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    # the loss spans decades across the schedule, so each point is coloured by its step index
    points = ax.scatter([h["update"] for h in history], [h["loss"] for h in history],
                        c=[h["step_index"] for h in history], cmap="viridis", s=8)
    fig.colorbar(points, ax=ax, label="student step index")
    ax.set(xlabel="update", ylabel="x-space MSE to the teacher", yscale="log",
           title=f"ILF {config.backbone}: loop {config.loop_start}-{config.loop_end}, {config.steps} steps")
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=100)
    plt.close(fig)


def train_ilf(manifests: BuiltManifest, model: str, cfg: ILFTraining, runs_dir: Path | None = None,
              if_missing: bool = False) -> Path | None:
    """Distil, save atomically, record in the built manifest with its checksum; returns the artifact
    path (None when `if_missing` and the model already has a module)."""
    manifest = manifests.read()
    spec = next((m for m in manifest.image if m.name == model), None)
    if spec is None:
        raise SystemExit(f"no image model {model!r} in {manifests.current()}")
    if if_missing and spec.ilf is not None:
        return None
    if spec.placeholder:
        raise SystemExit(f"{model!r} is an untrained placeholder: build the image zoo first")
    backbone = load_image_backbone(spec.model_copy(update={"ilf": None}), manifests.resolver(), "cpu")
    feedback, config, history = distil(backbone, cfg, desc=f"ilf {model}")

    relative = f"ilf/{model}.safetensors"
    path = manifests.file(relative)
    sha = write_atomically(path, lambda tmp: save_ilf(tmp, feedback, config))
    write_ilf_history((runs_dir or runs_folder(manifests) / "ilf") / model, cfg, config, history)

    entry = ILFArtifact(path=relative, sha256=sha, steps=config.steps)
    manifest = manifests.read()  # re-read: only this model's entry changes
    image = [m.model_copy(update={"ilf": entry}) if m.name == model else m for m in manifest.image]
    manifests.write(manifest.model_copy(update={"image": image}))
    return path
