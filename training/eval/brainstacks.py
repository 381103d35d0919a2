"""`python -m training eval brainstacks`: the continual system's claims, measured.

(a) Forgetting matrices, isolation and ungated, with and without the null-space projection, and
    the curriculum order against its reverse: three continual runs at a reduced budget (the same
    data, seeds and steps; only the projection or the order differs).
(b) On each domain's test set and on the cross-domain set, for the served zoo (manifest stacks and
    router): base, ungated (every stack at 1), routed (the meta-router, per prompt; its domains at
    weight 1, and at their probabilities as the paper serves them) and oracle (per
    prompt, the subset of domains with the lowest answer loss): answer loss and exact match.
(c) The router's top-1 accuracy on single-domain prompts, and the domain combinations it applies to
    cross-domain prompts beside the combinations outcome discovery found best.
Prints tables, writes JSON and a PNG of the forgetting matrices.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from server.chat.model import ChatModel, load_chat
from server.chat.moe_lora import routed
from server.chat.router import MetaRouter
from server.manifest import BuiltManifest
from training.brainstacks.continual import ChatZooRecipe, domain_data, load_base, prepare_for_training, run_continual
from training.brainstacks.data import collate
from training.eval.exact_match import generate_replies
from training.brainstacks.boosting import BoostingConfig
from training.brainstacks.router_training import example_losses, greedy_selection, loss_tables
from training.data.world import examples, final_answer


@dataclass(frozen=True)
class BrainstacksEval:
    test_examples: int = 40  # per domain, and for the cross-domain set
    ablation: ChatZooRecipe = ChatZooRecipe(
        boosting=BoostingConfig(steps_per_round=150, max_rounds=1), router=None, train_examples=2000,
        val_examples=64, test_examples=20)
    margin: float = 0.01
    max_new_tokens: int = 40


ABLATIONS = {  # name -> (curriculum order reversed?, null-space projection on?)
    "with_projection": (False, True),
    "without_projection": (False, False),
    "reversed_order": (True, True),
}


def forgetting_ablation(manifests: BuiltManifest, cfg: BrainstacksEval) -> dict:
    """Continual runs at the reduced budget, identical but for the projection or the curriculum order."""
    out = {}
    for name, (reverse, projection) in ABLATIONS.items():
        chat = load_base(manifests)
        order = tuple(reversed(cfg.ablation.domains)) if reverse else cfg.ablation.domains
        recipe = replace(cfg.ablation, domains=order,
                         nullspace=replace(cfg.ablation.nullspace, enabled=projection))
        data = {d: domain_data(chat.tokenizer, d, recipe) for d in recipe.domains}
        run = run_continual(chat.model, chat.tokenizer, recipe, data)
        out[name] = {k: run[k] for k in ("post_freeze", "forgetting_isolation", "forgetting_ungated")}
        out[name]["order"] = list(order)
        out[name]["val_loss_before"] = {r["domain"]: r["val_loss_before"] for r in run["domains"]}
        out[name]["exact_match"] = {r["domain"]: r["exact_match_after"] for r in run["domains"]}
    return out


def curriculum_table(forgetting: dict) -> list[str]:
    """Each domain trained in the paper's order and in reverse, same budget: the loss it started from
    (what earlier domains' stacks already gave it) and the loss its own stacks reached."""
    paper, reverse = forgetting["with_projection"], forgetting["reversed_order"]
    lines = ["curriculum: paper order vs reversed (validation loss; start = before the domain's own stacks)",
             f"{'domain':<11}{'start paper':>12}{'start rev':>11}{'frozen paper':>14}{'frozen rev':>12}"
             f"{'ungated paper':>15}{'ungated rev':>13}"]
    columns = [(paper["val_loss_before"], reverse["val_loss_before"]), (paper["post_freeze"], reverse["post_freeze"]),
               (paper["forgetting_ungated"][-1], reverse["forgetting_ungated"][-1])]
    widths = (12, 11, 14, 12, 15, 13)
    for d in paper["order"]:
        cells = [column[d] for pair in columns for column in pair]
        lines.append(f"{d:<11}" + "".join(f"{v:>{w}.3f}" for v, w in zip(cells, widths)))
    means = [sum(column.values()) / len(column) for pair in columns for column in pair]
    lines.append(f"{'mean':<11}" + "".join(f"{v:>{w}.3f}" for v, w in zip(means, widths)))
    return lines


@torch.no_grad()
def per_example(model, tokenizer, items, route_of, max_new_tokens: int) -> tuple[list[float], list[bool]]:
    """Loss and exact match per example, each with its own route. Examples that share a route (all
    of them for base and ungated, most for oracle) run as one batch."""
    groups: dict[tuple | None, list[int]] = {}
    for index, item in enumerate(items):
        route = route_of(item)
        groups.setdefault(None if route is None else tuple(sorted(route.items())), []).append(index)
    losses, correct = [0.0] * len(items), [False] * len(items)
    for key, indices in tqdm(groups.items(), desc="routes", unit="route", leave=False):
        group = [items[i] for i in indices]
        with routed(model, None if key is None else dict(key)):
            group_losses = [loss for start in range(0, len(group), 32)
                            for loss in example_losses(model, collate(tokenizer, group[start:start + 32])).tolist()]
            replies = generate_replies(model, tokenizer, group, max_new_tokens=max_new_tokens)
        for i, loss, item, reply in zip(indices, group_losses, group, replies):
            losses[i], correct[i] = loss, final_answer(reply) == item.final
    return losses, correct


def served_comparison(manifests: BuiltManifest, cfg: BrainstacksEval) -> dict:
    chat = load_chat(manifests.read().chat, manifests.resolver(), "cpu")  # the served zoo, as the server loads it
    prepare_for_training(chat)  # the same kernels as the stacks were trained and scored with
    with chat.mounted():  # every served stack on the base; each setting routes them
        return compare_settings(chat, cfg)


def compare_settings(chat: ChatModel, cfg: BrainstacksEval) -> dict:
    model, tokenizer, domains = chat.model, chat.tokenizer, chat.domains

    sets = {d: examples(d, "test", cfg.test_examples) for d in domains}
    sets["cross"] = examples("cross", "test", cfg.test_examples)
    results, router_report = {}, {"top1": {}, "cross": []}
    paper_router = MetaRouter(replace(chat.router.config, weighting="probability"))  # route() reads only the config
    for name, items in sets.items():
        tables = loss_tables(model, tokenizer, items, domains)
        best = [min(t, key=t.get) for t in tables]
        discovered = [greedy_selection(t, domains, cfg.margin) for t in tables]
        routes = {}
        for item in items:
            probabilities = chat.router_probabilities(item.messages())
            weights, _ = chat.router.route(torch.tensor([probabilities[d] for d in domains]))
            at_probability, _ = paper_router.route(torch.tensor([probabilities[d] for d in domains]))
            routes[item.prompt] = (weights, probabilities, at_probability)
        oracle = {item.prompt: {d: 1.0 for d in b} for item, b in zip(items, best)}
        row = {}
        for setting, route_of in (("base", lambda item: {}), ("ungated", lambda item: None),
                                  ("routed", lambda item: routes[item.prompt][0]),
                                  ("routed_at_probability", lambda item: routes[item.prompt][2]),
                                  ("oracle", lambda item: oracle[item.prompt])):
            losses, correct = per_example(model, tokenizer, items, route_of, cfg.max_new_tokens)
            row[setting] = {"loss": sum(losses) / len(losses), "exact_match": sum(correct) / len(correct)}
        results[name] = row
        if name == "cross":
            for item, found in zip(items, discovered):
                weights, probabilities, _ = routes[item.prompt]
                router_report["cross"].append({"kind": item.domain, "router_applied": sorted(weights),
                                               "discovered": list(found),
                                               "probabilities": {d: round(p, 3) for d, p in probabilities.items()}})
        else:
            top1 = [max(routes[i.prompt][1], key=routes[i.prompt][1].get) == name for i in items]
            router_report["top1"][name] = sum(top1) / len(top1)
    cross = router_report["cross"]
    router_report["cross_two_or_more_domains"] = sum(len(c["router_applied"]) >= 2 for c in cross) / len(cross)
    router_report["cross_applied_combinations"] = Counter(
        "+".join(c["router_applied"]) or "none" for c in cross).most_common()
    router_report["cross_discovered_combinations"] = Counter(
        "+".join(c["discovered"]) or "none" for c in cross).most_common()
    return {"settings": results, "router": router_report}


def format_tables(report: dict) -> str:
    lines = []
    for key in ABLATIONS:
        run = report["forgetting"][key]
        lines.append(f"forgetting, {key.replace('_', ' ')} (validation loss; row = after training that domain)")
        domains = run["order"]
        lines.append(f"{'after':<11}" + "".join(f"{d:>22}" for d in domains))
        for row_iso, row_all in zip(run["forgetting_isolation"], run["forgetting_ungated"]):
            after = list(row_iso)[-1]
            cells = "".join(f"{row_iso[d]:>10.4f} / {row_all[d]:<9.4f}" if d in row_iso else f"{'':>22}"
                            for d in domains)
            lines.append(f"{after:<11}{cells}")
        lines.append("  (each cell: isolation / ungated)")
    lines += curriculum_table(report["forgetting"])
    lines.append("served zoo: answer loss and exact match")
    settings = ("base", "ungated", "routed", "routed_at_probability", "oracle")
    lines.append(f"{'set':<11}" + "".join(f"{s:>23}" for s in settings))
    for name, row in report["served"]["settings"].items():
        lines.append(f"{name:<11}" + "".join(f"{row[s]['loss']:>13.3f} {row[s]['exact_match']:>9.2f}" for s in settings))
    lines.append("  (each cell: answer loss, exact match; routed applies the router's domains at weight 1,"
                 " routed_at_probability at their probabilities)")
    router = report["served"]["router"]
    lines.append("router top-1 on single-domain prompts: " + ", ".join(f"{d} {a:.2f}" for d, a in router["top1"].items()))
    lines.append(f"cross-domain prompts routed to >= 2 domains: {router['cross_two_or_more_domains']:.2f}")
    lines.append(f"  router applied: {router['cross_applied_combinations']}")
    lines.append(f"  outcome discovery found best: {router['cross_discovered_combinations']}")
    return "\n".join(lines)


def save_matrices(path: Path, forgetting: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [(k, m) for k in ABLATIONS for m in ("isolation", "ungated")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    for ax, (key, mode) in zip(axes, panels):
        rows = forgetting[key][f"forgetting_{mode}"]
        domains = forgetting[key]["order"]
        grid = np.full((len(rows), len(domains)), np.nan)
        for r, row in enumerate(rows):
            for c, d in enumerate(domains):
                grid[r, c] = row.get(d, np.nan)
        image = ax.imshow(grid, cmap="viridis")
        ax.set_xticks(range(len(domains)), domains, rotation=45, fontsize=7)
        ax.set_yticks(range(len(rows)), [f"after {list(r)[-1]}" for r in rows], fontsize=7)
        ax.set_title(f"{mode}, {key.replace('_', ' ')}", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_brainstacks_eval(manifests: BuiltManifest, out_dir: Path, cfg: BrainstacksEval = BrainstacksEval()) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report = {"config": asdict(cfg), "machine": f"{torch.get_num_threads()} torch threads, CPU"}
    report["served"] = served_comparison(manifests, cfg)
    report["forgetting"] = forgetting_ablation(manifests, cfg)
    report["seconds"] = time.perf_counter() - started
    (out_dir / "brainstacks.json").write_text(json.dumps(report, indent=1, default=str))
    save_matrices(out_dir / "forgetting.png", report["forgetting"])
    print(format_tables(report))
    print(f"wrote {out_dir / 'brainstacks.json'} and {out_dir / 'forgetting.png'}")
    return report
