"""Every mintq process is started by the command line `deploy.processes` writes, and gunicorn
takes its settings from `gunicorn.conf.py`: the dev stack, tests, the image and compose alike,
so the three can no longer drift apart."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from gunicorn.app.wsgiapp import WSGIApplication
from gunicorn.config import Config

from conftest import free_port, service_env
from deploy import processes, stack
from deploy.processes import ROLES, api_command, command_line
from mintq.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = ROOT / "deploy" / "entrypoint.sh"

# A gunicorn or Celery command line written by hand: `"-m", "gunicorn"`, `celery -A`,
# `"celery", "-A"`, `gunicorn --bind`...
HAND_WRITTEN = re.compile(
    r"""["']-m["'],\s*["'](gunicorn|celery)["']"""
    r"""|["'](gunicorn|celery)["'],\s*["'](-|app\.wsgi)"""
    r"""|\b(gunicorn|celery)\s+(-A|--[a-z])"""
)


def gunicorn_config(command: list[str], monkeypatch: pytest.MonkeyPatch) -> Config:
    """The settings gunicorn runs with for `command` (`python -m gunicorn ...`), as it reads
    its command line and config file."""
    assert command[:3] == [sys.executable, "-m", "gunicorn"]
    monkeypatch.setattr(sys, "argv", ["gunicorn", *command[3:]])
    application = WSGIApplication("%(prog)s [OPTIONS] [APP_MODULE]")
    assert application.app_uri == "app.wsgi:app"
    return application.cfg


def dockerfile_instruction(name: str) -> list[str]:
    [line] = [
        line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith(name)
    ]
    value: list[str] = json.loads(line.removeprefix(name))
    return value


def mintq_services() -> dict[str, dict[str, Any]]:
    """The compose services that run the mintq image."""
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    return {name: s for name, s in services.items() if s.get("image") == "mintq:latest"}


def test_the_image_runs_the_api_by_default_through_deploy_processes() -> None:
    assert dockerfile_instruction("ENTRYPOINT") == ["deploy/entrypoint.sh"]
    assert dockerfile_instruction("CMD")[0] == "api"
    assert "gunicorn.conf.py" in (ROOT / "Dockerfile").read_text()


def test_every_compose_process_is_a_role_of_deploy_processes() -> None:
    started = {}
    for name, service in mintq_services().items():
        if name in ("anvil", "setup"):  # the dev chain, and one-shot migrations
            continue
        assert "entrypoint" not in service, name
        command = service.get("command", dockerfile_instruction("CMD"))
        assert command[0] in ROLES, (name, command)
        # Options the entry point does not take fail here, not in a container.
        command_line(command, {"FLOWER_BASIC_AUTH": "user:password"})
        started[command[0]] = name
    assert set(started) == set(ROLES)


def test_no_gunicorn_or_celery_command_line_is_written_outside_deploy_processes() -> None:
    files = subprocess.run(
        ["git", "ls-files", "*.py", "*.sh", "*.yml", "*.yaml", "*.toml", "Dockerfile"],
        capture_output=True, text=True, cwd=ROOT, check=True,
    ).stdout.split()  # fmt: skip
    allowed = {"deploy/processes.py", "tests/test_processes.py"}
    written = [
        f"{path}:{number}: {line.strip()}"
        for path in files
        if path not in allowed and (ROOT / path).is_file()
        for number, line in enumerate((ROOT / path).read_text().splitlines(), 1)
        if HAND_WRITTEN.search(line)
    ]
    assert written == []
    assert HAND_WRITTEN.search('"python", "-m", "gunicorn", "app.wsgi:app"')
    assert HAND_WRITTEN.search("exec celery -A tasks flower --port=5555")
    assert HAND_WRITTEN.search('command: ["celery", "-A", "tasks", "beat"]')
    assert HAND_WRITTEN.search('CMD ["gunicorn", "app.wsgi:app", "--bind", "0.0.0.0:8000"]')


def test_the_stack_starts_its_processes_with_the_same_builders() -> None:
    for name in ("api_command", "worker_command", "webhook_worker_command", "beat_command",
                 "flower_command", "flower_basic_auth"):  # fmt: skip
        assert getattr(stack, name) is getattr(processes, name)


def test_the_entrypoint_hands_a_role_to_deploy_processes_and_runs_anything_else(
    tmp_path: Path,
) -> None:
    # A stand-in `python` that says how it was called.
    (tmp_path / "python").write_text('#!/bin/sh\necho "python $*"\n')
    (tmp_path / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}

    def entrypoint(*args: str) -> str:
        return subprocess.run(
            ["sh", str(ENTRYPOINT), *args], capture_output=True, text=True, env=env, check=True
        ).stdout.strip()

    for role in ROLES:
        assert entrypoint(role, "--help") == f"python -m deploy.processes {role} --help"
    assert entrypoint("echo", "api") == "api"
    assert entrypoint("python", "-m", "deploy.stack") == "python -m deploy.stack"


def test_the_container_api_takes_gunicorn_conf_py(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WEB_CONCURRENCY", raising=False)
    cfg = gunicorn_config(command_line(dockerfile_instruction("CMD"), {}), monkeypatch)
    assert cfg.bind == ["0.0.0.0:8000"]
    assert cfg.workers == 2 * (os.cpu_count() or 1)
    assert cfg.worker_class_str == "gthread" and cfg.threads == 8
    assert cfg.graceful_timeout == 20
    assert cfg.worker_tmp_dir == ("/dev/shm" if Path("/dev/shm").is_dir() else None)
    assert cfg.accesslog is None  # nginx writes it


def test_a_caller_chooses_port_workers_threads_and_the_access_log(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = gunicorn_config(api_command(8123, workers=3, threads=2, access_log=True), monkeypatch)
    assert cfg.bind == ["127.0.0.1:8123"]
    assert (cfg.workers, cfg.threads, cfg.accesslog) == (3, 2, "-")
    assert cfg.worker_class_str == "gthread" and cfg.graceful_timeout == 20


def test_the_api_answers_when_started_as_the_container_starts_it(
    settings: Settings, tmp_path: Path
) -> None:
    port = free_port()
    # The entry point runs `python`: this interpreter.
    env = {**service_env(settings), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    supervisor = stack.Supervisor(log_dir=tmp_path)
    process = supervisor.start(
        "api",
        ["sh", str(ENTRYPOINT), "api", "--port", str(port), "--workers", "1", "--threads", "2"],
        env,
    )
    try:
        stack.wait_until_serving(port, supervisor)
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        # The shell and the entry point replaced themselves: gunicorn's master gets the signals.
        cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")
        assert b"gunicorn" in cmdline
    finally:
        supervisor.stop_all()
    assert process.returncode == 0, (tmp_path / "api.log").read_text()


def test_the_event_service_answers_when_started_as_the_container_starts_it(
    settings: Settings, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        **service_env(settings),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "EVENTS_PORT": str(port),  # as compose's `events` takes its port from the environment
    }
    supervisor = stack.Supervisor(log_dir=tmp_path)
    process = supervisor.start("events", ["sh", str(ENTRYPOINT), "events"], env)
    try:
        stack.wait_until_serving(port, supervisor)
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).json()["status"] == "ok"
        cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")
        assert b"app.event_service" in cmdline
    finally:
        supervisor.stop_all()
    assert process.returncode == 0, (tmp_path / "events.log").read_text()
