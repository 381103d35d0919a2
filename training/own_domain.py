"""`python -m training stacks add | list | remove`: a user's own domain, from their conversations in
OpenAI's chat fine-tuning JSONL (training/data/chat_jsonl.py), as Brainstacks on the manifest's chat
base, entered in the built manifest where a running server hot-loads it.

A domain trains as the zoo's do (residual boosting of MoE-LoRA stacks, training/brainstacks/
boosting.py) on the base alone, the zoo's default: the server applies it at the weight a request
names, and under "auto" at the meta-router's probability once `router fit` has learned it (until
then the trace says the router does not know it). `continual` "output" or "input" still trains on
the base alone but confines the new stacks to the null space of the domains already served
(training/brainstacks/nullspace.py: the directions their stacks write in, or the inputs they read,
on their own prompts: the world's for the built-in domains, the kept conversations for a user's),
so that where the router mixes them the new domain leaves theirs alone. The file is checked completely before the base
loads; a file with any problem writes nothing. The de-duplicated training conversations are kept
beside the stacks (`chat/data/NAME.jsonl`, checksummed) for the router's refit.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from server.artifacts import write_atomically
from server.manifest import BuiltManifest, DataFile, Domain
from server.chat.moe_lora import MoELoRAConfig, routed
from training.artifacts import STACKS, checked_file, machine, runs_folder
from training.brainstacks.boosting import BoostingConfig, boost_domain, round_summary
from training.brainstacks.continual import load_base
from training.brainstacks.data import batches
from training.brainstacks.nullspace import NullSpaceConfig, claimed_bases
from training.brainstacks.stacks import load_stack
from training.data.chat_jsonl import (Conversation, DataError, check_lengths, held_out, read_conversations,
                                      split_validation)
from training.data.world import DOMAINS, examples
from training.zoo.chat import save_domain


@dataclass(frozen=True)
class OwnDomainRecipe:
    # the zoo's per-domain budget: on SmolLM2 (2 cores) a domain of short answers trains in 4-6 minutes
    boosting: BoostingConfig = field(default_factory=BoostingConfig)
    validation_share: float = 0.1  # held out of the training file when no validation file is given
    max_validation: int = 64  # conversations scored at each evaluation of a round
    continual: str = "base-alone"  # or "output" / "input": the null space of the domains already served
    nullspace: NullSpaceConfig = field(default_factory=NullSpaceConfig)  # its mode is `continual`'s
    projection_examples: int = 24  # prompts per served domain that its null space is drawn from

    def __post_init__(self) -> None:
        if self.continual not in CONTINUAL:
            raise ValueError(f"continual {self.continual!r} is not one of {CONTINUAL}")


CONTINUAL = ("base-alone", "output", "input")


def check_name(manifests: BuiltManifest, domain: str) -> None:
    chat = manifests.read().chat
    if chat is None:
        raise SystemExit(f"{manifests.path}: no chat section to add a domain to")
    if any(d.name == domain for d in chat.domains):
        raise SystemExit(f"domain {domain!r} already exists: `stacks remove --domain {domain}` first")
    if any(a.name == domain for a in chat.adapters):
        raise SystemExit(f"{domain!r} is the name of an adapter: a domain needs a name of its own")
    try:
        Domain(name=domain, order=0)  # the manifest's rule for names, before any work
    except ValueError:
        raise SystemExit(f"{domain!r} is not a domain name: letters, digits, '.', '_' and '-', "
                         f"starting with a letter or digit, at most 64") from None


def read_domain_data(train_path: Path, val_path: Path | None, recipe: OwnDomainRecipe) -> dict:
    """The training and validation conversations, or DataError with every problem's line."""
    train, dropped = read_conversations(train_path)
    notes = [f"{train_path}: line {line}: {why}" for line, why in dropped]
    if val_path is None:
        train, val = split_validation(train, recipe.validation_share)
    else:
        val, dropped = read_conversations(val_path)
        val, overlap = held_out(val, train)
        notes += [f"{val_path}: line {line}: {why}" for line, why in dropped + overlap]
        if not val:
            raise DataError(val_path, [(0, "no validation conversation is left once the training file's are dropped")])
    return {"train": train, "val": val[:recipe.max_validation], "notes": notes}


def add_domain(manifests: BuiltManifest, domain: str, train_path: Path, val_path: Path | None = None,
               steps: int | None = None, recipe: OwnDomainRecipe = OwnDomainRecipe(), device: str = "cpu",
               runs_dir: Path | None = None) -> dict:
    started = time.perf_counter()
    check_name(manifests, domain)
    data = read_domain_data(train_path, val_path, recipe)
    for note in data["notes"]:
        print(note)
    cfg = recipe.boosting if steps is None else replace(recipe.boosting, steps_per_round=steps,
                                                        later_round_steps=max(1, steps // 3), domain_steps=())
    chat = load_base(manifests, device)
    context = getattr(chat.model.config, "max_position_embeddings", None) or chat.tokenizer.model_max_length
    check_lengths(chat.tokenizer, data["train"], context, train_path)
    check_lengths(chat.tokenizer, data["val"], context, val_path or train_path)
    print(f"{domain}: {len(data['train'])} training and {len(data['val'])} validation conversations "
          f"on {chat.name}", flush=True)
    val = batches(chat.tokenizer, data["val"], 32)
    bases, claimed = claim_null_space(manifests, chat, recipe, cfg.stack)
    side = "input" if recipe.continual == "input" else "output"
    with routed(chat.model, {domain: 1.0}):  # the served domains' stacks, mounted for the null space, off
        results, kept = boost_domain(chat.model, chat.tokenizer, domain, data["train"], val, cfg, bases, side)
    entry = record_domain(manifests, chat, cfg, domain, len(kept), data["train"],
                          recipe.continual if bases else "none")
    report = {"domain": domain, "base": chat.name, "train": len(data["train"]), "val": len(data["val"]),
              "continual": recipe.continual, "null space of": claimed,
              "notes": data["notes"], "rounds": round_summary(results), "stacks": len(kept),
              "boosting": asdict(cfg), "machine": machine(device), "seconds": time.perf_counter() - started,
              "manifest": entry.model_dump(mode="json")}
    runs_dir = runs_dir or runs_folder(manifests) / "stacks" / domain
    write_report(runs_dir, report)
    return report


def claim_null_space(manifests: BuiltManifest, chat, recipe: OwnDomainRecipe,
                     stack: MoELoRAConfig) -> tuple[dict, list[str]]:
    """For "output" / "input": the served domains' stacks mounted (frozen) on the model and, per
    projection, the basis the new domain must stay out of; the domains it was drawn from."""
    if recipe.continual == "base-alone":
        return {}, []
    resolver, prompts, claimed = manifests.resolver(), [], []
    for served in sorted(manifests.read().chat.domains, key=lambda d: d.order):
        if not served.stacks:
            continue
        if served.data is not None:
            conversations = read_conversations(checked_file(manifests, served.data, f"{served.name}'s data"))[0]
        elif served.name in DOMAINS:
            conversations = examples(served.name, "train", recipe.projection_examples, seed=1)
        else:
            raise SystemExit(f"domain {served.name!r} has no prompts to draw its null space from")
        for artifact in served.stacks:
            load_stack(chat.model, resolver.artifact(artifact))
        prompts += batches(chat.tokenizer, conversations[:recipe.projection_examples], 16)
        claimed.append(served.name)
    config = replace(recipe.nullspace, mode=recipe.continual)
    return claimed_bases(chat.model, prompts, claimed, config, stack), claimed


def record_domain(manifests: BuiltManifest, chat, cfg: BoostingConfig, domain: str, stacks: int,
                  train: list[Conversation], projection: str = "none") -> Domain:
    """The stacks and the training conversations written atomically, then the domain entered in the
    built manifest (under its lock: a server recording an adapter meanwhile keeps its entry)."""
    relative = f"{STACKS}/data/{domain}.jsonl"
    lines = "".join(json.dumps({"messages": [{"role": r, "content": c, **({} if t or r != "assistant" else {"weight": 0})}
                                             for r, c, t in conv.messages]}) + "\n" for conv in train)
    data_sha = write_atomically(manifests.file(relative), lambda tmp: Path(tmp).write_text(lines, encoding="utf-8"))
    with manifests.updating() as manifest:
        order = max((d.order for d in manifest.chat.domains), default=-1) + 1
        entry = save_domain(manifests, chat, cfg.stack, False, order, domain, stacks, projection)
        entry = entry.model_copy(update={"data": DataFile(path=relative, sha256=data_sha)})
        chat_section = manifest.chat.model_copy(update={"domains": [*manifest.chat.domains, entry]})
        manifests.write(manifest.model_copy(update={"chat": chat_section}))
    return entry


def write_report(runs_dir: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs_dir.mkdir(parents=True, exist_ok=True)
    (runs_dir / "report.json").write_text(json.dumps(report, indent=1))
    fig, ax = plt.subplots(figsize=(5, 3))
    offset = 0
    for r in report["rounds"]:
        ax.plot([offset + s for s, _ in r["curve"]], [v for _, v in r["curve"]], "o-",
                label=f"round {r['round']}{'' if r['kept'] else ' (dropped)'}")
        offset += r["steps"]
    ax.set(xlabel="step", ylabel="validation loss (reply tokens)", yscale="log",
           title=f"{report['domain']} on {report['base']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(runs_dir / "loss.png", dpi=110)
    plt.close(fig)


def list_domains(manifests: BuiltManifest) -> list[dict]:
    chat = manifests.read().chat
    routed = set()
    if chat.router is not None:
        from server.chat.router import load_router

        routed = set(load_router(manifests.resolver().artifact(chat.router))[0].config.domains)
    return [{"domain": d.name, "order": d.order, "stacks": len(d.stacks), "own data": d.data is not None,
             "router knows it": d.name in routed} for d in sorted(chat.domains, key=lambda d: d.order)]


def remove_domain(manifests: BuiltManifest, domain: str) -> list[str]:
    """The domain out of the built manifest (a running server drops it at its reload), then its files.
    A router that routes it goes too ("auto" answers with the base until `router fit`). What was done."""
    done = []
    with manifests.updating() as manifest:
        chat = manifest.chat
        entry = next((d for d in chat.domains if d.name == domain), None) if chat else None
        if entry is None:
            raise SystemExit(f"no domain {domain!r} in {manifests.path}")
        update = {"domains": [d for d in chat.domains if d.name != domain]}
        if chat.router is not None and domain in {d["domain"] for d in list_domains(manifests) if d["router knows it"]}:
            update["router"] = None
            done.append(f"the meta-router routed {domain!r}: removed with it; `python -m training router fit` "
                        f"learns the domains left")
        manifests.write(manifest.model_copy(update={"chat": chat.model_copy(update=update)}))
    for artifact in [*entry.stacks, *([entry.data] if entry.data else [])]:
        manifests.file(artifact.path).unlink(missing_ok=True)
    return [f"removed {domain!r} ({len(entry.stacks)} stack(s))", *done]
