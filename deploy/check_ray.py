"""`make deploy-check-ray`: Loopstack on Ray Serve with Debian's Prometheus, for real.

1. A local Ray cluster with the Serve application on a copy of the built zoo: the front, 2 replicas
   of digits-dit and 1 chat replica.
2. Prometheus with deploy/ray/prometheus.yml (only the front's address changed): it discovers every
   replica through the front's /metrics/targets.
3. Bounded traffic (images and chat), then: every target is up, each replica's series carry its
   `deployment` and `replica` labels, the per-replica panels show one series per image replica, and
   every dashboard query returns data.
4. A JSON report in runs/deploy-check-ray/report.json, and the per-replica panels (with the
   fleet's traffic and latency) drawn from Prometheus into docs/dashboard-ray.png.

Needs the `prometheus` Debian package and a built zoo (`make zoo`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import yaml

from deploy.check import copy_root, draw_dashboard, free_port, run, wait_for
from deploy.grafana.dashboard import PANELS

REPO = Path(__file__).resolve().parent.parent
IMAGE = "digits-dit"
PER_REPLICA = ("Per replica: requests per second", "Per replica: images per second and jobs waiting")
DRAWN = ("Server up", "Requests per second by endpoint and status", "Latency of successful requests", *PER_REPLICA,
         "Scale-out: requests sent again and lost with their replica")


def start_prometheus(scratch: Path, front: str, port: int) -> subprocess.Popen:
    config = yaml.safe_load((REPO / "deploy" / "ray" / "prometheus.yml").read_text())
    config["rule_files"] = [str((REPO / "deploy" / "ray" / p).resolve()) for p in config["rule_files"]]
    config["scrape_configs"][0]["http_sd_configs"][0]["url"] = f"{front}/metrics/targets"
    config["scrape_configs"][0]["http_sd_configs"][0]["refresh_interval"] = "5s"
    path = scratch / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    run(["promtool", "check", "config", str(path)])
    log = open(scratch / "prometheus.log", "a")
    return subprocess.Popen(["prometheus", f"--config.file={path}", f"--storage.tsdb.path={scratch / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=log)


def send_traffic(http: httpx.Client, seconds: float = 120) -> None:
    """Bounded traffic (rates need a few scrapes): image requests in both modes (the ILF speedup
    panel) and a chat completion, round after round."""
    with ThreadPoolExecutor(8) as pool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            list(pool.map(lambda s: http.post("/generate-image", json={
                "model": IMAGE, "class_label": s % 10, "seed": s, "mode": ("ilf", "baseline")[s % 2]}), range(16)))
            http.post("/v1/chat/completions", json={"model": "smollm2-135m-instruct:auto", "max_tokens": 8,
                                                    "messages": [{"role": "user", "content": "What is 2 + 3?"}]})


def panel_report(query, targets: list[dict]) -> dict:
    """Every dashboard query's series count, the empty ones, and the image replicas each per-replica
    panel shows."""
    report = {"targets": targets, "panels": {}, "empty": [], "per_replica": {}}
    for panel in PANELS:
        for q in panel.queries:
            result = query(q.expr)
            report["panels"][q.expr] = len(result)
            if not result:
                report["empty"].append(f"{panel.title}: {q.expr}")
            if panel.title in PER_REPLICA and "images" in q.legend + panel.title:
                shown = {r["metric"].get("replica") for r in result if r["metric"].get("deployment") == f"images-{IMAGE}"}
                report["per_replica"][q.expr] = sorted(s for s in shown if s)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifacts", type=Path, default=REPO / "artifacts")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "deploy-check-ray")
    parser.add_argument("--picture", type=Path, default=REPO / "docs" / "dashboard-ray.png")
    args = parser.parse_args()
    import ray
    from ray import serve

    from server.distributed.app import build

    scratch = Path(tempfile.mkdtemp(prefix="loopstack-ray-check-"))
    root = scratch / "artifacts"
    copy_root(args.artifacts.resolve(), root)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve_port, prometheus_port = free_port(), free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": serve_port})
    front = f"http://127.0.0.1:{serve_port}"
    prometheus = None
    try:
        serve.run(build({"settings": {"artifact_root": str(root), "torch_threads": 1, "device": "cpu"},
                         "image_models": IMAGE, "chat": True, "options": {f"images-{IMAGE}": {"num_replicas": 2}}}),
                  name="loopstack", route_prefix="/")
        http = httpx.Client(base_url=front, timeout=300)
        wait_for("the replicas became ready", lambda: http.get("/readyz").status_code == 200, timeout=600, every=2)
        prometheus = start_prometheus(scratch, front, prometheus_port)
        prom = httpx.Client(base_url=f"http://127.0.0.1:{prometheus_port}", timeout=30)

        def query(expr: str) -> list:
            body = prom.get("/api/v1/query", params={"query": expr}).json()
            assert body["status"] == "success", (expr, body)
            return body["data"]["result"]

        def prometheus_ready() -> bool:
            try:
                return prom.get("/-/ready").status_code == 200
            except httpx.HTTPError:
                return False

        wait_for("Prometheus became ready", prometheus_ready, timeout=60)
        targets = http.get("/metrics/targets").json()
        wait_for("Prometheus scraped every target", lambda: len(query('up{job="loopstack"} == 1')) == len(targets),
                 timeout=90, every=2)
        began = time.time()
        send_traffic(http)
        time.sleep(12)
        image_replicas = {t["labels"]["replica"] for t in targets if t["labels"]["deployment"] == f"images-{IMAGE}"}
        report = panel_report(query, targets)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.json").write_text(json.dumps(report, indent=2))

        def query_range(expr: str, start: float, end: float) -> list:
            return prom.get("/api/v1/query_range", params={"query": expr, "start": start, "end": end,
                                                            "step": 5}).json()["data"]["result"]

        draw_dashboard(query_range, began, time.time(), args.picture, [p for p in PANELS if p.title in DRAWN],
                       "Loopstack on Ray Serve (`make deploy-check-ray`): the front, 2 digits-dit replicas and a chat "
                       "replica, each a Prometheus target found through the front's /metrics/targets.\nThe dashboard's "
                       "queries through Prometheus's HTTP API (Grafana itself did not run); two minutes of traffic.")
        missing = {expr: shown for expr, shown in report["per_replica"].items() if set(shown) != image_replicas}
        print(f"{len(targets)} targets; image replicas {sorted(image_replicas)}; "
              f"{len(report['panels']) - len(report['empty'])}/{len(report['panels'])} queries with data")
        if report["empty"] or missing:
            raise SystemExit(f"deploy check (Ray) failed: empty {report['empty']}; per replica {missing}")
        print(f"deploy check (Ray) passed; wrote {args.out / 'report.json'}")
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(timeout=30)
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
