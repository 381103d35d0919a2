"""PEFT adapters at serving time: throughput with many adapters, load latency, churn past the cap, memory.

On the served chat base (the default: SmolLM2-135M-Instruct), with r16 LoRA adapters on all seven
projections of every layer (random weights in PEFT's layout, written under the artifact root's
`bench-adapters/`, removed afterwards), through the server's own app (its registry, chat engine and
the code behind POST /v1/load_lora_adapter), in this process:
- throughput at 8 clients, every request generating exactly `--tokens` greedy tokens: the base
  engine (route "none", the baseline, measured in the same run), 8 clients sharing one adapter, and
  8 clients with 8 different adapters;
- load latency: from the load call to the first token of a request on the new adapter;
- churn: 64 adapters registered with LOOPSTACK_MAX_LOADED_ADAPTERS=8, 8 clients each asking a random
  one, while 20 load/unload cycles of other adapters run: tokens/s, failed requests, loads and
  evictions, and the process's peak resident memory against the base engine's own peak under the
  same 8 clients (measured before any adapter is loaded) plus the cap's adapters and 10%.
The built manifest is not touched: the bench's own manifest (a copy) lives in `--out`.

    python -m bench.adapters --artifacts ROOT [--tokens 32] [--out runs/bench/adapters]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from server.chat.adapter_admin import load_at_run_time, unload_at_run_time
from server.chat.decoding import ChatJob
from server.chat.moe_lora import PROJECTIONS, wrapped_layers
from server.manifest import load_manifest, write_manifest
from server.settings import Settings

PROMPTS = ["What is the capital of France?", "Give me three tips for sleeping better.",
           "Write a haiku about the sea.", "Explain what a prime number is in one sentence.",
           "Translate 'good morning' into Spanish.", "Write a Python function that reverses a string.",
           "How do I boil an egg?", "Name three rivers in Europe."]
CLIENTS = 8


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakMemory:
    """The process's peak resident memory while the block runs (sampled every 0.2 s)."""

    def __enter__(self) -> "PeakMemory":
        self.peak, self._stop = rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._watch)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def write_adapter(folder: Path, layers: dict, base_name: str, rank: int, seed: int) -> int:
    """A PEFT LoRA folder (r `rank` on every projection), as peft's save_pretrained writes one; its bytes."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, layer in layers.items():
        bound = 1 / layer.in_features ** 0.5
        tensors[f"base_model.model.{name}.lora_A.weight"] = (torch.rand(rank, layer.in_features, generator=generator)
                                                             * 2 - 1) * bound
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(layer.out_features, rank,
                                                                        generator=generator) * 1e-3
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(PROJECTIONS),
              "bias": "none", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return sum(t.numel() * t.element_size() for t in tensors.values())


class Bench:
    def __init__(self, app, tokens: int):
        self.svc = app.state.services
        self.tokens = tokens

    @property
    def chat(self):
        return self.svc.registry.current.chat

    def ask(self, route, prompt: str, tokens: int | None = None):
        chat = self.chat
        messages = [{"role": "user", "content": prompt}]
        tokens = tokens or self.tokens
        job = ChatJob(messages, tokens, 0.0, 1.0, 0, route, input_ids=chat.encode(messages), min_tokens=tokens)
        return asyncio.run(self.svc.chat.engine.submit(chat, job))

    def clients(self, routes_of, rounds: int) -> dict:
        """CLIENTS threads, each asking `rounds` requests in turn (`routes_of(client, round)`)."""
        results, failures = [], []

        def client(index: int) -> None:
            for round_ in range(rounds):
                submitted = time.perf_counter()
                try:
                    r = self.ask(routes_of(index, round_), PROMPTS[(index + round_) % len(PROMPTS)])
                    results.append((r.completion_tokens, r.token_times[0] - submitted))
                except Exception as exc:  # a failed request is what this bench counts
                    failures.append(f"{type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
        tokens = sum(t for t, _ in results)
        return {"requests": len(results), "failed": len(failures), "failures": failures[:5], "tokens": tokens,
                "wall_s": wall, "tokens_per_s": tokens / wall,
                "ttft_s": statistics.median(f for _, f in results) if results else None}

    def load(self, name: str, path: str) -> float:
        started = time.perf_counter()
        load_at_run_time(self.svc.settings, self.svc.registry, name, path)
        return time.perf_counter() - started

    def unload(self, name: str) -> None:
        unload_at_run_time(self.svc.settings, self.svc.registry, name)


def metric(app, name: str, **labels) -> float:
    return app.state.services.metrics.registry.get_sample_value(name, labels or None) or 0.0


BASE = "base engine (route none)"


def throughput(bench: Bench, runs: dict, rounds: int) -> dict:
    """Each setting warmed, then run: tokens/s and the process's peak resident memory meanwhile."""
    rows = {}
    for label, routes_of in runs.items():
        bench.clients(routes_of, 1)  # warm this setting's paths
        with PeakMemory() as memory:
            rows[label] = bench.clients(routes_of, rounds)
        rows[label]["rss_peak_bytes"] = memory.peak
        tqdm.write(f"{label}: {rows[label]['tokens_per_s']:.1f} tokens/s")
    return rows


def load_to_first_token(bench: Bench, names: list[str]) -> list[float]:
    """From each load call to the first token of a request on the new adapter."""
    seconds = []
    for name in names:
        started = time.perf_counter()
        bench.load(name, name)
        seconds.append(bench.ask({name: 1.0}, PROMPTS[0], 4).token_times[0] - started)
    return seconds


def churn(app, bench: Bench, names: list[str], spare: list[str], rounds: int) -> dict:
    """8 clients on random adapters of `names` (the cap in force) while 20 load/unload cycles of the
    `spare` ones run; resident memory sampled throughout."""
    rng, stop, cycles, cycle_failures = random.Random(0), threading.Event(), [], []

    def cycle_loads() -> None:
        while not stop.is_set() and len(cycles) < 20:
            name = spare[len(cycles) % 2]
            started = time.perf_counter()
            try:
                bench.load(name, name)
                bench.unload(name)
            except Exception as exc:  # counted: a cycle must not fail either
                cycle_failures.append(f"{type(exc).__name__}: {exc}")
                return
            cycles.append(time.perf_counter() - started)

    loads_before = metric(app, "loopstack_chat_adapter_loads_total", result="loaded")
    cycling = threading.Thread(target=cycle_loads)
    with PeakMemory() as memory:
        cycling.start()
        result = bench.clients(lambda i, r: {rng.choice(names): 1.0}, rounds)
        while len(cycles) < 20 and cycling.is_alive():
            bench.clients(lambda i, r: {rng.choice(names): 1.0}, 1)
        stop.set()
        cycling.join()
    return {**result, "cycles": len(cycles), "cycle_failures": cycle_failures,
            "cycle_s": statistics.median(cycles) if cycles else float("nan"),
            "loads": metric(app, "loopstack_chat_adapter_loads_total", result="loaded") - loads_before,
            "evictions": metric(app, "loopstack_chat_adapter_evictions_total", result="evicted"),
            "deferred": metric(app, "loopstack_chat_adapter_evictions_total", result="deferred"),
            "resident": metric(app, "loopstack_chat_adapters_resident"), "rss_peak_bytes": memory.peak}


def measure(settings: Settings, out: Path, tokens: int, registered: int, cap: int, rounds: int) -> dict:
    from fastapi.testclient import TestClient

    from server.app import create_app

    if registered < CLIENTS + 3:
        raise SystemExit(f"--registered must be at least {CLIENTS + 3} (8 for throughput, 3 for load latency)")
    work = settings.artifact_root.resolve() / "bench-adapters"
    manifest = out / "weights_manifest.yaml"
    write_manifest(load_manifest(settings.manifests().current()), manifest)
    bench_settings = settings.model_copy(update={"manifest": manifest, "adapter_root": work, "watch": False,
                                                 "max_loaded_adapters": cap, "serve_models": "chat",
                                                 "chat_max_batch": CLIENTS})
    report: dict = {"clients": CLIENTS, "tokens": tokens, "rank": 16, "registered": registered, "cap": cap}
    app = create_app(bench_settings, load_in_background=False)
    try:
        with TestClient(app):
            bench = Bench(app, tokens)
            if bench.chat is None:
                raise SystemExit("no chat model serves from this artifact root: build it first (make zoo)")
            layers = wrapped_layers(bench.chat.model)
            names = [f"bench-r16-{i:02d}" for i in range(registered + 2)]
            report["adapter_bytes"] = [write_adapter(work / n, layers, bench.chat.name, 16, i)
                                       for i, n in enumerate(tqdm(names, desc="writing adapters", unit="adapter"))][0]
            bench.ask("none", PROMPTS[0], 4)  # warm
            report["rss_idle_bytes"] = rss_bytes()
            report["throughput"] = throughput(bench, {BASE: lambda i, r: "none"}, rounds)  # before any adapter
            report["load_s"] = [bench.load(n, n) for n in tqdm(names[:CLIENTS], desc="loading 8", unit="adapter")]
            report["throughput"].update(throughput(bench, {
                "8 clients, one shared adapter": lambda i, r: {names[0]: 1.0},
                "8 clients, 8 different adapters": lambda i, r: {names[i]: 1.0}}, rounds))
            report["load_to_first_token_s"] = load_to_first_token(bench, names[CLIENTS:CLIENTS + 3])
            for name in tqdm(names[CLIENTS + 3:registered], desc="registering", unit="adapter"):
                bench.load(name, name)
            report["registered_adapters"] = len(bench.chat.adapters)
            report["churn"] = churn(app, bench, names[:registered], names[registered:], rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = report["throughput"][BASE]["tokens_per_s"]
    for row in [*report["throughput"].values(), report["churn"]]:
        row["vs_base"] = row["tokens_per_s"] / base
    # the base engine's own peak under the same 8 clients (its rows' caches and activations), before
    # any adapter was loaded, plus the cap's adapters and 10%
    report["rss_base_bytes"] = report["throughput"][BASE]["rss_peak_bytes"]
    allowed = report["rss_base_bytes"] + 1.1 * cap * report["adapter_bytes"]
    report["churn"].update(rss_allowed_bytes=allowed, rss_within_cap=report["churn"]["rss_peak_bytes"] <= allowed)
    return report


def table(report: dict) -> str:
    lines = [f"{'setting':<40}{'tokens/s':>9}{'x base':>8}{'TTFT s':>8}{'failed':>7}"]
    for label, r in [*report["throughput"].items(), (f"churn: {report['registered']} registered, cap {report['cap']}",
                                                     report["churn"])]:
        lines.append(f"{label:<40}{r['tokens_per_s']:>9.1f}{r['vs_base']:>8.2f}{r['ttft_s']:>8.2f}{r['failed']:>7}")
    c, mb = report["churn"], 1024 * 1024
    lines.append(f"load call (verify, read, warm, swap): median {statistics.median(report['load_s']):.2f} s; "
                 f"load call to first token: {', '.join(f'{s:.2f}' for s in report['load_to_first_token_s'])} s")
    lines.append(f"churn: {c['cycles']} load/unload cycles (median {c['cycle_s']:.2f} s) under {report['clients']} "
                 f"clients, {c['failed']} failed of {c['requests'] + c['failed']} ({len(c['cycle_failures'])} failed cycles); {c['loads']:.0f} loads back from "
                 f"disk, {c['evictions']:.0f} evictions ({c['deferred']:.0f} deferred); {c['resident']:.0f} resident")
    lines.append(f"memory: idle {report['rss_idle_bytes'] / mb:.0f} MiB, base engine at {report['clients']} clients "
                 f"{report['rss_base_bytes'] / mb:.0f} MiB, churn peak {c['rss_peak_bytes'] / mb:.0f} MiB, "
                 f"allowed {c['rss_allowed_bytes'] / mb:.0f} MiB (base engine + 1.1 x {report['cap']} adapters of "
                 f"{report['adapter_bytes'] / mb:.1f} MiB): {'within' if c['rss_within_cap'] else 'OVER'}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, default=None, help="artifact root (default: the server's)")
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens per request")
    parser.add_argument("--rounds", type=int, default=2, help="requests per client per setting")
    parser.add_argument("--registered", type=int, default=64)
    parser.add_argument("--cap", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/adapters"))
    args = parser.parse_args()
    settings = Settings(device="cpu", **({"artifact_root": args.artifacts} if args.artifacts else {}))
    args.out.mkdir(parents=True, exist_ok=True)
    report = measure(settings, args.out.resolve(), args.tokens, args.registered, args.cap, args.rounds)
    report["machine"] = f"{torch.get_num_threads()} torch threads, CPU"
    (args.out / "adapters.json").write_text(json.dumps(report, indent=1))
    print(f"r16 adapters on every projection, {report['clients']} clients x {args.rounds} requests x "
          f"{args.tokens} greedy tokens, on {report['machine']}; baseline: the base engine in this run")
    print(table(report))
    print(f"wrote {args.out / 'adapters.json'}")


if __name__ == "__main__":
    main()
