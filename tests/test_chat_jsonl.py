"""A user's domain as OpenAI's chat fine-tuning JSONL: every malformed line reported by number before
anything trains, duplicates dropped, the loss on the trained assistant turns only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.data.chat_jsonl import (IGNORE, DataError, check_lengths, encode_conversation, held_out,
                                      read_conversations, split_validation)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from training.zoo.language import build_chat_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    build_chat_tokenizer(folder, ["Hello! How can I help you today? The cat sat on the warm mat."] * 20)
    return AutoTokenizer.from_pretrained(folder)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def chat(*turns: str, **assistant_options) -> dict:
    roles = ["user", "assistant"] * len(turns)
    messages = [{"role": role, "content": text} for role, text in zip(roles, turns)]
    messages[-1].update(assistant_options)
    return {"messages": messages}


def test_every_malformed_line_is_reported_by_number_and_nothing_is_read(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        chat("Hi", "Hello"),
        '{"messages": [',
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "x"}]},
        chat("Hi", "Hello", "And?"),
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tools": [{"x": 1}]},
        {"prompt": "completion format", "completion": "is not chat"},
        chat("Hi", "   "),
    ])
    with pytest.raises(DataError) as error:
        read_conversations(path)
    lines = dict(error.value.problems)
    assert sorted(lines) == [2, 3, 4, 5, 6, 7, 8]  # line 1 is fine
    assert "bad JSON" in lines[2] and "no assistant turn" in lines[3] and "role must be" in lines[4]
    assert "last message" in lines[5] and "tools" in lines[6] and "messages" in lines[7] and "content" in lines[8]
    assert "line 2: bad JSON" in str(error.value) and "nothing was trained" in str(error.value)


def test_duplicates_are_dropped_and_validation_loses_what_training_has(tmp_path):
    train, dropped = read_conversations(write_jsonl(tmp_path / "t.jsonl", [
        chat("What is 2+2?", "4"), chat("What  is 2+2?", "4 "), chat("Name a colour.", "Blue")]))
    assert [c.line for c in train] == [1, 3] and dropped == [(2, "duplicate of line 1 (dropped)")]
    validation, _ = read_conversations(write_jsonl(tmp_path / "v.jsonl", [chat("Name a colour.", "Blue"),
                                                                          chat("Name a fruit.", "Pear")]))
    kept, overlap = held_out(validation, train)
    assert [c.answer for c in kept] == ["Pear"] and overlap[0][0] == 1


def test_the_loss_covers_the_trained_assistant_turns_and_nothing_else(tmp_path, tokenizer):
    (conversation, skipped), _ = read_conversations(write_jsonl(tmp_path / "c.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                      {"role": "assistant", "content": "Hello! How can I help?"}]},
        {"messages": [{"role": "user", "content": "A cat?"}, {"role": "assistant", "content": "The cat", "weight": 0},
                      {"role": "user", "content": "Sat?"}, {"role": "assistant", "content": "On the mat."}]}]))
    ids, labels = encode_conversation(tokenizer, conversation)
    whole = tokenizer.apply_chat_template(conversation.chat(), tokenize=True, return_dict=True)["input_ids"]
    assert ids[:-1] == whole[:len(ids) - 1] and ids[-1] == tokenizer.eos_token_id  # the template, ending in an end of sequence
    trained = tokenizer.decode([t for t in labels if t != IGNORE])
    assert trained.startswith("Hello! How can I help?") and "Be brief" not in trained
    ids, labels = encode_conversation(tokenizer, skipped)
    trained = tokenizer.decode([t for t in labels if t != IGNORE])
    assert "On the mat." in trained and "The cat" not in trained  # a weight-0 turn is context only
    assert all(label in (IGNORE, token) for token, label in zip(ids, labels))


def test_too_long_conversations_and_small_files_are_refused_with_their_lines(tmp_path, tokenizer):
    conversations, _ = read_conversations(write_jsonl(tmp_path / "l.jsonl", [
        chat("Hi", "Hello"), chat("Tell me everything.", "The cat sat on the warm mat. " * 40)]))
    with pytest.raises(DataError, match=r"line 2: \d+ tokens, more than the base's context of 64"):
        check_lengths(tokenizer, conversations, 64, tmp_path / "l.jsonl")
    with pytest.raises(DataError, match="at least 8"):
        split_validation(conversations)
    many = [chat(f"Question {i}?", f"Answer {i}.") for i in range(40)]
    conversations, _ = read_conversations(write_jsonl(tmp_path / "m.jsonl", many))
    train, validation = split_validation(conversations)
    assert len(validation) == 4 and len(train) == 36 and not {c.key() for c in train} & {c.key() for c in validation}


def test_the_catalogue_example_is_200_training_conversations_apart_from_val_and_test_by_phrasing(tmp_path):
    from training.data.catalogue import write_catalogue

    assert write_catalogue(tmp_path) == {"train": 200, "val": 80, "test": 120}
    splits = {s: read_conversations(tmp_path / f"{s}.jsonl") for s in ("train", "val", "test")}
    assert all(not dropped for _, dropped in splits.values())  # no duplicate within a split
    questions = {s: {c.messages[0][1] for c in convs} for s, (convs, _) in splits.items()}
    assert not questions["train"] & questions["val"] and not questions["train"] & questions["test"]
    assert not questions["val"] & questions["test"]
