"""Prometheus metrics: one prefix, base units, `_total` counters. One registry per app instance."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
WEIGHT_BUCKETS = (0.05, 0.12, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.5, 2.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "loopstack_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=r
        )
        self.request_duration = Histogram(
            "loopstack_request_duration_seconds", "HTTP request latency", ["endpoint"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge("loopstack_queue_depth", "Jobs waiting for an engine", ["engine"], registry=r)
        self.image_seconds = Histogram(
            "loopstack_image_seconds", "Sampling time per image request", ["model", "mode"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.image_denoise_steps = Counter(
            "loopstack_image_denoise_steps", "Denoising steps run", ["model", "mode"], registry=r
        )
        self.chat_ttft = Histogram(
            "loopstack_chat_time_to_first_token_seconds", "Time from job start to the first token",
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
        # one series per manifest entry ("digits-dit", "digits-dit/ilf", "zoo-lm/stacks/math", ...)
        self.artifact_reloads = Counter(
            "loopstack_artifact_reloads", "Artifact loads by manifest entry and result (loaded, refused)",
            ["model", "result"], registry=r,
        )
        self.artifact_generation = Gauge(
            "loopstack_artifact_generation", "The model-set generation each entry's serving version was loaded in",
            ["model"], registry=r,
        )
