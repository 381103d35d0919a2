"""create_app: the services (settings, metrics, model registry, engines), the middleware and the
routers of server/api/ wired into one FastAPI app. No routes here. Building an app starts nothing
and changes nothing of the process: its lifespan starts the engines, the first load, the watcher
and the SIGHUP handler, and stops them."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.routing import Match
from starlette.middleware.cors import CORSMiddleware

from server import __version__
from server.access import AccessControl
from server.api import ADMIN_ROUTERS, ROUTERS
from server.api.dependencies import Services
from server.chat.batching import ChatEngine
from server.chat.serving import ChatService
from server.engine import WorkerEngine, on_own_thread
from server.errors import BodySizeLimit, CatchUnhandled, install_error_handlers
from server.imaging.batching import ImageBatcher
from server.imaging.serving import ImageService
from server.metrics import CURRENT_REQUEST, Metrics, RequestTiming
from server.registry import Registry
from server.schemas.common import ErrorBody
from server.settings import Settings
from server.watch import watch_artifacts

log = logging.getLogger(__name__)

ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 403, 404, 408, 409, 413, 415, 422, 429, 503, 504)}


def create_app(settings: Settings | None = None, load_in_background: bool = True) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    image_engine = WorkerEngine("image", settings.image_queue_size, settings.retry_after_seconds, metrics)
    chat_engine = ChatEngine("chat", settings.chat_max_batch, settings.chat_queue_size, settings.retry_after_seconds,
                             metrics, settings.chat_timeout_seconds, settings.chat_prefill_tokens,
                             settings.chat_kv_cache_tokens)
    # new artifacts are warmed on the worker that will run them, between requests
    registry = Registry(settings, metrics, workers={"image": image_engine.run, "chat": chat_engine.run})
    image_batcher = ImageBatcher(image_engine, settings.image_max_batch, settings.image_batch_window_ms / 1000, metrics)
    svc = Services(settings, metrics, registry, ImageService(settings, image_batcher, metrics),
                   ChatService(settings, chat_engine, metrics), (image_engine, chat_engine))
    stop_watching = threading.Event()

    def initial_load() -> None:
        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)
        registry.reload("start")

    def reload_in_background(reason: str) -> None:
        threading.Thread(target=registry.reload, args=(reason,), name=f"reload-{reason}", daemon=True).start()

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if settings.rate_limit_per_minute:
            log.info("rate limit: %d requests a minute per %s", settings.rate_limit_per_minute,
                     "API key" if settings.api_key_list else "client address (no API keys are set)")
        for engine in svc.engines:
            engine.start()
        if load_in_background:
            threading.Thread(target=initial_load, name="initial-load", daemon=True).start()
        else:
            on_own_thread(initial_load)  # its OpenMP team ends with it
        if settings.watch:
            threading.Thread(target=watch_artifacts, args=(registry, stop_watching), name="watch", daemon=True).start()
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, reload_in_background, "SIGHUP")
        except (NotImplementedError, RuntimeError, ValueError):
            log.debug("no SIGHUP handler outside the main thread")  # e.g. under a test client
        yield
        stop_watching.set()
        for engine in svc.engines:
            engine.shutdown()

    app = FastAPI(title="Loopstack", version=__version__, lifespan=lifespan, responses=ERRORS)
    app.state.services = svc
    install_middleware(app, settings, metrics)
    for router in ROUTERS:  # the admin routes answer 404 while off, and only show in the schema when on
        app.include_router(router, include_in_schema=router not in ADMIN_ROUTERS or settings.admin_token is not None)
    metrics.preset_endpoints([route.path for router in ROUTERS for route in router.routes] + ["unmatched"])
    return app


def install_middleware(app: FastAPI, settings: Settings, metrics: Metrics) -> None:
    """The error shape, bounds, access control, CORS and request counting every public app has (the
    single server's and the scale-out front's). Each one added wraps the ones before it."""
    install_error_handlers(app)
    app.add_middleware(CatchUnhandled)  # first added: innermost
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes, timeout=settings.body_timeout_seconds)
    # outside the body limits: the request id is set before they (or anything inside) log
    app.add_middleware(AccessControl, api_keys=settings.api_key_list,
                       rate_limit_per_minute=settings.rate_limit_per_minute)
    if origins := [o.strip() for o in settings.cors_origins.split(",") if o.strip()]:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
                           expose_headers=["X-Request-ID", "X-Loopstack-Generation", "Retry-After"])
    # added last, so outermost: every response is counted, whichever layer answered it
    app.add_middleware(RequestCounter, metrics=metrics, routes=app.router)


class RequestCounter:
    """Counts every response by endpoint and status, and times it from arrival. The endpoint is the
    route's path template: the one that ran, or for a request answered before routing (a 401, 413 or
    429 of the middleware, a CORS preflight) the one its path matches; "unmatched" when none does."""

    def __init__(self, app, metrics: Metrics, routes):
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        timing = RequestTiming(arrival=time.perf_counter())
        CURRENT_REQUEST.set(timing)  # the endpoint (and its tasks, in copies of this context) fill it in
        status = 500  # an exception past every handler: the server answers 500

        async def noted(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, noted)
        finally:
            self.metrics.count_response(self._endpoint(scope), status, timing)

    def _endpoint(self, scope) -> str:
        route = scope.get("route")
        if route is not None:
            return route.path
        matched = next((r for r in _flat(self.routes.routes) if r.matches(scope)[0] != Match.NONE), None)
        return matched.path if matched is not None else "unmatched"


def _flat(routes) -> list:
    """The routes of an app whose routers were included (FastAPI keeps each one's own list)."""
    out = []
    for route in routes:
        inner = getattr(getattr(route, "original_router", None), "routes", None)
        out += _flat(inner) if inner is not None else [route] if hasattr(route, "path") else []
    return out
