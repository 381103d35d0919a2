"""vLLM's run-time adapter routes, with its names and bodies (its clients and docs apply), behind the
admin token: POST /v1/load_lora_adapter {"lora_name", "lora_path"} and POST /v1/unload_lora_adapter
{"lora_name"}. Off, like the admin routes, without LOOPSTACK_ADMIN_TOKEN."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from server.api.dependencies import Services, admin, json_body, services
from server.chat.adapter_admin import load_at_run_time, unload_at_run_time

router = APIRouter(tags=["adapters"], dependencies=[Depends(admin)])


class LoadLoraAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=64, description="The adapter's name in routes and model ids.")
    lora_path: str = Field(min_length=1, max_length=1024, description="Its PEFT folder, relative to the adapter root.")
    load_inplace: bool = Field(False, description="Replace an adapter of this name (it serves on if the new one is refused).")


class UnloadLoraAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=64)
    lora_int_id: int | None = Field(None, description="Accepted for vLLM's clients; names identify adapters here.")


# vLLM answers in plain text; errors come in the one JSON shape, as everywhere
PLAIN_TEXT = {200: {"description": "Success, in vLLM's words", "content": {"text/plain": {"schema": {"type": "string"}}}}}


@router.post("/v1/load_lora_adapter", responses=PLAIN_TEXT,
             dependencies=[Depends(json_body)])
async def load_lora_adapter(body: LoadLoraAdapter, svc: Services = Depends(services)) -> PlainTextResponse:
    """Verify, warm and serve a PEFT LoRA adapter; it is recorded in the built manifest (kept across restarts)."""
    return PlainTextResponse(await run_in_threadpool(load_at_run_time, svc.settings, svc.registry, body.lora_name,
                                                     body.lora_path, body.load_inplace))


@router.post("/v1/unload_lora_adapter", responses=PLAIN_TEXT,
             dependencies=[Depends(json_body)])
async def unload_lora_adapter(body: UnloadLoraAdapter, svc: Services = Depends(services)) -> PlainTextResponse:
    """Stop serving an adapter; requests already using it finish with it."""
    return PlainTextResponse(await run_in_threadpool(unload_at_run_time, svc.settings, svc.registry, body.lora_name))
