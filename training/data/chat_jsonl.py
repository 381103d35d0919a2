"""A user's own domain as OpenAI's chat fine-tuning JSONL: one conversation per line,
`{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}`, the loss on the
assistant turns only (an assistant turn with `"weight": 0` is context, not trained on, as OpenAI's
format says).

Every line is checked before anything trains, and every problem is reported with its line number
(bad JSON, no assistant turn, a role or content that is not text, too long for the base's context);
a file with any problem trains nothing. Exact duplicates (the same messages, whitespace aside) are
dropped and reported, and a validation file loses the conversations the training file has.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

ROLES = ("system", "user", "assistant")
IGNORE = -100


class DataError(ValueError):
    """A JSONL file that cannot be trained on; `problems` are (line number, reason)."""

    def __init__(self, path: Path, problems: list[tuple[int, str]]):
        self.path, self.problems = path, problems
        shown = "\n".join(f"  line {line}: {reason}" for line, reason in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{path}: {len(problems)} problem(s), nothing was trained\n{shown}{more}")


@dataclass(frozen=True)
class Conversation:
    messages: tuple[tuple[str, str, bool], ...]  # (role, content, trained on)
    line: int = field(compare=False)  # where it was read (1-based)

    def key(self) -> tuple:
        return tuple((role, " ".join(content.split())) for role, content, _ in self.messages)

    def chat(self, upto: int | None = None) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content, _ in self.messages[:upto]]

    @property
    def prompt(self) -> list[dict[str, str]]:
        """The conversation up to its last assistant turn: what a user sends to be answered."""
        last = max(i for i, (role, _, _) in enumerate(self.messages) if role == "assistant")
        return self.chat(last)

    @property
    def answer(self) -> str:
        return [content for role, content, _ in self.messages if role == "assistant"][-1]


SHORT_ANSWER_WORDS = 12  # answers this short are scored by exact match (longer ones by their loss only)


def normalised(text: str) -> str:
    """Case, spacing, surrounding quotes and trailing punctuation aside."""
    return " ".join(text.lower().split()).strip("\"'` ").rstrip(".!?;:,").strip()


@dataclass(frozen=True)
class DomainExample:
    """A user's conversation as the router's training and the evaluation read an example of the world
    (training/data/world_tasks.py): its prompt (the conversation up to its last assistant turn), its
    reference answer, and whether a reply is that answer."""

    domain: str
    conversation: Conversation

    @property
    def prompt(self) -> str:  # a key: the prompt's messages
        return json.dumps(self.conversation.prompt)

    @property
    def answer(self) -> str:
        return self.conversation.answer

    @property
    def final(self) -> str:
        return normalised(self.answer)

    @property
    def short(self) -> bool:
        return len(self.answer.split()) <= SHORT_ANSWER_WORDS

    def messages(self) -> list[dict[str, str]]:
        return self.conversation.prompt

    def matches(self, reply: str) -> bool:
        return normalised(reply) == self.final


def _problem(record) -> str | None:
    """What makes one parsed line unusable, or None."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list) or not record["messages"]:
        return 'not an object with a non-empty "messages" list'
    for key in ("tools", "functions"):
        if record.get(key):
            return f'"{key}" are not trained on (text conversations only)'
    for i, message in enumerate(record["messages"], 1):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            return f"message {i}: role must be one of {', '.join(ROLES)}"
        if not isinstance(message.get("content"), str) or not message["content"].strip():
            return f"message {i}: content must be non-empty text"
        if message.get("tool_calls") or message.get("function_call"):
            return f"message {i}: tool calls are not trained on"
        if message.get("weight", 1) not in (0, 1):
            return f"message {i}: weight must be 0 or 1"
    roles = [m["role"] for m in record["messages"]]
    if not any(role == "assistant" and m.get("weight", 1) for role, m in zip(roles, record["messages"])):
        return "no assistant turn to train on"
    if roles[-1] != "assistant":
        return "the last message must be the assistant's"
    return None


def read_conversations(path: Path) -> tuple[list[Conversation], list[tuple[int, str]]]:
    """Every conversation of the file, de-duplicated; the duplicates dropped as (line, reason).
    Raises DataError listing every malformed line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(Path(path), [(0, f"cannot be read ({exc})")]) from exc
    problems, conversations, dropped, seen = [], [], [], {}
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            problems.append((number, f"bad JSON ({exc.msg} at column {exc.colno})"))
            continue
        problem = _problem(record)
        if problem:
            problems.append((number, problem))
            continue
        conversation = Conversation(tuple((m["role"], m["content"], m["role"] == "assistant" and bool(m.get("weight", 1)))
                                          for m in record["messages"]), number)
        first = seen.setdefault(conversation.key(), number)
        if first != number:
            dropped.append((number, f"duplicate of line {first} (dropped)"))
            continue
        conversations.append(conversation)
    if not conversations and not problems:
        problems.append((0, "no conversations"))
    if problems:
        raise DataError(Path(path), problems)
    return conversations, dropped


def encode_conversation(tokenizer, conversation: Conversation) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation in the base's chat template, and labels that are IGNORE
    except on the trained assistant turns (their text and the template's end of turn). Each turn's
    span is where the template rendered up to it ends and the template rendered through it ends;
    a template that does not render conversations as growing prefixes is refused."""
    ids, labels, done, last_turn = [], [], 0, 0
    for i, (role, _, trained) in enumerate(conversation.messages):
        if role != "assistant":
            continue
        before = _render(tokenizer, conversation.chat(i), generation_prompt=True)
        through = _render(tokenizer, conversation.chat(i + 1), generation_prompt=False)
        if through[:len(before)] != before or before[:done] != ids:
            raise DataError(Path("<chat template>"), [(conversation.line, "the base's chat template does not render "
                                                                         "this conversation turn by turn")])
        ids += before[done:] + through[len(before):]
        labels += [IGNORE] * (len(before) - done) + (through[len(before):] if trained else
                                                      [IGNORE] * (len(through) - len(before)))
        done, last_turn = len(through), len(before)
    return _end_at_eos(tokenizer.eos_token_id, ids, labels, last_turn)


def _end_at_eos(eos: int | None, ids: list[int], labels: list[int], last_turn: int) -> tuple[list[int], list[int]]:
    """The conversation ends at the last turn's end-of-sequence token (what stops generation): what a
    template renders after it is cut, and a template that renders none gets one."""
    if eos is None:
        return ids, labels
    if eos in ids[last_turn:]:
        end = len(ids) - ids[::-1].index(eos)
        return ids[:end], labels[:end]
    return ids + [eos], labels + [eos if labels[-1] != IGNORE else IGNORE]


def _render(tokenizer, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                              return_dict=True)["input_ids"])


def check_lengths(tokenizer, conversations: list[Conversation], max_tokens: int, path: Path) -> None:
    """Raises DataError for every conversation longer than the base's context."""
    long = [(c.line, f"{n} tokens, more than the base's context of {max_tokens}")
            for c in conversations if (n := len(encode_conversation(tokenizer, c)[0])) > max_tokens]
    if long:
        raise DataError(path, long)


def split_validation(conversations: list[Conversation], share: float = 0.1, seed: int = 0,
                     at_least: int = 4) -> tuple[list[Conversation], list[Conversation]]:
    """(train, validation): a seeded share held out when no validation file is given."""
    if len(conversations) < 2 * at_least:
        raise DataError(Path("<training file>"), [(0, f"{len(conversations)} conversations: at least "
                                                      f"{2 * at_least} are needed to hold out a validation share")])
    order = list(conversations)
    random.Random(seed).shuffle(order)
    count = max(at_least, round(share * len(order)))
    return order[count:], order[:count]


def held_out(validation: list[Conversation], train: list[Conversation]) -> tuple[list[Conversation], list[tuple[int, str]]]:
    """A validation file without the conversations the training file has, and those dropped."""
    trained = {c.key() for c in train}
    return ([c for c in validation if c.key() not in trained],
            [(c.line, "also in the training file (dropped from validation)") for c in validation if c.key() in trained])
