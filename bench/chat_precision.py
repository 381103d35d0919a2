"""The chat base in NF4 against the float model it came from: does 4-bit change what it says?

Both are loaded by the server's own code (`load_chat_base`) from the same built folder; the float
model is the baseline, measured in the same run. On a fixed text (written for this benchmark, never
trained on): perplexity, and how often NF4's next-token argmax equals the float model's
(teacher-forced, so one early difference does not decide the rest). On fixed prompts: greedy
answers token by token against the float model's, and decode speed at batch 1.

    python -m bench.chat_precision --artifacts artifacts [--device cuda] [--out runs/bench/chat_precision]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from server.chat.decoding import ChatJob, generate
from server.chat.model import ChatModel, load_chat_base
from server.manifest import BuiltManifest
from server.settings import Settings
from training.metrics import bootstrap_interval

TEXT = """\
The harbour town woke slowly on winter mornings. Before the first ferry, the baker opened the side
door of his shop and set two trays of bread on the wall to cool, and the gulls, who knew the hour as
well as he did, gathered on the railings across the street. The ferry itself was an old boat with a
green hull and a wheelhouse that had been painted white so many times that the corners had gone soft
and round. It carried cars, bicycles, a few sheep in spring, and the post.

Most of the people who took the early crossing worked on the other side of the bay, at the boatyard
or in the offices of the water company, and they stood in the same places every day. A retired
teacher sat inside with a crossword; two brothers who repaired engines argued about football at the
stern; a nurse with a red scarf leaned on the bow rail and watched the lighthouse turn grey, then
white, as the sun came up behind the hills.

In the summer the town changed. Visitors arrived with maps and walking poles, the cafe put tables on
the pavement, and the ferry ran every hour until nine in the evening. The museum on the quay, which
in winter opened only on Saturdays, hired three students to explain the history of the fishing fleet:
how the boats had once followed the herring along the coast, how the fleet had shrunk from forty
boats to six, and how the old net lofts had become studios and small flats.

Water is made of hydrogen and oxygen. A kilometre is a thousand metres, and an hour has sixty minutes.
If a train leaves at ten past eight and the journey takes fifty minutes, it arrives at eight o'clock
plus one hour, that is, at nine o'clock. Three apples and four apples make seven apples. To boil an
egg, put it in boiling water for about seven minutes, then cool it under the tap so that it peels
easily. A good letter says what it wants in the first sentence and thanks the reader in the last.

def average(numbers):
    if not numbers:
        return 0.0
    return sum(numbers) / len(numbers)

The function above returns the mean of a list, and zero for an empty one. Written as a loop it would
keep a running total and a count, and divide once at the end.
"""

PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Write a haiku about the sea.",
    "Explain what a prime number is in one sentence.",
    "What is 12 + 30?",
    "Translate 'good morning' into Spanish.",
    "Name two planets in our solar system.",
    "How do I make a cup of tea?",
    "Write a Python function that reverses a string.",
    "Why is the sky blue?",
    "Suggest a name for a black cat.",
    "What should I pack for a weekend hike?",
    "Summarise the plot of Cinderella in two sentences.",
    "What is the boiling point of water in Celsius?",
    "Write a short, polite email declining a meeting.",
    "List the days of the week.",
]


def load(manifests: BuiltManifest, quantization: str, device: str) -> ChatModel:
    spec = manifests.read().chat.base.model_copy(update={"quantization": quantization})
    return load_chat_base(spec, manifests.resolver(), device)


@torch.no_grad()
def text_logits(chat: ChatModel, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-likelihood of TEXT, and the argmax prediction at every position."""
    ids = chat.tokenizer(TEXT, return_tensors="pt").input_ids[0]
    nll, argmax = [], []
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window + 1].to(chat.device)
        logits = chat.model(chunk[None, :-1]).logits[0].float()
        nll.append(torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="none").cpu())
        argmax.append(logits.argmax(-1).cpu())
    return torch.cat(nll), torch.cat(argmax)


def answers(chat: ChatModel, tokens: int) -> list[dict]:
    out = []
    for prompt in tqdm(PROMPTS, desc=f"greedy {chat.spec.quantization}", unit="prompt"):
        result = generate(chat, ChatJob([{"role": "user", "content": prompt}], tokens, 0.0, 1.0, 0))
        ids = chat.tokenizer(result.text, add_special_tokens=False).input_ids
        times = result.token_times
        decode = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 2 else float("nan")
        out.append({"prompt": prompt, "text": result.text, "ids": ids, "decode_tokens_per_s": decode,
                    "ttft_s": times[0] - result.started if times else float("nan")})
    return out


def agreement(reference: list[dict], other: list[dict]) -> dict:
    """Greedy answers compared token by token: identical answers, and the shared prefix."""
    same, prefix, total = 0, [], []
    for a, b in zip(reference, other):
        same += a["ids"] == b["ids"]
        n = next((i for i, (x, y) in enumerate(zip(a["ids"], b["ids"])) if x != y), min(len(a["ids"]), len(b["ids"])))
        prefix.append(n)
        total.append(len(a["ids"]))
    return {"identical_answers": same, "answers": len(reference),
            "shared_prefix_fraction": sum(prefix) / max(sum(total), 1)}


def measure(manifests: BuiltManifest, device: str, tokens: int, window: int) -> dict:
    runs = {}
    for quantization in ("none", "nf4"):
        began = time.perf_counter()
        chat = load(manifests, quantization, device)
        load_seconds = time.perf_counter() - began
        nll, argmax = text_logits(chat, window)
        greedy = answers(chat, tokens)
        weights = sum(p.numel() * p.element_size() for p in chat.model.parameters())
        weights += sum(b.numel() * b.element_size() for b in chat.model.buffers())
        runs[quantization] = {"nll": nll, "argmax": argmax, "greedy": greedy, "load_seconds": load_seconds,
                              "weight_bytes": weights, "dtype": str(next(chat.model.parameters()).dtype)}
        del chat
    base, nf4 = runs["none"], runs["nf4"]
    rows = {}
    for name, run in runs.items():
        nll = run["nll"].numpy()
        top1 = (run["argmax"] == base["argmax"]).numpy().astype(float)
        rows[name] = {
            "perplexity": math.exp(nll.mean()),
            "perplexity_interval": [math.exp(v) for v in bootstrap_interval(np.mean, nll)],
            "top1_agreement": float(top1.mean()),
            "top1_agreement_interval": list(bootstrap_interval(np.mean, top1)),
            "greedy": agreement(base["greedy"], run["greedy"]),
            "decode_tokens_per_s": statistics.median(g["decode_tokens_per_s"] for g in run["greedy"]),
            "ttft_s": statistics.median(g["ttft_s"] for g in run["greedy"]),
            "load_seconds": run["load_seconds"],
            "weight_megabytes": run["weight_bytes"] / 2**20,
        }
    return {"text_tokens": int(len(base["nll"])), "prompts": len(PROMPTS), "max_new_tokens": tokens,
            "rows": rows, "answers": {q: [{k: g[k] for k in ("prompt", "text")} for g in r["greedy"]]
                                      for q, r in runs.items()}, "nf4_vs_float_speed":
            rows["nf4"]["decode_tokens_per_s"] / rows["none"]["decode_tokens_per_s"]}


def table(report: dict) -> str:
    lines = [f"{'precision':<10} {'ppl':>7} {'ppl 95%':>15} {'top-1 agree':>12} {'95%':>13} "
             f"{'same answers':>13} {'shared prefix':>14} {'tok/s':>7} {'ratio':>6} {'MiB':>6}"]
    base_speed = report["rows"]["none"]["decode_tokens_per_s"]
    for name, r in report["rows"].items():
        label = "float" if name == "none" else name
        g = r["greedy"]
        lo, hi = r["perplexity_interval"]
        alo, ahi = r["top1_agreement_interval"]
        same = f"{g['identical_answers']}/{g['answers']}"
        lines.append(f"{label:<10} {r['perplexity']:>7.2f} {f'[{lo:.2f}, {hi:.2f}]':>15} {r['top1_agreement']:>12.3f} "
                     f"{f'[{alo:.3f}, {ahi:.3f}]':>13} {same:>13} "
                     f"{g['shared_prefix_fraction']:>14.3f} {r['decode_tokens_per_s']:>7.1f} "
                     f"{r['decode_tokens_per_s'] / base_speed:>6.2f} {r['weight_megabytes']:>6.0f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, default=None, help="artifact root (default: the server's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--window", type=int, default=256, help="tokens per perplexity window")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/chat_precision"))
    args = parser.parse_args()
    settings = Settings(device=args.device, **({"artifact_root": args.artifacts} if args.artifacts else {}))
    manifests = settings.manifests()
    report = measure(manifests, args.device, args.max_new_tokens, args.window)
    report.update(model=manifests.read().chat.base.name, device=args.device,
                  machine=f"{torch.get_num_threads()} torch threads, "
                          f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.device}.json").write_text(json.dumps(report, indent=1))
    print(f"{report['model']} on {report['machine']}: {report['text_tokens']} text tokens, "
          f"{report['prompts']} prompts x {report['max_new_tokens']} greedy tokens; baseline: float")
    print(table(report))
    print(f"wrote {args.out / f'{args.device}.json'}")


if __name__ == "__main__":
    main()
