"""The continual outer loop (Brainstacks §3.4, Algorithm 2) and the served language zoo.

Domains train one after another in curriculum order, each domain's residual boosting on top of
every earlier domain's frozen stacks, its new stacks confined to the null space of the earlier
domains' deltas (`nullspace.py`, switchable). After each domain a forgetting-matrix row records
every domain so far at two settings: *isolation* (domain i with the stacks that were on when it
finished, its own and earlier ones, and every later stack off) and *ungated* (every stack on).
Then the meta-router learns from discovered outcomes. Each artifact is written to a temporary file
and renamed into place, and the manifest is rewritten after each domain.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from server.chat.base import load_chat_model
from server.chat.moe_lora import (
    disable_cpu_weight_packing, load_stack, routed, save_stack, stack_modules, wrap_projections,
)
from server.chat.router import save_router
from server.manifest import Artifact, ArtifactResolver, Domain, Source, load_manifest, write_manifest
from server.artifacts import folder_digests, write_atomically
from server.settings import Settings
from training.brainstacks.data import batches
from training.brainstacks.evaluate import exact_match
from training.brainstacks.inner import BoostingConfig, boost_domain, round_summary, validation_loss
from training.brainstacks.nullspace import NullSpaceConfig, claimed_bases
from training.brainstacks.routing import RouterTraining, train_router
from training.data.world import DOMAINS, examples
from training.zoo.language import MICRO_LM, LMRecipe, build_zoo_lm

STACKS = "artifacts/chat"


@dataclass(frozen=True)
class ChatZooRecipe:
    lm: LMRecipe = field(default_factory=LMRecipe)
    boosting: BoostingConfig = field(default_factory=BoostingConfig)
    nullspace: NullSpaceConfig = field(default_factory=NullSpaceConfig)
    router: RouterTraining | None = field(default_factory=RouterTraining)
    domains: tuple[str, ...] = DOMAINS  # the curriculum order (docs/brainstacks.md says why)
    train_examples: int = 4000
    val_examples: int = 96
    test_examples: int = 100
    projection_examples: int = 48  # per earlier domain, for the null space
    max_new_tokens: int = 40


MICRO_CHAT = ChatZooRecipe(
    lm=MICRO_LM,
    boosting=BoostingConfig(steps_per_round=4, eval_every=2, batch_size=4, max_rounds=2, min_gain=-1.0),
    nullspace=NullSpaceConfig(samples=64),
    router=RouterTraining(examples_per_domain=4, epochs=3, batch_size=8),
    domains=("chat", "math"), train_examples=32, val_examples=8, test_examples=4, projection_examples=4,
    max_new_tokens=8,
)


def load_base(manifest_path: Path):
    """The manifest's chat base in NF4, with projections wrapped and the CPU repacking trap disabled."""
    manifest = load_manifest(manifest_path)
    settings = Settings(manifest=manifest_path, device="cpu", _env_file=None)
    chat = load_chat_model(manifest.chat.base, ArtifactResolver(manifest_path, settings.resolved_artifact_root()),
                           "cpu")
    disable_cpu_weight_packing(chat.model)
    wrap_projections(chat.model)
    return chat


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
    # a new base invalidates every stack and router trained on the old one
    chat = manifest.chat.model_copy(update={"base": base, "domains": [], "router": None})
    write_manifest(manifest.model_copy(update={"chat": chat}), manifest_path)
    return summary


def isolation_route(domains: tuple[str, ...], index: int) -> dict[str, float]:
    """Domain `index` with the stacks that were on when it finished training; later ones off."""
    return {d: 1.0 for d in domains[: index + 1]}


@dataclass
class DomainData:
    train: list
    val: list  # batches
    test: list
    projection: list  # batches of this domain's examples, for later domains' null spaces


def domain_data(tokenizer, domain: str, recipe: ChatZooRecipe) -> DomainData:
    return DomainData(
        train=examples(domain, "train", recipe.train_examples),
        val=batches(tokenizer, examples(domain, "val", recipe.val_examples), 32),
        test=examples(domain, "test", recipe.test_examples),
        projection=batches(tokenizer, examples(domain, "train", recipe.projection_examples, seed=1), 16),
    )


def run_continual(model, tokenizer, recipe: ChatZooRecipe, data: dict[str, DomainData], start: int = 0,
                  on_domain=None) -> dict:
    """Train domains[start:] in order on top of whatever earlier stacks `model` carries.
    Returns per-domain reports and the forgetting matrices (rows: after domain j; columns: domain i)."""
    domains = recipe.domains
    reports, isolation, ungated, post_freeze = [], [], [], {}
    for j in range(start, len(domains)):
        domain = domains[j]
        started = time.perf_counter()
        earlier = list(domains[:j])
        prompts = [b for d in earlier for b in data[d].projection]
        with routed(model, isolation_route(domains, j)):  # earlier domains on; this one's stacks as they come
            start_loss = validation_loss(model, data[domain].val)
            base_accuracy, _ = exact_match(model, tokenizer, data[domain].test, max_new_tokens=recipe.max_new_tokens)
            bases = claimed_bases(model, prompts, earlier, recipe.nullspace)
            results, kept = boost_domain(model, tokenizer, domain, data[domain].train, data[domain].val,
                                         recipe.boosting, bases)
        route = isolation_route(domains, j)
        with routed(model, route):
            post_freeze[domain] = validation_loss(model, data[domain].val)
            accuracy, records = exact_match(model, tokenizer, data[domain].test, max_new_tokens=recipe.max_new_tokens)
        row_iso, row_all = {}, {}
        for i, other in enumerate(domains[: j + 1]):
            with routed(model, isolation_route(domains, i)):
                row_iso[other] = validation_loss(model, data[other].val)
            with routed(model, None):
                row_all[other] = validation_loss(model, data[other].val)
        isolation.append(row_iso)
        ungated.append(row_all)
        report = {
            "domain": domain, "order": j, "seconds": time.perf_counter() - started,
            "val_loss_before": start_loss, "rounds": round_summary(results), "stacks_kept": len(kept),
            "post_freeze_val_loss": post_freeze[domain], "exact_match_before": base_accuracy,
            "exact_match_after": accuracy, "samples": records[:5], "projection": recipe.nullspace.enabled and j > 0,
            "forgetting_isolation": row_iso, "forgetting_ungated": row_all,  # this row, kept when a build resumes
        }
        reports.append(report)
        print(f"{domain}: val loss {start_loss:.3f} -> {post_freeze[domain]:.3f}, exact match "
              f"{base_accuracy:.2f} -> {accuracy:.2f} with {len(kept)} stack(s)", flush=True)
        if on_domain is not None:
            on_domain(j, domain, len(kept), report)
    return {"domains": reports, "post_freeze": post_freeze,
            "forgetting_isolation": isolation, "forgetting_ungated": ungated}


def build_chat_zoo(manifest_path: Path, recipe: ChatZooRecipe = ChatZooRecipe(), if_missing: bool = False,
                   runs_dir: Path | None = None) -> dict:
    manifest_path = Path(manifest_path)
    base_dir = manifest_path.resolve().parent
    runs_dir = runs_dir or base_dir / "runs" / "zoo" / "chat"
    runs_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    summary: dict = {"recipe": asdict(recipe), "machine": f"{torch.get_num_threads()} torch threads, CPU"}
    summary["base"] = build_base(manifest_path, recipe, if_missing, runs_dir)

    manifest = load_manifest(manifest_path)
    built = {d.name: d for d in manifest.chat.domains}
    start = 0  # resume after the longest prefix of the curriculum already built
    while (if_missing and start < len(recipe.domains) and recipe.domains[start] in built
           and built[recipe.domains[start]].order == start and built[recipe.domains[start]].stacks):
        start += 1
    if start == len(recipe.domains) and (manifest.chat.router is not None or recipe.router is None):
        summary.update(domains=[], router=None, seconds=time.perf_counter() - started)
        return summary

    chat = load_base(manifest_path)
    model, tokenizer = chat.model, chat.tokenizer
    resolver = ArtifactResolver(manifest_path, Settings(manifest=manifest_path, _env_file=None).resolved_artifact_root())
    for domain in recipe.domains[:start]:
        for artifact in built[domain].stacks:
            load_stack(model, resolver.artifact(artifact))
    data = {d: domain_data(tokenizer, d, recipe) for d in recipe.domains}
    kept_domains = [built[d] for d in recipe.domains[:start]]

    def record(j: int, domain: str, stacks: int, report: dict) -> None:
        artifacts = []
        for index in range(stacks):
            rel = f"{STACKS}/{domain}-{index + 1}.safetensors"
            modules = stack_modules(model, domain, index)
            sha = write_atomically(base_dir / rel, lambda tmp: save_stack(
                tmp, modules, domain, recipe.boosting.stack,
                {"round": index + 1, "order": j, "base": chat.name, "projection": report["projection"]}))
            artifacts.append(Artifact(path=rel, sha256=sha))
        kept_domains.append(Domain(name=domain, order=j, stacks=artifacts))
        current = load_manifest(manifest_path)
        section = current.chat.model_copy(update={"domains": list(kept_domains), "router": None})
        write_manifest(current.model_copy(update={"chat": section}), manifest_path)
        (runs_dir / f"{domain}.json").write_text(json.dumps(report, indent=1))

    summary.update(run_continual(model, tokenizer, recipe, data, start, record))
    summary["router"] = None
    if recipe.router is not None:
        items = [e for d in recipe.domains for e in examples(d, "train", recipe.router.examples_per_domain, seed=2)]
        config = model.config
        router, report = train_router(model, tokenizer, items, recipe.domains, recipe.router,
                                      middle_layer=config.num_hidden_layers // 2, hidden_size=config.hidden_size)
        sha = write_atomically(base_dir / STACKS / "router.safetensors",
                      lambda tmp: save_router(tmp, router, {"base": chat.name}))
        current = load_manifest(manifest_path)
        section = current.chat.model_copy(update={"router": Artifact(path=f"{STACKS}/router.safetensors", sha256=sha)})
        write_manifest(current.model_copy(update={"chat": section}), manifest_path)
        summary["router"] = {k: v for k, v in report.items() if k != "discovered"}
        (runs_dir / "router.json").write_text(json.dumps(report, indent=1))
    summary["seconds"] = time.perf_counter() - started
    (runs_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary
