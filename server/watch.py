"""Hot-load: reload when the built manifest, or a file that a loaded entry reads, changes on disk.

`watchfiles` (inotify on Linux) reports changes under the artifact root; a batch that touches the
built manifest or a loaded file triggers one reload pass. Training writes atomically (a temporary
file renamed into place), so a batch never shows half of a file; the reload verifies checksums
anyway, and a file that is changed under a serving model is refused while the old version serves.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from server.registry import Registry

log = logging.getLogger(__name__)

DEBOUNCE_MS = 300  # changes within this window make one batch (one reload)
# A build swaps a model's files in, then records their checksums in the manifest: a change to loaded
# files alone waits this long for the manifest to follow, so a build in progress is not reported as
# a corrupt file; a file changed by anything else is verified (and refused) after it.
FILES_ONLY_GRACE_S = 3.0


def watch_artifacts(registry: Registry, stop: threading.Event) -> None:
    """Runs until `stop` is set (in a thread of its own)."""
    from watchfiles import watch

    manifests = registry.settings.manifests()
    manifests.root.mkdir(parents=True, exist_ok=True)
    folders = {manifests.root, manifests.path.parent.resolve()}
    log.info("watching %s for new artifacts", ", ".join(str(f) for f in sorted(folders)))
    for changes in watch(*folders, stop_event=stop, debounce=DEBOUNCE_MS, rust_timeout=1000):
        changed = {Path(path).resolve() for _, path in changes}
        manifest = manifests.path.resolve()
        if manifest not in changed and changed & {p.resolve() for p in registry.watched_files()}:
            stop.wait(FILES_ONLY_GRACE_S)
        elif manifest not in changed:
            continue
        if not stop.is_set():
            try:
                registry.reload("watch")
            except Exception:  # a reload never takes the watcher (or the server) down
                log.exception("reload after a change on disk failed")
