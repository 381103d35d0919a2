"""The meta-router (Brainstacks §3.6): outcome discovery, gating and weighting, its artifact, and
what its training learns from general and labelled prompts, at micro scale."""

from __future__ import annotations

from dataclasses import asdict, replace

import pytest
import torch

from server.artifacts import save_with_config
from server.chat.moe_lora import MoELoRAConfig, stacked_projections
from server.chat.router import MetaRouter, RouterConfig, load_router, save_router
from tests.conftest import built
from training.brainstacks.continual import load_base
from training.brainstacks.router_training import greedy_selection
from training.brainstacks.stacks import add_stack, freeze
from training.data.world import examples, held_out, kinds_of


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
    for domain in domains:  # random frozen stacks, large enough to move the loss either way and small
        # enough that two or three of them together are sometimes best
        stacks = add_stack(chat.model, domain, config)
        for stack in stacks:
            torch.nn.init.normal_(stack.lora_B, std=0.1)
        freeze(stacks)
    items = [e for d in domains for e in examples(d, "train", 4)]
    tables = loss_tables(chat.model, chat.tokenizer, items, domains, batch_size=8)
    walks = {}
    for margin in (0.0, 0.05):
        walks[margin] = [greedy_selection(t, domains, margin) for t in tables]
        assert discovered_routes(chat.model, chat.tokenizer, items, domains, margin, batch_size=8) == walks[margin]
    assert len(set(walks[0.05])) > 1  # the stacks really change which route is best
    assert max(len(c) for c in walks[0.0]) > 1  # some walks go on past their first domain
    capped = discovered_routes(chat.model, chat.tokenizer, items, domains, 0.0, batch_size=8, max_domains=1)
    first_steps = []
    for t in tables:
        loss, best = min((t[frozenset({d})], d) for d in domains)
        first_steps.append((best,) if t[frozenset()] - loss > 0.0 else ())
    assert capped == first_steps  # the walk stops after its first domain


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
    top = MetaRouter(replace(router.config, weighting="top", floor_domain=None))
    weights, gated = top.route(torch.tensor([0.4, 0.8, 0.05]))  # the most probable at 1, the others relative
    assert weights == {"chat": pytest.approx(0.5), "math": 1.0} and set(gated) == {"medical"}


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_router_round_trips(tmp_path, pooling):
    torch.manual_seed(0)
    router = MetaRouter(RouterConfig(domains=("chat", "math"), hidden_size=16, middle_layer=1, pooling=pooling)).eval()
    states, mask = torch.randn(3, 5, 16), torch.ones(3, 5, dtype=torch.long)
    mask[0, 3:] = 0
    save_router(tmp_path / "router.safetensors", router)
    loaded, _ = load_router(tmp_path / "router.safetensors")
    assert loaded.config.pooling == pooling
    assert torch.equal(loaded(states, mask), router(states, mask))
    changed = states.clone()
    changed[0, 3:] = 100.0  # padding never reaches the pooled features
    assert torch.equal(router(changed, mask)[0], router(states, mask)[0])
    assert not torch.allclose(router(changed, torch.ones_like(mask))[0], router(states, mask)[0])
    with pytest.raises(ValueError, match="pooling"):
        MetaRouter(replace(router.config, pooling="max"))


def test_a_router_saved_before_pooling_was_configurable_loads_as_attention(tmp_path):
    torch.manual_seed(0)
    router = MetaRouter(RouterConfig(domains=("chat", "math"), hidden_size=16, middle_layer=1, pooling="attention"))
    config = {k: v for k, v in asdict(router.config).items() if k != "pooling"}
    save_with_config(tmp_path / "router.safetensors", router.state_dict(), "meta_router", {"config": config})
    loaded, _ = load_router(tmp_path / "router.safetensors")
    states, mask = torch.randn(2, 4, 16), torch.ones(2, 4, dtype=torch.long)
    assert loaded.config.pooling == "attention" and torch.equal(loaded(states, mask), router.eval()(states, mask))


def test_general_prompts_teach_the_router_to_leave_the_base_alone(manifest_path, monkeypatch):
    from training.brainstacks import router_training
    from training.brainstacks.router_training import RouterTraining, choose_gate_threshold, train_router

    chat = load_base(built(manifest_path))
    domains = ("chat", "math")
    # the outcome every math answer discovered: its own domain (the stacks are not what this tests)
    monkeypatch.setattr(router_training, "discovered_routes", lambda m, t, items, *a, **k: [("math",)] * len(items))
    config = chat.model.config
    # the kinds this test was written on: two-step arithmetic and the everyday family
    math_kinds = [k for k in kinds_of("math") if k.name in ("add-subtract", "multiply-add")]
    everyday = kinds_of("general")[:1]
    math_validation = held_out("math", "val", 3, kinds=math_kinds)
    general_validation = held_out("general", "val", 8, kinds=everyday)
    validation = math_validation + general_validation
    router, report = train_router(
        chat.model, chat.tokenizer, examples("math", "train", 24, kinds=math_kinds), domains,
        RouterTraining(epochs=40, batch_size=8, lr=1e-2), middle_layer=1, hidden_size=config.hidden_size,
        general=examples("general", "train", 24, kinds=everyday), validation=validation)
    assert report["general_prompts"] == 24 and router.config.floor_domain is None
    # the gate threshold: the best-scoring candidate on the validation prompts (ties: the lowest)
    table = report["gate_threshold_validation"]
    assert [row["threshold"] for row in table] == list(RouterTraining().gate_thresholds)
    best = max(row["score"] for row in table)
    assert router.config.gate_threshold == min(row["threshold"] for row in table if row["score"] == best)
    assert table[0]["domain_prompts"] == len(math_validation) and table[0]["general_prompts"] == len(general_validation)
    # a router whose every probability is 0.35 applies both domains under 0.3 (every route wrong)
    # and none from 0.4 (general prompts right, domain prompts wrong): 0.4 is the lowest best
    flat = MetaRouter(replace(router.config, gate_threshold=0.12))
    torch.nn.init.zeros_(flat.mlp[-1].weight)
    torch.nn.init.constant_(flat.mlp[-1].bias, torch.logit(torch.tensor(0.35)).item())
    threshold, flat_table = choose_gate_threshold(flat, chat.model, chat.tokenizer, validation, (0.2, 0.3, 0.4, 0.5))
    assert threshold == 0.4 and [row["score"] for row in flat_table] == [0.0, 0.0, 0.5, 0.5]

    def math_probability(items):
        ids = [chat.encode(e.messages()) for e in items]
        return [router.probabilities(chat.model, i, torch.ones_like(i))[0, 1].item() for i in ids]

    held_out_general = math_probability(held_out("general", "test", 8, kinds=everyday))
    held_out_math = math_probability(held_out("math", "test", 4, kinds=math_kinds))
    assert max(held_out_general) < min(held_out_math)  # on phrasings neither set was trained on


def test_labelled_examples_teach_their_own_domain_without_discovery(manifest_path, monkeypatch):
    from training.brainstacks import router_training
    from training.brainstacks.router_training import RouterTraining, train_router

    chat = load_base(built(manifest_path))
    calls = []

    def nothing_discovered(m, t, items, *a, **k):  # discovery runs on the discovered items alone
        calls.append(len(items))
        return [()] * len(items)

    monkeypatch.setattr(router_training, "discovered_routes", nothing_discovered)
    config = chat.model.config

    math_kinds = [k for k in kinds_of("math") if k.name in ("add-subtract", "multiply-add")]  # as written

    def math_probability(labelled):
        torch.manual_seed(0)
        router, report = train_router(
            chat.model, chat.tokenizer, examples("math", "train", 8, kinds=math_kinds), ("chat", "math"),
            RouterTraining(epochs=40, batch_size=8, lr=1e-2), middle_layer=1, hidden_size=config.hidden_size,
            general=examples("general", "train", 24, kinds=kinds_of("general")[:1]), labelled=labelled)
        assert report["labelled_prompts"] == len(labelled)
        ids = [chat.encode(e.messages()) for e in held_out("math", "test", 4, kinds=math_kinds)]
        return min(router.probabilities(chat.model, i, torch.ones_like(i))[0, 1].item() for i in ids)

    # discovered targets alone put math at 0.2 (the label's share); labelled math prompts at 1
    assert math_probability([]) < 0.5 < math_probability(examples("math", "train", 24, seed=3, kinds=math_kinds))
    assert calls == [8, 8]


def test_the_weighting_is_chosen_by_what_it_serves_on_validation_prompts(manifest_path, monkeypatch):
    from training.brainstacks import router_training

    chat = load_base(built(manifest_path))
    router = MetaRouter(RouterConfig(domains=("chat", "math"), hidden_size=chat.model.config.hidden_size,
                                     middle_layer=1, floor_domain=None))
    torch.nn.init.zeros_(router.mlp[-1].weight)  # every prompt: both domains at probability 0.6
    torch.nn.init.constant_(router.mlp[-1].bias, torch.logit(torch.tensor(0.6)).item())
    projections = stacked_projections(chat.model)
    generated = []

    def replies(model, tokenizer, items, max_new_tokens, batch_size):
        # a stand-in for the stacks: a domain prompt is answered right only with math at weight 1; any
        # domain on changes a general prompt's answer
        route = projections.route
        rows = []
        for row, item in enumerate(items):
            weights = {d: float(w[row]) for d, w in route.items()}
            generated.append((item.prompt, tuple(sorted(weights.items()))))
            if item.domain == "math":
                rows.append(f"Answer: {item.final}" if weights.get("math") == 1.0 else "Answer: ?")
            else:
                rows.append("changed" if any(weights.values()) else "the base's answer")
        return rows

    monkeypatch.setattr(router_training, "generate_replies", replies)
    validation = held_out("math", "val", 2) + held_out("general", "val", 3)
    chosen, table = router_training.choose_weighting(router, chat.model, chat.tokenizer, validation,
                                                     ("probability", "top", "gate"), batch_size=4)
    scores = {row["weighting"]: (row["domain_exact_match"], row["general_as_base"]) for row in table}
    assert scores == {"probability": (0.0, 0.0), "top": (1.0, 0.0), "gate": (1.0, 0.0)}
    assert chosen == "top"  # tied with gate: the earlier candidate
    maths, general = sum(e.domain == "math" for e in validation), sum(e.domain == "general" for e in validation)
    # each (prompt, route) once: math prompts at 0.6 and at 1; general prompts also with the base alone
    assert len(generated) == len(set(generated)) == 2 * maths + 3 * general
