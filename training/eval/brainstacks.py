"""`python -m training eval brainstacks`: what a chat zoo's stacks and router add to its base.

Every number is measured on held-out phrasings (templates no training step saw) and, in every
domain, on one form held out as a whole (a kind of question no training or validation prompt has:
world.held_out_forms), on distinct prompts stratified by task kind, with 95% intervals and the
distinct-prompt count; base and routed exact match are also reported on the two apart, beside the
share of routed replies that work more steps than the question asks (`extra_step`) and, for math,
exact match on the single-operation kinds:

(a) Exact match per domain and on the cross-domain set for five settings: the base alone, ungated
    (every stack at 1), routed (the meta-router's route as served: its domains at their
    probabilities, or at weight 1, as the zoo's router is configured), routed at the other
    weighting, and the oracle route (per prompt, the domains
    that outcome discovery picks on its own answer: greedy forward selection on answer loss, the
    rule the router's targets come from). With five domains the oracle costs up to 16 forwards a
    batch, so it runs on the first `oracle_per_kind` prompts of each kind; the routed setting is
    reported on those prompts too. Ungated and routed-at-probability run on the first
    `comparison_per_kind` prompts of each kind (their n is in the report). The gate threshold is
    the router's own, chosen on validation prompts when it was trained.
    Beside exact match (the reply's "Answer:" line), "answer in reply" counts the expected answer
    anywhere in the reply: the base, which never uses that line, is judged on its content too.
(b) General prompts (outside every domain, six families of everyday talk, held-out phrasings): how
    often the routed greedy answer equals the base's, how often the router picks no domain at all,
    and what a prompt sent to a domain costs (its reply against the base's).
(c) Forgetting under the route served: each domain's exact match when it was frozen (the stacks
    that were on when it finished), against its exact match after each later domain under the
    router's route restricted to the domains that existed then; paired per prompt (McNemar), and
    pooled over the earlier domains after the last one. Rows before the last use the final router
    restricted to the library of that time, not a router retrained then.
(d) The router: top-1 on single-domain prompts, and on cross-domain prompts the combinations it
    applies beside those outcome discovery finds best; no floor counts toward them. And the router
    alone on wording unlike every phrasing of the world (world.PROBE_PHRASINGS, never trained on or
    chosen with): how often a domain prompt gets its own domain alone, a general prompt none.

Prompts routed differently run in one batch (per-sequence weights, moe_lora.batch_route). A
prompt's reply under a route is generated once and reused by every setting and forgetting row that
asks for the same route (the oracle's and the router's routes mostly agree; a domain's own route is
unchanged by a library restricted to the domains that existed then).
`--compare` evaluates other zoos (built with another null-space mode, or on the base alone) on the
same prompts and prints them side by side. Writes JSON and a PNG of the routed exact match.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from server.chat.model import ChatModel
from server.chat.moe_lora import batch_route, routed
from server.chat.stack_files import read_stack_metadata
from server.chat.router import MetaRouter
from server.manifest import BuiltManifest
from training.artifacts import machine
from training.brainstacks.continual import isolation_route, load_for_training
from training.brainstacks.data import collate
from training.brainstacks.router_training import discovered_routes, example_losses
from training.data.world import Example, final_answer, held_out, held_out_forms, probe_prompts
from training.brainstacks.replies import generate_replies
from training.eval.brainstacks_report import SETTINGS, comparison_table, format_report, save_chart
from training.eval.statistics import mcnemar_p, paired_difference_interval, wilson_interval

SINGLE_OPERATIONS = ("add", "subtract", "multiply")  # the math kinds that ask one operation


@dataclass(frozen=True)
class BrainstacksEval:
    per_kind: int = 25  # held-out prompts per task kind (fewer where a kind has fewer distinct ones)
    general_prompts: int = 64
    margin: float = 0.01  # outcome discovery's rule, as the router was trained
    batch_size: int = 32
    max_new_tokens: int = 176  # a cap: each set generates its longest expected reply plus 16 tokens (math: 160 + 16)
    general_tokens: int = 48  # greedy tokens compared on general prompts
    probe_per_phrasing: int = 10  # router-only check on PROBE_PHRASINGS
    oracle_per_kind: int = 5
    # ungated and probability weighting answer a side question (what routing adds, how to weight);
    # on the first prompts of each kind they cost 40% of the generation the full sets would
    comparison_per_kind: int = 10
    oracle_max_domains: int | None = None  # None: the walk goes on while it gains (the paper's rule)


def proportion(correct: list[bool]) -> dict:
    n, k = len(correct), sum(correct)
    low, high = wilson_interval(k, n)
    return {"exact_match": k / n if n else 0.0, "interval": [low, high], "correct": k, "n": n}


def answer_in(reply: str, final: str) -> bool:
    """Lenient: the expected answer appears in the reply as a whole word, in whatever format. The base
    model never ends on the world's "Answer:" line, so exact match alone would credit it nothing."""
    return re.search(rf"(?<!\w){re.escape(final.lower())}(?!\w)", reply.lower()) is not None


def steps_of(reply: str) -> int:
    """The worked steps of a reply: its sentences before its last "Answer:" line (the world's answers
    are steps that each end in a full stop, then "Answer: ...")."""
    work = reply.rsplit("Answer:", 1)[0] if "Answer:" in reply else reply
    return len([s for s in re.split(r"(?<=\.)\s+", work.strip()) if s.strip()])


def extra_step(reply: str, example: Example) -> bool:
    """The reply works more steps than the question asks for (the reference's steps)."""
    return steps_of(reply) > steps_of(example.answer)


def by_form(items: list[Example], correct: list[bool], domain: str) -> dict:
    """Exact match on the forms held out of training as a whole, and on the held-out phrasings of
    the forms training had."""
    unseen = held_out_forms(domain)
    return {"held_out_forms": proportion([c for e, c in zip(items, correct) if e.kind in unseen]),
            "held_out_phrasings": proportion([c for e, c in zip(items, correct) if e.kind not in unseen]),
            "forms_held_out": sorted(unseen)}


def reply_budget(tokenizer, items: list[Example], cap: int) -> int:
    return min(cap, max(len(tokenizer(e.answer).input_ids) for e in items) + 16)


def route_key(route: dict | None) -> tuple | None:
    return None if route is None else tuple(sorted((d, round(w, 6)) for d, w in route.items() if w != 0))


@torch.no_grad()
def run_routes(chat: ChatModel, items: list[Example], routes: list[dict | None], cfg: BrainstacksEval,
               cache: dict, max_new_tokens: int | None = None) -> tuple[list[float], list[str]]:
    """Answer loss and greedy reply per example, each under its own route, batched across routes;
    only the (prompt, route, budget) triples not in `cache` run, and land there."""
    tokens = max_new_tokens or reply_budget(chat.tokenizer, items, cfg.max_new_tokens)
    keys = [(e.prompt, e.answer, route_key(r), tokens) for e, r in zip(items, routes)]
    todo = list({k: (e, r) for k, e, r in zip(keys, items, routes) if k not in cache}.items())
    todo.sort(key=lambda job: len(job[1][0].answer))  # similar lengths together: a batch ends when all rows do
    for start in range(0, len(todo), cfg.batch_size):
        chunk = todo[start:start + cfg.batch_size]
        chunk_items, chunk_routes = [e for _, (e, _) in chunk], [r for _, (_, r) in chunk]
        with routed(chat.model, batch_route(chunk_routes, chat.domains, chat.device)):
            losses = example_losses(chat.model, collate(chat.tokenizer, chunk_items)).tolist()
            replies = generate_replies(chat.model, chat.tokenizer, chunk_items, max_new_tokens=tokens,
                                       batch_size=len(chunk_items))
        cache.update((key, (loss, reply)) for (key, _), loss, reply in zip(chunk, losses, replies))
    return [cache[k][0] for k in keys], [cache[k][1] for k in keys]


def stacked_zoo(manifests: BuiltManifest) -> bool:
    """Whether the zoo's domains trained on top of the earlier ones (the stacks say so)."""
    section = manifests.read().chat
    meta = read_stack_metadata(manifests.resolver().artifact(section.domains[0].stacks[0]))
    return meta.get("stacked", True)


def load_zoo(manifests: BuiltManifest, device: str) -> ChatModel:
    section = manifests.read().chat
    if section.router is None or not section.domains:
        raise SystemExit(f"{manifests.path}: the chat zoo has no stacks or no router to evaluate")
    return load_for_training(section, manifests, device)  # as the stacks were trained and scored


def evaluate_zoo(manifests: BuiltManifest, cfg: BrainstacksEval, device: str = "cpu") -> dict:
    started = time.perf_counter()
    chat = load_zoo(manifests, device)
    stacked = stacked_zoo(manifests)
    with chat.mounted({}):
        report = evaluate_mounted(chat, cfg, stacked)
    report.update(stacked=stacked, base=chat.name, domains=list(chat.domains),
                  seconds=time.perf_counter() - started)
    return report


def evaluate_mounted(chat: ChatModel, cfg: BrainstacksEval, stacked: bool) -> dict:
    domains = chat.domains
    sets = {d: held_out(d, "test", cfg.per_kind) for d in domains}
    sets["cross"] = held_out("cross", "test", cfg.per_kind)
    other = "gate" if chat.router.config.weighting == "probability" else "probability"  # the paper's, or the gate
    other_router = MetaRouter(replace(chat.router.config, weighting=other))  # route() reads only the config

    def routes_of(items):
        probabilities = [chat.router_probabilities(item.messages()) for item in items]
        vectors = [torch.tensor([p[d] for d in domains]) for p in probabilities]
        return probabilities, [chat.router.route(v)[0] for v in vectors], [other_router.route(v)[0] for v in vectors]

    settings, records, router, cache = {}, {}, {"top1": {}, "cross": []}, {}
    for name, items in tqdm(sets.items(), desc="evaluation sets", unit="set"):
        probabilities, served_routes, other_routes = routes_of(items)
        kinds = len({e.kind for e in items})
        oracle_items = items[:cfg.oracle_per_kind * kinds]  # kinds interleave: the first of each kind
        compared = cfg.comparison_per_kind * kinds
        discovered = discovered_routes(chat.model, chat.tokenizer, oracle_items, domains, cfg.margin,
                                       cfg.batch_size, cfg.oracle_max_domains)
        by_setting = {"base": [{}] * len(items), "ungated": [None] * len(items[:compared]), "routed": served_routes,
                      "routed_other_weighting": other_routes[:compared],
                      "oracle": [{d: 1.0 for d in chosen} for chosen in discovered]}
        row, correct_by, replies_by = {}, {}, {}
        for setting, routes in by_setting.items():
            asked = items[:len(routes)]
            losses, replies = run_routes(chat, asked, routes, cfg, cache)
            correct = [final_answer(r) == e.final for r, e in zip(replies, asked)]
            found = [answer_in(r, e.final) for r, e in zip(replies, asked)]
            row[setting] = {**proportion(correct), "loss": sum(losses) / len(losses),
                            "answer_in_reply": sum(found) / len(found)}
            correct_by[setting], replies_by[setting] = correct, replies
        row["oracle"]["routed_on_the_same_prompts"] = proportion(correct_by["routed"][:len(oracle_items)])
        if name != "cross":
            row["by_form"] = {s: by_form(items, correct_by[s], name) for s in ("base", "routed")}
            extra = [extra_step(r, e) for r, e in zip(replies_by["routed"], items)]
            row["extra_step"] = {**proportion(extra), "by_form": by_form(items, extra, name)}
            row["by_kind"] = {kind: proportion([c for c, e in zip(correct_by["routed"], items) if e.kind == kind])
                              for kind in dict.fromkeys(e.kind for e in items)}  # routed
        if name == "math":
            single = [(c, e) for c, e in zip(correct_by["routed"], items) if e.kind in SINGLE_OPERATIONS]
            row["single_operation"] = proportion([c for c, _ in single])
        row["distinct_prompts"] = len({e.prompt for e in items})
        row["kinds"] = dict(Counter(e.kind for e in items))
        row["examples"] = [{"prompt": e.prompt, "expected": e.final, "route": sorted(route),
                            **{s: replies_by[s][k] for s in ("base", "routed", "oracle")}}
                           for k, (e, route) in enumerate(zip(items[:kinds], served_routes))]  # one per kind
        settings[name] = row
        records[name] = {"correct": correct_by, "routes": served_routes}
        tqdm.write(f"{name}: n={len(items)} " + ", ".join(f"{s} {row[s]['exact_match']:.2f}" for s in SETTINGS)
                   + f"; answer in reply: base {row['base']['answer_in_reply']:.2f}, "
                     f"routed {row['routed']['answer_in_reply']:.2f}")
        if name == "cross":
            for item, chosen, applied, p in zip(oracle_items, discovered, served_routes, probabilities):
                router["cross"].append({"kind": item.domain, "router_applied": sorted(applied),
                                        "discovered": list(chosen),
                                        "probabilities": {d: round(v, 3) for d, v in p.items()}})
        else:
            router["top1"][name] = sum(max(p, key=p.get) == name for p in probabilities) / len(items)
    cross = router["cross"]
    router["cross_two_or_more_domains"] = sum(len(c["router_applied"]) >= 2 for c in cross) / len(cross)
    router["cross_applied_combinations"] = Counter("+".join(c["router_applied"]) or "none" for c in cross).most_common()
    router["cross_discovered_combinations"] = Counter("+".join(c["discovered"]) or "none" for c in cross).most_common()
    router.update(weighting=chat.router.config.weighting, other_weighting=other,
                  gate_threshold=chat.router.config.gate_threshold,
                  probe_phrasings=router_on_probes(chat, cfg.probe_per_phrasing))
    report = {"settings": settings, "router": router, "general": general_prompts(chat, cfg, cache),
              "forgetting": routed_forgetting(chat, sets, records, cfg, stacked, cache)}
    return {**report, "replies_generated": len(cache)}


def router_on_probes(chat: ChatModel, per_phrasing: int) -> dict:
    """The served route on probe prompts: per domain, how often it is the prompt's own domain alone
    (for general prompts: no domain), overall and per task kind."""
    report = {}
    for domain in (*chat.domains, "general"):
        wanted = set() if domain == "general" else {domain}
        hits = {}
        for e in probe_prompts(domain, per_phrasing):
            p = chat.router_probabilities(e.messages())
            route = chat.router.route(torch.tensor([p[d] for d in chat.domains]))[0]
            hits.setdefault(e.kind, []).append(set(route) == wanted)
        every = [h for kind in hits.values() for h in kind]
        report[domain] = {**{k: v for k, v in proportion(every).items() if k != "exact_match"},
                          "as_wanted": sum(every) / len(every),
                          "kinds": {k: sum(v) / len(v) for k, v in hits.items()}}
    return report


def general_prompts(chat: ChatModel, cfg: BrainstacksEval, cache: dict) -> dict:
    """Everyday prompts, outside every domain, on held-out phrasings of every family: does the routed
    model answer exactly as the base does? And what a prompt sent to a domain costs: its reply
    against the base's, and whether a domain's format ("Answer: ...") took it over."""
    items = held_out("general", "test", cfg.general_prompts)
    routes = [chat.router.route(torch.tensor(list(chat.router_probabilities(e.messages()).values())))[0]
              for e in items]
    _, base = run_routes(chat, items, [{}] * len(items), cfg, cache, max_new_tokens=cfg.general_tokens)
    _, served = run_routes(chat, items, routes, cfg, cache, max_new_tokens=cfg.general_tokens)
    same = [a == b for a, b in zip(base, served)]
    misrouted = [(e, r, b, s) for e, r, b, s in zip(items, routes, base, served) if r]
    families = {kind: [k for e, k in zip(items, same) if e.kind == kind] for kind in dict.fromkeys(e.kind for e in items)}
    return {**{k: v for k, v in proportion(same).items() if k != "exact_match"}, "same_as_base": sum(same) / len(same),
            "no_domain": sum(not r for r in routes) / len(routes), "distinct_prompts": len({e.prompt for e in items}),
            "families": {kind: sum(v) / len(v) for kind, v in families.items()},
            "applied": Counter("+".join(sorted(r)) or "none" for r in routes).most_common(),
            "misrouted": {"n": len(misrouted), "changed": sum(b != s for _, _, b, s in misrouted),
                          "took_a_domains_format": sum("Answer:" in s and "Answer:" not in b for _, _, b, s in misrouted),
                          "examples": [{"prompt": e.prompt, "route": sorted(r), "base": b, "routed": s}
                                       for e, r, b, s in misrouted[:6]]},
            "examples": [{"prompt": e.prompt, "base": b, "routed": s} for e, b, s in list(zip(items, base, served))[:4]]}


def routed_forgetting(chat: ChatModel, sets: dict, records: dict, cfg: BrainstacksEval, stacked: bool,
                      cache: dict) -> dict:
    """Per earlier domain i and later domain j: exact match under the router's route restricted to
    domains[:j + 1] against exact match at freeze (isolation route), paired per prompt."""
    domains = chat.domains
    frozen = {}
    for i, domain in enumerate(domains):
        items = sets[domain]
        _, replies = run_routes(chat, items, [isolation_route(domains, i, stacked)] * len(items), cfg, cache)
        frozen[domain] = [final_answer(r) == e.final for r, e in zip(replies, items)]
    rows = []
    for j in range(1, len(domains)):
        library = set(domains[: j + 1])
        for i, domain in enumerate(domains[:j]):
            items = sets[domain]
            routes = [{d: w for d, w in r.items() if d in library} for r in records[domain]["routes"]]
            _, replies = run_routes(chat, items, routes, cfg, cache)  # after the last: the routed setting's replies
            after = [final_answer(r) == e.final for r, e in zip(replies, items)]
            rows.append({"after_domain": domains[j], "domain": domain, **paired(frozen[domain], after)})
    last = [r for r in rows if r["after_domain"] == domains[-1]]
    pooled_before = [x for r in last for x in frozen[r["domain"]]]
    pooled_after = [x for r in last for x in records[r["domain"]]["correct"]["routed"]]
    return {"at_freeze": {d: proportion(v) for d, v in frozen.items()}, "rows": rows,
            "pooled_after_last": paired(pooled_before, pooled_after)}


def paired(before: list[bool], after: list[bool]) -> dict:
    lost = sum(b and not a for b, a in zip(before, after))
    gained = sum(a and not b for b, a in zip(before, after))
    n = len(before)
    return {"n": n, "before": sum(before) / n, "after": sum(after) / n, "change": (gained - lost) / n,
            "change_interval": list(paired_difference_interval(lost, gained, n)), "lost": lost, "gained": gained,
            "p_value": mcnemar_p(lost, gained)}


def run_brainstacks_eval(manifests: BuiltManifest, out_dir: Path, cfg: BrainstacksEval = BrainstacksEval(),
                         compare: dict[str, BuiltManifest] | None = None, device: str = "cpu") -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    zoos = {"served": manifests, **(compare or {})}
    reports = {}
    for name, zoo in zoos.items():
        reports[name] = evaluate_zoo(zoo, cfg, device)
        print(f"== {name}: {zoo.path}")
        print(format_report(reports[name]), flush=True)
    result = {"config": asdict(cfg), "machine": machine(device), "zoos": reports, "seconds": time.perf_counter() - started}
    if len(reports) > 1:
        print(comparison_table(reports))
    (out_dir / "brainstacks.json").write_text(json.dumps(result, indent=1, default=str))
    save_chart(out_dir / "brainstacks.png", reports)
    print(f"wrote {out_dir / 'brainstacks.json'} and {out_dir / 'brainstacks.png'} "
          f"({result['seconds'] / 60:.1f} min on {result['machine']})")
    return result
