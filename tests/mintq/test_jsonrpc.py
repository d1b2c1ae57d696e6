"""The lean JSON-RPC client: against the real node, and against a scripted HTTP server for
the answers anvil never gives (chunked bodies, closed connections, errors, silence)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from deploy.devchain import Anvil
from mintq.errors import DependencyUnavailable
from mintq.jsonrpc import JsonRpcClient

# One scripted exchange: gets the request bytes, returns what to answer (None: answer
# nothing) and whether to close the connection afterwards.
Script = Callable[[bytes], tuple[bytes | None, bool]]


def _read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += conn.recv(65536)
    return head + b"\r\n\r\n" + body


@contextmanager
def scripted_server(*scripts: Script) -> Iterator[tuple[str, list[int]]]:
    """An HTTP server answering request N with scripts[N]; yields its URL and, per request,
    the number of the connection it came on."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    connections_seen: list[int] = []
    pending = list(scripts)

    lock = threading.Lock()

    def serve_connection(conn: socket.socket, number: int) -> None:
        with conn:
            while True:
                request = _read_request(conn)
                with lock:
                    if not request or not pending:
                        return
                    connections_seen.append(number)
                    script = pending.pop(0)
                answer, close = script(request)
                if answer is None:
                    threading.Event().wait(2)  # silence, longer than the client waits
                    return
                conn.sendall(answer)
                if close:
                    return

    stopped = threading.Event()
    listener.settimeout(0.05)

    def serve() -> None:
        number = 0
        while not stopped.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)
            number += 1
            threading.Thread(target=serve_connection, args=(conn, number), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}/rpc?key=k", connections_seen
    finally:
        stopped.set()
        thread.join(timeout=5)
        listener.close()


def _echo_id(request: bytes) -> bytes:
    payload = json.loads(request.partition(b"\r\n\r\n")[2])
    return json.dumps({"jsonrpc": "2.0", "id": payload["id"], "result": "0x1"}).encode()


def answer(*headers: str, status: str = "200 OK", close: bool = False) -> Script:
    def script(request: bytes) -> tuple[bytes, bool]:
        body = _echo_id(request)
        head = "\r\n".join([f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *headers])
        return head.encode() + b"\r\n\r\n" + body, close

    return script


def chunked(request: bytes) -> tuple[bytes, bool]:
    body = _echo_id(request)
    chunks = b"".join(
        b"%x;ext=1\r\n%s\r\n" % (len(body[i : i + 7]), body[i : i + 7])
        for i in range(0, len(body), 7)
    )
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n", False


def close_delimited(request: bytes) -> tuple[bytes, bool]:
    return b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + _echo_id(request), True


def silent(_request: bytes) -> tuple[None, bool]:
    return None, True


CALL = {"jsonrpc": "2.0", "id": 7, "method": "eth_chainId", "params": []}


def test_talks_to_the_node_over_one_kept_alive_connection(anvil: Anvil) -> None:
    client = JsonRpcClient(anvil.rpc_url, timeout=5)
    answers = [client.post(CALL) for _ in range(20)]
    assert answers[0] == {"jsonrpc": "2.0", "id": 7, "result": hex(31337)}
    assert all(a == answers[0] for a in answers)
    batch = client.post([{**CALL, "id": 1}, {**CALL, "id": 2, "method": "eth_blockNumber"}])
    assert [a["id"] for a in batch] == [1, 2]


def test_reads_chunked_close_delimited_and_keep_alive_answers() -> None:
    scripts = (answer(), chunked, answer(), close_delimited, answer())
    with scripted_server(*scripts) as (url, connections):
        client = JsonRpcClient(url, timeout=1)
        assert [client.post(CALL)["result"] for _ in scripts] == ["0x1"] * 5
    # Kept alive through the chunked answer; a new connection after the one closed by the
    # server.
    assert connections == [1, 1, 1, 1, 2]


def test_sends_path_query_host_and_basic_auth() -> None:
    seen: list[bytes] = []

    def record(request: bytes) -> tuple[bytes, bool]:
        seen.append(request)
        return answer()(request)

    with scripted_server(record) as (url, _):
        client = JsonRpcClient(url.replace("http://", "http://user:p%40ss@"), timeout=1)
        client.post(CALL)
    head = seen[0].partition(b"\r\n\r\n")[0].decode().split("\r\n")
    assert head[0] == "POST /rpc?key=k HTTP/1.1"
    assert f"Host: {url.split('/')[2]}" in head
    assert "Authorization: Basic dXNlcjpwQHNz" in head  # user:p@ss


def test_a_forked_child_opens_its_own_connection() -> None:
    with scripted_server(answer(), answer(), answer()) as (url, connections):
        client = JsonRpcClient(url, timeout=2)
        client.post(CALL)
        child = os.fork()
        if child == 0:  # the child: one call on whatever connection it has, then exit
            try:
                client.post(CALL)
            finally:
                os._exit(0)
        os.waitpid(child, 0)
        client.post(CALL)
    # Sharing the parent's socket, the child's call would have come on connection 1.
    assert connections == [1, 2, 1]


def test_a_kept_alive_connection_the_server_closed_is_replaced() -> None:
    with scripted_server(answer(close=True), answer()) as (url, connections):
        client = JsonRpcClient(url, timeout=1)
        client.post(CALL)
        assert client.post(CALL)["result"] == "0x1"
    assert connections == [1, 2]


@pytest.mark.parametrize(
    "script",
    [
        answer(status="502 Bad Gateway"),
        lambda _r: (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n<html", False),
        lambda _r: (b"SSH-2.0-OpenSSH\r\n\r\n", True),
        silent,
    ],
    ids=["http-error", "not-json", "not-http", "no-answer"],
)
def test_a_node_that_cannot_answer_is_unavailable(script: Script) -> None:
    with scripted_server(script) as (url, _):
        client = JsonRpcClient(url, timeout=0.5)
        with pytest.raises(DependencyUnavailable) as refused:
            client.post(CALL)
    assert refused.value.code == "chain_unavailable"


def test_a_silent_node_times_out_once_on_a_kept_alive_connection() -> None:
    """The kernel times out a silent read (SO_RCVTIMEO), and a timeout is not retried."""
    with scripted_server(answer(), silent, answer()) as (url, connections):
        client = JsonRpcClient(url, timeout=0.3)
        client.post(CALL)
        started = time.monotonic()
        with pytest.raises(DependencyUnavailable) as refused:
            client.post(CALL)
        waited = time.monotonic() - started
        assert client.post(CALL) == {"jsonrpc": "2.0", "id": 7, "result": "0x1"}
    assert isinstance(refused.value.__cause__, TimeoutError)
    assert 0.25 < waited < 0.6
    assert connections == [1, 1, 2]  # the silent connection was given up, not asked again


def test_no_node_listening_is_unavailable() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()
    with pytest.raises(DependencyUnavailable):
        JsonRpcClient(f"http://127.0.0.1:{port}", timeout=0.5).post(CALL)
