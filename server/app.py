"""HTTP routes: validate, delegate to an engine, shape the answer. No model code here."""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server import __version__
from server.chat import engine as chat_engine
from server.engine import Engine
from server.errors import ApiError, BodySizeLimit, install_error_handlers
from server.imaging import engine as image_engine
from server.metrics import Metrics
from server.registry import ModelSet, Registry
from server.schemas import ChatRequest, ChatResponse, ErrorBody, ImageRequest, ImageResponse, ModelCard, ModelList, Usage
from server.settings import Settings

log = logging.getLogger(__name__)

ERRORS = {status: {"model": ErrorBody} for status in (400, 404, 413, 422, 429, 503)}


def create_app(settings: Settings | None = None, load_in_background: bool = True) -> FastAPI:
    settings = settings or Settings()
    if not settings.allow_network:
        os.environ["HF_HUB_OFFLINE"] = "1"  # nothing is fetched unless an operator allows it
    metrics = Metrics()
    registry = Registry(settings, metrics)
    engines = {
        "image": Engine("image", settings.image_queue_size, settings.retry_after_seconds, metrics.queue_depth),
        "chat": Engine("chat", settings.chat_queue_size, settings.retry_after_seconds, metrics.queue_depth),
    }

    def initial_load() -> None:
        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)
        try:
            registry.load()
            log.info("models loaded; ready")
        except Exception:
            log.exception("loading the manifest failed; /readyz stays 503")

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if load_in_background:
            threading.Thread(target=initial_load, name="initial-load", daemon=True).start()
        else:
            initial_load()
        yield
        for engine in engines.values():
            engine.shutdown()

    app = FastAPI(title="Loopstack", version=__version__, lifespan=lifespan, responses=ERRORS)
    app.state.settings, app.state.metrics, app.state.registry, app.state.engines = settings, metrics, registry, engines
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        endpoint = route.path if route is not None else "unmatched"
        metrics.requests.labels(endpoint=endpoint, status=str(response.status_code)).inc()
        metrics.request_duration.labels(endpoint=endpoint).observe(time.perf_counter() - start)
        return response

    def models_or_503() -> ModelSet:
        models = registry.current
        if models is None:
            raise ApiError(503, "models are still loading" if registry.last_error is None
                           else f"models failed to load: {registry.last_error}")
        return models

    @app.get("/livez", tags=["health"])
    async def livez() -> dict:
        return {"status": "alive"}

    @app.get("/readyz", tags=["health"], responses={503: {"model": ErrorBody}})
    async def readyz() -> dict:
        models = models_or_503()
        return {"status": "ready", "image_models": sorted(models.images),
                "chat_model": models.chat.name if models.chat else None}

    @app.get("/metrics", tags=["health"], response_class=PlainTextResponse)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList, tags=["models"])
    async def list_models() -> ModelList:
        models = models_or_503()
        cards = [
            ModelCard(
                id=b.name, kind=b.spec.kind, placeholder=b.spec.placeholder,
                details={"native_size": b.native_size, "stride": b.stride, "blocks": b.num_blocks,
                         "latent": b.vae is not None, "classes": b.class_names() if b.spec.kind == "dit" else None,
                         "default_steps": b.spec.default_steps,
                         "default_guidance_scale": b.spec.default_guidance_scale,
                         "ilf": None if b.ilf is None else {"steps": b.ilf.config.steps,
                                                            "scheduler": b.ilf.config.scheduler,
                                                            "blocks_per_step": b.ilf.config.blocks_per_step}},
            )
            for b in models.images.values()
        ]
        if models.chat is not None:
            section = models.manifest.chat
            cards.append(ModelCard(
                id=models.chat.name, kind="causal-lm", placeholder=section.base.placeholder,
                details={"quantization": section.base.quantization, "device": models.chat.device,
                         "domains": [d.name for d in section.domains], "router": section.router is not None},
            ))
        return ModelList(data=cards)

    @app.post(
        "/generate-image",
        response_model=ImageResponse,
        tags=["images"],
        responses={200: {"content": {"image/png": {}}, "description": "JSON, or the PNG itself"}},
    )
    async def generate_image(req: ImageRequest, request: Request):
        models = models_or_503()
        backbone = models.images.get(req.model)
        if backbone is None:
            raise ApiError(404, f"unknown image model {req.model!r}; known: {sorted(models.images)}", "model")
        job = image_engine.plan_job(req, backbone, settings)
        mode = job.mode
        result = await engines["image"].submit(image_engine.run_job, backbone, job)
        metrics.image_seconds.labels(model=backbone.name, mode=mode).observe(result.seconds)
        metrics.image_denoise_steps.labels(model=backbone.name, mode=mode).inc(result.steps * len(job.seeds))

        images = image_engine.to_pil(result.images)
        headers = {"X-Loopstack-Mode": mode, "X-Loopstack-Seed": str(job.seeds[0]),
                   "X-Loopstack-Steps": str(result.steps)}
        if req.response_format == "png" or "image/png" in request.headers.get("accept", ""):
            image = images[0] if len(images) == 1 else image_engine.row_of(images)
            return Response(image_engine.png_bytes(image), media_type="image/png", headers=headers)
        return JSONResponse(ImageResponse(
            model=backbone.name, mode=mode, scheduler=job.scheduler, steps=result.steps,
            block_evaluations=result.block_evaluations, guidance_scale=job.guidance_scale, seeds=job.seeds,
            width=job.width, height=job.height, seconds=result.seconds, placeholder=backbone.spec.placeholder,
            images=image_engine.b64_pngs(images),
        ).model_dump(), headers=headers)

    @app.post("/chat", response_model=ChatResponse, tags=["chat"])
    async def chat(req: ChatRequest) -> ChatResponse:
        models = models_or_503()
        if models.chat is None:
            raise ApiError(404, "this server has no chat model in its manifest", "model")
        job = chat_engine.plan_job(req, models.chat, settings)
        chat_engine.check_route(req.route, models.manifest.chat)
        submitted = time.perf_counter()
        plan, result = await engines["chat"].submit(chat_engine.route_and_generate, models.chat,
                                                    models.manifest.chat, job, req.route)
        trace = chat_engine.make_trace(req.route, plan, result, result.started - submitted)

        route_kind = req.route if isinstance(req.route, str) else "explicit"
        for domain, weight in plan.weights.items():
            metrics.chat_domain_applied.labels(domain=domain, route=route_kind).inc()
            metrics.chat_domain_weight.labels(domain=domain).observe(weight)
        for domain, probability in (plan.probabilities or {}).items():
            metrics.chat_router_probability.labels(domain=domain).observe(probability)
        metrics.chat_prompt_tokens.inc(result.prompt_tokens)
        metrics.chat_generation_tokens.inc(result.completion_tokens)
        if trace.time_to_first_token_seconds is not None:
            metrics.chat_ttft.observe(trace.time_to_first_token_seconds)
        for earlier, later in zip(result.token_times, result.token_times[1:]):
            metrics.chat_itl.observe(later - earlier)
        return ChatResponse(
            model=models.chat.name, text=result.text, finish_reason=result.finish_reason, seed=job.seed,
            placeholder=models.manifest.chat.base.placeholder,
            usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                        total_tokens=result.prompt_tokens + result.completion_tokens),
            trace=trace,
        )

    return app
