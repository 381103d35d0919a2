"""Lone-request latency of two running servers (two builds, or two settings) on the same artifacts.

One client sends the same request bodies to server A and server B in turn (A B, B A, A B, ...), one
request at a time, so both see the same machine at the same moments: this VM's speed drifts by 20%
within minutes, far more than a few-percent change between builds. Reported per mode: p50 of each,
and the median of the per-pair ratios B/A with a 95% bootstrap interval (pairs resampled), which
is what tells a change of a few percent from the drift.

    python -m bench.ab_latency --a http://127.0.0.1:8101 --b http://127.0.0.1:8102 [--pairs 100]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import httpx
from tqdm import tqdm


def paired_ratio(a: list[float], b: list[float], resamples: int = 2000, seed: int = 0) -> dict:
    """Median of b[i] / a[i] and its 95% bootstrap interval."""
    ratios = [y / x for x, y in zip(a, b)]
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return {"pairs": len(ratios), "median_ratio": statistics.median(ratios),
            "ci95": [medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]]}


def alternate(send_a, send_b, pairs: int) -> tuple[list[float], list[float]]:
    """Latencies of `pairs` calls of each, in turn (A B, then B A, ...), each with the pair's index."""
    latencies: dict[str, list[float]] = {"a": [], "b": []}
    for i in tqdm(range(pairs), desc="pairs", leave=False):
        for name in ("a", "b") if i % 2 == 0 else ("b", "a"):
            started = time.perf_counter()
            (send_a if name == "a" else send_b)(i)
            latencies[name].append(time.perf_counter() - started)
    return latencies["a"], latencies["b"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--a", required=True, help="base URL of server A (the baseline)")
    parser.add_argument("--b", required=True, help="base URL of server B")
    parser.add_argument("--model", default="digits-dit")
    parser.add_argument("--modes", nargs="+", default=["baseline", "ilf"])
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/ab_latency"))
    args = parser.parse_args()

    rows = []
    with httpx.Client(timeout=120) as client:
        for mode in args.modes:
            body = {"model": args.model, "class_label": 3, "mode": mode}

            def sender(url: str):
                return lambda i: client.post(f"{url}/generate-image", json=body | {"seed": i}).raise_for_status()

            for url in (args.a, args.b):  # warm-up: the first calls of a mode are slower
                for i in range(3):
                    sender(url)(10_000 + i)
            a, b = alternate(sender(args.a), sender(args.b), args.pairs)
            rows.append({"mode": mode, "p50_a_s": statistics.median(a), "p50_b_s": statistics.median(b)}
                        | paired_ratio(a, b))

    lines = ["| mode | pairs | A p50 s | B p50 s | B/A per pair (median) | 95% interval |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['pairs']} | {r['p50_a_s']:.3f} | {r['p50_b_s']:.3f} | {r['median_ratio']:.3f} "
              f"| {r['ci95'][0]:.3f}-{r['ci95'][1]:.3f} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ab_latency.json").write_text(json.dumps({"a": args.a, "b": args.b, "model": args.model,
                                                          "rows": rows}, indent=2))
    (args.out / "ab_latency.md").write_text(table + "\n")
    print(f"wrote {args.out / 'ab_latency.json'}")


if __name__ == "__main__":
    main()
