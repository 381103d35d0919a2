"""`python -m training router fit`: the meta-router learned again over every domain and adapter the
built manifest serves, so that "auto" routes to what users added.

Its prompts: the world's for the built-in domains (as the zoo's build), each user domain's own
training conversations (kept beside its stacks by `stacks add`), each PEFT adapter's prompts where
given (`--adapter-data NAME=FILE`, the same JSONL), and the world's general prompts labelled "no
domain". Targets are discovered from the stacks' losses for the domains (an adapter learns from its
label alone), the gate threshold and weighting are chosen on validation prompts (the world's
held-out phrasings, a held-out part of each user file, the world's general validation prompts), and
the router is written atomically into the built manifest, where a running server hot-loads it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from server.artifacts import write_atomically
from server.chat.router import save_router
from server.manifest import Artifact, BuiltManifest
from training.artifacts import STACKS, checked_file, runs_folder
from training.brainstacks.router_training import RouterTraining, train_router
from training.data.chat_jsonl import DomainExample, read_conversations
from training.data.world import DOMAINS, examples, held_out


@dataclass
class RoutingData:
    domains: tuple[str, ...]  # what the router routes: the stacks' domains, then the adapters
    discover: tuple[str, ...]  # whose targets are discovered from the stacks' losses
    items: list = field(default_factory=list)
    labelled: list = field(default_factory=list)
    general: list = field(default_factory=list)
    validation: list = field(default_factory=list)


def world_data(domains: tuple[str, ...], cfg: RouterTraining) -> RoutingData:
    """The zoo's routing prompts for the world's domains."""
    return RoutingData(
        domains=domains, discover=domains,
        items=[e for d in domains for e in examples(d, "train", cfg.examples_per_domain, seed=2)],
        labelled=[e for d in domains for e in examples(d, "train", cfg.labelled_per_domain, seed=3)],
        general=examples("general", "train", cfg.general_examples, seed=2),
        validation=([e for d in domains for e in held_out(d, "val", cfg.validation_per_kind)]
                    + examples("general", "val", cfg.general_validation)))  # the families taking turns


def add_own(data: RoutingData, name: str, path: Path, cfg: RouterTraining, discovered: bool) -> None:
    """A user's conversations for `name`: a seeded part for validation (as many as the world's
    validation prompts of a domain, at least 4), then discovered and labelled examples."""
    conversations, _ = read_conversations(path)
    own = [DomainExample(name, c) for c in conversations]
    random.Random(f"router/{name}").shuffle(own)
    held = max(4, min(len(own) // 5, 3 * cfg.validation_per_kind * 4))
    data.validation += own[:held]
    rest = own[held:]
    if discovered:
        data.items += rest[:cfg.examples_per_domain]
        rest = rest[cfg.examples_per_domain:]
    data.labelled += rest[:cfg.labelled_per_domain]


def routing_data(manifests: BuiltManifest, adapter_data: dict[str, Path], cfg: RouterTraining) -> RoutingData:
    section = manifests.read().chat
    world = tuple(d.name for d in section.domains if d.data is None)
    if unknown := [name for name in world if name not in DOMAINS]:
        raise SystemExit(f"domains {unknown} have no prompts to learn from (neither the world's nor a user's data)")
    adapters = tuple(a.name for a in section.adapters if a.name in adapter_data)
    if missing := sorted(set(adapter_data) - {a.name for a in section.adapters}):
        raise SystemExit(f"--adapter-data names adapters the manifest does not serve: {missing}")
    data = world_data(world, cfg)
    for domain in section.domains:
        if domain.data is not None:
            path = checked_file(manifests, domain.data, f"{domain.name!r}'s training data")
            add_own(data, domain.name, path, cfg, discovered=True)
    for name in adapters:
        add_own(data, name, adapter_data[name], cfg, discovered=False)
    data.domains = tuple(d.name for d in section.domains) + adapters
    data.discover = tuple(d.name for d in section.domains)
    return data


def fit_and_record(manifests: BuiltManifest, chat, data: RoutingData, cfg: RouterTraining, runs_dir: Path) -> dict:
    """Train the router on `data`, write it, enter it in the built manifest; its report."""
    config = chat.model.config
    router, report = train_router(chat.model, chat.tokenizer, data.items, data.domains, cfg,
                                  middle_layer=config.num_hidden_layers // 2, hidden_size=config.hidden_size,
                                  general=data.general, validation=data.validation, labelled=data.labelled,
                                  discover=data.discover)
    relative = f"{STACKS}/router.safetensors"
    sha = write_atomically(manifests.file(relative), lambda tmp: save_router(tmp, router, {"base": chat.name}))
    with manifests.updating() as current:
        manifests.write(current.model_copy(update={
            "chat": current.chat.model_copy(update={"router": Artifact(path=relative, sha256=sha)})}))
    runs_dir.mkdir(parents=True, exist_ok=True)
    (runs_dir / "router.json").write_text(json.dumps(report, indent=1))
    return {k: v for k, v in report.items() if k != "discovered"}


def refit_router(manifests: BuiltManifest, adapter_data: dict[str, Path], cfg: RouterTraining = RouterTraining(),
                 device: str = "cpu", runs_dir: Path | None = None) -> dict:
    from training.brainstacks.continual import load_for_training

    data = routing_data(manifests, adapter_data, cfg)
    section = manifests.read().chat.model_copy(update={"router": None})
    chat = load_for_training(section, manifests, device)
    print(f"router over {', '.join(data.domains)}: {len(data.items)} discovered, {len(data.labelled)} labelled, "
          f"{len(data.general)} general, {len(data.validation)} validation prompts", flush=True)
    with chat.mounted({}):  # the loaded stacks on the base: discovery and the weighting's replies route them
        return fit_and_record(manifests, chat, data, cfg, runs_dir or runs_folder(manifests) / "router")
