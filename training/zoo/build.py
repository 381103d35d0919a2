"""Build the embedded default models and record them, with checksums, in the manifest."""

from __future__ import annotations

import logging
from pathlib import Path

from server.manifest import (
    ChatBase, ChatSection, ImageModel, Manifest, Source, TextEncoder, load_manifest, write_manifest,
)
from server.artifacts import atomic_folder, folder_digests
from training.zoo import placeholders as ph

log = logging.getLogger(__name__)

ZOO = "artifacts/zoo"


def _recorded(source: Source, manifest_dir: Path) -> Source:
    """The same source with the sha256 of every file the build wrote."""
    return source.model_copy(update={"files": folder_digests(manifest_dir / source.path)})


def default_manifest() -> Manifest:
    """The embedded zoo as the committed manifest names it (no checksums: those are the build's)."""
    return Manifest(
        version=1,
        image=[
            ImageModel(name="digits-dit", kind="dit", source=Source(path=f"{ZOO}/digits-dit"),
                       labels=ph.DIGIT_NAMES, default_steps=20, default_guidance_scale=1.5),
            ImageModel(name="digits-pixart", kind="pixart", source=Source(path=f"{ZOO}/digits-pixart"),
                       text_encoder=TextEncoder(kind="minilm", source=Source(path=f"{ZOO}/minilm"), max_length=32),
                       default_steps=20, default_guidance_scale=3.0),
        ],
        chat=ChatSection(base=ChatBase(name="zoo-lm", source=Source(path=f"{ZOO}/lm"), quantization="nf4")),
    )


def _needs_build(source: Source, manifest_dir: Path, if_missing: bool) -> bool:
    if source.path is None:  # a hub model: nothing of ours to build
        return False
    return not (if_missing and source.files and (manifest_dir / source.path).is_dir())


def build_placeholder_zoo(manifest_path: Path, if_missing: bool = False) -> bool:
    """Untrained stand-ins so the service starts; with if_missing, only for entries not built yet.
    Returns False when nothing was built."""
    manifest_path = Path(manifest_path)
    base = manifest_path.resolve().parent
    manifest = load_manifest(manifest_path) if manifest_path.exists() else default_manifest()
    built_any = False

    image = []
    for entry in manifest.image:
        if not _needs_build(entry.source, base, if_missing):
            image.append(entry)
            continue
        built_any = True
        with atomic_folder(base / entry.source.path) as tmp:
            if entry.kind == "dit":
                ph.build_dit(tmp, num_classes=len(entry.labels or ph.DIGIT_NAMES))
            else:
                ph.build_pixart(tmp, caption_channels=384)
        update = {"source": _recorded(entry.source, base), "placeholder": True}
        if entry.text_encoder is not None and entry.text_encoder.source.path is not None:
            with atomic_folder(base / entry.text_encoder.source.path) as tmp:
                ph.copy_minilm(tmp)
            update["text_encoder"] = entry.text_encoder.model_copy(
                update={"source": _recorded(entry.text_encoder.source, base)}
            )
        image.append(entry.model_copy(update=update))

    chat = manifest.chat
    if chat is not None and _needs_build(chat.base.source, base, if_missing):
        built_any = True
        with atomic_folder(base / chat.base.source.path) as tmp:
            ph.build_llama(tmp, hidden=128, layers=2, heads=4)
        base_entry = chat.base.model_copy(update={"source": _recorded(chat.base.source, base), "placeholder": True})
        chat = chat.model_copy(update={"base": base_entry})

    if built_any:
        write_manifest(manifest.model_copy(update={"image": image, "chat": chat}), manifest_path)
    return built_any
