"""A long prompt in flight against short requests: does it hold them back, and does its memory go?

The server (in process, the artifacts' chat model) gets a long prompt: 4 messages of 2,000
characters of "7 7 7 ..." (8,047 tokens on SmolLM2), route "auto", so the meta-router reads it
before it is prefilled. While it is read and prefilled, short streamed requests ("hi", 16 tokens)
are sent one after another. Baseline in the same run: the same short request with nothing else in
flight. Reported: the short requests' time to first token and their median gap between tokens (alone
and with the long prompt in flight: median, worst, count), the long request's own time, and the
server process's resident memory before it, at its peak and a second after it finished (the long
prompt's KV cache is freed when it ends; what stays is what the allocator keeps). A table and JSON.

    python -m bench.long_prompt --artifacts ROOT [--prefill-tokens 128] [--out runs/bench/long_prompt]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import torch
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings

LONG_MESSAGES = [{"role": "user" if i % 2 == 0 else "assistant", "content": ("7 " * 1000)[:2000]} for i in range(3)] + [
    {"role": "user", "content": ("7 " * 1000)[:2000]}]
SHORT = {"prompt": "hi", "max_tokens": 16, "stream": True, "route": "none"}


def resident_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def short_request(client: TestClient) -> dict:
    """One short streamed request: time to first token and the median gap between tokens (client side)."""
    sent, times = time.perf_counter(), []
    with client.stream("POST", "/chat", json=SHORT) as response:
        for line in response.iter_lines():
            if line.startswith("event: token"):
                times.append(time.perf_counter())
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {"ttft_s": times[0] - sent if times else float("nan"),
            "gap_s": statistics.median(gaps) if gaps else float("nan")}


def summary(runs: list[dict]) -> dict:
    ttfts = [r["ttft_s"] for r in runs]
    return {"n": len(runs), "ttft_median_s": statistics.median(ttfts), "ttft_worst_s": max(ttfts),
            "gap_median_s": statistics.median(r["gap_s"] for r in runs)}


def measure(client: TestClient, alone_runs: int) -> dict:
    short_request(client)  # warm-up
    alone = [short_request(client) for _ in range(alone_runs)]
    before, peak = resident_mb(), [resident_mb()]
    long_result: dict = {}

    def long_request() -> None:
        started = time.perf_counter()
        answer = client.post("/chat", json={"messages": LONG_MESSAGES, "max_tokens": 4})
        long_result.update(status=answer.status_code, seconds=time.perf_counter() - started,
                           prompt_tokens=answer.json().get("usage", {}).get("prompt_tokens"))

    def sample_memory() -> None:
        while not long_result:
            peak.append(resident_mb())
            time.sleep(0.2)

    threads = [threading.Thread(target=long_request), threading.Thread(target=sample_memory)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # the long prompt is being read
    during = []
    while not long_result:
        during.append(short_request(client))
    for thread in threads:
        thread.join()
    time.sleep(1.0)
    return {"alone": summary(alone), "during": summary(during[:-1] or during), "long": long_result,
            "memory_mb": {"before": before, "peak": max(peak), "after": resident_mb()}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--prefill-tokens", type=int, default=None, help="the engine's part size (default: the server's)")
    parser.add_argument("--alone", type=int, default=5, help="short requests with nothing else in flight")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/long_prompt"))
    args = parser.parse_args(argv)
    overrides = {"chat_prefill_tokens": args.prefill_tokens} if args.prefill_tokens else {}
    settings = Settings(artifact_root=args.artifacts, watch=False, device="cpu", max_prompt_tokens=8192,
                        max_body_bytes=64 * 1024, _env_file=None, **overrides)
    with TestClient(create_app(settings, load_in_background=False)) as client:
        result = measure(client, args.alone)
    result.update(prefill_tokens=getattr(settings, "chat_prefill_tokens", None), torch_threads=torch.get_num_threads())
    alone, during, memory = result["alone"], result["during"], result["memory_mb"]
    print(f"chat engine reading {result['prefill_tokens']} prompt tokens between decode steps, "
          f"{torch.get_num_threads()} torch threads; long prompt: {result['long']}")
    print("| short requests | n | time to first token, median | worst | gap between tokens, median |")
    print("|---|---|---|---|---|")
    for name, row in (("alone (baseline)", alone), ("with the long prompt in flight", during)):
        print(f"| {name} | {row['n']} | {row['ttft_median_s']:.2f} s | {row['ttft_worst_s']:.2f} s | "
              f"{row['gap_median_s']:.3f} s |")
    print(f"worst time to first token / alone median: {during['ttft_worst_s'] / alone['ttft_median_s']:.1f}x; "
          f"resident memory {memory['before']:.0f} MB before, {memory['peak']:.0f} MB at peak, "
          f"{memory['after']:.0f} MB after")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "long_prompt.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out / 'long_prompt.json'}")
    return result


if __name__ == "__main__":
    main()
