"""`python -m training zoo chat`: zoo-lm, then one group of boosted MoE-LoRA stacks per domain.

Each domain is trained alone on the frozen 4-bit base (the continual outer loop, where domains
build on each other's frozen stacks, comes with the meta-router). Every artifact is written to a
temporary file and renamed into place, and the manifest is rewritten atomically after each domain,
so a killed build leaves the previous state intact and resumes with `--if-missing`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from server.chat.base import load_chat_model
from server.chat.moe_lora import disable_cpu_weight_packing, save_stack, stack_modules, wrap_projections
from server.manifest import (
    Artifact, ArtifactResolver, Domain, Source, folder_digests, load_manifest, sha256_file, write_manifest,
)
from server.settings import Settings
from training.brainstacks.data import batches
from training.brainstacks.evaluate import exact_match
from training.brainstacks.inner import BoostingConfig, boost_domain, round_summary, validation_loss
from training.data.world import DOMAINS, examples
from training.zoo.language import MICRO_LM, LMRecipe, build_zoo_lm

STACKS = "artifacts/chat"


@dataclass(frozen=True)
class ChatZooRecipe:
    lm: LMRecipe = field(default_factory=LMRecipe)
    boosting: BoostingConfig = field(default_factory=BoostingConfig)
    domains: tuple[str, ...] = DOMAINS  # the curriculum order (paper: chat, code, math, medical, reasoning)
    train_examples: int = 4000
    val_examples: int = 96
    test_examples: int = 100
    max_new_tokens: int = 40


MICRO_CHAT = ChatZooRecipe(
    lm=MICRO_LM,
    boosting=BoostingConfig(steps_per_round=4, eval_every=2, batch_size=4, max_rounds=2, min_gain=-1.0),
    domains=("chat", "math"), train_examples=32, val_examples=8, test_examples=4, max_new_tokens=8,
)


def load_base(manifest_path: Path):
    """The manifest's chat base in NF4, with projections wrapped and the CPU repacking trap disabled."""
    manifest = load_manifest(manifest_path)
    settings = Settings(manifest=manifest_path, device="cpu", _env_file=None)
    chat = load_chat_model(manifest.chat.base, ArtifactResolver(manifest_path, settings.resolved_artifact_root()),
                           "cpu")
    disable_cpu_weight_packing(chat.model)
    return chat


def _atomic_stack(path: Path, modules, domain: str, recipe: ChatZooRecipe, extra: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    save_stack(tmp, modules, domain, recipe.boosting.stack, extra)
    os.replace(tmp, path)
    return sha256_file(path)


def build_base(manifest_path: Path, recipe: ChatZooRecipe, if_missing: bool, runs_dir: Path) -> dict | None:
    base_dir = manifest_path.resolve().parent
    manifest = load_manifest(manifest_path)
    entry = manifest.chat.base
    if entry.source.path is None:
        return None  # a hub base: nothing of ours to build
    if if_missing and entry.source.files and not entry.placeholder and (base_dir / entry.source.path).is_dir():
        return None
    summary = build_zoo_lm(base_dir / entry.source.path, recipe.lm, runs_dir)
    source = Source(path=entry.source.path, files=folder_digests(base_dir / entry.source.path))
    base = entry.model_copy(update={"source": source, "placeholder": False})
    # a new base invalidates every stack trained on the old one
    chat = manifest.chat.model_copy(update={"base": base, "domains": [], "router": None})
    write_manifest(manifest.model_copy(update={"chat": chat}), manifest_path)
    return summary


def train_domain_stacks(manifest_path: Path, domain: str, order: int, recipe: ChatZooRecipe, runs_dir: Path) -> dict:
    chat = load_base(manifest_path)
    model, tokenizer = chat.model, chat.tokenizer
    wrap_projections(model, recipe.boosting.stack.targets)
    train = examples(domain, "train", recipe.train_examples)
    val = batches(tokenizer, examples(domain, "val", recipe.val_examples), 32)
    test = examples(domain, "test", recipe.test_examples)
    started = time.perf_counter()
    base_loss = validation_loss(model, val)
    base_accuracy, _ = exact_match(model, tokenizer, test, max_new_tokens=recipe.max_new_tokens)
    results, kept = boost_domain(model, tokenizer, domain, train, val, recipe.boosting)
    stacks_accuracy, records = exact_match(model, tokenizer, test, max_new_tokens=recipe.max_new_tokens)

    base_dir = manifest_path.resolve().parent
    artifacts = []
    for index in range(len(kept)):
        rel = f"{STACKS}/{domain}-{index + 1}.safetensors"
        sha = _atomic_stack(base_dir / rel, stack_modules(model, domain, index), domain, recipe,
                            {"round": index + 1, "order": order, "base": chat.name})
        artifacts.append(Artifact(path=rel, sha256=sha))
    manifest = load_manifest(manifest_path)  # re-read: only this domain's entry changes
    domains = [d for d in manifest.chat.domains if d.name != domain and d.order != order]
    domains.append(Domain(name=domain, order=order, stacks=artifacts))
    write_manifest(manifest.model_copy(update={"chat": manifest.chat.model_copy(update={"domains": domains})}),
                   manifest_path)
    report = {
        "domain": domain, "order": order, "seconds": time.perf_counter() - started,
        "base_val_loss": base_loss, "rounds": round_summary(results),
        "stacks_kept": len(kept), "test_examples": len(test),
        "base_exact_match": base_accuracy, "stacks_exact_match": stacks_accuracy, "samples": records[:5],
    }
    out = runs_dir / domain
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def build_chat_zoo(manifest_path: Path, recipe: ChatZooRecipe, if_missing: bool = False,
                   runs_dir: Path | None = None) -> dict:
    manifest_path = Path(manifest_path)
    runs_dir = runs_dir or manifest_path.resolve().parent / "runs" / "zoo" / "chat"
    summary: dict = {"recipe": asdict(recipe), "machine": f"{torch.get_num_threads()} torch threads, CPU"}
    started = time.perf_counter()
    summary["base"] = build_base(manifest_path, recipe, if_missing, runs_dir)
    summary["domains"] = []
    for order, domain in enumerate(recipe.domains):
        existing = {d.name: d for d in load_manifest(manifest_path).chat.domains}
        if if_missing and domain in existing and existing[domain].stacks:
            continue
        report = train_domain_stacks(manifest_path, domain, order, recipe, runs_dir)
        summary["domains"].append(report)
        print(f"{domain}: exact match {report['base_exact_match']:.2f} (base) -> "
              f"{report['stacks_exact_match']:.2f} with {report['stacks_kept']} stack(s); "
              f"val loss {report['base_val_loss']:.3f} -> {report['rounds'][-1]['best_loss']:.3f}", flush=True)
    summary["seconds"] = time.perf_counter() - started
    runs_dir.mkdir(parents=True, exist_ok=True)
    (runs_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary
