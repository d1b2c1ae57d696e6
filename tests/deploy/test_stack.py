"""`python -m deploy.stack`, what `scripts/up.sh` runs: the whole system on its own chain, a
paid mint through it, a dead worker started again, and Ctrl-C stopping every process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests
from redis import Redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from conftest import free_ports
from deploy.stack import REPO_ROOT

STACK_START_SECONDS = 120


def wait_for(check: object, timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()  # type: ignore[operator]
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def batch_worker(stack: psutil.Process) -> psutil.Process | None:
    """The batch worker's main process: circus's child running `celery worker --queues celery`."""
    for child in stack.children(recursive=True):
        try:
            argv = child.cmdline()
        except psutil.NoSuchProcess:
            continue
        batch = (
            "celery" in argv and "--queues" in argv and "celery" in argv[argv.index("--queues") :]
        )
        parent = child.parent()
        if batch and parent is not None and "celery" not in parent.cmdline():
            return child
    return None


@pytest.fixture
def stack(tmp_path: Path, database_url: str, redis_url: str) -> Iterator[tuple[dict, Path]]:
    api, flower, anvil, events = free_ports(4)
    url = str(make_url(database_url).set(database=f"mintq_stack_{os.getpid()}"))
    env = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/root"),
        "DATABASE_URL": url,
        "REDIS_URL": redis_url,
        "EVENTS_PORT": str(events),
    }
    output = tmp_path / "stack.out"
    with output.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "deploy.stack", "--api-port", str(api),
             "--flower-port", str(flower), "--anvil-port", str(anvil),
             "--state-dir", str(tmp_path / "state")],
            cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    ports = {"api": api, "anvil": anvil, "flower": flower, "events": events, "pid": process.pid}
    try:
        yield ports, output
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                for child in psutil.Process(process.pid).children(recursive=True):
                    child.kill()
                process.kill()
        Redis.from_url(redis_url).flushdb()
        admin = create_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)'))
        admin.dispose()


def test_up_serves_a_paid_mint_restarts_a_dead_worker_and_ctrl_c_stops_all(
    stack: tuple[dict, Path],
) -> None:
    ports, output = stack
    api = f"http://127.0.0.1:{ports['api']}"

    def healthy() -> bool:
        try:
            return requests.get(f"{api}/healthz", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    wait_for(healthy, STACK_START_SECONDS, "the API of the stack")
    root = psutil.Process(ports["pid"])
    processes = root.children(recursive=True)

    # A buyer pays by hand, as docs/tutorial.md shows, and the mint completes.
    tx_hash = subprocess.run(
        [sys.executable, "-m", "deploy.pay", "--api", api,
         "--rpc-url", f"http://127.0.0.1:{ports['anvil']}", "transfer"],
        cwd=REPO_ROOT, check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    posted = requests.post(f"{api}/mint", json={"paymentType": "custom", "txHash": tx_hash})
    assert posted.status_code == 202, posted.text
    item = f"{api}/queue/item/{posted.json()['queueId']}"

    def completed() -> bool:
        return requests.get(item, timeout=5).json()["status"] == "completed"

    wait_for(completed, 60, "the mint to complete")

    # Its live updates: the API sends the stream to the stack's event service (EVENTS_PORT),
    # which gives the final state and ends it.
    stream = requests.get(f"{item}/events", stream=True, timeout=30)
    assert stream.url.startswith(f"http://127.0.0.1:{ports['events']}/"), stream.url
    assert '"status":"completed"' in stream.text

    # A worker that dies is started again.
    worker = wait_for(lambda: batch_worker(root), 10, "the batch worker")
    assert isinstance(worker, psutil.Process)
    worker.kill()
    worker.wait(10)
    replacement = wait_for(
        lambda: (w := batch_worker(root)) is not None and w.pid != worker.pid and w,
        30,
        "the batch worker to be started again",
    )
    assert isinstance(replacement, psutil.Process)

    # One terminal, each line labelled with its process.
    shown = output.read_text()
    for name in ("api", "worker", "webhooks", "beat", "flower"):
        assert f"{name:>8} | " in shown, name

    # Ctrl-C stops everything, the chain too.
    processes = [p for p in root.children(recursive=True) if p.is_running()]
    os.kill(ports["pid"], signal.SIGINT)
    assert root.wait(45) == 0
    _, alive = psutil.wait_procs(processes, timeout=10)
    assert alive == [], [p.cmdline() for p in alive]
