"""What a JSON schema costs the chat engine: tokens/s with and without one, at 1 and 8 clients.

One run, the served chat base (route "none"), the prompts of bench.chat, greedy; every request
generates the same number of tokens either way, so the ratio is the cost of the constraint per
token, not of shorter answers: text requests hold off the end of turn for `--tokens` tokens (as
bench.chat's), schema requests are held to a document whose one string field is exactly `--chars`
characters long (a length bounded by the schema, about `--tokens` tokens of it). At 8 clients all
clients are 8 closed loops over the prompts `--repeat` times (each sends its next request when its
answer is in, so the batch stays full however long each answer is), the schema's rows each with
their own matcher; "mixed" holds every other request to the schema. The
settings run in alternating rounds (text, schema, mixed; then the reverse), their rounds pooled,
so that this machine's drift stays out of the ratio.

    python -m bench.structured --artifacts ROOT [--tokens 48] [--rounds 2] [--out runs/bench/structured]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import jsonschema
import torch

from bench.chat import PROMPTS, messages
from server.chat.batching import ChatEngine
from server.chat.decoding import ChatJob
from server.chat.model import load_chat
from server.chat.structured import output_format
from server.metrics import Metrics
from server.schemas.chat import ResponseFormat
from server.settings import Settings


def schema(chars: int) -> dict:
    return {"type": "object", "properties": {"summary": {"type": "string", "minLength": chars, "maxLength": chars}},
            "required": ["summary"], "additionalProperties": False}


def jobs(chat, setting: str, tokens: int, chars: int) -> list[ChatJob]:
    held = output_format(ResponseFormat.model_validate(
        {"type": "json_schema", "json_schema": {"name": "summary", "schema": schema(chars)}}), chat)
    out = []
    for i, prompt in enumerate(PROMPTS):
        constrained = setting == "schema" or (setting == "mixed" and i % 2 == 0)
        out.append(ChatJob(messages(prompt), tokens + 16 if constrained else tokens, 0.0, 1.0, 0, "none",
                           input_ids=chat.encode(messages(prompt)), min_tokens=0 if constrained else tokens,
                           output_format=held if constrained else None))
    return out


def run(engine: ChatEngine, chat, batch: list[ChatJob], clients: int) -> tuple[int, float, list]:
    """`clients` closed loops: each sends its next request as soon as its answer is in, so the batch
    stays full although answers held to a schema differ in length."""
    async def loops():
        gate = asyncio.Semaphore(clients)

        async def one(job: ChatJob):
            async with gate:
                return await engine.submit(chat, job)
        return await asyncio.gather(*(one(job) for job in batch))

    began = time.perf_counter()
    results = asyncio.run(loops())
    return sum(r.completion_tokens for r in results), time.perf_counter() - began, results


def measure(manifests, device: str, tokens: int, chars: int, rounds: int, repeat: int = 4) -> dict:
    chat = load_chat(manifests.read().chat, manifests.resolver(), device)
    engine = ChatEngine("chat", max_batch=8, max_waiting=64, retry_after=1, metrics=Metrics())
    engine.start()
    pooled: dict = {}
    try:
        for clients in (1, 8):
            settings = ["text", "schema"] + (["mixed"] if clients > 1 else [])
            run(engine, chat, jobs(chat, "schema", 4, chars)[:2], clients)  # warm-up: the first constrained rows
            for round_ in range(rounds):
                for setting in settings if round_ % 2 == 0 else settings[::-1]:
                    batch = jobs(chat, setting, tokens, chars) * (repeat if clients > 1 else 1)
                    n, seconds, results = run(engine, chat, batch, clients)
                    entry = pooled.setdefault((clients, setting), {"tokens": 0, "seconds": 0.0, "valid": 0,
                                                                  "complete": 0, "constrained": 0})
                    entry["tokens"] += n
                    entry["seconds"] += seconds
                    for r in results:
                        if r.format_complete is not None:
                            entry["constrained"] += 1
                            entry["complete"] += r.format_complete  # else cut by max_tokens
                            entry["valid"] += valid(r.text, chars)
    finally:
        engine.shutdown()
    rows = []
    for (clients, setting), entry in pooled.items():
        text = pooled[clients, "text"]
        rate = entry["tokens"] / entry["seconds"]
        rows.append({"clients": clients, "setting": setting, "tokens_per_s": rate,
                     "vs_text": rate / (text["tokens"] / text["seconds"]), **entry})
    return {"model": chat.name, "device": device, "tokens": tokens, "chars": chars, "rounds": rounds, "repeat": repeat,
            "prompts": len(PROMPTS), "machine": f"{torch.get_num_threads()} torch threads", "rows": rows}


def valid(text: str, chars: int) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema(chars))
        return True
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False


def table(report: dict) -> str:
    lines = [f"{'clients':>7}  {'setting':<8}{'tokens':>8}{'seconds':>9}{'tokens/s':>10}{'x text':>8}"
             f"  valid / complete / held to the schema"]
    for r in report["rows"]:
        lines.append(f"{r['clients']:>7}  {r['setting']:<8}{r['tokens']:>8}{r['seconds']:>9.1f}{r['tokens_per_s']:>10.1f}"
                     f"{r['vs_text']:>8.2f}  {r['valid']} / {r['complete']} / {r['constrained']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifacts", type=Path, default=None, help="artifact root (default: the server's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=48, help="tokens per text request")
    parser.add_argument("--chars", type=int, default=160, help="characters of the schema's string field")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=4, help="passes over the prompts at 8 clients")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/structured"))
    args = parser.parse_args()
    settings = Settings(device=args.device, **({"artifact_root": args.artifacts} if args.artifacts else {}))
    report = measure(settings.manifests(), args.device, args.tokens, args.chars, args.rounds, args.repeat)
    print(f"{report['model']}, {report['prompts']} prompts, greedy, baseline: the same requests without a schema")
    print(table(report))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.device}.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out / f'{args.device}.json'}")


if __name__ == "__main__":
    main()
