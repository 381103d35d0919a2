"""scikit-learn's bundled handwritten digits (1,797 8x8 images), upsampled to 16x16 in [-1, 1].

One seeded split serves everything: the generators and the digit classifier train on `train`;
the classifier's accuracy and the Digit-FID reference use `heldout`, which nothing trains on.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SPLIT_SEED = 1797
HELDOUT_FRACTION = 0.2
IMAGE_SIZE = 16

# Captions for the text-to-image model. The held-out phrasings are never trained on: they test
# that prompts generalise beyond the training templates.
TRAIN_TEMPLATES = [
    "a handwritten {word}",
    "the digit {digit}",
    "number {word}, drawn by hand",
    "a picture of the number {digit}",
    "handwritten digit {word}",
    "an image of a {word}",
    "the number {word}",
    "digit {digit}",
    "a {word} written by hand",
    "a scanned handwritten {digit}",
]
HELDOUT_TEMPLATES = [
    "a drawing of the digit {word}",
    "someone wrote the number {digit}",
    "{word}, handwritten",
]


def caption(template: str, label: int) -> str:
    return template.format(word=DIGIT_NAMES[label], digit=label)


@dataclass(frozen=True)
class DigitSplit:
    train_images: torch.Tensor  # (N, 1, 16, 16) in [-1, 1]
    train_labels: torch.Tensor  # (N,) int64
    heldout_images: torch.Tensor
    heldout_labels: torch.Tensor


def upsample(images_8x8: np.ndarray) -> torch.Tensor:
    """sklearn's 0..16 intensities to [-1, 1], bilinear 8x8 -> 16x16."""
    x = torch.from_numpy(images_8x8.astype(np.float32) / 16.0).view(-1, 1, 8, 8)
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return x.clamp(0, 1) * 2 - 1


@lru_cache(maxsize=1)
def digit_split() -> DigitSplit:
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(data.target))
    n_heldout = int(round(HELDOUT_FRACTION * len(order)))
    heldout, train = order[:n_heldout], order[n_heldout:]
    images, labels = upsample(data.images), torch.from_numpy(data.target).long()
    return DigitSplit(images[train], labels[train], images[heldout], labels[heldout])
