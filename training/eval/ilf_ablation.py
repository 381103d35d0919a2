"""`python -m training ilf-ablation --model NAME`: what each part of the ILF distillation buys.

One module per variant, each from the same seed, loop span and steps (the model's served module's,
or `training ilf`'s defaults), each part added on top of the one before:

    one-step       teacher forcing against DDIM at 2x the student's steps (the first distillation)
    + normalised   each step's loss over the teacher's mean squared move at that step
    + rollouts     then the student's own rollouts against the reference sampler (DDIM at the model's
                   default steps, what fidelity is judged against)
    + guidance     rows drawn across guidance 1 to 2x the model's default, not its default alone

Measured on the validation seeds (training/ilf_distill.py; never the image yardstick's): mean PSNR of
the ILF image against the reference sampler's image from the same noise and condition, at the
model's default guidance and at both ends of the guidance range, with 95% bootstrap intervals;
and the distillation's seconds. Prints a table and writes JSON.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from server.imaging.backbones import load_image_backbone
from server.imaging.ilf import LoadedILF
from server.manifest import BuiltManifest
from training.eval.ilf_sweep import sampled_images
from training.eval.images import Protocol, eval_set
from training.metrics import bootstrap_interval, psnr
from training.ilf_distill import VALIDATION_SEED_BASE, ILFTraining, distil, install_ilf

VARIANTS: dict[str, dict] = {
    "one-step": dict(normalise_steps=False, rollout_updates=0, guidance_max_factor=0.0),
    "+ normalised": dict(normalise_steps=True, rollout_updates=0, guidance_max_factor=0.0),
    "+ rollouts": dict(normalise_steps=True, guidance_max_factor=0.0),
    "+ guidance": dict(normalise_steps=True, guidance_max_factor=2.0),
}


def run_ablation(manifests: BuiltManifest, model: str, out: Path, base: ILFTraining | None = None,
                 per_class: int = 6, variants: dict[str, dict] = VARIANTS, install: bool = False) -> list[dict]:
    """With `install`, the variant with the best mean PSNR at the model's default guidance becomes the
    model's served module (as `training ilf` would write it), so the ablation's winner is not distilled twice."""
    torch.set_grad_enabled(True)
    spec = next((m for m in manifests.read().image if m.name == model), None)
    if spec is None or spec.placeholder:
        raise SystemExit(f"{model!r} is not a trained image model in {manifests.current()}")
    backbone = load_image_backbone(spec.model_copy(update={"ilf": None}), manifests.resolver(), "cpu")
    base = base or ILFTraining()
    data = eval_set(backbone, Protocol(per_class=per_class, seed_base=VALIDATION_SEED_BASE))
    default = spec.default_guidance_scale
    guidances = sorted({1.0, default, 2.0 * default})
    references = {g: sampled_images(backbone, data, "ddim", spec.default_steps, g) for g in guidances}
    rows, modules = [], {}
    for name, changes in tqdm(variants.items(), desc="variants"):
        cfg = replace(base, **changes)
        began = time.perf_counter()
        feedback, config, history = distil(backbone, cfg, desc=name)
        seconds = time.perf_counter() - began
        backbone.ilf = LoadedILF(feedback, config)
        row = {"variant": name, "training": {k: getattr(cfg, k) for k in changes}, "seconds": seconds,
               "kept_update": history[-1]["kept"], "psnr": {}}
        for g in guidances:
            values = psnr(sampled_images(backbone, data, "ddim", cfg.steps, g, "ilf"), references[g]).numpy()
            row["psnr"][f"{g:g}"] = {"mean": float(values.mean()),
                                     "ci95": list(bootstrap_interval(np.mean, values, rounds=1000))}
        backbone.ilf = None
        rows.append(row)
        modules[name] = (feedback, config, cfg, history)
        print(format_row(row), flush=True)
    table = report(rows, guidances, default)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"ilf-ablation-{model}.json").write_text(json.dumps(
        {"model": model, "images": len(data.seeds), "seed_base": VALIDATION_SEED_BASE, "reference_steps":
         spec.default_steps, "default_guidance": default, "base": asdict(base), "rows": rows}, indent=1))
    (out / f"ilf-ablation-{model}.md").write_text(table + "\n")
    if install:
        best = max(rows, key=lambda row: row["psnr"][f"{default:g}"]["mean"])["variant"]
        path = install_ilf(manifests, model, *modules[best])
        print(f"installed {best!r} as {model}'s ILF module: {path}")
    return rows


def format_row(row: dict) -> str:
    return f"{row['variant']}: " + ", ".join(f"g {g}: {p['mean']:.2f} dB" for g, p in row["psnr"].items())


def report(rows: list[dict], guidances: list[float], default: float) -> str:
    head = " | ".join(f"PSNR at guidance {g:g}{' (default)' if g == default else ''}" for g in guidances)
    lines = [f"| variant | {head} | kept at update | seconds |", "|---" * (len(guidances) + 3) + "|"]
    for row in rows:
        cells = " | ".join(f"{p['mean']:.2f} ({p['ci95'][0]:.2f}-{p['ci95'][1]:.2f})" for p in row["psnr"].values())
        lines.append(f"| {row['variant']} | {cells} | {row['kept_update']} | {row['seconds']:.0f} |")
    return "\n".join(lines)
