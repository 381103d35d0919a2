"""Cross-domain prompts under every way of composing their two domains' stacks: does any route of
the built chat zoo answer them? The baseline, in the same run, is the base alone on the same prompts.

Each cross-domain task kind ("cross:a+b") is asked on held-out prompts (validation phrasings by
default) under: the base alone; a alone; b alone; a and b at once at several weight pairs; and a
then b in sequence (a's stacks write the reply up to its "Answer:" line, b's continue from there).
No router: the routes are set by hand, so this measures what the stacks can do, not what the router
chooses. Greedy exact match with Wilson 95% intervals; a table and a JSON report.

    python -m bench.cross_domain --artifacts artifacts --per-kind 10 --out runs/bench/cross_domain.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from server.chat.moe_lora import routed
from server.settings import Settings
from training.brainstacks.continual import load_for_training
from training.data.world import Example, final_answer, held_out
from training.brainstacks.replies import generate_replies
from training.eval.statistics import wilson_interval

WEIGHT_PAIRS = ((1.0, 1.0), (0.7, 0.7), (0.5, 0.5), (1.0, 0.5), (0.5, 1.0))


def first_part(reply: str) -> str:
    """What the first domain hands on in a sequence: its reply up to its first "Answer:" line."""
    return reply.split("Answer:")[0].rstrip()


def score(replies: list[str], items: list[Example]) -> dict:
    correct = sum(final_answer(r) == e.final for r, e in zip(replies, items))
    return {"correct": correct, "n": len(items), "exact_match": correct / max(len(items), 1),
            "interval": wilson_interval(correct, len(items)), "sample": replies[0] if replies else ""}


def measure(chat, items: list[Example], max_new_tokens: int = 110) -> dict:
    """Every route of each cross kind whose two domains the zoo has."""
    def answer(group, route, starts=None):
        with routed(chat.model, route):
            return generate_replies(chat.model, chat.tokenizer, group, max_new_tokens, starts=starts)

    kinds: dict[str, list[Example]] = {}
    for e in items:
        kinds.setdefault(e.kind, []).append(e)
    report = {}
    for kind, group in tqdm(kinds.items(), desc="cross kinds", unit="kind"):
        a, b = group[0].domain.removeprefix("cross:").split("+")
        if not {a, b} <= set(chat.domains):
            continue
        rows = {"base alone (baseline)": score(answer(group, {}), group)}
        first = answer(group, {a: 1.0})
        rows[f"{a} alone"] = score(first, group)
        rows[f"{b} alone"] = score(answer(group, {b: 1.0}), group)
        for wa, wb in WEIGHT_PAIRS:
            rows[f"{a} {wa:g} + {b} {wb:g}"] = score(answer(group, {a: wa, b: wb}), group)
        starts = [first_part(r) for r in first]  # no trailing space: BPE words carry their leading one
        rows[f"{a} then {b}"] = score([s + r for s, r in zip(starts, answer(group, {b: 1.0}, starts))], group)
        report[kind] = {"domains": [a, b], "prompts": [e.prompt for e in group], "expected": [e.final for e in group],
                        "routes": rows}
    return report


def table(report: dict) -> str:
    lines = [f"{'kind':<18}{'route':<28}{'exact':>7}{'95%':>15}{'vs base':>9}{'n':>4}"]
    for kind, entry in report.items():
        base = entry["routes"]["base alone (baseline)"]["correct"]
        for route, row in entry["routes"].items():
            lo, hi = row["interval"]
            gain = f"{row['correct'] - base:+d}"
            lines.append(f"{kind:<18}{route:<28}{row['exact_match']:>7.2f}{f'[{lo:.2f}, {hi:.2f}]':>15}"
                         f"{gain:>9}{row['n']:>4}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, default=None)
    parser.add_argument("--split", choices=("val", "test"), default="val")
    parser.add_argument("--per-kind", type=int, default=10, help="held-out prompts per cross-domain kind")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/cross_domain.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    manifests = Settings(_env_file=None, **({"artifact_root": args.artifacts} if args.artifacts else {})).manifests()
    chat = load_for_training(manifests.read().chat, manifests, "cpu")
    started = time.perf_counter()
    with chat.mounted({}):
        report = measure(chat, held_out("cross", args.split, args.per_kind))
    out = {"split": args.split, "per_kind": args.per_kind, "base": chat.name, "kinds": report,
           "seconds": time.perf_counter() - started}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"baseline: the base alone on the same {args.split} prompts; 'vs base': prompts right, minus the base's")
    print(table(report))


if __name__ == "__main__":
    main()
