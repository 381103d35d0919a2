"""A generated multi-domain world for the chat zoo: seeded, checkable, small enough to learn on CPU.

Five domains of (prompt, answer) tasks, each answer ending in a final answer that is checked
exactly ("Answer: 56"), plus a cross-domain set whose answers need two domains at once and which is
never trained on, and everyday prompts that belong to no domain. Each domain's task kinds are the
forms users ask of its skills (one operation or a chain, digits or words, a comparison either way
round, a question or a command, short or verbose), each asked in many phrasings; the last phrasings
of every kind are held out of training (validation, test), and in every domain one form is held
out as a whole (`TaskKind.held_out_form`: asked in test only), so an evaluation
measures the skill, not the template, and generalisation to a form, not only to a wording. The
same facts also appear as plain prose (`general_text`): what zoo-lm is pretrained on, so it knows
the world but not the task formats the stacks must add.

The medical domain is a fixed, invented table (made-up conditions and drugs): a lookup the model
must memorise, not advice.
"""

from __future__ import annotations

import random
from dataclasses import replace

from training.data.world_everyday import GENERAL_KINDS, PROBE_PHRASINGS
from training.data.world_math import math_kinds
from training.data.world_phrasings import CROSS_KINDS, KINDS
from training.data.world_tasks import (
    DOMAINS, MEDICAL_TABLE, NAMES, SPLITS, WORDS, Example, TaskKind, final_answer, general_corpus, general_text,
)

__all__ = ["CROSS_KINDS", "DOMAINS", "GENERAL_KINDS", "KINDS", "MEDICAL_TABLE", "NAMES", "PROBE_PHRASINGS", "WORDS",
           "Example", "TaskKind", "examples", "final_answer", "general_corpus", "general_text", "held_out", "kinds_of",
           "held_out_forms", "math_kinds", "probe_prompts"]


def probe_prompts(domain: str, per_phrasing: int, seed: int = 0) -> list[Example]:
    """Distinct prompts of a domain ("general" too) in its PROBE_PHRASINGS, `per_phrasing` of each."""
    out = []
    for kind in kinds_of(domain):
        probe = replace(kind, phrasings=PROBE_PHRASINGS[kind.name], held_out=(0, 0), held_out_form=False)
        rng = random.Random(f"{seed}/{domain}/{kind.name}/probe")
        pool: dict[str, Example] = {}
        for _ in range(200 * per_phrasing * len(probe.phrasings)):
            example = probe.example(rng, "train")
            if sum(e.phrasing == example.phrasing for e in pool.values()) < per_phrasing:
                pool.setdefault(example.prompt, example)
            if len(pool) == per_phrasing * len(probe.phrasings):
                break
        out += pool.values()
    return out


def kinds_of(domain: str) -> list[TaskKind]:
    return {"cross": CROSS_KINDS, "general": GENERAL_KINDS}.get(domain) or KINDS[domain]


def held_out_forms(domain: str) -> set[str]:
    """The kinds of a domain that no training example has (their every prompt is held out)."""
    return {k.name for k in kinds_of(domain) if k.held_out_form}


def examples(domain: str, split: str, count: int, seed: int = 0, kinds: list[TaskKind] | None = None) -> list[Example]:
    """`count` examples of one domain ("cross" for the cross-domain set) in one split, the task kinds
    taking turns. Training draws may repeat (they are a stream of batches); val and test examples are
    distinct (`held_out`: fewer than `count` where the kinds have fewer distinct prompts), and their
    phrasings are ones training never sees."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}")
    kinds = [k for k in kinds or kinds_of(domain) if k.phrasings_of(split)]
    if split == "train":
        rng = random.Random(f"{seed}/{domain}/{split}")
        return [kinds[i % len(kinds)].example(rng, split) for i in range(count)]
    return held_out(domain, split, -(-count // len(kinds)), seed, kinds)[:count]


def held_out(domain: str, split: str, per_kind: int, seed: int = 0, kinds: list[TaskKind] | None = None) -> list[Example]:
    """Distinct prompts of a held-out split, at most `per_kind` of every task kind (all of a kind's
    distinct prompts when it has fewer: the medical table has 8 conditions), kinds interleaved."""
    pools = []
    for kind in [k for k in kinds or kinds_of(domain) if k.phrasings_of(split)]:
        rng = random.Random(f"{seed}/{domain}/{kind.name}/{split}")
        pool: dict[str, Example] = {}
        for _ in range(200 * per_kind):
            example = kind.example(rng, split)
            pool.setdefault(example.prompt, example)
            if len(pool) == per_kind:
                break
        pools.append(list(pool.values()))
    return [pool[i] for i in range(per_kind) for pool in pools if i < len(pool)]
