"""MoE-LoRA stacks over the 4-bit base: the properties Brainstacks' claims rest on."""

from __future__ import annotations

import pytest
import torch

from server.artifacts import ArtifactError
from server.chat.model import load_chat_base
from server.chat.moe_lora import (
    MoELoRA, MoELoRAConfig, StackedMoELoRALinear, StackedProjections, routed, stacked_projections, wrap_projections,
    wrapped_layers,
)
from server.chat.nf4 import disable_cpu_weight_packing
from server.chat.stack_files import save_stack
from server.chat.stacks import DomainStacks, ServedStacks, load_domain_stacks
from server.manifest import ArtifactResolver, load_manifest
from training.brainstacks.stacks import (
    TrainableMoELoRA, add_stack, aux_loss, freeze, load_stack, remove_last_stack, stack_modules, training_stacks,
)

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
    served = MoELoRA(32, 64, SMALL).train()
    torch.nn.init.normal_(served.noise.weight, std=1.0)
    x = torch.randn(50, 32)
    assert torch.equal(served.gates(x), served.gates(x))  # the served module has no noise, in any mode
    stack = TrainableMoELoRA(32, 64, SMALL)
    torch.nn.init.normal_(stack.noise.weight, std=1.0)  # trained noise weights are non-zero
    stack.eval()
    gates = stack.gates(x)
    assert torch.allclose(gates.sum(-1), torch.ones(50))
    assert ((gates > 0).sum(-1) == 2).all()
    assert torch.equal(gates, stack.gates(x))  # no noise in eval
    stack.train()
    assert not torch.equal(stack.gates(x), stack.gates(x))


def test_aux_loss_gradient_reaches_the_router():
    stack = TrainableMoELoRA(32, 64, SMALL).train()
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
    first = next(iter(wrapped_layers(fresh).values()))
    assert len(training_stacks(fresh).of(first)) == 1  # the refused stack left nothing behind


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
    served = ServedStacks(wrapped_layers(fresh), library)
    with torch.no_grad(), stacked_projections(fresh).mounted(served, {"chat": 0.7, "math": 0.6}):
        torch.testing.assert_close(fresh(input_ids=ids).logits, trained, atol=1e-5, rtol=1e-5)
    remove_last_stack(lm, "math")
    assert "math" not in {d for stacks in training_stacks(lm).per_layer.values() for d, _ in stacks}


def test_projection_folds_into_the_frozen_stack():
    torch.manual_seed(0)
    stack = TrainableMoELoRA(32, 64, SMALL).eval()
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
    with torch.no_grad(), routed(lm, route):
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


def frozen_library(layers: dict[str, StackedMoELoRALinear], domains: tuple[str, ...]) -> list[DomainStacks]:
    """Random, non-zero served stacks, one per domain on every projection of `layers`."""
    library = []
    for i, domain in enumerate(domains):
        torch.manual_seed(i)
        per_layer = {}
        for name, layer in layers.items():
            stack = MoELoRA(layer.in_features, layer.out_features, SMALL).requires_grad_(False)
            torch.nn.init.normal_(stack.lora_B, std=0.3)
            torch.nn.init.normal_(stack.router.weight, std=1.0)
            per_layer[name] = [stack]
        library.append(DomainStacks(domain, per_layer, 1))
    return library


def test_mounted_stacks_serve_each_route_and_each_row_its_own_never_a_stale_plan(lm):
    from server.chat.moe_lora import batch_route
    from training.brainstacks.stacks import TrainingStacks

    layers = wrap_projections(lm)
    domains = ("chat", "math", "medical")
    library = frozen_library(layers, domains)
    ids = tokens()
    # a route, rows routed apart, the first route again (its cached plan), then one not seen yet
    routes = [{"chat": 1.0, "math": 0.5}, batch_route([{"chat": 1.0, "math": 0.5}, {"medical": 2.0}], domains),
              {"chat": 1.0, "math": 0.5}, {"math": 1.0}]
    projections, mount = stacked_projections(lm), ServedStacks(layers, library)
    with torch.no_grad():
        served = []
        for route in routes:
            with projections.mounted(mount, route):
                served.append(lm(input_ids=ids).logits)
    assert projections.stacks is None and projections.route is None  # unmounted after each step
    # the reference: the same stacks as a training run holds them, unfused (trainable stacks' path)
    reference = TrainingStacks()
    for name, layer in layers.items():
        for domain in library:
            copy = TrainableMoELoRA(layer.in_features, layer.out_features, SMALL).eval()
            copy.load_state_dict(domain.per_layer[name][0].state_dict())
            reference.per_layer.setdefault(layer, []).append((domain.domain, copy))
    with torch.no_grad():
        for route, logits in zip(routes, served):
            with projections.mounted(reference, route):
                torch.testing.assert_close(logits, lm(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(served[1][0], served[0][0], atol=1e-5, rtol=1e-5)  # row 0 kept its route
    assert (served[3] - served[0]).abs().max() > 1e-3  # the routes differ, and so do their logits


def shared_input_layers(widths: tuple[int, ...], prefix: str) -> dict[str, StackedMoELoRALinear]:
    """Stand-ins for one decoder layer's projections that read one input: q, k, v (or gate, up)."""
    names = ("q_proj", "k_proj", "v_proj") if len(widths) == 3 else ("gate_proj", "up_proj")
    projections = StackedProjections()
    return {f"{prefix}.{name}": StackedMoELoRALinear(torch.nn.Linear(32, width), projections)
            for name, width in zip(names, widths)}


def test_projections_that_share_an_input_are_computed_together_and_each_takes_its_own_part():
    torch.manual_seed(0)
    layers = shared_input_layers((48, 16, 16), "model.layers.0.self_attn")
    library = frozen_library(layers, ("chat", "math", "medical"))
    k_proj = list(layers)[1]
    for domain in library[2:]:  # medical: on k alone
        for name in layers:
            if name != k_proj:
                domain.per_layer[name] = []
    grouped = ServedStacks(layers, library)
    alone = ServedStacks({f"alone.{i}": layer for i, layer in enumerate(layers.values())},  # names that never group
                         [DomainStacks(d.domain, {f"alone.{i}": d.per_layer[name] for i, name in enumerate(layers)}, 1)
                          for d in library])
    route = {"chat": 1.0, "math": 0.5, "medical": 2.0}
    members = list(layers.values())
    projections = members[0].projections
    x, other = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    with torch.no_grad():
        with projections.mounted(alone, route):
            expected = [m(x) for m in members]  # each projection's own fused pass
            expected_mixed = [members[0](x), members[1](other), members[2](x)]
        with projections.mounted(grouped, route):
            torch.testing.assert_close([m(x) for m in members], expected, atol=1e-5, rtol=1e-5)
            group = grouped._layers[members[0]].group
            assert group is not None and group._input is None  # no input held once every member has its part
            mixed = [members[0](x), members[1](other), members[2](x)]  # a member fed another input recomputes
        torch.testing.assert_close(mixed, expected_mixed, atol=1e-5, rtol=1e-5)


def test_shared_input_groups_keep_fused_copies_per_domain_and_of_all_whatever_the_routes():
    """Regression guard for the server's memory: each batch of rows is a route of its own (per-row
    weight tensors) and makes its own set of domains; a fused copy per route, then per set of domains,
    grew the server's memory with its traffic."""
    torch.manual_seed(0)
    layers = shared_input_layers((48, 16), "model.layers.0.mlp")
    served = ServedStacks(layers, frozen_library(layers, ("chat", "math", "medical")))
    projections = next(iter(layers.values())).projections
    with torch.no_grad():
        for step in range(40):
            rows = 1 + step % 4
            pair = [("chat", "math"), ("math", "medical"), ("chat", "medical")][step % 3]
            route = {d: torch.rand(rows) for d in pair} if step % 2 else {"math": 0.1 + step / 100}
            x = torch.randn(rows, 1, 32)
            with projections.mounted(served, route):
                for member in layers.values():
                    member(x)
    assert len(served._fused) == 2  # math's stacks alone, and all stacks for routes of several domains
    owner = served._layers[next(iter(layers.values()))]
    assert {id(plan[0]) for plan in owner.plans.values()} == {id(f) for f in served._fused.values()}


def test_a_model_claimed_by_the_engine_refuses_mounts_from_other_threads(lm):
    """Regression guard for the one-thread rule: stacks are set on the shared base per step."""
    import threading

    projections = stacked_projections(lm)
    errors = []

    def engine_thread():
        projections.claim()
        with projections.routed({}):
            entered.set()
            release.wait(5)

    entered, release = threading.Event(), threading.Event()
    worker = threading.Thread(target=engine_thread)
    worker.start()
    entered.wait(5)
    try:
        with projections.routed({}):
            pass
    except RuntimeError as exc:
        errors.append(str(exc))
    release.set()
    worker.join()
    assert errors and "owns this model" in errors[0]
    with projections.routed({}):  # once the owning thread has ended, the model is free again
        assert projections.route == {}


def test_the_served_nf4_base_multiplies_in_float32_on_every_cpu(manifest_path):
    """Regression guard: on a CPU with AVX512-BF16, bitsandbytes' fast path would multiply in
    bfloat16 (the batching and round-trip tests above then fail on such a machine)."""
    manifest = load_manifest(manifest_path)
    model = load_chat_base(manifest.chat.base, ArtifactResolver(manifest_path.parent), "cpu").model
    fast_path = [m.support_avx512bf16_for_cpu for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert fast_path and not any(fast_path)
