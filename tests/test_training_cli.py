"""The committed template and `python -m training zoo placeholder`: what `make serve` starts from."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.manifest import load_manifest
from tests.conftest import REPO_TEMPLATE, make_settings
from training.__main__ import VERBS, main as training_main, parser
from training.artifacts import open_manifest


def test_the_template_names_the_embedded_zoo_and_nothing_a_build_records():
    template = load_manifest(REPO_TEMPLATE)
    assert [m.name for m in template.image] == ["digits-dit", "digits-pixart"]
    assert template.chat.base.name == "smollm2-135m-instruct" and template.chat.domains == [] and template.chat.router is None
    assert template.chat.base.precision("cpu") == "none" and template.chat.base.precision("cuda") == "nf4"
    sources = [m.source for m in template.image] + [template.image[1].text_encoder.source, template.chat.base.source]
    assert all(s.path and not s.files for s in sources)  # checksums belong to the built manifest
    assert not any(m.placeholder or m.ilf for m in template.image) and not template.chat.base.placeholder


def test_placeholder_zoo_writes_the_built_manifest_and_leaves_the_template_alone(tmp_path):
    template_text = REPO_TEMPLATE.read_text()
    root = tmp_path / "artifacts"
    training_main(["--artifacts", str(root), "zoo", "placeholder"])
    assert REPO_TEMPLATE.read_text() == template_text

    built = load_manifest(root / "weights_manifest.yaml")
    assert all(m.placeholder and m.source.files for m in built.image)
    assert built.chat.base.placeholder and built.chat.base.source.files
    stamp = (root / "weights_manifest.yaml").stat().st_mtime_ns
    training_main(["--artifacts", str(root), "zoo", "placeholder", "--if-missing"])
    assert (root / "weights_manifest.yaml").stat().st_mtime_ns == stamp  # already built: untouched

    with TestClient(create_app(make_settings(root / "weights_manifest.yaml"), load_in_background=False)) as c:
        assert c.get("/readyz").status_code == 200
        cards = c.get("/v1/models").json()["data"]
        assert {m["id"] for m in cards if m["route"] is None} == {"digits-dit", "digits-pixart", "smollm2-135m-instruct"}
        assert all(m["placeholder"] for m in cards)
        image = c.post("/generate-image", json={"model": "digits-pixart", "prompt": "a handwritten seven",
                                               "steps": 2})
        assert image.status_code == 200 and image.json()["placeholder"] is True
        chat = c.post("/chat", json={"prompt": "hi", "max_tokens": 3})
        assert chat.status_code == 200 and chat.json()["placeholder"] is True
        trace = chat.json()["trace"]  # the template's base has no stacks yet: the trace says so
        assert trace["domains_applied"] == {} and trace["reason"].startswith("no Brainstacks domains are loaded")


@pytest.mark.parametrize("words", list(VERBS), ids=" ".join)
def test_every_verb_runs_its_own_function_with_its_flags_defaults(words):
    _, run, flags = VERBS[words]
    required = [f"--{names[0].lstrip('-')}" for names, options in flags if options.get("required")]
    positional = [names[0] for names, _ in flags if not names[0].startswith("-")]
    if required or positional:
        with pytest.raises(SystemExit):  # a required flag or argument left out is refused
            parser().parse_args(list(words))
    args = parser().parse_args(list(words) + ["digits-dit"] * len(positional)
                               + [a for flag in required for a in (flag, "digits-dit")])
    assert args.run is run  # the verb dispatches to its own function, not another verb's
    for names, options in flags:
        if "default" in options or options.get("action") == "store_true":
            dest = names[0].lstrip("-").replace("-", "_")
            assert getattr(args, dest) == options.get("default", False), (words, dest)


def test_zoo_all_records_each_step_and_resumes_after_an_interruption(tmp_path, monkeypatch):
    from training.zoo import build

    ran = []
    interrupt = {"chat zoo": True}

    def step(name):
        def run(manifests):
            ran.append(name)
            if interrupt.pop(name, False):
                raise KeyboardInterrupt  # make serve stopped mid-step
            return name != "placeholders"  # placeholders were already there
        return name, run

    monkeypatch.setattr(build, "steps",
                        lambda micro, device: [step(n) for n in ("placeholders", "image models", "chat zoo")])
    manifests = open_manifest(tmp_path / "artifacts")
    with pytest.raises(KeyboardInterrupt):
        build.build_zoo(manifests)
    state = json.loads((tmp_path / "artifacts" / "build.json").read_text())
    assert state["state"] == "stopped" and [s["state"] for s in state["steps"]] == ["already built", "done", "running"]
    state = build.build_zoo(manifests)  # the real steps skip what is built; these count their calls
    assert state["state"] == "done" and ran == ["placeholders", "image models", "chat zoo"] * 2
    assert all(s["seconds"] is not None for s in state["steps"])


def test_a_sigterm_to_the_server_stops_its_background_build(tmp_path):
    """`python -m server --build-zoo` builds in a process of its own; the server ending, however it
    ends (here a SIGTERM, as `docker stop` sends), ends the build too (uvicorn re-raises the signal
    after its drain, so no `finally` of the server's runs)."""
    import os
    import re
    import signal
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = os.environ | {"LOOPSTACK_ARTIFACT_ROOT": str(tmp_path / "artifacts"), "LOOPSTACK_WATCH": "false"}
    server = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port), "--build-zoo"], env=env,
                              stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
    try:
        build = None
        for line in server.stderr:
            if match := re.search(r"in the background \(pid (\d+)\)", line):
                build = int(match[1])
                break
        assert build is not None
        time.sleep(2)  # the build is under way
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()

    def running(pid: int) -> bool:
        try:
            return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()  # a zombie has ended
        except FileNotFoundError:
            return False

    deadline = time.time() + 20
    while running(build) and time.time() < deadline:
        time.sleep(0.2)
    assert not running(build)
