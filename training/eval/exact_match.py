"""Exact match of final answers: greedy replies from the model as it stands, batched with left padding."""

from __future__ import annotations

import math

import torch

from training.brainstacks.data import prompt_ids
from training.data.world import Example, final_answer


@torch.no_grad()
def generate_replies(model, tokenizer, items: list[Example], max_new_tokens: int = 48,
                     batch_size: int = 32, starts: list[str] | None = None) -> list[str]:
    """Greedy replies; with `starts`, each reply continues the given start of the assistant's turn
    (the start itself is not returned)."""
    replies = []
    pad = tokenizer.pad_token_id
    starts = starts or [""] * len(items)
    for start in range(0, len(items), batch_size):
        prompts = [prompt_ids(tokenizer, e.messages()) + tokenizer(s, add_special_tokens=False).input_ids
                   for e, s in zip(items[start : start + batch_size], starts[start : start + batch_size])]
        length = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), length), pad, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompts):
            input_ids[row, length - len(ids):] = torch.tensor(ids)
            mask[row, length - len(ids):] = 1
        device = next(model.parameters()).device
        out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        replies += tokenizer.batch_decode(out[:, length:], skip_special_tokens=True)
    return replies


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


def exact_match(model, tokenizer, items: list[Example], **kwargs) -> tuple[float, list[dict]]:
    """Share of replies whose stated final answer equals the expected one, and the per-item record."""
    replies = generate_replies(model, tokenizer, items, **kwargs)
    records = [{"prompt": e.prompt, "expected": e.final, "reply": r, "correct": final_answer(r) == e.final}
               for e, r in zip(items, replies)]
    return sum(r["correct"] for r in records) / max(len(records), 1), records
