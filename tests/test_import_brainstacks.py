"""Stacks and a meta-router in the Brainstacks authors' layout (written here exactly as their training
saves them: `torch.save` dicts of tensors, their key names, their manifest.json) on tiny Llama- and
Gemma-3-shaped bases: `training import brainstacks` maps them, and the served router probabilities,
routing and every projection's output equal a reference written in this file from their equations."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.app import create_app
from server.chat.model import load_chat
from server.manifest import ChatBase, ChatSection, Manifest, load_manifest, write_manifest
from tests.builders import build_causal_lm
from tests.conftest import built, make_settings, recorded_source
from training.import_brainstacks import ALPACA, import_checkpoint

PROJECTIONS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
DOMAINS = {"chat": 2, "math": 1, "code": 1}  # stacks per domain
EXPERTS, RANK, SCALE = 4, 16, 16 / 16 ** 0.5  # their defaults: rsLoRA alpha 16, r 16
PROMPT = "Add 3 and 4 to get 7."


@pytest.fixture(params=["llama", "gemma3"])
def base(request, tmp_path) -> Path:
    build_causal_lm(tmp_path / "lm", request.param)
    section = ChatSection(base=ChatBase(name="tiny-lm", source=recorded_source(tmp_path, "lm"), quantization="none"))
    write_manifest(Manifest(version=1, image=[], chat=section), tmp_path / "weights_manifest.yaml")
    return tmp_path


def their_prefix(model) -> str:
    """Their code names modules as the loaded model does: Gemma 3 loads as the multimodal class."""
    return "model.language_model" if model.config.model_type.startswith("gemma3") else "model"


def write_their_checkpoint(folder: Path, model, seed: int = 0) -> dict:
    """Their layout: <domain>/stack_<k>.pt, meta_router.pt, manifest.json (stack paths relative to
    where their training ran). Returns the tensors written."""
    generator = torch.Generator().manual_seed(seed)
    rand = lambda *shape, std=0.05: torch.randn(*shape, generator=generator) * std  # noqa: E731
    stacks, blocks = {}, []
    for domain, count in DOMAINS.items():
        (folder / domain).mkdir(parents=True)
        for k in range(1, count + 1):
            state = {}
            for i, layer in enumerate(model.model.layers):
                for parent, names in PROJECTIONS.items():
                    for name in names:
                        linear = getattr(getattr(layer, parent), name)
                        key = f"{their_prefix(model)}.layers.{i}.{parent}.{name}.active_stack"
                        for e in range(EXPERTS):
                            state[f"{key}.experts.{e}.A.weight"] = rand(RANK, linear.in_features)
                            state[f"{key}.experts.{e}.B.weight"] = rand(linear.out_features, RANK)
                        state[f"{key}.router.weight"] = rand(EXPERTS, linear.in_features, std=1.0)
                        state[f"{key}.noise_linear.weight"] = rand(EXPERTS, linear.in_features)
            if model.config.model_type.startswith("gemma3"):  # their suffix match wraps the vision tower too
                state["model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.active_stack.router.weight"] = \
                    rand(EXPERTS, 8)
            torch.save(state, folder / domain / f"stack_{k}.pt")
            stacks[(domain, k)] = state
        blocks.append({"name": domain, "num_inner_stacks": count,
                       "stack_files": [f"{folder.name}/{domain}/stack_{k}.pt" for k in range(1, count + 1)]})
    (folder / "manifest.json").write_text(json.dumps({"model": "tiny", "domains": blocks}))
    d, h, n = model.config.hidden_size, 32, len(DOMAINS)
    router = {"token_proj.weight": rand(h, d, std=0.5), "token_proj.bias": rand(h), "token_ln.weight": 1 + rand(h),
              "token_ln.bias": rand(h), "domain_queries": rand(n, h, std=1.0), "global_query": rand(h, std=1.0),
              "ctx_ln.weight": 1 + rand(h), "ctx_ln.bias": rand(h), "global_ln.weight": 1 + rand(h),
              "global_ln.bias": rand(h), "ff.0.weight": rand(h, 2 * h, std=0.3), "ff.0.bias": rand(h),
              "ff.3.weight": 1 + rand(h), "ff.3.bias": rand(h), "ff.4.weight": rand(h, h, std=0.3),
              "ff.4.bias": rand(h), "out.weight": rand(1, h, std=1.0), "out.bias": torch.tensor([-0.5]),
              "log_temperature": torch.tensor([-1.5])}  # under their clamp: the temperature is 0.3
    torch.save({"state_dict": router, "domain_names": list(DOMAINS), "token_dim": d, "n_domains": n,
                "version": "reasoning_aware", "chat_floor": 0.2, "gate_threshold": 0.12}, folder / "meta_router.pt")
    return {"stacks": stacks, "router": router}


# ------------------------------------------------------------ the reference, from their equations
def reference_stack(state: dict, key: str, x: torch.Tensor) -> torch.Tensor:
    """delta = s * sum over the top-2 experts e of softmax(top-2 router logits)_e * B_e A_e x."""
    logits = x @ state[f"{key}.router.weight"].T
    top, index = logits.topk(2, dim=-1)
    gates = torch.zeros_like(logits).scatter(-1, index, top.softmax(-1))
    deltas = torch.stack([x @ state[f"{key}.experts.{e}.A.weight"].T @ state[f"{key}.experts.{e}.B.weight"].T
                          for e in range(EXPERTS)], dim=-2)
    return SCALE * (gates.unsqueeze(-1) * deltas).sum(-2)


def reference_probabilities(router: dict, model, tokenizer, text: str) -> torch.Tensor:
    """Their router on 0.45 h[len/2] + 0.55 h[-1] of the base over the raw text (no special tokens)."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
        states = 0.45 * hs[len(hs) // 2] + 0.55 * hs[-1]
        ln = lambda v, name: F.layer_norm(v, v.shape[-1:], router[f"{name}.weight"], router[f"{name}.bias"])  # noqa: E731
        x = ln(states[0] @ router["token_proj.weight"].T + router["token_proj.bias"], "token_ln")  # [T, h]
        overall = ln((x @ router["global_query"]).softmax(0) @ x, "global_ln")
        logits = []
        for query in router["domain_queries"]:
            context = ln((x @ query).softmax(0) @ x, "ctx_ln")
            hidden = F.gelu(torch.cat([context, overall]) @ router["ff.0.weight"].T + router["ff.0.bias"])
            hidden = F.gelu(ln(hidden, "ff.3") @ router["ff.4.weight"].T + router["ff.4.bias"])
            logits.append(hidden @ router["out.weight"][0] + router["out.bias"][0])
        temperature = router["log_temperature"].exp().clamp(0.3, 3.0)
        return torch.sigmoid(torch.stack(logits) / temperature)


def reference_weights(probabilities: torch.Tensor) -> dict[str, float]:
    """p(chat) floored at 0.20; a domain applies at its probability when it is over 0.12."""
    p = dict(zip(DOMAINS, probabilities.tolist()))
    p["chat"] = max(p["chat"], 0.2)
    return {d: v for d, v in p.items() if v > 0.12}


def projection_outputs(model, ids: torch.Tensor) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Every projection's input and output on `ids`, and the logits."""
    seen, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        for parent, names in PROJECTIONS.items():
            for name in names:
                def hook(module, inputs, output, key=f"layers.{i}.{parent}.{name}"):
                    seen[key] = (inputs[0].detach(), output.detach())
                handles.append(getattr(getattr(layer, parent), name).register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        for handle in handles:
            handle.remove()
    return seen, logits


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()


def test_their_checkpoint_imports_and_serves_their_router_and_stacks_exactly(base):
    manifest = base / "weights_manifest.yaml"
    model = AutoModelForCausalLM.from_pretrained(base / "lm").eval()
    tokenizer = AutoTokenizer.from_pretrained(base / "lm")
    written = write_their_checkpoint(base / "BrainStacks_tiny", model)
    report = import_checkpoint(built(manifest), base / "BrainStacks_tiny", "tiny-lm")
    assert report["domains"] == DOMAINS and report["router"] == list(DOMAINS)
    section = load_manifest(manifest).chat
    assert [d.name for d in section.domains] == list(DOMAINS) and section.router is not None
    assert not list((base / "chat").glob("*.pt"))  # only safetensors reach the artifact root
    chat = load_chat(section, built(manifest).resolver(), "cpu")

    # the router: their probabilities, and their rule for what is applied at which weight
    expected = reference_probabilities(written["router"], model, tokenizer, PROMPT)
    served = chat.router_probabilities([{"role": "user", "content": PROMPT}])
    assert close(torch.tensor([served[d] for d in DOMAINS]), expected)
    weights = chat.plan_route("auto", [{"role": "user", "content": PROMPT}]).weights
    assert weights.keys() == reference_weights(expected).keys()
    assert all(abs(weights[d] - w) <= 1e-5 for d, w in reference_weights(expected).items())

    # every projection's output under a route that applies every domain at its own weight, on the
    # prompt their stacks trained on
    route = {"chat": 0.9, "math": 0.35, "code": 1.3}
    ids = tokenizer(ALPACA.replace("{instruction}", PROMPT), return_tensors="pt").input_ids

    with chat.mounted(route):
        served, logits = projection_outputs(chat.model, ids)
    assert len(served) == 7 * model.config.num_hidden_layers
    for key, (x, y) in served.items():  # each projection on the input it was given: no drift across layers
        prefixed = f"{their_prefix(model)}.{key}.active_stack"
        base_y = model.get_submodule(f"model.{key}")(x)
        delta = sum(w * reference_stack(written["stacks"][(d, k)], prefixed, x)
                    for d, w in route.items() for k in range(1, DOMAINS[d] + 1))
        assert not close(base_y, base_y + delta), f"{key}: the stacks change nothing; the test would miss a bug"
        assert close(y, base_y + delta), key
    # end to end, thirty-odd float32 products deep, the same logits to float rounding
    with torch.no_grad(), chat.mounted({}):
        plain = chat.model(ids).logits
    assert (logits - plain).abs().max() > 0.1
    reference_logits = reference_model_logits(model, ids, written, route)
    assert (logits - reference_logits).abs().max().item() <= 1e-4 * reference_logits.abs().max().item()


def reference_model_logits(model, ids: torch.Tensor, written: dict, route: dict[str, float]) -> torch.Tensor:
    """The plain base with their deltas added at every projection, by forward hooks."""
    handles = []
    for key, module in model.named_modules():
        if key.rsplit(".", 1)[-1] in {n for names in PROJECTIONS.values() for n in names}:
            prefixed = f"{their_prefix(model)}.{key.removeprefix('model.')}.active_stack"

            def hook(module, inputs, output, prefixed=prefixed):
                return output + sum(w * reference_stack(written["stacks"][(d, k)], prefixed, inputs[0])
                                    for d, w in route.items() for k in range(1, DOMAINS[d] + 1))
            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        for handle in handles:
            handle.remove()


def test_the_server_routes_their_prompt_in_their_template(base):
    manifest = base / "weights_manifest.yaml"
    model = AutoModelForCausalLM.from_pretrained(base / "lm").eval()
    tokenizer = AutoTokenizer.from_pretrained(base / "lm")
    written = write_their_checkpoint(base / "ckpt", model)
    import_checkpoint(built(manifest), base / "ckpt", "tiny-lm")
    expected = reference_probabilities(written["router"], model, tokenizer, PROMPT)
    with TestClient(create_app(make_settings(manifest), load_in_background=False)) as c:
        auto = c.post("/chat", json={"prompt": PROMPT, "max_tokens": 3, "route": "auto"}).json()
        chat_template = c.post("/chat", json={"prompt": PROMPT, "max_tokens": 3, "route": "none"}).json()
    trace = auto["trace"]
    assert close(torch.tensor([trace["router_probabilities"][d] for d in DOMAINS]), expected)
    assert trace["domains_applied"].keys() == reference_weights(expected).keys() and "prompt template" in trace["reason"]
    alpaca = tokenizer(ALPACA.replace("{instruction}", PROMPT)).input_ids
    assert auto["usage"]["prompt_tokens"] == len(alpaca) != chat_template["usage"]["prompt_tokens"]


class RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())  # harmless, but code: a weights-only load must refuse to run it


def test_a_pickle_with_code_a_misfit_and_a_served_name_are_refused_and_nothing_is_written(base):
    manifest = base / "weights_manifest.yaml"
    model = AutoModelForCausalLM.from_pretrained(base / "lm").eval()
    before = manifest.read_text()
    folder = base / "ckpt"
    written = write_their_checkpoint(folder, model)
    stack = folder / "math" / "stack_1.pt"
    torch.save({**written["stacks"][("math", 1)], "extra": RunsCode()}, stack)
    with pytest.raises(SystemExit, match="refused: only tensors"):
        import_checkpoint(built(manifest), folder, "tiny-lm")
    misfit = dict(written["stacks"][("math", 1)])
    key = next(k for k in misfit if k.endswith("q_proj.active_stack.experts.0.A.weight"))
    misfit[key] = misfit[key][:, :-1]
    torch.save(misfit, stack)
    with pytest.raises(SystemExit, match="shape"):
        import_checkpoint(built(manifest), folder, "tiny-lm")
    with pytest.raises(SystemExit, match="not 'other-base'"):
        import_checkpoint(built(manifest), folder, "other-base")
    assert manifest.read_text() == before and not (base / "chat").exists()
    torch.save(written["stacks"][("math", 1)], stack)
    import_checkpoint(built(manifest), folder, "tiny-lm")
    with pytest.raises(SystemExit, match="served already"):
        import_checkpoint(built(manifest), folder, "tiny-lm")
