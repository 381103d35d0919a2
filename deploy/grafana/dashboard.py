"""The Loopstack dashboard, defined once: Grafana's JSON (`python -m deploy.grafana.dashboard`
writes deploy/grafana/dashboards/loopstack.json), the deploy check's "every panel's query returns
data", and the picture drawn through Prometheus's HTTP API where Grafana does not run all read
PANELS. Series: docs/metrics.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards" / "loopstack.json"
RATE = "1m"  # short windows: a test load of a few minutes shows in them
# Request series as clients see them: a single server's (no `deployment` label) or, on Ray Serve, the
# front's; the replicas count the same requests again under their own `deployment`.
FRONT = 'deployment=~"front|"'
CLIENT_SIDE = "{" + FRONT + "}"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str  # Grafana's unit id: reqps, s, percentunit, short, ...
    queries: tuple[Query, ...]
    kind: str = "timeseries"  # or "stat"


def quantiles(metric: str, by: str = "", where: str = "") -> tuple[Query, ...]:
    group = f"le, {by}" if by else "le"
    label = f" {{{{{by}}}}}" if by else ""
    return tuple(Query(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{where}[{RATE}])))",
                       f"p{int(q * 100)}{label}") for q in (0.5, 0.95, 0.99))


def per_image(mode: str) -> str:
    return (f'sum(rate(loopstack_image_seconds_sum{{mode="{mode}"}}[5m])) '
            f'/ sum(rate(loopstack_images_total{{mode="{mode}"}}[5m]))')


PANELS: tuple[Panel, ...] = (
    Panel("Server up", "short", (Query('up{job="loopstack"}', "{{instance}}"),), "stat"),
    Panel("Requests per second by endpoint and status", "reqps", (
        Query(f"sum by (endpoint, status) (rate(loopstack_requests_total{CLIENT_SIDE}[{RATE}]))",
              "{{endpoint}} {{status}}"),)),
    Panel("Errors per second (4xx and 5xx) by endpoint and status", "reqps", (
        Query(f'sum by (endpoint, status) (rate(loopstack_requests_total{{status=~"[45]..", {FRONT}}}[{RATE}]))',
              "{{endpoint}} {{status}}"),)),
    Panel("5xx share of responses", "percentunit", (Query("loopstack:error_ratio:rate1m", "5xx"),)),
    Panel("Latency of successful requests", "s",
          quantiles("loopstack_request_duration_seconds", where=f'{{status=~"2..", {FRONT}}}')),
    Panel("Queue: running and waiting per engine", "short", (
        Query("loopstack_engine_running", "running {{engine}}"),
        Query("loopstack_engine_waiting", "waiting {{engine}}"),
        Query("loopstack_engine_queue_limit", "limit {{engine}}"))),
    Panel("Queue time per engine (p95)", "s", (
        Query(f"histogram_quantile(0.95, sum by (le, engine) (rate(loopstack_queue_seconds_bucket[{RATE}])))",
              "p95 {{engine}}"),)),
    Panel("Image seconds per image by mode", "s", (
        Query("sum by (mode) (rate(loopstack_image_seconds_sum[5m])) / sum by (mode) (rate(loopstack_images_total[5m]))",
              "{{mode}}"),)),
    Panel("Image batches: images sampled together (mean)", "short", (
        Query("sum(rate(loopstack_image_batch_images_sum[5m])) / sum(rate(loopstack_image_batch_images_count[5m]))",
              "images per batch"),)),
    Panel("Image batches: collection-window wait (p95)", "s", (
        Query(f"histogram_quantile(0.95, sum by (le) (rate(loopstack_image_batch_wait_seconds_bucket[{RATE}])))",
              "p95"),)),
    Panel("ILF speedup (baseline seconds per image / ILF)", "short", (
        Query(f"({per_image('baseline')}) / ({per_image('ilf')})", "speedup"),), "stat"),
    Panel("Chat time to first token (from arrival)", "s", quantiles("loopstack_chat_time_to_first_token_seconds")),
    Panel("Chat inter-token latency", "s", quantiles("loopstack_chat_inter_token_latency_seconds")),
    Panel("Chat tokens per second", "short", (
        Query(f"rate(loopstack_chat_generation_tokens_total[{RATE}])", "generated"),
        Query(f"rate(loopstack_chat_prompt_tokens_total[{RATE}])", "prompt"))),
    Panel("Chat tokens per request: prompt and generation", "short", tuple(
        Query(f"histogram_quantile({q}, sum by (le) (rate(loopstack_chat_request_{kind}_tokens_bucket[{RATE}])))",
              f"p{int(q * 100)} {kind}") for kind in ("prompt", "generation") for q in (0.5, 0.95))),
    Panel("Chat seconds per request: prefill (admission to first token) and decode", "s", tuple(
        Query(f"histogram_quantile({q}, sum by (le) (rate(loopstack_chat_request_{part}_seconds_bucket[{RATE}])))",
              f"p{int(q * 100)} {part}") for part in ("prefill", "decode") for q in (0.5, 0.95))),
    Panel("Chat KV cache: tokens held and reserved against the budget", "short", (
        Query("loopstack_chat_kv_cache_tokens", "held"),
        Query("loopstack_chat_kv_cache_reserved_tokens", "reserved"),
        Query("loopstack_chat_kv_cache_budget_tokens", "budget"))),
    Panel("Chat running rows by domain and adapter", "short", (
        Query("sum by (domain) (loopstack_chat_running_rows)", "{{domain}}"),
        Query("loopstack_chat_adapters_running", "distinct adapters"))),
    Panel("Chat answers by finish reason", "reqps", (
        Query("sum by (finish_reason) (rate(loopstack_chat_requests_finished_total[5m]))", "{{finish_reason}}"),)),
    Panel("Brainstacks: requests applying each domain", "reqps", (
        Query("sum by (domain, route) (rate(loopstack_chat_domain_applied_total[5m]))", "{{domain}} ({{route}})"),)),
    Panel("Brainstacks: mean weight and router probability per domain", "short", (
        Query("sum by (domain) (rate(loopstack_chat_domain_weight_sum[5m])) "
              "/ sum by (domain) (rate(loopstack_chat_domain_weight_count[5m]))", "weight {{domain}}"),
        Query("sum by (domain) (rate(loopstack_chat_router_probability_sum[5m])) "
              "/ sum by (domain) (rate(loopstack_chat_router_probability_count[5m]))", "probability {{domain}}"))),
    Panel("Artifacts: serving generation per entry", "short", (
        Query("loopstack_artifact_generation", "{{model}}"),)),
    Panel("Artifacts: loads and refusals (15 min)", "short", (
        Query("sum by (result) (increase(loopstack_artifact_reloads_total[15m]))", "{{result}}"),
        Query("max by (model) (loopstack_artifact_refused)", "refused now: {{model}}"))),
    # On Ray Serve every replica is a target of its own, labelled deployment and replica (the front's
    # /metrics/targets); on a single server these show one unlabelled series.
    Panel("Per replica: requests per second", "reqps", (
        Query(f"sum by (deployment, replica) (rate(loopstack_requests_total[{RATE}]))", "{{deployment}} {{replica}}"),)),
    Panel("Per replica: images per second and jobs waiting", "short", (
        Query(f"sum by (deployment, replica) (rate(loopstack_images_total[{RATE}]))", "images/s {{replica}}"),
        Query('sum by (deployment, replica) (loopstack_engine_waiting{engine="image"})', "waiting {{replica}}"))),
    Panel("Scale-out: requests sent again and lost with their replica", "reqps", (
        Query(f"sum by (deployment) (rate(loopstack_replica_retries_total[{RATE}])) or vector(0)", "sent again {{deployment}}"),
        Query(f"sum by (deployment) (rate(loopstack_replica_lost_total[{RATE}])) or vector(0)", "lost {{deployment}}"))),
)


def grafana_json() -> dict:
    panels = []
    for index, panel in enumerate(PANELS):
        panels.append({
            "id": index + 1, "type": panel.kind, "title": panel.title,
            "datasource": {"type": "prometheus", "uid": "prometheus"},
            "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},  # two a row
            "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}} if panel.kind == "timeseries" else {},
            "targets": [{"refId": chr(ord("A") + k), "expr": q.expr, "legendFormat": q.legend,
                         "datasource": {"type": "prometheus", "uid": "prometheus"}} for k, q in enumerate(panel.queries)],
        })
    return {"uid": "loopstack", "title": "Loopstack", "tags": ["loopstack"], "timezone": "browser",
            "schemaVersion": 39, "version": 1, "refresh": "10s", "time": {"from": "now-30m", "to": "now"},
            "panels": panels}


def main() -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(grafana_json(), indent=1) + "\n")
    print(f"wrote {OUT} ({len(PANELS)} panels)")


if __name__ == "__main__":
    main()
