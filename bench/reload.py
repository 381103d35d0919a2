"""Reload one domain's stacks while clients chat: no request may fail, and every answer must be
exactly what one complete generation gives.

Two versions of the domain's stacks alternate: the built ones, and the same files with every
expert's B halved (a different, equally valid artifact). The reference answer of every prompt
under each version is computed first, offline, with `load_chat`; during the run each answer is
checked against the version its generation carried. Baseline in the same run: the same clients
without reloads. Prints a table and writes JSON.

    python -m bench.reload --artifacts artifacts --domain math --clients 8 --reloads 10
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
from server.artifacts import load_with_config, save_with_config, write_atomically
from server.chat.decoding import ChatJob, generate
from server.chat.model import load_chat
from server.manifest import BuiltManifest
from server.settings import Settings

TOKEN = "bench"


def halved_copy(manifests: BuiltManifest, domain: str) -> list:
    """The domain's stack artifacts written again with every B halved; their manifest entries."""
    section = manifests.read().chat
    artifacts = next(d for d in section.domains if d.name == domain).stacks
    halved = []
    for artifact in artifacts:
        tensors, meta = load_with_config(manifests.file(artifact.path), "moe_lora", "MoE-LoRA stack")
        tensors = {k: v * 0.5 if k.endswith("lora_B") else v for k, v in tensors.items()}
        relative = artifact.path.replace(".safetensors", "-halved.safetensors")
        sha = write_atomically(manifests.file(relative), lambda tmp: save_with_config(tmp, tensors, "moe_lora", meta))
        halved.append(artifact.model_copy(update={"path": relative, "sha256": sha}))
    return halved


def with_stacks(manifest, domain: str, stacks: list):
    domains = [d.model_copy(update={"stacks": stacks}) if d.name == domain else d for d in manifest.chat.domains]
    return manifest.model_copy(update={"chat": manifest.chat.model_copy(update={"domains": domains})})


def references(manifests: BuiltManifest, versions: dict, domain: str, prompts: list[str], tokens: int) -> dict:
    out = {}
    for name, stacks in versions.items():
        chat = load_chat(with_stacks(manifests.read(), domain, stacks).chat, manifests.resolver(), "cpu")
        for prompt in prompts:
            job = ChatJob([{"role": "user", "content": prompt}], tokens, 0.0, 1.0, 0)
            out[name, prompt] = generate(chat, job, {domain: 1.0}).text
    return out


def run(client: TestClient, prompts: list[str], domain: str, tokens: int, seconds: float, reload=None) -> dict:
    answers, stop = [], threading.Event()

    def chat(prompt: str) -> None:
        while not stop.is_set():
            began = time.perf_counter()
            r = client.post("/chat", json={"prompt": prompt, "max_tokens": tokens, "route": {domain: 1.0}})
            answers.append((prompt, r.status_code, r.json(), time.perf_counter() - began))

    threads = [threading.Thread(target=chat, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    reloads = reload(stop) if reload else time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(timeout=300)
    return {"answers": answers, "reloads": reloads or []}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument("--domain", default="math")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--reloads", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/reload.json"))
    args = parser.parse_args()
    settings = Settings(artifact_root=args.artifacts, admin_token=TOKEN, watch=False, device="cpu", _env_file=None)
    manifests = settings.manifests()
    original = manifests.read()
    prompts = [f"Compute {11 * i + 3} + {7 * i + 20}." for i in range(args.clients)]
    versions = {"built": next(d for d in original.chat.domains if d.name == args.domain).stacks,
                "halved": halved_copy(manifests, args.domain)}
    expected = references(manifests, versions, args.domain, prompts, args.tokens)
    assert any(expected["built", p] != expected["halved", p] for p in prompts), "versions answer alike"

    served_by: dict[int, str] = {}
    with TestClient(create_app(settings, load_in_background=False)) as client:
        registry = client.app.state.services.registry
        served_by[registry.current.generation] = "built"
        baseline = run(client, prompts, args.domain, args.tokens, seconds=20)

        def reload_loop(stop: threading.Event) -> list:
            done = []
            for i in range(args.reloads):
                name = "halved" if i % 2 == 0 else "built"
                manifests.write(with_stacks(manifests.read(), args.domain, versions[name]))
                began = time.perf_counter()
                report = client.post("/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}).json()
                done.append({"version": name, "seconds": time.perf_counter() - began, "loaded": report["loaded"],
                             "refused": report["refused"], "generation": report["generation"]})
                if report["loaded"]:
                    served_by[report["generation"]] = name
                time.sleep(1.0)
            return done

        reloading = run(client, prompts, args.domain, args.tokens, 0, reload_loop)
    manifests.write(original)
    report = summarize(baseline, reloading, served_by, expected, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print_table(report)
    print(f"wrote {args.out}")


def summarize(baseline: dict, reloading: dict, served_by: dict, expected: dict, args) -> dict:
    def rows(answers):
        latencies = sorted(a[3] for a in answers)
        return {"requests": len(answers), "failed": sum(a[1] != 200 for a in answers),
                "p50_s": statistics.median(latencies) if latencies else None,
                "p95_s": latencies[int(0.95 * (len(latencies) - 1))] if latencies else None}

    mismatched = 0
    for prompt, status, body, _ in reloading["answers"]:
        if status == 200:
            generation = body["trace"]["generation"]
            version = served_by[max(g for g in served_by if g <= generation)]
            mismatched += body["text"] != expected[version, prompt]
    return {"machine": f"{torch.get_num_threads()} torch threads, CPU", "clients": args.clients,
            "tokens": args.tokens, "domain": args.domain, "without_reloads": rows(baseline["answers"]),
            "with_reloads": rows(reloading["answers"]) | {"not_one_generation": mismatched,
                                                            "generations_seen": len({a[2]["trace"]["generation"]
                                                                                     for a in reloading["answers"]
                                                                                     if a[1] == 200})},
            "reloads": reloading["reloads"]}


def print_table(report: dict) -> None:
    print(f"{report['clients']} clients chatting ({report['tokens']} tokens, route {{{report['domain']}: 1}}), "
          f"{report['machine']}")
    print(f"{'':<16}{'requests':>9}{'failed':>8}{'p50 s':>8}{'p95 s':>8}{'wrong gen.':>11}")
    for name in ("without_reloads", "with_reloads"):
        r = report[name]
        print(f"{name.replace('_', ' '):<16}{r['requests']:>9}{r['failed']:>8}{r['p50_s']:>8.2f}{r['p95_s']:>8.2f}"
              f"{r.get('not_one_generation', 0):>11}")
    seconds = [r["seconds"] for r in report["reloads"]]
    print(f"{len(seconds)} reloads of {report['domain']}'s stacks: {statistics.mean(seconds):.2f} s each on average, "
          f"{sum(bool(r['refused']) for r in report['reloads'])} refused")


if __name__ == "__main__":
    main()
