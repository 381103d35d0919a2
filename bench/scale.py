"""Scale-out throughput: images/s of one server process against Ray Serve with 1 and 2 image replicas,
every process with one torch thread, all over HTTP on this machine.

Four systems run side by side for the whole benchmark (idle ones cost nothing measurable): a
single server (`python -m server`, one image model), two single servers with the client sending
half its clients to each (the same scale-out without Ray: this machine's own limit), and two Serve
applications on one local Ray cluster, `/one` (1 image replica) and `/two` (2 image replicas),
each behind its own front. In
each round every system gets the same closed loop (`--clients` threads, each sending requests one
after another, `--requests` in all), in alternating order (this VM's speed drifts within minutes;
interleaving keeps the drift out of the ratios). Reported per system: images/s (median of rounds,
with the rounds' range), p50/p95 latency, and the ratios the scale-out model needs:
- 2 replicas / 1 replica: what a second replica adds (the target is >= 1.6x);
- 2 single servers / 1: what a second process adds without Ray, on cores the client shares;
- 1 replica / single server and 2 replicas / 2 servers: what Ray's hops cost (proxy, front,
  handle) at the same compute; with the CPU seconds Serve's proxy and front and the client spend
  per request (from /proc);
- a lone client's latency through Serve minus the single server's: Ray's added latency per request.

    python -m bench.scale --artifacts ROOT [--model digits-dit] [--clients 32] [--requests 320] \
        [--rounds 3] [--out runs/bench/scale]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from tqdm import tqdm


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_ready(url: str, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=30).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not become ready in {seconds:.0f} s")


def closed_loop(url: str, body: dict, clients: int, requests: int) -> dict:
    """`clients` threads share `requests` requests, each sending one after another; `url` may list
    several servers, space-separated: client i sends to the i-th (balanced by the client)."""
    latencies: list[float] = []
    failures: list[str] = []
    replicas: dict[str, int] = {}
    lock = threading.Lock()
    counter = iter(range(requests))

    servers = url.split()

    def one_client(index: int) -> None:
        url = servers[index % len(servers)]
        with httpx.Client(timeout=300) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                started = time.perf_counter()
                response = http.post(f"{url}/generate-image", json=body | {"seed": i})
                with lock:
                    if response.status_code == 200:
                        latencies.append(time.perf_counter() - started)
                        replica = response.headers.get("x-loopstack-replica", "single")
                        replicas[replica] = replicas.get(replica, 0) + 1
                    else:
                        failures.append(f"{response.status_code} {response.text[:200]}")

    threads = [threading.Thread(target=one_client, args=(c,)) for c in range(clients)]
    started, cpu = time.perf_counter(), time.process_time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    images = len(latencies) * body.get("n", 1)
    return {"images_per_second": images / wall, "wall_seconds": wall, "latencies": latencies,
            "failures": failures, "by_replica": replicas, "client_cpu_seconds_per_request": cpu / requests}


def lone_latency(urls: dict[str, str], body: dict, count: int) -> dict[str, list[float]]:
    """A lone client's latency on each system, the systems taking turns request by request."""
    out: dict[str, list[float]] = {name: [] for name in urls}
    with httpx.Client(timeout=300) as http:
        for i in range(count):
            for name, url in urls.items():
                started = time.perf_counter()
                http.post(f"{url.split()[0]}/generate-image", json=body | {"seed": 10_000 + i}).raise_for_status()
                out[name].append(time.perf_counter() - started)
    return out


def process_cpu_seconds() -> dict[str, float]:
    """CPU seconds so far of this machine's processes by title (Ray titles its workers
    "ray::ServeReplica:<app>:<deployment>", "ray::ProxyActor", ...); Linux /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    seconds: dict[str, float] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace").strip()
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        seconds[title] = seconds.get(title, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return seconds


def pid_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def model_cpu_seconds(reading: dict, pids: list[int], app: str | None) -> float:
    """CPU seconds so far of the processes that run the model: the single servers, or an app's replicas."""
    if app is None:
        return sum(pid_cpu_seconds(pid) for pid in pids)
    return sum(v for t, v in reading.items() if t.startswith(f"ray::ServeReplica:{app}:images-"))


def ray_overhead_cpu(before: dict, after: dict, app: str) -> dict[str, float]:
    """CPU seconds spent by Serve's proxy and an application's front between two readings."""
    roles = {"proxy": "ray::ProxyActor", "front": f"ray::ServeReplica:{app}:front"}
    def total(reading: dict, prefix: str) -> float:  # a title gains a method name while it runs one
        return sum(v for t, v in reading.items() if t.startswith(prefix))

    return {role: total(after, prefix) - total(before, prefix) for role, prefix in roles.items()}


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def start_single(artifacts: Path, model: str, queue: int, settings: dict) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = os.environ | {f"LOOPSTACK_{k.upper()}": str(v) for k, v in settings.items()} | {
                        "LOOPSTACK_ARTIFACT_ROOT": str(artifacts), "LOOPSTACK_TORCH_THREADS": "1",
                        "LOOPSTACK_SERVE_MODELS": model, "LOOPSTACK_IMAGE_QUEUE_SIZE": str(queue),
                        "LOOPSTACK_WATCH": "false", "LOOPSTACK_DEVICE": "cpu"}
    process = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process, f"http://127.0.0.1:{port}"


def start_serve(artifacts: Path, model: str, port: int, extra: dict) -> dict[str, str]:
    import ray
    from ray import serve

    from server.distributed.app import build

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = extra | {"artifact_root": str(artifacts), "torch_threads": 1, "device": "cpu", "watch": False}
    urls = {}
    for name, replicas in (("one", 1), ("two", 2)):
        app = build({"settings": settings, "image_models": model, "chat": False, "publish_metrics": False,
                     "options": {f"images-{model}": {"num_replicas": replicas}}})
        serve.run(app, name=name, route_prefix=f"/{name}")
        urls[f"ray, {replicas} replica{'s' if replicas > 1 else ''}"] = f"http://127.0.0.1:{port}/{name}"
    return urls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument("--model", default="digits-dit")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=320, help="requests per system per round")
    parser.add_argument("--images-per-request", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lone", type=int, default=20, help="lone-client requests per system")
    parser.add_argument("--batch-window-ms", type=float, default=None,
                        help="the image batcher's window on every system (default: the server's)")
    parser.add_argument("--systems", nargs="+", default=None, help="only these systems (names as in the table)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/scale"))
    args = parser.parse_args()
    runs, lone = measure(args)
    result = summarise(args, runs, lone)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps(result, indent=2))
    print(report(result["rows"], result["ratios"]))
    print(f"wrote {args.out / 'scale.json'}")


def measure(args) -> tuple[dict[str, list[dict]], dict[str, list[float]]]:
    """Every system's rounds (in alternating order) and its lone client's latencies."""
    extra = {} if args.batch_window_ms is None else {"image_batch_window_ms": args.batch_window_ms}
    body = {"model": args.model, "class_label": 3, "n": args.images_per_request}
    singles = [start_single(args.artifacts.resolve(), args.model, args.clients, extra) for _ in range(2)]
    try:
        urls = {"single server": singles[0][1], "2 single servers": " ".join(url for _, url in singles)}
        urls |= start_serve(args.artifacts.resolve(), args.model, free_port(), extra)
        urls = {k: v for k, v in urls.items() if args.systems is None or k in args.systems}
        for url in " ".join(urls.values()).split():
            wait_ready(url)
            closed_loop(url, body, args.clients, args.clients)  # warm-up: first batches, connections
        runs: dict[str, list[dict]] = {name: [] for name in urls}
        order = list(urls)
        apps = {"ray, 1 replica": "one", "ray, 2 replicas": "two"}
        for r in tqdm(range(args.rounds), desc="rounds"):
            for name in order if r % 2 == 0 else order[::-1]:
                pids = [singles[0][0].pid] if name == "single server" else [p.pid for p, _ in singles]
                before = process_cpu_seconds()
                model_before = model_cpu_seconds(before, pids, apps.get(name))
                run = closed_loop(urls[name], body, args.clients, args.requests)
                after = process_cpu_seconds()
                run["model_cpu_seconds_per_image"] = ((model_cpu_seconds(after, pids, apps.get(name)) - model_before)
                                                      / (args.requests * args.images_per_request))
                if name in apps:  # the proxy serves every app; only this one has traffic now
                    cpu = ray_overhead_cpu(before, after, apps[name])
                    run["ray_cpu_seconds_per_request"] = {k: v / args.requests for k, v in cpu.items()}
                runs[name].append(run)
        lone = lone_latency(urls, body, args.lone)
    finally:
        for process, _ in singles:
            process.terminate()
            process.wait(timeout=30)
        try:
            import ray
            from ray import serve

            serve.shutdown()
            ray.shutdown()
        except Exception:  # noqa: BLE001 - the results are already in
            pass
    return runs, lone


def summarise(args, runs: dict[str, list[dict]], lone: dict[str, list[float]]) -> dict:
    rows = []
    for name, rounds in runs.items():
        throughputs = [r["images_per_second"] for r in rounds]
        latencies = [x for r in rounds for x in r["latencies"]]
        rows.append({"system": name, "images_per_second": statistics.median(throughputs),
                     "images_per_second_range": [min(throughputs), max(throughputs)],
                     "p50_seconds": percentile(latencies, 50), "p95_seconds": percentile(latencies, 95),
                     "lone_p50_seconds": statistics.median(lone[name]),
                     "failures": sum(len(r["failures"]) for r in rounds),
                     "model_cpu_ms_per_image": 1000 * statistics.median(
                         [r["model_cpu_seconds_per_image"] for r in rounds]),
                     "client_cpu_ms_per_request": 1000 * statistics.median(
                         [r["client_cpu_seconds_per_request"] for r in rounds]),
                     "ray_cpu_ms_per_request": {role: 1000 * statistics.median(
                         [r["ray_cpu_seconds_per_request"][role] for r in rounds])
                         for role in ("proxy", "front")} if "ray_cpu_seconds_per_request" in rounds[0] else None,
                     "by_replica": [r["by_replica"] for r in rounds]})
    by = {row["system"]: row for row in rows}
    single_row, one = by["single server"], by["ray, 1 replica"]
    def ratio(over: str, under: str) -> float:  # median of the rounds' ratios
        return statistics.median([b["images_per_second"] / a["images_per_second"]
                                  for a, b in zip(runs[under], runs[over])])

    ratios = {
        "two_replicas_over_one": ratio("ray, 2 replicas", "ray, 1 replica"),
        "two_servers_over_one": ratio("2 single servers", "single server"),
        "one_replica_over_single_server": ratio("ray, 1 replica", "single server"),
        "two_replicas_over_two_servers": ratio("ray, 2 replicas", "2 single servers"),
        "ray_added_lone_latency_seconds": one["lone_p50_seconds"] - single_row["lone_p50_seconds"],
    }
    return {"model": args.model, "clients": args.clients, "requests_per_round": args.requests,
            "images_per_request": args.images_per_request, "rounds": args.rounds, "cpus": os.cpu_count(),
            "rows": rows, "ratios": ratios, "target_two_over_one": 1.6, "met": ratios["two_replicas_over_one"] >= 1.6}


def report(rows: list[dict], ratios: dict) -> str:
    lines = ["| system | images/s (median of rounds) | range | p50 s | p95 s | lone p50 s | failures | "
             "model processes' CPU ms/image | Ray CPU ms/request (proxy + front) | client CPU ms/request |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        low, high = row["images_per_second_range"]
        cpu = row["ray_cpu_ms_per_request"]
        cpu_text = f"{cpu['proxy']:.1f} + {cpu['front']:.1f}" if cpu else "-"
        lines.append(f"| {row['system']} | {row['images_per_second']:.1f} | {low:.1f}-{high:.1f} | "
                     f"{row['p50_seconds']:.3f} | {row['p95_seconds']:.3f} | {row['lone_p50_seconds']:.3f} | "
                     f"{row['failures']} | {row['model_cpu_ms_per_image']:.1f} | {cpu_text} | "
                     f"{row['client_cpu_ms_per_request']:.1f} |")
    two = ratios["two_replicas_over_one"]
    lines += ["", f"2 replicas / 1 replica: {two:.2f}x (target >= 1.6x: {'met' if two >= 1.6 else 'missed'})",
              f"2 single servers / 1 (no Ray; this machine's own limit): {ratios['two_servers_over_one']:.2f}x",
              f"1 replica / single server: {ratios['one_replica_over_single_server']:.2f}x",
              f"2 replicas / 2 single servers: {ratios['two_replicas_over_two_servers']:.2f}x",
              f"Ray's added latency for a lone request: {1000 * ratios['ray_added_lone_latency_seconds']:.1f} ms"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
