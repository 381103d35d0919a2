"""The continual outer loop (Brainstacks §3.4, Algorithm 2).

Domains train one after another in curriculum order. By default (`variant` "base-alone") each
domain's residual boosting runs on the base alone (no earlier stack on, no projection): the stacks
only meet when the router combines them, at its probabilities. The paper's variant trains each
domain on top of every earlier domain's frozen stacks (`stacked=True`), its new stacks confined to
a null space of the earlier domains (`nullspace.py`: output side, input side, or off); measured on
SmolLM2 (docs/brainstacks.md), it bought nothing that training on the base alone did not, and cost
time. After each domain a forgetting-matrix row records every domain so far at two
settings: *isolation* (domain i with the stacks that were on when it finished, and every later
stack off) and *ungated* (every stack on).
`training zoo chat` (training/zoo/chat.py) runs it; `eval brainstacks` then measures the zoo it
built, and zoos built with the other variants, on the same held-out prompts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from server.chat.model import ChatModel, load_chat
from server.chat.moe_lora import routed, wrap_projections
from server.chat.nf4 import disable_cpu_weight_packing
from server.manifest import BuiltManifest, ChatSection
from training.brainstacks.boosting import BoostingConfig, boost_domain, round_summary, validation_loss
from training.brainstacks.data import batches
from training.brainstacks.nullspace import NullSpaceConfig, claimed_bases
from training.brainstacks.router_training import RouterTraining
from training.data.world import DOMAINS, examples
from training.brainstacks.replies import exact_match


@dataclass(frozen=True)
class ContinualRecipe:
    """What the continual loop trains and how (the chat zoo's recipe adds how its base is built)."""

    # math's worked columns were still improving at 100 steps (validation 0.052, 0.048 at steps 80
    # and 100 on SmolLM2) where every other domain had flattened; at 200 steps its validation was
    # flat from step 120 (0.022 there and at 180): math got 140 first-round steps for seven trained
    # kinds, and gets 160 for nine
    boosting: BoostingConfig = field(default_factory=lambda: BoostingConfig(domain_steps=(("math", 160),)))
    nullspace: NullSpaceConfig = field(default_factory=lambda: NullSpaceConfig(mode="off"))
    router: RouterTraining | None = field(default_factory=RouterTraining)
    domains: tuple[str, ...] = DOMAINS  # the curriculum order (docs/brainstacks.md says why)
    stacked: bool = False  # True: each domain trains on top of every earlier domain's frozen stacks
    train_examples: int = 1200
    val_examples: int = 32
    test_examples: int = 16  # the build's own check after each domain; `eval brainstacks` measures properly
    projection_examples: int = 24  # per earlier domain, for the null space
    max_new_tokens: int = 176  # three operations worked in columns run to 160 tokens



VARIANTS = ("base-alone", "output", "input", "off")


def with_variant(recipe: ContinualRecipe, variant: str) -> ContinualRecipe:
    """"base-alone": each domain on the base alone, served at the router's probabilities (the
    default); "output" / "input" / "off": stacked on the earlier domains with that null-space
    projection, served at weight 1 per applied domain (the weight their stacks trained on top of)."""
    if variant not in VARIANTS:
        raise ValueError(f"chat zoo variant {variant!r} is not one of {VARIANTS}")
    alone = variant == "base-alone"
    router = recipe.router and replace(recipe.router, weighting="probability" if alone else "gate")
    return replace(recipe, stacked=not alone, nullspace=replace(recipe.nullspace, mode="off" if alone else variant),
                   router=router)


def load_base(manifests: BuiltManifest, device: str = "cpu") -> ChatModel:
    """The built manifest's chat base alone (no stacks, no router), prepared for stack training."""
    section = manifests.read().chat.model_copy(update={"domains": [], "router": None})
    return load_for_training(section, manifests, device)


def load_for_training(section: ChatSection, manifests: BuiltManifest, device: str) -> ChatModel:
    """A chat section as stacks are trained and scored: projections wrapped, bitsandbytes' CPU
    repacking trap disabled; on the CPU in the precision the manifest gives for it, on a GPU in
    float32, base and stacks (stacks train in float32 on either)."""
    if device != "cpu":
        section = section.model_copy(update={"base": section.base.model_copy(update={"quantization": "none"})})
    chat = load_chat(section, manifests.resolver(), device)
    if device != "cpu":
        chat.model.float()
        for domain in chat.stacks.values():  # loaded in the base's dtype
            for stacks in domain.per_layer.values():
                for stack in stacks:
                    stack.float()
    prepare_for_training(chat)
    return chat


def prepare_for_training(chat: ChatModel) -> None:
    disable_cpu_weight_packing(chat.model)
    wrap_projections(chat.model)


def isolation_route(domains: tuple[str, ...], index: int, stacked: bool = True) -> dict[str, float]:
    """Domain `index` with the stacks that were on when it finished training (earlier domains' too
    when it trained stacked on them); later ones off."""
    return {d: 1.0 for d in domains[: index + 1]} if stacked else {domains[index]: 1.0}


@dataclass
class DomainData:
    train: list
    val: list  # batches
    test: list
    projection: list  # batches of this domain's examples, for later domains' null spaces


def domain_data(tokenizer, domain: str, recipe: ContinualRecipe) -> DomainData:
    return DomainData(
        train=examples(domain, "train", recipe.train_examples),
        val=batches(tokenizer, examples(domain, "val", recipe.val_examples), 32),
        test=examples(domain, "test", recipe.test_examples),
        projection=batches(tokenizer, examples(domain, "train", recipe.projection_examples, seed=1), 16),
    )


def run_continual(model, tokenizer, recipe: ContinualRecipe, data: dict[str, DomainData], start: int = 0,
                  on_domain=None) -> dict:
    """Train domains[start:] in order on top of whatever earlier stacks `model` carries.
    Returns per-domain reports and the forgetting matrices (rows: after domain j; columns: domain i)."""
    domains = recipe.domains
    reports, isolation, ungated, post_freeze = [], [], [], {}
    for j in range(start, len(domains)):
        domain = domains[j]
        started = time.perf_counter()
        earlier = list(domains[:j]) if recipe.stacked else []
        prompts = [b for d in earlier for b in data[d].projection]
        route = isolation_route(domains, j, recipe.stacked)
        with routed(model, route):  # earlier domains on (when stacked); this one's stacks as they come
            start_loss = validation_loss(model, data[domain].val)
            bases = claimed_bases(model, prompts, earlier, recipe.nullspace, recipe.boosting.stack)
            results, kept = boost_domain(model, tokenizer, domain, data[domain].train, data[domain].val,
                                         recipe.boosting, bases, recipe.nullspace.mode)
        with routed(model, route):
            post_freeze[domain] = validation_loss(model, data[domain].val)
            accuracy, records = exact_match(model, tokenizer, data[domain].test, max_new_tokens=recipe.max_new_tokens)
        row_iso, row_all = {}, {}
        for i, other in enumerate(domains[: j + 1]):
            with routed(model, isolation_route(domains, i, recipe.stacked)):
                row_iso[other] = validation_loss(model, data[other].val)
            with routed(model, None):
                row_all[other] = validation_loss(model, data[other].val)
        isolation.append(row_iso)
        ungated.append(row_all)
        report = {
            "domain": domain, "order": j, "seconds": time.perf_counter() - started,
            "val_loss_before": start_loss, "rounds": round_summary(results), "stacks_kept": len(kept),
            "post_freeze_val_loss": post_freeze[domain], "exact_match_after": accuracy, "samples": records[:5],
            "projection": recipe.nullspace.mode if recipe.nullspace.enabled and earlier else "none",
            "stacked": recipe.stacked,
            "forgetting_isolation": row_iso, "forgetting_ungated": row_all,  # this row, kept when a build resumes
        }
        reports.append(report)
        print(f"{domain}: val loss {start_loss:.3f} -> {post_freeze[domain]:.3f}, exact match {accuracy:.2f} "
              f"(n={len(records)}) with {len(kept)} stack(s), {report['seconds']:.0f} s", flush=True)
        if on_domain is not None:
            on_domain(j, domain, len(kept), report)
    return {"domains": reports, "post_freeze": post_freeze,
            "forgetting_isolation": isolation, "forgetting_ungated": ungated}
