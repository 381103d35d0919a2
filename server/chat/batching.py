"""The chat engine: continuous batching of chat decoding, many requests, each with its own route,
in one batch.

No serving library composes a weighted mix of adapters per request (vLLM and LoRAX apply one LoRA
per request; PEFT's X-LoRA runs the base twice), so this is written by hand. One thread owns the
model (it `claim`s each model's stacked projections; a `BusyThread`, which ends when the engine is
idle and is started again by the next request). Between decode steps it runs the calls the
registry hands it (warm-ups), admits waiting requests into free slots, does up to
`prefill_tokens` tokens of prompt work for the admitted rows (the meta-router's read for "auto",
then the prefill, each row alone; the rows with the least left first, so a short prompt's first
token never waits behind a long prompt, and a long prompt holds the others' next step for one part
at most), then runs one decode step for every active request of a model set together
(server/chat/decoding.py). A row's first token is sampled when its prompt is in, so its time to
first token does not wait for a batch. A row leaves at the next step when it ends, when its client
has gone, or when its deadline has passed; one that read a long prompt hands the memory it freed
back to the system. Rows of one model set (one generation of stacks and router) decode
together, with that set's stacks mounted; two generations never share a step.
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

from server.artifacts import return_freed_memory
from server.chat.adapter_residency import keep_running
from server.chat.adapters import LoraAdapter
from server.chat.decoding import ChatJob, ChatResult, DecodeBatch, Decoding, batchable
from server.chat.engine_gauges import EngineGauges, reservation
from server.chat.model import ChatModel
from server.chat.moe_lora import stacked_projections
from server.engine import BusyThread, QueueFull, ServiceRate, fulfil
from server.errors import ApiError
from server.chat.streamed import StreamedText
from server.metrics import CURRENT_REQUEST, Metrics

T = TypeVar("T")
log = logging.getLogger(__name__)
LONG_PROMPT_TOKENS = 1024  # a row with a prompt this long gives its memory back when it leaves


class ClientGone(Exception):
    """The client disconnected before its answer was ready; its row leaves the batch at the next step."""


class DeadlineExceeded(Exception):
    def __init__(self, seconds: float):
        self.seconds = seconds
        super().__init__(f"the answer did not finish within {seconds:g} s")


@dataclass(eq=False)
class Sequence(Decoding):
    """One request being answered: its decoding, and where its result goes."""

    future: Future = field(default_factory=Future)
    deadline: float | None = None  # perf_counter() after which the row leaves
    timeout: float | None = None
    submitted: float = field(default_factory=time.perf_counter)
    timing: object | None = None  # the request's RequestTiming, for its queue time
    cancelled: bool = False
    listener: Callable[[], None] | None = None  # told, from the engine's thread, of each new token
    kv_reserved: int = 0  # KV-cache tokens it may fill: its prompt and max_tokens


class ChatEngine:
    """A bounded queue in front of one thread that decodes every active request in one batch per
    model set. An `Engine` (server/engine.py): started and stopped by the app's lifespan, and the
    registry warms artifacts on it between steps (`run`)."""

    def __init__(self, name: str, max_batch: int, max_waiting: int, retry_after: int, metrics: Metrics,
                 timeout: float | None = None, prefill_tokens: int = 128, kv_cache_tokens: int = 1 << 20):
        self.name = name
        self.max_batch = max_batch
        self.prefill_tokens = prefill_tokens  # prompt tokens read between two decode steps, at most
        self.max_waiting = max_waiting
        self.service = ServiceRate(retry_after)  # how long a request holds a batch slot
        self.timeout = timeout
        self._batch_rows = metrics.chat_batch_rows
        self._running = metrics.engine_running.labels(engine=name)
        self._waiting = metrics.engine_waiting.labels(engine=name)
        metrics.engine_queue_limit.labels(engine=name).set(max_waiting)
        self.gauges = EngineGauges(metrics, kv_cache_tokens)  # the KV-cache budget admission keeps to
        self._lock = threading.Lock()
        self._queue: deque[Sequence] = deque()
        self._calls: deque[tuple[Callable, tuple, Future]] = deque()
        self._batches: list[DecodeBatch] = []
        self._prefilling: list[Sequence] = []  # admitted rows still reading their prompts, oldest first
        self._stopping = False
        self._started = False
        self._thread = BusyThread(f"engine-{name}", self._loop)

    # ------------------------------------------------------------ the request side
    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        """Rows holding a slot: reading their prompts, or decoding."""
        return len(self._prefilling) + sum(len(b.rows) for b in self._batches)

    @property
    def _rows(self) -> list[Sequence]:
        return self._prefilling + [row for batch in self._batches for row in batch.rows]

    def start(self) -> None:
        with self._lock:
            self._started = True

    async def submit(self, chat: ChatModel, job: ChatJob,
                     disconnected: Callable[[], Awaitable[bool]] | None = None) -> ChatResult:
        """Answer `job` on `chat`, decoded beside every other active request. Refuses at once
        (QueueFull) when every batch slot is taken and `max_waiting` requests already wait."""
        return await self.wait(self.enqueue(chat, job), disconnected)

    def enqueue(self, chat: ChatModel, job: ChatJob, listener: Callable[[], None] | None = None) -> Sequence:
        """Queue `job` (QueueFull at once when every slot is taken and `max_waiting` wait); its row.
        `listener` is called from the engine's thread after each token the row gets."""
        row = Sequence(chat, job, timing=CURRENT_REQUEST.get(), timeout=self.timeout, listener=listener)
        if self.timeout is not None:
            row.deadline = row.submitted + self.timeout
        if job.input_ids is not None:  # the server's requests: counted now (others when they reach the head)
            row.kv_reserved = reservation(chat, job)
            self.gauges.check(row.kv_reserved)  # one that could never fit: 422 now, not a wait forever
        with self._lock:
            if self._stopping or not self._started:
                raise RuntimeError("the chat engine is not running")
            self._refuse_when_full()
            self._queue.append(row)
            self._publish()
            self._thread.wake()
        return row

    def _refuse_when_full(self) -> None:
        if self.running + len(self._queue) >= self.max_batch + self.max_waiting:
            raise QueueFull(self.name, self.service.retry_after(len(self._queue) + 1, self.max_batch))

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
            if self._stopping or not self._started:
                raise RuntimeError("the chat engine is not running")
            self._calls.append((fn, args, future))
            self._thread.wake()
        return future.result()

    def shutdown(self) -> None:
        """Stop after the current step; waits for the thread (a torch thread still running at
        interpreter exit aborts the process)."""
        with self._lock:
            self._stopping = True
            if self._started:
                self._thread.wake()  # it fails what still waits
        self._thread.join(timeout=30)

    def _publish(self) -> None:
        self._running.set(self.running)
        self._waiting.set(len(self._queue))

    # ------------------------------------------------------------ the engine's thread
    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    break
                if not (self._calls or self._queue or self._prefilling or self._batches):
                    self._thread.ending()  # idle: this thread ends, and the next request starts another
                    return
                calls, self._calls = list(self._calls), deque()
            for fn, args, future in calls:
                fulfil(future, fn, args)
            try:
                self._admit()
                self._keep_adapters()
                self._prefill()
                for batch in list(self._batches):
                    self._decode(batch)
            except Exception as exc:  # a bug of the engine's own: fail its rows, keep the engine alive
                log.exception("chat engine step failed; its requests fail with it")
                for row in self._rows:
                    if not row.future.done():
                        row.future.set_exception(exc)
                self._batches, self._prefilling = [], []
            self._batches = [b for b in self._batches if b.rows]
            self.gauges.publish(self._prefilling, self._batches)
            with self._lock:
                self._publish()
        error = RuntimeError("the server is shutting down")
        for row in list(self._queue) + self._prefilling + [r for b in self._batches for r in b.rows]:
            if not row.future.done():
                row.future.set_exception(error)
        for _, _, future in self._calls:
            future.set_exception(error)

    def _keep_adapters(self) -> None:
        """The PEFT adapters of every row reading its prompt or decoding in memory, and kept there
        (LOOPSTACK_MAX_LOADED_ADAPTERS evicts others only). An adapter whose file no longer reads
        back as it was admitted fails the rows that use it, not the others."""
        rows = self._rows
        uses = {id(row): [a for name, weight in row.plan.weights.items()
                          if weight and (a := row.chat.adapters.get(name)) is not None]
                for row in rows if row.plan is not None}
        used = {id(a): a for adapters in uses.values() for a in adapters}
        failed: dict[int, Exception] = {}
        for key, adapter in used.items():
            if not adapter.resident:
                try:
                    (adapter.residency.load if adapter.residency else LoraAdapter.weights)(adapter)
                except Exception as exc:
                    log.error("adapter %s cannot be read back: %s", adapter.name, exc)
                    failed[key] = ApiError(503, f"adapter {adapter.name!r} cannot be read back from its file ({exc}); "
                                                f"the operator reloads it")
        if failed:
            def fails(row) -> Exception | None:
                return next((failed[id(a)] for a in uses.get(id(row), []) if id(a) in failed), None)

            for row in rows:
                if (error := fails(row)) is not None and not row.future.done():
                    row.future.set_exception(error)
            self._prefilling = [row for row in self._prefilling if fails(row) is None]
            for batch in self._batches:
                self._keep(batch, [i for i, row in enumerate(batch.rows) if fails(row) is None])
        keep_running([a for key, a in used.items() if key not in failed])

    def _admit(self) -> None:
        """Waiting requests take the free slots, to read their prompts (`_prefill`). Waiting requests
        whose client has gone or whose deadline has passed leave the queue first."""
        now = time.perf_counter()
        with self._lock:
            self._queue = deque(row for row in self._queue if not self._leaves(row, now))
        while True:
            with self._lock:
                if not self._queue or self.running >= self.max_batch:
                    return
                head = self._queue[0]
                if not head.kv_reserved:
                    head.kv_reserved = reservation(head.chat, head.job)
                if head.kv_reserved <= self.gauges.budget and not self.gauges.fits(self._rows, head.kv_reserved):
                    return  # the head waits until leaving rows free its KV-cache tokens
                row = self._queue.popleft()
            now = time.perf_counter()
            if row.timing is not None:  # the request's wait, read back by the middleware that counts it
                row.timing.engine = self.name
                row.timing.queue_seconds += now - row.submitted
            if self._leaves(row, now):
                continue
            try:
                self.gauges.check(row.kv_reserved)
                stacked_projections(row.chat.model).claim()  # mounting from any other thread now raises
                row.start()
                self._prefilling.append(row)
            except Exception as exc:  # this request's failure (a refused prompt, a model error): its own 500
                if not row.future.done():
                    row.future.set_exception(exc)

    def _prefill(self) -> None:
        """Prompt work (the router's read, the prefill) of the rows still reading their prompts:
        `prefill_tokens` tokens a loop at most, so that no prompt holds the batches' next step for
        longer than that; the rows with the least left go first (a short prompt is not held behind
        a long one). A row whose prompt is in joins a batch (or ends, after one token)."""
        now = time.perf_counter()
        for row in [row for row in self._prefilling if self._leaves(row, now)]:
            self._prefilling.remove(row)
            row.cache = row.routing = None  # what it read so far goes with it
        budget = self.prefill_tokens
        for row in sorted(self._prefilling, key=lambda r: r.remaining):
            if budget <= 0:
                break
            try:
                budget -= row.advance(budget)
            except Exception as exc:  # this request's failure (a model error): its own 500
                self._prefilling.remove(row)
                row.cache = None
                if not row.future.done():
                    row.future.set_exception(exc)
                continue
            if row.finish_reason is not None or row.prefilled == row.prompt_tokens:
                self._prefilling.remove(row)
                self._join(row)

    def _join(self, row: Sequence) -> None:
        if self._told(row):  # done after one token
            row.cache = None
            self._release([row])
            return
        capacity = self.max_batch if batchable(row.cache) else 1
        batch = next((b for b in self._batches if b.chat is row.chat and b.room > 0), None) if capacity > 1 else None
        if batch is None:
            batch = DecodeBatch(row.chat, capacity)
            self._batches.append(batch)
        batch.join(row)

    def _told(self, row: Sequence) -> bool:
        """Tell the row's listener of its new token; True when the row has ended (its result is set)."""
        if row.listener is not None:
            row.listener()
        if row.finish_reason is None:
            return False
        if not row.future.done():
            row.future.set_result(row.result())
        self.service.record(time.perf_counter() - row.started)
        return True

    def _leaves(self, row: Sequence, now: float) -> bool:
        """A row whose client has gone or whose deadline has passed leaves now (True)."""
        if row.cancelled:
            row.future.cancel()
            return True
        if row.deadline is not None and now > row.deadline:
            row.future.set_exception(DeadlineExceeded(row.timeout))
            return True
        return False

    def _release(self, gone: list[Sequence]) -> None:
        """After a long prompt's row has gone, give its freed memory back to the system: glibc keeps
        freed heap in the process otherwise (the prompt's KV cache and the prefill's activations)."""
        if any(row.prompt_tokens >= LONG_PROMPT_TOKENS for row in gone):
            return_freed_memory()

    def _keep(self, batch: DecodeBatch, indices: list[int]) -> None:
        gone = [row for i, row in enumerate(batch.rows) if i not in set(indices)]
        batch.keep(indices)
        self._release(gone)

    def _decode(self, batch: DecodeBatch) -> None:
        """One decode step for every row of the batch; ended and departed rows leave it."""
        now = time.perf_counter()
        self._keep(batch, [i for i, row in enumerate(batch.rows) if not self._leaves(row, now)])
        if not batch.rows:
            return
        self._batch_rows.observe(len(batch.rows))
        try:
            logits = batch.step()
        except Exception as exc:  # a failed step fails its rows, not the engine
            for row in batch.rows:
                if not row.future.done():
                    row.future.set_exception(exc)
            self._keep(batch, [])
            return
        for row, row_logits in zip(batch.rows, logits):
            row.append(row_logits)
        self._keep(batch, [i for i, row in enumerate(batch.rows) if not self._told(row)])
