"""`python -m training eval domain --domain NAME --data test.jsonl`: what a user's domain does on its
held-out conversations, and what it costs the others.

On the test conversations (those also in the domain's training data are dropped and counted), for
the base alone, the domain alone and "auto": exact match of the reply where the reference answer is
short (at most SHORT_ANSWER_WORDS words; case, spacing and end punctuation aside), with Wilson 95%
intervals, and always the per-token loss of the reference answer (mean, 95% interval). Then the
router's share of the test prompts sent to the domain, the share of the world's general prompts
left with no domain, and forgetting on the world's domains under "auto": each held-out test prompt
answered under its own domain alone (the answer at freeze) and under the router's route with the
new library, paired per prompt (McNemar), pooled and per domain.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from server.manifest import BuiltManifest
from training.artifacts import machine, runs_folder
from training.brainstacks.continual import load_for_training
from training.data.chat_jsonl import DomainExample, read_conversations
from training.data.world import DOMAINS, held_out
from training.eval.brainstacks import BrainstacksEval, paired, proportion, run_routes


@dataclass(frozen=True)
class DomainEval:
    forgetting_per_kind: int = 15  # per task kind of each world domain: 300+ prompts pooled over five
    general_per_family: int = 16  # held-out everyday prompts of each of the six families
    batch_size: int = 32
    max_new_tokens: int = 176  # a cap: each set generates its longest reference plus 16 tokens


def mean_interval(values: list[float]) -> dict:
    n = len(values)
    mean = statistics.fmean(values) if values else float("nan")
    half = 1.96 * statistics.stdev(values) / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "interval": [mean - half, mean + half], "n": n}


def domain_test_set(manifests: BuiltManifest, domain: str, path: Path) -> tuple[list[DomainExample], int]:
    """The test conversations as examples, without those the domain trained on; how many were dropped."""
    entry = next((d for d in manifests.read().chat.domains if d.name == domain), None)
    if entry is None:
        raise SystemExit(f"no domain {domain!r} in {manifests.path}: `training stacks add` first")
    conversations, _ = read_conversations(path)
    trained = set()
    if entry.data is not None:
        trained = {c.key() for c in read_conversations(manifests.file(entry.data.path))[0]}
    kept = [c for c in conversations if c.key() not in trained]
    if not kept:
        raise SystemExit(f"{path}: every test conversation is also in {domain!r}'s training data")
    return [DomainExample(domain, c) for c in kept], len(conversations) - len(kept)


def auto_routes(chat, items) -> list[dict]:
    if chat.router is None:
        return [{} for _ in items]
    domains = chat.router.config.domains
    return [chat.router.route(torch.tensor([p[d] for d in domains]))[0]
            for p in (chat.router_probabilities(e.messages()) for e in items)]


def evaluate_domain(manifests: BuiltManifest, domain: str, test_path: Path, cfg: DomainEval = DomainEval(),
                    device: str = "cpu") -> dict:
    started = time.perf_counter()
    items, dropped = domain_test_set(manifests, domain, test_path)
    chat = load_for_training(manifests.read().chat, manifests, device)
    runner = BrainstacksEval(batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens)
    cache: dict = {}
    report = {"domain": domain, "base": chat.name, "test": len(items), "dropped_as_trained": dropped,
              "short_answers": sum(e.short for e in items), "settings": {}}
    with chat.mounted({}):
        routes = auto_routes(chat, items)
        for setting, setting_routes in {"base": [{}] * len(items), "domain": [{domain: 1.0}] * len(items),
                                        "auto": routes}.items():
            losses, replies = run_routes(chat, items, setting_routes, runner, cache)
            short = [e.matches(r) for e, r in zip(items, replies) if e.short]
            report["settings"][setting] = {"exact_match": proportion(short) if short else None,
                                           "answer_loss": mean_interval(losses),
                                           "examples": [{"prompt": e.messages()[-1]["content"], "expected": e.answer,
                                                         "reply": r} for e, r in list(zip(items, replies))[:4]]}
        sent = [domain in r for r in routes]
        report["router_sent_to_domain"] = {**proportion(sent), "share": sum(sent) / len(sent)}
        general = held_out("general", "test", cfg.general_per_family)
        left = [not r for r in auto_routes(chat, general)]
        report["general_no_domain"] = {**proportion(left), "share": sum(left) / len(left)}
        report["forgetting"] = world_forgetting(chat, cfg, runner, cache)
    report.update(machine=machine(device), seconds=time.perf_counter() - started, config=asdict(cfg))
    return report


def world_forgetting(chat, cfg: DomainEval, runner: BrainstacksEval, cache: dict) -> dict:
    rows, pooled_before, pooled_after = {}, [], []
    for domain in [d for d in chat.domains if d in DOMAINS]:
        items = held_out(domain, "test", cfg.forgetting_per_kind)
        _, at_freeze = run_routes(chat, items, [{domain: 1.0}] * len(items), runner, cache)
        _, routed_replies = run_routes(chat, items, auto_routes(chat, items), runner, cache)
        before, after = [e.matches(r) for e, r in zip(items, at_freeze)], [e.matches(r) for e, r in zip(items, routed_replies)]
        rows[domain] = paired(before, after)
        pooled_before += before
        pooled_after += after
    return {"per_domain": rows, "pooled": paired(pooled_before, pooled_after) if pooled_before else None}


def format_report(report: dict) -> str:
    lines = [f"{report['domain']} on {report['base']}: {report['test']} test conversations "
             f"({report['short_answers']} with short answers; {report['dropped_as_trained']} dropped as trained)",
             f"{'setting':<8}{'exact match [95%]':>26}{'answer loss [95%]':>26}"]
    for setting, row in report["settings"].items():
        em = row["exact_match"]
        em_text = "-" if em is None else f"{em['exact_match']:.2f} [{em['interval'][0]:.2f}, {em['interval'][1]:.2f}]"
        loss = row["answer_loss"]
        lines.append(f"{setting:<8}{em_text:>26}{loss['mean']:>12.3f} [{loss['interval'][0]:.3f}, {loss['interval'][1]:.3f}]")
    sent, left = report["router_sent_to_domain"], report["general_no_domain"]
    lines.append(f"router: {sent['correct']}/{sent['n']} test prompts sent to {report['domain']} ({sent['share']:.2f}); "
                 f"{left['correct']}/{left['n']} general prompts left with no domain ({left['share']:.2f})")
    pooled = report["forgetting"]["pooled"]
    if pooled:
        lines.append(f"forgetting under auto (world domains, at freeze -> routed): {pooled['before']:.3f} -> "
                     f"{pooled['after']:.3f}, change {pooled['change']:+.3f} [{pooled['change_interval'][0]:+.3f}, "
                     f"{pooled['change_interval'][1]:+.3f}], McNemar p = {pooled['p_value']:.3f}, n = {pooled['n']}")
    return "\n".join(lines)


def run_domain_eval(manifests: BuiltManifest, domain: str, test_path: Path, out_dir: Path | None = None,
                    device: str = "cpu", cfg: DomainEval = DomainEval()) -> dict:
    report = evaluate_domain(manifests, domain, test_path, cfg, device)
    out_dir = out_dir or runs_folder(manifests) / "eval" / domain
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "domain.json").write_text(json.dumps(report, indent=1, default=str))
    print(format_report(report))
    print(f"wrote {out_dir / 'domain.json'} ({report['seconds'] / 60:.1f} min on {report['machine']})")
    return report
