"""What the chat engine holds, as a gateway reads it: KV-cache tokens against the budget, and the
domains and adapters of the running rows.

The budget is the engine's own accounting, as TGI's `max_batch_total_tokens`: a row reserves its
prompt plus its max_tokens when it is admitted and gives them back when it leaves, so admitted rows
never outgrow it. A request that does not fit beside the running rows waits in the queue (the
queue's bound still answers 429); one that could not fit alone is refused with a 422 before it
queues. What the caches hold is counted apart: the columns of each row's cache, padding included
(rows decoding together share a width), since that is the memory.
"""

from __future__ import annotations

from server.chat.decoding import ChatJob, DecodeBatch
from server.errors import ApiError
from server.metrics import Metrics


def reservation(chat, job: ChatJob) -> int:
    """KV-cache tokens a request may fill: its prompt as rendered, and every token it may generate."""
    prompt = job.input_ids if job.input_ids is not None else chat.encode(job.messages)
    return int(prompt.shape[1]) + job.max_new_tokens


class EngineGauges:
    def __init__(self, metrics: Metrics, budget: int):
        self.budget = budget
        self._held = metrics.chat_kv_cache_tokens
        self._reserved = metrics.chat_kv_cache_reserved_tokens
        self._rows = metrics.chat_running_rows
        self._domains: set[str] = set()  # every label set so far, so that a domain gone from the batch reads 0
        metrics.chat_kv_cache_budget_tokens.set(budget)

    def check(self, need: int) -> None:
        if need > self.budget:
            raise ApiError(422, f"the prompt and max_tokens need {need} KV-cache tokens; the chat engine holds "
                                f"{self.budget} at most (LOOPSTACK_CHAT_KV_CACHE_TOKENS): shorten the prompt or "
                                f"max_tokens")

    @staticmethod
    def reserved(rows: list) -> int:
        return sum(row.kv_reserved for row in rows)

    def fits(self, rows: list, need: int) -> bool:
        return not rows or self.reserved(rows) + need <= self.budget

    def publish(self, prefilling: list, batches: list[DecodeBatch]) -> None:
        rows = prefilling + [row for batch in batches for row in batch.rows]
        held = sum(row.prefilled for row in prefilling)
        held += sum(len(batch.rows) * batch.mask.shape[1] for batch in batches if batch.rows and batch.mask is not None)
        self._held.set(held)
        self._reserved.set(self.reserved(rows))
        counts: dict[str, int] = {}
        for row in rows:
            for domain, weight in (row.plan.weights.items() if row.plan is not None else ()):
                if weight:
                    counts[domain] = counts.get(domain, 0) + 1
        self._domains |= set(counts)
        for domain in self._domains:
            self._rows.labels(domain=domain).set(counts.get(domain, 0))
