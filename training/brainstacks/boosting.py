"""The inner loop: residual boosting of one domain (Brainstacks §3.3, Algorithm 1).

Round after round, a fresh MoE-LoRA stack is trained on top of the frozen earlier ones: keep the
best-validation checkpoint, stop early on a validation spike or when validation stops improving,
freeze, and stop adding rounds once a round gains less than `min_gain` (that round's stack is
dropped: it would cost compute and add nothing).
"""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from server.chat.moe_lora import MoELoRAConfig, covered_layers
from training.brainstacks.stacks import TrainableMoELoRA, add_stack, aux_loss, freeze, remove_last_stack
from training.brainstacks.data import Batch, batches, device_of, reply_token_losses
from training.data.world import Example


# On SmolLM2-135M (2 CPU cores, batch 8): 4 experts of rank 4 are 6.1M parameters (4.5% of the base)
# at 5.4 s a step; 4 x r16 (15.4%) took 7.8 s and learned the worked math no better. On the upper
# half of the layers only (3.0M, 2.3%), a step costs about half: backward stops at layer 15
# (docs/brainstacks.md).
SMALL_STACK = MoELoRAConfig(experts=4, rank=4, alpha=4.0, top_k=2, upper_layers=0.5)


@dataclass(frozen=True)
class BoostingConfig:
    stack: MoELoRAConfig = SMALL_STACK
    max_rounds: int = 2
    # SmolLM2's five domains at 60 steps still fell in validation loss between steps 40 and 60 (and in
    # the 20 steps of a second round), so 100: the chat zoo still builds in under an hour on 2 cores
    steps_per_round: int = 100
    later_round_steps: int | None = 20  # rounds after the first correct what is left: fewer steps (None: as many)
    batch_size: int = 8
    # measured: 2e-3 made validation spike within 200 steps; 1e-3 descends steadily, and a cosine
    # decay to 1e-4 over SmolLM2's 100 math steps ended higher (0.069 against 0.048): steps, not noise, limit it
    lr: float = 1e-3
    domain_steps: tuple[tuple[str, int], ...] = ()  # (domain, first-round steps) where not steps_per_round
    eval_every: int = 20
    patience: int = 3  # evaluations without improvement before a round stops
    spike: float = 0.25  # a validation loss this much above the round's best stops the round
    min_gain: float = 0.002  # validation-loss gain below which no further round is added (paper: 0.002)
    seed: int = 0


@dataclass
class RoundResult:
    round: int
    start_loss: float
    best_loss: float
    best_step: int
    steps: int
    stop: str  # "budget", "plateau" or "spike"
    seconds: float
    curve: list[tuple[int, float]]  # (step, validation loss)
    kept: bool = True

    @property
    def gain(self) -> float:
        return self.start_loss - self.best_loss


@torch.no_grad()
def validation_loss(model: torch.nn.Module, val: list[Batch]) -> float:
    """Mean cross-entropy per reply token (token-weighted over all batches)."""
    total, count = 0.0, 0
    device = device_of(model)
    for batch in val:
        batch = batch.to(device)
        losses, _ = reply_token_losses(model, batch)
        total += losses.sum().item()
        count += len(losses)
    return total / max(count, 1)


def _snapshot(stacks: list[TrainableMoELoRA]) -> list[dict[str, torch.Tensor]]:
    return [{k: v.detach().clone() for k, v in s.state_dict().items()} for s in stacks]


def train_round(model, tokenizer, domain: str, train: list[Example], val: list[Batch], cfg: BoostingConfig,
                round_index: int, start_loss: float, steps: int | None = None,
                bases: dict[str, torch.Tensor] | None = None,
                side: str = "output") -> tuple[RoundResult, list[TrainableMoELoRA]]:
    """Train one fresh stack of `domain`; returns its result and the (frozen, best-checkpoint) stack.
    `bases` (by wrapped projection) confine its output (side "output") or its input (side "input")
    to a null space of earlier domains while it trains; freezing folds the projection into the stack."""
    started = time.perf_counter()
    stacks = add_stack(model, domain, cfg.stack, seed=cfg.seed * 1000 + round_index)
    for name, stack in zip(covered_layers(model, cfg.stack), stacks):
        setattr(stack, "input_basis" if side == "input" else "output_basis", (bases or {}).get(name))
    params = [p for s in stacks for p in s.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    rng = random.Random(f"{cfg.seed}/{domain}/{round_index}")
    order = list(train)
    best, best_step, best_state = start_loss, 0, _snapshot(stacks)
    curve, stale, stop = [(0, start_loss)], 0, "budget"
    first_round = dict(cfg.domain_steps).get(domain, cfg.steps_per_round)
    budget = steps or (first_round if round_index == 0 or cfg.later_round_steps is None
                       else cfg.later_round_steps)

    def shuffled_batches():
        while True:
            rng.shuffle(order)
            yield from batches(tokenizer, order, cfg.batch_size)

    stream = shuffled_batches()
    device = device_of(model)
    bar = tqdm(range(1, budget + 1), desc=f"{domain} round {round_index + 1}", unit="step", leave=False)
    step = 0
    for step in bar:
        for s in stacks:
            s.train()  # router noise on for the active stack only; frozen stacks stay in eval
        batch = next(stream).to(device)
        loss = reply_token_losses(model, batch)[0].mean() + cfg.stack.aux_weight * aux_loss(stacks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % cfg.eval_every == 0 or step == budget:
            for s in stacks:
                s.eval()
            current = validation_loss(model, val)
            curve.append((step, current))
            bar.set_postfix(val=f"{current:.4f}", best=f"{best:.4f}")
            if current < best:
                best, best_step, best_state, stale = current, step, _snapshot(stacks), 0
            else:
                stale += 1
            if current > best * (1 + cfg.spike):
                stop = "spike"
                break
            if stale >= cfg.patience:
                stop = "plateau"
                break
    for s, state in zip(stacks, best_state):
        s.load_state_dict(state)
    freeze(stacks)
    result = RoundResult(round_index + 1, start_loss, best, best_step, step, stop,
                         time.perf_counter() - started, curve)
    return result, stacks


def boost_domain(model, tokenizer, domain: str, train: list[Example], val: list[Batch], cfg: BoostingConfig,
                 bases: dict[str, torch.Tensor] | None = None,
                 side: str = "output") -> tuple[list[RoundResult], list[list[TrainableMoELoRA]]]:
    """Residual boosting: rounds of frozen stacks while each round still gains `min_gain`."""
    results, kept = [], []
    current = validation_loss(model, val)
    for round_index in itertools.count():
        if round_index >= cfg.max_rounds:
            break
        result, stacks = train_round(model, tokenizer, domain, train, val, cfg, round_index, current,
                                     bases=bases, side=side)
        if round_index > 0 and result.gain < cfg.min_gain:
            remove_last_stack(model, domain)
            result.kept = False
            results.append(result)
            break
        results.append(result)
        kept.append(stacks)
        current = result.best_loss
    return results, kept


def round_summary(results: list[RoundResult]) -> list[dict]:
    return [{**asdict(r), "gain": r.gain} for r in results]
