"""Image serving throughput: concurrent requests sampled one at a time against sampled in batches.

One run, one server process (the app in-process, its HTTP routes through Starlette's test client):
for each mode (baseline, ILF) and each number of concurrent clients, every client sends requests one
after another (a closed loop), with the image batcher limited to one image per batch (sequential
serving, the engine before batching) and with its default batch, in alternating rounds (sequential,
batched, batched, sequential, ...; this VM's speed drifts by 20% within minutes, and interleaving
keeps the drift out of the ratio), the rounds' requests pooled; a lone client alternates request by
request, and its per-pair latency ratio gets a 95% bootstrap interval. Reported per setting:
images/s (images over wall time), p50/p95 latency, and the batched/sequential ratio. The targets
are checked in the table: at the most clients, images/s >= 3x sequential and p95 no worse than that
many sequential requests' total (their mean latency at 1 client, times the clients); at 1 client,
latency within 5% of sequential, shown when the interval's upper end is (the collection window must
not tax a lone request). `bench.ab_latency` compares a lone client's latency across two builds.

    python -m bench.images --artifacts ROOT [--model digits-dit] [--clients 1 4 16] [--device cpu] [--out runs/bench/images]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

from fastapi.testclient import TestClient
from tqdm import tqdm

from bench.ab_latency import alternate, paired_ratio
from server.app import create_app
from server.settings import Settings


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def closed_loop(client: TestClient, body: dict, clients: int, per_client: int) -> dict:
    """`clients` threads, each sending `per_client` requests one after another; latencies and wall time."""
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def one_client(index: int) -> None:
        for i in range(per_client):
            started = time.perf_counter()
            response = client.post("/generate-image", json=body | {"seed": 1000 * index + i})
            with lock:
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    failures.append(f"{response.status_code} {response.text[:200]}")

    threads = [threading.Thread(target=one_client, args=(c,)) for c in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if failures:
        raise SystemExit(f"requests failed: {failures[:3]}")
    return {"wall_s": wall, "latencies": latencies}


def one_request(client: TestClient, batcher, max_images: int, body: dict):
    """A lone client's request, with the batcher held to `max_images` images a batch."""
    def send(seed: int) -> None:
        batcher.max_images = max_images
        client.post("/generate-image", json=body | {"seed": seed}).raise_for_status()
    return send


def pooled(runs: list[dict]) -> dict:
    latencies = [x for run in runs for x in run["latencies"]]
    wall = sum(run["wall_s"] for run in runs)
    return {"requests": len(latencies), "wall_s": wall, "images_per_s": len(latencies) / wall,
            "mean_s": statistics.mean(latencies), "p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifacts", type=Path, required=True, help="artifact root of the built zoo")
    parser.add_argument("--model", default="digits-dit")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=48, help="requests per setting and round (at least 1 per client)")
    parser.add_argument("--pairs", type=int, default=100, help="a lone client's requests of each serving, in turn")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds of each serving")
    parser.add_argument("--device", default="cpu", help="torch device the server samples on (cpu, cuda)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/images"))
    args = parser.parse_args()

    settings = Settings(artifact_root=args.artifacts, watch=False, device=args.device, _env_file=None)
    rows = []
    with TestClient(create_app(settings, load_in_background=False)) as client:
        card = next((c for c in client.get("/v1/models").json()["data"] if c["id"] == args.model), None)
        if card is None or card["status"] != "ready":
            raise SystemExit(f"{args.model} is not served from {args.artifacts}")
        batcher = client.app.state.services.images.batcher
        default_batch = batcher.max_images
        modes = ["baseline"] + (["ilf"] if card["details"].get("ilf") else [])
        body = {"model": args.model, "class_label": 3}
        for mode in modes:
            closed_loop(client, body | {"mode": mode}, 2, 2)  # warm-up: the first calls of a mode are slower
        for mode, clients in tqdm([(m, c) for m in modes for c in args.clients], desc="settings"):
            if clients == 1:  # a request of each in turn: the 5% check needs pairs closer in time than rounds
                sequential, batched = alternate(one_request(client, batcher, 1, body | {"mode": mode}),
                                                one_request(client, batcher, default_batch, body | {"mode": mode}),
                                                args.pairs)
                runs = {"sequential": [{"wall_s": sum(sequential), "latencies": sequential}],
                        "batched": [{"wall_s": sum(batched), "latencies": batched}]}
                lone = {"paired": paired_ratio(sequential, batched)}
            else:
                runs, lone = {"sequential": [], "batched": []}, {}
                per_client = max(1, args.requests // (clients * args.rounds))
                for round_ in range(args.rounds):
                    order = ("sequential", "batched") if round_ % 2 == 0 else ("batched", "sequential")
                    for serving in order:
                        batcher.max_images = 1 if serving == "sequential" else default_batch
                        runs[serving].append(closed_loop(client, body | {"mode": mode}, clients, per_client))
            rows += [{"mode": mode, "clients": clients, "serving": s} | pooled(r) | (lone if s == "batched" else {})
                     for s, r in runs.items()]
        batcher.max_images = default_batch

    table = report(rows, max(args.clients))
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "images.json").write_text(json.dumps({"model": args.model, "device": args.device, "max_batch": default_batch,
                                                      "window_ms": settings.image_batch_window_ms, "rows": rows},
                                                     indent=2))
    (args.out / "images.md").write_text(table + "\n")
    print(f"wrote {args.out / 'images.json'}")


def report(rows: list[dict], most: int) -> str:
    lines = ["| mode | clients | sequential img/s | batched img/s | x sequential | sequential p50 / p95 s "
             "| batched p50 / p95 s | target |", "|---|---|---|---|---|---|---|---|"]
    by = {(r["mode"], r["clients"], r["serving"]): r for r in rows}
    for mode, clients in dict.fromkeys((r["mode"], r["clients"]) for r in rows):
        seq, bat = by[mode, clients, "sequential"], by[mode, clients, "batched"]
        ratio = bat["images_per_s"] / seq["images_per_s"]
        target = ""
        if clients == most > 1 and (mode, 1, "sequential") in by:
            budget = clients * by[mode, 1, "sequential"]["mean_s"]
            target = (f"img/s >= 3x: {'met' if ratio >= 3 else 'missed'}; p95 <= {budget:.2f} s: "
                      f"{'met' if bat['p95_s'] <= budget else 'missed'}")
        elif clients == 1 and "paired" in bat:
            change, (lo, hi) = bat["paired"]["median_ratio"] - 1, (x - 1 for x in bat["paired"]["ci95"])
            verdict = "met" if change <= 0.05 else "missed"
            if change <= 0.05 < hi:
                verdict += f", but the interval reaches {hi:+.1%}"
            target = f"within 5%: per pair {change:+.1%} (95% {lo:+.1%} to {hi:+.1%}), {verdict}"
        lines.append(f"| {mode} | {clients} | {seq['images_per_s']:.2f} | {bat['images_per_s']:.2f} | {ratio:.2f} "
                     f"| {seq['p50_s']:.3f} / {seq['p95_s']:.3f} | {bat['p50_s']:.3f} / {bat['p95_s']:.3f} | {target} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
