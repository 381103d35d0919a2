"""When an answer ends, for every decode path (TGI's StoppingCriteria in one rule): an end-of-turn
token, a stop sequence, or `max_new_tokens`.

A stop sequence is looked for in the text of the answer's last few tokens only: enough of them to
hold the longest stop sequence even at one byte a token (a character is at most 4 bytes), so a
step's check costs the same at the 200th token as at the first. Where the answer is cut is found
once, when it ends, in its whole text: before the first stop sequence it holds.
"""

from __future__ import annotations

from typing import Callable


class StoppingRule:
    def __init__(self, end_of_turn: tuple[int, ...], stop: tuple[str, ...], max_new_tokens: int,
                 decode: Callable[[list[int]], str]):
        self.end_of_turn = end_of_turn
        self.stop = stop
        self.max_new_tokens = max_new_tokens
        self.decode = decode
        self.tail_tokens = 4 * max(map(len, stop)) + 4 if stop else 0

    def finish_reason(self, tokens: list[int]) -> str | None:
        """"stop" (end of turn, or a stop sequence in the text), "length", or None: the answer goes on."""
        if tokens[-1] in self.end_of_turn:
            return "stop"
        if self.stop:
            tail = self.decode(tokens[-self.tail_tokens:])
            if any(s in tail for s in self.stop):
                return "stop"
        return "length" if len(tokens) >= self.max_new_tokens else None

    def text(self, tokens: list[int]) -> str:
        """The answer: its tokens less a final end-of-turn token, before the first stop sequence, stripped."""
        if tokens and tokens[-1] in self.end_of_turn:
            tokens = tokens[:-1]
        text = self.decode(tokens)
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return (text[:min(cuts)] if cuts else text).strip()
