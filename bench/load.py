"""Load against a running Loopstack server: find its capacity, hold it there, fail on any 5xx.

Loopback only: the client shares the machine with the server (a remote target would measure the
network too, and this is not a tool for loading other people's servers). The client takes CPU from
the server on a small machine; its share is reported (`client_cpu_s`).

Traffic is mixed: image requests to every ready image model (a random class, or a digit in the prompt, the
model's default steps and mode, one image) and chat requests to the chat model (everyday and domain
prompts, the router's route, `--chat-tokens` tokens), `--image-share` of them images. Arrivals are
open-loop, Poisson at a set total rate: a closed loop of N clients would slow its own arrivals as the
server slows and hide the queueing a real crowd meets.

1. Unloaded: `--unloaded` requests per endpoint, one at a time; each endpoint's p95 latency.
2. Ramp: the rate starts at half of what one-at-a-time serving gives and rises by `--ramp-factor`
   every step of `--step-seconds`, or longer where that would send fewer than
   `--min-step-requests` (40: a p95 over a dozen requests is their maximum, and a step that held by
   chance held the hold above capacity); a rate holds when, over the requests sent at it, every
   endpoint's p95 (200 answers) stays under `--slo-factor` x its unloaded p95 and at most 1% are
   refused (429). Capacity is the highest rate that held.
3. Hold at capacity for `--hold-seconds`: throughput, p50/p95/p99 per endpoint, status counts, and
   the server's resident memory (`process_resident_memory_bytes` from /metrics) every 5 s, against
   its level when the hold begins (after the unloaded run and the ramp have warmed every path).

Prints tables and writes JSON. Exit status 1 on any 5xx or transport error, or when the memory
during the hold rises past `--memory-tolerance` (10%) above its level after warm-up.

    python -m bench.load --url http://127.0.0.1:8000 [--hold-seconds 600] [--out runs/bench/load]
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import random
import resource
import socket
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
from tqdm import tqdm

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Write a haiku about the sea.",
    "Compute 23 + 45 - 12.",
    "Write a Python function that reverses a string.",
    "How much Thermadol is given to a 20 kg child?",
    "Explain what a prime number is in one sentence.",
    "If all cats are mammals and Tom is a cat, is Tom a mammal?",
]
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
MEMORY_EVERY_S = 5.0


@dataclass
class Shot:
    """One request as sent and answered."""

    endpoint: str  # "<path> <model>"
    sent: float  # seconds since the phase began
    status: int | str  # HTTP status, or "error" (transport failure)
    latency: float


@dataclass
class Target:
    url: str
    image_models: list[tuple[str, int | None]]  # (name, its classes; None: a text-to-image model)
    chat_model: str | None
    headers: dict[str, str] = field(default_factory=dict)


def refuse_remote(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as error:
        raise SystemExit(f"cannot resolve {host!r}: {error}")
    if not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise SystemExit(f"{url} is not a loopback address: bench.load only loads a server on this machine")


def discover(url: str, headers: dict[str, str]) -> Target:
    """The ready models the server lists: every image model, and the chat model (not its aliases)."""
    cards = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).raise_for_status().json()["data"]
    ready = [c for c in cards if c["status"] == "ready" and c.get("route") is None]
    images = [(c["id"], len(c["details"]["classes"]) if c["kind"] == "dit" else None)
              for c in ready if c["kind"] in ("dit", "pixart")]
    chats = [c["id"] for c in ready if c["kind"] == "causal-lm"]
    if not images and not chats:
        raise SystemExit(f"{url} serves no ready model yet (see GET /v1/models)")
    return Target(url, images, chats[0] if chats else None, headers)


def mix(target: Target, image_share: float) -> dict[str, float]:
    """Each endpoint's share of the requests: `image_share` over the image models, the rest chat."""
    image_share = image_share if target.chat_model and target.image_models else float(bool(target.image_models))
    shares = {f"/generate-image {name}": image_share / len(target.image_models) for name, _ in target.image_models}
    if target.chat_model:
        shares[f"/chat {target.chat_model}"] = 1 - image_share
    return shares


def request_for(target: Target, rng: random.Random, image_share: float, chat_tokens: int,
                kind: str | None = None) -> tuple[str, str, dict]:
    """(endpoint label, path, body): an image request with the mix's image share, else a chat one."""
    if kind is None:
        kind = "image" if rng.random() < sum(v for k, v in mix(target, image_share).items()
                                              if k.startswith("/generate-image")) else "chat"
    if kind == "image":
        name, classes = rng.choice(target.image_models)
        body = {"model": name, "seed": rng.randrange(2**31)}
        body |= ({"prompt": f"the digit {DIGITS[rng.randrange(10)]}"} if classes is None
                 else {"class_label": rng.randrange(classes)})
        return f"/generate-image {name}", "/generate-image", body
    body = {"model": target.chat_model, "prompt": rng.choice(CHAT_PROMPTS), "max_tokens": chat_tokens,
            "temperature": 0, "seed": rng.randrange(2**31)}
    return f"/chat {target.chat_model}", "/chat", body


async def send(http: httpx.AsyncClient, label: str, path: str, body: dict, start: float) -> Shot:
    sent = time.perf_counter()
    try:
        status: int | str = (await http.post(path, json=body)).status_code
    except httpx.HTTPError:
        status = "error"
    return Shot(label, sent - start, status, time.perf_counter() - sent)


def client(target: Target) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=target.url, headers=target.headers, timeout=600,
                             limits=httpx.Limits(max_connections=2000, max_keepalive_connections=200))


async def unloaded(target: Target, per_endpoint: int, chat_tokens: int, seed: int) -> list[Shot]:
    """Each endpoint's requests one at a time, nothing else in flight."""
    rng = random.Random(seed)
    shots = []
    async with client(target) as http:
        plan = [("image", m) for m in target.image_models for _ in range(per_endpoint)]
        plan += [("chat", None)] * (per_endpoint if target.chat_model else 0)
        for kind, model in tqdm(plan, desc="unloaded", leave=False):
            label, path, body = request_for(Target(target.url, [model] if model else [], target.chat_model),
                                            rng, 1.0, chat_tokens, kind)
            shots.append(await send(http, label, path, body, time.perf_counter()))
    return shots


async def open_loop(target: Target, rate: float, seconds: float, image_share: float, chat_tokens: int, seed: int,
                    on_tick=None) -> tuple[list[Shot], float]:
    """Poisson arrivals at `rate` per second for `seconds`; waits for every answer. (shots, wall seconds)."""
    rng = random.Random(seed)
    tasks = []
    async with client(target) as http:
        start = time.perf_counter()
        next_at = 0.0
        last_tick = start
        while True:
            next_at += rng.expovariate(rate)
            if next_at >= seconds:
                break
            while (delay := start + next_at - time.perf_counter()) > 0:
                await asyncio.sleep(min(delay, 1.0))
                if on_tick is not None and time.perf_counter() - last_tick >= 1.0:
                    last_tick = time.perf_counter()
                    await on_tick(last_tick - start)
            label, path, body = request_for(target, rng, image_share, chat_tokens)
            tasks.append(asyncio.create_task(send(http, label, path, body, start)))
        shots = list(await asyncio.gather(*tasks))
        return shots, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def summarize(shots: list[Shot], labels: list[str]) -> dict[str, dict]:
    """Per endpoint: requests, statuses, and latency percentiles of the 200 answers."""
    out = {}
    for label in labels:
        mine = [s for s in shots if s.endpoint == label]
        ok = [s.latency for s in mine if s.status == 200]
        out[label] = {"requests": len(mine), "statuses": dict(Counter(str(s.status) for s in mine)),
                      "p50_s": percentile(ok, 50), "p95_s": percentile(ok, 95), "p99_s": percentile(ok, 99)}
    return out


def failures(shots: list[Shot]) -> int:
    """5xx answers and transport errors: what the server must never give."""
    return sum(1 for s in shots if s.status == "error" or s.status >= 500)


def holds(step: dict[str, dict], baseline: dict[str, dict], slo_factor: float, max_refused: float = 0.01) -> bool:
    """A rate holds when every endpoint's p95 is under slo_factor x unloaded and few are refused."""
    sent = sum(e["requests"] for e in step.values())
    refused = sum(e["statuses"].get("429", 0) for e in step.values())
    if sent == 0 or refused > max_refused * sent:
        return False
    for label, stats in step.items():
        if stats["requests"] == 0:
            continue
        if stats["p95_s"] is None or stats["p95_s"] >= slo_factor * baseline[label]["p95_s"]:
            return False
    return True


def resident_memory(url: str, headers: dict[str, str]) -> float | None:
    """The server's resident memory in bytes, from its Prometheus metrics."""
    try:
        text = httpx.get(f"{url}/metrics", headers=headers, timeout=10).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith("process_resident_memory_bytes "):
            return float(line.split()[1])
    return None


def client_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run(url: str, hold_seconds: float = 600, step_seconds: float = 40, ramp_factor: float = 1.25,
              max_steps: int = 12, slo_factor: float = 2.0, image_share: float = 0.5, chat_tokens: int = 32,
              unloaded_per_endpoint: int = 20, memory_tolerance: float = 0.10, seed: int = 0,
              headers: dict[str, str] | None = None, rate: float | None = None, min_step_requests: int = 40) -> dict:
    refuse_remote(url)
    headers = headers or {}
    target = discover(url, headers)
    labels = list(mix(target, image_share))
    cpu_start = client_cpu_seconds()

    baseline_shots = await unloaded(target, unloaded_per_endpoint, chat_tokens, seed)
    baseline = summarize(baseline_shots, labels)
    if any(s["p95_s"] is None for s in baseline.values()):
        raise SystemExit(f"unloaded requests failed: {baseline}")
    # one at a time, the mix's mean latency gives a rate the server surely keeps up with: start at half of it
    mean_latency = sum(share * statistics.mean(s.latency for s in baseline_shots if s.endpoint == label)
                       for label, share in mix(target, image_share).items())

    ramp = []
    capacity, found = rate, "given (--rate)"
    if rate is None:
        found = "the highest ramp rate that held"
        step_rate = 0.5 / mean_latency
        for step in range(max_steps):
            seconds = max(step_seconds, min_step_requests / step_rate)
            shots, wall = await open_loop(target, step_rate, seconds, image_share, chat_tokens, seed + 1 + step)
            stats, failed = summarize(shots, labels), failures(shots)
            held = holds(stats, baseline, slo_factor) and failed == 0
            ramp.append({"rate": step_rate, "held": held, "wall_s": wall, "failures": failed, "endpoints": stats})
            print(f"ramp {step_rate:6.2f}/s: {'holds' if held else 'over'}  " + "  ".join(
                f"{lab} p95 {fmt(st['p95_s'])} ({st['statuses']})" for lab, st in stats.items()), flush=True)
            if not held:
                break
            capacity = step_rate
            step_rate *= ramp_factor
        if capacity is None:
            capacity = ramp[0]["rate"] / ramp_factor  # even the first rate was too much: hold below it
            found = f"below the first ramp rate, {ramp[0]['rate']:.2f}/s, which did not hold"
            print(f"no ramp rate held; holding at {capacity:.2f}/s", flush=True)

    memory = []
    warm = resident_memory(url, headers)
    bar = tqdm(total=int(hold_seconds), desc=f"hold {capacity:.2f}/s", unit="s", leave=False)

    async def tick(elapsed: float) -> None:
        bar.n = min(int(elapsed), int(hold_seconds))
        bar.refresh()
        if not memory or elapsed - memory[-1][0] >= MEMORY_EVERY_S:
            memory.append((elapsed, await asyncio.to_thread(resident_memory, url, headers)))

    shots, wall = await open_loop(target, capacity, hold_seconds, image_share, chat_tokens, seed + 100, tick)
    bar.close()
    memory.append((wall, resident_memory(url, headers)))
    levels = [m for _, m in memory if m is not None]
    peak = max(levels) if levels else None
    growth = (peak / warm - 1) if warm and peak else None
    hold = summarize(shots, labels)
    answered = sum(1 for s in shots if s.status == 200)
    result = {
        "url": url, "machine": machine(), "settings": {
            "hold_seconds": hold_seconds, "step_seconds": step_seconds, "min_step_requests": min_step_requests,
            "ramp_factor": ramp_factor,
            "slo_factor": slo_factor, "image_share": image_share, "chat_tokens": chat_tokens,
            "unloaded_per_endpoint": unloaded_per_endpoint, "seed": seed},
        "unloaded": baseline, "ramp": ramp, "capacity_rps": capacity, "capacity_found": found,
        "hold": {"rate": capacity, "wall_s": wall, "sent": len(shots), "answered": answered,
                 "throughput_rps": answered / wall, "statuses": dict(Counter(str(s.status) for s in shots)),
                 "failures": failures(shots), "endpoints": hold,
                 "held": holds(hold, baseline, slo_factor)},  # the hold's own verdict on the rate
        "memory": {"warm_bytes": warm, "peak_bytes": peak, "end_bytes": levels[-1] if levels else None,
                   "growth": growth, "tolerance": memory_tolerance, "samples": memory},
        "client_cpu_s": client_cpu_seconds() - cpu_start,
    }
    result["passed"] = (result["hold"]["failures"] == 0 and all(r["failures"] == 0 for r in ramp)
                        and growth is not None and growth <= memory_tolerance)
    return result


def machine() -> dict:
    import os
    import platform
    return {"cpus": os.cpu_count(), "platform": platform.platform()}


def fmt(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.3f}s"


def report(result: dict) -> str:
    slo = f"p95 under {result['settings']['slo_factor']:g}x unloaded, <= 1% refused"
    lines = [f"capacity: {result['capacity_rps']:.2f} requests/s, {result['capacity_found']} ({slo})", ""]
    hold = result["hold"]
    lines.append(f"hold {hold['wall_s']:.0f} s at {hold['rate']:.2f}/s: {hold['sent']} sent, throughput "
                 f"{hold['throughput_rps']:.2f}/s, statuses {hold['statuses']}, 5xx+errors {hold['failures']}; "
                 f"the rate {'held' if hold['held'] else 'did not hold'} ({slo}) over the hold")
    lines.append("")
    lines.append("| endpoint | requests | statuses | unloaded p95 | p50 | p95 | p99 | p95 / unloaded |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for label, stats in hold["endpoints"].items():
        base = result["unloaded"][label]["p95_s"]
        ratio = f"{stats['p95_s'] / base:.2f}" if stats["p95_s"] and base else "-"
        lines.append(f"| {label} | {stats['requests']} | {stats['statuses']} | {fmt(base)} | {fmt(stats['p50_s'])} "
                     f"| {fmt(stats['p95_s'])} | {fmt(stats['p99_s'])} | {ratio} |")
    mem = result["memory"]
    if mem["warm_bytes"] and mem["peak_bytes"]:
        lines.append("")
        lines.append(f"memory: {mem['warm_bytes'] / 2**20:.0f} MiB after warm-up, peak {mem['peak_bytes'] / 2**20:.0f}"
                     f" MiB, end {mem['end_bytes'] / 2**20:.0f} MiB: {100 * mem['growth']:+.1f}% "
                     f"(tolerance {100 * mem['tolerance']:.0f}%)")
    lines.append(f"client CPU: {result['client_cpu_s']:.0f} s;  {'PASSED' if result['passed'] else 'FAILED'}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--hold-seconds", type=float, default=600)
    parser.add_argument("--step-seconds", type=float, default=40)
    parser.add_argument("--min-step-requests", type=int, default=40, help="requests a ramp step sends at least")
    parser.add_argument("--ramp-factor", type=float, default=1.25)
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--slo-factor", type=float, default=2.0)
    parser.add_argument("--image-share", type=float, default=0.5)
    parser.add_argument("--chat-tokens", type=int, default=32)
    parser.add_argument("--unloaded", type=int, default=20, help="requests per endpoint, one at a time")
    parser.add_argument("--memory-tolerance", type=float, default=0.10)
    parser.add_argument("--rate", type=float, help="skip the ramp and hold at this rate")
    parser.add_argument("--api-key", help="Bearer key, when the server has LOOPSTACK_API_KEYS")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/load"))
    args = parser.parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    result = asyncio.run(run(args.url, args.hold_seconds, args.step_seconds, args.ramp_factor, args.max_steps,
                             args.slo_factor, args.image_share, args.chat_tokens, args.unloaded,
                             args.memory_tolerance, args.seed, headers, args.rate, args.min_step_requests))
    table = report(result)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load.json").write_text(json.dumps(result, indent=2, default=lambda o: asdict(o)))
    (args.out / "load.md").write_text(table + "\n")
    raise SystemExit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
