"""`python -m training eval brainstacks`: what a chat zoo's stacks and router add to its base.

Every number is measured on held-out phrasings (templates no training step saw), on distinct
prompts stratified by task kind, with 95% intervals and the distinct-prompt count:

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
(b) General prompts (outside every domain): how often the routed greedy answer equals the base's,
    and how often the router picks no domain at all.
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
from training.data.world import Example, final_answer, held_out, probe_prompts
from training.brainstacks.replies import generate_replies
from training.eval.statistics import mcnemar_p, paired_difference_interval, wilson_interval

SETTINGS = ("base", "ungated", "routed", "routed_other_weighting", "oracle")


@dataclass(frozen=True)
class BrainstacksEval:
    per_kind: int = 25  # held-out prompts per task kind (fewer where a kind has fewer distinct ones)
    general_prompts: int = 64
    margin: float = 0.01  # outcome discovery's rule, as the router was trained
    batch_size: int = 32
    max_new_tokens: int = 128  # a cap: each set generates its longest expected reply plus 16 tokens
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
    """Prompts outside every domain: does the routed model answer exactly as the base does?"""
    items = held_out("general", "test", cfg.general_prompts)
    routes = [chat.router.route(torch.tensor(list(chat.router_probabilities(e.messages()).values())))[0]
              for e in items]
    _, base = run_routes(chat, items, [{}] * len(items), cfg, cache, max_new_tokens=cfg.general_tokens)
    _, served = run_routes(chat, items, routes, cfg, cache, max_new_tokens=cfg.general_tokens)
    same = [a == b for a, b in zip(base, served)]
    return {**{k: v for k, v in proportion(same).items() if k != "exact_match"}, "same_as_base": sum(same) / len(same),
            "no_domain": sum(not r for r in routes) / len(routes), "distinct_prompts": len({e.prompt for e in items}),
            "applied": Counter("+".join(sorted(r)) or "none" for r in routes).most_common(),
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


def format_report(report: dict) -> str:
    lines = [f"{report['base']}, stacks {'on earlier domains' if report['stacked'] else 'on the base alone'}"
             f" ({report['seconds'] / 60:.1f} min, {report['replies_generated']} replies generated)",
             "exact match on held-out phrasings [95% interval], n = distinct prompts"]
    lines.append(f"{'set':<10}{'n':>5}" + "".join(f"{s:>24}" for s in SETTINGS))
    for name, row in report["settings"].items():
        cells = "".join(f"{row[s]['exact_match']:>8.2f} [{row[s]['interval'][0]:.2f},{row[s]['interval'][1]:.2f}]"
                        .rjust(24) for s in SETTINGS)
        lines.append(f"{name:<10}{row['distinct_prompts']:>5}{cells}")
    lines.append(f"{'':<15}" + "".join(f"{'loss ' + format(row_loss, '.3f'):>24}" for row_loss in
                                      (sum(r[s]['loss'] for r in report['settings'].values()) / len(report['settings'])
                                       for s in SETTINGS)) + "  (mean answer loss)")
    lines.append("oracle prompts (the first of each kind): " + ", ".join(
        f"{name} n={row['oracle']['n']} oracle {row['oracle']['exact_match']:.2f} routed "
        f"{row['oracle']['routed_on_the_same_prompts']['exact_match']:.2f}" for name, row in report["settings"].items()))
    router = report["router"]
    lines.append(f"routed: the router's {router['weighting']} weighting, gate threshold {router['gate_threshold']}; "
                 f"routed_other_weighting: {router['other_weighting']} weighting")
    lines.append(f"ungated and routed at {router['other_weighting']} weighting ran on the first prompts of each kind: " + ", ".join(
        f"{name} n={row['ungated']['n']}" for name, row in report["settings"].items()))
    lines.append("answer in reply (any format): " + ", ".join(
        f"{name} base {row['base']['answer_in_reply']:.2f} routed {row['routed']['answer_in_reply']:.2f}"
        for name, row in report["settings"].items()))
    g = report["general"]
    lines.append(f"general prompts (n={g['n']}): routed answer == base answer {g['same_as_base']:.2f} "
                 f"[{g['interval'][0]:.2f},{g['interval'][1]:.2f}]; router picked no domain {g['no_domain']:.2f}")
    lines.append("router top-1 on single-domain prompts: " + ", ".join(f"{d} {a:.2f}" for d, a in router["top1"].items()))
    lines.append(f"cross-domain prompts routed to >= 2 domains (no floor): {router['cross_two_or_more_domains']:.2f}")
    lines.append("router on probe phrasings (own domain alone; general: none): " + ", ".join(
        f"{d} {r['as_wanted']:.2f} [{r['interval'][0]:.2f},{r['interval'][1]:.2f}] n={r['n']}"
        for d, r in router["probe_phrasings"].items()))
    lines.append(f"  router applied: {router['cross_applied_combinations'][:6]}")
    lines.append(f"  outcome discovery found best: {router['cross_discovered_combinations'][:6]}")
    f = report["forgetting"]
    lines.append("forgetting under the served route: exact match at freeze -> after a later domain (paired)")
    for row in f["rows"]:
        lines.append(f"  after {row['after_domain']:<10} {row['domain']:<10} n={row['n']:<4} {row['before']:.2f} -> "
                     f"{row['after']:.2f}  change {row['change']:+.3f} "
                     f"[{row['change_interval'][0]:+.3f},{row['change_interval'][1]:+.3f}]  p={row['p_value']:.3f}")
    p = f["pooled_after_last"]
    lines.append(f"  pooled after the last domain: n={p['n']} {p['before']:.3f} -> {p['after']:.3f}, change "
                 f"{p['change']:+.3f} [{p['change_interval'][0]:+.3f},{p['change_interval'][1]:+.3f}], "
                 f"McNemar p={p['p_value']:.3f}")
    return "\n".join(lines)


def comparison_table(reports: dict[str, dict]) -> str:
    """Zoos side by side: routed exact match per set, general prompts kept, pooled forgetting."""
    names = list(reports)
    sets = list(next(iter(reports.values()))["settings"])
    lines = ["routed exact match by zoo (the same held-out prompts)", f"{'set':<14}" + "".join(f"{n:>22}" for n in names)]
    for s in sets + ["base"]:
        label, key = (s, "routed") if s != "base" else ("mean base", "base")
        cells = []
        for n in names:
            rows = reports[n]["settings"]
            value = (rows[s]["routed"]["exact_match"] if s != "base"
                     else sum(r[key]["exact_match"] for r in rows.values()) / len(rows))
            cells.append(f"{value:>22.2f}")
        lines.append(f"{label:<14}" + "".join(cells))
    lines.append(f"{'general same':<14}" + "".join(f"{reports[n]['general']['same_as_base']:>22.2f}" for n in names))
    lines.append(f"{'forgetting':<14}" + "".join(
        f"{reports[n]['forgetting']['pooled_after_last']['change']:>+15.3f} p={reports[n]['forgetting']['pooled_after_last']['p_value']:.2f}"
        for n in names))
    return "\n".join(lines)


def save_chart(path: Path, reports: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(reports), figsize=(6.5 * len(reports), 3.8), squeeze=False)
    for ax, (name, report) in zip(axes[0], reports.items()):
        sets = list(report["settings"])
        width = 0.16
        for k, setting in enumerate(SETTINGS):
            values = [report["settings"][s][setting]["exact_match"] for s in sets]
            errors = [[v - report["settings"][s][setting]["interval"][0] for v, s in zip(values, sets)],
                      [report["settings"][s][setting]["interval"][1] - v for v, s in zip(values, sets)]]
            ax.bar([x + (k - 2) * width for x in range(len(sets))], values, width, yerr=errors, capsize=2,
                   label=setting)
        ax.set_xticks(range(len(sets)), sets, fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{name}: exact match, held-out phrasings", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
