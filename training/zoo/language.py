"""zoo-lm: the embedded chat base, a small Llama pretrained on the generated world's prose.

It learns the world's facts and language (training/data/world.py: `general_text`) but never sees
the domains' task formats, so each domain's stacks have something to add. A byte-level BPE from
the `tokenizers` library keeps every digit a token of its own (arithmetic reads digit by digit).
Every projection size is a multiple of 32, as bitsandbytes' 4-bit CPU kernel needs; the server
and the stack trainer load it in NF4.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from training.data.world import DOMAINS, examples, general_corpus
from server.artifacts import atomic_folder
from training.zoo.placeholders import build_chat_tokenizer


@dataclass(frozen=True)
class LMRecipe:
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    intermediate: int = 768
    vocab: int = 768  # BPE merges fill it up to this size (a multiple of 32)
    context: int = 64  # tokens per training sequence (2-3 sentences of the world's prose)
    steps: int = 1200
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 100
    documents: int = 60_000
    seed: int = 0


MICRO_LM = LMRecipe(hidden=64, layers=2, heads=2, intermediate=128, vocab=384, context=48, steps=30,
                    batch_size=8, warmup=5, documents=2_000)


def tokenizer_corpus(recipe: LMRecipe) -> list[str]:
    """The tokenizer sees prose and task text, so that task words are not shredded into bytes."""
    tasks = [e.prompt + " " + e.answer for d in DOMAINS for e in examples(d, "train", 300, recipe.seed)]
    return general_corpus(min(recipe.documents, 20_000), recipe.seed) + tasks


def packed_batches(token_ids: list[list[int]], recipe: LMRecipe, eos: int, generator: torch.Generator):
    """An endless stream of [batch, context] windows from the concatenated documents."""
    stream = torch.tensor([t for doc in token_ids for t in doc + [eos]], dtype=torch.long)
    windows = (len(stream) - 1) // recipe.context
    stream = stream[: windows * recipe.context + 1]
    while True:
        starts = torch.randint(0, windows, (recipe.batch_size,), generator=generator) * recipe.context
        yield torch.stack([stream[s : s + recipe.context] for s in starts])


def pretrain(folder: Path, recipe: LMRecipe, runs_dir: Path | None = None) -> dict:
    """Tokenizer + Llama, trained from scratch; written with save_pretrained into `folder`."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    started = time.perf_counter()
    vocab = build_chat_tokenizer(folder, tokenizer_corpus(recipe), vocab_size=recipe.vocab)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(recipe.seed)
    config = LlamaConfig(
        vocab_size=(vocab + 31) // 32 * 32, hidden_size=recipe.hidden, intermediate_size=recipe.intermediate,
        num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads, num_key_value_heads=recipe.heads,
        max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    corpus = general_corpus(recipe.documents, recipe.seed)
    token_ids = tokenizer(corpus, add_special_tokens=False).input_ids
    batches = packed_batches(token_ids, recipe, tokenizer.eos_token_id, torch.Generator().manual_seed(recipe.seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < recipe.warmup:
            return (step + 1) / recipe.warmup
        progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    model.train()
    history, copying = [], 0.0
    bar = tqdm(range(recipe.steps), desc="zoo-lm pretrain", unit="step")
    for step in bar:
        batch = next(batches)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % 20 == 0 or step == recipe.steps - 1:
            history.append({"step": step, "loss": loss.item()})
            if step % 200 == 0 or step == recipe.steps - 1:  # copying appears late and suddenly: watch it
                model.eval()
                copying = history[-1]["copy_accuracy"] = copy_accuracy(model, tokenizer)
                model.train()
            bar.set_postfix(loss=f"{loss.item():.3f}", copy=f"{copying:.2f}")
    model.eval()
    model.save_pretrained(folder, safe_serialization=True)
    params = sum(p.numel() for p in model.parameters())
    summary = {"recipe": asdict(recipe), "parameters": params, "vocab": config.vocab_size,
               "final_loss": history[-1]["loss"], "seconds": time.perf_counter() - started,
               "copy_accuracy": copying}
    if runs_dir is not None:
        write_lm_history(runs_dir, history, summary)
    return summary


@torch.no_grad()
def copy_accuracy(model, tokenizer, trials: int = 64, length: int = 6, seed: int = 0) -> float:
    """In-context copying, the skill every domain's answer leans on (repeating an operand, a name, a
    word of the prompt): greedy next-token accuracy on the second half of a random word list shown
    twice, "w1 ... w6 . w1 ... w6", words, names and numbers mixed as the prose never mixes them."""
    import random

    from training.data.world import NAMES, WORDS

    rng = random.Random(f"{seed}/copy")
    pool = WORDS + NAMES + [str(n) for n in range(10, 100)]
    hits = total = 0
    for _ in range(trials):
        words = rng.sample(pool, length)
        first = tokenizer(" ".join(words) + " .", add_special_tokens=False).input_ids
        second = tokenizer(" " + " ".join(words), add_special_tokens=False).input_ids
        ids = torch.tensor([[tokenizer.bos_token_id] + first + second])
        predicted = model(input_ids=ids).logits[0, :-1].argmax(-1)
        start = 1 + len(first)  # predictions for positions of the second copy, after its first token
        hits += (predicted[start:] == ids[0, start + 1:]).sum().item()
        total += ids.shape[1] - start - 1
    return hits / total


def write_lm_history(runs_dir: Path, history: list[dict], summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs_dir.mkdir(parents=True, exist_ok=True)
    (runs_dir / "pretrain.json").write_text(json.dumps({**summary, "history": history}, indent=1))
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history])
    ax.set(xlabel="step", ylabel="next-token loss", title=f"zoo-lm pretraining ({summary['parameters'] / 1e6:.1f}M)")
    copying = [(h["step"], h["copy_accuracy"]) for h in history if "copy_accuracy" in h]
    if copying:
        twin = ax.twinx()
        twin.plot(*zip(*copying), "o--", color="tab:orange")
        twin.set(ylabel="copy accuracy", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(runs_dir / "pretrain.png", dpi=110)
    plt.close(fig)


def build_zoo_lm(target: Path, recipe: LMRecipe, runs_dir: Path | None = None) -> dict:
    with atomic_folder(target) as tmp:
        summary = pretrain(tmp, recipe, runs_dir)
    return summary


def sample_text(folder: Path, prompt: str, tokens: int = 30) -> str:
    """Greedy continuation: a quick look at what the base learned."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

