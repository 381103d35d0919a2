"""Structured output: OpenAI's `response_format` (`json_object`, `json_schema`) enforced while the
answer is decoded, row by row inside the chat engine's batch.

The constraint is llguidance's, chosen by measurement (docs/chat.md: Structured output): a JSON
schema compiles to its grammar in a millisecond or so when the request is planned (what it cannot
enforce is a 422 naming it, before the request queues), and each row gets its own matcher, which
before every token masks the row's logits to the tokens that keep the answer a valid prefix of the
schema's documents and after it takes the token sampled. Rows with and without a format, and with
different schemas, decode in one step: the masks apply to each row's own logits. Separators are
fixed (", " and ": ", no other whitespace), so a small model cannot loop on whitespace. Once the
document is complete only an end-of-turn token is allowed; an answer cut by max_tokens (or by a stop
sequence) is not a complete document, and the trace says so.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from server.errors import ApiError

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_lock = threading.Lock()


@dataclass(frozen=True)
class OutputFormat:
    """A request's format: its kind, the schema's name, and the grammar its rows are held to."""

    type: str  # "json_object" or "json_schema"
    name: str | None
    grammar: str


def constraint_tokenizer(chat):
    """llguidance's view of the chat base's tokenizer (built once per model: 2 s for SmolLM2's
    vocabulary, 6 s for Gemma 3's on 2 cores), ending a document on any of its end-of-turn tokens."""
    import llguidance.hf

    with _lock:
        if not has_constraint_tokenizer(chat):  # kept on the model: it goes when the model does
            chat.constraint_tokenizer = llguidance.hf.from_tokenizer(
                chat.tokenizer, n_vocab=chat.model.config.vocab_size, eos_token=sorted(chat.end_of_turn_ids))
        return chat.constraint_tokenizer


def has_constraint_tokenizer(chat) -> bool:
    return getattr(chat, "constraint_tokenizer", None) is not None


def output_format(response_format, chat) -> OutputFormat | None:
    """The request's `response_format` compiled against the chat base's tokenizer; None for text. A
    schema llguidance cannot enforce is a 422 that names what it refused."""
    from llguidance import LLMatcher

    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        schema, name = {"type": "object"}, None
    else:
        schema, name = response_format.json_schema.schema_, response_format.json_schema.name
    try:
        grammar = LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as exc:
        raise ApiError(422, f"response_format.json_schema.schema: {exc}", "response_format") from None
    error = LLMatcher.validate_grammar(grammar, constraint_tokenizer(chat))
    if error and not error.startswith("WARNING"):
        raise ApiError(422, f"response_format.json_schema.schema: not enforceable: {error}", "response_format")
    return OutputFormat(response_format.type, name, grammar)


class Constraint:
    """One row's matcher: masks its logits before each token, takes the token after."""

    def __init__(self, chat, output: OutputFormat):
        import llguidance
        import llguidance.torch

        tokenizer = constraint_tokenizer(chat)
        self.output = output
        self.matcher = llguidance.LLMatcher(tokenizer, output.grammar)
        self.bitmask = llguidance.torch.allocate_token_bitmask(1, tokenizer.vocab_size)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """The row's logits with every token the format does not allow at -inf (a copy)."""
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        allowed = unpack(self.bitmask[0], logits.shape[-1]).to(logits.device)
        return logits.masked_fill(~allowed, float("-inf"))

    def accept(self, token: int) -> None:
        self.matcher.consume_token(token)

    @property
    def complete(self) -> bool:
        """The answer so far is a whole document of the format (and nothing went wrong)."""
        return not self.matcher.is_error() and self.matcher.is_accepting()


def unpack(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """A packed int32 bitmask (bit i of word i // 32 set: token i allowed) as booleans, `vocab` long."""
    bits = torch.arange(32, dtype=torch.int32)
    return ((bitmask.unsqueeze(-1) >> bits) & 1).flatten()[:vocab].bool()
