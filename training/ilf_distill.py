"""`python -m training ilf --model NAME`: distil an Inner Loop Feedback module for a frozen backbone.

Student: the frozen backbone with the feedback loop, on the short schedule. Only the feedback block
and s receive gradients. Two phases:

1. Teacher forcing (`updates`): the teacher is the backbone sampling with DDIM at 2x the student's
   steps, so its trajectory passes through every student timestep. From the teacher's x at student
   timestep t_i, one student step, run through the *same* scheduler step the server runs (DDIM,
   with its x0 clipping), must land on the teacher's x at t_{i+1}. The loss is in x-space for that
   reason (an epsilon target from inverting an unclipped step trains the module the wrong way where
   clipping is active); with `normalise_steps`, each step's loss is divided by the teacher's mean
   squared move over that step, whose scale differs by orders of magnitude across the schedule.
2. Rollouts (`rollout_updates`): the student samples from the noise on its own, every step, and
   its final image must match the reference sampler's (the model's default: DDIM at its default
   steps, the image quality is judged against) from the same noise and condition. This trains on
   the states the student itself reaches (no exposure bias) and on the quantity that is served.

Guidance: each row draws its scale from 1 to `guidance_max_factor` x the model's default (0: the
default alone); the range is recorded with the module, and the server refuses ILF outside it.
Noise seeds for training and for validation are drawn from ranges disjoint from each other and from
the image yardstick's (training/eval/images.py); the module kept is the one with the best
validation PSNR against the reference sampler, checked every `validate_every` updates.
"""

from __future__ import annotations

import copy
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
from server.imaging.sampler import SampleJob, denoise_step, make_scheduler, sample_batch
from server.artifacts import write_atomically
from server.manifest import BuiltManifest, ILFArtifact
from training.artifacts import runs_folder
from training.ilf_conditions import Conditions, load_conditions
from training.metrics import psnr

# noise seeds: the image yardstick uses 10_000-19_999; validation and training stay clear of it and of each other
VALIDATION_SEED_BASE = 900_000_000
TRAINING_SEED_BASE = 1_000_000_000


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
    # guidance per row from 1 to this x the model's default; 0: the default alone (on digits-dit a
    # range to 2x cost 6 dB at the default guidance: docs/ilf.md, `training ilf-ablation`)
    guidance_max_factor: float = 0.0
    normalise_steps: bool = True  # each teacher-forced step's loss over the teacher's mean squared move there
    rollout_updates: int = 150  # then this many updates on the student's own rollouts, against the reference
    rollout_batch: int = 16
    validate_every: int = 50  # updates between validation PSNRs (the best module is kept)
    validation_images: int = 60
    seed: int = 0


# Every code path in seconds, on the micro image zoo's 2-block backbones (tests, `zoo all --micro`).
MICRO_ILF = ILFTraining(loop_start=1, loop_end=1, steps=2, updates=6, batch_size=4, pool_size=8, refresh_every=3,
                        rollout_updates=3, rollout_batch=4, validate_every=3, validation_images=4,
                        guidance_max_factor=2.0)


def _conditions(pool: tuple, n: int, rng: random.Random) -> list:
    return [rng.choice(pool) for _ in range(n)]


def guidance_range(backbone: ImageBackbone, cfg: ILFTraining) -> tuple[float, float]:
    default = backbone.spec.default_guidance_scale
    return (default, default) if cfg.guidance_max_factor <= 0 else (1.0, max(1.0, cfg.guidance_max_factor * default))


def _scales(guidances: list[float], device: torch.device) -> torch.Tensor | None:
    """Per-row guidance as `denoise_step` takes it (None: no row guided)."""
    guided = any(g > 1.0 for g in guidances)
    return torch.tensor(guidances, device=device).view(-1, 1, 1, 1) if guided else None


@torch.no_grad()
def teacher_runs(backbone: ImageBackbone, conditions: list, seeds: list[int], guidances: list[float],
                 steps: int) -> torch.Tensor:
    """DDIM trajectories at `steps` steps, each row its own seed, condition and guidance:
    [rows, steps + 1, C, H, W] (the starting noise first, the final latents last)."""
    size, out = backbone.native_size, []
    for start in range(0, len(seeds), 64):
        rows = range(start, min(start + 64, len(seeds)))
        trajectory: list[torch.Tensor] = []
        sample_batch(backbone, [SampleJob([conditions[r]], [seeds[r]], steps, guidances[r], size, size, "ddim")
                                for r in rows], trajectory=trajectory)
        out.append(torch.stack(trajectory, dim=1))
    return torch.cat(out)


def rollout(backbone: ImageBackbone, feedback: FeedbackModule, config: ILFConfig, x: torch.Tensor, cond: dict,
            scales: torch.Tensor | None) -> torch.Tensor:
    """The student sampling on its own from `x`, every step (gradients flow when enabled)."""
    scheduler = make_scheduler("ddim", backbone.scheduler_config)
    scheduler.set_timesteps(config.steps)
    with ilf_enabled(backbone.transformer, feedback, config):
        for t in scheduler.timesteps:
            x = denoise_step(backbone, scheduler, x, t, cond, scales)
    return x


def _nested_schedulers(backbone: ImageBackbone, steps: int):
    """The student's DDIM schedule and the teacher's at twice its steps, every student timestep on it."""
    student = make_scheduler("ddim", backbone.scheduler_config)
    student.set_timesteps(steps)
    teacher = make_scheduler("ddim", backbone.scheduler_config)
    teacher.set_timesteps(2 * steps)
    if not torch.equal(teacher.timesteps[::2], student.timesteps):
        raise ValueError("the schedule's timestep spacing does not nest the student's steps in the teacher's; "
                         "use timestep_spacing='trailing'")
    return student


def _validation(backbone: ImageBackbone, cfg: ILFTraining, config: ILFConfig, feedback: FeedbackModule,
                pool: tuple):
    """PSNR of the student's rollouts against the reference sampler's images: its own seeds and
    conditions (drawn from `pool`), the serving default guidance."""
    guidance = [backbone.spec.default_guidance_scale] * cfg.validation_images
    conditions = _conditions(pool, cfg.validation_images, random.Random(f"validation {cfg.seed}"))
    runs = teacher_runs(backbone, conditions, [VALIDATION_SEED_BASE + k for k in range(cfg.validation_images)],
                        guidance, backbone.spec.default_steps)
    reference, scales = backbone.decode(runs[:, -1]), _scales(guidance, backbone.device)
    cond = backbone.conditioning(conditions, scales is not None)

    @torch.no_grad()
    def validation_psnr() -> float:
        return psnr(backbone.decode(rollout(backbone, feedback, config, runs[:, 0], cond, scales)), reference).mean().item()

    return validation_psnr


def _pool(backbone: ImageBackbone, cfg: ILFTraining, rng: random.Random, guidance: tuple[float, float],
          rolling: bool, phase_update: int, pool: tuple) -> tuple[list, list[float], torch.Tensor, torch.Tensor | None]:
    """Fresh training material: conditions, guidances, and per row the reference sampler's start and
    end (rollouts) or the 2x teacher at the student's timesteps with its mean squared move per
    student step (teacher forcing)."""
    low, high = guidance
    seed_base = TRAINING_SEED_BASE + cfg.seed * 10_000_000 + (5_000_000 if rolling else 0) + phase_update * 1000
    guidances = [low if high == low else rng.uniform(low, high) for _ in range(cfg.pool_size)]
    conditions = _conditions(pool, cfg.pool_size, rng)
    seeds = [seed_base + k for k in range(cfg.pool_size)]
    if rolling:  # the reference sampler's start and end, from the same noise
        runs = teacher_runs(backbone, conditions, seeds, guidances, backbone.spec.default_steps)
        return conditions, guidances, torch.stack([runs[:, 0], runs[:, -1]], dim=1), None
    pool = teacher_runs(backbone, conditions, seeds, guidances, 2 * cfg.steps)[:, ::2]
    return conditions, guidances, pool, ((pool[:, 1:] - pool[:, :-1]) ** 2).mean(dim=(0, 2, 3, 4))


def distil(backbone: ImageBackbone, cfg: ILFTraining, desc: str = "ilf",
           conditions: Conditions | None = None) -> tuple[FeedbackModule, ILFConfig, list[dict]]:
    """The distilled module, its config and the training history; `conditions` what it trains and
    validates on (default: training/ilf_conditions.py's for this backbone)."""
    conditions = conditions or load_conditions(backbone.name, backbone.num_classes)
    low, high = guidance_range(backbone, cfg)
    t = backbone.transformer
    config = ILFConfig.for_transformer(
        t, backbone.name, loop_start=cfg.loop_start, loop_end=cfg.loop_end, steps=cfg.steps, scheduler="ddim",
        teacher_steps=2 * cfg.steps, guidance_scale=backbone.spec.default_guidance_scale,
        feedback_init=cfg.feedback_init, guidance_range=(low, high),
        reference_steps=backbone.spec.default_steps if cfg.rollout_updates else None,
    )
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    feedback = FeedbackModule.for_backbone(t, config, seed=cfg.seed)
    feedback.eval()  # no dropout of labels or activations inside the copied block; still trainable
    opt = torch.optim.AdamW(feedback.parameters(), lr=cfg.lr, weight_decay=0.0)
    student = _nested_schedulers(backbone, cfg.steps)
    validation_psnr = _validation(backbone, cfg, config, feedback, conditions.val)

    best = {"psnr": validation_psnr(), "update": 0, "state": copy.deepcopy(feedback.state_dict())}
    history: list[dict] = [{"update": 0, "phase": "start", "validation_psnr": best["psnr"]}]
    start = time.perf_counter()
    total = cfg.updates + cfg.rollout_updates
    bar = tqdm(range(total), desc=desc, unit="update", mininterval=2.0)
    move = None  # the teacher's mean squared move per student step, from the last teacher-forcing pool
    for update in bar:
        rolling = update >= cfg.updates
        phase_update = update - cfg.updates if rolling else update
        if phase_update % cfg.refresh_every == 0:
            batch_conditions, guidances, pool, pool_move = _pool(backbone, cfg, rng, (low, high), rolling, phase_update,
                                                                 conditions.train)
            move = pool_move if pool_move is not None else move
        idx = rng.sample(range(cfg.pool_size), cfg.rollout_batch if rolling else cfg.batch_size)
        scales = _scales([guidances[j] for j in idx], backbone.device)
        cond = backbone.conditioning([batch_conditions[j] for j in idx], scales is not None)
        if rolling:
            i = cfg.steps
            loss = F.mse_loss(rollout(backbone, feedback, config, pool[idx, 0], cond, scales), pool[idx, 1])
        else:
            i = rng.randrange(cfg.steps)
            with ilf_enabled(t, feedback, config):
                x_next = denoise_step(backbone, student, pool[idx, i], student.timesteps[i], cond, scales)
            loss = F.mse_loss(x_next, pool[idx, i + 1]) / (move[i] if cfg.normalise_steps else 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        entry = {"update": update, "phase": "rollout" if rolling else "teacher forcing", "loss": loss.item(),
                 "step_index": i, "seconds": time.perf_counter() - start}
        if (update + 1) % cfg.validate_every == 0 or update == total - 1:
            entry["validation_psnr"] = validation_psnr()
            if entry["validation_psnr"] > best["psnr"]:
                best = {"psnr": entry["validation_psnr"], "update": update + 1,
                        "state": copy.deepcopy(feedback.state_dict())}
            bar.set_postfix(loss=f"{loss.item():.2e}", val_psnr=f"{entry['validation_psnr']:.2f}")
        if update % 20 == 0 or "validation_psnr" in entry:
            history.append(entry)
    feedback.load_state_dict(best["state"])
    history.append({"kept": best["update"], "validation_psnr": best["psnr"], "conditions": conditions.source,
                    "train_conditions": len(conditions.train), "val_conditions": len(conditions.val)})
    return feedback.eval().requires_grad_(False), config, history


def write_ilf_history(out_dir: Path, cfg: ILFTraining, config: ILFConfig, history: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "training.json").write_text(json.dumps({"training": asdict(cfg), "config": asdict(config),
                                                       "history": history}, indent=1))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    steps = [h for h in history if "loss" in h]
    # the loss spans decades across the schedule, so each point is coloured by its step index (the
    # rollout phase's, a whole rollout, by the step count)
    points = ax.scatter([h["update"] for h in steps], [h["loss"] for h in steps],
                        c=[h["step_index"] for h in steps], cmap="viridis", s=8)
    fig.colorbar(points, ax=ax, label="student step index", pad=0.12)
    ax.set(xlabel="update", ylabel="loss (teacher forcing, then rollout)", yscale="log",
           title=f"ILF {config.backbone}: loop {config.loop_start}-{config.loop_end}, {config.steps} steps")
    validated = [h for h in steps if "validation_psnr" in h]
    right = ax.twinx()
    right.plot([h["update"] for h in validated], [h["validation_psnr"] for h in validated], color="tab:red")
    right.set_ylabel("validation PSNR (dB)", color="tab:red")
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=100)
    plt.close(fig)


def train_ilf(manifests: BuiltManifest, model: str, cfg: ILFTraining, runs_dir: Path | None = None,
              if_missing: bool = False, conditions: Path | None = None, val_conditions: Path | None = None,
              device: str = "cpu") -> Path | None:
    """Distil on the conditions of `conditions` (a file; see training/ilf_conditions.py), save
    atomically, record in the built manifest with its checksum; returns the artifact path (None when
    `if_missing` and the model already has a module)."""
    manifest = manifests.read()
    spec = next((m for m in manifest.image if m.name == model), None)
    if spec is None:
        raise SystemExit(f"no image model {model!r} in {manifests.current()}")
    if if_missing and spec.ilf is not None:
        return None
    if spec.placeholder:
        raise SystemExit(f"{model!r} is an untrained placeholder: build the image zoo first")
    backbone = load_image_backbone(spec.model_copy(update={"ilf": None}), manifests.resolver(), device)
    pools = load_conditions(model, backbone.num_classes, conditions, val_conditions, seed=cfg.seed)
    feedback, config, history = distil(backbone, cfg, desc=f"ilf {model}", conditions=pools)
    return install_ilf(manifests, model, feedback, config, cfg, history, runs_dir)


def install_ilf(manifests: BuiltManifest, model: str, feedback: FeedbackModule, config: ILFConfig,
                cfg: ILFTraining, history: list[dict], runs_dir: Path | None = None) -> Path:
    """Save a distilled module atomically and record it in the built manifest with its checksum."""
    relative = f"ilf/{model}.safetensors"
    path = manifests.file(relative)
    sha = write_atomically(path, lambda tmp: save_ilf(tmp, feedback, config))
    write_ilf_history((runs_dir or runs_folder(manifests) / "ilf") / model, cfg, config, history)

    entry = ILFArtifact(path=relative, sha256=sha, steps=config.steps)
    manifest = manifests.read()  # re-read: only this model's entry changes
    image = [m.model_copy(update={"ilf": entry}) if m.name == model else m for m in manifest.image]
    manifests.write(manifest.model_copy(update={"image": image}))
    return path
