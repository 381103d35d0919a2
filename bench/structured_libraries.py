"""Which constrained-decoding library enforces JSON schemas in the chat engine: each candidate on
the same schemas, tokenizers and documents, in one run.

For each library and tokenizer (the chat bases' own: SmolLM2's 49k-token BPE, Gemma 3's 262k
SentencePiece, a Llama's): the seconds to compile each schema, then a valid document of the schema
fed token by token as the engine would (the allowed-token mask computed before each token, the
token accepted after it): whether every token of it was allowed and the end accepted, and the mask's
seconds per step (median, p95). An invalid document (a wrong type, a value outside an enum) must be
refused at some token. Candidates (PyPI): xgrammar, llguidance, outlines-core, lm-format-enforcer;
a library that cannot take a tokenizer or a schema is reported with its error.

    python -m bench.structured_libraries --tokenizer NAME=FOLDER [...] [--out runs/bench/structured_libraries.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

SCHEMAS = {
    "flat object": ({"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["name", "age", "tags"], "additionalProperties": False},
        {"name": "Ada Lovelace", "age": 36, "tags": ["mathematics", "engines"]}, {"name": "Ada", "age": "36", "tags": []}),
    "enum and number": ({"type": "object", "properties": {
        "label": {"enum": ["positive", "negative", "neutral"]}, "confidence": {"type": "number"}},
        "required": ["label", "confidence"], "additionalProperties": False},
        {"label": "negative", "confidence": 0.875}, {"label": "angry", "confidence": 0.5}),
    "nested arrays": ({"type": "object", "properties": {
        "customer": {"type": "object", "properties": {"id": {"type": "integer"}, "tier": {"enum": ["gold", "silver"]}},
                     "required": ["id", "tier"], "additionalProperties": False},
        "items": {"type": "array", "items": {"type": "object", "properties": {
            "sku": {"type": "string"}, "quantity": {"type": "integer"}, "price": {"type": "number"}},
            "required": ["sku", "quantity", "price"], "additionalProperties": False}},
        "total": {"type": "number"}}, "required": ["customer", "items", "total"], "additionalProperties": False},
        {"customer": {"id": 1042, "tier": "gold"}, "items": [{"sku": "A-17", "quantity": 2, "price": 9.5},
                                                             {"sku": "B-3", "quantity": 1, "price": 120.0}], "total": 139.0},
        {"customer": {"id": 1042, "tier": "gold"}, "items": [{"sku": "A-17", "quantity": 2.5, "price": 9.5}], "total": 1}),
}


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size: int):
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgr.GrammarCompiler(self.info, cache_enabled=False)
        self.mask = xgr.allocate_token_bitmask(1, self.info.vocab_size)

    def compile(self, schema: dict):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def step(self, matcher, token: int) -> bool:
        matcher.fill_next_token_bitmask(self.mask)
        return bool((self.mask[0, token // 32] >> (token % 32)) & 1) and matcher.accept_token(token)

    def ended(self, matcher, eos: int) -> bool:
        return self.step(matcher, eos) and matcher.is_terminated()


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab_size: int):
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self.mask = llguidance.torch.allocate_token_bitmask(1, self.tokenizer.vocab_size)

    def compile(self, schema: dict):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
        error = self.llg.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error and not error.startswith("WARNING"):
            raise ValueError(error)
        return grammar

    def matcher(self, grammar):
        return self.llg.LLMatcher(self.tokenizer, grammar)

    def step(self, matcher, token: int) -> bool:
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask(matcher, self.mask, 0)
        allowed = bool((self.mask[0, token // 32] >> (token % 32)) & 1)
        return allowed and matcher.consume_token(token) and not matcher.is_error()

    def ended(self, matcher, eos: int) -> bool:
        return self.step(matcher, eos) and matcher.is_stopped()


class FormatEnforcer:
    name = "lm-format-enforcer"

    def __init__(self, tokenizer, vocab_size: int):
        # its transformers integration does not import under transformers 5 (transformers.tokenization_utils
        # is gone), so its tokenizer data is built here as that integration builds it
        from lmformatenforcer import TokenEnforcerTokenizerData

        zero, special = tokenizer.encode("0", add_special_tokens=False)[-1], set(tokenizer.all_special_ids)
        regular = []
        for token in range(min(vocab_size, len(tokenizer))):
            if token not in special:
                after_zero, alone = tokenizer.decode([zero, token])[1:], tokenizer.decode([token])
                regular.append((token, after_zero, len(after_zero) > len(alone)))
        self.data = TokenEnforcerTokenizerData(regular, lambda ids: tokenizer.decode(ids).rstrip("\ufffd"),
                                               tokenizer.eos_token_id, False, vocab_size)

    def compile(self, schema: dict):
        from lmformatenforcer import JsonSchemaParser, TokenEnforcer

        return lambda: TokenEnforcer(self.data, JsonSchemaParser(schema))

    def matcher(self, make):
        return {"enforcer": make(), "tokens": []}

    def step(self, matcher, token: int) -> bool:
        allowed = token in set(matcher["enforcer"].get_allowed_tokens(matcher["tokens"]).allowed_tokens)
        matcher["tokens"].append(token)
        return allowed

    def ended(self, matcher, eos: int) -> bool:
        return self.step(matcher, eos)


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tokenizer, vocab_size: int):
        from outlines_core import Vocabulary

        # outlines-core reads a vocabulary from the hub only; here each token's bytes are rebuilt from
        # the tokenizer's own pieces (byte-level BPE's printable bytes, or SentencePiece's "▁" and <0xNN>)
        pieces: dict[bytes, list[int]] = {}
        special = set(tokenizer.all_special_ids)
        for piece, token in tokenizer.get_vocab().items():
            if token not in special and token < vocab_size and (raw := piece_bytes(piece)) is not None:
                pieces.setdefault(raw, []).append(token)
        self.vocabulary = Vocabulary(tokenizer.eos_token_id, pieces)
        self.mask = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)

    def compile(self, schema: dict):
        from outlines_core import Index
        from outlines_core.json_schema import build_regex_from_schema

        return Index(build_regex_from_schema(json.dumps(schema)), self.vocabulary)

    def matcher(self, index):
        from outlines_core import Guide

        return Guide(index)

    def step(self, guide, token: int) -> bool:
        self.mask.zero_()
        guide.write_mask_into(self.mask.data_ptr(), self.mask.numel(), self.mask.element_size())
        if not (self.mask[token // 32] >> (token % 32)) & 1:
            return False
        guide.advance(token)
        return True

    def ended(self, guide, eos: int) -> bool:
        return guide.is_finished()


def piece_bytes(piece: str) -> bytes | None:
    if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:  # SentencePiece's byte fallback
        return bytes([int(piece[3:5], 16)])
    if "▁" in piece:
        return piece.replace("▁", " ").encode()
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    decoder = piece_bytes.__dict__.setdefault("decoder", {v: k for k, v in bytes_to_unicode().items()})
    try:
        return bytes(decoder[c] for c in piece)
    except KeyError:  # not a byte-level piece: its text as it is
        return piece.encode()


LIBRARIES = (XGrammar, LLGuidance, OutlinesCore, FormatEnforcer)


def feed(library, compiled, tokens: list[int], eos: int) -> tuple[bool, list[float]]:
    """A document's tokens through a fresh matcher: whether all were allowed and the end accepted,
    and the seconds of each step (mask and accept)."""
    matcher, seconds = library.matcher(compiled), []
    for token in tokens:
        began = time.perf_counter()
        ok = library.step(matcher, token)
        seconds.append(time.perf_counter() - began)
        if not ok:
            return False, seconds
    return library.ended(matcher, eos), seconds


def measure(library_class, tokenizer, vocab_size: int) -> dict:
    began = time.perf_counter()
    try:
        library = library_class(tokenizer, vocab_size)
    except Exception as exc:  # a library that cannot take this tokenizer: reported, not fatal
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    result = {"setup_s": time.perf_counter() - began, "schemas": {}}
    for name, (schema, valid, invalid) in SCHEMAS.items():
        row = {}
        try:
            began = time.perf_counter()
            compiled = library.compile(schema)
            row["compile_s"] = time.perf_counter() - began
            good = tokenizer.encode(json.dumps(valid), add_special_tokens=False)
            row["valid_accepted"], seconds = feed(library, compiled, good, tokenizer.eos_token_id)
            row["invalid_refused"] = not feed(library, compiled, tokenizer.encode(json.dumps(invalid),
                                                                                   add_special_tokens=False),
                                              tokenizer.eos_token_id)[0]
            row.update(tokens=len(good), step_ms_median=1000 * statistics.median(seconds),
                       step_ms_p95=1000 * sorted(seconds)[int(0.95 * (len(seconds) - 1))])
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        result["schemas"][name] = row
    return result


def table(report: dict) -> str:
    lines = [f"{'tokenizer':<10}{'library':<20}{'setup s':>8}{'schema':>16}{'compile ms':>11}{'step ms p50':>12}"
             f"{'p95':>7}  valid / invalid"]
    for tok, libraries in report["tokenizers"].items():
        for lib, result in libraries.items():
            if "error" in result:
                lines.append(f"{tok:<10}{lib:<20}  failed: {result['error'][:80]}")
                continue
            for schema, row in result["schemas"].items():
                if "error" in row:
                    lines.append(f"{tok:<10}{lib:<20}{result['setup_s']:>8.2f}{schema:>16}  failed: {row['error'][:60]}")
                    continue
                lines.append(f"{tok:<10}{lib:<20}{result['setup_s']:>8.2f}{schema:>16}{1000 * row['compile_s']:>11.1f}"
                             f"{row['step_ms_median']:>12.3f}{row['step_ms_p95']:>7.2f}  "
                             f"{'accepted' if row['valid_accepted'] else 'REFUSED'} / "
                             f"{'refused' if row['invalid_refused'] else 'ACCEPTED'}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", nargs="+", required=True, metavar="NAME=FOLDER",
                        help="model folders whose tokenizer and vocabulary size (config.json) to measure with")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/structured_libraries.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    report = {"machine": f"{torch.get_num_threads()} torch thread", "tokenizers": {}}
    for item in args.tokenizer:
        name, folder = item.split("=", 1)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        vocab = json.loads((Path(folder) / "config.json").read_text())
        vocab_size = vocab.get("vocab_size") or vocab.get("text_config", {}).get("vocab_size") or len(tokenizer)
        report["tokenizers"][name] = {lib.name: measure(lib, tokenizer, vocab_size) for lib in LIBRARIES}
    print(table(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
