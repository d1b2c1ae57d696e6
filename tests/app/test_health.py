"""`GET /readyz` on real PostgreSQL, Redis and anvil, and with each of them unreachable; Flower
behind its login."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from flask.testing import FlaskClient

from app import create_app
from conftest import service_env
from deploy.stack import Supervisor, flower_basic_auth, flower_command
from mintq.services import Services
from mintq.settings import Settings


@pytest.fixture
def dead_port() -> Iterator[int]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]  # bound, never listening: connections are refused


def assert_not_ready(client: FlaskClient, down: str) -> dict[str, str]:
    started = time.monotonic()
    response = client.get("/readyz")
    assert time.monotonic() - started < 5
    assert response.status_code == 503, response.get_data(as_text=True)
    assert response.headers["Retry-After"]
    body = response.get_json()
    assert body["error"] == "not_ready"
    assert down in body["message"]
    checks: dict[str, str] = body["details"]
    assert checks[down] == "unavailable: connection refused"
    assert {name for name, state in checks.items() if state == "ok"} == {
        "database",
        "redis",
        "chain",
    } - {down}
    return checks


def test_ready_when_every_dependency_answers(services: Services) -> None:
    client = create_app(services=services).test_client()
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.get_json() == {
        "status": "ready",
        "checks": {"database": "ok", "redis": "ok", "chain": "ok"},
    }
    assert client.get("/healthz").get_json() == {"status": "ok"}


def test_not_ready_without_the_chain(settings: Settings, dead_port: int, clean_db: None) -> None:
    down = settings.replace(rpc_url=f"http://127.0.0.1:{dead_port}")
    assert_not_ready(create_app(down).test_client(), "chain")


def test_not_ready_without_the_database(settings: Settings, dead_port: int, clean_db: None) -> None:
    down = settings.replace(database_url=f"postgresql+psycopg2://postgres@127.0.0.1:{dead_port}/x")
    client = create_app(down).test_client()
    assert_not_ready(client, "database")
    # Alive all the same: a process restart would not bring the database back.
    assert client.get("/healthz").status_code == 200


def test_not_ready_without_redis(settings: Settings, dead_port: int, clean_db: None) -> None:
    down = settings.replace(redis_url=f"redis://127.0.0.1:{dead_port}/0")
    assert_not_ready(create_app(down).test_client(), "redis")


def test_flower_asks_for_the_login(settings: Settings, clean_db: None, tmp_path: Path) -> None:
    auth, generated = flower_basic_auth({})
    assert generated and auth.startswith("admin:") and len(auth) > len("admin:") + 16
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    supervisor = Supervisor(log_dir=tmp_path)
    supervisor.start("flower", flower_command(port, auth), service_env(settings))
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert supervisor.first_exited() is None, (tmp_path / "flower.log").read_text()
            try:
                anonymous = requests.get(url, timeout=2)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "Flower did not start"
                time.sleep(0.1)
        assert anonymous.status_code == 401
        assert requests.get(url, auth=("admin", "wrong"), timeout=2).status_code == 401
        user, _, password = auth.partition(":")
        assert requests.get(url, auth=(user, password), timeout=5).status_code == 200
    finally:
        supervisor.stop("flower", signal.SIGKILL)


@pytest.mark.parametrize("value", ["admin", ":secret", "admin:", "a:b,broken"])
def test_a_malformed_flower_login_stops_the_stack(value: str) -> None:
    with pytest.raises(SystemExit, match="FLOWER_BASIC_AUTH"):
        flower_basic_auth({"FLOWER_BASIC_AUTH": value})
    assert flower_basic_auth({"FLOWER_BASIC_AUTH": "ops:s3cret:with-colon"}) == (
        "ops:s3cret:with-colon",
        False,
    )
