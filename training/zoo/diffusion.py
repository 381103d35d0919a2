"""Train a diffusion transformer on the digits: the schedule's prediction target (x0 for the zoo),
condition dropout for CFG, EMA.

One loop for both backbones; what differs (class labels vs caption states) is the `condition`
callback, which returns the model's keyword arguments for a batch with some conditions dropped.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from training.schedule import warmup_cosine
from training.zoo.architectures import noise_scheduler


@dataclass
class DenoiserTraining:
    steps: int = 3000
    batch_size: int = 128
    lr: float = 5e-4
    warmup_steps: int = 200
    ema_decay: float = 0.999
    cond_dropout: float = 0.1  # share of examples trained unconditioned (the CFG null condition)
    grad_clip: float = 1.0
    seed: int = 0


Condition = Callable[[torch.Tensor, torch.Tensor], dict]  # (example indices, dropped mask) -> kwargs


def train_denoiser(
    model: torch.nn.Module,
    images: torch.Tensor,
    condition: Condition,
    cfg: DenoiserTraining,
    desc: str,
) -> tuple[torch.nn.Module, list[dict]]:
    """Returns the EMA weights (what gets served) and the loss history."""
    generator = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    scheduler = noise_scheduler()
    model.train()
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)

    history: list[dict] = []
    start = time.perf_counter()
    running = None
    bar = tqdm(range(cfg.steps), desc=desc, unit="step", mininterval=2.0)
    for step in bar:
        idx = torch.randint(len(images), (cfg.batch_size,), generator=generator)
        x0 = images[idx]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=generator)
        dropped = torch.rand(cfg.batch_size, generator=generator) < cfg.cond_dropout
        x_t = scheduler.add_noise(x0, noise, t)
        pred = model(x_t, timestep=t, return_dict=False, **condition(idx, dropped))[0]
        target = {"epsilon": noise, "sample": x0, "v_prediction": scheduler.get_velocity(x0, noise, t)}[
            scheduler.config.prediction_type]
        loss = F.mse_loss(pred[:, : x0.shape[1]], target)

        for group in opt.param_groups:
            group["lr"] = warmup_cosine(cfg.lr, step, cfg.warmup_steps, cfg.steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema.update_parameters(model)

        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 25 == 0 or step == cfg.steps - 1:
            history.append({"step": step, "loss": loss.item(), "smoothed": running,
                            "seconds": time.perf_counter() - start})
            bar.set_postfix(loss=f"{running:.4f}")
    model.eval()
    served = ema.module.eval()
    return served, history


def write_history(history: list[dict], cfg: DenoiserTraining, extra: dict, out_dir: Path, title: str) -> None:
    """JSON for machines, PNG for people."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "training.json").write_text(json.dumps({"config": asdict(cfg), **extra, "history": history}, indent=1))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], alpha=0.3, label="batch loss")
    ax.plot([h["step"] for h in history], [h["smoothed"] for h in history], label="smoothed")
    ax.set(xlabel="step", ylabel="denoising MSE", title=title, yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=100)
    plt.close(fig)
