"""PEFT LoRA adapters, served beside the stacks: a folder in PEFT's layout read, checked and computed
exactly as PEFT computes it, one more name in a request's route.

A folder holds `adapter_config.json` and `adapter_model.safetensors`, whose tensors are keyed
`base_model.model.<module>.lora_A.weight` ([r, in]) and `.lora_B.weight` ([out, r]). Which modules
carry a LoRA follows PEFT's own rules (peft.tuners.tuners_utils.check_target_module_exists):
`target_modules` as names (a module whose name is one, or ends in "." + one) or as a regex that
matches the whole name, "all-linear", `exclude_modules`, `layers_to_transform` with
`layers_pattern`; each module's rank and alpha from `rank_pattern` / `alpha_pattern` (the first key
that matches the end of its name, as peft.utils.other.get_pattern_key); its scale alpha / r, or
alpha / sqrt(r) with `use_rslora`. `fan_in_fan_out` is ignored on linear layers, as PEFT ignores
it there. Its output is base(x) + scale * B(A(x)) per module.

What PEFT would compute otherwise is refused at load, with the reason: DoRA, `modules_to_save`,
trainable tokens, a bias other than "none", LoRA on the embeddings, the LM head or any module
other than a decoder layer's q/k/v/o/gate/up/down projection, an adapter of another base model,
tensors that do not fit the base or that the configuration does not account for.

How rows with different adapters decode in one batch: server/chat/lora_bank.py. Which adapters keep
their weights in memory: server/chat/adapter_residency.py.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open

from server.artifacts import ArtifactError, verify_file
from server.chat.moe_lora import StackedMoELoRALinear, wrapped_layers

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")
# Options that change what PEFT computes, each with the value that leaves it as plain LoRA.
PLAIN = {"use_dora": False, "bias": "none", "modules_to_save": None, "trainable_token_indices": None,
         "lora_bias": False, "use_qalora": False, "layer_replication": None, "target_parameters": None,
         "megatron_config": None, "alora_invocation_tokens": None, "use_bdlora": None}
WHY = {"use_dora": "DoRA (weight-decomposed LoRA) is not served",
       "bias": "a bias other than 'none' changes the base layers' biases, which are shared by every request",
       "modules_to_save": "modules_to_save replaces whole base modules, which are shared by every request",
       "trainable_token_indices": "trainable tokens change the shared embeddings",
       "lora_bias": "a bias on lora_B is not served",
       "use_qalora": "QALoRA is not served",
       "layer_replication": "layer replication changes the base's layers",
       "target_parameters": "LoRA on parameters (not modules) is not served",
       "megatron_config": "Megatron-parallel LoRA is not served",
       "alora_invocation_tokens": "activated LoRA (aLoRA) is not served",
       "use_bdlora": "block-diagonal LoRA is not served"}


class AdapterError(ArtifactError):
    """A PEFT adapter that cannot be served exactly as PEFT computes it (the message says why)."""


@dataclass(frozen=True)
class LoraWeights:  # on one projection
    lora_A: torch.Tensor  # [r, in]
    lora_B: torch.Tensor  # [out, r]
    scale: float


class LoraAdapter:
    """A verified adapter: which projections it changes, at which rank and scale, and its weights,
    which are in memory or read again from its (checksummed) file when a request needs them."""

    epoch = 0  # moves whenever any adapter's weights are read or dropped (the banks follow it)

    def __init__(self, name: str, plan: dict[str, tuple[int, float]], parameters: int, weights_file: Path,
                 sha256: str | None, base_model: str | None, source: str, like: torch.Tensor):
        self.name, self.plan, self.parameters, self.base_model, self.source = name, plan, parameters, base_model, source
        self.weights_file, self.sha256 = weights_file, sha256
        self.device, self.dtype = like.device, like.dtype
        self.residency = None  # the AdapterResidency that admitted it (server/chat/adapter_residency.py)
        self._weights: dict[str, LoraWeights] | None = None

    @property
    def resident(self) -> bool:
        return self._weights is not None

    def weights(self) -> dict[str, LoraWeights]:
        """Its LoRA per wrapped projection, read from its file now if they were evicted."""
        weights = self._weights
        if weights is None:
            weights = self._weights = self.read()
            LoraAdapter.epoch += 1
        return weights

    def resident_weights(self) -> dict[str, LoraWeights] | None:
        return self._weights

    def read(self) -> dict[str, LoraWeights]:
        if self.sha256 is not None:
            verify_file(self.weights_file, self.sha256)  # the file it was admitted with, byte for byte
        weights = {}
        with safe_open(self.weights_file, framework="pt") as f:
            for module, (rank, scale) in self.plan.items():
                a, b = (f.get_tensor(f"{PREFIX}{module}.{part}.weight").to(self.device, self.dtype)
                        for part in ("lora_A", "lora_B"))
                weights[module] = LoraWeights(a, b, scale)
        return weights

    def drop(self) -> None:
        self._weights = None
        LoraAdapter.epoch += 1

    @property
    def ranks(self) -> list[int]:
        return sorted({rank for rank, _ in self.plan.values()})

    @property
    def targets(self) -> list[str]:
        return sorted({name.rsplit(".", 1)[-1] for name in self.plan})

    def describe(self) -> dict:
        return {"name": self.name, "rank": max(self.ranks), "ranks": self.ranks, "targets": self.targets,
                "layers": len(self.plan), "parameters": self.parameters, "source": self.source,
                "base_model": self.base_model,
                "resident": self.resident}


def read_adapter_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise AdapterError(folder, f"is not a PEFT adapter folder: no {CONFIG_FILE}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(path, f"cannot be read as JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise AdapterError(path, "is not a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(path, f"is a {config.get('peft_type')} adapter; only LoRA adapters are served")
    for option, plain in PLAIN.items():
        value = config.get(option, plain)
        if value != plain and not (plain is None and value in ([], {}, "")):
            raise AdapterError(path, f"{option}={value!r}: {WHY[option]}")
    for option in ("r", "lora_alpha"):
        if not isinstance(config.get(option, 8), (int, float)) or config.get(option, 8) <= 0:
            raise AdapterError(path, f"{option} must be a positive number, not {config.get(option)!r}")
    return config


def _first_match(patterns: dict, module: str):
    """peft.utils.other.get_pattern_key: the first key that matches the end of the module's name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def targeted(config: dict, module: str) -> bool:
    """Whether PEFT puts a LoRA on this module (peft.tuners.tuners_utils.check_target_module_exists)."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str) and re.fullmatch(exclude, module):
            return False
        if not isinstance(exclude, str) and (module in exclude or any(module.endswith(f".{e}") for e in exclude)):
            return False
    targets = config.get("target_modules")
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    if module in targets:
        return True
    if not any(module.endswith(f".{t}") for t in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    pattern = config.get("layers_pattern")
    patterns = [pattern] if isinstance(pattern, str) else (pattern or [])
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    for p in patterns:
        match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module)
        if match:
            break
    if not match:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


def candidate_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The base's modules by the names PEFT matches on: a wrapped projection by its own name, never
    its inner base layer."""
    wrapped = wrapped_layers(model)
    return {name: module for name, module in model.named_modules()
            if name and not any(name.startswith(f"{w}.") for w in _parents(name, wrapped))}


def _parents(name: str, wrapped: dict) -> list[str]:
    parts = name.split(".")
    return [p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in wrapped]


def base_names(model: nn.Module, served_as: str) -> set[str]:
    """What the base is known as: its manifest name and the names its config was saved under."""
    names = {served_as}
    for value in (getattr(model.config, "_name_or_path", None), getattr(model.config, "name_or_path", None)):
        if value:
            names.add(str(value))
    return {Path(n.rstrip("/")).name.lower() for n in names}


def load_adapter(folder: Path, name: str, model: nn.Module, served_as: str, source: str | None = None,
                 sha256: str | None = None) -> LoraAdapter:
    """A PEFT LoRA folder as served on this base (`served_as`: the base's manifest name), its weights
    read; refuses, with the reason, what it cannot serve exactly. `sha256`: its weights file's, as
    the manifest records it, checked again whenever evicted weights are read back."""
    config = read_adapter_config(folder)
    base = config.get("base_model_name_or_path")
    if base and Path(str(base).rstrip("/")).name.lower() not in base_names(model, served_as):
        raise AdapterError(folder, f"was trained on the base {base!r}, not on {served_as!r}")
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise AdapterError(folder, f"has no {WEIGHTS_FILE} (only safetensors weights are loaded)")
    wrapped = wrapped_layers(model)
    if isinstance(config.get("target_modules"), str) and config["target_modules"].lower() == "all-linear":
        matched = set(wrapped)  # PEFT: every linear layer but the output layer (a decoder's seven projections)
    else:
        matched = {m for m in candidate_modules(model) if targeted(config, m)}
    if unserved := sorted(matched - set(wrapped)):
        raise AdapterError(folder, f"puts LoRA on {unserved[0]}" + (f" and {len(unserved) - 1} more" if len(unserved) > 1 else "")
                           + ": only the decoder layers' q/k/v/o/gate/up/down projections are served (no "
                           "embedding, LM-head or other LoRA)")
    if not matched:
        raise AdapterError(folder, f"target_modules {config.get('target_modules')!r} match no projection of the base")
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    try:
        with safe_open(weights_path, framework="pt") as f:
            for key in f.keys():
                found = KEY.match(key)
                if found is None:
                    raise AdapterError(weights_path, f"holds {key!r}, which is no LoRA A or B of a module "
                                                     "(embedding LoRA, a bias or a saved module is not served)")
                shapes.setdefault(found["module"], {})[found["part"]] = tuple(f.get_slice(key).get_shape())
    except AdapterError:
        raise
    except Exception as exc:  # safetensors raises its own errors for a bad header or a cut file
        raise AdapterError(weights_path, f"cannot be read as safetensors ({exc})") from exc
    if extra := sorted(set(shapes) - matched):
        raise AdapterError(weights_path, f"holds weights for {extra[0]}, which adapter_config.json does not target")
    plan = {}
    rslora = bool(config.get("use_rslora", False))
    for module in sorted(matched):
        parts = shapes.get(module, {})
        if set(parts) != {"lora_A", "lora_B"}:
            raise AdapterError(weights_path, f"has no lora_A and lora_B for {module}, which the configuration targets")
        rank = _first_match(config.get("rank_pattern") or {}, module) or config.get("r", 8)
        alpha = _first_match(config.get("alpha_pattern") or {}, module) or config.get("lora_alpha", 8)
        layer: StackedMoELoRALinear = wrapped[module]
        a, b = parts["lora_A"], parts["lora_B"]
        if a != (rank, layer.in_features) or b != (layer.out_features, rank):
            raise AdapterError(weights_path, f"{module}: lora_A {a} and lora_B {b} do not fit the base's projection "
                                             f"({layer.in_features} -> {layer.out_features}) at rank {rank}")
        plan[module] = (rank, float(alpha / math.sqrt(rank) if rslora else alpha / rank))
    like = next(p for p in model.parameters() if p.is_floating_point())
    parameters = sum(rank * (wrapped[m].in_features + wrapped[m].out_features) for m, (rank, _) in plan.items())
    adapter = LoraAdapter(name, plan, parameters, weights_path, sha256, base, source or str(folder), like)
    try:
        adapter.weights()
    except Exception as exc:
        raise AdapterError(weights_path, f"cannot be read ({exc})") from exc
    return adapter
