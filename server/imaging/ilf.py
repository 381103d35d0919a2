"""Inner Loop Feedback (ILF; Gwilliam et al., arXiv 2501.13107), written for this server.

No library implements ILF, so this file does, in the diffusers hooks style: the backbone's code is
untouched; inside `ilf_enabled` its block list iterates, for the calling thread alone, as a list in
which the loop span is a `FeedbackLoop`:

    f_b  = input of the loop (output of the head blocks)
    f_e  = loop blocks(f_b)                               first pass
    g    = FB(f_e)                                        the feedback module, a backbone block
    out  = loop blocks(f_b), with s_i * g added to the input of loop block i     second pass

then the tail blocks and the final layer run as usual. `s` (one vector per loop block and channel)
starts at zero, so an untrained module reproduces the frozen backbone exactly. A step costs
N + L + 1 block evaluations for an N-block backbone with L loop blocks.
"""

from __future__ import annotations

import copy
import threading
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Literal

import torch
import torch.nn as nn
from server.artifacts import ArtifactError, load_with_config, save_with_config


@dataclass(frozen=True)
class ILFConfig:
    """Everything that defines a trained module; saved as the artifact's metadata."""

    backbone: str  # the image model (manifest name) it was trained on
    num_blocks: int  # N of that backbone
    width: int  # D of that backbone
    loop_start: int  # first loop block (b + 1); >= 1, so block 0 stays the backbone's own
    loop_end: int  # last loop block (e), inclusive
    steps: int  # ILF sampling steps the module was distilled for
    scheduler: Literal["ddim", "dpm++"] = "ddim"
    teacher_steps: int = 20
    guidance_scale: float | None = None  # the model's default guidance when distilled
    feedback_init: Literal["copy", "scratch"] = "copy"
    guidance_range: tuple[float, float] | None = None  # scales distilled across (None: guidance_scale alone)
    reference_steps: int | None = None  # the reference sampler's (DDIM) steps its rollouts were matched to

    @property
    def served_guidance(self) -> tuple[float, float] | None:
        """The guidance scales it serves: its distilled range; a module from before ranges were
        recorded, the scale it was distilled at; None (any) when neither was recorded."""
        if self.guidance_range is not None:
            return tuple(self.guidance_range)
        return None if self.guidance_scale is None else (self.guidance_scale, self.guidance_scale)

    def serves_guidance(self, scale: float) -> bool:
        served = self.served_guidance
        return served is None or served[0] - 1e-6 <= scale <= served[1] + 1e-6

    def __post_init__(self) -> None:
        if not 1 <= self.loop_start <= self.loop_end < self.num_blocks:
            raise ValueError(
                f"loop blocks {self.loop_start}..{self.loop_end} must lie in 1..{self.num_blocks - 1}"
            )

    @classmethod
    def for_transformer(cls, transformer: nn.Module, name: str, **settings) -> "ILFConfig":
        """A config whose backbone fields (name, N, D) are read off the transformer itself."""
        return cls(backbone=name, num_blocks=len(transformer.transformer_blocks),
                   width=transformer_width(transformer), **settings)

    @property
    def loop_length(self) -> int:
        return self.loop_end - self.loop_start + 1

    @property
    def blocks_per_step(self) -> int:
        return self.num_blocks + self.loop_length + 1


class FeedbackModule(nn.Module):
    """FB (a block of the backbone's own class and settings) and the rescaling s, shape [L, D]."""

    def __init__(self, block: nn.Module, loop_length: int, width: int):
        super().__init__()
        self.block = block
        self.scale = nn.Parameter(torch.zeros(loop_length, width))

    @classmethod
    def for_backbone(cls, transformer: nn.Module, config: ILFConfig, seed: int = 0) -> "FeedbackModule":
        template = transformer.transformer_blocks[config.loop_end]
        block = copy.deepcopy(template)
        if config.feedback_init == "scratch":
            torch.manual_seed(seed)
            for module in block.modules():
                if hasattr(module, "reset_parameters") and module is not block:
                    module.reset_parameters()
        block.requires_grad_(True)
        return cls(block, config.loop_length, config.width)


class FeedbackLoop(nn.Module):
    """Stands in for the loop span of the block list; every block gets the backbone's own kwargs."""

    def __init__(self, loop_blocks: list[nn.Module], feedback: FeedbackModule):
        super().__init__()
        self.loop_blocks = nn.ModuleList(loop_blocks)
        self.feedback = feedback

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        f_b = hidden_states
        for block in self.loop_blocks:
            hidden_states = block(hidden_states, *args, **kwargs)
        if hidden_states is f_b:  # a cache (FirstBlockCache) skipped the loop's blocks: nothing to feed back
            return hidden_states
        g = self.feedback.block(hidden_states, *args, **kwargs)
        hidden_states = f_b
        for i, block in enumerate(self.loop_blocks):
            hidden_states = block(hidden_states + self.feedback.scale[i].to(g.dtype) * g, *args, **kwargs)
        return hidden_states


# per thread (and asyncio task): the looped block lists in force, by the id of the block list they stand for
_LOOPED: ContextVar[dict[int, list[nn.Module]]] = ContextVar("ilf_looped", default={})
_INSTALL = threading.Lock()


class LoopableBlocks(nn.ModuleList):
    """The backbone's own block list (same modules, same state-dict keys), iterated as the calling
    context's looped list while `ilf_enabled` holds one for it: the backbone's forward (`for block in
    self.transformer_blocks`) then runs the loop, and every other thread, or model, sampling at the same
    time still sees its own blocks. Indexing and `len` stay the backbone's."""

    def __iter__(self):
        looped = _LOOPED.get().get(id(self))
        return iter(looped) if looped is not None else super().__iter__()


def loopable_blocks(transformer: nn.Module) -> LoopableBlocks:
    """The transformer's block list as a `LoopableBlocks`, put in place once (the only change made to
    the backbone, and one that changes nothing until a context turns a loop on)."""
    with _INSTALL:
        blocks = transformer.transformer_blocks
        if not isinstance(blocks, LoopableBlocks):
            blocks = LoopableBlocks(list(blocks))
            transformer.transformer_blocks = blocks
        return blocks


@contextmanager
def ilf_enabled(transformer: nn.Module, feedback: FeedbackModule, config: ILFConfig) -> Iterator[None]:
    """Run the transformer with the feedback loop inside, in this thread only, for this block."""
    blocks = loopable_blocks(transformer)
    plain = list(blocks._modules.values())
    looped = (plain[: config.loop_start]
              + [FeedbackLoop(plain[config.loop_start: config.loop_end + 1], feedback)]
              + plain[config.loop_end + 1:])
    token = _LOOPED.set({**_LOOPED.get(), id(blocks): looped})
    try:
        yield
    finally:
        _LOOPED.reset(token)


def transformer_width(transformer: nn.Module) -> int:
    return transformer.config.num_attention_heads * transformer.config.attention_head_dim


@dataclass
class LoadedILF:
    feedback: FeedbackModule
    config: ILFConfig

    def enabled(self, transformer: nn.Module):
        return ilf_enabled(transformer, self.feedback, self.config)


def check_attachable(transformer: nn.Module, config: ILFConfig, name: str) -> None:
    blocks = len(transformer.transformer_blocks)
    width = transformer_width(transformer)
    if (config.num_blocks, config.width) != (blocks, width):
        raise ValueError(
            f"ILF module is for a {config.num_blocks}-block, width-{config.width} backbone; "
            f"{name} has {blocks} blocks of width {width}"
        )


def save_ilf(path: Path, feedback: FeedbackModule, config: ILFConfig) -> None:
    """safetensors with the configuration in its metadata (what the server checks on load)."""
    tensors = {f"feedback.{k}": v for k, v in feedback.state_dict().items()}
    save_with_config(path, tensors, "ilf_config", asdict(config))


def load_ilf(path: Path, transformer: nn.Module, model_name: str) -> LoadedILF:
    """Refuses (naming the file) a module that does not belong to this backbone."""
    tensors, meta = load_with_config(path, "ilf_config", "ILF artifact")
    try:
        config = ILFConfig(**meta)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(path, f"not an ILF artifact ({exc})") from exc
    tensors = {k.removeprefix("feedback."): v for k, v in tensors.items()}
    if config.backbone != model_name:
        raise ArtifactError(path, f"ILF module was trained for {config.backbone!r}, not {model_name!r}")
    try:
        check_attachable(transformer, config, model_name)
        feedback = FeedbackModule.for_backbone(transformer, config)
        feedback.load_state_dict(tensors, strict=True)
    except (ValueError, RuntimeError) as exc:
        raise ArtifactError(path, f"does not match {model_name}: {exc}") from exc
    param = next(transformer.parameters())
    return LoadedILF(feedback.to(param.device, param.dtype).eval().requires_grad_(False), config)
