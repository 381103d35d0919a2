"""MoE-LoRA stacks over the 4-bit base: the properties Brainstacks' claims rest on."""

from __future__ import annotations

import pytest
import torch

from server.chat.model import load_chat_base
from server.chat.moe_lora import (
    MoELoRA, MoELoRAConfig, add_stack, aux_loss, disable_cpu_weight_packing, freeze, load_stack, remove_last_stack,
    routed, save_stack, stack_modules, wrap_projections, wrapped_layers,
)
from server.chat.stacks import load_domain_stacks, mounted
from server.manifest import ArtifactResolver, load_manifest
from server.artifacts import ArtifactError

SMALL = MoELoRAConfig(experts=4, rank=4, alpha=4.0)


@pytest.fixture()
def lm(manifest_path):
    manifest = load_manifest(manifest_path)
    resolver = ArtifactResolver(manifest_path.parent)
    model = load_chat_base(manifest.chat.base, resolver, "cpu").model
    disable_cpu_weight_packing(model)
    return model


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 60, (2, 10), generator=torch.Generator().manual_seed(seed))


def train_steps(model, stacks, steps: int = 3) -> None:
    optimizer = torch.optim.AdamW([p for s in stacks for p in s.parameters()], lr=1e-2)
    for step in range(steps):
        for s in stacks:
            s.train()
        ids = tokens(step)
        loss = model(input_ids=ids, labels=ids).loss + 0.01 * aux_loss(stacks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_a_new_stack_wraps_all_seven_projections_and_is_an_exact_no_op(lm):
    ids = tokens()
    with torch.no_grad():
        before = lm(input_ids=ids).logits
    stacks = add_stack(lm, "math", SMALL)
    assert len(stacks) == 2 * 7 and len(wrapped_layers(lm)) == 14
    assert all(torch.count_nonzero(s.lora_B) == 0 and s.lora_A.abs().sum() > 0 for s in stacks)
    with torch.no_grad():
        assert torch.equal(lm(input_ids=ids).logits, before)


def test_top2_gates_sum_to_one_and_noise_is_only_on_in_training():
    stack = MoELoRA(32, 64, SMALL)
    torch.nn.init.normal_(stack.noise.weight, std=1.0)  # trained noise weights are non-zero
    x = torch.randn(50, 32)
    stack.eval()
    gates = stack.gates(x)
    assert torch.allclose(gates.sum(-1), torch.ones(50))
    assert ((gates > 0).sum(-1) == 2).all()
    assert torch.equal(gates, stack.gates(x))  # no noise in eval
    stack.train()
    assert not torch.equal(stack.gates(x), stack.gates(x))


def test_aux_loss_gradient_reaches_the_router():
    stack = MoELoRA(32, 64, SMALL).train()
    stack(torch.randn(40, 32))
    aux = aux_loss([stack])
    assert aux.requires_grad
    aux.backward()
    assert stack.router.weight.grad is not None and stack.router.weight.grad.abs().sum() > 0
    assert stack.lora_B.grad is None  # the balance loss trains only the router


def test_4bit_base_passes_gradients_to_adapters_after_an_eval_forward(lm):
    with torch.no_grad():
        lm.eval()(input_ids=tokens())  # the forward after which bitsandbytes would repack on CPU
    stacks = add_stack(lm, "math", SMALL)
    for s in stacks:
        s.train()
    ids = tokens(1)
    lm(input_ids=ids, labels=ids).loss.backward()
    first_layer_q = stacks[0]  # gradient must flow back through every later 4-bit layer to reach it
    assert first_layer_q.lora_B.grad is not None and first_layer_q.lora_B.grad.abs().sum() > 0


def test_frozen_stacks_stay_bit_identical_through_later_training(lm):
    first = add_stack(lm, "chat", SMALL)
    train_steps(lm, first)
    freeze(first)
    snapshot = [{k: v.clone() for k, v in s.state_dict().items()} for s in first]
    assert any(torch.count_nonzero(s.lora_B) for s in first)
    second = add_stack(lm, "math", SMALL, seed=1)
    train_steps(lm, second)
    assert all(torch.equal(v, snap[k]) for s, snap in zip(first, snapshot) for k, v in s.state_dict().items())
    assert all(p.grad is None for s in first for p in s.parameters())


def test_save_load_round_trips_exactly_and_routes_weight_domains(lm, manifest_path, tmp_path):
    stacks = add_stack(lm, "math", SMALL)
    train_steps(lm, stacks)
    freeze(stacks)
    ids = tokens(7)
    with torch.no_grad():
        trained = lm(input_ids=ids).logits
    path = tmp_path / "math-1.safetensors"
    save_stack(path, stack_modules(lm, "math", 0), "math", SMALL, {"round": 1})

    manifest = load_manifest(manifest_path)
    resolver = ArtifactResolver(manifest_path.parent)
    fresh = load_chat_base(manifest.chat.base, resolver, "cpu").model
    meta = load_stack(fresh, path)
    assert meta["domain"] == "math" and meta["round"] == 1 and meta["config"] == SMALL
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, trained)
        with routed(fresh, {"math": 0.0}):  # a route that gates the domain off is the base
            base = fresh(input_ids=ids).logits
        with routed(fresh, {"math": 0.5}):
            half = fresh(input_ids=ids).logits
    assert not torch.equal(base, trained) and not torch.equal(half, trained) and not torch.equal(half, base)

    other = tmp_path / "wider.safetensors"
    save_stack(other, stack_modules(lm, "math", 0), "math", MoELoRAConfig(experts=4, rank=8, alpha=8.0))
    with pytest.raises(ArtifactError, match="does not fit"):
        load_stack(fresh, other)
    assert len(next(iter(wrapped_layers(fresh).values())).stacks) == 1  # the refused stack left nothing behind


def test_stacks_on_upper_layers_only_train_save_and_serve_beside_full_ones(lm, manifest_path, tmp_path):
    upper = MoELoRAConfig(experts=4, rank=4, alpha=4.0, upper_layers=0.5)  # the upper layer of two
    full = add_stack(lm, "chat", SMALL)
    train_steps(lm, full)
    freeze(full)
    stacks = add_stack(lm, "math", upper)
    assert len(stacks) == 7 and all(".layers.1." in name for name in stack_modules(lm, "math", 0))
    train_steps(lm, stacks)
    freeze(stacks)
    ids = tokens(3)
    with torch.no_grad(), routed(lm, {"chat": 0.7, "math": 0.6}):
        trained = lm(input_ids=ids).logits
    paths = {d: tmp_path / f"{d}.safetensors" for d in ("chat", "math")}
    save_stack(paths["chat"], stack_modules(lm, "chat", 0), "chat", SMALL)
    save_stack(paths["math"], stack_modules(lm, "math", 0), "math", upper)

    manifest = load_manifest(manifest_path)
    fresh = load_chat_base(manifest.chat.base, ArtifactResolver(manifest_path.parent), "cpu").model
    wrap_projections(fresh)
    library = [load_domain_stacks(fresh, d, [p]) for d, p in paths.items()]
    assert sum(len(s) for s in library[1].per_layer.values()) == 7
    with torch.no_grad(), mounted(fresh, library), routed(fresh, {"chat": 0.7, "math": 0.6}):
        torch.testing.assert_close(fresh(input_ids=ids).logits, trained, atol=1e-5, rtol=1e-5)
    remove_last_stack(lm, "math")
    assert "math" not in {d for layer in wrapped_layers(lm).values() for d in layer.stack_domains}


def test_projection_folds_into_the_frozen_stack():
    torch.manual_seed(0)
    stack = MoELoRA(32, 64, SMALL).eval()
    torch.nn.init.normal_(stack.lora_B)
    basis, _ = torch.linalg.qr(torch.randn(64, 3))
    stack.output_basis = basis
    x = torch.randn(20, 32)
    with torch.no_grad():
        projected = stack(x)
        assert (projected @ basis).abs().max() < 1e-4  # nothing written into the claimed directions
        freeze([stack])
        assert stack.output_basis is None
        torch.testing.assert_close(stack(x), projected, rtol=1e-5, atol=1e-5)


def test_fused_frozen_stacks_equal_the_per_stack_sum(lm):
    groups = []
    for i, domain in enumerate(("chat", "math", "medical")):
        stacks = add_stack(lm, domain, SMALL, seed=i)
        for stack in stacks:
            torch.nn.init.normal_(stack.lora_B, std=0.3)
            torch.nn.init.normal_(stack.router.weight, std=1.0)
        freeze(stacks)
        groups.append(stacks)
    layer = next(iter(wrapped_layers(lm).values()))
    x = torch.randn(2, 5, layer.in_features)
    route = {"chat": 1.0, "math": 0.5, "medical": 2.0}
    with torch.no_grad():
        layer.route = route
        fused = layer(x) - layer.base_layer(x)
        by_stack = sum(w * s(x) for w, s in zip(route.values(), (g[0] for g in groups)))
        torch.testing.assert_close(fused, by_stack, rtol=1e-5, atol=1e-5)
        # replacing a stack (same position, new weights) is never served from a stale fusion
        remove_last_stack(lm, "medical")
        replacement = add_stack(lm, "medical", SMALL, seed=9)
        for stack in replacement:
            torch.nn.init.normal_(stack.lora_B, std=0.3)
        freeze(replacement)
        expected = by_stack - 2.0 * groups[2][0](x) + 2.0 * replacement[0](x)
        torch.testing.assert_close(layer(x) - layer.base_layer(x), expected, rtol=1e-5, atol=1e-5)


def test_mounted_stacks_serve_each_route_and_each_row_its_own_never_a_stale_plan(lm):
    from server.chat.moe_lora import batch_route
    from server.chat.stacks import DomainStacks

    layers = wrap_projections(lm)
    domains = ("chat", "math", "medical")
    library = []
    for i, domain in enumerate(domains):
        torch.manual_seed(i)
        per_layer = {}
        for name, layer in layers.items():
            stack = MoELoRA(layer.in_features, layer.out_features, SMALL)
            torch.nn.init.normal_(stack.lora_B, std=0.3)
            torch.nn.init.normal_(stack.router.weight, std=1.0)
            freeze([stack])
            per_layer[name] = [stack]
        library.append(DomainStacks(domain, per_layer, 1))
    ids = tokens()
    # a route, rows routed apart, the first route again (its cached plan), then one not seen yet
    routes = [{"chat": 1.0, "math": 0.5}, batch_route([{"chat": 1.0, "math": 0.5}, {"medical": 2.0}], domains),
              {"chat": 1.0, "math": 0.5}, {"math": 1.0}]
    with torch.no_grad(), mounted(lm, library):
        served = []
        for route in routes:
            with routed(lm, route):
                served.append(lm(input_ids=ids).logits)
    assert all(layer.mount_token is None and len(layer.stacks) == 0 for layer in layers.values())
    # the reference: the same stacks attached one by one, unfused (trainable stacks' path)
    for name, layer in layers.items():
        layer.stacks = torch.nn.ModuleList([d.per_layer[name][0] for d in library])
        layer.stack_domains = list(domains)
        for stack in layer.stacks:
            stack.frozen_token = None
    with torch.no_grad():
        for route, logits in zip(routes, served):
            with routed(lm, route):
                torch.testing.assert_close(logits, lm(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(served[1][0], served[0][0], atol=1e-5, rtol=1e-5)  # row 0 kept its route
    assert (served[3] - served[0]).abs().max() > 1e-3  # the routes differ, and so do their logits


def test_projections_that_share_an_input_are_computed_together_and_each_takes_its_own_part():
    from server.chat.moe_lora import SharedInputStacks, StackedMoELoRALinear

    torch.manual_seed(0)
    members = [StackedMoELoRALinear(torch.nn.Linear(32, width)) for width in (48, 16, 16)]  # q, k, v
    for index, member in enumerate(members):
        for domain in ("chat", "math", "medical") if index == 1 else ("chat", "math"):  # medical: k alone
            stack = MoELoRA(32, member.out_features, SMALL)
            torch.nn.init.normal_(stack.lora_B, std=0.3)
            torch.nn.init.normal_(stack.router.weight, std=1.0)
            freeze([stack])
            member.stacks.append(stack)
            member.stack_domains.append(domain)
        member.route = {"chat": 1.0, "math": 0.5, "medical": 2.0}
    x, other = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    with torch.no_grad():
        alone = [m(x) for m in members]  # each projection's own fused pass
        group = SharedInputStacks(members)
        for member in members:
            member.input_group, member.mount_token = group, object()
        torch.testing.assert_close([m(x) for m in members], alone, atol=1e-5, rtol=1e-5)
        # the group holds no input once every member has its part; a member fed another input recomputes
        assert group._input is None
        mixed = [members[0](x), members[1](other), members[2](x)]
        for member in members:
            member.input_group = member.mount_token = None
        torch.testing.assert_close(mixed, [members[0](x), members[1](other), members[2](x)], atol=1e-5, rtol=1e-5)


def test_shared_input_groups_keep_fused_copies_per_domain_and_of_all_whatever_the_routes_and_mount_plans():
    """Regression guard for the server's memory: each batch of rows is a route of its own (per-row
    weight tensors) and makes its own set of domains; a fused copy per route, then per set of domains
    (in every mount plan's group), grew the server's memory with its traffic."""
    from server.chat.moe_lora import SharedInputStacks, StackedMoELoRALinear

    torch.manual_seed(0)
    members = [StackedMoELoRALinear(torch.nn.Linear(32, width)) for width in (48, 16)]  # gate, up
    for member in members:
        for domain in ("chat", "math", "medical"):
            stack = MoELoRA(32, member.out_features, SMALL)
            freeze([stack])
            member.stacks.append(stack)
            member.stack_domains.append(domain)
    groups = [SharedInputStacks(members), SharedInputStacks(members)]  # two mount plans' groups
    with torch.no_grad():
        for step in range(40):
            group = groups[step // 20]
            rows = 1 + step % 4
            pair = [("chat", "math"), ("math", "medical"), ("chat", "medical")][step % 3]
            route = {d: torch.rand(rows) for d in pair} if step % 2 else {"math": 0.1 + step / 100}
            x = torch.randn(rows, 1, 32)
            for member in members:
                member.route, member.input_group, member.mount_token = route, group, object()
            for member in members:
                member(x)
    cache = members[0]._fused_cache
    assert len(cache) == 2  # math's stacks alone, and all stacks for routes of several domains
    fused = {id(plan[0]) for group in groups for plan in group._plans.values()}
    assert fused == {id(f) for f in cache.values()}
    assert not members[1]._fused_cache


def test_the_served_nf4_base_multiplies_in_float32_on_every_cpu(manifest_path):
    """Regression guard: on a CPU with AVX512-BF16, bitsandbytes' fast path would multiply in
    bfloat16 (the batching and round-trip tests above then fail on such a machine)."""
    manifest = load_manifest(manifest_path)
    model = load_chat_base(manifest.chat.base, ArtifactResolver(manifest_path.parent), "cpu").model
    fast_path = [m.support_avx512bf16_for_cpu for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert fast_path and not any(fast_path)
