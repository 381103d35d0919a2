"""`make compose-check`: docker-compose.yml run for real, with podman, end to end.

The images are built from the repository's Dockerfile and the compose file is run as users run it,
with deploy/compose/override.yml on top; that file substitutes only what cannot be pulled on a
machine without a container registry (a Python base image built from Debian packages, torch's CPU
wheel from a local folder, Prometheus from Debian's package) and builds the micro zoo, so the check
takes minutes. Then, on the published ports:

1. the server container turns healthy by its own HEALTHCHECK (run with `podman healthcheck run`:
   podman schedules health checks through systemd timers, which a machine without systemd lacks);
2. placeholders are served first, then the zoo job's artifacts are hot-loaded from the shared volume,
   mounted read-only, where the process (uid 10001) cannot write;
3. an image, a chat and an OpenAI-client call are answered;
4. Prometheus, in its container, scrapes the server and has loaded the rules;
5. a stop (compose's, with the service's stop_grace_period) drains a running chat request;
6. a second `up` reuses the volume: the zoo job finds everything built and writes nothing;
7. the GPU override parses on top of the compose file and names the CUDA build of torch.

Needs podman with runc, mmdebstrap and podman-compose (docs/deployment.md: Containers, for real).
Writes runs/compose-check/report.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

from deploy.check import wait_for

REPO = Path(__file__).resolve().parent.parent
PROJECT = "loopstack-check"  # its own containers and volume: a user's `loopstack` project is left alone
FILES = ["docker-compose.yml", "deploy/compose/override.yml"]
BASE_IMAGE = "localhost/loopstack-python:3.11-bookworm"
PROMETHEUS_IMAGE = "localhost/loopstack-prometheus:bookworm"
SERVER, ZOO = f"{PROJECT}_loopstack_1", f"{PROJECT}_zoo_1"
URL, PROMETHEUS = "http://127.0.0.1:8000", "http://127.0.0.1:9090"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
# the venv stands in for the official image's /usr/local python; pip trusts the system's CA bundle
# (a TLS-inspecting proxy's CA is mounted over it while building) and finds torch in /wheels
PIP_CONF = "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\nfind-links = /wheels\n"
PATH = "/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def sh(*command: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise SystemExit(f"compose check failed: {' '.join(command)}\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return result


def compose(*args: str, files: list[str] = FILES, check: bool = True) -> subprocess.CompletedProcess:
    tool = ["podman", "compose"] if sh("podman", "compose", "version", check=False).returncode == 0 else \
        [shutil.which("podman-compose") or str(Path(sys.executable).parent / "podman-compose")]
    return sh(*tool, "-p", PROJECT, *[a for f in files for a in ("-f", f)], *args, check=check)


def preflight() -> None:
    missing = [tool for tool in ("podman", "mmdebstrap") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"compose check needs {', '.join(missing)}: apt-get install podman runc uidmap "
                         "slirp4netns fuse-overlayfs mmdebstrap (docs/deployment.md: Containers, for real)")
    runtime = sh("podman", "info", "--format", "{{.Host.OCIRuntime.Name}}").stdout.strip()
    print(f"podman {sh('podman', '--version').stdout.split()[-1]}, runtime {runtime}")


def debian_image(tag: str, packages: str, hooks: list[str], changes: list[str]) -> float:
    """An image of Debian bookworm's minimal base with `packages`, built by mmdebstrap (no registry)."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        tar = Path(scratch) / "root.tar"
        sh("mmdebstrap", "--variant=minbase", f"--include={packages}",
           *[f"--customize-hook={hook}" for hook in hooks], "bookworm", str(tar))
        sh("podman", "import", *[a for c in changes for a in ("--change", c)], str(tar), tag)
    return time.perf_counter() - started


def build_images(wheels: Path, rebuild_bases: bool, cache: bool) -> dict:
    """The two base images (once), then the Dockerfile's runtime and training targets."""
    report: dict = {}
    if rebuild_bases or sh("podman", "image", "exists", BASE_IMAGE, check=False).returncode:
        report["python base seconds"] = debian_image(
            BASE_IMAGE, "python3,python3-venv,python3-pip,ca-certificates",
            ['chroot "$1" python3 -m venv /opt/python', f'printf "{PIP_CONF.encode("unicode_escape").decode()}" > "$1/etc/pip.conf"'],
            [f"ENV PATH={PATH}", 'CMD ["python3"]'])
    if rebuild_bases or sh("podman", "image", "exists", PROMETHEUS_IMAGE, check=False).returncode:
        report["prometheus image seconds"] = debian_image(
            PROMETHEUS_IMAGE, "prometheus", ['mkdir -p "$1/prometheus"'],
            ['ENTRYPOINT ["/usr/bin/prometheus"]', "WORKDIR /prometheus", "EXPOSE 9090"])
    for target, tag in (("runtime", "localhost/loopstack:latest"), ("training", "localhost/loopstack-training:latest")):
        started = time.perf_counter()
        # --format docker: the OCI format drops HEALTHCHECK
        sh("podman", "build", "--format", "docker", *([] if cache else ["--no-cache"]), "--target", target, "-t", tag,
           "--build-arg", f"PYTHON_IMAGE={BASE_IMAGE}", "--build-arg", "TORCH_INDEX=https://pypi.org/simple",
           "-v", f"{CA_BUNDLE}:{CA_BUNDLE}:ro", "-v", f"{wheels}:/wheels:ro", ".", timeout=1800)
        size = int(sh("podman", "image", "inspect", tag, "--format", "{{.Size}}").stdout)
        report[target] = {"image": tag, "build seconds": time.perf_counter() - started, "size MB": size / 1e6}
    lean = sh("podman", "run", "--rm", "--entrypoint", "sh", "localhost/loopstack:latest", "-c",
              "command -v gcc cc c++ make; python -c 'import sklearn' 2>/dev/null && echo sklearn", check=False)
    report["runtime"]["compilers or training extras"] = lean.stdout.split()
    return report


class Checks:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def __call__(self, name: str, ok: bool, detail: str = "") -> None:
        self.rows.append({"check": name, "ok": bool(ok), "detail": detail})
        print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)


def ready(http: httpx.Client) -> dict | None:
    try:
        response = http.get("/readyz")
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


def healthy(container: str) -> bool:
    return sh("podman", "healthcheck", "run", container, check=False).returncode == 0


def container_state(container: str) -> dict:
    return json.loads(sh("podman", "inspect", container, "--format", "{{json .State}}").stdout)


def first_up(check: Checks, http: httpx.Client, report: dict) -> None:
    started = time.perf_counter()
    compose("up", "-d", "zoo", "loopstack", "prometheus")
    first = wait_for("the server's /readyz", lambda: ready(http), 300, every=0.5)
    report["cold start to /readyz seconds"] = time.perf_counter() - started
    check("placeholders served first", set(first["placeholders"]) == set(first["serving"]) and first["serving"],
          f"{len(first['serving'])} models, all placeholders, {report['cold start to /readyz seconds']:.1f} s after up")
    wait_for("the HEALTHCHECK", lambda: healthy(SERVER), 300, every=2)
    check("healthy by its own HEALTHCHECK", container_state(SERVER)["Health"]["Status"] == "healthy",
          f"{time.perf_counter() - started:.1f} s after up")
    uid = sh("podman", "exec", SERVER, "id", "-u").stdout.strip()
    write = sh("podman", "exec", SERVER, "touch", "/app/artifacts/written-by-the-server", check=False)
    check("runs as uid 10001 and cannot write the volume", uid == "10001" and write.returncode != 0,
          f"uid {uid}; {write.stderr.strip()}")
    wait_for("the zoo job", lambda: not container_state(ZOO)["Running"], 1800, every=5)
    report["zoo job seconds"] = time.perf_counter() - started
    check("the zoo job finished", container_state(ZOO)["ExitCode"] == 0, f"{report['zoo job seconds']:.0f} s after up")
    served = wait_for("the zoo hot-loaded", lambda: (r := ready(http)) and not r["placeholders"] and not r["loading"] and r,
                      300, every=1)
    check("the zoo's artifacts hot-loaded from the read-only volume", not served["failed"],
          f"serving {', '.join(served['serving'])}; generation {served['generation']}")


def answers(check: Checks, http: httpx.Client) -> None:
    from openai import OpenAI

    image = http.post("/generate-image", json={"model": "digits-dit", "class_label": 3, "seed": 1})
    check("an image", image.status_code == 200 and not image.json()["placeholder"], f"HTTP {image.status_code}")
    chat = http.post("/chat", json={"prompt": "What is the capital of France?", "max_tokens": 24})
    check("a chat", chat.status_code == 200 and chat.json()["text"].strip() != "", repr(chat.json().get("text", chat.text))[:120])
    client = OpenAI(base_url=f"{URL}/v1", api_key="unused", timeout=120)
    model = next(m.id for m in client.models.list().data if "+" not in m.id and "digits" not in m.id)
    reply = client.chat.completions.create(model=model, max_tokens=16,
                                           messages=[{"role": "user", "content": "Name a colour."}])
    check("an OpenAI-client call", bool(reply.choices[0].message.content), f"{model}: {reply.choices[0].message.content!r}")


def prometheus(check: Checks) -> None:
    with httpx.Client(base_url=PROMETHEUS, timeout=10) as prom:
        targets = wait_for("Prometheus scraping the server", lambda: [
            t for t in prom.get("/api/v1/targets").json()["data"]["activeTargets"] if t["health"] == "up"], 120, every=2)
        groups = prom.get("/api/v1/rules").json()["data"]["groups"]
        rules = sum(len(g["rules"]) for g in groups)
        expected = sum(len(group["rules"]) for f in (REPO / "deploy/rules").glob("*.yml")
                       for group in yaml.safe_load(f.read_text())["groups"])
    check("Prometheus scrapes the server", bool(targets), ", ".join(t["scrapeUrl"] for t in targets))
    check("Prometheus loaded the rules", rules == expected > 0, f"{rules} rules in {len(groups)} groups")


def drain(check: Checks, http: httpx.Client, report: dict) -> None:
    result: dict = {}

    def long_request() -> None:
        response = http.post("/chat", json={"prompt": "Count from 1 to 300, separated by commas.", "max_tokens": 160},
                             timeout=120)
        result["status"], result["body"], result["ended"] = response.status_code, response.json(), time.perf_counter()

    request = threading.Thread(target=long_request)
    request.start()
    time.sleep(1.5)  # the request is generating when the stop arrives
    started = time.perf_counter()
    compose("stop", "loopstack")
    report["stop seconds"] = time.perf_counter() - started
    request.join(5)
    grace = float(yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["loopstack"]["stop_grace_period"].rstrip("s"))
    tokens = result.get("body", {}).get("usage", {}).get("completion_tokens", 0)
    after_stop = result.get("ended", 0) - started
    check("a stop drains a running request", result.get("status") == 200 and tokens > 0 and after_stop > 0
          and container_state(SERVER)["ExitCode"] == 0 and report["stop seconds"] < grace,
          f"HTTP {result.get('status')}, {tokens} tokens, answered {after_stop:.1f} s into the stop, "
          f"exit {container_state(SERVER)['ExitCode']}, "
          f"stopped in {report['stop seconds']:.1f} s (grace {grace:.0f} s)")


def second_up(check: Checks, http: httpx.Client, report: dict) -> None:
    def manifest_digest() -> str:
        return sh("podman", "run", "--rm", "-v", f"{PROJECT}_artifacts:/a:ro", "--entrypoint", "sha256sum",
                  "localhost/loopstack:latest", "/a/weights_manifest.yaml").stdout.split()[0]

    before = manifest_digest()
    started = time.perf_counter()
    compose("up", "-d", "zoo", "loopstack", "prometheus")
    wait_for("the zoo job, again", lambda: not container_state(ZOO)["Running"], 600, every=2)
    report["second zoo job seconds"] = time.perf_counter() - started
    served = wait_for("the server, again", lambda: (r := ready(http)) and not r["placeholders"] and not r["loading"] and r, 300)
    check("a second up reuses the volume", manifest_digest() == before and container_state(ZOO)["ExitCode"] == 0,
          f"zoo job {report['second zoo job seconds']:.0f} s, manifest unchanged, serving {len(served['serving'])} models")


def gpu_override(check: Checks) -> None:
    merged = yaml.safe_load(compose("config", files=["docker-compose.yml", "docker-compose.gpu.yml"]).stdout)
    indexes = {name: service["build"]["args"] for name, service in merged["services"].items() if "build" in service}
    urls = {name: (args if isinstance(args, dict) else dict(a.split("=", 1) for a in args))["TORCH_INDEX"]
            for name, args in indexes.items()}
    check("the GPU override parses and names the CUDA build", set(urls) == {"zoo", "loopstack"}
          and all("/cu" in url for url in urls.values()), json.dumps(urls))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wheels", type=Path, default=Path(os.environ.get("PIP_FIND_LINKS", "/opt/wheels")),
                        help="a folder with torch's CPU wheel, mounted into the builds (default: PIP_FIND_LINKS)")
    parser.add_argument("--rebuild-bases", action="store_true", help="build the Debian base images again")
    parser.add_argument("--no-cache", action="store_true", help="build every layer of the images again (to time a cold build)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "compose-check")
    args = parser.parse_args()
    preflight()
    report: dict = {"images": build_images(args.wheels.resolve(), args.rebuild_bases, not args.no_cache)}
    check = Checks()
    compose("down", "-v", check=False)  # a previous run's containers and volume
    try:
        with httpx.Client(base_url=URL, timeout=300) as http:
            first_up(check, http, report)
            answers(check, http)
            prometheus(check)
            drain(check, http, report)
            second_up(check, http, report)
        gpu_override(check)
    finally:
        compose("down", "-v", check=False)
        report["checks"] = check.rows
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "checks"}, indent=2))
    failed = [row["check"] for row in check.rows if not row["ok"]]
    if failed:
        raise SystemExit(f"compose check failed: {', '.join(failed)}")
    print(f"compose check passed: {len(check.rows)} checks; {args.out / 'report.json'}")


if __name__ == "__main__":
    main()
