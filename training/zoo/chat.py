"""`python -m training zoo chat`: a chat base's Brainstacks: its domains' stacks and the router.

The template's base is built first where the zoo knows how: SmolLM2 converted from its packaged
GGUF (training/zoo/chat_base.py), or zoo-lm pretrained on the world's prose
(training/zoo/language.py; template training/zoo/zoo-lm.yaml). Then the domains train one after another
on top of it (the continual loop of training/brainstacks/continual.py), then the meta-router
learns from discovered outcomes (training/brainstacks/router_training.py). Each stack and the
router are written atomically and entered, with their checksums, in the built manifest as soon as
they exist, so an interrupted build resumes after the last finished domain.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from server.artifacts import write_atomically
from server.chat.model import ChatModel
from server.chat.moe_lora import MoELoRAConfig
from server.chat.stack_files import save_stack
from server.manifest import Artifact, BuiltManifest, Domain
from training.artifacts import STACKS, machine, runs_folder
from training.brainstacks.boosting import BoostingConfig
from training.brainstacks.continual import ContinualRecipe, domain_data, load_base, run_continual
from training.brainstacks.nullspace import NullSpaceConfig
from training.brainstacks.router_training import RouterTraining
from training.brainstacks.stacks import load_stack, stack_modules
from training.router_fit import fit_and_record, world_data
from training.zoo.chat_base import PACKAGED_BASES, build_packaged_base
from training.zoo.language import MICRO_LM, ZOO_LM, LMRecipe, build_zoo_lm


@dataclass(frozen=True)
class ChatZooRecipe(ContinualRecipe):
    lm: LMRecipe = field(default_factory=LMRecipe)  # how zoo-lm is pretrained, where the template's base is it


MICRO_CHAT = ChatZooRecipe(
    lm=MICRO_LM,
    boosting=BoostingConfig(steps_per_round=4, later_round_steps=None, eval_every=2, batch_size=4, max_rounds=2,
                            min_gain=-1.0),
    nullspace=NullSpaceConfig(mode="off", samples=64),
    router=RouterTraining(examples_per_domain=4, labelled_per_domain=4, epochs=3, batch_size=8, general_examples=4,
                          validation_per_kind=1, general_validation=4),
    domains=("chat", "math"), train_examples=32, val_examples=8, test_examples=4, projection_examples=4,
    max_new_tokens=8,
)


def build_base(manifests: BuiltManifest, recipe: ChatZooRecipe, if_missing: bool, runs_dir: Path) -> dict | None:
    """Build the template's base where it is one the zoo knows (packaged SmolLM2, or zoo-lm) and not
    built yet; a user's own base folder is theirs."""
    manifest = manifests.read()
    entry = manifest.chat.base
    if entry.name in PACKAGED_BASES:
        return build_packaged_base(manifests, if_missing)
    if entry.name != ZOO_LM or entry.source.path is None:
        return None
    folder = manifests.file(entry.source.path)
    if if_missing and entry.source.files and not entry.placeholder and folder.is_dir():
        return None
    summary = build_zoo_lm(folder, recipe.lm, runs_dir)
    base = entry.model_copy(update={"source": manifests.recorded(entry.source), "placeholder": False})
    # a new base invalidates every stack and router trained on the old one
    chat = manifest.chat.model_copy(update={"base": base, "domains": [], "router": None})
    manifests.write(manifest.model_copy(update={"chat": chat}))
    return summary


def built_prefix(manifests: BuiltManifest, recipe: ChatZooRecipe) -> list[Domain]:
    """The longest prefix of the curriculum already built, in order: where a resumed build starts."""
    built = {d.name: d for d in manifests.read().chat.domains}
    prefix = []
    for order, name in enumerate(recipe.domains):
        domain = built.get(name)
        if domain is None or domain.order != order or not domain.stacks:
            break
        prefix.append(domain)
    return prefix


def build_chat_zoo(manifests: BuiltManifest, recipe: ChatZooRecipe = ChatZooRecipe(), if_missing: bool = False,
                   runs_dir: Path | None = None, device: str = "cpu") -> dict:
    runs_dir = runs_dir or runs_folder(manifests) / "zoo" / "chat"
    runs_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    summary: dict = {"recipe": asdict(recipe), "machine": machine(device)}
    summary["base"] = build_base(manifests, recipe, if_missing, runs_dir)

    kept = built_prefix(manifests, recipe) if if_missing else []
    start = len(kept)
    if start == len(recipe.domains) and (manifests.read().chat.router is not None or recipe.router is None):
        summary.update(domains=[], router=None, seconds=time.perf_counter() - started)
        return summary

    chat = load_base(manifests, device)
    resolver = manifests.resolver()
    for domain in kept:
        for artifact in domain.stacks:
            load_stack(chat.model, resolver.artifact(artifact))
    data = {d: domain_data(chat.tokenizer, d, recipe) for d in recipe.domains}

    def record(order: int, domain: str, stacks: int, report: dict) -> None:
        kept.append(save_domain(manifests, chat, recipe.boosting.stack, recipe.stacked, order, domain, stacks,
                                report["projection"]))
        current = manifests.read()
        manifests.write(current.model_copy(update={
            "chat": current.chat.model_copy(update={"domains": list(kept), "router": None})}))
        (runs_dir / f"{domain}.json").write_text(json.dumps(report, indent=1))

    summary.update(run_continual(chat.model, chat.tokenizer, recipe, data, start, record))
    summary["router"] = None if recipe.router is None else build_router(manifests, chat, recipe, runs_dir)
    summary["seconds"] = time.perf_counter() - started
    (runs_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def save_domain(manifests: BuiltManifest, chat: ChatModel, config: MoELoRAConfig, stacked: bool, order: int,
                domain: str, stacks: int, projection: str) -> Domain:
    """Write a finished domain's frozen stacks; its manifest entry."""
    artifacts = []
    for index in range(stacks):
        relative = f"{STACKS}/{domain}-{index + 1}.safetensors"
        modules = stack_modules(chat.model, domain, index)
        meta = {"round": index + 1, "order": order, "base": chat.name, "projection": projection, "stacked": stacked}
        sha = write_atomically(manifests.file(relative), lambda tmp: save_stack(tmp, modules, domain, config, meta))
        artifacts.append(Artifact(path=relative, sha256=sha))
    return Domain(name=domain, order=order, stacks=artifacts)


def build_router(manifests: BuiltManifest, chat: ChatModel, recipe: ChatZooRecipe, runs_dir: Path) -> dict:
    """Train the meta-router on every domain's stacks, write it, enter it in the built manifest."""
    return fit_and_record(manifests, chat, world_data(recipe.domains, recipe.router), recipe.router, runs_dir)
