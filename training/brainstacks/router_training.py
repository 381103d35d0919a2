"""Training the meta-router on discovered outcomes (Brainstacks §3.6).

Targets come from what the stacks actually do for each (prompt, answer): the answer's loss with the
base alone, with each domain alone, then greedy forward selection, adding the domain that lowers
the loss most while it lowers it by more than `margin`. The selected set (1 per selected domain)
is mixed with the prompt's own domain label, 0.8 / 0.2, and the router learns it with BCE.
More examples of each domain join with their label alone as the target (no discovery: on domains
trained on the base alone, discovery finds exactly the prompt's own domain for 93% of prompts), so
that the router sees every training phrasing with many contents for the price of a forward each.
General prompts (everyday questions, writing, advice: outside every domain) join with the target
"no domain", so that the router leaves to the instruction-tuned base what it already does.
Training scores only the subsets the greedy walks visit (`discovered_routes`: base, 5 singles, then
4, 3, ... extensions while the walk goes on, about a third of the 2^5 = 32 subsets); the evaluation's
oracle scores every subset (`loss_tables`) and walks the same rule over that table.
The gate threshold is chosen after training on validation prompts (phrasings training never saw):
the threshold under which the router applies exactly the prompt's own domain to a domain's prompt,
and no domain to a general one, most often (`choose_gate_threshold`). Then, on the same prompts,
the weighting by what it serves (`choose_weighting`): exact match of the greedy answers to domain
prompts, and general prompts answered as the base alone answers them.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from tqdm import tqdm

from server.chat.moe_lora import batch_route, routed
from server.chat.router import WEIGHTINGS, MetaRouter, RouterConfig
from training.brainstacks.data import Batch, batches, device_of, prompt_ids, reply_token_losses
from training.data.world import Example
from training.brainstacks.replies import generate_replies


@dataclass(frozen=True)
class RouterTraining:
    # Measured on SmolLM2 with domains trained on the base alone: 184 of 200 discovered routes were
    # the prompt's own domain and top-1 was 1.00 in every domain at 40, so fewer examples suffice
    examples_per_domain: int = 24
    # Labelled-only examples a domain: with 24 a domain (6 a task kind, fewer than the 7 training
    # phrasings a kind then had) the router sent one held-out chat phrasing ("What is {word} in block capitals?") to
    # no domain on 23 of 25 prompts, while its validation phrasing scored 1.00 (docs/brainstacks.md)
    labelled_per_domain: int = 72
    margin: float = 0.01
    discovered_weight: float = 0.8  # the label gets the rest
    epochs: int = 60
    lr: float = 2e-3
    batch_size: int = 32
    seed: int = 0
    # prompts outside every domain, target: no domain; 80 of each of the six everyday families (240 of
    # the first alone left a French greeting to the chat domain and a thermometer to the medical table)
    general_examples: int = 480
    # The paper keeps the chat domain on for every prompt (a floor). An instruction-tuned base already
    # chats, so no floor: a general prompt gets the base alone.
    floor_domain: str | None = None
    weighting: str = "probability"  # how an applied domain is weighted (server/chat/router.py)
    pooling: str = "mean"  # how the router pools the prompt's tokens (server/chat/router.py)
    weightings: tuple[str, ...] = WEIGHTINGS  # candidates, chosen on validation (else `weighting` stays)
    gate_thresholds: tuple[float, ...] = (0.12, 0.2, 0.3, 0.4, 0.5, 0.6)  # candidates, chosen on validation
    validation_per_kind: int = 3  # held-out validation prompts per task kind of every domain
    general_validation: int = 32


def greedy_selection(losses: dict[frozenset, float], domains: tuple[str, ...], margin: float) -> tuple[str, ...]:
    """Forward selection on one example's loss table (subset of domains -> answer loss)."""
    selected: frozenset = frozenset()
    current = losses[selected]
    while len(selected) < len(domains):
        loss, domain = min((losses[selected | {d}], d) for d in domains if d not in selected)
        if current - loss <= margin:
            break
        selected, current = selected | {domain}, loss
    return tuple(d for d in domains if d in selected)


@torch.no_grad()
def example_losses(model, batch: Batch) -> torch.Tensor:
    """Mean reply-token loss per example, [batch]."""
    batch = batch.to(device_of(model))
    losses, rows = reply_token_losses(model, batch)
    size = len(batch.input_ids)
    sums = torch.zeros(size, device=losses.device).index_add_(0, rows, losses)
    counts = torch.zeros(size, device=losses.device).index_add_(0, rows, torch.ones_like(losses)).clamp(min=1)
    return (sums / counts).cpu()


@torch.no_grad()
def loss_tables(model, tokenizer, items: list[Example], domains: tuple[str, ...],
                batch_size: int = 32) -> list[dict[frozenset, float]]:
    subsets = [frozenset(c) for r in range(len(domains) + 1) for c in itertools.combinations(domains, r)]
    tables: list[dict[frozenset, float]] = [{} for _ in items]
    offset = 0
    for batch in tqdm(batches(tokenizer, items, batch_size), desc="router targets", unit="batch"):
        for subset in subsets:
            with routed(model, {d: 1.0 for d in subset}):
                losses = example_losses(model, batch)
            for i, loss in enumerate(losses.tolist()):
                tables[offset + i][subset] = loss
        offset += len(batch.input_ids)
    return tables


@torch.no_grad()
def discovered_routes(model, tokenizer, items: list[Example], domains: tuple[str, ...], margin: float,
                      batch_size: int = 32, max_domains: int | None = None) -> list[tuple[str, ...]]:
    """`greedy_selection` for every example, scoring only the subsets its walk visits: each step
    scores, for the examples still walking, their selection plus each domain not in it, one forward
    per distinct subset over the rows that need it. `max_domains` ends a walk at that many domains."""
    limit = min(max_domains or len(domains), len(domains))
    chosen = []
    for batch in tqdm(batches(tokenizer, items, batch_size), desc="router targets", unit="batch"):
        rows = len(batch.input_ids)
        with routed(model, {}):
            current = example_losses(model, batch).tolist()
        selected = [frozenset() for _ in range(rows)]
        walking = set(range(rows))
        while walking:
            needed: dict[frozenset, list[int]] = {}
            for row in sorted(walking):
                for domain in domains:
                    if domain not in selected[row]:
                        needed.setdefault(selected[row] | {domain}, []).append(row)
            scored: dict[tuple[int, frozenset], float] = {}
            for subset, idx in needed.items():
                part = Batch(batch.input_ids[idx], batch.attention_mask[idx], batch.labels[idx])
                with routed(model, {d: 1.0 for d in subset}):
                    scored.update(((row, subset), loss) for row, loss in zip(idx, example_losses(model, part).tolist()))
            for row in list(walking):
                loss, domain = min((scored[row, selected[row] | {d}], d) for d in domains if d not in selected[row])
                if current[row] - loss <= margin:
                    walking.discard(row)
                    continue
                selected[row], current[row] = selected[row] | {domain}, loss
                if len(selected[row]) == limit:
                    walking.discard(row)
        chosen += [tuple(d for d in domains if d in s) for s in selected]
    return chosen


def targets(items: list[Example], chosen: list[tuple[str, ...]], domains: tuple[str, ...],
            cfg: RouterTraining) -> torch.Tensor:
    discovered = torch.tensor([[float(d in c) for d in domains] for c in chosen])
    label = torch.tensor([[float(item.domain == d) for d in domains] for item in items])
    return cfg.discovered_weight * discovered + (1 - cfg.discovered_weight) * label


@torch.no_grad()
def base_features(model, router: MetaRouter, tokenizer, prompts: list[list[dict]], batch_size: int = 32):
    """Mixed hidden states of the frozen base (stacks off) for chat prompts, with their masks."""
    feats = []
    for start in range(0, len(prompts), batch_size):
        ids = [prompt_ids(tokenizer, messages) for messages in prompts[start:start + batch_size]]
        length = max(len(i) for i in ids)
        input_ids = torch.full((len(ids), length), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        device = device_of(model)
        feats.append((router.base_features(model, input_ids.to(device), mask.to(device)).float(), mask.to(device)))
    return feats


@torch.no_grad()
def choose_gate_threshold(router: MetaRouter, model, tokenizer, validation: list[Example],
                          thresholds: tuple[float, ...], batch_size: int = 32) -> tuple[float, list[dict]]:
    """The candidate under which the router's route is exactly right on most validation prompts,
    domain prompts and general ones weighted equally: a domain's prompt gets its own domain alone, a
    general prompt no domain. Ties go to the lowest threshold. Cross-domain prompts are left out: no
    route gives them exact answers on this world (docs/brainstacks.md)."""
    domains = router.config.domains
    probabilities = torch.cat([torch.sigmoid(router(states, mask)).cpu() for states, mask in
                               base_features(model, router, tokenizer, [e.messages() for e in validation], batch_size)])
    expected = [(e.domain,) if e.domain in domains else () for e in validation]
    table = []
    for threshold in thresholds:
        applied = [tuple(d for d, p in zip(domains, row) if p > threshold) for row in probabilities.tolist()]
        right = [a == e for a, e in zip(applied, expected)]
        domain_rows = [r for r, e in zip(right, expected) if e]
        general_rows = [r for r, e in zip(right, expected) if not e]
        parts = [sum(rows) / len(rows) for rows in (domain_rows, general_rows) if rows]
        table.append({"threshold": threshold, "score": sum(parts) / len(parts),
                      "domain_prompts_own_domain_only": sum(domain_rows) / max(1, len(domain_rows)),
                      "general_prompts_no_domain": sum(general_rows) / max(1, len(general_rows)),
                      "domain_prompts": len(domain_rows), "general_prompts": len(general_rows)})
    best = max(table, key=lambda row: (row["score"], -row["threshold"]))
    return best["threshold"], table


@torch.no_grad()
def choose_weighting(router: MetaRouter, model, tokenizer, validation: list[Example], weightings: tuple[str, ...],
                     batch_size: int = 32) -> tuple[str, list[dict]]:
    """The candidate weighting whose served answers score best on validation prompts: the exact
    match of domain prompts' greedy answers and the share of general prompts answered as the base
    alone answers them, weighted equally. Each distinct (prompt, route) is generated once; ties go
    to the earlier candidate."""
    domains = router.config.domains
    probabilities = torch.cat([torch.sigmoid(router(states, mask)).cpu() for states, mask in
                               base_features(model, router, tokenizer, [e.messages() for e in validation], batch_size)])
    candidates = {w: [MetaRouter(replace(router.config, weighting=w)).route(p)[0] for p in probabilities]
                  for w in weightings}  # route() reads only the config
    budget = max(len(tokenizer(e.answer).input_ids) for e in validation) + 16
    jobs = {}  # (prompt, route) -> (example, route); a general prompt's base answer is the reference
    for i, e in enumerate(validation):
        for route in ([] if e.domain in domains else [{}]) + [routes[i] for routes in candidates.values()]:
            jobs.setdefault((e.prompt, tuple(sorted(route.items()))), (e, route))
    replies, todo = {}, list(jobs.items())
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        with routed(model, batch_route([r for _, (_, r) in chunk], domains, device_of(model))):
            answers = generate_replies(model, tokenizer, [e for _, (e, _) in chunk], budget, len(chunk))
        replies.update(zip([key for key, _ in chunk], answers))
    table = []
    for weighting, routes in candidates.items():
        served = [replies[e.prompt, tuple(sorted(r.items()))] for e, r in zip(validation, routes)]
        exact = [e.matches(s) for s, e in zip(served, validation) if e.domain in domains]
        as_base = [s == replies[e.prompt, ()] for s, e in zip(served, validation) if e.domain not in domains]
        parts = [sum(rows) / len(rows) for rows in (exact, as_base) if rows]
        table.append({"weighting": weighting, "score": sum(parts) / len(parts),
                      "domain_exact_match": sum(exact) / max(1, len(exact)), "domain_prompts": len(exact),
                      "general_as_base": sum(as_base) / max(1, len(as_base)), "general_prompts": len(as_base)})
    best = max(table, key=lambda row: (row["score"], -weightings.index(row["weighting"])))
    return best["weighting"], table


def fit_router(router: MetaRouter, feats: list[tuple[torch.Tensor, torch.Tensor]], target: torch.Tensor,
               cfg: RouterTraining, progress: bool = True) -> list[float]:
    """BCE on batches of the base's features (`base_features`, in `target`'s order) for `cfg.epochs`;
    the mean loss of every epoch. Leaves the router frozen, in eval mode."""
    optimizer = torch.optim.AdamW(router.parameters(), lr=cfg.lr, weight_decay=0.01)
    history = []
    for _ in tqdm(range(cfg.epochs), desc="meta-router", unit="epoch", disable=not progress):
        total, start = 0.0, 0
        for states, mask in feats:
            loss = F.binary_cross_entropy_with_logits(router(states, mask), target[start:start + len(states)])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(states)
            start += len(states)
        history.append(total / start)
    router.eval().requires_grad_(False)
    return history


def train_router(model, tokenizer, items: list[Example], domains: tuple[str, ...], cfg: RouterTraining,
                 middle_layer: int, hidden_size: int, general: list[Example] = (),
                 validation: list[Example] = (), labelled: list[Example] = (),
                 discover: tuple[str, ...] | None = None) -> tuple[MetaRouter, dict]:
    """`items`: the domains' examples, targets discovered from their answers' losses over the
    `discover` domains (default: all; an adapter learns from its label alone); `labelled`: more
    domain examples, target their own domain alone; `general`: prompts outside every domain, target
    zero for every domain; `validation`: held-out domain and general prompts the gate threshold is
    chosen on (without them the config's default stays)."""
    started = time.perf_counter()
    chosen = discovered_routes(model, tokenizer, items, discover or domains, cfg.margin, cfg.batch_size)
    own = torch.tensor([[float(e.domain == d) for d in domains] for e in labelled]).reshape(len(labelled), len(domains))
    target = torch.cat([targets(items, chosen, domains, cfg), own, torch.zeros(len(general), len(domains))])
    target = target.to(device_of(model))
    discovered = [{"domain": e.domain, "chosen": list(c)} for e, c in zip(items, chosen)]
    everything = list(items) + list(labelled) + list(general)
    order = torch.randperm(len(everything), generator=torch.Generator().manual_seed(cfg.seed))  # mixed batches
    items, target = [everything[i] for i in order], target[order]
    torch.manual_seed(cfg.seed)
    router = MetaRouter(RouterConfig(domains=domains, hidden_size=hidden_size, middle_layer=middle_layer,
                                     floor_domain=cfg.floor_domain, weighting=cfg.weighting,
                                     pooling=cfg.pooling)).to(device_of(model))
    feats = base_features(model, router, tokenizer, [e.messages() for e in items], cfg.batch_size)
    history = fit_router(router, feats, target, cfg)
    thresholds = None
    if validation:
        chosen_threshold, thresholds = choose_gate_threshold(router, model, tokenizer, list(validation),
                                                             cfg.gate_thresholds, cfg.batch_size)
        router.config = replace(router.config, gate_threshold=chosen_threshold)
        tqdm.write(f"gate threshold {chosen_threshold} chosen on {len(validation)} validation prompts: " + ", ".join(
            f"{row['threshold']} -> {row['score']:.2f}" for row in thresholds))
    weightings = None
    if validation and len(cfg.weightings) > 1:
        chosen_weighting, weightings = choose_weighting(router, model, tokenizer, list(validation), cfg.weightings,
                                                        cfg.batch_size)
        router.config = replace(router.config, weighting=chosen_weighting)
        tqdm.write(f"weighting {chosen_weighting!r} chosen on the same prompts: " + ", ".join(
            f"{row['weighting']} -> {row['score']:.2f} (domains {row['domain_exact_match']:.2f}, "
            f"general as base {row['general_as_base']:.2f})" for row in weightings))
    router.cpu()
    report = {"seconds": time.perf_counter() - started, "bce": history, "general_prompts": len(general),
              "labelled_prompts": len(labelled),
              "gate_threshold": router.config.gate_threshold, "weighting": router.config.weighting,
              "gate_threshold_validation": thresholds, "weighting_validation": weightings, "discovered": discovered}
    return router, report
