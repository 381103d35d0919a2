"""The chat benchmarks run end to end on the tiny chat base and report what they claim to."""

from __future__ import annotations

import argparse

import pytest

from tests.conftest import built


def test_chat_precision_compares_nf4_with_float_in_the_same_run(manifest_path, monkeypatch):
    import bench.chat_precision as bench

    monkeypatch.setattr(bench, "PROMPTS", bench.PROMPTS[:3])
    report = bench.measure(built(manifest_path), "cpu", tokens=4, window=64)
    float_row, nf4 = report["rows"]["none"], report["rows"]["nf4"]
    assert float_row["top1_agreement"] == 1.0 and float_row["greedy"]["identical_answers"] == 3  # the baseline
    assert 0.0 <= nf4["top1_agreement"] <= 1.0 and nf4["weight_megabytes"] < float_row["weight_megabytes"]
    lo, hi = nf4["perplexity_interval"]
    assert lo <= nf4["perplexity"] <= hi
    assert "float" in bench.table(report) and report["text_tokens"] > 100


def test_stack_calibration_trains_one_stack_and_scores_held_out_phrasings(manifest_path):
    from bench.stack_calibration import calibrate, table
    from training.data.world import kinds_of

    args = argparse.Namespace(artifacts=manifest_path.parent, domain="math", math_steps="whole", experts=2, rank=4,
                              steps=2, batch=4, per_kind=2)
    row = calibrate(args)
    math = {k.name for k in kinds_of("math")}
    assert row["test_prompts"] == 2 * len(math) and row["adapter_parameters"] > 0 and 0 < row["adapter_to_base"]
    assert row["interval"][0] <= row["exact_match"] <= row["interval"][1]
    assert set(row["by_kind"]) == math
    assert all("Answer:" not in s["prompt"] for s in row["samples"])
    assert "math" in table([row])


def test_chat_speed_bench_measures_the_baseline_and_the_engine_in_one_run(manifest_path):
    from bench import chat as bench

    report = bench.measure(built(manifest_path), "cpu", tokens=3)
    rows = {(r["clients"], r["setting"]): r for r in report["rows"]}
    settings = ["transformers generate (baseline)", "engine, base", "engine, 1 domain"]
    assert set(rows) == {(c, s) for c in (1, 8) for s in settings}
    for clients in (1, 8):
        baseline, engine = rows[clients, settings[0]], rows[clients, settings[1]]
        assert baseline["vs_baseline"] == 1.0 and engine["tokens_per_s"] > 0
        # greedy, same model, same prompts: the engine and generate (left-padded at 8) end alike
        assert engine["tokens"] == baseline["tokens"] and baseline["requests"] == len(bench.PROMPTS)
    assert report["router"] is None and report["multiply_adds"]["base"] > 0
    batching = report["batching"]
    assert batching["step_s_1_row"] > 0 and batching["ceiling_8_clients"] == pytest.approx(
        8 * batching["step_s_1_row"] / batching["step_s_8_rows"])
    assert "8 clients can gain at most" in bench.table(report)


def test_cross_domain_bench_composes_two_domains_every_way(manifest_path):
    from dataclasses import replace

    import torch

    from bench.cross_domain import WEIGHT_PAIRS, first_part, measure, score, table
    from server.chat.moe_lora import MoELoRAConfig
    from training.brainstacks.stacks import add_stack, freeze
    from training.brainstacks.continual import load_base
    from training.data.world import held_out

    chat = load_base(built(manifest_path))
    torch.manual_seed(0)
    for domain in ("chat", "math"):
        stacks = add_stack(chat.model, domain, MoELoRAConfig(experts=2, rank=4, alpha=4.0))
        for stack in stacks:
            torch.nn.init.normal_(stack.lora_B, std=0.3)
        freeze(stacks)
    chat.domains = ("chat", "math")
    items = held_out("cross", "val", 2)  # medical, code and reasoning have no stacks here: skipped
    asked = [replace(e, domain="cross:chat+math", kind="sum") for e in items if e.kind == "program-sum"]
    report = measure(chat, items + asked, max_new_tokens=6)
    assert list(report) == ["sum"] and report["sum"]["domains"] == ["chat", "math"]
    routes = report["sum"]["routes"]
    assert len(routes) == 4 + len(WEIGHT_PAIRS)
    assert routes["math alone"]["sample"] != routes["base alone (baseline)"]["sample"]  # the stacks act
    assert routes["chat then math"]["sample"].startswith(first_part(routes["chat alone"]["sample"]))
    for row in routes.values():
        assert row["n"] == 2 and row["interval"][0] <= row["exact_match"] <= row["interval"][1]
    assert "sum" in table(report) and "vs base" in table(report)

    graded = score(["6 * 7 = 42. Answer: 42", "Answer: 7"], [replace(asked[0], final="42"), replace(asked[1], final="8")])
    assert graded["correct"] == 1 and graded["exact_match"] == 0.5


def test_outside_prompts_ask_auto_against_the_base_alone(tmp_path):
    from bench.outside_prompts import measure, table
    from training.brainstacks.continual import load_for_training
    from training.zoo.chat import MICRO_CHAT, build_chat_zoo

    from tests.conftest import ZOO_LM_TEMPLATE
    from training.artifacts import open_manifest

    manifests = open_manifest(tmp_path / "zoo", ZOO_LM_TEMPLATE)
    build_chat_zoo(manifests, MICRO_CHAT, runs_dir=tmp_path / "runs")  # chat and math
    chat = load_for_training(manifests.read().chat, manifests, "cpu")
    asked = {"math": [("What is 2 plus 3?", "5"), ("Add 4 and 4.", "8")], "code": [("len([1])?", "1")]}
    with chat.mounted({}):
        report = measure(chat, asked, ["Hello!", "Tell me a joke."], max_new_tokens=4, everyday_tokens=4)
    assert list(report["domains"]) == ["math"]  # code has no stacks in this zoo: not asked
    row = report["domains"]["math"]
    assert row["auto"]["n"] == row["base"]["n"] == 2 and len(row["replies"]) == 2
    for reply in row["replies"]:  # each under its own route; the base's is the stacks-off reply
        assert set(reply["route"]) <= {"chat", "math"}
    kept = report["everyday"]["kept"]
    # regression guard: a prompt the router leaves alone gets the base's own reply (the same cached generation)
    assert kept["n"] == 2 and kept["correct"] + len(report["everyday"]["sent_to_a_domain"]) >= 2
    assert "everyday prompts keeping" in table(report)


def test_structured_bench_sets_a_schema_against_text_in_one_run(manifest_path):
    from bench import structured as bench

    report = bench.measure(built(manifest_path), "cpu", tokens=4, chars=6, rounds=1, repeat=2)
    rows = {(r["clients"], r["setting"]): r for r in report["rows"]}
    assert set(rows) == {(1, "text"), (1, "schema"), (8, "text"), (8, "schema"), (8, "mixed")}
    for (clients, setting), row in rows.items():
        assert row["tokens_per_s"] > 0 and (row["vs_text"] == 1.0) == (setting == "text")
        constrained = {"text": 0, "schema": len(bench.PROMPTS), "mixed": len(bench.PROMPTS) // 2}[setting]
        constrained *= 2 if clients == 8 else 1
        assert row["constrained"] == constrained and row["valid"] == row["complete"]  # every whole document valid
        assert row["complete"] >= constrained // 2  # most finish within their budget, even on a random model
    assert rows[1, "text"]["tokens"] == 4 * len(bench.PROMPTS)
    assert "valid / complete" in bench.table(report)
