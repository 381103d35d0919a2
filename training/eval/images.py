"""`python -m training eval images`: the image yardstick, on the models the server would serve.

Fixed protocol (written down in PROTOCOL and in the JSON): the same seeds, conditions, guidance and
samplers every run. Per model it reports, per sampler: seconds per image, class accuracy (DiT) or
prompt accuracy on held-out phrasings (PixArt), Digit-FID against held-out real digits, and the
fidelity (PSNR, SSIM) of each image to the 20-step DDIM image from the same seed and condition.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from server.imaging.backbones import ImageBackbone, load_image_backbone
from server.imaging.sampler import SampleJob, sample
from server.manifest import BuiltManifest
from training.data.digits import HELDOUT_TEMPLATES, caption, digit_split
from training.eval.cache_dit import dbcache
from training.eval.caches import cache_capable, caching
from training.eval.classifier import DigitClassifier, accuracy, load_or_train_classifier
from training.metrics import bootstrap_interval, frechet_distance, psnr, ssim


@dataclass(frozen=True)
class Protocol:
    per_class: int = 30  # images per digit (PixArt: spread over the held-out phrasings)
    seed_base: int = 10_000
    batch_size: int = 30
    # Timing: rounds that each time every sampler once, in turn; a sampler's speedup is the median
    # over rounds of the reference's time in that round over its own (spread: the rounds' min-max)
    latency_rounds_batch1: int = 7
    latency_batch: int = 16
    latency_rounds: int = 5  # at latency_batch
    # (scheduler, steps, mode); a model with an ILF module also gets its ILF row
    samplers: tuple[tuple[str, int, str], ...] = (
        ("ddim", 20, "baseline"), ("ddim", 15, "baseline"), ("ddim", 10, "baseline"), ("ddim", 8, "baseline"),
        ("dpm++", 10, "baseline"), ("dpm++", 8, "baseline"),
        # diffusers' cache hooks on the 20-step sampler: the in-library way to go faster
        ("ddim", 20, "cache:fbc-0.1"), ("ddim", 20, "cache:fbc-0.2"),
        ("ddim", 20, "cache:taylorseer-2"), ("ddim", 20, "cache:taylorseer-3"), ("ddim", 20, "cache:taylorseer-4"),
        ("ddim", 20, "cache:pab-2"), ("ddim", 20, "cache:pab-3"),
        ("ddim", 20, "cache:fastercache-2"), ("ddim", 20, "cache:fastercache-3"),
        # cache-dit's DBCache: the first block decides, the last computes, 8 warm-up steps (its default)
        ("ddim", 20, "cache:dbcache-F1B1-0.1"), ("ddim", 20, "cache:dbcache-F1B1-0.2"),
    )
    # and a model with an ILF module, ILF's own schedule with each of these caches on top
    ilf_caches: tuple[str, ...] = ("fbc-0.1", "fbc-0.2", "fbc-0.3")
    reference: tuple[str, int, str] = ("ddim", 20, "baseline")
    bootstrap_rounds: int = 200
    guidance: dict[str, float] = field(default_factory=dict)  # per model; default: the manifest's


@dataclass(frozen=True)
class EvalSet:
    conditions: list  # class ids or prompts
    labels: torch.Tensor
    seeds: list[int]


def eval_set(backbone: ImageBackbone, protocol: Protocol) -> EvalSet:
    conditions, labels, seeds = [], [], []
    for digit in range(10):
        for k in range(protocol.per_class):
            if backbone.spec.kind == "dit":
                conditions.append(digit)
            else:
                conditions.append(caption(HELDOUT_TEMPLATES[k % len(HELDOUT_TEMPLATES)], digit))
            labels.append(digit)
            seeds.append(protocol.seed_base + 1000 * digit + k)
    return EvalSet(conditions, torch.tensor(labels), seeds)


def split_mode(mode: str) -> tuple[str, str | None]:
    """A sampler's mode as (the job's mode, its diffusers cache or None): "baseline", "ilf",
    "cache:NAME" (the baseline with a cache), "ilf+cache:fbc-T" (ILF's schedule with FirstBlockCache)."""
    if "cache:" not in mode:
        return mode, None
    prefix, name = mode.split("cache:")
    if prefix == "ilf+" and not name.startswith("fbc-"):
        raise ValueError(f"{mode!r}: ILF composes with FirstBlockCache only (TaylorSeer counts each call of a "
                         "block as a step, and ILF's loop calls its blocks twice a step)")
    return ("ilf" if prefix == "ilf+" else "baseline"), name


def served_cache(mode: str) -> bool:
    """FirstBlockCache runs as the server serves it (a job setting)."""
    cache = split_mode(mode)[1]
    return cache is not None and cache.startswith("fbc-")


def needs_cache_mixin(mode: str) -> bool:
    """diffusers' other caches run on the cache-capable copy of the backbone; cache-dit's on the backbone."""
    cache = split_mode(mode)[1]
    return cache is not None and not cache.startswith(("fbc-", "dbcache-"))


def _run(backbone: ImageBackbone, data: EvalSet, sl: slice, sampler: tuple, guidance: float):
    """One sample() call for a sampler spec (scheduler, steps, mode)."""
    scheduler, steps, mode = sampler
    size = backbone.native_size
    job_mode, cache = split_mode(mode)
    threshold = float(cache.removeprefix("fbc-")) if served_cache(mode) else None
    job = SampleJob(data.conditions[sl], data.seeds[sl], steps, guidance, size, size, scheduler, job_mode, threshold)
    if cache is None or threshold is not None:
        return sample(backbone, job)
    hooks = dbcache(backbone, cache.removeprefix("dbcache-"), steps) if cache.startswith("dbcache-") \
        else caching(backbone, cache, steps)
    with hooks as step_context:
        return sample(backbone, job, step_context)


def generate(backbone: ImageBackbone, data: EvalSet, sampler: tuple, guidance: float,
             batch_size: int) -> tuple[torch.Tensor, float, int | None]:
    images, seconds, blocks = [], 0.0, 0
    for start in range(0, len(data.seeds), batch_size):
        result = _run(backbone, data, slice(start, start + batch_size), sampler, guidance)
        images.append(result.images)
        seconds += result.seconds
        blocks += result.block_evaluations * len(result.images)
    # per image, the mean over batches (FirstBlockCache skips per batch); the other caches skip inside
    # blocks, which the sampler does not see
    blocks = None if split_mode(sampler[2])[1] and not served_cache(sampler[2]) else round(blocks / len(data.seeds))
    return torch.cat(images), seconds / len(data.seeds), blocks


def latencies(models: list[ImageBackbone], data: EvalSet, samplers: list[tuple], guidance: float, batch: int,
              rounds: int) -> list[list[float]]:
    """Seconds per image for each sampler at this batch size, per round: one warm-up call each, then
    `rounds` rounds that time every sampler once in turn. A slow spell of the shared machine then
    lands in one round, where it slows the reference too, instead of in one sampler's timings."""
    batch = min(batch, len(data.seeds))
    timed: list[list[float]] = [[] for _ in samplers]
    for round_index in range(rounds + 1):
        for i, (model, sampler) in enumerate(zip(models, samplers)):
            start = time.perf_counter()
            _run(model, data, slice(0, batch), sampler, guidance)
            if round_index > 0:
                timed[i].append((time.perf_counter() - start) / batch)
    return timed


def sampler_name(sampler: tuple) -> str:
    scheduler, steps, mode = sampler
    job_mode, cache = split_mode(mode)
    base = f"ilf-{steps}" if job_mode == "ilf" else f"{scheduler}-{steps}"
    return f"{cache}@{base}" if cache else base


@torch.no_grad()
def features(classifier: DigitClassifier, images01: torch.Tensor) -> np.ndarray:
    return classifier.embed(images01 * 2 - 1).numpy().astype(np.float64)


def evaluate_model(backbone: ImageBackbone, classifier: DigitClassifier, real_features: np.ndarray,
                   protocol: Protocol) -> tuple[list[dict], dict[str, torch.Tensor]]:
    data = eval_set(backbone, protocol)
    guidance = protocol.guidance.get(backbone.name, backbone.spec.default_guidance_scale)
    generated: dict[str, torch.Tensor] = {}
    rows = []
    samplers = list(protocol.samplers)
    if backbone.ilf is not None:
        ilf = backbone.ilf.config
        samplers += [(ilf.scheduler, ilf.steps, mode) for mode in ("ilf", *(f"ilf+cache:{c}" for c in protocol.ilf_caches))]
    hooked = [needs_cache_mixin(mode) for _, _, mode in samplers]
    cached = cache_capable(backbone) if any(hooked) else None
    models = [cached if h else backbone for h in hooked]
    for sampler, model in tqdm(list(zip(samplers, models)), desc=f"eval {backbone.name}", unit="sampler"):
        scheduler, steps, mode = sampler
        name = sampler_name(sampler)
        images, per_image, blocks = generate(model, data, sampler, guidance, protocol.batch_size)
        generated[name] = images
        feats = features(classifier, images)
        with torch.no_grad():
            correct = (classifier(images * 2 - 1).argmax(1) == data.labels).numpy().astype(np.float64)
        rows.append({
            "sampler": name, "scheduler": scheduler, "steps": steps, "mode": mode, "guidance_scale": guidance,
            "block_evaluations": blocks,
            "seconds_per_image_eval_batches": per_image,
            "accuracy": float(correct.mean()),
            "accuracy_ci95": bootstrap_interval(np.mean, correct, rounds=protocol.bootstrap_rounds),
            "digit_fid": frechet_distance(feats, real_features),
            "digit_fid_ci95": bootstrap_interval(frechet_distance, feats, real_features,
                                                 rounds=protocol.bootstrap_rounds, recentre=True),
        })
    print(f"timing {len(samplers)} samplers, interleaved", flush=True)
    reference_index = next(i for i, r in enumerate(rows) if r["sampler"] == sampler_name(protocol.reference))
    for batch, rounds in ((1, protocol.latency_rounds_batch1), (protocol.latency_batch, protocol.latency_rounds)):
        timed = latencies(models, data, samplers, guidance, batch, rounds)
        for row, seconds in zip(rows, timed):
            speedups = [ref / own for ref, own in zip(timed[reference_index], seconds)]
            row[f"seconds_per_image_batch{batch}"] = float(np.median(seconds))
            row[f"seconds_per_image_batch{batch}_rounds"] = seconds
            row[f"speedup_batch{batch}"] = float(np.median(speedups))
            row[f"speedup_batch{batch}_range"] = [min(speedups), max(speedups)]
    reference = generated[sampler_name(protocol.reference)]
    for row in rows:
        images = generated[row["sampler"]]
        row["psnr_vs_reference_db"] = float(psnr(images, reference).mean())
        row["ssim_vs_reference"] = float(ssim(images, reference).mean())
    judge_against_frontier(rows, rows[reference_index], protocol.latency_batch)
    return rows, generated


def judge_against_frontier(rows: list[dict], reference: dict, batch: int) -> None:
    """Per row: the rows at least as fast in a batch (median speedup) and more faithful to the
    reference (PSNR), which dominate it (none: it is on the speed/fidelity frontier); and whether it
    keeps the reference's quality: accuracy within 1 point, Digit-FID inside the reference's interval."""
    speed = f"speedup_batch{batch}"
    low, high = reference["digit_fid_ci95"]
    for row in rows:
        row["dominated_by"] = [other["sampler"] for other in rows if other is not row
                               and other[speed] >= row[speed]
                               and other["psnr_vs_reference_db"] > row["psnr_vs_reference_db"]]
        row["keeps_quality"] = (abs(row["accuracy"] - reference["accuracy"]) <= 0.01 and low <= row["digit_fid"] <= high)


def real_floor(classifier: DigitClassifier, protocol: Protocol, real_features: np.ndarray) -> dict:
    """Real-vs-real Digit-FID: as many training digits as a model's eval set, vs the held-out set."""
    split = digit_split()
    n = 10 * protocol.per_class
    pick = torch.randperm(len(split.train_images), generator=torch.Generator().manual_seed(0))[:n]
    feats = features(classifier, (split.train_images[pick] + 1) / 2)
    return {"digit_fid": frechet_distance(feats, real_features), "images": n,
            "digit_fid_ci95": bootstrap_interval(frechet_distance, feats, real_features,
                                                 rounds=protocol.bootstrap_rounds, recentre=True)}


def format_table(name: str, rows: list[dict], floor: dict) -> str:
    b = next(k for k in rows[0] if re.fullmatch(r"speedup_batch\d+", k) and k != "speedup_batch1").removeprefix("speedup_")
    head = (f"{'sampler':<24}{'steps':>6}{'blocks':>7}{'guid':>6}{'s/img b1':>10}{'s/img b' + b[5:]:>10}"
            f"{'speedup b1/b' + b[5:]:>16}{'b' + b[5:] + ' rounds':>14}"
            f"{'acc':>7}{'acc 95% CI':>15}{'Digit-FID':>11}{'FID 95% CI':>17}{'PSNR dB':>9}{'SSIM':>7}"
            f"{'quality':>8}  dominated by (faster and more faithful)")
    lines = [f"== {name}  (real-vs-real Digit-FID floor {floor['digit_fid']:.2f}, "
             f"95% CI {floor['digit_fid_ci95'][0]:.2f}-{floor['digit_fid_ci95'][1]:.2f})", head]
    for r in rows:
        lines.append(
            f"{r['sampler']:<24}{r['steps']:>6}{r['block_evaluations'] or '-':>7}{r['guidance_scale']:>6.1f}"
            f"{r['seconds_per_image_batch1']:>10.3f}{r['seconds_per_image_' + b]:>10.4f}"
            f"{r['speedup_batch1']:>9.2f}/{r['speedup_' + b]:.2f}x"
            f"{'%.2f-%.2f' % tuple(r['speedup_' + b + '_range']):>14}"
            f"{r['accuracy']:>7.3f}{'%.3f-%.3f' % tuple(r['accuracy_ci95']):>15}{r['digit_fid']:>11.2f}"
            f"{'%.2f-%.2f' % tuple(r['digit_fid_ci95']):>17}{r['psnr_vs_reference_db']:>9.2f}"
            f"{r['ssim_vs_reference']:>7.3f}{'kept' if r['keeps_quality'] else 'lost':>8}  "
            f"{', '.join(r['dominated_by'][:3]) + (' ...' if len(r['dominated_by']) > 3 else '') or 'frontier'}"
        )
    return "\n".join(lines)


def save_grid(path: Path, name: str, generated: dict[str, torch.Tensor], data: EvalSet, per_class: int,
              columns: int = 6) -> None:
    """Rows = digits (or prompts); a block of columns per sampler, the same seeds in each block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(columns, per_class)
    blocks = []
    for images in generated.values():
        rows = [torch.cat(list(images[d * per_class : d * per_class + columns, 0]), dim=1) for d in range(10)]
        blocks.append(torch.cat(rows, dim=0))
    fig, axes = plt.subplots(1, len(blocks), figsize=(2.2 * len(blocks), 4.2))
    for ax, title, block in zip(np.atleast_1d(axes), generated, blocks):
        ax.imshow(block.numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    first = [c if isinstance(c, str) else f"class {c}" for c in data.conditions[::per_class]]
    fig.suptitle(f"{name}: rows {first[0]!r} ... {first[-1]!r}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def method_of(row: dict) -> str:
    job_mode, cache = split_mode(row["mode"])
    method = "ilf" if job_mode == "ilf" else row["scheduler"]
    if cache:
        return cache.rsplit("-", 1)[0] + (" on ilf" if job_mode == "ilf" else "")
    return method


def save_frontier(path: Path, name: str, rows: list[dict], batch: int) -> None:
    """Speed/fidelity frontier: seconds per image in a batch vs PSNR to DDIM-20, one curve per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(method_of(r) for r in rows):
        points = sorted((r[f"seconds_per_image_batch{batch}"], r["psnr_vs_reference_db"], r["sampler"])
                        for r in rows if method_of(r) == method and r["psnr_vs_reference_db"] < 100)
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=method)
            for x, y, label in points:
                ax.annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel=f"seconds per image (batch of {batch})", ylabel="PSNR vs DDIM-20 (dB)",
           title=f"{name}: speed / fidelity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()  # a decorator, not a global switch: callers (and tests after this one) keep autograd
def run_image_eval(manifests: BuiltManifest, out_dir: Path, protocol: Protocol = Protocol(),
                   models: list[str] | None = None) -> dict:
    manifest, resolver = manifests.read(), manifests.resolver()
    split = digit_split()
    out_dir.mkdir(parents=True, exist_ok=True)
    classifier = load_or_train_classifier(out_dir / "digit-classifier.safetensors", split)
    real_features = features(classifier, (split.heldout_images + 1) / 2)
    report = {
        "protocol": asdict(protocol),
        "classifier_heldout_accuracy": accuracy(classifier, split.heldout_images, split.heldout_labels),
        "real_vs_real": real_floor(classifier, protocol, real_features),
        "machine": f"{torch.get_num_threads()} torch threads, CPU",
        "models": {},
    }
    for spec in manifest.image:
        if models and spec.name not in models:
            continue
        backbone = load_image_backbone(spec, resolver, "cpu")
        rows, generated = evaluate_model(backbone, classifier, real_features, protocol)
        report["models"][spec.name] = rows
        save_grid(out_dir / f"{spec.name}.png", spec.name, generated, eval_set(backbone, protocol),
                  protocol.per_class)
        save_frontier(out_dir / f"{spec.name}-frontier.png", spec.name, rows, protocol.latency_batch)
        print(format_table(spec.name, rows, report["real_vs_real"]), flush=True)
    (out_dir / "images.json").write_text(json.dumps(report, indent=1))
    print(f"digit classifier accuracy on held-out real digits: {report['classifier_heldout_accuracy']:.3f}")
    print(f"wrote {out_dir / 'images.json'} and one PNG grid per model")
    return report
