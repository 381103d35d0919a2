"""`training zoo placeholder`: untrained stand-ins for the template's entries, built in seconds and
recorded with checksums (and `placeholder: true`) in the built manifest, so the service starts
before the zoo is trained; the server warns loudly that their outputs are noise."""

from __future__ import annotations

from server.artifacts import atomic_folder
from server.manifest import BuiltManifest, Source
from training.data.digits import DIGIT_NAMES
from training.zoo.architectures import build_dit, build_pixart, copy_minilm
from training.zoo.language import build_llama


def _needs_build(source: Source, manifests: BuiltManifest, if_missing: bool) -> bool:
    if source.path is None:  # a hub model: nothing of ours to build
        return False
    return not (if_missing and source.files and manifests.file(source.path).is_dir())


def build_placeholder_zoo(manifests: BuiltManifest, if_missing: bool = False) -> bool:
    """Untrained stand-ins so the service starts; with if_missing, only for entries not built yet.
    Returns False when nothing was built."""
    manifest = manifests.read()
    built_any = False

    image = []
    for entry in manifest.image:
        if not _needs_build(entry.source, manifests, if_missing):
            image.append(entry)
            continue
        built_any = True
        with atomic_folder(manifests.file(entry.source.path)) as tmp:
            if entry.kind == "dit":
                build_dit(tmp, num_classes=len(entry.labels or DIGIT_NAMES))
            else:
                build_pixart(tmp, caption_channels=384)
        update = {"source": manifests.recorded(entry.source), "placeholder": True}
        if entry.text_encoder is not None and entry.text_encoder.source.path is not None:
            with atomic_folder(manifests.file(entry.text_encoder.source.path)) as tmp:
                copy_minilm(tmp)
            update["text_encoder"] = entry.text_encoder.model_copy(
                update={"source": manifests.recorded(entry.text_encoder.source)}
            )
        image.append(entry.model_copy(update=update))

    chat = manifest.chat
    if chat is not None and _needs_build(chat.base.source, manifests, if_missing):
        built_any = True
        with atomic_folder(manifests.file(chat.base.source.path)) as tmp:
            build_llama(tmp, hidden=128, layers=2, heads=4)
        base_entry = chat.base.model_copy(update={"source": manifests.recorded(chat.base.source), "placeholder": True})
        chat = chat.model_copy(update={"base": base_entry})

    if built_any:
        manifests.write(manifest.model_copy(update={"image": image, "chat": chat}))
    return built_any
