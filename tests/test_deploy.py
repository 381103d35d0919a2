"""No Docker engine runs in CI, so the deployment files are checked for what can break them."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def test_compose_mounts_only_files_that_exist():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"loopstack", "prometheus"} <= set(services)
    assert (REPO / services["loopstack"]["build"]["context"] / "Dockerfile").is_file()
    for name, service in services.items():
        for volume in service.get("volumes", []):
            host = volume.split(":")[0]
            if host.startswith((".", "/")):
                assert (REPO / host).exists(), f"{name} mounts {host}, which does not exist"


def test_prometheus_scrapes_the_server_service_on_its_port():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    config = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    targets = [t for job in config["scrape_configs"] for s in job["static_configs"] for t in s["targets"]]
    assert "loopstack:8000" in targets
    assert "8000:8000" in compose["services"]["loopstack"]["ports"]


def test_dockerfile_copies_files_that_exist():
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY"):
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), f"Dockerfile copies missing {source}"


def test_ci_runs_exactly_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"^\s*(make \w+)\s*(?:#.*)?$", readme, re.M)
    ci = [l.strip() for l in (REPO / ".ci" / "run").read_text().splitlines()
          if l.strip() and not l.startswith("#") and not l.startswith(("set ", "cd "))]
    assert "make test" in commands and "make serve" in commands
    assert ci == ["make test"]
