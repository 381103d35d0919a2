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

The banks are rebuilt when an adapter's weights are read or dropped (`LoraAdapter.epoch` moves), all
at once, and the heap they freed goes back to the system then.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.artifacts import return_freed_memory
from server.chat.adapters import LoraAdapter, LoraWeights


@dataclass(frozen=True)
class LoraBank:
    lora_A: torch.Tensor  # [columns, in]
    lora_B_t: torch.Tensor  # [columns, out]
    spans: dict[str, tuple[int, int, float]]  # adapter name -> its first and last column + 1, its scale


def build_bank(loras: list[tuple[str, LoraAdapter, str]]) -> LoraBank | None:
    """The bank of one projection over its adapters that are in memory now (None: none is); their
    weights on this projection are views of it from here on."""
    members = []
    for name, adapter, module in loras:
        weights = adapter.resident_weights()
        if weights is not None:
            members.append((name, weights, module, weights[module]))
    if not members:
        return None
    lora_A = torch.cat([lora.lora_A for *_, lora in members])
    lora_B_t = torch.cat([lora.lora_B.T for *_, lora in members])
    spans, start = {}, 0
    for name, weights, module, lora in members:
        stop = start + lora.lora_A.shape[0]
        spans[name] = (start, stop, lora.scale)
        weights[module] = LoraWeights(lora_A[start:stop], lora_B_t[start:stop].T, lora.scale)
        start = stop
    return LoraBank(lora_A, lora_B_t, spans)


class LoraBanks:
    """The banks of one model set's projections, rebuilt together when the resident adapters change."""

    def __init__(self, loras: dict[object, list[tuple[str, LoraAdapter, str]]]):
        self.loras = loras  # per wrapped projection: (name, adapter, module) of the adapters on it
        self.epoch = None
        self.banks: dict[object, LoraBank | None] = {}
        self._columns: dict[tuple, tuple] = {}  # per route and bank: see columns()

    def bank(self, layer) -> LoraBank | None:
        epoch = LoraAdapter.epoch  # read first: a change while building shows at the next call
        if epoch != self.epoch:
            self.banks, self._columns = {}, {}  # the old banks go before the new ones are made
            self.banks = {key: build_bank(loras) for key, loras in self.loras.items()}
            self.epoch = epoch
            return_freed_memory()  # the evicted adapters' weights and the old banks
        return self.banks.get(layer)

    def columns(self, bank: LoraBank, route) -> tuple[int, int, torch.Tensor] | None:
        """The span of the bank this route's adapters use and each row's weight on its columns
        ([rows, span], or [span] where every row has the same weights); None: no adapter is on.
        Built once per route and bank (a route's per-row tensors live as long as its rows)."""
        on = [(name, weight) for name, weight in route.items()
              if name in bank.spans and (isinstance(weight, torch.Tensor) or weight)]
        if not on:
            return None
        key = (id(bank), *((n, id(w) if isinstance(w, torch.Tensor) else w) for n, w in on))
        entry = self._columns.get(key)
        if entry is None:
            if len(self._columns) >= 2048:
                self._columns.clear()
            entry = self._columns[key] = (bank, on, _row_columns(bank, on))  # holds what its key's ids name
        return entry[2]


def _row_columns(bank: LoraBank, on: list[tuple[str, object]]) -> tuple[int, int, torch.Tensor] | None:
    start = min(bank.spans[name][0] for name, _ in on)
    stop = max(bank.spans[name][1] for name, _ in on)
    per_row = [w for _, w in on if isinstance(w, torch.Tensor)]
    rows = per_row[0].shape[0] if per_row else None
    dtype = bank.lora_A.dtype
    columns = torch.zeros(*(() if rows is None else (rows,)), stop - start, dtype=dtype)
    for name, weight in on:
        first, last, scale = bank.spans[name]
        weight = weight.to(dtype)[:, None] if isinstance(weight, torch.Tensor) else float(weight)
        columns[..., first - start:last - start] += weight * scale
    if rows is not None and not bool(columns.any()):
        return None  # no row has any of these adapters on
    return start, stop, columns


def add_banked(out: torch.Tensor, x: torch.Tensor, banks: LoraBanks, layer, route) -> torch.Tensor:
    """`out` plus the LoRA of each adapter the route names, at its weight (a float for every row, or
    a [batch] tensor of per-row weights), as PEFT computes it: out + weight * scale * B(A(x))."""
    bank = banks.bank(layer)
    if bank is None:
        return out
    span = banks.columns(bank, route)
    if span is None:
        return out
    start, stop, columns = span
    hidden = x.to(bank.lora_A.dtype) @ bank.lora_A[start:stop].T
    if columns.dim() == 2:  # per row: [rows, 1, ..., span] against hidden's [rows, ..., span]
        columns = columns.view(columns.shape[0], *[1] * (x.dim() - 2), columns.shape[1])
    return out + ((hidden * columns) @ bank.lora_B_t[start:stop]).to(out.dtype)
