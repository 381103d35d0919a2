"""Chat decoding speed: transformers' own `generate` against the chat engine, base and routed.

One run, the same prompts, greedy, on the served chat zoo (its base, stacks and router):
- baseline: the base as transformers loads it (the manifest's precision, no wrapped projections),
  `generate` one request at a time; at 8 clients, `generate` on a left-padded batch of 8 (static
  batching: every row waits for the longest);
- engine, base: the chat engine (server/chat/batching.py) with route "none";
- engine, routed with 1, 3 and 5 domains active: explicit routes, the active domains rotated from
  request to request, so 8 concurrent clients are 8 mixed routes.
At 1 client the requests run one after another; at 8 clients all are submitted at once. Tokens/s is
generated tokens over wall time (aggregate), every request generating exactly `--tokens` tokens (the
end of turn held off, as `min_new_tokens` does, so that routes with shorter answers do not look
slower for their larger share of prefill); time to first token is submission to first token
(median). Also measured: the meta-router's share of a request's time ("auto" route, 64 tokens of
prompts that ask for long answers); the stacks' multiply-adds per token against the base's: when
decoding is compute-bound, the base's share is the ceiling on routed speed relative to the base
(attention's own products are left out: small at these lengths); and what batching can give on this
machine: a base decode step of 8 rows against one of 1 row (8 x t1 / t8 is the most 8 clients can
gain over one, before prefills).

    python -m bench.chat --artifacts ROOT [--device cuda] [--tokens 32] [--out runs/bench/chat]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

from server.chat.batching import ChatEngine
from server.chat.decoding import ChatJob, DecodeBatch, Decoding, prefill
from server.chat.model import ChatModel, load_chat
from server.chat.moe_lora import wrapped_layers
from server.chat.nf4 import nf4_config
from server.chat.router import RoutePlan
from server.engine import on_own_thread  # a baseline run on a long-lived thread would slow the engine after it
from server.manifest import BuiltManifest
from server.metrics import Metrics
from server.settings import Settings

PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Write a haiku about the sea.",
    "Explain what a prime number is in one sentence.",
    "Compute 23 + 45 - 12.",
    "Translate 'good morning' into Spanish.",
    "Write a Python function that reverses a string.",
    "How much Thermadol is given to a 20 kg child?",
]
# long answers: the router's share is of a whole 64-token request (the end of turn is held off too)
LONG_PROMPTS = [
    "Write a long story about a lighthouse keeper and a storm.",
    "Explain in detail how a bicycle works, part by part.",
    "Describe a week-long trip through Italy, day by day.",
    "Write a detailed guide to starting a vegetable garden.",
]


def routes_for(domains: tuple[str, ...], active: int, count: int) -> list[dict[str, float]]:
    """`count` routes with `active` domains each at weight 1, the domains rotated per request."""
    return [{domains[(i + j) % len(domains)]: 1.0 for j in range(active)} for i in range(count)]


def messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def summary(results: list[tuple[int, float]], wall: float) -> dict:
    """(generated tokens, time to first token) per request, and the run's wall time."""
    tokens = sum(t for t, _ in results)
    return {"requests": len(results), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_s": statistics.median(f for _, f in results)}


# ---------------------------------------------------------------- transformers' own generate
class TokenClock(BaseStreamer):
    """Records when `generate` hands over each new token: time to first token."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._saw_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self._saw_prompt:  # generate() first hands over the prompt itself
            self._saw_prompt = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def load_unwrapped(manifests: BuiltManifest, device: str):
    spec = manifests.read().chat.base
    folder = manifests.resolver().source(spec.source)
    kwargs: dict = dict(use_safetensors=True, local_files_only=True)
    if spec.precision(device) == "nf4":
        kwargs.update(quantization_config=nf4_config(device), device_map={"": device})
    else:
        kwargs.update(dtype=torch.float32 if device == "cpu" else torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs).to(device).eval()


@torch.no_grad()
def baseline(model, chat: ChatModel, clients: int, tokens: int) -> dict:
    tokenizer = chat.tokenizer
    eos = list(chat.end_of_turn_ids)
    started, results = time.perf_counter(), []
    for first in range(0, len(PROMPTS), clients):
        prompts = [chat.encode(messages(p))[0] for p in PROMPTS[first:first + clients]]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):  # left padding: every row's next token is in the last column
            ids[row, width - len(p):], mask[row, width - len(p):] = p, 1
        clock, submitted = TokenClock(), time.perf_counter()
        out = model.generate(ids.to(chat.device), attention_mask=mask.to(chat.device), max_new_tokens=tokens,
                             min_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=eos, streamer=clock)
        for row in out[:, width:].tolist():
            ended = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            results.append((ended, clock.times[0] - submitted))
    return summary(results, time.perf_counter() - started)


# ---------------------------------------------------------------- the chat engine
def engine_run(engine: ChatEngine, chat: ChatModel, routes: list, clients: int, tokens: int) -> dict:
    jobs = [ChatJob(messages(p), tokens, 0.0, 1.0, 0, route, input_ids=chat.encode(messages(p)), min_tokens=tokens)
            for p, route in zip(PROMPTS, routes)]

    async def wave(batch: list[ChatJob]) -> list:
        return await asyncio.gather(*(engine.submit(chat, j) for j in batch))

    started, results = time.perf_counter(), []
    for first in range(0, len(jobs), clients):
        submitted = time.perf_counter()
        for r in asyncio.run(wave(jobs[first:first + clients])):
            results.append((r.completion_tokens, r.token_times[0] - submitted))
    return summary(results, time.perf_counter() - started)


def router_share(engine: ChatEngine, chat: ChatModel) -> dict:
    """The meta-router's share of a 64-token request's time ("auto" route), one request at a time."""
    shares, seconds, tokens = [], [], []
    for prompt in LONG_PROMPTS:
        job = ChatJob(messages(prompt), 64, 0.0, 1.0, 0, "auto", input_ids=chat.encode(messages(prompt)), min_tokens=64)
        submitted = time.perf_counter()
        result = asyncio.run(engine.submit(chat, job))
        total = time.perf_counter() - submitted
        shares.append(result.route_seconds / total)
        seconds.append(result.route_seconds)
        tokens.append(result.completion_tokens)
    return {"requests": len(shares), "router_s": statistics.median(seconds), "share": statistics.median(shares),
            "completion_tokens": tokens}


@torch.no_grad()
def decode_steps(chat: ChatModel, rows: int, steps: int = 8) -> float:
    """Seconds per base decode step of `rows` rows (the prompts' caches joined, no stacks)."""
    batch = DecodeBatch(chat, rows)
    for prompt in (PROMPTS * rows)[:rows]:
        logits, cache = prefill(chat, chat.encode(messages(prompt)), {})
        row = Decoding(chat, None, plan=RoutePlan({}, {}, "the base alone"), tokens=[int(logits.argmax())], cache=cache)
        batch.join(row)
    times = []
    for _ in range(steps + 2):
        started = time.perf_counter()
        for row, token in zip(batch.rows, batch.step().argmax(-1).tolist()):
            row.tokens.append(token)
        times.append(time.perf_counter() - started)
    return statistics.median(times[2:])  # the first steps warm up


def multiply_adds(chat: ChatModel) -> dict:
    """Per token: the base's linear layers, and each domain's stacks as the engine computes them
    (every expert's A and B, dense, and the stack's own router)."""
    base = sum(m.in_features * m.out_features for m in chat.model.modules() if isinstance(m, torch.nn.Linear))
    layers = wrapped_layers(chat.model)
    per_domain = {}
    for domain, stacks in chat.stacks.items():
        total = 0
        for name, modules in stacks.per_layer.items():
            layer = layers[name]
            for s in modules:
                n, r = s.config.experts, s.config.rank
                total += n * layer.in_features + n * r * (layer.in_features + layer.out_features)
        per_domain[domain] = total
    return {"base": base, "per_domain": per_domain}


def measure(manifests: BuiltManifest, device: str, tokens: int) -> dict:
    chat = on_own_thread(load_chat, manifests.read().chat, manifests.resolver(), device)
    domains = chat.domains
    macs = multiply_adds(chat)
    engine = ChatEngine("chat", max_batch=8, max_waiting=64, retry_after=1, metrics=Metrics())
    engine.start()
    rows = []
    try:
        unwrapped = on_own_thread(load_unwrapped, manifests, device)
        settings = [("transformers generate (baseline)", None, 0)] + [("engine, base", "none", 0)] + [
            (f"engine, {k} domain{'s' if k > 1 else ''}", "routed", k) for k in (1, 3, 5) if k <= len(domains)]
        for clients in (1, 8):
            for label, kind, active in tqdm(settings, desc=f"{clients} client(s)", unit="setting"):
                if kind is None:
                    result = on_own_thread(baseline, unwrapped, chat, clients, tokens)
                else:
                    routes = (["none"] * len(PROMPTS) if kind == "none"
                              else routes_for(domains, active, len(PROMPTS)))
                    result = engine_run(engine, chat, routes, clients, tokens)
                stack_macs = statistics.mean(sum(macs["per_domain"][d] for d in route)
                                             for route in routes_for(domains, active, len(PROMPTS))) if active else 0
                ceiling = macs["base"] / (macs["base"] + stack_macs)
                rows.append({"setting": label, "clients": clients, "active_domains": active,
                             "stack_macs_share": stack_macs / (macs["base"] + stack_macs),
                             "macs_ceiling": ceiling, **result})
                tqdm.write(f"{clients} client(s), {label}: {result['tokens_per_s']:.1f} tokens/s, "
                           f"TTFT {result['ttft_s']:.2f} s")
        router = router_share(engine, chat) if chat.router is not None else None
    finally:
        engine.shutdown()
    one, eight = on_own_thread(decode_steps, chat, 1), on_own_thread(decode_steps, chat, 8)
    batching = {"step_s_1_row": one, "step_s_8_rows": eight, "ceiling_8_clients": 8 * one / eight}
    for row in rows:
        base = next(r for r in rows if r["clients"] == row["clients"] and r["setting"].startswith("transformers"))
        one = next(r for r in rows if r["clients"] == 1 and r["setting"] == row["setting"])
        row["vs_baseline"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["vs_one_client"] = row["tokens_per_s"] / one["tokens_per_s"]
        row["of_ceiling"] = row["vs_baseline"] / row["macs_ceiling"]
    return {"model": chat.name, "domains": list(domains), "stacks": {d: s.count for d, s in chat.stacks.items()},
            "prompts": len(PROMPTS), "max_new_tokens": tokens, "multiply_adds": macs, "rows": rows,
            "router": router, "batching": batching}


def table(report: dict) -> str:
    lines = [f"{'clients':>7}  {'setting':<34}{'tokens/s':>9}{'x baseline':>11}{'x 1 client':>11}"
             f"{'TTFT s':>8}{'stack MACs':>11}{'ceiling':>8}{'of ceiling':>11}"]
    for r in report["rows"]:
        lines.append(f"{r['clients']:>7}  {r['setting']:<34}{r['tokens_per_s']:>9.1f}{r['vs_baseline']:>11.2f}"
                     f"{r['vs_one_client']:>11.2f}{r['ttft_s']:>8.2f}{r['stack_macs_share']:>11.1%}"
                     f"{r['macs_ceiling']:>8.2f}{r['of_ceiling']:>11.2f}")
    if report["router"]:
        lines.append(f"meta-router: {report['router']['router_s'] * 1000:.0f} ms, "
                     f"{report['router']['share']:.1%} of a request's time (median of "
                     f"{report['router']['requests']}, {report['router']['completion_tokens']} tokens generated)")
    b = report["batching"]
    lines.append(f"base decode step: {b['step_s_1_row'] * 1000:.0f} ms at 1 row, {b['step_s_8_rows'] * 1000:.0f} ms "
                 f"at 8 rows: 8 clients can gain at most {b['ceiling_8_clients']:.2f}x over one on this machine")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, default=None, help="artifact root (default: the server's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=32, help="max new tokens per request")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/chat"))
    args = parser.parse_args()
    settings = Settings(device=args.device, **({"artifact_root": args.artifacts} if args.artifacts else {}))
    report = measure(settings.manifests(), args.device, args.tokens)
    report.update(device=args.device, machine=f"{torch.get_num_threads()} torch threads, "
                  f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.device}.json").write_text(json.dumps(report, indent=1))
    print(f"{report['model']} on {report['machine']}: {report['prompts']} prompts x {report['max_new_tokens']} "
          f"greedy tokens; baseline: transformers' generate, measured in this run")
    print(table(report))
    print(f"wrote {args.out / f'{args.device}.json'}")


if __name__ == "__main__":
    main()
