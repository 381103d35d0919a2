"""The Ray Serve application: `serve run deploy/ray/serve.yaml` (or `serve run
server.distributed.app:build`), one front and a deployment per image model and one for chat.

The builder reads the built manifest (the template while nothing is built) to name the image
deployments `images-<model>`; the config file sets each one's replicas, autoscaling bounds on
ongoing requests and resources by that name. Arguments (`args:` in the config, or
`serve run ... key=value`):
- `settings`: Loopstack settings for every process (as `LOOPSTACK_*` would set them), e.g.
  `{"artifact_root": "/models", "torch_threads": 1}`; the environment applies too.
- `image_models`: the image models to deploy (default: every one in the manifest); `chat`: whether
  to deploy the chat model (default: when the manifest has one).
- `options`: Serve options by deployment name, e.g. `{"images-digits-dit": {"num_replicas": 2}}`,
  for a start from Python; a config file's `deployments:` section does the same for `serve run`.
"""

from __future__ import annotations

import logging

from ray import serve

from server.distributed.front import create_front
from server.distributed.replica import ModelReplica, metrics_directory, publish_metrics
from server.manifest import ManifestError, load_manifest
from server.settings import Settings

log = logging.getLogger(__name__)

# A replica takes this many requests at once; the image batcher and the chat decoder group them.
MAX_ONGOING = 32


@serve.deployment(max_ongoing_requests=MAX_ONGOING, ray_actor_options={"num_cpus": 1})
class ImageModel(ModelReplica):
    """One image model (with its ILF module) per replica."""


@serve.deployment(max_ongoing_requests=MAX_ONGOING, ray_actor_options={"num_cpus": 1})
class ChatModel(ModelReplica):
    """The chat base with its whole stack library and router per replica: stacks are small next to the
    base, so any replica can serve any per-request mixture and routing needs no model affinity."""


@serve.deployment(max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Front:
    async def __init__(self, image_handles: dict, chat_handle=None, settings: dict | None = None,
                       publish: bool = True):
        async def targets() -> list:
            return await metrics_directory().listing.remote()

        self.front_app = create_front(image_handles, chat_handle, Settings(**(settings or {})), targets)
        if publish:
            replica = serve.get_replica_context().replica_id.unique_id
            await publish_metrics(self.front_app.state.front.metrics.registry, {"deployment": "front", "replica": replica})

    def __serve_build_asgi_app__(self):
        return self.front_app


def served_models(settings: Settings) -> tuple[list[str], bool]:
    """The manifest's image models and whether it has a chat model."""
    path = settings.manifests().current()
    try:
        manifest = load_manifest(path)
    except ManifestError as exc:
        raise SystemExit(f"cannot plan the deployments: {exc}") from exc
    return [m.name for m in manifest.image], manifest.chat is not None


def build(args: dict) -> serve.Application:
    """The application `serve run` starts (see the module's docstring for `args`)."""
    overrides = dict(args.get("settings") or {})
    # Serve hands a replica up to max_ongoing_requests at once and holds the rest until one is free;
    # the replica's own queue must fit them all, or it answers 429 while another replica idles.
    overrides.setdefault("image_queue_size", MAX_ONGOING)
    overrides.setdefault("chat_queue_size", MAX_ONGOING)
    settings = Settings(**overrides)
    all_images, has_chat = served_models(settings)
    images = args.get("image_models") or all_images
    if isinstance(images, str):
        images = [m for m in images.split(",") if m]
    if unknown := sorted(set(images) - set(all_images)):
        raise SystemExit(f"image_models: {unknown} are not in the manifest ({all_images})")
    chat = args.get("chat", has_chat)
    if isinstance(chat, str):
        chat = chat.lower() in ("1", "true", "yes")
    publish = bool(args.get("publish_metrics", True))
    if publish:
        metrics_directory()  # made here, before the replicas that register with it
    options = args.get("options") or {}

    def deployment(cls, name: str):
        return cls.options(name=name, **options.get(name, {}))

    image_handles = {name: deployment(ImageModel, f"images-{name}").bind(name, overrides, publish) for name in images}
    chat_handle = deployment(ChatModel, "chat").bind("chat", overrides, publish) if chat and has_chat else None
    return deployment(Front, "front").bind(image_handles, chat_handle, overrides, publish)
