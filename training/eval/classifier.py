"""The digit classifier behind the image yardstick: class accuracy of generated digits, and the
penultimate features whose statistics Digit-FID compares.

Trained on the training part of the shared digit split (the generators' data), evaluated on the
held-out part. Small shifts and pixel noise in training keep it robust to generator artifacts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from server.artifacts import atomic_write_bytes
from training.data.digits import DigitSplit

FEATURES = 32  # few enough dimensions for a stable covariance from a few hundred images


class DigitClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),   # 8x8
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.ReLU(),  # 4x4
        )
        self.embed_layer = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(128 * 16, FEATURES), nn.ReLU())
        self.head = nn.Linear(FEATURES, 10)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features of images in [-1, 1], shape (N, 1, 16, 16)."""
        return self.embed_layer(self.conv(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(images))


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    shifts = torch.randint(-1, 2, (2,), generator=generator).tolist()
    x = torch.roll(x, shifts=shifts, dims=(2, 3))
    return (x + 0.1 * torch.randn(x.shape, generator=generator)).clamp(-1, 1)


@torch.enable_grad()
def train_classifier(split: DigitSplit, epochs: int = 25, seed: int = 0) -> DigitClassifier:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    n = len(split.train_images)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, 64):
            idx = order[start : start + 64]
            loss = F.cross_entropy(model(_augment(split.train_images[idx], generator)), split.train_labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (model(images).argmax(1) == labels).float().mean().item()


def load_or_train_classifier(path: Path, split: DigitSplit) -> DigitClassifier:
    """The same yardstick every run: trained once with a fixed seed, then read from safetensors."""
    path = Path(path)
    model = DigitClassifier()
    if path.is_file():
        model.load_state_dict(load_file(path))
        return model.eval()
    model = train_classifier(split)
    tmp = path.with_suffix(".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    held = accuracy(model, split.heldout_images, split.heldout_labels)
    save_file(model.state_dict(), str(tmp), metadata={"heldout_accuracy": json.dumps(held)})
    atomic_write_bytes(path, tmp.read_bytes())
    tmp.unlink()
    return model
