"""Greedy replies from the model as it stands (its stacks at the route set on it), batched with left
padding, and the exact match of their final answers: the build's own checks and the router's
choice of weighting use them; `training eval` measures with them."""

from __future__ import annotations

import torch

from training.brainstacks.data import prompt_ids
from training.data.world import Example


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


def exact_match(model, tokenizer, items: list[Example], **kwargs) -> tuple[float, list[dict]]:
    """Share of replies whose stated final answer equals the expected one, and the per-item record."""
    replies = generate_replies(model, tokenizer, items, **kwargs)
    records = [{"prompt": e.prompt, "expected": e.final, "reply": r, "correct": e.matches(r)}
               for e, r in zip(items, replies)]
    return sum(r["correct"] for r in records) / max(len(records), 1), records
