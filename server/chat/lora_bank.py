"""Every resident PEFT adapter's LoRA on a projection, side by side in one pair of tensors (a bank),
so that rows using different adapters decode in one pair of products with no copy per step.

Written here because no library batches several LoRA adapters per row on a CPU: Punica's BGMV and
S-LoRA's kernels are CUDA. A bank holds, per wrapped projection, the A of every resident adapter
stacked ([columns, in]) and their B transposed likewise ([columns, out]); each adapter's own weights
become views of it, so the bank costs no memory beyond theirs. A step multiplies the contiguous
slice of columns that spans the adapters its rows use, each row's weight (times the adapter's
scale) on its own adapter's columns and zero on the others: one shared adapter reads only its own
columns; distinct adapters read the span once for the batch. Concatenating the rows' adapters at
every step instead copied all their weights per step (measured on SmolLM2, 8 rows on 8 r16
adapters: the copy was a third of the adapters' cost).

There is one bank per projection for every model set that mounts it (a load's warm-up, the serving
generation and the generations still finishing their requests share it), rebuilt, all projections
at once, when an adapter's weights are read or dropped or an adapter is new to it
(`LoraAdapter.epoch` moves); the heap the old banks and the evicted weights freed goes back to the
system then.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch

from server.artifacts import return_freed_memory
from server.chat.adapters import LoraAdapter, LoraWeights


@dataclass(frozen=True)
class LoraBank:
    lora_A: torch.Tensor  # [columns, in]
    lora_B_t: torch.Tensor  # [columns, out]
    spans: dict[int, tuple[int, int, float]]  # id(adapter) -> its first and last column + 1, its scale


def build_bank(members: list[tuple[LoraAdapter, str]]) -> LoraBank | None:
    """The bank of one projection over its adapters that are in memory now (None: none is); their
    weights on this projection are views of it from here on."""
    resident = []
    for adapter, module in members:
        weights = adapter.resident_weights()
        if weights is not None:
            resident.append((adapter, weights, module, weights[module]))
    if not resident:
        return None
    lora_A = torch.cat([lora.lora_A for *_, lora in resident])
    lora_B_t = torch.cat([lora.lora_B.T for *_, lora in resident])
    spans, start = {}, 0
    for adapter, weights, module, lora in resident:
        stop = start + lora.lora_A.shape[0]
        spans[id(adapter)] = (start, stop, lora.scale)
        weights[module] = LoraWeights(lora_A[start:stop], lora_B_t[start:stop].T, lora.scale)
        start = stop
    return LoraBank(lora_A, lora_B_t, spans)


class LoraBanks:
    """The banks of every wrapped projection, one per projection whichever model sets mount it (a
    load, a warm-up and the generations still finishing their requests share one copy of each
    adapter), rebuilt together when the resident adapters change. Adapters are held weakly: one
    that goes (its last model set gone) moves the epoch, and the next step's banks are without it;
    an id in a bank is always its adapter's (a new adapter is registered, and the banks rebuilt,
    before any step names it)."""

    def __init__(self):
        self._members: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> {id: (ref, module)}
        self._banks: dict[int, LoraBank | None] = {}  # by id(layer)
        self._epoch = None
        self._columns: dict[tuple, tuple] = {}  # per route and bank: see columns()
        self._lock = threading.Lock()

    def register(self, layer, loras: list[tuple[str, LoraAdapter, str]]) -> None:
        """A model set's adapters on `layer` (an adapter new to the bank moves the epoch)."""
        with self._lock:
            members = self._members.setdefault(layer, {})
            for _, adapter, module in loras:
                if id(adapter) not in members or members[id(adapter)][0]() is not adapter:
                    members[id(adapter)] = (weakref.ref(adapter, _moved), module)
                    LoraAdapter.epoch += 1

    def lookup(self, layer, route, names: dict[str, LoraAdapter]) -> tuple[LoraBank, tuple] | None:
        """`layer`'s bank and what this route's adapters (`names`: this model set's) take of it (see
        `_span`); None: no adapter of the route is on. Under the lock: a step never sees a bank half
        rebuilt, nor keeps one that was replaced."""
        with self._lock:
            if self._epoch != LoraAdapter.epoch:
                self._rebuild()
            bank = self._banks.get(id(layer))
            if bank is None:
                return None
            span = self._span(bank, route, names)
            return None if span is None else (bank, span)

    def refresh(self) -> None:
        """Rebuild now if any adapter's weights were read or dropped since (an evicted adapter's
        weights are freed only when no bank holds them any more)."""
        with self._lock:
            if self._epoch != LoraAdapter.epoch:
                self._rebuild()

    def _rebuild(self) -> None:
        epoch = LoraAdapter.epoch  # read first: a change while building shows at the next call
        self._banks, self._columns = {}, {}  # each old bank goes as its projection's new one is made
        for key, members in list(self._members.items()):
            live = {i: (ref, module) for i, (ref, module) in members.items() if ref() is not None}
            self._members[key] = live
            self._banks[id(key)] = build_bank([(ref(), module) for ref, module in live.values()])
        self._epoch = epoch
        return_freed_memory()  # the evicted adapters' weights and the old banks

    def _span(self, bank: LoraBank, route, names: dict[str, LoraAdapter]) -> tuple[int, int, torch.Tensor] | None:
        """The columns of the bank the route's adapters use and each row's weight on them ([rows,
        span], or [span] where every row has the same weights), built once per route and bank (a
        route's per-row tensors live as long as its rows)."""
        on = [(id(names[name]), weight) for name, weight in route.items()
              if name in names and id(names[name]) in bank.spans and (isinstance(weight, torch.Tensor) or weight)]
        if not on:
            return None
        key = (id(bank), *((i, id(w) if isinstance(w, torch.Tensor) else w) for i, w in on))
        entry = self._columns.get(key)
        if entry is None:
            if len(self._columns) >= 2048:
                self._columns.clear()
            entry = self._columns[key] = (bank, on, _row_columns(bank, on))  # holds what its key's ids name
        return entry[2]


def _moved(_ref) -> None:
    LoraAdapter.epoch += 1


BANKS = LoraBanks()


def _row_columns(bank: LoraBank, on: list[tuple[int, object]]) -> tuple[int, int, torch.Tensor] | None:
    start = min(bank.spans[key][0] for key, _ in on)
    stop = max(bank.spans[key][1] for key, _ in on)
    per_row = [w for _, w in on if isinstance(w, torch.Tensor)]
    rows = per_row[0].shape[0] if per_row else None
    dtype = bank.lora_A.dtype
    columns = torch.zeros(*(() if rows is None else (rows,)), stop - start, dtype=dtype)
    for key, weight in on:
        first, last, scale = bank.spans[key]
        weight = weight.to(dtype)[:, None] if isinstance(weight, torch.Tensor) else float(weight)
        columns[..., first - start:last - start] += weight * scale
    if rows is not None and not bool(columns.any()):
        return None  # no row has any of these adapters on
    return start, stop, columns


def add_banked(out: torch.Tensor, x: torch.Tensor, layer, route, names: dict[str, LoraAdapter]) -> torch.Tensor:
    """`out` plus the LoRA of each adapter of `names` the route names, at its weight (a float for
    every row, or a [batch] tensor of per-row weights), as PEFT computes it: out + weight * scale * B(A(x))."""
    found = BANKS.lookup(layer, route, names)
    if found is None:
        return out
    bank, (start, stop, columns) = found
    # three operations a projection (on a CPU their count, more than their multiply-adds, is the cost)
    hidden = x.reshape(-1, x.shape[-1]).to(bank.lora_A.dtype) @ bank.lora_A[start:stop].T
    if columns.dim() == 2:  # per row: each row's tokens are consecutive rows of `hidden`
        hidden.view(columns.shape[0], -1, stop - start).mul_(columns[:, None, :])
    else:
        hidden.mul_(columns)
    flat = out.reshape(-1, out.shape[-1])
    if flat.dtype == hidden.dtype:
        return torch.addmm(flat, hidden, bank.lora_B_t[start:stop]).view(out.shape)
    return out + (hidden @ bank.lora_B_t[start:stop]).to(out.dtype).view(out.shape)
