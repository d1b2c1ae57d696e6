"""docker-compose.yml describes the same system; no Docker engine runs here, so the file is
validated with the compose client (Debian's docker-compose)."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_compose_file_is_valid() -> None:
    result = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_compose_runs_the_whole_system() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    expected = {"postgres", "redis", "anvil", "setup", "api1", "api2", "nginx", "worker",
                "webhooks", "beat", "flower"}  # fmt: skip
    assert expected <= set(services)
    assert "healthcheck" in services["api1"] and "healthcheck" in services["nginx"]
    upstreams = (ROOT / "deploy" / "nginx.conf").read_text()
    assert "server api1:8000" in upstreams and "server api2:8000" in upstreams
