"""Prometheus metrics: one prefix (beside the standard process_* series), base units, `_total`
counters. One registry per app instance.

The names, labels and meanings are a contract (docs/metrics.md): dashboards and alert rules read
them, so later work adds names and never renames one.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
WEIGHT_BUCKETS = (0.05, 0.12, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.5, 2.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
TOKEN_COUNT_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclass
class RequestTiming:
    """One HTTP request's clock, shared by the middleware that counts it and the engine that runs it."""

    arrival: float  # perf_counter() when the request reached the server
    engine: str | None = None
    queue_seconds: float = 0.0  # waiting for the engine's worker, all jobs of the request together


# Set by the request middleware; the endpoint's task inherits it, and the engine adds its queue time
# to the same object, which the middleware reads back when it counts the response.
CURRENT_REQUEST: ContextVar[RequestTiming | None] = ContextVar("loopstack_request", default=None)

# Statuses whose series exist at 0 for every endpoint from the start: a rate over them (an alert's
# error ratio) is 0, not absent, before the first error.
PRESET_STATUSES = ("429", "500", "503")


def since_arrival(now: float | None = None) -> float | None:
    timing = CURRENT_REQUEST.get()
    return None if timing is None else (now if now is not None else time.perf_counter()) - timing.arrival


class Metrics:
    """Every series Loopstack exports (docs/metrics.md is the contract), in one registry per app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # the standard process_* series: memory, CPU seconds, open files
        for group in (self._http, self._engines, self._images, self._chat, self._chat_engine, self._artifacts,
                      self._scale_out):
            group(self.registry)

    def _http(self, r: CollectorRegistry) -> None:
        self.requests = Counter(
            "loopstack_requests", "HTTP responses by endpoint and status code (5xx included)", ["endpoint", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "loopstack_request_duration_seconds", "HTTP request latency, arrival to response, by endpoint and status",
            ["endpoint", "status"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_seconds = Histogram(
            "loopstack_queue_seconds", "Time a request waited for an engine's worker, by engine and response status",
            ["engine", "status"], buckets=LATENCY_BUCKETS, registry=r,
        )

    def _engines(self, r: CollectorRegistry) -> None:
        self.engine_running = Gauge("loopstack_engine_running", "Jobs an engine's worker is running", ["engine"],
                                    registry=r)
        self.engine_waiting = Gauge("loopstack_engine_waiting", "Jobs waiting for an engine's worker", ["engine"],
                                    registry=r)
        self.chat_batch_rows = Histogram(
            "loopstack_chat_batch_rows", "Requests decoded together, per chat decode step", buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.engine_queue_limit = Gauge(
            "loopstack_engine_queue_limit", "Jobs that may wait before an engine answers 429", ["engine"], registry=r
        )

    def _images(self, r: CollectorRegistry) -> None:
        self.image_seconds = Histogram(
            "loopstack_image_seconds", "Sampling time per image request", ["model", "mode"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.images = Counter("loopstack_images", "Images generated", ["model", "mode"], registry=r)
        self.image_batch_images = Histogram(
            "loopstack_image_batch_images", "Images sampled together, per image batch", buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.image_batch_wait = Histogram(
            "loopstack_image_batch_wait_seconds", "Time an image batch's first request waited for others to join",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1), registry=r,
        )
        self.image_denoise_steps = Counter(
            "loopstack_image_denoise_steps", "Denoising steps run", ["model", "mode"], registry=r
        )

    def _chat(self, r: CollectorRegistry) -> None:
        self.chat_ttft = Histogram(
            "loopstack_chat_time_to_first_token_seconds", "Time from the request's arrival to the first token",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.chat_itl = Histogram(
            "loopstack_chat_inter_token_latency_seconds", "Time between consecutive generated tokens",
            buckets=TOKEN_BUCKETS, registry=r,
        )
        self.chat_prompt_tokens = Counter("loopstack_chat_prompt_tokens", "Prompt tokens read", registry=r)
        self.chat_generation_tokens = Counter(
            "loopstack_chat_generation_tokens", "Tokens generated", registry=r
        )
        self.chat_finished = Counter(
            "loopstack_chat_requests_finished", "Chat answers by finish reason (stop, length)", ["finish_reason"],
            registry=r,
        )
        # which Brainstacks domains answer the traffic, and how sure the meta-router is about them
        self.chat_domain_applied = Counter(
            "loopstack_chat_domain_applied", "Chat requests that applied a domain's stacks, by how it was routed",
            ["domain", "route"], registry=r,
        )
        self.chat_domain_weight = Histogram(
            "loopstack_chat_domain_weight", "Weight applied to a domain's stacks, per chat request that applied it",
            ["domain"], buckets=WEIGHT_BUCKETS, registry=r,
        )
        self.chat_router_probability = Histogram(
            "loopstack_chat_router_probability", "The meta-router's probability for each domain, per routed request",
            ["domain"], buckets=WEIGHT_BUCKETS, registry=r,
        )
        for reason in ("stop", "length"):
            self.chat_finished.labels(finish_reason=reason)
        # PEFT adapters: which are in memory (LOOPSTACK_MAX_LOADED_ADAPTERS), their loads and evictions
        self.chat_adapters_resident = Gauge(
            "loopstack_chat_adapters_resident", "PEFT adapters whose weights are in memory", registry=r)
        self.chat_adapters_running = Gauge(
            "loopstack_chat_adapters_running", "Distinct PEFT adapters the running chat rows use", registry=r)
        self.chat_adapter_loads = Counter(
            "loopstack_chat_adapter_loads", "Adapter weights read into memory, by result (loaded, failed)", ["result"],
            registry=r)
        self.chat_adapter_evictions = Counter(
            "loopstack_chat_adapter_evictions", "Adapters past the cap: weights given back (evicted), or kept because "
            "every adapter in memory serves a running row (deferred)", ["result"], registry=r)
        self.chat_adapter_load_seconds = Histogram(
            "loopstack_chat_adapter_load_seconds", "Time to read (and checksum) one adapter's weights",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0), registry=r)
        for result in ("loaded", "failed"):
            self.chat_adapter_loads.labels(result=result)
        for result in ("evicted", "deferred"):
            self.chat_adapter_evictions.labels(result=result)

    def _chat_engine(self, r: CollectorRegistry) -> None:
        # per request, as vLLM's dashboard shows them: what a request read and wrote, and where its time went
        self.chat_request_prompt_tokens = Histogram(
            "loopstack_chat_request_prompt_tokens", "Prompt tokens per chat request", buckets=TOKEN_COUNT_BUCKETS,
            registry=r)
        self.chat_request_generation_tokens = Histogram(
            "loopstack_chat_request_generation_tokens", "Generated tokens per chat request",
            buckets=TOKEN_COUNT_BUCKETS, registry=r)
        self.chat_request_prefill_seconds = Histogram(
            "loopstack_chat_request_prefill_seconds", "Per chat request, admission to its first token: the "
            "meta-router's read and the prompt's prefill", buckets=LATENCY_BUCKETS, registry=r)
        self.chat_request_decode_seconds = Histogram(
            "loopstack_chat_request_decode_seconds", "Per chat request, its first token to its last",
            buckets=LATENCY_BUCKETS, registry=r)
        # what a gateway reads to pick a replica: the KV cache against its budget, the running rows' domains
        self.chat_kv_cache_tokens = Gauge(
            "loopstack_chat_kv_cache_tokens", "KV-cache tokens the chat engine's caches hold (padding of rows "
            "decoded together included)", registry=r)
        self.chat_kv_cache_reserved_tokens = Gauge(
            "loopstack_chat_kv_cache_reserved_tokens", "KV-cache tokens the admitted chat rows reserve "
            "(prompt and max_tokens each), what admission keeps within the budget", registry=r)
        self.chat_kv_cache_budget_tokens = Gauge(
            "loopstack_chat_kv_cache_budget_tokens", "KV-cache tokens the chat engine admits rows up to "
            "(LOOPSTACK_CHAT_KV_CACHE_TOKENS)", registry=r)
        self.chat_running_rows = Gauge(
            "loopstack_chat_running_rows", "Chat rows reading their prompts or decoding that apply a domain's "
            "stacks or an adapter, by domain", ["domain"], registry=r)

    def _artifacts(self, r: CollectorRegistry) -> None:
        # one series per manifest entry ("digits-dit", "digits-dit/ilf", "zoo-lm/stacks/math", ...)
        self.artifact_reloads = Counter(
            "loopstack_artifact_reloads", "Artifact loads by manifest entry and result (loaded, refused)",
            ["model", "result"], registry=r,
        )
        self.artifact_generation = Gauge(
            "loopstack_artifact_generation", "The model-set generation each entry's serving version was loaded in",
            ["model"], registry=r,
        )
        self.artifact_refused = Gauge(
            "loopstack_artifact_refused", "1 while an entry's latest artifact on disk is refused (the old one serves)",
            ["model"], registry=r,
        )
        self.artifact_refused.labels(model="manifest").set(0)

    def _scale_out(self, r: CollectorRegistry) -> None:
        # the front's calls (server/distributed) whose replica stopped under them
        self.replica_retries = Counter(
            "loopstack_replica_retries", "Seeded requests sent again after the replica running them stopped",
            ["deployment"], registry=r,
        )
        self.replica_lost = Counter(
            "loopstack_replica_lost", "Requests answered 503 replica_lost (no seed, or every attempt lost)",
            ["deployment"], registry=r,
        )

    def preset_endpoints(self, endpoints: list[str]) -> None:
        for endpoint in endpoints:
            for status in PRESET_STATUSES:
                self.requests.labels(endpoint=endpoint, status=status)

    def count_response(self, endpoint: str, status: int, timing: RequestTiming) -> None:
        status_label = str(status)
        self.requests.labels(endpoint=endpoint, status=status_label).inc()
        self.request_duration.labels(endpoint=endpoint, status=status_label).observe(
            time.perf_counter() - timing.arrival)
        if timing.engine is not None:
            self.queue_seconds.labels(engine=timing.engine, status=status_label).observe(timing.queue_seconds)
