"""Intervals and tests for proportions measured on held-out prompts: a proportion's Wilson interval,
and for paired outcomes (the same prompts before and after) McNemar's exact test and the interval of
the difference."""

from __future__ import annotations

import math


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion: sound at 0 and 1 and for small n, unlike p +- 1.96 se."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_p(lost: int, gained: int) -> float:
    """Two-sided exact McNemar test on paired outcomes: `lost` prompts right before and wrong after,
    `gained` the reverse (a binomial test of the discordant pairs at p = 1/2)."""
    n, k = lost + gained, min(lost, gained)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_difference_interval(lost: int, gained: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wald interval of a paired difference in proportions (after - before) over n pairs."""
    if n == 0:
        return -1.0, 1.0
    d = (gained - lost) / n
    se = math.sqrt(max(lost + gained - n * d * d, 0.0)) / n
    return d - z * se, d + z * se
