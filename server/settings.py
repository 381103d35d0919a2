"""Every server knob, read from the environment (prefix LOOPSTACK_), or from an env file named by
`python -m server --env-file` (no file is read unless named: a .env lying in whatever directory the
server starts from is not configuration)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.manifest import BuiltManifest

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOOPSTACK_", env_file=None, extra="ignore")

    template: Path = Field(
        REPO_ROOT / "weights_manifest.yaml", description="What to build and serve: the committed template."
    )
    artifact_root: Path = Field(
        REPO_ROOT / "artifacts", description="Folder every artifact lives in; manifest paths are relative to it."
    )
    manifest: Path | None = Field(
        None, description="The built manifest (checksums of what was built); default: <artifact_root>/weights_manifest.yaml."
    )
    adapter_root: Path | None = Field(
        None, description="Folder whose PEFT adapters POST /v1/load_lora_adapter may load (lora_path is relative "
                          "to it, and nothing outside it loads); inside the artifact root. Default: <artifact_root>/adapters.")
    max_loaded_adapters: int = Field(0, ge=0, description=(
        "PEFT adapters whose weights stay in memory; the rest load at their next use (0: every one)."))
    allow_network: bool = Field(
        False, description="Let hub ids in the manifest download. Off by default: nothing is fetched."
    )
    admin_token: SecretStr | None = Field(
        None, description="Bearer token of the /admin routes; without one they are off."
    )
    serve_models: str = Field("", description=(
        'Comma-separated manifest models this process serves (image model names, and "chat" for the chat '
        'model); empty: all. A scale-out replica serves one.'))
    watch: bool = Field(True, description="Reload by itself when the built manifest or a loaded file changes.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads; default: torch's choice.")

    # Request bounds: every field a client sends is checked against these.
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    max_steps: int = Field(200, ge=1)
    max_images_per_request: int = Field(8, ge=1)
    max_image_side: int = Field(1024, ge=8)
    max_guidance_scale: float = Field(20.0, gt=0)
    max_prompt_chars: int = Field(2000, ge=1)
    max_chat_messages: int = Field(32, ge=1)
    max_prompt_tokens: int = Field(4096, ge=1, description=(
        "A chat prompt longer than this, in tokens as the model's template renders it, is a 422"))
    max_new_tokens: int = Field(256, ge=1)
    default_max_tokens: int = Field(256, ge=1, description=(
        "max_tokens of a chat request that gives none (three operations worked in columns run to ~130 tokens)"))

    # The image engine runs one job at a time, the chat engine decodes up to chat_max_batch requests
    # together; this many more may wait before clients get 429.
    image_queue_size: int = Field(16, ge=0)
    chat_queue_size: int = Field(16, ge=0)
    image_max_batch: int = Field(16, ge=1, description="images of concurrent requests sampled together, at most")
    image_first_block_cache: float | None = Field(None, ge=0, le=1, description=(
        "FirstBlockCache threshold for image requests that do not give one (0 or unset: off)"))
    image_batch_window_ms: float = Field(5.0, ge=0, description="how long a batch's first request waits for "
                                                               "compatible ones to join")
    chat_max_batch: int = Field(8, ge=1, description="chat requests decoded together, one step for all")
    chat_prefill_tokens: int = Field(128, ge=1, description=(
        "prompt tokens the chat engine reads between two decode steps, at most (long prompts in parts)"))
    chat_kv_cache_tokens: int = Field(34816, ge=1, description=(
        "KV-cache tokens the chat engine's admitted rows may reserve, prompt and max_tokens each (default: "
        "8 rows of the longest prompt and answer); a request that does not fit waits in the queue"))
    chat_timeout_seconds: float = Field(300.0, gt=0, description="a chat answer not done by then gets 504")
    image_timeout_seconds: float = Field(300.0, gt=0, description="images not done by then stop (504); "
                                                                  "a request's own timeout may be shorter")
    retry_after_seconds: int = Field(2, ge=1, description="Retry-After of a full queue before any job has been timed")

    # Connections: slow or idle clients do not hold the server.
    header_timeout_seconds: float = Field(10.0, gt=0, description="a request line and headers not all received "
                                                                  "by then close the connection")
    body_timeout_seconds: float = Field(30.0, gt=0, description="a body not all received by then gets 408")
    keep_alive_seconds: int = Field(5, ge=1, description="an idle keep-alive connection closes after this")
    shutdown_drain_seconds: int = Field(30, ge=1, description="on SIGTERM, requests in flight get this long to "
                                                             "finish before they are cut")

    # Access: keys and limits on the public routes (images, chat, OpenAI's); health, metrics and the
    # model list stay open.
    api_keys: SecretStr | None = Field(None, description="Comma-separated API keys (Bearer); none: open to all.")
    rate_limit_per_minute: int = Field(0, ge=0, description="Requests a minute per API key (0: no limit).")
    cors_origins: str = Field("", description='Comma-separated origins browsers may call from ("*": any); none: CORS off.')
    log_format: Literal["text", "json"] = "text"

    @property
    def api_key_list(self) -> list[str]:
        return [k.strip() for k in (self.api_keys.get_secret_value() if self.api_keys else "").split(",") if k.strip()]

    def serves(self, model: str, kind: str) -> bool:
        """Whether this process serves the manifest's image model `model` (kind "image") or its chat model."""
        wanted = {m.strip() for m in self.serve_models.split(",") if m.strip()}
        return not wanted or (model if kind == "image" else "chat") in wanted

    def manifests(self) -> BuiltManifest:
        root = self.artifact_root.resolve()
        return BuiltManifest(self.template, self.manifest or root / "weights_manifest.yaml", root)

    def adapters_folder(self) -> Path:
        return (self.adapter_root or self.artifact_root / "adapters").resolve()

    def torch_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
