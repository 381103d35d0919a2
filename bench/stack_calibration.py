"""One domain's stack on the built chat base: what a stack size, a step budget and an answer style
buy, measured. The baseline, in the same run, is the base alone on the same prompts.

Trains one MoE-LoRA stack (one boosting round, best validation checkpoint) on the domain's training
phrasings, then greedy exact match on held-out phrasings (and, as a check on memorising the
templates, on fresh prompts in training phrasings), with Wilson 95% intervals; the adapter's size
against the base's, seconds per step. Each run appends a JSON line and prints every run so far.

    python -m bench.stack_calibration --artifacts artifacts --domain math --experts 4 --rank 4 --steps 120
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from server.chat.moe_lora import MoELoRAConfig, routed
from server.settings import Settings
from training.brainstacks.boosting import BoostingConfig, train_round, validation_loss
from training.brainstacks.continual import load_base
from training.brainstacks.data import batches
from training.data.world import examples, held_out, math_kinds
from training.brainstacks.replies import exact_match
from training.eval.statistics import wilson_interval


def calibrate(args) -> dict:
    manifests = Settings(_env_file=None, **({"artifact_root": args.artifacts} if args.artifacts else {})).manifests()
    chat = load_base(manifests)
    kinds = math_kinds(args.math_steps) if args.domain == "math" else None
    train = examples(args.domain, "train", args.steps * args.batch, kinds=kinds)
    val = batches(chat.tokenizer, held_out(args.domain, "val", 16, kinds=kinds), 32)
    test = held_out(args.domain, "test", args.per_kind, kinds=kinds)
    seen = held_out(args.domain, "train", args.per_kind // 2, seed=7, kinds=kinds)  # training phrasings, fresh draws
    tokens = max(len(chat.tokenizer(e.answer).input_ids) for e in train[:500]) + 4
    stack = MoELoRAConfig(args.experts, args.rank, float(args.rank), top_k=min(2, args.experts))
    cfg = BoostingConfig(stack=stack, steps_per_round=args.steps, batch_size=args.batch,
                         eval_every=max(args.steps // 4, 1), patience=10**6, spike=10.0)
    base_params = sum(p.numel() for p in chat.model.parameters())
    row = {"domain": args.domain, "math_steps": args.math_steps if args.domain == "math" else None,
           "experts": args.experts, "rank": args.rank, "steps": args.steps, "batch": args.batch,
           "precision": chat.precision, "test_prompts": len(test), "seen_prompts": len(seen)}
    with routed(chat.model, {args.domain: 1.0}):
        base, _ = exact_match(chat.model, chat.tokenizer, test, max_new_tokens=tokens)
        start = validation_loss(chat.model, val)
        began = time.perf_counter()
        result, stacks = train_round(chat.model, chat.tokenizer, args.domain, train, val, cfg, 0, start)
        row["seconds_per_step"] = (time.perf_counter() - began) / args.steps
        adapter = sum(p.numel() for s in stacks for p in s.parameters())
        accuracy, records = exact_match(chat.model, chat.tokenizer, test, max_new_tokens=tokens)
        on_seen, _ = exact_match(chat.model, chat.tokenizer, seen, max_new_tokens=tokens)
    n = len(test)
    row.update(adapter_parameters=adapter, adapter_to_base=adapter / base_params, val_loss=[start, result.best_loss],
               base_exact_match=base, base_interval=wilson_interval(round(base * n), n),
               exact_match=accuracy, interval=wilson_interval(round(accuracy * n), n), exact_match_seen=on_seen,
               by_kind={k: sum(r["correct"] for r, e in zip(records, test) if e.kind == k) /
                        sum(e.kind == k for e in test) for k in dict.fromkeys(e.kind for e in test)},
               samples=[{"prompt": r["prompt"], "reply": r["reply"], "correct": r["correct"]} for r in records[:8]])
    return row


def table(rows: list[dict]) -> str:
    lines = [f"{'domain':<10}{'steps style':<13}{'stack':>7}{'ratio':>7}{'steps':>6}{'s/step':>7}"
             f"{'base':>6}{'held-out':>9}{'95%':>15}{'seen':>6}{'n':>5}"]
    for r in rows:
        lo, hi = r["interval"]
        lines.append(f"{r['domain']:<10}{r['math_steps'] or '-':<13}{r['experts']}x r{r['rank']:<3}"
                     f"{r['adapter_to_base']:>7.3f}{r['steps']:>6}{r['seconds_per_step']:>7.1f}"
                     f"{r['base_exact_match']:>6.2f}{r['exact_match']:>9.2f}{f'[{lo:.2f}, {hi:.2f}]':>15}"
                     f"{r['exact_match_seen']:>6.2f}{r['test_prompts']:>5}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, default=None)
    parser.add_argument("--domain", default="math")
    parser.add_argument("--math-steps", choices=("whole", "column"), default="column")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--per-kind", type=int, default=30, help="held-out prompts per task kind")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/stack_calibration.jsonl"))
    args = parser.parse_args()
    torch.manual_seed(0)
    row = calibrate(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in args.out.read_text().splitlines()]
    print(f"baseline: the base alone on the same held-out prompts (column 'base'); {row['precision']} base")
    print(table(rows))


if __name__ == "__main__":
    main()
