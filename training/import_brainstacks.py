"""`python -m training import brainstacks DIR --base NAME`: stacks and a meta-router trained by the
Brainstacks authors' reference code (achelousace/brainstacks), served by Loopstack.

Their layout: `manifest.json` lists the domains in order with their stack files
(`<domain>/stack_<k>.pt`); a stack file is a dict of tensors keyed
`<module>.active_stack.experts.<e>.A.weight` ([r, in]), `.B.weight` ([out, r]), `.router.weight` and
`.noise_linear.weight` ([experts, in]) for every q/k/v/o/gate/up/down projection; `meta_router.pt` a
dict with the router's `state_dict`, `domain_names`, `token_dim`, `chat_floor` and `gate_threshold`.
Their stack is Loopstack's MoE-LoRA (top-k softmax gates, rsLoRA scale alpha/sqrt(r)), so a stack
maps tensor for tensor; their router is the "projected-attention" kind of server/chat/router.py,
reading the last user turn as text (no special tokens, 256 tokens, as it was trained) and weighting
each domain at its probability past the gate, the chat domain floored. Their stacks were trained on
an Alpaca-style prompt, recorded in each stack file, so the server renders that prompt for them.

Pickles are read with `torch.load(weights_only=True)` only: tensors, dicts, lists, numbers and
strings; a file that needs anything else is refused. Only safetensors reach the artifact root.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from server.artifacts import write_atomically
from server.chat.model import load_chat_base
from server.chat.moe_lora import PROJECTIONS, MoELoRA, MoELoRAConfig, wrapped_layers
from server.chat.router import MetaRouter, RouterConfig, save_router
from server.chat.stack_files import save_stack
from server.manifest import Artifact, BuiltManifest, Domain
from training.artifacts import STACKS

# the prompt their stacks trained on (an empty input block), the answer following it
ALPACA = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
          "### Input:\n\n\n### Response:\n")
STACK_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.active_stack\."
                       r"(?:experts\.(\d+)\.(A|B)\.weight|(router|noise_linear)\.weight)$")
ROUTER_TOKENS = 256  # the prompt length their router trained on


def load_tensors_only(path: Path) -> object:
    """A pickle holding tensors and plain containers only; anything else is refused, unread."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f"{path}: no such file") from None
    except Exception as exc:  # UnpicklingError for code, RuntimeError for a file that is no pickle
        raise SystemExit(f"{path}: refused: only tensors, dicts, lists, numbers and strings are read from a "
                         f"pickle (torch.load weights_only=True): {str(exc).splitlines()[0]}") from None


def stack_files(folder: Path) -> list[tuple[str, list[Path]]]:
    """(domain, its stack files) in the authors' manifest order; their paths are relative to where
    training ran, so a file is looked for under `folder` too."""
    try:
        listed = [{"name": str(b["name"]), "stack_files": [str(f) for f in b["stack_files"]]}
                  for b in json.loads((folder / "manifest.json").read_text())["domains"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"{folder / 'manifest.json'}: not a Brainstacks manifest ({exc!r})") from None
    out = []
    for block in listed:
        files = []
        for name in block["stack_files"]:
            candidates = [folder / name, folder.parent / name, folder / block["name"] / Path(name).name]
            found = next((c for c in candidates if c.is_file()), None)
            if found is None:
                raise SystemExit(f"{folder}: stack file {name!r} of {block['name']!r} is not there")
            files.append(found)
        out.append((block["name"], files))
    return out


def projection_index(layers: dict) -> dict[tuple[int, str, str], str]:
    """(layer, attention or MLP, projection) -> the served base's projection name."""
    index = {}
    for name in layers:
        found = re.search(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)$", name)
        if found:
            index[(int(found[1]), found[2], found[3])] = name
    return index


def map_stack(path: Path, state, layers: dict, alpha: float, top_k: int) -> tuple[MoELoRAConfig, dict[str, MoELoRA]]:
    """One of their stack files as Loopstack's MoE-LoRA modules per served projection; refuses,
    naming the key, what does not fit the base."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SystemExit(f"{path}: not a stack (a dict of tensors)")
    index, parts = projection_index(layers), {}
    for key, tensor in state.items():
        if "vision" in key:
            continue  # their Gemma 3 wraps the vision tower's projections too: no images are served
        found = STACK_KEY.search(key)
        if found is None or (int(found[1]), found[2], found[3]) not in index:
            raise SystemExit(f"{path}: {key!r} is no stack tensor of a projection of this base")
        name = index[(int(found[1]), found[2], found[3])]
        slot = (found[5], int(found[4])) if found[4] is not None else (found[6], None)
        parts.setdefault(name, {})[slot] = tensor.float()
    targets = tuple(p for p in PROJECTIONS if any(n.endswith(f".{p}") for n in parts))
    if missing := sorted(n for n in layers if n.rsplit(".", 1)[-1] in targets and n not in parts):
        raise SystemExit(f"{path}: no stack on {missing[0]} ({len(missing)} projections): a stack covers every layer")
    experts = max(e for slots in parts.values() for _, e in slots if e is not None) + 1
    rank = next(iter(parts.values()))[("A", 0)].shape[0]
    config = MoELoRAConfig(experts=experts, rank=rank, alpha=alpha, top_k=top_k, targets=targets)
    modules = {}
    for name, slots in parts.items():
        layer = layers[name]
        stack = MoELoRA(layer.in_features, layer.out_features, config)
        wanted = {("A", e): stack.lora_A[e] for e in range(experts)} | {("B", e): stack.lora_B[e] for e in range(experts)}
        wanted |= {("router", None): stack.router.weight, ("noise_linear", None): stack.noise.weight}
        if set(slots) != set(wanted):
            raise SystemExit(f"{path}: {name}: expected {experts} experts' A and B, a router and its noise")
        with torch.no_grad():
            for slot, target in wanted.items():
                if slots[slot].shape != target.shape:
                    raise SystemExit(f"{path}: {name} {slot[0]}: shape {tuple(slots[slot].shape)}, the base needs "
                                     f"{tuple(target.shape)}")
                target.copy_(slots[slot])
        modules[name] = stack.requires_grad_(False)
    return config, modules


def map_router(path: Path, saved, model_config, domains: list[str]) -> MetaRouter:
    """Their meta-router as Loopstack's "projected-attention" router, refused when it does not read
    this base or routes domains that are not imported."""
    if not isinstance(saved, dict) or not isinstance(saved.get("state_dict"), dict):
        raise SystemExit(f"{path}: not a meta-router (a dict with a state_dict)")
    names, state = list(saved.get("domain_names") or []), saved["state_dict"]
    if unknown := sorted(set(names) - set(domains)):
        raise SystemExit(f"{path}: routes {unknown}, which the checkpoint's manifest has no stacks for")
    if saved.get("token_dim", model_config.hidden_size) != model_config.hidden_size:
        raise SystemExit(f"{path}: reads width {saved['token_dim']}; the base's is {model_config.hidden_size}")
    layers = model_config.num_hidden_layers
    config = RouterConfig(
        domains=tuple(names), hidden_size=model_config.hidden_size,
        middle_layer=(layers + 1) // 2,  # their hidden_states[len // 2], embeddings included
        middle_weight=0.45, width=int(state["token_proj.weight"].shape[0]) if "token_proj.weight" in state else 512,
        floor_domain="chat" if "chat" in names else None, floor=float(saved.get("chat_floor", 0.2)),
        gate_threshold=float(saved.get("gate_threshold", 0.12)), weighting="probability",
        pooling="projected-attention", reads="text", max_tokens=ROUTER_TOKENS)
    router = MetaRouter(config)
    try:
        router.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        raise SystemExit(f"{path}: not the authors' meta-router: {str(exc).splitlines()[0]}") from None
    return router.eval().requires_grad_(False)


def import_checkpoint(manifests: BuiltManifest, folder: Path, base: str, alpha: float = 16.0, top_k: int = 2,
                      prompt_template: str = ALPACA) -> dict:
    """Every domain's stacks and the meta-router of `folder`, checked against the manifest's chat
    base `base`, written as safetensors and entered in the built manifest (the running server
    hot-loads them). Everything is read and checked before anything is written."""
    section = manifests.read().chat
    if section is None or section.base.name != base:
        raise SystemExit(f"{manifests.path}: the chat base is {section.base.name if section else None!r}, not {base!r}")
    if "{instruction}" not in prompt_template:
        raise SystemExit("the prompt template needs an {instruction} placeholder")
    listed = [(domain, paths) for domain, paths in stack_files(folder) if paths]  # theirs skip a domain without any
    names = {d for d, _ in listed}
    if taken := sorted(names & ({d.name for d in section.domains} | {a.name for a in section.adapters})):
        raise SystemExit(f"domains {taken} are served already: `python -m training stacks remove` them first")
    for name in names:
        try:
            Domain(name=name, order=0)
        except ValueError:
            raise SystemExit(f"{folder}: {name!r} is not a domain name Loopstack serves") from None
    chat = load_chat_base(section.base, manifests.resolver(), "cpu")
    layers = wrapped_layers(chat.model)
    mapped = [(domain, [map_stack(p, load_tensors_only(p), layers, alpha, top_k) for p in paths], paths)
              for domain, paths in listed]
    router_path = folder / "meta_router.pt"
    router = (map_router(router_path, load_tensors_only(router_path), chat.model.config, [d for d, _ in listed])
              if router_path.is_file() else None)
    entries, first = [], max((d.order for d in section.domains), default=-1) + 1
    for order, (domain, stacks, paths) in enumerate(mapped, start=first):
        artifacts = []
        for round_index, ((config, modules), source) in enumerate(zip(stacks, paths), start=1):
            relative = f"{STACKS}/{domain}-{round_index}.safetensors"
            meta = {"round": round_index, "order": order, "base": base, "projection": "none", "stacked": False,
                    "prompt_template": prompt_template, "imported_from": str(source.relative_to(folder))}
            sha = write_atomically(manifests.file(relative),
                                   lambda tmp: save_stack(tmp, modules, domain, config, meta))
            artifacts.append(Artifact(path=relative, sha256=sha))
        entries.append(Domain(name=domain, order=order, stacks=artifacts))
    router_entry = None
    if router is not None:
        relative = f"{STACKS}/router.safetensors"
        sha = write_atomically(manifests.file(relative), lambda tmp: save_router(tmp, router, {
            "base": base, "imported_from": "meta_router.pt"}))
        router_entry = Artifact(path=relative, sha256=sha)
    with manifests.updating() as manifest:
        update = {"domains": [*manifest.chat.domains, *entries]}
        if router_entry is not None:
            update["router"] = router_entry
        manifests.write(manifest.model_copy(update={"chat": manifest.chat.model_copy(update=update)}))
    return {"domains": {e.name: len(e.stacks) for e in entries}, "router": router is not None and list(router.config.domains),
            "replaced_router": router is not None and section.router is not None, "prompt_template": prompt_template}
