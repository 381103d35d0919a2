"""`python -m training eval moe-lora`: MoE-LoRA (4 x r16) against a parameter-matched LoRA (r64).

Per domain, on the same frozen 4-bit zoo-lm, the same batches and the same step budget: validation
loss curves of both adapters; the steps and wall-clock MoE-LoRA needs to reach the single LoRA's
final validation loss (paper: 2.5x fewer steps, ~1.2x wall-clock); the experts' share of routed
tokens; the gain of a second residual-boosting round over the first; and exact match on the
domain's test set for the base and for the boosted stacks. Prints a table, writes JSON and a PNG.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from server.chat.moe_lora import MoELoRAConfig, wrap_projections
from training.brainstacks.stacks import remove_last_stack, training_stacks
from server.manifest import BuiltManifest
from training.brainstacks.data import batches
from training.brainstacks.replies import exact_match
from training.brainstacks.boosting import BoostingConfig, train_round, validation_loss
from training.brainstacks.continual import load_base
from training.data.world import examples


@dataclass(frozen=True)
class MoEComparison:
    domains: tuple[str, ...] = ("math", "medical")
    steps: int = 500
    second_round_steps: int = 250
    moe: MoELoRAConfig = field(default_factory=MoELoRAConfig)  # 4 experts of rank 16
    single: MoELoRAConfig = MoELoRAConfig(experts=1, rank=64, alpha=64.0, top_k=1)  # one LoRA, rank 64
    boosting: BoostingConfig = BoostingConfig(eval_every=25, patience=10**9, spike=math.inf)  # full curves
    train_examples: int = 4000
    val_examples: int = 96
    test_examples: int = 100
    max_new_tokens: int = 40


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, loss in curve if loss <= target), None)


@torch.no_grad()
def expert_shares(model, val) -> list[float]:
    """Mean gate weight of each expert over the validation tokens, averaged over the projections."""
    for batch in val:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        break
    shares = [stacks[-1][1].last_routing.mean(0) for stacks in training_stacks(model).per_layer.values() if stacks]
    return torch.stack(shares).mean(0).tolist()


def compare_domain(manifests: BuiltManifest, domain: str, cmp: MoEComparison) -> dict:
    chat = load_base(manifests)
    model, tokenizer = chat.model, chat.tokenizer
    wrap_projections(model, cmp.moe.targets)
    train = examples(domain, "train", cmp.train_examples)
    val = batches(tokenizer, examples(domain, "val", cmp.val_examples), 32)
    test = examples(domain, "test", cmp.test_examples)
    base_loss = validation_loss(model, val)
    base_accuracy, _ = exact_match(model, tokenizer, test, max_new_tokens=cmp.max_new_tokens)

    runs = {}
    for name, adapter in (("single", cmp.single), ("moe", cmp.moe)):
        cfg = replace(cmp.boosting, stack=adapter)
        result, _ = train_round(model, tokenizer, domain, train, val, cfg, 0, base_loss, steps=cmp.steps)
        runs[name] = {"curve": result.curve, "final_loss": result.curve[-1][1], "best_loss": result.best_loss,
                      "seconds": result.seconds, "seconds_per_step": result.seconds / max(result.steps, 1),
                      "parameters": sum(p.numel() for stacks in training_stacks(model).per_layer.values()
                                        if stacks for p in stacks[-1][1].parameters())}
        if name == "moe":
            runs[name]["expert_shares"] = expert_shares(model, val)
        else:
            remove_last_stack(model, domain)  # the MoE stack trains on the bare base too

    # residual boosting: a second MoE round on top of the frozen first
    cfg = replace(cmp.boosting, stack=cmp.moe)
    second, _ = train_round(model, tokenizer, domain, train, val, cfg, 1, runs["moe"]["best_loss"],
                            steps=cmp.second_round_steps)
    stacks_accuracy, records = exact_match(model, tokenizer, test, max_new_tokens=cmp.max_new_tokens)

    target = runs["single"]["final_loss"]
    reach = steps_to_reach(runs["moe"]["curve"], target)
    moe_rate, single_rate = runs["moe"]["seconds_per_step"], runs["single"]["seconds_per_step"]
    return {
        "domain": domain, "base_val_loss": base_loss, **{f"{k}_run": v for k, v in runs.items()},
        "single_final_loss": target, "moe_steps_to_single_final": reach,
        "step_ratio": cmp.steps / reach if reach else None,
        "wallclock_ratio": (cmp.steps * single_rate) / (reach * moe_rate) if reach else None,
        "round2": {"start_loss": second.start_loss, "best_loss": second.best_loss, "gain": second.gain,
                   "curve": second.curve},
        "base_exact_match": base_accuracy, "stacks_exact_match": stacks_accuracy, "samples": records[:5],
    }


def format_table(rows: list[dict], cmp: MoEComparison) -> str:
    lines = [f"MoE-LoRA {cmp.moe.experts}x r{cmp.moe.rank} vs LoRA r{cmp.single.rank}, {cmp.steps} steps each "
             f"(paper: 2.5x fewer steps, ~1.2x wall-clock)",
             f"{'domain':<10}{'base loss':>10}{'LoRA final':>11}{'MoE final':>10}{'MoE steps to LoRA':>18}"
             f"{'steps x':>8}{'wall x':>8}{'round 2 gain':>13}{'EM base':>8}{'EM stacks':>10}  expert shares"]
    for r in rows:
        steps = r["moe_steps_to_single_final"]
        lines.append(
            f"{r['domain']:<10}{r['base_val_loss']:>10.4f}{r['single_final_loss']:>11.4f}"
            f"{r['moe_run']['final_loss']:>10.4f}{steps if steps else 'never':>18}"
            f"{(r['step_ratio'] or 0):>7.2f}x{(r['wallclock_ratio'] or 0):>7.2f}x{r['round2']['gain']:>13.4f}"
            f"{r['base_exact_match']:>8.2f}{r['stacks_exact_match']:>10.2f}  "
            + " ".join(f"{s:.2f}" for s in r["moe_run"]["expert_shares"]))
    return "\n".join(lines)


def save_curves(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 3.6), squeeze=False)
    for ax, r in zip(axes[0], rows):
        for key, label in (("single_run", "LoRA r64"), ("moe_run", "MoE-LoRA 4x r16")):
            steps, losses = zip(*r[key]["curve"])
            ax.plot(steps, losses, label=label)
        offset = r["moe_run"]["curve"][-1][0]
        steps, losses = zip(*r["round2"]["curve"])
        ax.plot([offset + s for s in steps], losses, label="MoE round 2 (boosting)")
        ax.axhline(r["single_final_loss"], color="grey", lw=0.8, ls=":")
        ax.set(title=r["domain"], xlabel="step", ylabel="validation loss (reply tokens)", yscale="log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_moe_lora_eval(manifests: BuiltManifest, out_dir: Path, cmp: MoEComparison = MoEComparison()) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = [compare_domain(manifests, domain, cmp) for domain in cmp.domains]
    report = {"comparison": asdict(cmp), "machine": f"{torch.get_num_threads()} torch threads, CPU",
              "seconds": time.perf_counter() - started, "domains": rows}
    (out_dir / "moe_lora.json").write_text(json.dumps(report, indent=1, default=str))
    save_curves(out_dir / "moe_lora.png", rows)
    print(format_table(rows, cmp))
    print(f"wrote {out_dir / 'moe_lora.json'} and {out_dir / 'moe_lora.png'}")
    return report
