"""One single-process Loopstack app inside a Ray Serve replica, answering requests the front forwards.

The app is `create_app` as `python -m server` builds it, restricted by `serve_models` to the models
of its deployment: the same registry (it watches the built manifest and reloads by itself), engines,
batchers, validation and error shape. A forwarded request is run through the app's ASGI interface in
process, and what the app sends comes back as a stream: first the status and headers, then the body
in the chunks the app wrote (so server-sent events stream through the front as they are made).

Each replica also serves its own Prometheus metrics on a port of its own and lists it in the
`MetricsTargets` directory, which the front publishes for Prometheus' HTTP service discovery.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from contextlib import suppress
from typing import AsyncIterator

from server.app import create_app
from server.settings import Settings

log = logging.getLogger(__name__)

TARGETS_ACTOR = "loopstack-metrics-targets"
TARGETS_NAMESPACE = "loopstack"

# what the front sends: method, path, query string, headers (lower-case names), body
ForwardedRequest = dict


class MetricsTargets:
    """A directory (a named Ray actor) of where each replica serves its metrics, with its labels, in
    the shape of Prometheus' HTTP service discovery. Targets that no longer answer are dropped."""

    def __init__(self) -> None:
        self.targets: dict[str, dict] = {}

    def register(self, replica: str, address: str, labels: dict) -> None:
        self.targets[replica] = {"targets": [address], "labels": labels}

    def unregister(self, replica: str) -> None:
        self.targets.pop(replica, None)

    def listing(self) -> list[dict]:
        for replica, target in list(self.targets.items()):
            host, port = target["targets"][0].rsplit(":", 1)
            try:
                socket.create_connection((host, int(port)), timeout=0.5).close()
            except OSError:
                del self.targets[replica]  # its process is gone
        return list(self.targets.values())


def metrics_directory():
    """The directory's actor, made by whoever asks first (the application's builder); it outlives any
    one replica."""
    import ray

    actor = ray.remote(num_cpus=0)(MetricsTargets)
    return actor.options(name=TARGETS_ACTOR, namespace=TARGETS_NAMESPACE, lifetime="detached",
                         get_if_exists=True).remote()


async def publish_metrics(registry, labels: dict, attempts: int = 5):
    """Serve `registry` on a port of this process's own and list it in the directory; the server."""
    import ray
    from prometheus_client import start_http_server

    server, _ = start_http_server(0, addr="0.0.0.0", registry=registry)
    address = f"{ray.util.get_node_ip_address()}:{server.server_port}"
    for attempt in range(attempts):  # replicas starting together may race to make the directory
        try:
            await metrics_directory().register.remote(labels["replica"], address, labels)
            break
        except ray.exceptions.RayError:
            if attempt == attempts - 1:
                log.exception("this replica's metrics at %s are not listed for Prometheus", address)
            await asyncio.sleep(0.5)
    return server


class ModelReplica:
    """The body of an image or chat deployment: `forward` answers one forwarded request."""

    async def __init__(self, serve_models: str, settings: dict | None = None, publish: bool = True):
        from ray import serve

        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        self.deployment = context.deployment
        self.settings = Settings(**(settings or {}), serve_models=serve_models)
        self.app = create_app(self.settings)
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()  # starts the first load and the manifest watcher
        self._metrics_server = None
        if publish:
            self._metrics_server = await publish_metrics(self.app.state.services.metrics.registry,
                                                         {"deployment": self.deployment, "replica": self.replica})

    async def forward(self, request: ForwardedRequest) -> AsyncIterator[dict | bytes]:
        """Yields {"status", "headers"} once, then the body's chunks (bytes)."""
        sent: asyncio.Queue = asyncio.Queue()
        body_read = False
        gone = asyncio.Event()  # set when the front stops listening: the app sees a disconnect

        async def receive() -> dict:
            nonlocal body_read
            if not body_read:
                body_read = True
                return {"type": "http.request", "body": request["body"], "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "http",
            "method": request["method"], "path": request["path"], "raw_path": request["path"].encode(),
            "query_string": request.get("query", "").encode(), "root_path": "",
            "headers": [(k.encode(), v.encode()) for k, v in request["headers"]],
            "client": tuple(request.get("client") or ("front", 0)), "server": ("replica", 0),
        }
        app_task = asyncio.ensure_future(self.app(scope, receive, sent.put))
        try:
            while True:
                getter = asyncio.ensure_future(sent.get())
                await asyncio.wait({getter, app_task}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():  # the app returned without a message left: nothing more comes
                    getter.cancel()
                    app_task.result()
                    return
                message = getter.result()
                if message["type"] == "http.response.start":
                    headers = [(k.decode(), v.decode()) for k, v in message["headers"]]
                    yield {"status": message["status"], "headers": headers + [("x-loopstack-replica", self.replica)]}
                elif message["type"] == "http.response.body":
                    if message.get("body"):
                        yield message["body"]
                    if not message.get("more_body", False):
                        return
        finally:
            gone.set()
            if not app_task.done():
                with suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                    await asyncio.wait_for(app_task, timeout=5)

    async def answer(self, request: ForwardedRequest) -> dict:
        """The whole answer in one reply ({"status", "headers", "body"}): one message over Ray instead of
        one per chunk, for answers that are not streams."""
        replies = [reply async for reply in self.forward(request)]
        return replies[0] | {"body": b"".join(replies[1:])}

    async def __del__(self) -> None:
        """Serve calls this when it stops the replica: the engines stop, the metrics target goes."""
        if getattr(self, "_metrics_server", None) is not None:
            with suppress(Exception):
                self._metrics_server.shutdown()
                metrics_directory().unregister.remote(self.replica)
        with suppress(Exception):
            await self._lifespan.__aexit__(None, None, None)
