"""Continual domains, null-space projection and the meta-router, at micro scale."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from fastapi.testclient import TestClient

from server.app import create_app
from server.chat.model import ChatJob, load_chat
from server.chat.moe_lora import MoELoRAConfig, add_stack, freeze, routed, wrapped_layers
from server.chat.router import MetaRouter, RouterConfig, load_router, save_router
from server.manifest import load_manifest
from tests.conftest import ZOO_LM_TEMPLATE, built, make_settings
from training.artifacts import open_manifest
from training.brainstacks.continual import MICRO_CHAT, domain_data, load_base, run_continual
from training.brainstacks.data import batches
from training.brainstacks.nullspace import NullSpaceConfig, claimed_bases, collect_deltas
from training.brainstacks.router_training import greedy_selection
from training.data.world import examples, held_out
from training.zoo.chat import build_chat_zoo


def test_greedy_selection_follows_the_outcome_rule():
    domains = ("chat", "math", "medical")
    f = frozenset
    table = {f(): 2.0, f({"chat"}): 1.9, f({"math"}): 1.5, f({"medical"}): 1.2,
             f({"medical", "chat"}): 1.195, f({"medical", "math"}): 0.9, f({"chat", "math"}): 1.4,
             f({"chat", "math", "medical"}): 0.895}
    # medical alone is best (1.2); adding math drops 0.3 > margin; adding chat then drops 0.005 <= margin
    assert greedy_selection(table, domains, margin=0.01) == ("math", "medical")
    assert greedy_selection(table, domains, margin=0.001) == ("chat", "math", "medical")
    assert greedy_selection({**table, f({"medical"}): 1.995, f({"math"}): 1.999, f({"chat"}): 1.991},
                            domains, margin=0.01) == ()


def test_router_targets_score_only_the_greedy_walk_and_agree_with_the_full_table(manifest_path):
    from training.brainstacks.router_training import discovered_routes, loss_tables

    chat = load_base(built(manifest_path))
    config = MoELoRAConfig(experts=2, rank=4, alpha=4.0)
    domains = ("chat", "math", "medical")
    torch.manual_seed(0)
    for domain in domains:  # random frozen stacks, large enough to move the loss either way
        stacks = add_stack(chat.model, domain, config)
        for stack in stacks:
            torch.nn.init.normal_(stack.lora_B, std=0.3)
        freeze(stacks)
    items = [e for d in domains for e in examples(d, "train", 4)]
    tables = loss_tables(chat.model, chat.tokenizer, items, domains, batch_size=8)
    for margin in (0.0, 0.05):
        full = [greedy_selection(t, domains, margin) for t in tables]
        assert discovered_routes(chat.model, chat.tokenizer, items, domains, margin, batch_size=8) == full
    assert len({c for c in full}) > 1  # the stacks really change which route is best


def test_gating_respects_the_chat_floor_and_the_threshold():
    gate = MetaRouter(RouterConfig(domains=("chat", "math", "medical"), hidden_size=8, middle_layer=1))
    weights, gated = gate.route(torch.tensor([0.05, 0.12, 0.7]))
    assert weights == {"chat": 1.0, "medical": 1.0} and set(gated) == {"math"}
    router = MetaRouter(RouterConfig(domains=("chat", "math", "medical"), hidden_size=8, middle_layer=1,
                                     weighting="probability"))
    weights, gated = router.route(torch.tensor([0.05, 0.12, 0.7]))
    assert weights == {"chat": 0.2, "medical": pytest.approx(0.7)}
    assert set(gated) == {"math"} and "0.120 <= gate threshold 0.12" in gated["math"]
    with pytest.raises(ValueError, match="weighting"):
        MetaRouter(RouterConfig(domains=("chat",), hidden_size=8, middle_layer=1, weighting="probabilities"))
    weights, _ = router.route(torch.tensor([0.9, 0.13, 0.0]))
    assert weights == {"chat": pytest.approx(0.9), "math": pytest.approx(0.13)}


def test_router_round_trips(tmp_path):
    torch.manual_seed(0)
    router = MetaRouter(RouterConfig(domains=("chat", "math"), hidden_size=16, middle_layer=1)).eval()
    states, mask = torch.randn(3, 5, 16), torch.ones(3, 5, dtype=torch.long)
    mask[0, 3:] = 0
    save_router(tmp_path / "router.safetensors", router)
    loaded, _ = load_router(tmp_path / "router.safetensors")
    assert torch.equal(loaded(states, mask), router(states, mask))
    changed = states.clone()
    changed[0, 3:] = 100.0  # padding never reaches the pooled features
    assert torch.equal(router(changed, mask)[0], router(states, mask)[0])


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
    bases = claimed_bases(model, prompts, ["chat"], cfg)
    new = add_stack(model, "math", config, seed=1)
    for stack, v in zip(new, bases):
        torch.nn.init.normal_(stack.lora_B, std=0.3)
        stack.output_basis = v
    ps = [v @ v.T for v in bases]
    x_by_layer = collect_deltas(model, prompts, ["chat"], 64, torch.Generator().manual_seed(0))
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
    recipe = replace(MICRO_CHAT, domains=("chat", "math", "medical"))
    data = {d: domain_data(chat.tokenizer, d, recipe) for d in recipe.domains}
    out = run_continual(chat.model, chat.tokenizer, recipe, data)
    last_isolation, last_ungated = out["forgetting_isolation"][-1], out["forgetting_ungated"][-1]
    assert list(last_isolation) == ["chat", "math", "medical"]
    for domain, loss in out["post_freeze"].items():
        assert last_isolation[domain] == loss  # exactly: later stacks off is the model that was frozen
    assert last_ungated["chat"] != out["post_freeze"]["chat"]  # later stacks do touch chat when on
    assert [r["projection"] for r in out["domains"]] == [False, True, True]


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
    assert served.generate(job, trace["domains_applied"]).text == body["text"]
    assert served.answer(job).plan.weights == trace["domains_applied"]  # "auto" again: the same route

    again = build_chat_zoo(manifests, MICRO_CHAT, if_missing=True, runs_dir=tmp_path / "runs")
    assert again["base"] is None and again["domains"] == []


def test_brainstacks_eval_reports_every_setting(tmp_path, capsys):
    from training.eval.brainstacks import BrainstacksEval, run_brainstacks_eval

    manifests = open_manifest(tmp_path / "artifacts", ZOO_LM_TEMPLATE)
    build_chat_zoo(manifests, MICRO_CHAT, runs_dir=tmp_path / "runs")
    cfg = BrainstacksEval(test_examples=2, ablation=replace(MICRO_CHAT, router=None), max_new_tokens=4)
    report = run_brainstacks_eval(manifests, tmp_path / "eval", cfg)
    settings = report["served"]["settings"]
    assert set(settings) == {"chat", "math", "cross"}
    for row in settings.values():
        assert set(row) == {"base", "ungated", "routed", "routed_at_probability", "oracle"}
        assert row["oracle"]["loss"] <= min(row[s]["loss"] for s in ("base", "ungated")) + 1e-4
    assert set(report["served"]["router"]["top1"]) == {"chat", "math"}
    for key in ("with_projection", "without_projection", "reversed_order"):
        run = report["forgetting"][key]
        first = run["order"][0]
        assert run["forgetting_isolation"][-1][first] == run["post_freeze"][first]
    assert report["forgetting"]["reversed_order"]["order"] == ["math", "chat"]
    # reversed, math starts from the bare base; in the paper's order, on top of chat's stacks
    forgetting = report["forgetting"]
    assert forgetting["reversed_order"]["val_loss_before"]["math"] != forgetting["with_projection"]["val_loss_before"]["math"]
    assert "curriculum: paper order vs reversed" in capsys.readouterr().out
    assert (tmp_path / "eval" / "forgetting.png").is_file()


def test_general_prompts_teach_the_router_to_leave_the_base_alone(manifest_path, monkeypatch):
    from training.brainstacks import router_training
    from training.brainstacks.router_training import RouterTraining, train_router

    chat = load_base(built(manifest_path))
    domains = ("chat", "math")
    # the outcome every math answer discovered: its own domain (the stacks are not what this tests)
    monkeypatch.setattr(router_training, "discovered_routes", lambda m, t, items, *a, **k: [("math",)] * len(items))
    config = chat.model.config
    router, report = train_router(
        chat.model, chat.tokenizer, examples("math", "train", 24), domains,
        RouterTraining(epochs=40, batch_size=8, lr=1e-2), middle_layer=1, hidden_size=config.hidden_size,
        general=examples("general", "train", 24))
    assert report["general_prompts"] == 24 and router.config.floor_domain is None

    def math_probability(items):
        ids = [chat.encode(e.messages()) for e in items]
        return [router.probabilities(chat.model, i, torch.ones_like(i))[0, 1].item() for i in ids]

    held_out_general = math_probability(held_out("general", "test", 8))
    held_out_math = math_probability(held_out("math", "test", 4))
    assert max(held_out_general) < min(held_out_math)  # on phrasings neither set was trained on
