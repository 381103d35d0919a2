"""Per-entry loading and hot-load: admin routes, the watcher, reloads under load, faults on disk."""

from __future__ import annotations

import gc
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from server.app import create_app
from server.artifacts import load_with_config, save_with_config, write_atomically
from server.chat.decoding import ChatJob, generate
from server.chat.model import load_chat, load_chat_base
from server.chat.moe_lora import MoELoRAConfig
from server.chat.stack_files import save_stack
from server.loaders import DomainStacksLoader
from server.manifest import Artifact, ArtifactResolver, Domain, load_manifest, write_manifest
from server.metrics import Metrics
from server.registry import Registry
from tests.conftest import assert_error_shape, make_settings, zoo_manifest
from training.brainstacks.stacks import add_stack, freeze, stack_modules

PROMPT = "Compute 23 + 45 - 12."
TOKEN = "s3cret"


def write_stack(path: Path, seed: int, root: Path) -> str:
    """A random, non-zero math stack for the tiny base; returns its sha256."""
    base = load_chat_base(zoo_manifest(root).chat.base, ArtifactResolver(root), "cpu").model
    config = MoELoRAConfig(experts=4, rank=4, alpha=4.0)
    stacks = add_stack(base, "math", config, seed=seed)
    torch.manual_seed(seed)
    for stack in stacks:
        torch.nn.init.normal_(stack.lora_B, std=0.5)
    freeze(stacks)
    return write_atomically(path, lambda tmp: save_stack(tmp, stack_modules(base, "math", 0), "math", config))


@pytest.fixture()
def served(zoo_dir, tmp_path):
    """A copy of the tiny zoo with two math stacks (A, B) on disk; the manifest serves A."""
    shutil.copytree(zoo_dir / "artifacts", tmp_path / "artifacts")
    sums = {name: write_stack(tmp_path / "artifacts" / "stacks" / f"{name}.safetensors", seed, tmp_path)
            for name, seed in (("a", 1), ("b", 2))}
    path = tmp_path / "weights_manifest.yaml"
    write_manifest(with_math_stack(zoo_manifest(tmp_path), "a", sums["a"]), path)
    return path, sums


def with_math_stack(manifest, name: str, sha: str | None):
    domains = [Domain(name="chat", order=0),
               Domain(name="math", order=1, stacks=[Artifact(path=f"artifacts/stacks/{name}.safetensors", sha256=sha)])]
    return manifest.model_copy(update={"chat": manifest.chat.model_copy(update={"domains": domains})})


def expected_text(manifest_path: Path, stack: str, sha: str) -> str:
    root = manifest_path.parent
    chat = load_chat(with_math_stack(zoo_manifest(root), stack, sha).chat, ArtifactResolver(root), "cpu")
    job = ChatJob([{"role": "user", "content": PROMPT}], 4, 0.0, 1.0, 0)
    return generate(chat, job, {"math": 1.0}).text


def test_admin_routes_are_off_without_a_token_and_need_it_with_one(manifest_path):
    with TestClient(create_app(make_settings(manifest_path), load_in_background=False)) as c:
        assert_error_shape(c.get("/admin/status"), 404)
    app = create_app(make_settings(manifest_path, admin_token=TOKEN), load_in_background=False)
    with TestClient(app) as c:
        assert_error_shape(c.get("/admin/status"), 401)
        assert_error_shape(c.post("/admin/reload", headers={"Authorization": "Bearer nope"}), 403)
        assert_error_shape(c.get("/admin/status", headers={"Authorization": f"Basic {TOKEN}"}), 401)
        status = c.get("/admin/status", headers={"Authorization": f"Bearer {TOKEN}"}).json()
        assert {e["entry"] for e in status["entries"]} >= {"tiny-dit", "tiny-lm", "tiny-lm/stacks/math"}
        assert all(e["state"] == "ready" and e["loaded_at"] for e in status["entries"])
        report = c.post("/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}).json()
        assert report["loaded"] == [] and report["refused"] == [] and "tiny-dit" in report["unchanged"]


def test_a_changed_built_manifest_is_served_by_itself(served):
    path, sums = served
    with TestClient(create_app(make_settings(path), load_in_background=False)) as c:
        first = c.post("/chat", json={"prompt": PROMPT, "max_tokens": 4, "route": {"math": 1.0}})
        generation = int(first.headers["x-loopstack-generation"])
        assert first.json()["trace"]["generation"] == generation
        write_manifest(with_math_stack(load_manifest(path), "b", sums["b"]), path)
        changed = time.perf_counter()
        while c.app.state.services.registry.current.generation == generation and time.perf_counter() - changed < 20:
            time.sleep(0.05)
        seconds = time.perf_counter() - changed
        second = c.post("/chat", json={"prompt": PROMPT, "max_tokens": 4, "route": {"math": 1.0}})
    assert int(second.headers["x-loopstack-generation"]) > generation, f"not picked up in {seconds:.1f} s"
    assert first.json()["text"] == expected_text(path, "a", sums["a"])
    assert second.json()["text"] == expected_text(path, "b", sums["b"])
    print(f"watch: the new stacks served {seconds:.2f} s after the manifest was written")


def test_twenty_swaps_under_load_fail_no_request_and_every_answer_is_one_generation(served):
    """Good, corrupt, wrong checksum and half-written artifacts in turn, while a client keeps asking."""
    path, sums = served
    texts = {name: expected_text(path, name, sums[name]) for name in sums}
    assert texts["a"] != texts["b"]
    stacks = path.parent / "artifacts" / "stacks"
    app = create_app(make_settings(path, admin_token=TOKEN, watch=False), load_in_background=False)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    served_by: dict[int, str] = {}  # generation -> stack file its chat model carries
    answers, stop = [], threading.Event()

    def client(c: TestClient) -> None:
        for _ in range(400):  # bounded: stops by itself
            if stop.is_set():
                return
            chat = c.post("/chat", json={"prompt": PROMPT, "max_tokens": 4, "route": {"math": 1.0}})
            image = c.post("/generate-image", json={"model": "tiny-dit", "class_label": 3, "steps": 1, "seed": 1})
            answers.append((chat.status_code, image.status_code, chat.json(), int(image.headers.get("x-loopstack-generation", -1))))

    with TestClient(app) as c:
        served_by[app.state.services.registry.current.generation] = "a"
        worker = threading.Thread(target=client, args=(c,))
        worker.start()
        refused, current = [], "a"
        for swap in range(20):
            kind = ("good", "corrupt", "checksum", "half-written")[swap % 4]
            target = "b" if current == "a" else "a"
            if kind == "good":
                write_manifest(with_math_stack(load_manifest(path), target, sums[target]), path)
            elif kind == "checksum":
                write_manifest(with_math_stack(load_manifest(path), target, "0" * 64), path)
            else:  # the file the manifest names is damaged on disk under the serving model
                spare = stacks / f"{target}.safetensors"
                data = (stacks / f"{target}.keep").read_bytes() if (stacks / f"{target}.keep").exists() else spare.read_bytes()
                (stacks / f"{target}.keep").write_bytes(data)
                damaged = data[: len(data) // 2] if kind == "half-written" else data[:-64] + b"\x00" * 64
                spare.write_bytes(damaged)
                write_manifest(with_math_stack(load_manifest(path), target, sums[target]), path)
            report = c.post("/admin/reload", headers=auth).json()
            if report["loaded"]:
                current = target
                served_by[report["generation"]] = target
            refused += report["refused"]
            if kind in ("corrupt", "half-written"):  # repair it for the next good swap
                (stacks / f"{target}.safetensors").write_bytes((stacks / f"{target}.keep").read_bytes())
            time.sleep(0.05)
        stop.set()
        worker.join(timeout=60)
        status = c.get("/admin/status", headers=auth).json()
    assert len(answers) >= 10
    assert all(chat == 200 and image == 200 for chat, image, _, _ in answers), answers
    assert len(refused) == 15 and all(r["entry"] == "tiny-lm/stacks/math" for r in refused)
    # each names the file and why: a damaged file and a wrong recorded checksum both mismatch the manifest
    assert all(".safetensors" in r["reason"] and "sha256 mismatch" in r["reason"] for r in refused), refused
    for _, _, body, _ in answers:  # each answer is exactly what its generation's stacks give
        generation = body["trace"]["generation"]
        carried = max((g for g in served_by if g <= generation), default=None)
        assert body["text"] == texts[served_by[carried]], (generation, served_by)
    math = next(e for e in status["entries"] if e["entry"] == "tiny-lm/stacks/math")
    assert math["state"] == "ready"  # the last refused swap left the previous stacks serving


def test_an_old_generation_is_freed_once_its_last_request_finished(served):
    path, sums = served
    registry = Registry(make_settings(path), Metrics())
    registry.reload()
    held = registry.acquire()  # a request still running on the first generation
    old_stack = weakref.ref(held.chat.stacks["math"].per_layer["model.layers.0.self_attn.q_proj"][0])
    write_manifest(with_math_stack(load_manifest(path), "b", sums["b"]), path)
    assert registry.reload()["loaded"] == ["tiny-lm/stacks/math"]
    assert registry.current.generation > held.generation
    gc.collect()
    assert old_stack() is not None  # still in use
    registry.release(held)
    del held
    gc.collect()
    assert old_stack() is None


def test_one_refused_entry_leaves_the_others_serving(served, tmp_path):
    path, _ = served
    manifest = load_manifest(path)
    outside = tmp_path.parent / f"{tmp_path.name}-outside"  # the artifact root is tmp_path
    shutil.copytree(path.parent / "artifacts" / "dit", outside)
    image = [m.model_copy(update={"source": m.source.model_copy(update={"path": f"../{outside.name}"})})
             if m.name == "tiny-dit" else m for m in manifest.image]
    write_manifest(manifest.model_copy(update={"image": image}), path)
    with TestClient(create_app(make_settings(path), load_in_background=False)) as c:
        ready = c.get("/readyz").json()
        cards = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        assert c.post("/generate-image", json={"model": "tiny-pixart", "prompt": "a seven", "steps": 1}).status_code == 200
        refused = c.post("/generate-image", json={"model": "tiny-dit", "class_label": 1})
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "not_ready"
        assert "tiny-dit could not be loaded" in refused.json()["error"]["message"]
        assert "outside the artifact root" in refused.json()["error"]["message"]
        assert_error_shape(c.post("/generate-image", json={"model": "no-such-model", "class_label": 1}), 404)
    assert ready["failed"] == ["tiny-dit"] and "tiny-pixart" in ready["serving"]
    assert cards["tiny-dit"]["status"] == "failed" and "outside the artifact root" in cards["tiny-dit"]["errors"][0]["reason"]
    assert cards["tiny-lm"]["status"] == "ready" and cards["tiny-lm"]["details"]["stacks"] == {"chat": 0, "math": 1}


@pytest.mark.parametrize("fault", ["unlisted-config", "pickle-upper-case", "link-outside-root"])
def test_faults_in_a_model_folder_are_refused_with_the_file_named(served, tmp_path, fault):
    path, _ = served
    folder = path.parent / "artifacts" / "dit" / "transformer"
    if fault == "unlisted-config":
        (folder / "extra_config.json").write_text("{}")
        named = "extra_config.json"
    elif fault == "pickle-upper-case":
        torch.save({"w": torch.zeros(1)}, folder / "weights.PT")
        named = "weights.PT"
    else:
        outside = tmp_path.parent / f"{tmp_path.name}-outside.json"  # the artifact root is tmp_path
        outside.write_text("{}")
        (folder / "linked.json").symlink_to(outside)
        named = "linked.json"
    metrics = Metrics()
    registry = Registry(make_settings(path), metrics)
    report = registry.reload()
    assert [r["entry"] for r in report["refused"]] == ["tiny-dit"]
    assert named in report["refused"][0]["reason"] and str(path.parent) not in report["refused"][0]["reason"]
    assert "tiny-pixart" in registry.current.images and "tiny-dit" not in registry.current.images
    refused = {"tiny-dit": 1.0, "tiny-pixart": 0.0, "manifest": 0.0}
    assert {m: metrics.registry.get_sample_value("loopstack_artifact_refused", {"model": m}) for m in refused} == refused
    (folder / named).unlink()  # the fault fixed: the next reload loads it and the alert's gauge clears
    assert "tiny-dit" in registry.reload()["loaded"]
    assert metrics.registry.get_sample_value("loopstack_artifact_refused", {"model": "tiny-dit"}) == 0.0


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "stack.safetensors"
    target.write_bytes(b"old")

    def dies_half_way(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt  # the build is killed mid-write

    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, dies_half_way)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["stack.safetensors"]


def test_artifacts_are_readable_by_a_server_running_as_another_user(tmp_path):
    """A zoo built by one user is served by another (a container's uid on a shared volume): files and
    model folders get the mode open() and mkdir() give under the umask, not tempfile's 0600 / 0700."""
    from server.artifacts import atomic_folder

    old = os.umask(0o022)
    try:
        write_atomically(tmp_path / "stack.safetensors", lambda tmp: tmp.write_bytes(b"stack"))
        with atomic_folder(tmp_path / "model") as folder:
            (folder / "config.json").write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "stack.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o755


def test_entries_not_loaded_yet_show_as_loading_and_their_requests_get_503(served, monkeypatch):
    """During the first load the image models serve before the chat model's group (base, stacks,
    router) is swapped in: /readyz is 200 with the chat model under "loading", and /chat answers
    503, not "no chat model" (404), also once the base is loaded and its stacks are still loading."""
    path, _ = served
    release, reached = threading.Event(), threading.Event()
    real_load = DomainStacksLoader.load

    def slow_stacks(self, spec, parent, context):
        reached.set()
        release.wait(timeout=60)
        return real_load(self, spec, parent, context)

    monkeypatch.setattr(DomainStacksLoader, "load", slow_stacks)
    with TestClient(create_app(make_settings(path, watch=False))) as c:  # loads in the background
        assert reached.wait(timeout=60)
        ready = c.get("/readyz").json()
        assert "tiny-dit" in ready["serving"] and "tiny-lm" in ready["loading"] and "tiny-lm" not in ready["serving"]
        waiting = c.post("/chat", json={"prompt": "hi", "max_tokens": 1})
        assert waiting.status_code == 503 and "tiny-lm is still loading" in waiting.json()["error"]["message"]
        release.set()
        deadline = time.time() + 60
        while c.get("/readyz").json()["loading"] and time.time() < deadline:
            time.sleep(0.05)
        assert c.post("/chat", json={"prompt": "hi", "max_tokens": 1}).status_code == 200


def test_the_build_state_shows_in_the_model_list(served):
    path, _ = served
    (path.parent / "build.json").write_text('{"state": "running", "current": "image models (step 2 of 5)"}')
    with TestClient(create_app(make_settings(path), load_in_background=False)) as c:
        assert c.get("/v1/models").json()["build"]["current"] == "image models (step 2 of 5)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sighup_reloads_a_running_server_instead_of_stopping_it(served):
    path, sums = served
    port = free_port()
    env = os.environ | {"LOOPSTACK_MANIFEST": str(path), "LOOPSTACK_ARTIFACT_ROOT": str(path.parent),
                        "LOOPSTACK_ADMIN_TOKEN": TOKEN, "LOOPSTACK_WATCH": "false", "LOOPSTACK_DEVICE": "cpu"}
    server = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {TOKEN}"}
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/readyz").status_code == 200 and "tiny-lm" in httpx.get(f"{url}/readyz").json()["serving"]:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        before = httpx.get(f"{url}/admin/status", headers=auth).json()["generation"]
        write_manifest(with_math_stack(load_manifest(path), "b", sums["b"]), path)
        server.send_signal(signal.SIGHUP)
        while time.time() < deadline:
            status = httpx.get(f"{url}/admin/status", headers=auth).json()
            if status["last_reload"]["reason"] == "SIGHUP":
                break
            time.sleep(0.2)
        assert server.poll() is None  # still running
        assert status["last_reload"]["loaded"] == 1 and status["generation"] > before
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_stacks_trained_on_another_base_are_refused(served):
    path, _ = served
    stacks = path.parent / "artifacts" / "stacks"
    tensors, meta = load_with_config(stacks / "a.safetensors", "moe_lora", "MoE-LoRA stack")
    sha = write_atomically(stacks / "other.safetensors",
                           lambda tmp: save_with_config(tmp, tensors, "moe_lora", meta | {"base": "another-lm"}))
    write_manifest(with_math_stack(load_manifest(path), "other", sha), path)
    registry = Registry(make_settings(path), Metrics())
    report = registry.reload()
    assert [r["entry"] for r in report["refused"]] == ["tiny-lm/stacks/math"]
    assert "trained on the base 'another-lm', not on 'tiny-lm'" in report["refused"][0]["reason"]
    assert registry.current.chat is not None  # the base and the other domain serve


def test_a_file_corrupted_under_a_serving_model_is_noticed_and_refused(served):
    path, _ = served
    with TestClient(create_app(make_settings(path), load_in_background=False)) as c:
        generation = c.get("/readyz").json()["generation"]
        weights = path.parent / "artifacts" / "dit" / "transformer" / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])  # truncated on disk; the manifest is unchanged
        deadline = time.time() + 20
        while time.time() < deadline:
            card = next(m for m in c.get("/v1/models").json()["data"] if m["id"] == "tiny-dit")
            if card["errors"]:
                break
            time.sleep(0.1)
        image = c.post("/generate-image", json={"model": "tiny-dit", "class_label": 2, "steps": 1})
    assert card["status"] == "ready" and "sha256 mismatch" in card["errors"][0]["reason"]
    assert "dit/transformer/diffusion_pytorch_model.safetensors" in card["errors"][0]["reason"]
    assert image.status_code == 200 and int(image.headers["x-loopstack-generation"]) == generation  # the old one serves


def test_chat_answers_503_with_the_reason_while_its_model_does_not_serve(served):
    path, _ = served
    manifest = load_manifest(path)
    base = manifest.chat.base.model_copy(update={"source": manifest.chat.base.source.model_copy(update={"path": "gone"})})
    write_manifest(manifest.model_copy(update={"chat": manifest.chat.model_copy(update={"base": base})}), path)
    with TestClient(create_app(make_settings(path), load_in_background=False)) as c:
        answer = c.post("/chat", json={"prompt": "hi", "max_tokens": 2})
        assert c.post("/generate-image", json={"model": "tiny-dit", "class_label": 1, "steps": 1}).status_code == 200
    assert answer.status_code == 503 and answer.json()["error"]["param"] == "model"
    assert answer.json()["error"]["message"].startswith("tiny-lm could not be loaded") and "gone" in answer.text
