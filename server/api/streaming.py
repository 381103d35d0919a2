"""Server-sent events (sse-starlette) as every streaming route sends them.

Once the status line has gone out a failure can no longer change the status, so it travels as the
stream's last event, in the one error shape. A drain (SIGTERM) lets a running stream finish within
the drain window (`LOOPSTACK_SHUTDOWN_DRAIN_SECONDS`); one that cannot ends with an error event
(`shutting_down`) before the server goes, never cut without a word. How each stream ended is on
its request's access log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import AsyncIterator, Callable

import anyio
from sse_starlette import EventSourceResponse

from server.access import note
from server.errors import ApiError, error_body
from server.settings import Settings

log = logging.getLogger(__name__)
POLL_SECONDS = 0.25


def event_stream(events: AsyncIterator[dict], error_event: Callable[[str], dict], what: str, settings: Settings,
                 headers: dict[str, str], last: dict | None = None) -> EventSourceResponse:
    """The response for a stream of events; `error_event` shapes its error (the one error shape as
    JSON text) as an event, and `last` (OpenAI's `[DONE]`) ends it whatever happened."""
    shutdown = anyio.Event()  # set by sse-starlette when the server begins to shut down
    grace = max(settings.shutdown_drain_seconds - 1.0, 0.0)  # within uvicorn's own drain window
    body = ending_in_error_event(drained(events, shutdown, max(grace - 0.5, 0.0)), error_event, what, last)
    return EventSourceResponse(body, headers=headers, shutdown_event=shutdown, shutdown_grace_period=grace)


async def drained(events: AsyncIterator[dict], shutdown: anyio.Event, seconds: float) -> AsyncIterator[dict]:
    """`events` as they come; once `shutdown` is set they have `seconds` more to end, after which the
    stream stops (what produces them is closed: its work stops) with a 503 `shutting_down`."""
    iterator, loop, deadline, upcoming = events.__aiter__(), asyncio.get_running_loop(), None, None
    try:
        while True:
            upcoming = asyncio.ensure_future(iterator.__anext__())
            while not upcoming.done():
                if deadline is None and shutdown.is_set():
                    deadline = loop.time() + seconds
                wait = POLL_SECONDS if deadline is None else min(POLL_SECONDS, max(deadline - loop.time(), 0.0))
                await asyncio.wait({upcoming}, timeout=wait)
                if not upcoming.done() and deadline is not None and loop.time() >= deadline:
                    raise ApiError(503, "the server is shutting down and this answer could not finish within its "
                                        "drain window; send it again", type="shutting_down")
            try:
                event = upcoming.result()
            except StopAsyncIteration:
                return
            yield event
    finally:
        if upcoming is not None and not upcoming.done():  # stop what makes the events, then close it
            upcoming.cancel()
            with contextlib.suppress(BaseException):
                await upcoming
        await iterator.aclose()


async def ending_in_error_event(events: AsyncIterator[dict], error_event: Callable[[str], dict], what: str,
                                last: dict | None = None) -> AsyncIterator[dict]:
    """`events` as they come; if they fail, one more event, `error_event(<the error as JSON>)`: the
    ApiError's own (a deadline, a shutdown), or an internal error that points to the server's log."""
    outcome = "cut short (the client left)"
    try:
        async for event in events:
            yield event
        outcome = "complete"
    except ApiError as exc:
        outcome = f"with an error event ({exc.type})"
        yield error_event(error_body(exc.type, exc.message, exc.param))
    except Exception:
        outcome = "with an error event (internal_error)"
        log.exception("a streamed %s failed", what)
        yield error_event(error_body("internal_error", f"the {what} failed; see the server's log"))
    finally:
        note("stream", outcome)
    if last is not None:
        yield last


def named_error(body: str) -> dict:
    """The native streams' error: an event named `error`."""
    return {"event": "error", "data": body}
