"""Bring the whole mintq system up on this machine and keep it running until Ctrl-C.

`python -m deploy.stack` (what `scripts/up.sh` runs after installing everything):
database and migrations, the embedded anvil chain with its contracts when no RPC_URL is set,
then the API under gunicorn, a Celery worker, Celery beat and Flower. Logins not configured
(Flower's, the admin API's token) are made up and printed once. The processes run under
circus: one terminal of labelled lines, a process that exits is started again, and Ctrl-C (or
SIGTERM) stops them all. Tests and benchmarks start the same command lines one by one with
`Supervisor`, which lets them kill and restart a chosen process at a chosen moment.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from alembic import command
from alembic.config import Config
from circus import get_arbiter
from circus.exc import ConflictError
from circus.stream import StdoutStream
from dotenv import dotenv_values
from eth_account import Account
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from web3 import Web3

from deploy.devchain import ANVIL_KEYS, Anvil, deploy, start_anvil
from deploy.processes import (  # the command lines, also imported from here by tests
    REPO_ROOT,
    STATE_DIR,
    api_command,
    beat_command,
    command_line,
    flower_basic_auth,
    flower_command,
    print_generated_logins,
    webhook_worker_command,
    worker_command,
)
from mintq.settings import DEFAULT_DATABASE_URL, DEFAULT_REDIS_URL, MIN_ADMIN_TOKEN_LENGTH

# Dev chain roles: account 0 deploys, account 1 is the hot wallet, account 2 receives payments.
DEV_DEPLOYER_KEY = ANVIL_KEYS[0]
DEV_MINTER_KEY = ANVIL_KEYS[1]
DEV_PAY_TO_KEY = ANVIL_KEYS[2]
DEV_PAY_TO = Account.from_key(DEV_PAY_TO_KEY).address
DEV_PRICE = "1000000"  # 1 USDC (6 decimals)
DEV_MINT_AMOUNT = 100 * 10**18


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_until_serving(
    port: int, supervisor: Supervisor | None = None, timeout: float = 60, host: str = "127.0.0.1"
) -> None:
    """Wait until the API on `port` answers `/healthz`. Gunicorn listens before its workers
    have booted, and a boot imports web3 and the x402 SDK: seconds, on a busy machine."""
    deadline = time.monotonic() + timeout
    while True:
        url = f"http://{host}:{port}/healthz"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                return
        dead = supervisor.first_exited() if supervisor else None
        if dead:
            raise RuntimeError(f"{dead} exited while the API was starting")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the API on port {port} did not answer /healthz in {timeout:g} s")
        time.sleep(0.1)


def load_env_file(path: Path) -> dict[str, str]:
    """The variables a `.env` file sets (python-dotenv's syntax, as compose reads it)."""
    return {key: value for key, value in dotenv_values(path).items() if value is not None}


def stack_env(environ: Mapping[str, str], env_file: Path) -> dict[str, str]:
    """The environment of every process the stack starts: `env_file` (`.env`), overridden by
    `environ` (the real environment), then defaults."""
    env = {**load_env_file(env_file), **environ}
    env.setdefault("DATABASE_URL", DEFAULT_DATABASE_URL)
    env.setdefault("REDIS_URL", DEFAULT_REDIS_URL)
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --- database ----------------------------------------------------------------------------


def ensure_database(url: str, *, recreate: bool = False) -> None:
    """Create the database named in `url` if missing (or drop and create it when `recreate`)."""
    target = make_url(url)
    name = target.database
    if not name:
        raise SystemExit(f"DATABASE_URL names no database: {url}")
    admin = create_engine(target.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            exists = conn.scalar(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name})
            quoted = '"' + name.replace('"', '""') + '"'
            if exists and recreate:
                conn.execute(text(f"DROP DATABASE {quoted} WITH (FORCE)"))
                exists = None
            if not exists:
                conn.execute(text(f"CREATE DATABASE {quoted}"))
    finally:
        admin.dispose()


def migrate(url: str) -> None:
    """`alembic upgrade head` against `url`."""
    config = Config(str(REPO_ROOT / "db" / "alembic.ini"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["configure_logger"] = False
    command.upgrade(config, "head")


# --- processes ---------------------------------------------------------------------------


@dataclass
class Supervisor:
    """Starts named processes in their own process groups and stops them together: a test
    harness (faults are injected into one process at a time), not the stack's supervisor."""

    output: IO[str] | None = None
    log_dir: Path | None = None
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    commands: dict[str, tuple[list[str], dict[str, str]]] = field(default_factory=dict)
    restarts: dict[str, list[float]] = field(default_factory=dict)

    def start(
        self, name: str, args: Sequence[str], env: Mapping[str, str]
    ) -> subprocess.Popen[bytes]:
        self.commands[name] = (list(args), dict(env))
        log_file = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log_file = (self.log_dir / f"{name}.log").open("ab")
        process = subprocess.Popen(
            list(args),
            cwd=REPO_ROOT,
            env=dict(env),
            stdout=subprocess.PIPE if self.output is not None else (log_file or subprocess.DEVNULL),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if self.output is not None:
            threading.Thread(target=self._pump, args=(name, process, log_file), daemon=True).start()
        elif log_file is not None:
            log_file.close()
        self.processes[name] = process
        return process

    def _pump(
        self, name: str, process: subprocess.Popen[bytes], log_file: IO[bytes] | None
    ) -> None:
        assert process.stdout is not None and self.output is not None
        for line in process.stdout:
            if log_file is not None:
                log_file.write(line)
                log_file.flush()
            self.output.write(f"{name:>7} | {line.decode(errors='replace')}")
            self.output.flush()
        if log_file is not None:
            log_file.close()

    def stop(self, name: str, sig: signal.Signals = signal.SIGTERM, timeout: float = 15) -> None:
        """Signal a process group and wait for it; SIGKILL it if it does not stop in time."""
        process = self.processes.pop(name, None)
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        # Children that outlived the group leader (a pool worker) go too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for name in reversed(list(self.processes)):
            self.stop(name)

    def restart_exited(self, max_restarts: int = 5, window: float = 60.0) -> list[str]:
        """Start again every process that exited, as systemd's Restart=always would (a Celery
        worker can die when the broker goes away). Raises RuntimeError for a process that
        keeps dying: more than `max_restarts` within `window` seconds."""
        restarted = []
        for name, process in list(self.processes.items()):
            if process.poll() is None:
                continue
            now = time.monotonic()
            recent = [t for t in self.restarts.get(name, []) if now - t < window] + [now]
            self.restarts[name] = recent
            if len(recent) > max_restarts:
                raise RuntimeError(f"{name} keeps exiting (code {process.returncode})")
            self.stop(name)
            args, env = self.commands[name]
            self.start(name, args, env)
            restarted.append(name)
        return restarted

    def first_exited(self) -> str | None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                return name
        return None


def admin_token(env: Mapping[str, str]) -> tuple[str, bool]:
    """The admin API's bearer token from ADMIN_TOKEN, or a new random one, so that an operator
    can use the admin API of a stack started without configuring it (the app alone answers
    503 `admin_disabled` then).

    Returns the token and whether it was generated (and so must be shown once).
    """
    configured = env.get("ADMIN_TOKEN", "").strip()
    if not configured:
        return secrets.token_urlsafe(32), True
    if len(configured) < MIN_ADMIN_TOKEN_LENGTH:
        # The API would refuse to start, again and again: say why once, here.
        raise SystemExit(
            f"ADMIN_TOKEN must be at least {MIN_ADMIN_TOKEN_LENGTH} characters (see .env.example)"
        )
    return configured, False


# --- main --------------------------------------------------------------------------------


def _deploy_dev_contracts(env: dict[str, str], rpc_url: str) -> None:
    """Deploy MockUSDC and MintToken on a dev chain and put their addresses into `env`."""
    minter_key = env.get("MINTER_PRIVATE_KEY") or DEV_MINTER_KEY
    deployment = deploy(
        rpc_url,
        DEV_DEPLOYER_KEY,
        Account.from_key(minter_key).address,
        int(env.get("MINT_AMOUNT") or DEV_MINT_AMOUNT),
    )
    env.update(
        RPC_URL=rpc_url,
        USDC_ADDRESS=deployment.usdc,
        TOKEN_ADDRESS=deployment.token,
        MINTER_PRIVATE_KEY=minter_key,
        PAY_TO=env.get("PAY_TO") or DEV_PAY_TO,
        # payTo's dev key: refunds come out of the USDC paid in.
        REFUND_PRIVATE_KEY=env.get("REFUND_PRIVATE_KEY") or DEV_PAY_TO_KEY,
        PRICE=env.get("PRICE") or DEV_PRICE,
    )
    print(f"deployed MockUSDC at {deployment.usdc} and MintToken at {deployment.token}")


def write_chain_env(env: Mapping[str, str], path: Path) -> None:
    """Record where the app and workers find the chain and contracts (sourced by compose)."""
    keys = ("RPC_URL", "USDC_ADDRESS", "TOKEN_ADDRESS", "PAY_TO", "PRICE")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k}={env[k]}\n" for k in keys if env.get(k)))


def _embedded_chain(env: dict[str, str], args: argparse.Namespace) -> Anvil:
    if port_in_use(args.anvil_port):
        raise SystemExit(
            f"port {args.anvil_port} is taken: stop the other node, or set RPC_URL to use it"
        )
    print(f"starting anvil on 127.0.0.1:{args.anvil_port} (block time {args.block_time}s)")
    anvil = start_anvil(
        port=args.anvil_port, block_time=args.block_time, log_path=args.state_dir / "anvil.log"
    )
    _deploy_dev_contracts(env, anvil.rpc_url)
    return anvil


def _contracts_live(rpc_url: str, token: str | None) -> bool:
    """Whether `token` is configured and has code on the chain (a restarted dev chain has none)."""
    if not token:
        return False
    w3 = Web3(Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": 10}))
    return len(w3.eth.get_code(Web3.to_checksum_address(token))) > 0


def setup(env: dict[str, str], *, recreate_database: bool) -> None:
    """Database and schema, and dev contracts when a dev chain has none configured."""
    rpc_url = env.get("RPC_URL")
    if rpc_url and not _contracts_live(rpc_url, env.get("TOKEN_ADDRESS")):
        if env.get("DEPLOY_DEV_CONTRACTS", "").lower() not in ("1", "true", "yes"):
            raise SystemExit(
                "RPC_URL is set but TOKEN_ADDRESS is not a contract there: configure it, or set "
                "DEPLOY_DEV_CONTRACTS=true to deploy test contracts on a dev chain"
            )
        _deploy_dev_contracts(env, rpc_url)
    ensure_database(env["DATABASE_URL"], recreate=recreate_database)
    migrate(env["DATABASE_URL"])
    print("database migrated")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.stack", description=__doc__)
    parser.add_argument("--api-port", type=int, default=int(os.environ.get("API_PORT", "8000")))
    parser.add_argument(
        "--flower-port", type=int, default=int(os.environ.get("FLOWER_PORT", "5555"))
    )
    parser.add_argument("--anvil-port", type=int, default=int(os.environ.get("ANVIL_PORT", "8545")))
    parser.add_argument(
        "--block-time", type=float, default=float(os.environ.get("DEV_BLOCK_TIME", "1"))
    )
    parser.add_argument(
        "--setup-only",
        action="store_true",
        help="migrate (and deploy dev contracts if needed), write --env-out, and exit",
    )
    parser.add_argument(
        "--state-dir", type=Path, default=STATE_DIR, help="logs, beat schedule, control sockets"
    )
    parser.add_argument("--env-out", type=Path, help="default: <state dir>/chain.env")
    args = parser.parse_args(argv)

    args.state_dir.mkdir(parents=True, exist_ok=True)
    args.env_out = args.env_out or args.state_dir / "chain.env"
    env = stack_env(os.environ, REPO_ROOT / ".env")
    if args.setup_only:
        setup(env, recreate_database=False)
        write_chain_env(env, args.env_out)
        return 0
    for port, what in ((args.api_port, "API"), (args.flower_port, "Flower")):
        if port_in_use(port):
            raise SystemExit(f"port {port} for the {what} is taken: is mintq already running?")
    flower_auth, flower_generated = flower_basic_auth(env)
    token, token_generated = admin_token(env)

    anvil = None
    try:
        embedded = not env.get("RPC_URL")
        if embedded:
            anvil = _embedded_chain(env, args)
        # The embedded chain is new on every start, so rows of the last run's chain must go.
        setup(env, recreate_database=embedded)
        write_chain_env(env, args.env_out)

        api_env = {**env, "ADMIN_TOKEN": token}  # the API is the one process that needs it
        commands = {
            "api": (api_command(args.api_port, access_log=True), api_env),
            "events": (command_line(["events"], env), env),  # EVENTS_PORT
            "worker": (worker_command(), env),
            "webhooks": (webhook_worker_command(), env),
            "beat": (beat_command(args.state_dir / "celerybeat-schedule"), env),
            "flower": (flower_command(args.flower_port, flower_auth), env),
        }
        print_generated_logins(
            flower_auth=flower_auth if flower_generated else None,
            admin_token=token if token_generated else None,
        )
        print(
            f"\nmintq is up: API http://127.0.0.1:{args.api_port}  "
            f"Flower http://127.0.0.1:{args.flower_port}  chain {env['RPC_URL']}\n"
            "Ctrl-C stops everything.\n",
            flush=True,
        )
        run_supervised(commands, args.state_dir)
        return 0
    finally:
        print("stopping...", flush=True)
        if anvil is not None:
            anvil.stop()
        print("stopped", flush=True)


class Labelled(StdoutStream):
    """A process's output on the stack's terminal, each line after the process's name, and in
    its own file under `.mintq/logs/`. (circus's own streams label lines by pid only.)"""

    def __init__(self, name: str, log_dir: Path) -> None:
        super().__init__()
        self.name = name
        log_dir.mkdir(parents=True, exist_ok=True)
        self.file = (log_dir / f"{name}.log").open("a", encoding="utf-8")

    def __call__(self, data: dict[str, Any]) -> None:
        text = data["data"].decode(errors="replace")
        self.file.write(text)
        self.file.flush()
        sys.stdout.write("".join(f"{self.name:>8} | {line}\n" for line in text.splitlines()))
        sys.stdout.flush()

    def close(self) -> None:
        self.file.close()


def run_supervised(commands: Mapping[str, tuple[list[str], dict[str, str]]], state: Path) -> None:
    """Run `commands` under circus until SIGINT or SIGTERM, then stop them all.

    A process that exits is started again (a Celery worker can die when the broker goes away);
    one that keeps exiting is given up after `max_retry` starts. Its control sockets are local
    files: Flower already listens on circus's default port.
    """
    watchers = [
        {
            "name": name,
            "cmd": shlex.join(argv),
            "env": env,
            "copy_env": False,
            "working_dir": str(REPO_ROOT),
            "respawn": True,
            "max_retry": 5,
            "graceful_timeout": 20,
            "stdout_stream": {"stream": Labelled(name, state / "logs")},
            "stderr_stream": {"stream": Labelled(name, state / "logs")},
        }
        for name, (argv, env) in commands.items()
    ]
    # While it stops, circus's periodic check finds the stop still running and logs that as an
    # error, once a second: noise, not a failure.
    logging.getLogger("tornado.application").addFilter(
        lambda record: not (record.exc_info and isinstance(record.exc_info[1], ConflictError))
    )
    arbiter = get_arbiter(
        watchers,
        controller=f"ipc://{state / 'circus.sock'}",
        pubsub_endpoint=f"ipc://{state / 'circus-events.sock'}",
        check_delay=1.0,
        loglevel="warning",
    )
    arbiter.start()


if __name__ == "__main__":
    raise SystemExit(main())
