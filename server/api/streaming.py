"""Server-sent events once the status line has gone out: a failure can no longer change the status,
so it travels as the stream's last event, in the one error shape."""

from __future__ import annotations

import logging
from typing import AsyncIterator, Callable

from server.errors import ApiError, error_body

log = logging.getLogger(__name__)


async def ending_in_error_event(events: AsyncIterator[dict], error_event: Callable[[str], dict],
                                what: str) -> AsyncIterator[dict]:
    """`events` as they come; if they fail, one more event, `error_event(<the error as JSON>)`: the
    ApiError's own (a deadline, say), or an internal error that points to the server's log."""
    try:
        async for event in events:
            yield event
    except ApiError as exc:
        yield error_event(error_body(exc.type, exc.message, exc.param))
    except Exception:
        log.exception("a streamed %s failed", what)
        yield error_event(error_body("internal_error", f"the {what} failed; see the server's log"))


def named_error(body: str) -> dict:
    """The native streams' error: an event named `error`."""
    return {"event": "error", "data": body}
