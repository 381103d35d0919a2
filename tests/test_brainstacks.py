"""Residual boosting and the chat zoo build, at micro scale."""

from __future__ import annotations

import pytest
import torch

from server.chat.moe_lora import covered_layers
from training.brainstacks.data import IGNORE, batches, collate
from training.brainstacks.boosting import BoostingConfig, boost_domain, validation_loss
from tests.conftest import built
from training.brainstacks.continual import load_base
from training.brainstacks.stacks import training_stacks
from training.data.world import examples


def test_loss_counts_only_the_reply(manifest_path):
    tokenizer = load_base(built(manifest_path)).tokenizer
    item = examples("math", "train", 1)[0]
    batch = collate(tokenizer, [item, examples("chat", "train", 1)[0]])
    reply = batch.labels[0][batch.labels[0] != IGNORE].tolist()
    assert reply[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(reply, skip_special_tokens=True).strip() == item.answer
    assert (batch.attention_mask.sum(1) > 0).all()


def test_boosting_keeps_best_checkpoints_and_stops_adding_rounds(manifest_path):
    chat = load_base(built(manifest_path))
    train = examples("math", "train", 16)
    val = batches(chat.tokenizer, examples("math", "val", 8), 8)
    cfg = BoostingConfig(steps_per_round=6, later_round_steps=None, eval_every=2, batch_size=4, max_rounds=3, lr=1e-2, min_gain=10.0)
    start = validation_loss(chat.model, val)
    results, kept = boost_domain(chat.model, chat.tokenizer, "math", train, val, cfg)
    # round 1 always stays; round 2 cannot gain 10 nats, so it is dropped and no third round runs
    assert [r.kept for r in results] == [True, False] and len(kept) == 1
    assert results[0].start_loss == pytest.approx(start)
    assert results[0].best_loss <= start and results[0].best_loss == min(loss for _, loss in results[0].curve)
    # the model now carries exactly the kept round's best checkpoint, frozen
    assert validation_loss(chat.model, val) == pytest.approx(results[0].best_loss, rel=1e-5)
    stacks = [training_stacks(chat.model).of(layer) for layer in covered_layers(chat.model, cfg.stack).values()]
    assert stacks and all(len(s) == 1 and not any(p.requires_grad for p in s[0][1].parameters()) for s in stacks)


def test_zoo_lm_keeps_digits_single_and_projections_multiples_of_32(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    from training.zoo.language import MICRO_LM, build_zoo_lm

    summary = build_zoo_lm(tmp_path / "lm", MICRO_LM, tmp_path / "runs")
    config = AutoConfig.from_pretrained(tmp_path / "lm")
    assert config.model_type == "llama"
    assert all(size % 32 == 0 for size in (config.hidden_size, config.intermediate_size, config.vocab_size))
    assert (tmp_path / "lm" / "model.safetensors").is_file() and summary["parameters"] > 0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "lm")
    pieces = tokenizer.tokenize("12 + 305 = 317")
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("12305317")
    assert (tmp_path / "runs" / "pretrain.png").is_file()

    # the copying probe scores the second copy's tokens: a model that peeks at the next token scores
    # 1, one that always says the same token scores about nothing
    from types import SimpleNamespace

    from training.zoo.language import copy_accuracy

    vocab = config.vocab_size
    peek = lambda input_ids: SimpleNamespace(logits=torch.nn.functional.one_hot(input_ids.roll(-1, 1), vocab).float())
    constant = lambda input_ids: SimpleNamespace(logits=torch.zeros(*input_ids.shape, vocab))
    assert copy_accuracy(peek, tokenizer) == 1.0 and copy_accuracy(constant, tokenizer) < 0.1
    assert 0.0 <= summary["copy_accuracy"] <= 1.0


def test_steps_to_reach_reads_the_first_crossing():
    from training.eval.moe_lora import steps_to_reach

    curve = [(0, 3.0), (25, 2.0), (50, 1.5), (75, 1.6)]
    assert steps_to_reach(curve, 1.6) == 50 and steps_to_reach(curve, 2.0) == 25
    assert steps_to_reach(curve, 1.0) is None


def test_moe_lora_eval_compares_parameter_matched_adapters(manifest_path, tmp_path):
    from server.chat.moe_lora import MoELoRAConfig
    from training.eval.moe_lora import MoEComparison, run_moe_lora_eval

    cmp = MoEComparison(domains=("math",), steps=4, second_round_steps=2,
                        moe=MoELoRAConfig(experts=4, rank=4, alpha=4.0),
                        single=MoELoRAConfig(experts=1, rank=16, alpha=16.0, top_k=1),
                        boosting=BoostingConfig(eval_every=2, batch_size=4, patience=10**9, spike=float("inf")),
                        train_examples=16, val_examples=8, test_examples=2, max_new_tokens=4)
    report = run_moe_lora_eval(built(manifest_path), tmp_path, cmp)
    row = report["domains"][0]
    moe, single = row["moe_run"], row["single_run"]
    inputs = 2 * (6 * 64 + 128)  # summed input widths of the 14 wrapped projections (down_proj reads 128)
    router_params, single_router = 2 * 4 * inputs, 2 * 1 * inputs  # W_r and W_n per projection
    assert moe["parameters"] - router_params == single["parameters"] - single_router  # same LoRA size
    assert sum(moe["expert_shares"]) == pytest.approx(1.0, abs=1e-5) and len(moe["expert_shares"]) == 4
    assert [s for s, _ in moe["curve"]] == [0, 2, 4] and row["round2"]["start_loss"] == pytest.approx(moe["best_loss"])
    assert (tmp_path / "moe_lora.json").is_file() and (tmp_path / "moe_lora.png").is_file()
