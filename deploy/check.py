"""`make deploy-check`: the server, Debian's Prometheus and the repo's rules, for real.

1. `promtool check config` and `check rules` on deploy/prometheus.yml and deploy/rules/.
2. The server on a copy of the artifact root (faults are written to the copy), Prometheus scraping
   it with the repo's configuration (only the target changed) and rules.
3. Bounded traffic: images in both modes, chat routed and with explicit weights, bad requests, a
   hot reload. Then every dashboard query must return data.
4. Scripted faults, one at a time; each alert must fire during its fault and resolve after it:
   a model that cannot load (its requests answer 503), a refused artifact, a full chat queue, the
   server stopped (and started again).
5. A picture of the dashboard's panels drawn from the same queries through Prometheus's HTTP API
   (Grafana does not run here), and a JSON report.

Needs the `prometheus` Debian package (prometheus and promtool on PATH) and a built zoo (`make zoo`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

from deploy.grafana.dashboard import PANELS

REPO = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "deploy-check"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, condition, timeout: float, every: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise SystemExit(f"deploy check failed: {what} (waited {timeout:.0f} s)")


class Stack:
    """The server and Prometheus as child processes, on free ports, in a scratch folder."""

    def __init__(self, artifacts: Path, scratch: Path):
        self.scratch = scratch
        self.root = scratch / "artifacts"
        self.server_port, self.prometheus_port = free_port(), free_port()
        self.server: subprocess.Popen | None = None
        self.prometheus: subprocess.Popen | None = None
        copy_root(artifacts, self.root)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.server_port}", timeout=120)
        self.prom = httpx.Client(base_url=f"http://127.0.0.1:{self.prometheus_port}", timeout=30)

    def start_server(self) -> None:
        env = {**os.environ, "LOOPSTACK_ARTIFACT_ROOT": str(self.root), "LOOPSTACK_ADMIN_TOKEN": ADMIN_TOKEN,
               "LOOPSTACK_CHAT_QUEUE_SIZE": "2",
               "LOOPSTACK_CHAT_MAX_BATCH": "2", "LOOPSTACK_TEMPLATE": str(REPO / "weights_manifest.yaml")}
        log = open(self.scratch / "server.log", "a")
        self.server = subprocess.Popen([sys.executable, "-m", "server", "--host", "127.0.0.1",
                                        "--port", str(self.server_port)], env=env, stdout=log, stderr=log)
        wait_for("the server became ready", lambda: self._ready(), timeout=600, every=2)

    def _ready(self) -> bool:
        """Every entry of the manifest loaded (/readyz answers 200 as soon as one model serves)."""
        try:
            ready = self.http.get("/readyz", timeout=5)
        except httpx.HTTPError:
            return False
        return ready.status_code == 200 and not ready.json()["loading"]

    def stop_server(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGTERM)
            self.server.wait(timeout=120)

    def start_prometheus(self) -> None:
        config = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
        config["rule_files"] = [str(REPO / "deploy" / pattern) for pattern in config["rule_files"]]
        config["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{self.server_port}"]}]
        path = self.scratch / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        run(["promtool", "check", "config", str(path)])
        log = open(self.scratch / "prometheus.log", "a")
        self.prometheus = subprocess.Popen(
            ["prometheus", f"--config.file={path}", f"--storage.tsdb.path={self.scratch / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.prometheus_port}"], stdout=log, stderr=log)
        wait_for("Prometheus became ready", lambda: self._prometheus_ready(), timeout=60)

    def _prometheus_ready(self) -> bool:
        try:
            return self.prom.get("/-/ready").status_code == 200
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        self.stop_server()
        if self.prometheus is not None:
            self.prometheus.terminate()
            self.prometheus.wait(timeout=30)

    # ------------------------------------------------------------------ Prometheus's HTTP API
    def query(self, expr: str) -> list:
        body = self.prom.get("/api/v1/query", params={"query": expr}).json()
        if body["status"] != "success":
            raise SystemExit(f"deploy check failed: {expr!r}: {body.get('error')}")
        return body["data"]["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 5) -> list:
        return self.prom.get("/api/v1/query_range", params={"query": expr, "start": start, "end": end,
                                                             "step": step}).json()["data"]["result"]

    def alert_state(self, name: str) -> str:
        alerts = self.prom.get("/api/v1/alerts").json()["data"]["alerts"]
        states = {a["state"] for a in alerts if a["labels"]["alertname"] == name}
        return "firing" if "firing" in states else ("pending" if "pending" in states else "inactive")

    def admin_reload(self) -> dict:
        return self.http.post("/admin/reload", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()


def copy_root(source: Path, target: Path) -> None:
    """Hard links where the file system allows (faults replace files by rename, never in place)."""
    try:
        shutil.copytree(source, target, copy_function=os.link)
    except OSError:
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)


def run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    print(f"$ {' '.join(command)}\n{result.stdout.strip()}{result.stderr.strip()}")
    if result.returncode != 0:
        raise SystemExit(f"deploy check failed: {' '.join(command)} exited {result.returncode}")


def replace_file(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".deploy-check")
    temporary.write_bytes(data)
    os.replace(temporary, path)


# ---------------------------------------------------------------------- traffic
def models(stack: Stack) -> tuple[list[dict], dict]:
    cards = stack.http.get("/v1/models").json()["data"]
    images = [c for c in cards if c["kind"] in ("dit", "pixart")]
    chat = next(c for c in cards if c["kind"] == "causal-lm")
    return images, chat


def drive_traffic(stack: Stack, seconds: float) -> dict:
    """Requests of every kind for `seconds`; returns the statuses seen."""
    images, chat = models(stack)
    domains = chat["details"].get("domains") or []
    statuses: dict[str, int] = {}

    def note(response: httpx.Response) -> None:
        statuses[str(response.status_code)] = statuses.get(str(response.status_code), 0) + 1

    deadline, turn = time.time() + seconds, 0
    while time.time() < deadline:
        for card in images:
            image = {"model": card["id"], "n": 2, "seed": turn}
            image |= {"class_label": turn % 10} if card["kind"] == "dit" else {"prompt": f"the digit {turn % 10}"}
            note(stack.http.post("/generate-image", json=image | {"mode": "baseline"}))
            if card["details"].get("ilf"):
                note(stack.http.post("/generate-image", json=image | {"mode": "ilf"}))
        note(stack.http.post("/chat", json={"prompt": f"What is {turn + 12} plus {turn + 30}?", "max_tokens": 24}))
        note(stack.http.post("/chat", json={"prompt": "Give me one tip for learning the guitar.", "max_tokens": 16}))
        if domains:
            note(stack.http.post("/chat", json={"prompt": "Say hello.", "max_tokens": 8, "route": {domains[0]: 1.0}}))
        note(stack.http.post("/chat", json={"prompt": " "}))  # 422
        note(stack.http.post("/generate-image", json={"model": "no-such-model", "class_label": 1}))  # 404
        if turn == 1:
            stack.admin_reload()
        turn += 1
    return statuses


# ---------------------------------------------------------------------- faults
def fault_unloadable_model(stack: Stack) -> callable:
    """A new manifest entry whose file fails its checksum: never served, so its requests answer 503."""
    manifest_path = stack.root / "weights_manifest.yaml"
    original = manifest_path.read_bytes()
    manifest = yaml.safe_load(original)
    broken = json.loads(json.dumps(manifest["image"][0]))
    broken["name"] = "unloadable-dit"
    broken["source"]["files"] = {name: "0" * 64 for name in broken["source"]["files"]} or {"missing.json": "0" * 64}
    manifest["image"].append(broken)
    replace_file(manifest_path, yaml.safe_dump(manifest, sort_keys=False).encode())
    stack.admin_reload()
    stop = threading.Event()

    def send() -> None:
        while not stop.is_set():
            stack.http.post("/generate-image", json={"model": "unloadable-dit", "class_label": 1})
            time.sleep(0.2)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()

    def undo() -> None:
        stop.set()
        sender.join(timeout=30)
        replace_file(manifest_path, original)
        stack.admin_reload()
    return undo


def fault_refused_artifact(stack: Stack) -> callable:
    """A served artifact's file replaced by bytes that fail its checksum: refused, the old one serves."""
    manifest = yaml.safe_load((stack.root / "weights_manifest.yaml").read_text())
    stacks = [a["path"] for d in manifest["chat"].get("domains") or [] for a in d["stacks"]]
    target = stack.root / (stacks[0] if stacks else manifest["chat"]["base"]["source"]["path"] + "/config.json")
    original = target.read_bytes()
    replace_file(target, original + b" ")
    stack.admin_reload()

    def undo() -> None:
        replace_file(target, original)
        stack.admin_reload()
    return undo


def fault_full_queue(stack: Stack) -> callable:
    """More long chat answers at once than the chat engine decodes and queues (2 and 2 here)."""
    stop = threading.Event()

    def send() -> None:
        with httpx.Client(base_url=str(stack.http.base_url), timeout=300) as client:
            while not stop.is_set():
                answer = client.post("/chat", json={"prompt": "Write a long story about the sea.", "max_tokens": 200})
                if answer.status_code == 429:
                    time.sleep(float(answer.headers.get("retry-after", 1)) / 4)

    senders = [threading.Thread(target=send, daemon=True) for _ in range(5)]
    for s in senders:
        s.start()

    def undo() -> None:
        stop.set()
        for s in senders:
            s.join(timeout=300)
    return undo


def fault_server_stopped(stack: Stack) -> callable:
    stack.stop_server()
    return stack.start_server


FAULTS = (("LoopstackHigh5xxRate", fault_unloadable_model), ("LoopstackArtifactRefused", fault_refused_artifact),
          ("LoopstackQueueSaturated", fault_full_queue), ("LoopstackDown", fault_server_stopped))


def exercise_alert(stack: Stack, alert: str, fault) -> dict:
    assert stack.alert_state(alert) == "inactive", f"{alert} is {stack.alert_state(alert)} before its fault"
    started = time.time()
    undo = fault(stack)
    wait_for(f"{alert} fired during its fault", lambda: stack.alert_state(alert) == "firing", timeout=180)
    fired = time.time() - started
    undone = time.time()
    undo()
    wait_for(f"{alert} resolved after its fault", lambda: stack.alert_state(alert) == "inactive", timeout=240)
    result = {"alert": alert, "fired_after_s": round(fired, 1), "resolved_after_s": round(time.time() - undone, 1)}
    print(f"  {alert:<26} fired {result['fired_after_s']:>6.1f} s into the fault, "
          f"resolved {result['resolved_after_s']:>6.1f} s after it")
    return result


# ---------------------------------------------------------------------- the picture
CHECK_TITLE = ("The Loopstack dashboard's panels, drawn from Prometheus's HTTP API by `make deploy-check`: the same "
               "queries as deploy/grafana/dashboards/loopstack.json (Grafana itself did not run).\nTraffic, then "
               "faults: an unloadable model (5xx), a refused artifact, a full chat queue, the server stopped.")


def draw_dashboard(query_range, start: float, end: float, path: Path, panels=PANELS, title: str = CHECK_TITLE) -> None:
    """`query_range(expr, start, end)`: Prometheus's range query results for each panel's queries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 3
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6.5 * columns, 3.2 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        lines = []
        for query in panel.queries:
            for series in query_range(query.expr, start, end):
                label = query.legend
                for key, value in series["metric"].items():
                    label = label.replace("{{" + key + "}}", value)
                values = [float(v) for _, v in series["values"]]
                if any(values):  # series preset at 0 (error statuses never seen) would bury the rest
                    lines.append((label, [(float(t) - start) / 60 for t, _ in series["values"]], values))
        lines.sort(key=lambda line: -max(line[2]))
        for label, times, values in lines[:8]:  # the eight largest, as a legend can show them
            ax.plot(times, values, label=label[:36], linewidth=1.2)
        more = f" (+{len(lines) - 8} smaller series)" if len(lines) > 8 else ""
        ax.set_title(f"{panel.title} [{panel.unit}]{more}", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("minutes into the check", fontsize=7)
        if ax.lines:
            ax.legend(fontsize=6, loc="best", ncol=2 if len(ax.lines) > 4 else 1)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m deploy.check", description=__doc__.split("\n")[0])
    parser.add_argument("--artifacts", type=Path, default=Path(os.environ.get("LOOPSTACK_ARTIFACT_ROOT", "artifacts")))
    parser.add_argument("--traffic-seconds", type=float, default=90)
    parser.add_argument("--out", type=Path, default=Path("runs/deploy-check"))
    parser.add_argument("--picture", type=Path, default=REPO / "docs" / "dashboard.png")
    args = parser.parse_args()
    for tool in ("prometheus", "promtool"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not on PATH: install Debian's prometheus package (apt-get install prometheus)")
    if not (args.artifacts / "weights_manifest.yaml").is_file():
        raise SystemExit(f"no built zoo under {args.artifacts}: run `make zoo` first")
    run(["promtool", "check", "rules", *map(str, sorted((REPO / "deploy" / "rules").glob("*.yml")))])
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"artifacts": str(args.artifacts)}
    with tempfile.TemporaryDirectory(prefix="loopstack-deploy-check-") as scratch:
        stack = Stack(args.artifacts, Path(scratch))
        try:
            began = time.time()
            stack.start_server()
            stack.start_prometheus()
            print(f"server on :{stack.server_port}, Prometheus on :{stack.prometheus_port}; "
                  f"traffic for {args.traffic_seconds:.0f} s")
            report["traffic_statuses"] = drive_traffic(stack, args.traffic_seconds)
            time.sleep(12)  # two more scrapes and a rule evaluation
            report["queries"] = {}
            empty = []
            for panel in PANELS:
                for query in panel.queries:
                    series = len(stack.query(query.expr))
                    report["queries"][query.expr] = series
                    print(f"  {series:>3} series  {panel.title}: {query.legend}")
                    if series == 0:
                        empty.append(f"{panel.title}: {query.expr}")
            print("alerts: each fires during its fault and resolves after it")
            report["alerts"] = [exercise_alert(stack, alert, fault) for alert, fault in FAULTS]
            drive_traffic(stack, 20)
            time.sleep(10)
            draw_dashboard(stack.query_range, began, time.time(), args.picture)
            report["seconds"] = round(time.time() - began, 1)
        finally:
            stack.close()
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out / 'report.json'} and {args.picture}")
    if empty:
        raise SystemExit("deploy check failed: dashboard queries without data:\n  " + "\n  ".join(empty))
    print(f"deploy check passed in {report['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
