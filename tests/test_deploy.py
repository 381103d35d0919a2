"""No Docker engine runs in CI, so the deployment files are checked for what can break them: paths
that do not exist, entry points that do not parse, images that run as root or carry the training
extras, PromQL that does not parse or reads a series the server does not export, a dashboard JSON
that drifted from its code. (`make deploy-check` runs the server, Prometheus and the rules for real.)"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import promql_parser
import pytest
import yaml

from deploy.grafana import dashboard

REPO = Path(__file__).resolve().parent.parent


def compose(name: str = "docker-compose.yml") -> dict:
    return yaml.safe_load((REPO / name).read_text())


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions as (KEYWORD, arguments), continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (REPO / "Dockerfile").read_text())
    stages, current = {}, None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        if keyword == "FROM":
            current = rest.split(" AS ")[-1].strip()
            stages[current] = [(keyword, rest)]
        elif current is not None:
            stages[current].append((keyword, rest))
    return stages


def exec_form(arguments: str) -> list[str]:
    return json.loads(arguments) if arguments.startswith("[") else shlex.split(arguments)


def test_dockerfile_has_a_lean_non_root_runtime_and_a_training_target():
    stages = dockerfile_stages()
    assert list(stages) == ["runtime", "training"]
    runtime = stages["runtime"]
    installs = " ".join(rest for key, rest in runtime if key == "RUN" and "pip install" in rest)
    assert "[training]" not in installs and "--constraint constraints.txt" in installs
    assert [rest for key, rest in runtime if key == "USER"][-1] == "10001:10001"
    health = " ".join(rest for key, rest in runtime if key == "HEALTHCHECK")
    assert "/readyz" in health
    training = stages["training"]
    assert training[0][1] == "runtime AS training"
    assert any(key == "RUN" and '".[training]"' in rest and "--constraint constraints.txt" in rest for key, rest in training)
    assert [rest for key, rest in training if key == "USER"][-1] == "10001:10001"
    # the zoo job writes runs/ beside the artifact root as that user, and is no server to health-check
    assert any(key == "RUN" and "mkdir -p /app/runs" in rest and "chown loopstack" in rest for key, rest in training)
    assert ("HEALTHCHECK", "NONE") in training
    env = " ".join(rest for key, rest in runtime if key == "ENV")
    assert "LOOPSTACK_ARTIFACT_ROOT=/app/artifacts" in env and "HF_HUB_OFFLINE=1" in env


def test_dockerfile_copies_files_that_exist():
    for stage in dockerfile_stages().values():
        for key, rest in stage:
            if key == "COPY":
                for source in rest.split()[:-1]:
                    assert (REPO / source).exists(), f"Dockerfile copies missing {source}"


def test_hadolint_is_clean():
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def entry_point_parses(command: list[str]) -> None:
    """`python -m server ...` or `python -m training ...`: the module exists and takes these arguments."""
    assert command[:2] == ["python", "-m"], command
    module, args = command[2], command[3:]
    assert module in ("server", "training"), command
    if module == "training":
        from training.__main__ import parser
    else:
        from server.__main__ import parser
    parser().parse_args(args)  # an unknown flag or a missing value exits (SystemExit), failing the test


def test_the_entry_point_check_refuses_a_flag_the_server_does_not_take():
    entry_point_parses(["python", "-m", "server", "--host", "0.0.0.0", "--port", "8000"])
    with pytest.raises(SystemExit):
        entry_point_parses(["python", "-m", "server", "--workers", "4"])


def test_every_command_names_a_real_entry_point():
    stages = dockerfile_stages()
    for stage in stages.values():
        for key, rest in stage:
            if key == "CMD":
                entry_point_parses(exec_form(rest))
    for name in ("docker-compose.yml", "docker-compose.gpu.yml", "deploy/compose/override.yml"):
        for service in compose(name)["services"].values():
            if "command" in service and not service.get("image", "").startswith(("prom/", "grafana/")):
                entry_point_parses(service["command"])


def test_the_compose_check_override_substitutes_only_what_cannot_be_pulled():
    """`make compose-check` runs the users' compose file; its override may swap the base image, the
    Prometheus image, the zoo's size and the admin token, and nothing else."""
    base, override = compose()["services"], compose("deploy/compose/override.yml")["services"]
    assert set(override) == {"zoo", "loopstack", "prometheus"}
    for name, service in override.items():
        assert set(service) <= {"build", "command", "environment", "image"}, name
        assert set(service.get("build", {})) <= {"args"} and set(service.get("build", {}).get("args", {})) <= {"PYTHON_IMAGE"}
    assert override["zoo"]["command"] == base["zoo"].get("command", ["python", "-m", "training", "zoo", "all"]) + ["--micro"]
    assert set(override["loopstack"].get("environment", {})) <= {"LOOPSTACK_ADMIN_TOKEN"}
    assert override["prometheus"]["image"].startswith("localhost/") and "grafana" not in override


def test_compose_builds_the_zoo_into_a_volume_the_server_reads():
    services = compose()["services"]
    assert {"zoo", "loopstack", "prometheus", "grafana"} <= set(services)
    assert services["zoo"]["build"]["target"] == "training" and services["loopstack"]["build"]["target"] == "runtime"
    assert services["zoo"]["restart"] == "no"  # it exits when the zoo is built
    assert "artifacts:/app/artifacts" in services["zoo"]["volumes"]
    assert "artifacts:/app/artifacts:ro" in services["loopstack"]["volumes"]
    assert "artifacts" in compose()["volumes"]
    assert "8000:8000" in services["loopstack"]["ports"]
    grace = services["loopstack"]["stop_grace_period"]
    assert grace.endswith("s") and int(grace[:-1]) >= 60  # covers a drain of queued work


def test_compose_mounts_only_paths_that_exist():
    for name in ("docker-compose.yml", "docker-compose.gpu.yml"):
        for service_name, service in compose(name)["services"].items():
            for volume in service.get("volumes", []):
                host = volume.split(":")[0]
                if host.startswith((".", "/")):
                    assert (REPO / host).exists(), f"{service_name} mounts {host}, which does not exist"


def test_gpu_override_only_changes_services_that_exist():
    base, gpu = compose()["services"], compose("docker-compose.gpu.yml")["services"]
    assert set(gpu) <= set(base)
    for service in gpu.values():
        assert "cu" in service["build"]["args"]["TORCH_INDEX"]
        assert service["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


def test_prometheus_is_debians_line_and_scrapes_the_server():
    services = compose()["services"]
    assert services["prometheus"]["image"].startswith("prom/prometheus:v2.")
    config = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    targets = [t for job in config["scrape_configs"] for s in job["static_configs"] for t in s["targets"]]
    assert targets == ["loopstack:8000"]
    rule_files = [p for pattern in config["rule_files"] for p in (REPO / "deploy").glob(pattern)]
    assert rule_files == [REPO / "deploy" / "rules" / "loopstack.yml"]
    assert "./deploy/rules:/etc/prometheus/rules:ro" in services["prometheus"]["volumes"]


def test_grafana_is_provisioned_with_the_datasource_and_the_dashboard():
    grafana = REPO / "deploy" / "grafana"
    source = yaml.safe_load((grafana / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert source["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((grafana / "provisioning" / "dashboards" / "loopstack.yml").read_text())
    mounted = dict(v.split(":")[:2] for v in compose()["services"]["grafana"]["volumes"])
    assert mounted["./deploy/grafana/dashboards"] == provider["providers"][0]["options"]["path"]
    uid = source["datasources"][0]["uid"]
    panels = json.loads(dashboard.OUT.read_text())["panels"]
    assert panels and all(t["datasource"]["uid"] == uid for p in panels for t in p["targets"])


def test_the_committed_dashboard_json_is_what_its_code_writes():
    assert json.loads(dashboard.OUT.read_text()) == dashboard.grafana_json()


def rule_expressions() -> list[tuple[str, str]]:
    rules = yaml.safe_load((REPO / "deploy" / "rules" / "loopstack.yml").read_text())
    return [(r.get("record") or r["alert"], r["expr"]) for g in rules["groups"] for r in g["rules"]]


def dashboard_expressions() -> list[tuple[str, str]]:
    return [(p.title, q.expr) for p in dashboard.PANELS for q in p.queries]


@pytest.mark.parametrize("name, expr", rule_expressions() + dashboard_expressions())
def test_every_promql_expression_parses(name, expr):
    promql_parser.parse(expr)


def test_promql_reads_only_series_the_server_exports_or_the_rules_record():
    documented = set(re.findall(r"^\| `(loopstack_\w+)`", (REPO / "docs" / "metrics.md").read_text(), re.M))
    recorded = {name for name, _ in rule_expressions() if ":" in name}
    for name, expr in rule_expressions() + dashboard_expressions():
        for series in re.findall(r"\bloopstack[:_][\w:]+", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", series)
            assert series in recorded or series in documented or base in documented, f"{name} reads {series}"
    assert {"LoopstackDown", "LoopstackHigh5xxRate", "LoopstackQueueSaturated", "LoopstackSlowResponses",
            "LoopstackArtifactRefused"} <= {name for name, _ in rule_expressions()}


def test_ci_runs_exactly_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"^\s*(make \w+)\s*(?:#.*)?$", readme, re.M)
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    assert "make test" in commands and "make serve" in commands
    assert ci == ["make test"]


def test_ray_serve_config_is_valid_and_names_every_deployment_the_builder_makes():
    from ray.serve.schema import ServeDeploySchema

    from server.distributed.app import served_models
    from server.settings import Settings

    config = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "deploy" / "ray" / "serve.yaml").read_text()))
    (app,) = config.applications
    assert app.import_path == "server.distributed.app:build"
    images, has_chat = served_models(Settings(artifact_root=REPO / "no-such-root", _env_file=None))
    made = {"front"} | {f"images-{name}" for name in images} | ({"chat"} if has_chat else set())
    assert {d.name for d in app.deployments} == made


def test_ray_prometheus_discovers_replicas_through_the_front_with_the_same_job_and_rules():
    config = yaml.safe_load((REPO / "deploy" / "ray" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "loopstack"  # the rules and the dashboard select this job
    assert job["http_sd_configs"][0]["url"].endswith("/metrics/targets")
    rule_files = [p for pattern in config["rule_files"] for p in (REPO / "deploy" / "ray").glob(pattern)]
    assert [p.resolve() for p in rule_files] == [REPO / "deploy" / "rules" / "loopstack.yml"]
