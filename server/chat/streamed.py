"""A streamed answer as its client sees it: the engine's thread wakes the request's coroutine at each
new token (`stream_listener`), and `StreamedText` sends only what the final answer keeps."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from server.chat.batching import Sequence


def stream_listener() -> Callable[[], None]:
    """A row listener that wakes a streaming request's coroutine (on its event loop) from the
    engine's thread; pass it to `ChatEngine.enqueue`, then iterate `ChatEngine.stream`."""
    loop, event = asyncio.get_running_loop(), asyncio.Event()

    def listener() -> None:
        loop.call_soon_threadsafe(event.set)

    listener.event = event
    return listener


class StreamedText:
    """The part of a row's answer that can be sent so far: what its tokens decode to, less what the
    final answer may still drop (the end-of-turn token, trailing whitespace that `strip()` removes,
    a half-decoded character, and the last characters that could begin a stop sequence), so that
    the pieces sent add up to the final text exactly."""

    def __init__(self, row: Sequence):
        self.row = row
        self.sent = ""
        self.hold = max((len(s) - 1 for s in row.job.stop), default=0)

    def new(self) -> str:
        chat, tokens = self.row.chat, list(self.row.tokens)
        tokens = [t for t in tokens if t not in chat.end_of_turn_ids]
        text = chat.decode(tokens).lstrip().rstrip("\ufffd")
        cuts = [i for i in (text.find(s) for s in self.row.job.stop) if i >= 0]
        text = text[:min(cuts)] if cuts else text[:max(0, len(text) - self.hold)]
        text = text.rstrip()
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece

    def rest(self, final: str) -> str:
        """What is left to send of the final text (the final text begins with what was sent)."""
        piece = final[len(self.sent):] if final.startswith(self.sent) else ""
        self.sent = final
        return piece
