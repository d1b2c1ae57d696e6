"""docker-compose.yml describes the same system; no Docker engine runs here, so the file is
validated with the compose client (Debian's docker-compose)."""

import re
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
    expected = {"postgres", "redis", "anvil", "setup", "api1", "api2", "events", "nginx",
                "worker", "webhooks", "beat", "flower"}  # fmt: skip
    assert expected <= set(services)
    assert "healthcheck" in services["api1"] and "healthcheck" in services["nginx"]
    assert "events" in services["nginx"]["depends_on"]
    upstreams = (ROOT / "deploy" / "nginx.conf").read_text()
    assert "server api1:8000" in upstreams and "server api2:8000" in upstreams


def test_nginx_sends_event_streams_to_the_event_service_unbuffered() -> None:
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    streams = re.search(r"location ~ \^/queue/item/\[\^/\]\+/events\$ \{(.*?)\}", conf, re.S)
    assert streams is not None
    upstream = re.search(r"upstream mintq_events \{(.*?)\}", conf, re.S)
    assert upstream is not None and "server events:8001" in upstream.group(1)
    assert "proxy_pass http://mintq_events;" in streams.group(1)
    assert "proxy_buffering off;" in streams.group(1)
