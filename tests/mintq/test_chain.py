"""Reaching the node: raw batch calls against a real anvil, and a node that is down, broken
or silent (a loopback HTTP server playing it) turning into `chain_unavailable`."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from deploy.devchain import Deployment
from mintq.chain import Chain
from mintq.errors import DependencyUnavailable
from mintq.settings import Settings

# What the stand-in node answers a request body with: (HTTP status, body), or None to say
# nothing until the test is over.
Answer = Callable[[bytes], tuple[int, bytes] | None]


@contextmanager
def fake_node(answer: Answer) -> Iterator[tuple[str, list[int]]]:
    """An HTTP/1.1 keep-alive server on loopback; yields its URL and the client port each
    request came from."""
    done = threading.Event()
    ports: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            ports.append(self.client_address[1])
            reply = answer(self.rfile.read(int(self.headers["Content-Length"])))
            if reply is None:
                done.wait(10)
                return
            status, body = reply
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", ports
    finally:
        done.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


def echo(body: bytes) -> tuple[int, bytes]:
    """A node that answers every call of a batch with `0x1`."""
    return 200, json.dumps(
        [{"jsonrpc": "2.0", "id": call["id"], "result": "0x1"} for call in json.loads(body)]
    ).encode()


def chain_at(settings: Settings, url: str, timeout: float = 2.0) -> Chain:
    return Chain(settings.replace(rpc_url=url, chain_timeout_seconds=timeout))


def unavailable(call: Callable[[], object]) -> DependencyUnavailable:
    with pytest.raises(DependencyUnavailable) as info:
        call()
    assert (info.value.status, info.value.code) == (503, "chain_unavailable")
    return info.value


@pytest.fixture
def chain(settings: Settings) -> Chain:
    return Chain(settings)


def test_rpc_answers_raw_results_in_order_with_none_for_errors(
    chain: Chain, deployment: Deployment
) -> None:
    chain_id, no_receipt, head, unknown, genesis = chain.rpc(
        [
            ("eth_chainId", []),
            ("eth_getTransactionReceipt", ["0x" + "00" * 32]),
            ("eth_blockNumber", []),
            ("no_such_method", []),
            ("eth_getBlockByNumber", ["0x0", False]),
        ]
    )
    assert chain_id == hex(deployment.chain_id)
    assert no_receipt is None
    assert int(head, 16) == chain.w3.eth.block_number
    assert unknown is None
    # Raw JSON, not web3's formatting (HexBytes, ints, AttributeDict).
    assert type(genesis) is dict
    assert genesis["number"] == "0x0"
    assert genesis["hash"] == "0x" + chain.w3.eth.get_block(0)["hash"].hex()


def test_a_node_that_is_down_is_unavailable(settings: Settings) -> None:
    with socket.socket() as bound_but_not_listening:
        bound_but_not_listening.bind(("127.0.0.1", 0))
        port = bound_but_not_listening.getsockname()[1]
        chain = chain_at(settings, f"http://127.0.0.1:{port}")
        unavailable(lambda: chain.rpc([("eth_blockNumber", [])]))
        unavailable(lambda: chain.chain_id)


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(lambda body: (500, echo(body)[1]), id="http-500"),
        pytest.param(lambda body: (200, b"<html>gateway</html>"), id="not-json"),
        pytest.param(lambda body: (200, b"\xff\xfe"), id="not-utf8"),
    ],
)
def test_a_node_that_answers_nonsense_is_unavailable(settings: Settings, answer: Answer) -> None:
    with fake_node(answer) as (url, _):
        chain = chain_at(settings, url)
        unavailable(lambda: chain.rpc([("eth_blockNumber", [])]))
        unavailable(lambda: chain.chain_id)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(
            {"jsonrpc": "2.0", "id": None, "error": {"code": -32005, "message": "too many"}},
            id="batch-refused",
        ),
        pytest.param([], id="calls-unanswered"),
    ],
)
def test_a_batch_the_node_does_not_answer_call_by_call_is_unavailable(
    settings: Settings, body: Any
) -> None:
    with fake_node(lambda _: (200, json.dumps(body).encode())) as (url, _):
        chain = chain_at(settings, url)
        unavailable(lambda: chain.rpc([("eth_blockNumber", []), ("eth_chainId", [])]))


def test_a_node_that_hangs_is_unavailable_after_the_timeout(settings: Settings) -> None:
    with fake_node(lambda _: None) as (url, _):
        chain = chain_at(settings, url, timeout=0.3)
        for call in (lambda: chain.rpc([("eth_blockNumber", [])]), lambda: chain.chain_id):
            started = time.monotonic()
            unavailable(call)
            assert time.monotonic() - started < 2


def test_a_forked_child_opens_its_own_connection(settings: Settings) -> None:
    with fake_node(echo) as (url, ports):
        chain = chain_at(settings, url)
        assert chain.rpc([("eth_blockNumber", [])]) == ["0x1"]
        pid = os.fork()
        if pid == 0:  # the child: a worker forked from a process that already used the node
            try:
                os._exit(0 if chain.rpc([("eth_blockNumber", [])]) == ["0x1"] else 1)
            except BaseException:
                os._exit(2)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert chain.rpc([("eth_blockNumber", [])]) == ["0x1"]
    parent, child, parent_again = ports
    assert child != parent  # not the parent's pooled connection
    assert parent_again == parent  # which the child left open
