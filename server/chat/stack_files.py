"""A MoE-LoRA stack as a file: one safetensors file per stack (one boosting round of one domain),
its tensors keyed by the wrapped projection they sit on, `<projection>.lora_A` [experts, r, in],
`.lora_B` [experts, out, r], `.router` [experts, in] and `.noise` [experts, in], and its domain,
MoELoRAConfig and provenance (base, round, ...) as JSON metadata under "moe_lora". Written by the
training package, read by the server and by training when it resumes; nothing else knows the layout.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open

from server.artifacts import ArtifactError, read_config, save_with_config
from server.chat.moe_lora import MoELoRA, MoELoRAConfig, StackedMoELoRALinear, covered

TENSORS = ("lora_A", "lora_B", "router", "noise")


def _parameters(stack: MoELoRA) -> dict[str, torch.Tensor]:
    return {"lora_A": stack.lora_A, "lora_B": stack.lora_B, "router": stack.router.weight,
            "noise": stack.noise.weight}


def save_stack(path: Path, modules: dict[str, MoELoRA], domain: str, config: MoELoRAConfig,
               extra: dict | None = None) -> None:
    tensors = {f"{name}.{key}": tensor for name, stack in modules.items() for key, tensor in _parameters(stack).items()}
    save_with_config(path, tensors, "moe_lora", {"domain": domain, "config": asdict(config), **(extra or {})})


def read_stack_metadata(path: Path) -> dict:
    meta = read_config(path, "moe_lora", "MoE-LoRA stack")
    try:
        meta["config"] = MoELoRAConfig(**{**meta["config"], "targets": tuple(meta["config"]["targets"])})
        return meta
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(path, f"not a MoE-LoRA stack ({exc})") from exc


def read_stack(path: Path, layers: dict[str, StackedMoELoRALinear], like: torch.Tensor) -> tuple[dict, dict[str, MoELoRA]]:
    """A saved stack as frozen modules for those of these projections it covers (device and float
    dtype of `like`), keyed by projection, attached to nothing: loading it leaves the model untouched."""
    meta = read_stack_metadata(path)
    layers = covered(layers, meta["config"])
    stacks = [MoELoRA(layer.in_features, layer.out_features, meta["config"]).to(like.device, like.dtype).eval()
              for layer in layers.values()]
    copy_stack_weights(path, layers, stacks)
    for stack in stacks:
        stack.requires_grad_(False)
    return meta, dict(zip(layers, stacks))


def copy_stack_weights(path: Path, layers: dict[str, StackedMoELoRALinear], stacks: list[MoELoRA]) -> None:
    """The file's tensors into these stacks (one per projection of `layers`, in order); refused,
    naming the file, when its projections or shapes are not exactly theirs."""
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            expected = {f"{name}.{key}" for name in layers for key in TENSORS}
            if keys != expected:
                raise ValueError(f"{len(keys ^ expected)} tensors differ from this model's wrapped projections")
            with torch.no_grad():
                for name, stack in zip(layers, stacks):
                    for key, target in _parameters(stack).items():
                        tensor = f.get_tensor(f"{name}.{key}")
                        if tensor.shape != target.shape:
                            raise ValueError(f"{name}.{key} has shape {tuple(tensor.shape)}, "
                                             f"expected {tuple(target.shape)}")
                        target.copy_(tensor)
    except (ValueError, OSError) as exc:
        raise ArtifactError(path, f"does not fit this model: {exc}") from exc
