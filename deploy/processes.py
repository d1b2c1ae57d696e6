"""The command line of every long-running mintq process, written once.

The dev stack (`deploy.stack`, run by `scripts/up.sh`), tests and benchmarks call the builders
below; the container image runs them through this module's entry point:

    python -m deploy.processes api|events|worker|webhooks|beat|flower [options]

which replaces itself with the process (so it gets the signals), and `deploy/entrypoint.sh`
sends a role name there, so compose says `command: ["worker"]`. gunicorn's own settings are in
`gunicorn.conf.py`. Nothing heavy is imported here: a container starts a process through it.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NoReturn

REPO_ROOT = Path(__file__).resolve().parents[1]
STATE_DIR = REPO_ROOT / ".mintq"
GUNICORN_CONFIG = REPO_ROOT / "gunicorn.conf.py"
PYTHON = sys.executable

ROLES = ("api", "events", "worker", "webhooks", "beat", "flower")
DEFAULT_EVENTS_PORT = 8001  # as mintq.settings' EVENTS_PORT, where the API redirects streams


def api_command(
    port: int,
    workers: int | None = None,
    host: str = "127.0.0.1",
    threads: int | None = None,
    *,
    access_log: bool = False,
) -> list[str]:
    """The API under gunicorn with `gunicorn.conf.py`; workers and threads default to it."""
    return [
        PYTHON, "-m", "gunicorn", "--config", str(GUNICORN_CONFIG),
        "--bind", f"{host}:{port}",
        *(["--workers", str(workers)] if workers else []),
        *(["--threads", str(threads)] if threads else []),
        *(["--access-logfile", "-"] if access_log else []),
    ]  # fmt: skip


def events_command(port: int = DEFAULT_EVENTS_PORT, host: str = "127.0.0.1") -> list[str]:
    """The event service (live updates, `app.event_service`): one asyncio process."""
    return [PYTHON, "-m", "app.event_service", "--host", host, "--port", str(port)]


def worker_command(name: str = "worker", concurrency: int = 2, queue: str = "celery") -> list[str]:
    """A Celery worker: by default the batch worker (batches, confirmations)."""
    return [
        PYTHON, "-m", "celery", "-A", "tasks", "worker",
        "--loglevel", "INFO",
        "--concurrency", str(concurrency),
        "--queues", queue,
        "--hostname", f"{name}@%h",
    ]  # fmt: skip


def webhook_worker_command(name: str = "webhooks", concurrency: int = 2) -> list[str]:
    """The worker that delivers webhooks, apart from the batch worker (see celeryconfig)."""
    return worker_command(name, concurrency, queue="webhooks")


def beat_command(schedule_file: Path) -> list[str]:
    return [
        PYTHON, "-m", "celery", "-A", "tasks", "beat",
        "--loglevel", "INFO",
        "--schedule", str(schedule_file),
    ]  # fmt: skip


def flower_command(port: int, basic_auth: str, host: str = "127.0.0.1") -> list[str]:
    return [
        PYTHON, "-m", "celery", "-A", "tasks", "flower",
        f"--port={port}", f"--address={host}", f"--basic-auth={basic_auth}",
    ]  # fmt: skip


def flower_basic_auth(env: Mapping[str, str]) -> tuple[str, bool]:
    """Flower's `user:password` from FLOWER_BASIC_AUTH, or `admin` and a new random password.

    Returns the credentials and whether they were generated (and so must be shown once).
    """
    configured = env.get("FLOWER_BASIC_AUTH", "").strip()
    if not configured:
        return f"admin:{secrets.token_urlsafe(16)}", True
    for credential in configured.split(","):
        user, _, password = credential.partition(":")
        if not user or not password:
            raise SystemExit("FLOWER_BASIC_AUTH must be user:password (see .env.example)")
    return configured, False


def print_generated_logins(*, flower_auth: str | None, admin_token: str | None) -> None:
    """Show the credentials the stack made up, once; configured ones (None) are never shown."""
    if flower_auth is not None:
        print(f"Flower login: admin / {flower_auth.partition(':')[2]}", flush=True)
    if admin_token is not None:
        print(
            f"Admin API token: {admin_token}  (Authorization: Bearer <token>; "
            "set ADMIN_TOKEN in .env to keep one across restarts)",
            flush=True,
        )


# --- the entry point ---------------------------------------------------------------------


def _parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.processes", description=__doc__.split("\n\n")[0]
    )
    roles = parser.add_subparsers(dest="role", required=True, metavar="|".join(ROLES))

    def listening(role: argparse.ArgumentParser, port_variable: str, port: int) -> None:
        # 127.0.0.1 unless told: a container says 0.0.0.0 (Dockerfile, docker-compose.yml).
        role.add_argument("--host", default="127.0.0.1")
        role.add_argument("--port", type=int, default=int(environ.get(port_variable) or port))

    api = roles.add_parser("api", help="the HTTP API under gunicorn")
    listening(api, "API_PORT", 8000)
    api.add_argument("--workers", type=int, help="default: gunicorn.conf.py")
    api.add_argument("--threads", type=int, help="default: gunicorn.conf.py")
    api.add_argument("--access-log", action="store_true")

    events = roles.add_parser("events", help="the event service (live updates)")
    listening(events, "EVENTS_PORT", DEFAULT_EVENTS_PORT)

    for role, what in (("worker", "the batch worker"), ("webhooks", "the webhook worker")):
        worker = roles.add_parser(role, help=what)
        worker.add_argument("--name", default=role, help="the node name before @host")
        worker.add_argument("--concurrency", type=int, default=2)

    beat = roles.add_parser("beat", help="Celery beat")
    beat.add_argument("--schedule", type=Path, default=STATE_DIR / "celerybeat-schedule")

    flower = roles.add_parser("flower", help="Flower, behind FLOWER_BASIC_AUTH or a made-up login")
    listening(flower, "FLOWER_PORT", 5555)
    return parser


def command_line(argv: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """The command line that `python -m deploy.processes *argv` runs with `environ`."""
    args = _parser(environ).parse_args(argv)
    if args.role == "api":
        return api_command(
            args.port, args.workers, args.host, args.threads, access_log=args.access_log
        )
    if args.role == "events":
        return events_command(args.port, args.host)
    if args.role == "worker":
        return worker_command(args.name, args.concurrency)
    if args.role == "webhooks":
        return webhook_worker_command(args.name, args.concurrency)
    if args.role == "beat":
        args.schedule.parent.mkdir(parents=True, exist_ok=True)
        return beat_command(args.schedule)
    auth, generated = flower_basic_auth(environ)
    print_generated_logins(flower_auth=auth if generated else None, admin_token=None)
    return flower_command(args.port, auth, args.host)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    command = command_line(sys.argv[1:] if argv is None else argv, os.environ)
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
