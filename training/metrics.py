"""Image metrics of the yardstick: Fréchet distance of classifier features (Digit-FID), bootstrap
intervals, and fidelity to a reference image (PSNR, SSIM). Images are in [0, 1]."""

from __future__ import annotations

from typing import Callable

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F

PSNR_CAP_DB = 100.0  # identical images: report the cap, not infinity


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) of two feature sets (rows = samples)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b)
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))
    return max(value, 0.0)


def bootstrap_interval(statistic: Callable[..., float], *samples: np.ndarray, rounds: int = 200,
                       seed: int = 0, level: float = 0.95, recentre: bool = False) -> tuple[float, float]:
    """Percentile interval: every sample array is resampled with replacement, independently.

    recentre: shift the interval by the bootstrap's own bias (median of the resampled statistics
    minus the statistic). Needed for Fréchet distances: duplicates in a resample shrink its
    effective size, which inflates the distance (measured: the whole percentile interval lay above
    the estimate), so the raw interval would not describe the estimate's uncertainty.
    """
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(rounds):
        resampled = [s[rng.integers(0, len(s), len(s))] for s in samples]
        values.append(statistic(*resampled))
    tail = (1 - level) / 2 * 100
    lo, hi = float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))
    if recentre:
        bias = float(np.median(values)) - statistic(*samples)
        lo, hi = max(lo - bias, 0.0), hi - bias
    return lo, hi


def psnr(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for data range 1."""
    mse = ((images - reference) ** 2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-12))).clamp(max=PSNR_CAP_DB)


def _gaussian_window(size: int = 7, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(images: torch.Tensor, reference: torch.Tensor, window: int = 7) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) with a 7x7 Gaussian window, suited to 16x16 images."""
    c1, c2 = 0.01**2, 0.03**2
    images, reference = images.double(), reference.double()  # variances cancel badly in float32
    channels = images.shape[1]
    w = _gaussian_window(window).expand(channels, 1, window, window).to(images)

    def blur(x):
        return F.conv2d(x, w, groups=channels)

    mu_x, mu_y = blur(images), blur(reference)
    var_x = blur(images * images) - mu_x**2
    var_y = blur(reference * reference) - mu_y**2
    cov = blur(images * reference) - mu_x * mu_y
    score = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return score.flatten(1).mean(1).float()
