"""Redis connections whose timeout the kernel enforces: a silent server still fails fast."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from redis import Redis, RedisError

from mintq.sockets import KernelTimeoutRedisConnection


@pytest.fixture
def silent_server() -> Iterator[int]:
    """Accepts connections and never answers (a hung Redis)."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()
    listener.settimeout(0.05)

    def accept() -> None:
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(5)
    for conn in accepted:
        conn.close()
    listener.close()


def lean_client(url: str, timeout: float) -> Redis:
    return Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        connection_class=KernelTimeoutRedisConnection,
    )


def outcome(call: Callable[[], object]) -> tuple[BaseException | None, float]:
    """Run `call` in a thread (a client that never times out would hang the test run)."""
    result: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            result.append(None)
        except BaseException as exc:  # handed to the test
            result.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(5)
    assert result, "the command never returned"
    return result[0], time.monotonic() - started


def test_a_silent_redis_fails_within_the_timeout(silent_server: int) -> None:
    client = lean_client(f"redis://127.0.0.1:{silent_server}/0", 0.3)
    error, waited = outcome(client.ping)
    assert isinstance(error, RedisError)
    assert 0.25 < waited < 1.5


def test_connections_stay_blocking_through_pool_checkouts(redis_url: str) -> None:
    """The pool's check of each connection it hands out reads with a timeout of its own;
    afterwards the socket must be blocking again, not back to a Python-level timeout."""
    client = lean_client(redis_url, 0.3)
    for value in ("1", "2"):  # the second command's checkout runs the check
        client.set("mintq:test:lean", value)
    assert client.get("mintq:test:lean") == b"2"
    connection = client.connection_pool.get_connection()
    try:
        assert connection._sock is not None
        assert connection._sock.gettimeout() is None
    finally:
        client.connection_pool.release(connection)
        client.delete("mintq:test:lean")
