"""`python -m training zoo images`: the embedded image zoo, trained on CPU with fixed seeds.

- digits-dit: class-conditional DiTTransformer2DModel, pixel space, x0-prediction.
- digits-pixart: PixArtTransformer2DModel conditioned on MiniLM token states of generated captions.

Both are 12 blocks deep and narrow (width 64, 1.2M parameters), 2x2 patches on 16x16 images
(64 tokens), x0-prediction (see `architectures.noise_scheduler`). Measured on 2 cores: 4x4 patches
(16 tokens, width 96) cost a third per step but drew 30% recognisable digits where 2x2 patches drew
61% after the same 2.5 minutes. Depth is for ILF, whose per-step overhead is (L+1)/N of a step for
an N-block backbone.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from server.artifacts import atomic_folder
from server.imaging.backbones import PromptEncoder
from server.manifest import BuiltManifest, ImageModel, Source, TextEncoder
from training.artifacts import runs_folder
from training.data.digits import TRAIN_TEMPLATES, caption, digit_split
from training.zoo import architectures as arch
from training.zoo.diffusion import DenoiserTraining, train_denoiser, write_history

log = logging.getLogger(__name__)

NUM_CLASSES = 10


@dataclass(frozen=True)
class ImageZooRecipe:
    shape: arch.ImageShape
    dit: DenoiserTraining
    pixart: DenoiserTraining


FULL = ImageZooRecipe(
    shape=arch.ImageShape(sample_size=16, channels=1, layers=12, heads=2, head_dim=32, patch_size=2),
    dit=DenoiserTraining(steps=1300, batch_size=64, lr=2e-3, warmup_steps=100, ema_decay=0.995, seed=0),
    pixart=DenoiserTraining(steps=1000, batch_size=64, lr=2e-3, warmup_steps=100, ema_decay=0.995, seed=1),
)
# Every code path of the full build in seconds: what the tests run.
MICRO = ImageZooRecipe(
    shape=arch.ImageShape(sample_size=16, channels=1, layers=2, heads=2, head_dim=16, patch_size=4),
    dit=DenoiserTraining(steps=30, batch_size=16, warmup_steps=5, ema_decay=0.9),
    pixart=DenoiserTraining(steps=30, batch_size=16, warmup_steps=5, ema_decay=0.9, seed=1),
)


def train_digits_dit(folder: Path, recipe: ImageZooRecipe, runs_dir: Path) -> None:
    data = digit_split()
    model = arch.make_dit(recipe.shape, NUM_CLASSES, seed=recipe.dit.seed)
    for block in model.transformer_blocks:
        # diffusers drops labels inside every block in train mode; we drop them once, ourselves
        block.norm1.emb.class_embedder.dropout_prob = 0.0

    def condition(idx: torch.Tensor, dropped: torch.Tensor) -> dict:
        return {"class_labels": torch.where(dropped, NUM_CLASSES, data.train_labels[idx])}

    _train_and_save(model, condition, recipe.dit, recipe.shape, folder, runs_dir / "digits-dit", "digits-dit")


def _train_and_save(model, condition, cfg: DenoiserTraining, shape: arch.ImageShape, folder: Path,
                    runs_dir: Path, name: str) -> None:
    """Train, save the EMA weights in diffusers layout next to the schedule, log the run."""
    start = time.perf_counter()
    served, history = train_denoiser(model, digit_split().train_images, condition, cfg, name)
    served.save_pretrained(folder / "transformer")
    arch.save_scheduler(folder)
    extra = {"parameters": sum(p.numel() for p in served.parameters()),
             "seconds": time.perf_counter() - start, "shape": shape.__dict__}
    write_history(history, cfg, extra, runs_dir, name)


def train_digits_pixart(folder: Path, encoder_folder: Path, max_length: int, recipe: ImageZooRecipe,
                        runs_dir: Path) -> None:
    data = digit_split()
    encoder = PromptEncoder(TextEncoder(kind="minilm", source=Source(path="."), max_length=max_length),
                            encoder_folder, "cpu", torch.float32)
    # Every (digit, training template) caption, encoded once: [10, T, L, 384] and its mask.
    captions = [caption(t, d) for d in range(NUM_CLASSES) for t in TRAIN_TEMPLATES]
    states, mask = encoder.encode(captions)
    states = states.view(NUM_CLASSES, len(TRAIN_TEMPLATES), *states.shape[1:])
    mask = mask.view(NUM_CLASSES, len(TRAIN_TEMPLATES), -1)
    empty_states, empty_mask = encoder.encode([""])  # the server's CFG null prompt

    model = arch.make_pixart(recipe.shape, caption_channels=encoder.width, seed=recipe.pixart.seed)
    pick = torch.Generator().manual_seed(recipe.pixart.seed + 100)

    def condition(idx: torch.Tensor, dropped: torch.Tensor) -> dict:
        labels = data.train_labels[idx]
        template = torch.randint(len(TRAIN_TEMPLATES), (len(idx),), generator=pick)
        s, m = states[labels, template], mask[labels, template]
        s = torch.where(dropped[:, None, None], empty_states.expand_as(s), s)
        m = torch.where(dropped[:, None], empty_mask.expand_as(m), m)
        return {"encoder_hidden_states": s, "encoder_attention_mask": m,
                "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}

    _train_and_save(model, condition, recipe.pixart, recipe.shape, folder, runs_dir / "digits-pixart",
                    "digits-pixart")


ZOO_MODELS = ("digits-dit", "digits-pixart")


def is_built(entry: ImageModel, manifests: BuiltManifest) -> bool:
    return not entry.placeholder and bool(entry.source.files) and manifests.file(entry.source.path).is_dir()


def build_image_zoo(manifests: BuiltManifest, recipe: ImageZooRecipe = FULL, runs_dir: Path | None = None,
                    if_missing: bool = False) -> bool:
    """Train the models (with if_missing: those not built yet), each written atomically and recorded
    with its checksums in the built manifest as soon as it is trained. False when nothing was built."""
    by_name = {m.name: m for m in manifests.read().image}
    if missing := set(ZOO_MODELS) - set(by_name):
        raise SystemExit(f"the template {manifests.template} names no {sorted(missing)}: nothing to build")
    todo = [name for name in ZOO_MODELS if not (if_missing and is_built(by_name[name], manifests))]
    if not todo:
        return False
    runs_dir = runs_dir or runs_folder(manifests) / "zoo"
    if recipe is FULL:
        print(f"Training {', '.join(todo)}: about 8-9 minutes each on 2 CPU cores, once.", flush=True)
    torch.manual_seed(0)
    for name in todo:
        entry = by_name[name]
        update = {}
        if name == "digits-dit":
            with atomic_folder(manifests.file(entry.source.path)) as tmp:
                train_digits_dit(tmp, recipe, runs_dir)
        else:
            encoder = entry.text_encoder
            with atomic_folder(manifests.file(encoder.source.path)) as tmp:
                arch.copy_minilm(tmp)
            update["text_encoder"] = encoder.model_copy(update={"source": manifests.recorded(encoder.source)})
            with atomic_folder(manifests.file(entry.source.path)) as tmp:
                train_digits_pixart(tmp, manifests.file(encoder.source.path), encoder.max_length, recipe, runs_dir)
        # a new backbone: any ILF module distilled from the old one no longer applies
        built = entry.model_copy(update={"source": manifests.recorded(entry.source), "placeholder": False,
                                         "ilf": None, **update})
        manifest = manifests.read()  # re-read: only this entry changes
        manifests.write(manifest.model_copy(update={"image": [built if m.name == name else m
                                                              for m in manifest.image]}))
    return True
