"""`python -m training eval router-phrasings`: does the meta-router find a prompt's domain when the
prompt is phrased in a way the router never trained on?

Cross-validation over the world's *training* phrasings, so that validation and test prompts stay
unseen by any choice made here: distinct training prompts of every domain and general prompts, fold
k holding out every phrasing whose index is k modulo `folds` (three of a task kind's fifteen). A
router of each pooling learns from the other phrasings, as many examples as the zoo's router
(`train_per_domain`, `train_general`; targets: the prompt's own domain, or none for a general prompt;
the zoo's router also mixes in discovered outcomes, which need the stacks, for a quarter of its domain
examples) with the zoo's training settings, and is asked the held-out phrasings. Counted at each gate
threshold: domain prompts that get their own domain alone (and the worst task kind), general prompts
that get no domain. Only the chat base is needed (no stacks). Prints a table with the attention
pooling as the baseline and writes JSON.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

from server.chat.router import MetaRouter, RouterConfig
from server.manifest import BuiltManifest
from training.artifacts import machine
from training.brainstacks.continual import load_base
from training.brainstacks.router_training import RouterTraining, base_features, fit_router
from training.data.world import DOMAINS, Example, examples
from training.eval.statistics import wilson_interval


@dataclass(frozen=True)
class RouterPhrasingsEval:
    prompts_per_domain: int = 500  # distinct training-phrasing prompts of every domain, and general ones
    folds: int = 5  # fold k holds out the phrasings whose index is k modulo `folds`
    train_per_domain: int = 96  # the zoo's router: 24 discovered and 72 labelled examples a domain
    train_general: int = 240
    poolings: tuple[str, ...] = ("attention", "mean")  # the first is the baseline
    thresholds: tuple[float, ...] = (0.2, 0.3, 0.5)
    seeds: tuple[int, ...] = (0,)  # more seeds count a prompt more than once: the intervals would be too narrow
    router: RouterTraining = field(default_factory=RouterTraining)


def distinct_prompts(domain: str, count: int) -> list[Example]:
    seen: dict[str, Example] = {}
    for example in examples(domain, "train", 20 * count, seed=11):
        seen.setdefault(example.prompt, example)
        if len(seen) == count:
            break
    return list(seen.values())


def rows_of(feats: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """Per prompt, its unpadded features (batches are right-padded)."""
    return [states[row, : int(mask[row].sum())] for states, mask in feats for row in range(len(states))]


def batched(rows: list[torch.Tensor], size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded batches of per-prompt features, with their masks."""
    return [(pad_sequence(chunk, batch_first=True),
             pad_sequence([torch.ones(len(r), dtype=torch.long) for r in chunk], batch_first=True))
            for chunk in (rows[start:start + size] for start in range(0, len(rows), size))]


def fold_split(items: list[Example], fold: int, folds: int, cfg: RouterPhrasingsEval) -> tuple[list[int], list[int]]:
    """Indices to train on (the first of each domain whose phrasing is not held out) and to ask."""
    train, asked = [], []
    for domain in DOMAINS + ("general",):
        kept = [i for i, e in enumerate(items) if e.domain == domain and e.phrasing % folds != fold]
        train += kept[: cfg.train_general if domain == "general" else cfg.train_per_domain]
        asked += [i for i, e in enumerate(items) if e.domain == domain and e.phrasing % folds == fold]
    return train, asked


def run_router_phrasings(manifests: BuiltManifest, out_dir: Path, cfg: RouterPhrasingsEval = RouterPhrasingsEval(),
                         device: str = "cpu") -> dict:
    started = time.perf_counter()
    chat = load_base(manifests, device)
    config = chat.model.config
    items = [e for d in DOMAINS + ("general",) for e in distinct_prompts(d, cfg.prompts_per_domain)]
    reader = RouterConfig(domains=DOMAINS, hidden_size=config.hidden_size, middle_layer=config.num_hidden_layers // 2)
    rows = [r.cpu() for r in rows_of(base_features(chat.model, MetaRouter(reader).to(device), chat.tokenizer,
                                                   [e.messages() for e in items], cfg.router.batch_size))]
    target = torch.tensor([[float(e.domain == d) for d in DOMAINS] for e in items])
    right: dict = defaultdict(list)  # (pooling, threshold, domain/kind) -> [bool]
    runs = [(p, f, s) for p in cfg.poolings for f in range(cfg.folds) for s in cfg.seeds]
    for pooling, fold, seed in tqdm(runs, desc="router folds", unit="router"):
        train, asked = fold_split(items, fold, cfg.folds, cfg)
        order = [train[i] for i in torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))]
        torch.manual_seed(seed)
        router = MetaRouter(replace(reader, pooling=pooling))
        fit_router(router, batched([rows[i] for i in order], cfg.router.batch_size), target[order],
                   replace(cfg.router, seed=seed), progress=False)
        with torch.no_grad():
            probabilities = torch.cat([torch.sigmoid(router(s, m)) for s, m in batched([rows[i] for i in asked], 64)])
        for threshold in cfg.thresholds:
            for i, p in zip(asked, probabilities.tolist()):
                applied = tuple(d for d, q in zip(DOMAINS, p) if q > threshold)
                wanted = (items[i].domain,) if items[i].domain in DOMAINS else ()
                right[pooling, threshold, f"{items[i].domain}/{items[i].kind}"].append(applied == wanted)
    results = []
    for pooling in cfg.poolings:
        for threshold in cfg.thresholds:
            kinds = {k: v for (p, t, k), v in right.items() if p == pooling and t == threshold}
            domain = [x for k, v in kinds.items() if not k.startswith("general/") for x in v]
            general = [x for k, v in kinds.items() if k.startswith("general/") for x in v]
            worst = min((k for k in kinds if not k.startswith("general/")), key=lambda k: sum(kinds[k]) / len(kinds[k]))
            results.append({"pooling": pooling, "threshold": threshold,
                            "own_domain_only": sum(domain) / len(domain), "n": len(domain),
                            "interval": list(wilson_interval(sum(domain), len(domain))),
                            "worst_kind": worst, "worst_kind_own_domain_only": sum(kinds[worst]) / len(kinds[worst]),
                            "general_no_domain": sum(general) / len(general), "general_n": len(general),
                            "general_interval": list(wilson_interval(sum(general), len(general))),
                            "by_kind": {k: sum(v) / len(v) for k, v in sorted(kinds.items())}})
    report = {"config": asdict(cfg), "machine": machine(device), "base": chat.name,
              "distinct_prompts": {d: sum(e.domain == d for e in items) for d in DOMAINS + ("general",)},
              "results": results, "seconds": time.perf_counter() - started}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "router_phrasings.json").write_text(json.dumps(report, indent=1))
    print(format_table(report, cfg))
    print(f"wrote {out_dir / 'router_phrasings.json'} ({report['seconds'] / 60:.1f} min on {report['machine']})")
    return report


def format_table(report: dict, cfg: RouterPhrasingsEval) -> str:
    baseline = {r["threshold"]: r for r in report["results"] if r["pooling"] == cfg.poolings[0]}
    lines = [f"held-out training phrasings, {cfg.folds} folds x {len(cfg.seeds)} seeds; distinct prompts "
             + ", ".join(f"{d} {n}" for d, n in report["distinct_prompts"].items()),
             f"{'pooling':10s} {'gate':>5s} {'own domain only [95%]':>24s} {'worst kind':>28s} "
             f"{'general: none [95%]':>22s} {'errors vs ' + cfg.poolings[0]:>18s}"]
    for r in report["results"]:
        base_errors = 1 - baseline[r["threshold"]]["own_domain_only"]
        ratio = (1 - r["own_domain_only"]) / base_errors if base_errors else float("nan")
        low, high = r["interval"]
        g_low, g_high = r["general_interval"]
        lines.append(f"{r['pooling']:10s} {r['threshold']:5.2f} {r['own_domain_only']:8.3f} [{low:.3f}, {high:.3f}]"
                     f" {r['worst_kind']:>20s} {r['worst_kind_own_domain_only']:.2f}"
                     f" {r['general_no_domain']:7.3f} [{g_low:.3f}, {g_high:.3f}] {ratio:17.2f}x")
    return "\n".join(lines)
