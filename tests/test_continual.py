"""Continual domains, null-space projection, the chat zoo built and served, and its evaluation, at
micro scale (the router's own tests: test_router_training.py)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from fastapi.testclient import TestClient

from server.app import create_app
from server.chat.decoding import ChatJob, generate
from server.chat.model import load_chat
from server.chat.moe_lora import MoELoRAConfig, batch_route, routed, wrapped_layers
from server.manifest import load_manifest
from tests.conftest import ZOO_LM_TEMPLATE, built, make_settings
from training.brainstacks.stacks import add_stack, freeze
from training.artifacts import open_manifest
from training.brainstacks.continual import domain_data, load_base, run_continual, with_variant
from training.brainstacks.data import batches
from training.brainstacks.boosting import validation_loss
from training.brainstacks.data import collate
from training.brainstacks.nullspace import NullSpaceConfig, claimed_bases, collect_deltas, collect_rows
from training.brainstacks.replies import generate_replies
from training.data.world import PROBE_PHRASINGS, examples, held_out, kinds_of
from training.zoo.chat import MICRO_CHAT, ChatZooRecipe, build_chat_zoo


def test_projector_removes_earlier_directions_also_after_folding(manifest_path):
    chat = load_base(built(manifest_path))
    model, tokenizer = chat.model, chat.tokenizer
    config = MoELoRAConfig(experts=4, rank=4, alpha=4.0)
    earlier = add_stack(model, "chat", config)
    torch.manual_seed(0)
    for stack in earlier:
        torch.nn.init.normal_(stack.lora_B, std=0.3)
    freeze(earlier)
    prompts = batches(tokenizer, examples("chat", "train", 8), 4)
    cfg = NullSpaceConfig(fraction=0.05, samples=64)
    bases = claimed_bases(model, prompts, ["chat"], cfg, config)
    new = add_stack(model, "math", config, seed=1)
    for stack, v in zip(new, bases.values()):
        torch.nn.init.normal_(stack.lora_B, std=0.3)
        stack.output_basis = v
    ps = [v @ v.T for v in bases.values()]
    x_by_layer = collect_deltas(model, prompts, ["chat"], 64, torch.Generator().manual_seed(0), config)
    for (name, layer), stack, p in zip(wrapped_layers(model).items(), new, ps):
        k = round(torch.trace(p).item())
        assert k == max(1, round(0.05 * layer.out_features))
        torch.testing.assert_close(p @ p, p, atol=1e-4, rtol=1e-4)  # an orthogonal projector
        x = torch.randn(10, layer.in_features)
        with torch.no_grad():
            delta = stack(x)
            assert (delta @ p).abs().max() < 1e-4 * max(1.0, delta.abs().max().item())
            freeze([stack])
            folded = stack(x)
        assert (folded @ p).abs().max() < 1e-4 * max(1.0, folded.abs().max().item())
        torch.testing.assert_close(folded, delta, atol=1e-5, rtol=1e-4)
        # the earlier domain's own deltas lie mostly inside the claimed directions
        earlier_rows = x_by_layer[name]
        assert (earlier_rows @ p).norm() > 0.3 * earlier_rows.norm()


def test_isolation_reproduces_the_post_freeze_loss_bit_for_bit(manifest_path):
    chat = load_base(built(manifest_path))
    recipe = with_variant(replace(MICRO_CHAT, domains=("chat", "math", "medical")), "output")
    data = {d: domain_data(chat.tokenizer, d, recipe) for d in recipe.domains}
    out = run_continual(chat.model, chat.tokenizer, recipe, data)
    last_isolation, last_ungated = out["forgetting_isolation"][-1], out["forgetting_ungated"][-1]
    assert list(last_isolation) == ["chat", "math", "medical"]
    for domain, loss in out["post_freeze"].items():
        assert last_isolation[domain] == loss  # exactly: later stacks off is the model that was frozen
    assert last_ungated["chat"] != out["post_freeze"]["chat"]  # later stacks do touch chat when on
    assert [r["projection"] for r in out["domains"]] == ["none", "output", "output"]


def test_input_side_projection_silences_a_new_stack_on_earlier_inputs_also_after_folding(manifest_path):
    chat = load_base(built(manifest_path))
    model, tokenizer = chat.model, chat.tokenizer
    config = MoELoRAConfig(experts=4, rank=4, alpha=4.0)
    freeze(add_stack(model, "chat", config))
    prompts = batches(tokenizer, examples("chat", "train", 8), 4)
    cfg = NullSpaceConfig(mode="input", fraction=0.05, samples=64)
    bases = claimed_bases(model, prompts, ["chat"], cfg, config)
    inputs = collect_rows(model, prompts, ["chat"], 64, torch.Generator().manual_seed(0), "input", config)
    new = add_stack(model, "math", config, seed=1)
    for (name, layer), stack, u in zip(wrapped_layers(model).items(), new, bases.values()):
        assert u.shape == (layer.in_features, max(1, round(0.05 * layer.in_features)))
        torch.nn.init.normal_(stack.lora_B, std=0.3)
        stack.input_basis = u
        inside = torch.randn(6, u.shape[1]) @ u.T  # inputs lying in the earlier domain's directions
        outside = torch.randn(6, layer.in_features)
        with torch.no_grad():
            assert stack(inside).abs().max() < 1e-4 * max(1.0, stack(outside).abs().max().item())
            before = stack(outside)
            freeze([stack])
            assert stack.input_basis is None
            torch.testing.assert_close(stack(outside), before, atol=1e-5, rtol=1e-4)  # folded into A
            assert stack(inside).abs().max() < 1e-4 * max(1.0, before.abs().max().item())
        # the earlier domain's inputs lie largely inside the claimed directions
        assert (inputs[name] @ u).norm() > 0.5 * inputs[name].norm()


def test_variants_set_how_domains_train_and_how_the_router_weights_them():
    # a regression guard on the defaults: the build trains on the base alone and serves probabilities
    for recipe in (ChatZooRecipe(), MICRO_CHAT, with_variant(with_variant(MICRO_CHAT, "input"), "base-alone")):
        assert not recipe.stacked and recipe.nullspace.mode == "off" and recipe.router.weighting == "probability"
    stacked = with_variant(ChatZooRecipe(), "input")
    assert stacked.stacked and stacked.nullspace.mode == "input" and stacked.router.weighting == "gate"
    with pytest.raises(ValueError, match="variant"):
        with_variant(MICRO_CHAT, "stacked")


def test_domains_trained_on_the_base_alone_start_from_the_base(manifest_path):
    chat = load_base(built(manifest_path))
    recipe = MICRO_CHAT
    data = {d: domain_data(chat.tokenizer, d, recipe) for d in recipe.domains}
    with routed(chat.model, {}):
        base_loss = validation_loss(chat.model, data["math"].val)
    out = run_continual(chat.model, chat.tokenizer, recipe, data)
    math = out["domains"][1]
    assert math["val_loss_before"] == base_loss  # chat's stacks were off while math trained
    assert math["projection"] == "none" and math["stacked"] is False
    # isolation is the domain alone: its frozen loss, reproduced exactly with chat off
    assert out["forgetting_isolation"][-1]["math"] == out["post_freeze"]["math"]
    with routed(chat.model, {"math": 1.0}):
        assert validation_loss(chat.model, data["math"].val) == out["post_freeze"]["math"]


def test_a_batch_of_mixed_routes_matches_each_route_alone(manifest_path):
    chat = load_base(built(manifest_path))
    model, tokenizer = chat.model, chat.tokenizer
    config = MoELoRAConfig(experts=2, rank=4, alpha=4.0)
    torch.manual_seed(0)
    for domain in ("chat", "math", "medical"):
        stacks = add_stack(model, domain, config)
        for stack in stacks:
            torch.nn.init.normal_(stack.lora_B, std=0.3)
        freeze(stacks)
    items = examples("math", "train", 5)
    routes = [{}, {"math": 1.0}, {"chat": 0.4, "medical": 1.0}, None, {"chat": 1.0, "math": 0.7, "medical": 0.2}]
    batch = collate(tokenizer, items)
    with torch.no_grad():
        with routed(model, batch_route(routes, ("chat", "math", "medical"))):
            mixed = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            replies = generate_replies(model, tokenizer, items, max_new_tokens=6)
        for row, route in enumerate(routes):
            with routed(model, route):
                alone = model(input_ids=batch.input_ids[row:row + 1], attention_mask=batch.attention_mask[row:row + 1]).logits
                assert generate_replies(model, tokenizer, items[row:row + 1], max_new_tokens=6) == [replies[row]]
            length = int(batch.attention_mask[row].sum())
            torch.testing.assert_close(mixed[row, :length], alone[0, :length], atol=1e-4, rtol=1e-4)
    assert len(set(replies)) > 1  # the routes really differ


def test_paired_statistics():
    from training.eval.statistics import mcnemar_p, paired_difference_interval

    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(5, 5) == 1.0
    assert mcnemar_p(0, 6) == pytest.approx(2 / 64)  # all six discordant pairs one way
    assert mcnemar_p(10, 1) == pytest.approx(2 * 12 / 2048)
    low, high = paired_difference_interval(lost=10, gained=1, n=100)
    assert low < -0.09 < high < 0 and high - low < 0.15


def test_micro_language_zoo_serves_routed_chat(tmp_path):
    manifests = open_manifest(tmp_path / "artifacts", ZOO_LM_TEMPLATE)
    summary = build_chat_zoo(manifests, MICRO_CHAT, runs_dir=tmp_path / "runs")
    chat = load_manifest(manifests.path).chat
    assert [d.name for d in chat.domains] == ["chat", "math"] and chat.router is not None
    assert summary["forgetting_isolation"][1]["chat"] == summary["post_freeze"]["chat"]
    assert (tmp_path / "runs" / "router.json").is_file() and not list(tmp_path.rglob(".*.tmp"))

    with TestClient(create_app(make_settings(manifests.path), load_in_background=False)) as c:
        body = c.post("/chat", json={"prompt": "Compute 23 + 45 - 12.", "max_tokens": 6}).json()
        metrics = c.get("/metrics").text
    trace = body["trace"]
    for domain in trace["domains_applied"]:
        assert f'loopstack_chat_domain_applied_total{{domain="{domain}",route="auto"}} 1.0' in metrics
    assert 'loopstack_chat_router_probability_count{domain="math"} 1.0' in metrics
    assert set(trace["router_probabilities"]) == {"chat", "math"}
    assert set(trace["domains_applied"]) | set(trace["gated_off"]) == {"chat", "math"}

    # the trace's weights are the ones applied: the same weights outside the server give the same text
    served = load_chat(chat, manifests.resolver(), "cpu")
    assert served.router.config.floor_domain is None  # no domain is forced on: general prompts get the base
    job = ChatJob([{"role": "user", "content": "Compute 23 + 45 - 12."}], 6, 0.0, 1.0, 0)
    assert generate(served, job, trace["domains_applied"]).text == body["text"]
    assert served.plan_route(job.route, job.messages).weights == trace["domains_applied"]  # "auto" again: the same route

    again = build_chat_zoo(manifests, MICRO_CHAT, if_missing=True, runs_dir=tmp_path / "runs")
    assert again["base"] is None and again["domains"] == []


def test_brainstacks_eval_reports_every_setting_and_compares_zoos(tmp_path, capsys):
    from training.eval.brainstacks import SETTINGS, BrainstacksEval, evaluate_zoo, run_brainstacks_eval

    served = open_manifest(tmp_path / "served", ZOO_LM_TEMPLATE)
    build_chat_zoo(served, MICRO_CHAT, runs_dir=tmp_path / "runs")
    stacked = open_manifest(tmp_path / "stacked", ZOO_LM_TEMPLATE)
    build_chat_zoo(stacked, with_variant(MICRO_CHAT, "output"), runs_dir=tmp_path / "runs-stacked")
    cfg = BrainstacksEval(per_kind=1, general_prompts=3, max_new_tokens=4, general_tokens=4, probe_per_phrasing=2)
    report = run_brainstacks_eval(served, tmp_path / "eval", cfg, compare={"stacked": stacked})
    zoo = report["zoos"]["served"]
    assert zoo["stacked"] is False and report["zoos"]["stacked"]["stacked"] is True
    for name, runs in (("served", "runs"), ("stacked", "runs-stacked")):  # the weighting the build chose
        router = report["zoos"][name]["router"]
        chosen = json.loads((tmp_path / runs / "router.json").read_text())["weighting"]
        assert router["weighting"] == chosen
        assert router["other_weighting"] == ("gate" if chosen == "probability" else "probability")
    assert set(zoo["settings"]) == {"chat", "math", "cross"}
    for name, row in zoo["settings"].items():
        assert set(SETTINGS) <= set(row)
        assert row["distinct_prompts"] == row["base"]["n"] == sum(row["kinds"].values())
        assert set(row["kinds"]) == {k.name for k in kinds_of(name)}  # stratified: every kind asked
        # outcome discovery only ever takes a step that lowers the answer loss by the margin
        assert row["oracle"]["loss"] <= row["base"]["loss"] + 1e-4
        assert row["oracle"]["loss"] <= row["ungated"]["loss"] + cfg.margin + 1e-4
        for s in SETTINGS:
            low, high = row[s]["interval"]
            assert 0 <= low <= row[s]["exact_match"] <= high <= 1
    assert zoo["general"]["n"] == len(held_out("general", "test", 3)) and 0 <= zoo["general"]["same_as_base"] <= 1
    assert set(zoo["general"]["families"]) == {k.name for k in kinds_of("general")}
    assert zoo["general"]["misrouted"]["n"] <= zoo["general"]["n"]
    for name in ("chat", "math"):  # held-out forms and phrasings apart, and the steps beyond the question
        forms = zoo["settings"][name]["by_form"]["routed"]
        assert forms["held_out_forms"]["n"] == 1 and forms["held_out_phrasings"]["n"] == len(kinds_of(name)) - 1
        extra = zoo["settings"][name]["extra_step"]
        assert 0 <= extra["exact_match"] <= 1
        assert extra["by_form"]["held_out_forms"]["n"] + extra["by_form"]["held_out_phrasings"]["n"] == extra["n"]
        by_kind = zoo["settings"][name]["by_kind"]
        assert set(by_kind) == {k.name for k in kinds_of(name)}
        assert sum(v["correct"] for v in by_kind.values()) == zoo["settings"][name]["routed"]["correct"]
    assert zoo["settings"]["math"]["single_operation"]["n"] == 3
    probes = zoo["router"]["probe_phrasings"]  # two prompts of each probe phrasing, every kind
    assert {d: p["n"] for d, p in probes.items()} == {
        d: 2 * sum(len(PROBE_PHRASINGS[k.name]) for k in kinds_of(d)) for d in ("chat", "math", "general")}
    for domain, p in probes.items():
        assert set(p["kinds"]) == {k.name for k in kinds_of(domain)}
        assert p["correct"] == round(sum(p["kinds"].values()) * p["n"] / len(p["kinds"]))
    forgetting = zoo["forgetting"]
    assert [(r["after_domain"], r["domain"]) for r in forgetting["rows"]] == [("math", "chat")]
    assert forgetting["pooled_after_last"]["after"] == zoo["settings"]["chat"]["routed"]["exact_match"]
    out = capsys.readouterr().out
    assert "routed exact match by zoo" in out and "pooled after the last domain" in out
    assert (tmp_path / "eval" / "brainstacks.png").is_file() and (tmp_path / "eval" / "brainstacks.json").is_file()

    # the oracle and the comparison settings run on the first prompts of each kind, the rest on all
    subsets = BrainstacksEval(per_kind=2, oracle_per_kind=1, comparison_per_kind=1, general_prompts=2,
                              max_new_tokens=4, general_tokens=4)
    for name, row in evaluate_zoo(served, subsets)["settings"].items():
        kinds = len(row["kinds"])
        assert row["base"]["n"] == row["routed"]["n"] == 2 * kinds
        assert row["ungated"]["n"] == row["routed_other_weighting"]["n"] == row["oracle"]["n"] == kinds
        assert len(row["examples"]) == kinds and all(set(e) >= {"prompt", "expected", "routed"} for e in row["examples"])


def test_eval_generates_each_prompt_and_route_once_and_reuses_it(tmp_path):
    from training.eval.brainstacks import BrainstacksEval, load_zoo, run_routes

    served = open_manifest(tmp_path / "served", ZOO_LM_TEMPLATE)
    build_chat_zoo(served, MICRO_CHAT, runs_dir=tmp_path / "runs")
    chat = load_zoo(served, "cpu")
    cfg = BrainstacksEval(max_new_tokens=5)
    items = examples("math", "test", 3)
    routes = [{"math": 1.0}, {}, {"chat": 1.0, "math": 0.5}]
    cache: dict = {}
    with chat.mounted({}):
        losses, replies = run_routes(chat, items, routes, cfg, cache)
        assert len(cache) == 3
        assert run_routes(chat, items, routes, cfg, cache) == (losses, replies) and len(cache) == 3
        _, changed = run_routes(chat, items, [{"math": 1.0}, {"chat": 1.0}, {"chat": 1.0, "math": 0.5}], cfg, cache)
        assert len(cache) == 4 and changed[0] == replies[0] and changed[2] == replies[2]
        for item, route, reply in zip(items, routes, replies):  # a cached reply is the route's own reply
            with routed(chat.model, route):
                assert generate_replies(chat.model, chat.tokenizer, [item], max_new_tokens=5) == [reply]
