"""The learning-rate schedule every zoo trainer uses: linear warm-up, then cosine decay to 10%."""

from __future__ import annotations

import math


def warmup_cosine(base_lr: float, step: int, warmup: int, total: int) -> float:
    """The learning rate at `step` (0-based) of `total`; base_lr = 1 gives the multiplier."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return base_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
