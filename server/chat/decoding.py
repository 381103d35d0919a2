"""Decoding an answer, step by step, alone or in a batch of rows routed differently.

An answer's prompt is read by the meta-router (for "auto": its route), then prefilled alone with
its route (its first token sampled there), both in parts of a few hundred tokens at most that the
chat engine interleaves with other rows' decode steps (`Decoding.advance`: a long prompt never
stalls the batch for longer than a part); then it is decoded one token a step, each step one
forward for every row of its batch (`DecodeBatch`), each row with its own domain weights (per-row
weights over the stacks, `moe_lora.batch_route`: no weight merging), its own sampling settings
and its own `StoppingRule`. The chat engine (batching.py) runs many answers this way; `generate`
runs one alone, through the very same steps (the registry's warm-ups, tests and benchmarks).

The KV cache is transformers' DynamicCache with rows left-padded to a common length: a joining
row's cache is spliced in, and padding columns no row needs are dropped when rows leave. Each row
keeps its own positions, so padding changes nothing but float rounding (bitsandbytes and the
attention kernels take other code paths at batch > 1; tests/test_batching.py bounds the
difference under teacher forcing). Sliding-window layers (Gemma 2 and 3, Mistral) keep only their
window's last columns: rows are right-aligned, so those are each row's own last tokens, and the
layer's count of columns seen is the batch's; the attention mask of a sliding layer is cut from
the batch's mask at that count. A cache of any other kind decodes one row per batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from server.chat.moe_lora import batch_route
from server.chat.router import Route, RoutePlan, RouterPass
from server.chat.stopping import StoppingRule

if TYPE_CHECKING:
    from server.chat.model import ChatModel
    from server.chat.structured import Constraint, OutputFormat


@dataclass(frozen=True)
class ChatJob:
    messages: list[dict[str, str]]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    route: Route = "auto"
    stop: tuple[str, ...] = ()  # the answer ends before the first of these
    input_ids: torch.Tensor | None = None  # the rendered prompt, when the request path already has it
    min_tokens: int = 0  # the end of turn is not sampled before this many tokens (fixed-length benchmarks)
    output_format: OutputFormat | None = None  # structured output: the grammar every token keeps to


@dataclass
class ChatResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn or a stop sequence) or "length" (max_new_tokens reached)
    token_times: list[float] = field(default_factory=list)  # perf_counter() per generated token
    started: float = 0.0
    plan: RoutePlan | None = None  # the stacks this answer ran with, and why
    route_seconds: float = 0.0  # planning the route (the meta-router's forward, for "auto")
    format_complete: bool | None = None  # with an output format: the answer is a whole document of it


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token from one row's logits: greedy at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return int(logits.argmax())
    # shifted, in float64 (where a temperature of 1e-300 is not 0): at a tiny temperature the scaled
    # logits go to -inf but for the largest (0), the greedy limit, instead of overflowing to nan
    logits = logits.double()
    probs = F.softmax((logits - logits.max()) / temperature, dim=-1).float()
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # the smallest set whose mass reaches top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@dataclass(eq=False)
class Decoding:
    """One answer being decoded: its route plan, its tokens so far, its sampling and stopping state."""

    chat: ChatModel
    job: ChatJob
    plan: RoutePlan | None = None
    prompt_tokens: int = 0
    tokens: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    started: float = 0.0
    route_seconds: float = 0.0
    generator: torch.Generator | None = None
    rule: StoppingRule | None = None
    finish_reason: str | None = None
    input_ids: torch.Tensor | None = None  # the rendered prompt, until all of it is in the cache
    cache: DynamicCache | None = None  # the prompt's KV cache as it fills; then the batch holds it
    prefilled: int = 0  # prompt tokens in the cache
    routing: RouterPass | None = None  # the meta-router's read of the prompt, while it runs ("auto")
    constraint: Constraint | None = None  # the output format's matcher, for this row alone

    def start(self, plan: RoutePlan | None = None) -> None:
        """Ready the answer: its prompt, stopping rule and sampler, and its route plan when given or
        when no router needs to read the prompt (else the router's read comes first, in `advance`)."""
        chat, job = self.chat, self.job
        self.started = time.perf_counter()
        self.input_ids = job.input_ids if job.input_ids is not None else chat.encode(job.messages)
        self.prompt_tokens = int(self.input_ids.shape[1])
        self.rule = StoppingRule(chat.end_of_turn_ids, job.stop, job.max_new_tokens, chat.decode)
        if job.temperature > 0:
            self.generator = torch.Generator().manual_seed(job.seed)
        if job.output_format is not None:
            from server.chat.structured import Constraint

            self.constraint = Constraint(chat, job.output_format)
        if plan is not None:
            self.plan = plan
        elif chat.asks_router(job.route):
            self.routing = chat.router_pass(chat.router_input(job.messages, self.input_ids))
        else:
            self.plan = chat.plan_route(job.route, job.messages)
        if self.plan is not None:
            self.render_for_plan()

    def render_for_plan(self) -> None:
        """Stacks trained on a prompt template of their own (imported ones) read the prompt in it."""
        template = self.chat.prompt_template(self.plan.weights)
        if template is not None:
            self.input_ids = self.chat.encode_with(template, self.job.messages)
            self.prompt_tokens = int(self.input_ids.shape[1])
            self.plan = replace(self.plan, reason=f"{self.plan.reason}; the prompt rendered in the prompt template "
                                                  f"these stacks were trained with, not the chat template")

    @property
    def remaining(self) -> int:
        """Prompt tokens still to go through the model: the router's read and the prefill."""
        return (self.routing.remaining if self.routing is not None else 0) + self.prompt_tokens - self.prefilled

    def advance(self, budget: int | None = None) -> int:
        """Up to `budget` tokens of the prompt's work (all of it: None), the router's read first; the
        tokens done. Once the whole prompt is in the cache, its first token is sampled."""
        spent = 0
        if self.routing is not None:
            spent = self.routing.advance(budget)
            if self.routing.remaining:
                return spent
            job = self.job
            self.plan = self.chat.plan_route(job.route, job.messages, self.routing.probabilities())
            self.route_seconds, self.routing = self.routing.seconds, None
            self.render_for_plan()
            if budget is not None and budget <= spent:
                return spent
        end = self.prompt_tokens if budget is None else min(self.prompt_tokens, self.prefilled + budget - spent)
        logits, self.cache = prefill(self.chat, self.input_ids, self.plan.weights, self.cache, self.prefilled, end)
        spent, self.prefilled = spent + end - self.prefilled, end
        if end == self.prompt_tokens:
            self.input_ids = None
            self.append(logits)
        return spent

    def append(self, logits: torch.Tensor) -> bool:
        """Sample the next token from its logits; True when the answer has ended."""
        job = self.job
        if self.constraint is not None:  # only the tokens that keep the answer a prefix of the format's documents
            logits = self.constraint.mask(logits)
        elif len(self.tokens) < job.min_tokens:  # as transformers' MinNewTokensLengthLogitsProcessor
            logits = logits.clone()
            logits[list(self.chat.end_of_turn_ids)] = float("-inf")
        self.tokens.append(sample(logits, job.temperature, job.top_p, self.generator))
        if self.constraint is not None:
            self.constraint.accept(self.tokens[-1])
        self.token_times.append(time.perf_counter())
        self.finish_reason = self.rule.finish_reason(self.tokens)
        return self.finish_reason is not None

    def result(self) -> ChatResult:
        return ChatResult(text=self.rule.text(self.tokens), prompt_tokens=self.prompt_tokens,
                          completion_tokens=len(self.tokens), finish_reason=self.finish_reason,
                          token_times=self.token_times, started=self.started, plan=self.plan,
                          route_seconds=self.route_seconds, format_complete=self.format_complete())

    def format_complete(self) -> bool | None:
        """With an output format: whether the answer ended where the format allowed only the end of
        the turn (a whole document), not at max_tokens or a stop sequence."""
        if self.constraint is None:
            return None
        ended = bool(self.tokens) and self.tokens[-1] in self.chat.end_of_turn_ids
        return ended and self.constraint.complete


def batchable(cache) -> bool:
    """Whether rows of this model can share a step: a cache of plain full-attention layers."""
    return isinstance(cache, DynamicCache) and all(
        type(layer) is DynamicLayer or (type(layer) is DynamicSlidingWindowLayer and not layer.record_past)
        for layer in cache.layers)


@torch.no_grad()
def prefill(chat: ChatModel, input_ids: torch.Tensor, weights: dict[str, float], cache: DynamicCache | None = None,
            start: int = 0, end: int | None = None) -> tuple[torch.Tensor, DynamicCache]:
    """A prompt's tokens [start, end) (all of them by default) through the model with its route, after
    the `start` tokens already in `cache`: the last logits and the KV cache."""
    end = input_ids.shape[1] if end is None else end
    part = input_ids[:, start:end].to(chat.device)
    with chat.mounted(weights):
        # logits of the last position only, as generate() asks: the LM head over the whole prompt
        # would cost a fifth of the prefill
        out = chat.model(input_ids=part, attention_mask=torch.ones(1, end, dtype=torch.long, device=chat.device),
                         cache=cache if cache is not None else DynamicCache(config=chat.model.config),
                         use_cache=True, logits_to_keep=1)
    return out.logits[0, -1], out.cache


def _pad_left(t: torch.Tensor, length: int) -> torch.Tensor:
    return F.pad(t, (0, 0, length - t.shape[-2], 0)) if t.shape[-2] < length else t


class DecodeBatch:
    """The active rows of one model set: their KV cache (left-padded) and attention mask."""

    def __init__(self, chat: ChatModel, capacity: int):
        self.chat = chat
        self.capacity = capacity
        self.rows: list[Decoding] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, cached length]: 1 a real token, 0 padding
        self._route: dict | None = None  # the rows' route, until rows join or leave

    @property
    def room(self) -> int:
        return self.capacity - len(self.rows)

    def join(self, row: Decoding) -> None:
        """A row whose prompt is prefilled joins, with its cache (the batch holds it from now on)."""
        cache, row.cache = row.cache, None
        length = cache.get_seq_length()
        mask = torch.ones(1, length, dtype=torch.long, device=self.chat.device)
        if self.cache is None:
            self.rows, self.cache, self.mask = [row], cache, mask
            return
        width = max(length, self.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            kept = max(mine.keys.shape[-2], theirs.keys.shape[-2])  # a sliding layer's window, else `width`
            mine.keys = torch.cat([_pad_left(mine.keys, kept), _pad_left(theirs.keys, kept)])
            mine.values = torch.cat([_pad_left(mine.values, kept), _pad_left(theirs.values, kept)])
            if mine.is_sliding:
                mine.cumulative_length = width
        self.mask = torch.cat([F.pad(self.mask, (width - self.mask.shape[1], 0)), F.pad(mask, (width - length, 0))])
        self.rows.append(row)
        self._route = None

    def route(self) -> dict[str, float] | dict[str, torch.Tensor]:
        """The rows' weights: one route for all when they agree (the fast path, bit for bit a single
        request's), else per-row weights for every domain any row uses. The same object from step to
        step while the rows stay: the projections reuse what they built for it."""
        if self._route is None:
            routes = [row.plan.weights for row in self.rows]
            same = all(r == routes[0] for r in routes)
            self._route = routes[0] if same else batch_route(routes, self.chat.route_names, self.chat.device)
        return self._route

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Feed each row its last token; the logits for the token after it, [rows, vocab]."""
        device = self.chat.device
        positions = self.mask.sum(1, keepdim=True)  # each row's own: padding takes no position
        self.mask = torch.cat([self.mask, torch.ones(len(self.rows), 1, dtype=torch.long, device=device)], 1)
        input_ids = torch.tensor([row.tokens[-1] for row in self.rows], device=device).view(-1, 1)
        with self.chat.mounted(self.route()):
            out = self.chat.model(input_ids=input_ids, attention_mask=self.mask, position_ids=positions,
                                  cache=self.cache, use_cache=True)
        return out.logits[:, -1]

    def keep(self, indices: list[int]) -> None:
        """Only these rows go on; padding columns that no remaining row needs are dropped."""
        if len(indices) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in indices]
        self._route = None
        if not self.rows:
            self.cache = self.mask = None
            return
        index = torch.tensor(indices, device=self.mask.device)
        self.mask = self.mask[index]
        first = int((self.mask.sum(0) > 0).nonzero()[0])
        self.mask = self.mask[:, first:]
        width = self.mask.shape[1]
        for layer in self.cache.layers:
            kept = min(layer.keys.shape[-2], width)  # a sliding layer keeps its last columns
            layer.keys = layer.keys[index, :, -kept:]
            layer.values = layer.values[index, :, -kept:]
            if layer.is_sliding:
                layer.cumulative_length = width


@torch.no_grad()
def generate(chat: ChatModel, job: ChatJob, weights: dict[str, float] | None = None) -> ChatResult:
    """One answer decoded alone with these per-domain stack weights ({} or None: the base alone),
    through the chat engine's own prefill, steps, sampling and stopping rule: a batch of one."""
    row = Decoding(chat, job)
    row.start(RoutePlan(dict(weights or {}), {}, "weights given by the caller"))
    row.advance()
    if row.finish_reason is None:
        batch = DecodeBatch(chat, 1)
        batch.join(row)
        while not row.append(batch.step()[0]):
            pass
    return row.result()
