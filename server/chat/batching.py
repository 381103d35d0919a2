"""Continuous batching of chat decoding: many requests, each with its own route, in one batch.

No serving library composes a weighted mix of adapters per request (vLLM and LoRAX apply one LoRA
per request; PEFT's X-LoRA runs the base twice), so this is written by hand. One thread owns the
model. Between decode steps it runs the warm-ups the registry hands it, admits waiting requests
(each planned, the meta-router run for "auto", and prefilled alone: its first token is sampled
there, so its time to first token does not wait for a batch), then runs one decode step for every
active request of a model set together, each row with its own domain weights (per-row weights over
the stacks, `moe_lora.batch_route`: no weight merging), its own sampling settings and stop
conditions. A row leaves at the next step when it ends, when its client has gone, or when its
deadline has passed.

The KV cache is transformers' DynamicCache with rows left-padded to a common length: a joining
row's cache is spliced in, and padding columns no row needs are dropped when rows leave. Each row
keeps its own positions, so padding changes nothing but float rounding (bitsandbytes and the
attention kernels take other code paths at batch > 1; tests/test_batching.py bounds the
difference under teacher forcing). Rows of one model set (one generation of stacks and router)
decode together, with that set's stacks mounted; two generations never share a step. A model
whose cache is not a plain DynamicCache (sliding-window layers) decodes one row per batch.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, TypeVar

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from server.chat.model import ChatJob, ChatModel, ChatResult
from server.chat.moe_lora import batch_route, routed
from server.engine import QueueFull, ServiceRate
from server.metrics import CURRENT_REQUEST, Metrics

T = TypeVar("T")
log = logging.getLogger(__name__)


class ClientGone(Exception):
    """The client disconnected before its answer was ready; its row leaves the batch at the next step."""


class DeadlineExceeded(Exception):
    def __init__(self, seconds: float):
        self.seconds = seconds
        super().__init__(f"the answer did not finish within {seconds:g} s")


@dataclass
class Sequence:
    """One request being answered: its job, what it has generated, and where its result goes."""
    chat: ChatModel
    job: ChatJob
    future: Future
    deadline: float | None = None  # perf_counter() after which the row leaves
    timeout: float | None = None
    submitted: float = field(default_factory=time.perf_counter)
    timing: object | None = None  # the request's RequestTiming, for its queue time
    plan: object | None = None  # RoutePlan
    prompt_tokens: int = 0
    tokens: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    started: float = 0.0
    route_seconds: float = 0.0
    generator: torch.Generator | None = None
    cancelled: bool = False
    finish_reason: str | None = None
    stop_at: int | None = None  # where the first stop sequence begins in the decoded text
    listener: Callable[[], None] | None = None  # told, from the engine's thread, of each new token


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


def batchable(cache) -> bool:
    """Whether rows of this model can share a step: a cache of plain full-attention layers."""
    return isinstance(cache, DynamicCache) and all(type(layer) is DynamicLayer for layer in cache.layers)


@torch.no_grad()
def prefill(chat: ChatModel, input_ids: torch.Tensor, weights: dict[str, float]) -> tuple[torch.Tensor, DynamicCache]:
    """One prompt alone through the model with its route: its last logits and its KV cache."""
    input_ids = input_ids.to(chat.device)
    with chat.mounted(), routed(chat.model, weights):
        # logits of the last position only, as generate() asks: the LM head over the whole prompt
        # would cost a fifth of the prefill
        out = chat.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                         cache=DynamicCache(config=chat.model.config), use_cache=True, logits_to_keep=1)
    return out.logits[0, -1], out.cache


def _pad_left(t: torch.Tensor, length: int) -> torch.Tensor:
    return F.pad(t, (0, 0, length - t.shape[-2], 0)) if t.shape[-2] < length else t


class DecodeBatch:
    """The active rows of one model set: their KV cache (left-padded) and attention mask."""

    def __init__(self, chat: ChatModel, capacity: int):
        self.chat = chat
        self.capacity = capacity
        self.rows: list[Sequence] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, cached length]: 1 a real token, 0 padding
        self._route: dict | None = None  # the rows' route, until rows join or leave

    @property
    def room(self) -> int:
        return self.capacity - len(self.rows)

    def join(self, row: Sequence, cache: DynamicCache) -> None:
        length = cache.get_seq_length()
        mask = torch.ones(1, length, dtype=torch.long, device=self.chat.device)
        if self.cache is None:
            self.rows, self.cache, self.mask = [row], cache, mask
            return
        width = max(length, self.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
            mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)])
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
            self._route = routes[0] if same else batch_route(routes, self.chat.domains, self.chat.device)
        return self._route

    @torch.no_grad()
    def step(self, tokens: list[int]) -> torch.Tensor:
        """Feed each row its next token; the logits for the token after it, [rows, vocab]."""
        device = self.chat.device
        positions = self.mask.sum(1, keepdim=True)  # each row's own: padding takes no position
        self.mask = torch.cat([self.mask, torch.ones(len(self.rows), 1, dtype=torch.long, device=device)], 1)
        input_ids = torch.tensor(tokens, device=device).view(-1, 1)
        with self.chat.mounted(), routed(self.chat.model, self.route()):
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
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, first:]
            layer.values = layer.values[index, :, first:]


def stream_listener() -> Callable[[], None]:
    """A row listener that wakes a streaming request's coroutine (on its event loop) from the
    engine's thread; pass it to `ChatBatcher.enqueue`, then iterate `ChatBatcher.stream`."""
    loop, event = asyncio.get_running_loop(), asyncio.Event()

    def listener() -> None:
        loop.call_soon_threadsafe(event.set)

    listener.event = event
    return listener


class StreamedText:
    """The part of a row's answer that can be sent so far: what its tokens decode to, less what the
    final answer may still drop (the end-of-turn token, trailing whitespace that `strip()` removes,
    a half-decoded character, and the last characters that could begin a stop sequence), so that
    the pieces sent add up to the final text exactly."""

    def __init__(self, row: Sequence):
        self.row = row
        self.sent = ""
        self.hold = max((len(s) - 1 for s in row.job.stop), default=0)

    def new(self) -> str:
        chat, tokens = self.row.chat, list(self.row.tokens)
        tokens = [t for t in tokens if t not in chat.end_of_turn_ids]
        text = chat.decode(torch.tensor(tokens, dtype=torch.long)).lstrip().rstrip("\ufffd")
        cuts = [i for i in (text.find(s) for s in self.row.job.stop) if i >= 0]
        text = text[:min(cuts)] if cuts else text[:max(0, len(text) - self.hold)]
        text = text.rstrip()
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece

    def rest(self, final: str) -> str:
        """What is left to send of the final text (the final text begins with what was sent)."""
        piece = final[len(self.sent):] if final.startswith(self.sent) else ""
        self.sent = final
        return piece


class ChatBatcher:
    """The chat engine: a bounded queue in front of one thread that decodes every active request
    in one batch per model set. The same surface as `server.engine.Engine` (`submit`, `run`,
    `waiting`, `shutdown`), so the registry warms artifacts on it between steps."""

    def __init__(self, name: str, max_batch: int, max_waiting: int, retry_after: int, metrics: Metrics,
                 timeout: float | None = None):
        self.name = name
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.service = ServiceRate(retry_after)  # how long a request holds a batch slot
        self.timeout = timeout
        self._batch_rows = metrics.chat_batch_rows
        self._running = metrics.engine_running.labels(engine=name)
        self._waiting = metrics.engine_waiting.labels(engine=name)
        metrics.engine_queue_limit.labels(engine=name).set(max_waiting)
        self._lock = threading.Condition()
        self._queue: deque[Sequence] = deque()
        self._calls: deque[tuple[Callable, tuple, Future]] = deque()
        self._batches: list[DecodeBatch] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=f"engine-{name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ the request side
    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return sum(len(b.rows) for b in self._batches)

    async def submit(self, chat: ChatModel, job: ChatJob,
                     disconnected: Callable[[], Awaitable[bool]] | None = None) -> ChatResult:
        """Answer `job` on `chat`, decoded beside every other active request. Refuses at once
        (QueueFull) when every batch slot is taken and `max_waiting` requests already wait."""
        return await self.wait(self.enqueue(chat, job), disconnected)

    def enqueue(self, chat: ChatModel, job: ChatJob, listener: Callable[[], None] | None = None) -> Sequence:
        """Queue `job` (QueueFull at once when every slot is taken and `max_waiting` wait); its row.
        `listener` is called from the engine's thread after each token the row gets."""
        row = Sequence(chat, job, Future(), timing=CURRENT_REQUEST.get(), timeout=self.timeout, listener=listener)
        if self.timeout is not None:
            row.deadline = row.submitted + self.timeout
        with self._lock:
            if self.running + len(self._queue) >= self.max_batch + self.max_waiting:
                raise QueueFull(self.name, self.service.retry_after(len(self._queue) + 1, self.max_batch))
            self._queue.append(row)
            self._publish()
            self._lock.notify()
        return row

    async def stream(self, row: Sequence, disconnected: Callable[[], Awaitable[bool]] | None = None
                     ) -> AsyncIterator[str | ChatResult]:
        """An enqueued row's answer as it is decoded: text pieces that add up to the answer's text,
        then its ChatResult. Enqueue it with `stream_listener()` as its listener."""
        wake: asyncio.Event = row.listener.event
        text = StreamedText(row)
        try:
            while not row.future.done():
                try:
                    await asyncio.wait_for(wake.wait(), timeout=0.25)
                except asyncio.TimeoutError:
                    pass
                wake.clear()
                if disconnected is not None and await disconnected():
                    raise ClientGone()
                if piece := text.new():
                    yield piece
            result = await asyncio.wrap_future(row.future)
        finally:
            if not row.future.done():
                row.cancelled = True  # a client gone, or the stream closed early: the row leaves at the next step
        if piece := text.rest(result.text):
            yield piece
        yield result

    async def wait(self, row: Sequence, disconnected: Callable[[], Awaitable[bool]] | None = None) -> ChatResult:
        """An enqueued row's result; a client that has gone (`disconnected`) takes its row out."""
        result = asyncio.wrap_future(row.future)
        try:
            while True:
                done, _ = await asyncio.wait({result}, timeout=0.25)
                if done:
                    return result.result()
                if disconnected is not None and await disconnected():
                    row.cancelled = True  # leaves the batch at the next step
                    raise ClientGone()
        except asyncio.CancelledError:
            row.cancelled = True
            raise

    def run(self, fn: Callable[..., T], *args) -> T:
        """Run `fn` on the engine's thread between decode steps and wait for it (the registry warms
        new artifacts here: they touch modules that running steps use). Not queue-bounded."""
        future: Future = Future()
        with self._lock:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            self._calls.append((fn, args, future))
            self._lock.notify()
        return future.result()

    def shutdown(self) -> None:
        """Stop after the current step; waits for the thread (a torch thread still running at
        interpreter exit aborts the process)."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    def _publish(self) -> None:
        self._running.set(self.running)
        self._waiting.set(len(self._queue))

    # ------------------------------------------------------------ the engine's thread
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._stopping or self._calls or self._queue or self._batches):
                    self._lock.wait()
                if self._stopping:
                    break
                calls, self._calls = list(self._calls), deque()
            for fn, args, future in calls:
                self._call(fn, args, future)
            try:
                self._admit()
                for batch in list(self._batches):
                    self._decode(batch)
            except Exception as exc:  # a bug of the engine's own: fail its rows, keep the engine alive
                log.exception("chat engine step failed; its requests fail with it")
                for row in [r for b in self._batches for r in b.rows]:
                    if not row.future.done():
                        row.future.set_exception(exc)
                self._batches = []
            self._batches = [b for b in self._batches if b.rows]
            with self._lock:
                self._publish()
        error = RuntimeError("the server is shutting down")
        for row in list(self._queue) + [r for b in self._batches for r in b.rows]:
            if not row.future.done():
                row.future.set_exception(error)

    @staticmethod
    def _call(fn, args, future: Future) -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # handed back to the caller, who decides
            future.set_exception(exc)

    def _admit(self) -> None:
        """Waiting requests join while batches have room: planned, prefilled alone, first token sampled.
        Waiting requests whose client has gone or whose deadline has passed leave the queue first."""
        now = time.perf_counter()
        with self._lock:
            self._queue = deque(row for row in self._queue if not self._leaves(row, now))
        while True:
            with self._lock:
                if not self._queue or self.running >= self.max_batch:
                    return
                row = self._queue.popleft()
            now = time.perf_counter()
            if row.timing is not None:  # the request's wait, read back by the middleware that counts it
                row.timing.engine = self.name
                row.timing.queue_seconds += now - row.submitted
            if self._leaves(row, now):
                continue
            try:
                self._start(row)
            except Exception as exc:  # this request's failure (a refused prompt, a model error): its own 500
                if not row.future.done():
                    row.future.set_exception(exc)

    def _start(self, row: Sequence) -> None:
        chat, job = row.chat, row.job
        row.started = time.perf_counter()
        row.plan = chat.plan_route(job.route, job.messages)
        row.route_seconds = time.perf_counter() - row.started
        input_ids = job.input_ids if job.input_ids is not None else chat.encode(job.messages)
        row.prompt_tokens = int(input_ids.shape[1])
        if job.temperature > 0:
            row.generator = torch.Generator().manual_seed(job.seed)
        logits, cache = prefill(chat, input_ids, row.plan.weights)
        if self._append(row, logits):
            return  # done after one token
        capacity = self.max_batch if batchable(cache) else 1
        batch = next((b for b in self._batches if b.chat is chat and b.room > 0), None) if capacity > 1 else None
        if batch is None:
            batch = DecodeBatch(chat, capacity)
            self._batches.append(batch)
        batch.join(row, cache)

    def _append(self, row: Sequence, logits: torch.Tensor) -> bool:
        """Sample the row's next token; True when the row has ended (and its result is set)."""
        job = row.job
        if len(row.tokens) < job.min_tokens:  # as transformers' MinNewTokensLengthLogitsProcessor
            logits = logits.clone()
            logits[list(row.chat.end_of_turn_ids)] = float("-inf")
        token = sample(logits, job.temperature, job.top_p, row.generator)
        row.tokens.append(token)
        row.token_times.append(time.perf_counter())
        if row.listener is not None:
            row.listener()
        chat = row.chat
        if token in chat.end_of_turn_ids:
            row.finish_reason = "stop"
        elif job.stop:
            text = chat.decode(torch.tensor(row.tokens))
            cuts = [i for i in (text.find(s) for s in job.stop) if i >= 0]
            if cuts:
                row.finish_reason, row.stop_at = "stop", min(cuts)
        if row.finish_reason is None and len(row.tokens) >= job.max_new_tokens:
            row.finish_reason = "length"
        if row.finish_reason is None:
            return False
        self._finish(row)
        return True

    def _finish(self, row: Sequence) -> None:
        chat = row.chat
        tokens = row.tokens[:-1] if row.tokens and row.tokens[-1] in chat.end_of_turn_ids else row.tokens
        text = chat.decode(torch.tensor(tokens, dtype=torch.long))
        if row.stop_at is not None:
            text = text[:row.stop_at]  # the stop sequence itself is not part of the answer
        result = ChatResult(text=text.strip(), prompt_tokens=row.prompt_tokens, completion_tokens=len(row.tokens),
                            finish_reason=row.finish_reason, token_times=row.token_times, started=row.started,
                            plan=row.plan, route_seconds=row.route_seconds)
        if not row.future.done():
            row.future.set_result(result)
        self.service.record(time.perf_counter() - row.started)

    def _leaves(self, row: Sequence, now: float) -> bool:
        """A row whose client has gone or whose deadline has passed leaves now (True)."""
        if row.cancelled:
            row.future.cancel()
            return True
        if row.deadline is not None and now > row.deadline:
            row.future.set_exception(DeadlineExceeded(row.timeout))
            return True
        return False

    def _decode(self, batch: DecodeBatch) -> None:
        """One decode step for every row of the batch; ended and departed rows leave it."""
        now = time.perf_counter()
        going = [i for i, row in enumerate(batch.rows) if not self._leaves(row, now)]
        batch.keep(going)
        if not batch.rows:
            return
        self._batch_rows.observe(len(batch.rows))
        try:
            logits = batch.step([row.tokens[-1] for row in batch.rows])
        except Exception as exc:  # a failed step fails its rows, not the engine
            for row in batch.rows:
                if not row.future.done():
                    row.future.set_exception(exc)
            batch.keep([])
            return
        batch.keep([i for i, row in enumerate(batch.rows) if not self._append(row, logits[i])])
