"""PEFT LoRA adapters served beside the stacks, with `peft` itself as the reference: adapters that
peft creates on a tiny Llama (random B, several ranks, rsLoRA, rank and alpha patterns, a regex
target) give the logits PeftModel gives, alone and in a batch of rows routed differently, and mixed
with a stack route the sum of both deltas; what peft would compute otherwise is refused with the
reason."""

from __future__ import annotations

import json
from pathlib import Path

import peft  # the reference the served adapters are checked against (pyproject's dev extra)
import pytest
import torch

from server.artifacts import folder_digests
from server.chat.adapters import AdapterError, load_adapter
from server.chat.model import load_chat_base
from server.chat.moe_lora import MoELoRAConfig, batch_route, covered_layers
from server.chat.stacks import DomainStacks
from server.manifest import ArtifactResolver, ChatBase, Source
from tests.builders import build_causal_lm

ADAPTERS = {  # name -> LoraConfig arguments: the shapes users bring
    "r4-attention": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "r16-all": dict(r=16, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                         "gate_proj", "up_proj", "down_proj"]),
    "rslora-mlp": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "down_proj"],
                     rank_pattern={"o_proj": 2, r"layers\.1\.mlp\.down_proj": 6}, alpha_pattern={"down_proj": 3}),
    "regex": dict(r=2, lora_alpha=2, target_modules=r".*\.1\.self_attn\.(k|v)_proj"),
    "fan-in-fan-out": dict(r=4, lora_alpha=4, target_modules=["up_proj"], fan_in_fan_out=True),
    "one-layer": dict(r=4, lora_alpha=8, target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="layers"),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    build_causal_lm(root / "llama", "llama")
    return root


def peft_adapter(root: Path, name: str, seed: int = 0, base: str = "llama", **config) -> Path:
    """An adapter peft creates on the tiny base (`root / base`), with random A and B (a fresh one's B is zero)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(root / base)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)  # deltas well above float noise
    folder = root / "adapters" / name
    peft_model.save_pretrained(folder)
    return folder


def served_base(root: Path):
    folder = root / "llama"
    spec = ChatBase(name="llama", source=Source(path="llama", files=folder_digests(folder)), quantization="none")
    return load_chat_base(spec, ArtifactResolver(root), "cpu")


def peft_logits(root: Path, folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(root / "llama")
    with torch.no_grad():
        return peft.PeftModel.from_pretrained(model, folder).eval()(ids).logits


def prompt_ids(chat, n: int = 3) -> torch.Tensor:
    texts = ["Hello! How can I help you today?", "The cat sat on the warm mat.", "Add 3 and 4 to get 7."]
    return torch.stack([chat.tokenizer(t, return_tensors="pt").input_ids[0, :8] for t in texts[:n]])


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()


def test_every_served_adapter_gives_peft_s_logits_alone_and_batched_with_other_routes(tiny):
    folders = {name: peft_adapter(tiny, name, seed=i, **config) for i, (name, config) in enumerate(ADAPTERS.items())}
    chat = served_base(tiny)
    for name, folder in folders.items():
        chat.adapters[name] = load_adapter(folder, name, chat.model, chat.name)
    ids = prompt_ids(chat)
    with torch.no_grad(), chat.mounted({}):
        base = chat.model(ids).logits
    expected = {name: peft_logits(tiny, folder, ids) for name, folder in folders.items()}
    for name in folders:
        assert not close(base, expected[name]), f"{name}: the adapter changes nothing; the test would not see a bug"
        with torch.no_grad(), chat.mounted({name: 1.0}):
            assert close(chat.model(ids).logits, expected[name]), name
    # one batch, three rows, three routes: an adapter, the base alone, another adapter
    names = list(folders)
    for first, second in zip(names, names[1:] + names[:1]):
        routes = [{first: 1.0}, {}, {second: 1.0}]
        with torch.no_grad(), chat.mounted(batch_route(routes, chat.route_names)):
            mixed = chat.model(ids).logits
        assert close(mixed[0], expected[first][0]) and close(mixed[1], base[1]) and close(mixed[2], expected[second][2])
    # every row on one adapter, at weights of their own (the path that computes all rows at once)
    with torch.no_grad(), chat.mounted(batch_route([{names[0]: 1.0}, {names[0]: 1.0, names[1]: 1.0}], chat.route_names)):
        assert close(chat.model(ids[:2]).logits[0], expected[names[0]][0])


def test_resident_adapters_share_one_bank_per_projection_and_stay_exact_through_an_eviction(tiny):
    names = ["r16-all", "patterns", "rslora-mlp"]
    folders = {name: peft_adapter(tiny, f"bank-{name}", seed=10 + i, **ADAPTERS[name]) for i, name in enumerate(names)}
    chat = served_base(tiny)
    for name, folder in folders.items():
        chat.adapters[name] = load_adapter(folder, name, chat.model, chat.name)
    ids = prompt_ids(chat)
    expected = {name: peft_logits(tiny, folder, ids) for name, folder in folders.items()}

    def batched(routes):
        with torch.no_grad(), chat.mounted(batch_route(routes, chat.route_names)):
            return chat.model(ids).logits

    logits = batched([{n: 1.0} for n in names])
    assert all(close(logits[i], expected[n][i]) for i, n in enumerate(names))
    # a regression guard of the layout: on a projection, the adapters' weights are views of one bank
    q = "model.layers.0.self_attn.q_proj"
    on_q = [chat.adapters[n].weights()[q] for n in names if q in chat.adapters[n].plan]
    assert len(on_q) == 2 and len({w.lora_A.untyped_storage().data_ptr() for w in on_q}) == 1
    chat.adapters["patterns"].drop()  # evicted: the banks are rebuilt without it
    logits = batched([{"rslora-mlp": 1.0}, {}, {"r16-all": 1.0}])
    assert close(logits[0], expected["rslora-mlp"][0]) and close(logits[2], expected["r16-all"][2])
    chat.adapters["patterns"].weights()  # read again (the engine does this before a step that needs it)
    logits = batched([{n: 1.0} for n in reversed(names)])
    assert all(close(logits[i], expected[n][i]) for i, n in enumerate(reversed(names)))


def test_the_scales_and_targets_are_peft_s(tiny):
    folder = peft_adapter(tiny, "patterns", **ADAPTERS["patterns"])
    chat = served_base(tiny)
    adapter = load_adapter(folder, "patterns", chat.model, chat.name)
    layers = adapter.weights()
    assert layers["model.layers.0.self_attn.o_proj"].lora_A.shape[0] == 2  # rank_pattern
    assert layers["model.layers.1.mlp.down_proj"].lora_A.shape[0] == 6
    assert layers["model.layers.0.mlp.down_proj"].scale == pytest.approx(3 / 4)  # alpha_pattern over r
    assert layers["model.layers.1.mlp.down_proj"].scale == pytest.approx(3 / 6)
    assert layers["model.layers.0.self_attn.q_proj"].scale == pytest.approx(8 / 4)
    assert adapter.describe()["targets"] == ["down_proj", "o_proj", "q_proj"] and adapter.ranks == [2, 4, 6]
    rs = load_adapter(peft_adapter(tiny, "rs", **ADAPTERS["rslora-mlp"]), "rs", chat.model, chat.name)
    assert [w.scale for w in rs.weights().values()] == pytest.approx([4 / 8 ** 0.5] * 6)
    one = load_adapter(peft_adapter(tiny, "one", **ADAPTERS["one-layer"]), "one", chat.model, chat.name)
    assert list(one.plan) == ["model.layers.0.self_attn.q_proj"]
    regex = load_adapter(peft_adapter(tiny, "re", **ADAPTERS["regex"]), "re", chat.model, chat.name)
    assert sorted(regex.plan) == ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"]


def test_an_adapter_mixed_with_a_stack_route_adds_both_deltas(tiny):
    """Where they enter a projection, the adapter's and the stack's deltas add to the base's output."""
    from training.brainstacks.stacks import add_stack, freeze

    chat = served_base(tiny)
    chat.adapters["mix"] = load_adapter(peft_adapter(tiny, "mix2", **ADAPTERS["r4-attention"]), "mix", chat.model,
                                        chat.name)
    config = MoELoRAConfig(experts=2, rank=2, alpha=2.0, top_k=1, targets=("q_proj",))
    stacks = add_stack(chat.model, "math", config, seed=0)
    with torch.no_grad():
        for s in stacks:
            s.lora_B.normal_(0, 0.3)
    freeze(stacks)
    layers = covered_layers(chat.model, config)
    chat.stacks["math"] = DomainStacks("math", {n: [s] for n, s in zip(layers, stacks)}, 1)
    chat.domains = ("math",)
    chat.model.stacked_projections.attach(None)
    name = "model.layers.0.self_attn.q_proj"
    layer = layers[name]
    x = torch.randn(2, 5, layer.in_features)
    outputs = {}
    for key, route in {"base": {}, "adapter": {"mix": 1.0}, "stack": {"math": 0.5}, "both": {"mix": 1.0, "math": 0.5}}.items():
        with torch.no_grad(), chat.mounted(route):
            outputs[key] = layer(x)
    assert torch.allclose(outputs["both"], outputs["adapter"] + outputs["stack"] - outputs["base"], atol=1e-6)
    lora = chat.adapters["mix"].weights()[name]
    assert torch.allclose(outputs["adapter"] - outputs["base"], lora.scale * (x @ lora.lora_A.T) @ lora.lora_B.T,
                          atol=1e-6)


def rewrite_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize("config, change, reason", [
    (dict(r=4, target_modules=["q_proj"], use_dora=True), {}, "DoRA"),
    (dict(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]), {}, "modules_to_save"),
    (dict(r=4, target_modules=["q_proj"], bias="lora_only"), {}, "bias"),
    (dict(r=4, target_modules=["embed_tokens"]), {}, "no embedding, LM-head or other LoRA"),
    (dict(r=4, target_modules=["q_proj", "lm_head"]), {}, "puts LoRA on lm_head"),
    (dict(r=4, target_modules=["q_proj"]), {"base_model_name_or_path": "meta-llama/Llama-3.2-1B"}, "trained on the base"),
    (dict(r=4, target_modules=["q_proj"]), {"target_modules": ["q_proj", "v_proj"]}, "has no lora_A and lora_B"),
    (dict(r=4, target_modules=["q_proj", "v_proj"]), {"target_modules": ["q_proj"]}, "does not target"),
    (dict(r=4, target_modules=["q_proj"]), {"r": 8}, "do not fit"),
    (dict(r=4, target_modules=["q_proj"]), {"peft_type": "IA3"}, "only LoRA adapters"),
    (dict(r=4, target_modules=["q_proj"]), {"target_modules": ["nothing_here"]}, "match no projection"),
])
def test_what_peft_would_compute_otherwise_is_refused_with_the_reason(tiny, config, change, reason):
    folder = peft_adapter(tiny, f"refused-{abs(hash(reason))}", **config)
    if change:
        rewrite_config(folder, **change)
    chat = served_base(tiny)
    with pytest.raises(AdapterError, match=reason):
        load_adapter(folder, "refused", chat.model, chat.name)


def test_an_adapter_of_another_shape_and_files_that_are_not_an_adapter_are_refused(tiny, tmp_path):
    build_causal_lm(tmp_path / "wide", "llama", hidden=96)
    from transformers import AutoModelForCausalLM

    wide = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "wide"),
                               peft.LoraConfig(r=4, target_modules=["q_proj"]))
    wide.save_pretrained(tmp_path / "wide-adapter")
    rewrite_config(tmp_path / "wide-adapter", base_model_name_or_path=None)
    chat = served_base(tiny)
    with pytest.raises(AdapterError, match="do not fit the base's projection"):
        load_adapter(tmp_path / "wide-adapter", "wide", chat.model, chat.name)
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        load_adapter(tmp_path, "empty", chat.model, chat.name)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4,
                                                                      "target_modules": ["q_proj"]}))
    (tmp_path / "half" / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00")
    with pytest.raises(AdapterError, match="cannot be read as safetensors"):
        load_adapter(tmp_path / "half", "half", chat.model, chat.name)


def test_an_adapter_read_back_past_the_cap_finds_room_made_and_the_banks_let_go_first(tiny):
    from server.chat.adapter_residency import AdapterResidency
    from server.chat.lora_bank import BANKS
    from server.chat.moe_lora import wrapped_layers

    names = ["r16-all", "patterns", "rslora-mlp"]
    chat = served_base(tiny)
    for i, name in enumerate(names):
        chat.adapters[name] = load_adapter(peft_adapter(tiny, f"room-{name}", seed=20 + i, **ADAPTERS[name]),
                                           name, chat.model, chat.name)
    ids = prompt_ids(chat)
    residency = AdapterResidency(capacity=2)
    for name in names:
        residency.admit(chat.adapters[name])  # the first one is evicted at the third's admission
    with torch.no_grad(), chat.mounted(batch_route([{n: 1.0} for n in names[1:]], chat.route_names)):
        chat.model(ids[:2])  # the banks now hold the two resident adapters

    def held() -> tuple[int, set[int]]:
        """Adapters with weights in memory, and which adapters the banks' columns belong to."""
        banks = [BANKS._banks.get(id(layer)) for layer in wrapped_layers(chat.model).values()]
        banked = {key for bank in banks if bank is not None for key in bank.spans}
        return sum(a.resident for a in chat.adapters.values()), banked

    first = chat.adapters[names[0]]
    at_read = []
    read = first.read
    first.read = lambda: (at_read.append(held()), read())[1]
    residency.running([first])  # a row needs the evicted adapter: room is made before it is read
    resident, banked = at_read[0]
    assert resident == 1  # the cap's 2 less the one about to be read
    assert len(banked) == 1 and id(chat.adapters[names[1]]) not in banked  # the evicted one's columns were let go
    assert first.resident and sum(a.resident for a in chat.adapters.values()) == 2
