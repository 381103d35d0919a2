"""Residual boosting and the chat zoo build, at micro scale."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import torch

from server.chat.moe_lora import load_stack, wrapped_layers
from server.manifest import load_manifest, sha256_file
from training.brainstacks.data import IGNORE, batches, collate
from training.brainstacks.inner import BoostingConfig, boost_domain, validation_loss
from training.brainstacks.zoo import MICRO_CHAT, build_chat_zoo, load_base
from training.data.world import examples


def test_loss_counts_only_the_reply(manifest_path):
    tokenizer = load_base(manifest_path).tokenizer
    item = examples("math", "train", 1)[0]
    batch = collate(tokenizer, [item, examples("chat", "train", 1)[0]])
    reply = batch.labels[0][batch.labels[0] != IGNORE].tolist()
    assert reply[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(reply, skip_special_tokens=True).strip() == item.answer
    assert (batch.attention_mask.sum(1) > 0).all()


def test_boosting_keeps_best_checkpoints_and_stops_adding_rounds(manifest_path):
    chat = load_base(manifest_path)
    train = examples("math", "train", 16)
    val = batches(chat.tokenizer, examples("math", "val", 8), 8)
    cfg = BoostingConfig(steps_per_round=6, eval_every=2, batch_size=4, max_rounds=3, lr=1e-2, min_gain=10.0)
    start = validation_loss(chat.model, val)
    results, kept = boost_domain(chat.model, chat.tokenizer, "math", train, val, cfg)
    # round 1 always stays; round 2 cannot gain 10 nats, so it is dropped and no third round runs
    assert [r.kept for r in results] == [True, False] and len(kept) == 1
    assert results[0].start_loss == pytest.approx(start)
    assert results[0].best_loss <= start and results[0].best_loss == min(loss for _, loss in results[0].curve)
    # the model now carries exactly the kept round's best checkpoint, frozen
    assert validation_loss(chat.model, val) == pytest.approx(results[0].best_loss, rel=1e-5)
    stacks = [layer.stacks for layer in wrapped_layers(chat.model).values()]
    assert all(len(s) == 1 and not any(p.requires_grad for p in s[0].parameters()) for s in stacks)


def test_micro_chat_zoo_writes_stacks_and_manifest(tmp_path):
    manifest = tmp_path / "weights_manifest.yaml"
    from server.manifest import write_manifest
    from training.zoo.build import default_manifest

    write_manifest(default_manifest().model_copy(update={"image": []}), manifest)
    summary = build_chat_zoo(manifest, MICRO_CHAT, runs_dir=tmp_path / "runs")
    chat = load_manifest(manifest).chat
    assert not chat.base.placeholder and chat.base.source.files
    assert [d.name for d in chat.domains] == ["chat", "math"] and [d.order for d in chat.domains] == [0, 1]
    for domain in chat.domains:
        assert 1 <= len(domain.stacks) <= 2
        for stack in domain.stacks:
            assert stack.sha256 == sha256_file(tmp_path / stack.path)
    assert not list((tmp_path / "artifacts").rglob(".*.tmp"))
    reports = {r["domain"]: r for r in summary["domains"]}
    assert set(reports) == {"chat", "math"} and 0 <= reports["math"]["stacks_exact_match"] <= 1
    assert (tmp_path / "runs" / "math" / "report.json").is_file()

    base = load_base(manifest)  # the stacks load back onto the base the build recorded
    meta = load_stack(base.model, tmp_path / chat.domains[1].stacks[0].path)
    assert meta["domain"] == "math" and meta["round"] == 1

    # --if-missing rebuilds nothing; a fresh build of one domain replaces only that entry
    again = build_chat_zoo(manifest, MICRO_CHAT, if_missing=True, runs_dir=tmp_path / "runs")
    assert again["base"] is None and again["domains"] == []
