"""`python -m training zoo all`: the whole embedded zoo, step by step, each step resumable.

Placeholders first (seconds, so a server can start), then the chat base (SmolLM2, converted from
its packaged GGUF in under a minute, so `/chat` answers with a real LLM early), the image models,
their ILF modules, and last the chat base's Brainstacks (the domains' stacks, one domain at a time,
then the router). Every artifact is recorded in the built manifest as soon as it is written, so a
server watching the manifest serves it at once, and an interrupted build resumes where it stopped
(each step skips what is already built). The build's state goes to `build.json` in the artifact
root, where the server shows it in /v1/models.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Callable

from server.artifacts import atomic_write_bytes
from server.manifest import BuiltManifest


def steps(micro: bool, device: str = "cpu") -> list[tuple[str, Callable[[BuiltManifest], object]]]:
    from training.ilf_distill import ILFTraining, MICRO_ILF, train_ilf
    from training.zoo.chat import MICRO_CHAT, ChatZooRecipe, build_chat_zoo
    from training.zoo.chat_base import build_packaged_base
    from training.zoo.images import FULL, MICRO, build_image_zoo
    from training.zoo.placeholders import build_placeholder_zoo

    ilf = MICRO_ILF if micro else ILFTraining()
    return [
        ("placeholders", lambda m: build_placeholder_zoo(m, if_missing=True)),
        ("chat base", lambda m: build_packaged_base(m, if_missing=True)),
        ("image models", lambda m: build_image_zoo(m, MICRO if micro else FULL, if_missing=True)),
        ("ilf digits-dit", lambda m: train_ilf(m, "digits-dit", ilf, if_missing=True)),
        ("ilf digits-pixart", lambda m: train_ilf(m, "digits-pixart", ilf, if_missing=True)),
        ("chat stacks", lambda m: build_chat_zoo(m, MICRO_CHAT if micro else ChatZooRecipe(), if_missing=True,
                                                 device=device)),
    ]


def build_zoo(manifests: BuiltManifest, micro: bool = False, device: str = "cpu") -> dict:
    """Run every step; returns (and keeps in build.json) each step's state and seconds. SIGINT and
    SIGTERM stop it cleanly (its state says "stopped"), also where a launcher left SIGINT ignored."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return _run_steps(manifests, steps(micro, device))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_steps(manifests: BuiltManifest, plan: list) -> dict:
    state = {"state": "running", "pid": os.getpid(), "started": time.time(),
             "steps": [{"name": name, "state": "pending", "seconds": None} for name, _ in plan]}
    path = manifests.root / "build.json"
    try:
        for index, (name, run) in enumerate(plan):
            state["steps"][index]["state"] = "running"
            state["current"] = f"{name} (step {index + 1} of {len(plan)})"
            _write(path, state)
            print(f"zoo build: {state['current']}", flush=True)
            began = time.perf_counter()
            built = run(manifests)
            state["steps"][index].update(state="done" if built else "already built",
                                         seconds=round(time.perf_counter() - began, 1))
        state.update(state="done", current=None)
    except BaseException as exc:  # interrupted or failed: say so, the next run resumes
        state.update(state="stopped" if isinstance(exc, KeyboardInterrupt) else "failed", error=repr(exc))
        raise
    finally:
        state["finished"] = time.time()
        _write(path, state)
    return state


def _write(path: Path, state: dict) -> None:
    atomic_write_bytes(path, json.dumps(state, indent=1).encode())
