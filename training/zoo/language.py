"""zoo-lm: the embedded chat base, a small Llama pretrained on the generated world's prose.

It learns the world's facts and language (training/data/world.py: `general_text`) but never sees
the domains' task formats, so each domain's stacks have something to add. A byte-level BPE from
the `tokenizers` library keeps every digit a token of its own (arithmetic reads digit by digit).
Every projection size is a multiple of 32, as bitsandbytes' 4-bit CPU kernel needs; the server
and the stack trainer load it in NF4. `build_llama` writes an untrained one in seconds (the
placeholder until zoo-lm is trained, and the tests' tiny chat base).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from server.artifacts import atomic_folder
from training.data.world import DOMAINS, examples, general_corpus
from training.schedule import warmup_cosine

ZOO_LM = "zoo-lm"  # the name of this base in a manifest
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_chat_tokenizer(folder: Path, corpus: list[str], vocab_size: int = 512) -> int:
    """Byte-level BPE that keeps digits as single tokens; returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=specials[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return tok.get_vocab_size()


def build_llama(folder: Path, hidden: int = 64, layers: int = 2, heads: int = 2, seed: int = 0) -> None:
    """A small Llama-architecture LM; every projection a multiple of 32 (bitsandbytes' CPU kernel)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    corpus = [
        "The patient took two tablets. Add 3 and 4 to get 7. def add(a, b): return a + b",
        "Hello! How can I help you today? All cats are animals, so this cat is an animal.",
    ] * 20
    vocab = build_chat_tokenizer(folder, corpus)
    vocab = (vocab + 31) // 32 * 32
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(folder)


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

    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(1.0, step, recipe.warmup, recipe.steps))
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
