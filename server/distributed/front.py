"""The public app of a scale-out deployment: the single server's paths, OpenAPI schema, middleware
(error shape, bounds, API keys, rate limits, CORS) and request metrics, with each model request
forwarded to its model's deployment instead of run in process.

- Image requests go to the deployment of the model they name; chat requests to the chat deployment.
  The replica validates and answers exactly as a single server does.
- A replica that stops while it runs a request (a crash, a node lost, a scale-down kill) fails that
  call. A request with a seed is deterministic, so the front sends it again (to another replica)
  and its client sees nothing; one without a seed gets 503 `replica_lost` (it may already have
  been half done, and the client may prefer a new random draw to a wait). A stream cut after its
  first event ends with an `error` event.
- /readyz and /v1/models merge every deployment's; /metrics is the front's own request metrics, and
  /metrics/targets lists every replica's metrics address for Prometheus' HTTP service discovery.
Written by hand: the forwarding and the retry (Ray Serve routes and scales; nothing does this part).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import AsyncIterator

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server import __version__
from server.app import create_app, install_middleware
from server.errors import ApiError, error_body
from server.metrics import Metrics
from server.settings import Settings

log = logging.getLogger(__name__)

HOP_BY_HOP = {"content-length", "transfer-encoding", "connection", "keep-alive"}
FORWARDED_HEADERS = {"accept", "content-type", "x-request-id", "user-agent"}


def replica_lost_errors() -> tuple[type[Exception], ...]:
    """What a deployment handle raises when the replica running the call is gone."""
    from ray.exceptions import ActorUnavailableError, RayActorError

    return RayActorError, ActorUnavailableError


class Front:
    """Forwards requests to deployment handles of `ModelReplica`s (`answer`, or `forward` for streams)."""

    def __init__(self, image_handles: dict, chat_handle, metrics: Metrics, attempts: int = 4,
                 backoff_seconds: float = 0.2):
        self.image_handles = image_handles
        self.chat_handle = chat_handle
        self.metrics = metrics
        self.attempts = attempts
        self.backoff_seconds = backoff_seconds
        self.lost = replica_lost_errors()

    def deployments(self) -> dict:
        named = {f"images-{name}": handle for name, handle in self.image_handles.items()}
        return named | ({"chat": self.chat_handle} if self.chat_handle is not None else {})

    async def forward(self, deployment: str, handle, request: Request, body: bytes, idempotent: bool,
                      stream: bool) -> Response:
        path, root = request.scope["path"], request.scope.get("root_path", "")
        path = path[len(root):] if root and path.startswith(root) else path  # under a route prefix
        forwarded = {"method": request.method, "path": path, "query": request.url.query,
                     "headers": [(k, v) for k, v in request.headers.items() if k in FORWARDED_HEADERS],
                     "body": body, "client": list(request.client) if request.client else None}
        for attempt in range(self.attempts):
            try:
                if stream:
                    replies = handle.options(stream=True).forward.remote(forwarded)
                    head = await replies.__anext__()
                    return StreamingResponse(self._rest(deployment, replies), status_code=head["status"],
                                             headers=without_hop_by_hop(head["headers"]))
                whole = await handle.answer.remote(forwarded)
                return Response(whole["body"], status_code=whole["status"], headers=without_hop_by_hop(whole["headers"]))
            except self.lost as exc:
                if not idempotent or attempt == self.attempts - 1:
                    self.metrics.replica_lost.labels(deployment=deployment).inc()
                    raise ApiError(503, f"the {deployment} replica running this request stopped "
                                        f"({type(exc).__name__}); requests with a seed are sent again by "
                                        "the server, this one was not: send it again", type="replica_lost") from exc
                self.metrics.replica_retries.labels(deployment=deployment).inc()
                log.warning("a %s replica stopped under a seeded request; sending it again (%d)", deployment,
                            attempt + 1)
                await asyncio.sleep(self.backoff_seconds * 2 ** attempt)
        raise AssertionError("unreachable")

    async def _rest(self, deployment: str, replies) -> AsyncIterator[bytes]:
        try:
            async for chunk in replies:
                yield chunk
        except self.lost:
            self.metrics.replica_lost.labels(deployment=deployment).inc()
            message = f"the {deployment} replica streaming this answer stopped; send the request again"
            yield f"event: error\r\ndata: {error_body('replica_lost', message)}\r\n\r\n".encode()

    async def collect(self, handle, path: str) -> tuple[int, dict]:
        """GET `path` on one replica of a deployment: its status and JSON body."""
        whole = await handle.answer.remote({"method": "GET", "path": path, "headers": [], "body": b""})
        return whole["status"], json.loads(whole["body"] or b"{}")


def without_hop_by_hop(headers: list[tuple[str, str]]) -> dict:
    return {k: v for k, v in headers if k not in HOP_BY_HOP}


def create_front(image_handles: dict, chat_handle, settings: Settings | None = None,
                 targets=None) -> FastAPI:
    """The front's app. `targets`: an async callable listing every replica's metrics target."""
    settings = settings or Settings()
    metrics = Metrics()
    front = Front(image_handles, chat_handle, metrics)
    app = FastAPI(title="Loopstack", version=__version__)
    app.state.front = front
    install_middleware(app, settings, metrics)
    # the same schema as one server's: the paths and bodies are the same, only where they run differs
    app.openapi_schema = create_app(settings).openapi()

    async def body_of(request: Request) -> tuple[bytes, dict]:
        body = await request.body()
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        return body, parsed if isinstance(parsed, dict) else {}

    async def images(request: Request) -> Response:
        body, fields = await body_of(request)
        model = fields.get("model")
        if isinstance(model, str) and model in image_handles:
            name = model
        elif isinstance(model, str) and model.strip():
            raise ApiError(404, f"unknown image model {model!r}; serving: {sorted(image_handles)}", "model")
        elif image_handles:
            name = next(iter(image_handles))  # no usable model: that replica answers the validation error
        else:
            raise ApiError(404, "this deployment serves no image model", "model")
        return await front.forward(f"images-{name}", image_handles[name], request, body,
                                   idempotent=fields.get("seed") is not None, stream=fields.get("stream") is True)

    async def chat(request: Request) -> Response:
        if chat_handle is None:
            raise ApiError(404, "this deployment serves no chat model", "model")
        body, fields = await body_of(request)
        return await front.forward("chat", chat_handle, request, body, idempotent=fields.get("seed") is not None,
                                   stream=fields.get("stream") is True)

    for path in ("/generate-image", "/v1/images/generations"):
        app.add_api_route(path, images, methods=["POST"])
    for path in ("/chat", "/v1/chat/completions"):
        app.add_api_route(path, chat, methods=["POST"])

    @app.get("/livez")
    async def livez() -> dict:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> Response:
        """Ready once every deployment has a replica that serves; each deployment's readiness by name."""
        answers = await asyncio.gather(*[front.collect(h, "/readyz") for h in front.deployments().values()])
        per_deployment = {name: body for name, (_, body) in zip(front.deployments(), answers)}
        if not all(status == 200 for status, _ in answers):
            waiting = [name for name, (status, _) in zip(front.deployments(), answers) if status != 200]
            raise ApiError(503, f"not serving yet: {', '.join(waiting)}")
        serving = sorted({m for body in per_deployment.values() for m in body.get("serving", [])})
        return JSONResponse({"status": "ready", "serving": serving, "deployments": per_deployment})

    @app.get("/v1/models")
    async def models() -> Response:
        answers = await asyncio.gather(*[front.collect(h, "/v1/models") for h in front.deployments().values()])
        cards = [card for status, body in answers if status == 200 for card in body.get("data", [])]
        builds = [body.get("build") for status, body in answers if status == 200 and body.get("build")]
        return JSONResponse({"object": "list", "data": cards, "build": builds[0] if builds else None})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/metrics/targets")
    async def metrics_targets() -> list:
        """Prometheus HTTP service discovery: every replica's (and front's) metrics address, labelled."""
        return await targets() if targets is not None else []

    metrics.preset_endpoints([r.path for r in app.routes if hasattr(r, "methods")] + ["unmatched"])
    return app
