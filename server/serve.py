"""uvicorn as the server runs it: its keep-alive and graceful-shutdown timeouts from the settings,
and a deadline on each request's head, which uvicorn does not have (a client trickling its headers
a byte at a time would otherwise hold a connection forever)."""

from __future__ import annotations

import asyncio

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.settings import Settings


class HeadDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request line and headers have not all
    arrived within `head_timeout` seconds of connecting (or of its previous response)."""

    head_timeout: float = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()  # the next request's head: the keep-alive timer covers the idle gap before it

    def handle_events(self) -> None:
        super().handle_events()
        if self._request_in_progress() and self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _request_in_progress(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_late)

    def _head_late(self) -> None:
        self._head_timer = None
        if not self._request_in_progress() and not self.transport.is_closing():
            self.transport.close()


def uvicorn_config(app, settings: Settings, host: str, port: int, **kwargs) -> uvicorn.Config:
    protocol = type("HeadDeadline", (HeadDeadlineProtocol,), {"head_timeout": settings.header_timeout_seconds})
    return uvicorn.Config(app, host=host, port=port, http=protocol, log_config=None,
                          access_log=False,  # the server logs each request itself, with its request id
                          timeout_keep_alive=settings.keep_alive_seconds,
                          timeout_graceful_shutdown=settings.shutdown_drain_seconds, **kwargs)
