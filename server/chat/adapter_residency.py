"""Which PEFT adapters keep their weights in memory, under LOOPSTACK_MAX_LOADED_ADAPTERS, as LoRAX
keeps at most its max active adapters: one residency per registry, told before each chat engine
step which adapters the running rows use (`keep_running`)."""

from __future__ import annotations

import threading
import time
import weakref
from collections import OrderedDict

from server.chat.adapters import LoraAdapter
from server.chat.lora_bank import BANKS

RESIDENCIES: "weakref.WeakSet[AdapterResidency]" = weakref.WeakSet()  # one per registry: what the engine keeps running


class AdapterResidency:
    """Which adapters' weights are in memory: at most `capacity` of them (0: every one), like LoRAX's
    max active adapters. Past it, the least recently used adapter that no running row uses gives its
    weights back (they are read again, checksummed, at its next use); the adapters of the running
    rows stay, even past the cap, until their rows leave. Holds its adapters weakly: an adapter no
    model set serves any more goes with its last model set."""

    def __init__(self, capacity: int = 0, metrics=None):
        self.capacity = capacity
        self.metrics = metrics
        self._order: OrderedDict[int, weakref.ref] = OrderedDict()  # least recently used first
        self._running: set[int] = set()
        self._lock = threading.RLock()
        RESIDENCIES.add(self)

    @property
    def has_running(self) -> bool:
        return bool(self._running)

    def admit(self, adapter: LoraAdapter) -> None:
        """A newly loaded adapter (its weights in memory): the most recently used one."""
        with self._lock:
            adapter.residency = self
            self._touch(adapter)
            self._evict()

    def forget(self, adapter: LoraAdapter) -> None:
        with self._lock:
            self._order.pop(id(adapter), None)
            self._publish()

    def make_room(self, reading: int = 1) -> None:
        """Before `reading` adapters' weights are read: the least recently used adapters no running
        row uses give theirs back first, and the banks let go of them now (a bank holds an evicted
        adapter's weights until it is rebuilt), so memory holds no more than the cap's adapters,
        or the running rows', while the new ones are read."""
        with self._lock:
            if not self.capacity or not reading:
                return
            resident = [a for a in self._live() if a.resident]
            if self._drop_least_recent(resident, len(resident) + reading - self.capacity):
                BANKS.refresh()

    def running(self, adapters: list[LoraAdapter]) -> None:
        """The adapters the running rows use, before a step: in memory (read now if evicted, after
        making room for them), kept."""
        with self._lock:
            self._running = {id(a) for a in adapters}
            for adapter in adapters:
                self._touch(adapter)
            missing = [a for a in adapters if not a.resident]
            self.make_room(len(missing))
            for adapter in missing:
                self._load(adapter)
            self._evict()
            if self.metrics is not None:
                self.metrics.chat_adapters_running.set(len(adapters))

    def resident(self) -> list[LoraAdapter]:
        with self._lock:
            return [a for a in self._live() if a.resident]

    def load(self, adapter: LoraAdapter) -> None:
        """Read an evicted adapter's weights back (counted and timed)."""
        with self._lock:
            if not adapter.resident:
                self._load(adapter)

    def _load(self, adapter: LoraAdapter) -> None:
        started = time.perf_counter()
        try:
            adapter.weights()
        except Exception:
            self._count_load("failed", started)
            raise
        self._count_load("loaded", started)

    def _count_load(self, result: str, started: float) -> None:
        if self.metrics is not None:
            self.metrics.chat_adapter_loads.labels(result=result).inc()
            self.metrics.chat_adapter_load_seconds.observe(time.perf_counter() - started)

    def _touch(self, adapter: LoraAdapter) -> None:
        key = id(adapter)
        if key not in self._order or self._order[key]() is not adapter:
            self._order[key] = weakref.ref(adapter)
        self._order.move_to_end(key)

    def _live(self) -> list[LoraAdapter]:
        for key in [k for k, ref in self._order.items() if ref() is None]:
            del self._order[key]
        return [ref() for ref in self._order.values()]

    def _evict(self) -> None:
        resident = [a for a in self._live() if a.resident]
        over = len(resident) - self.capacity if self.capacity else 0
        over -= self._drop_least_recent(resident, over)
        if over > 0 and self.metrics is not None:  # every adapter left in memory serves a running row
            self.metrics.chat_adapter_evictions.labels(result="deferred").inc()
        self._publish()

    def _drop_least_recent(self, resident: list[LoraAdapter], over: int) -> int:
        """Evict up to `over` of `resident` (least recently used first) that no running row uses; how many."""
        dropped = 0
        for adapter in resident:
            if dropped >= over:
                break
            if id(adapter) in self._running:
                continue
            adapter.drop()
            dropped += 1
            if self.metrics is not None:
                self.metrics.chat_adapter_evictions.labels(result="evicted").inc()
        if dropped:
            self._publish()
        return dropped

    def _publish(self) -> None:
        if self.metrics is not None:
            self.metrics.chat_adapters_resident.set(sum(a.resident for a in self._live()))


def keep_running(adapters: list[LoraAdapter]) -> None:
    """Before a step: the running rows' adapters in memory, and kept there (each by its residency;
    a residency none of them belongs to has no running adapter now)."""
    for adapter in adapters:
        if adapter.residency is None:
            adapter.weights()
    for residency in list(RESIDENCIES):
        mine = [a for a in adapters if a.residency is residency]
        if mine or residency.has_running:
            residency.running(mine)
