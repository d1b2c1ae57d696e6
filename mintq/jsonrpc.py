"""JSON-RPC to the node over lean keep-alive HTTP/1.1 connections, one per thread.

For the intake hot path. `requests` costs more CPU than the node takes to answer, and even
`http.client` spends most of its time parsing response headers with the `email` package.
This client writes one request, then reads only the status line, `Content-Length`,
`Transfer-Encoding: chunked` and `Connection: close`: all a JSON-RPC answer needs.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import threading
import weakref
from typing import Any
from urllib.parse import unquote, urlsplit

from mintq.errors import DependencyUnavailable
from mintq.sockets import time_out_in_the_kernel

_RECV_SIZE = 65536
# A node's answer has no business being larger (a batch of receipts and blocks is far less).
_MAX_RESPONSE_BYTES = 64 * 1024 * 1024


class ProtocolError(Exception):
    """The server answered something that is not an HTTP/1.1 response this client reads."""


class _Connection:
    """One keep-alive connection; not thread-safe (each thread holds its own)."""

    def __init__(self, host: str, port: int, tls: bool, timeout: float) -> None:
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
            time_out_in_the_kernel(sock, timeout)
        except BaseException:
            sock.close()
            raise
        self.sock: socket.socket = sock
        self.buffer = bytearray()
        self.reusable = True

    def close(self) -> None:
        self.reusable = False
        self.sock.close()

    def __del__(self) -> None:  # a thread's connection goes with the thread's locals
        if hasattr(self, "sock"):
            self.sock.close()

    def exchange(self, request: bytes) -> tuple[int, bytes]:
        """Send `request` and read one whole response: (status, body)."""
        try:
            self.sock.sendall(request)
        except (BlockingIOError, ssl.SSLWantWriteError):  # SO_SNDTIMEO expired
            raise TimeoutError("the node did not take the request in time") from None
        head = self._read_until(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status_line = lines[0].split(" ", 2)
        if len(status_line) < 2 or not status_line[0].startswith("HTTP/1."):
            raise ProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        status = int(status_line[1])
        length: int | None = None
        chunked = False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding":
                chunked = "chunked" in value.lower()
            elif name == "connection" and "close" in value.lower():
                self.reusable = False
        if status_line[0] == "HTTP/1.0" and length is None and not chunked:
            self.reusable = False
        if status in (204, 304) or 100 <= status < 200:
            body = b""  # no body, whatever the headers say
        elif chunked:
            body = self._read_chunked()
        elif length is not None:
            body = self._read_exactly(length)
        else:  # delimited by the server closing the connection
            self.reusable = False
            body = self._read_to_close()
        return status, body

    def _recv(self) -> bytes:
        try:
            return self.sock.recv(_RECV_SIZE)
        except (BlockingIOError, ssl.SSLWantReadError):  # SO_RCVTIMEO expired
            raise TimeoutError("the node did not answer in time") from None

    def _fill(self) -> None:
        data = self._recv()
        if not data:
            raise ProtocolError("the server closed the connection mid-response")
        self.buffer += data
        if len(self.buffer) > _MAX_RESPONSE_BYTES:
            raise ProtocolError("response too large")

    def _read_until(self, marker: bytes) -> bytes:
        start = 0
        while (end := self.buffer.find(marker, start)) < 0:
            start = max(0, len(self.buffer) - len(marker) + 1)
            self._fill()
        data = bytes(self.buffer[:end])
        del self.buffer[: end + len(marker)]
        return data

    def _read_exactly(self, length: int) -> bytes:
        if length > _MAX_RESPONSE_BYTES:
            raise ProtocolError("response too large")
        while len(self.buffer) < length:
            self._fill()
        data = bytes(self.buffer[:length])
        del self.buffer[:length]
        return data

    def _read_chunked(self) -> bytes:
        body = bytearray()
        while True:
            size_line = self._read_until(b"\r\n").split(b";", 1)[0].strip()
            size = int(size_line, 16)
            if size == 0:
                while self._read_until(b"\r\n"):  # trailers, up to the blank line
                    pass
                return bytes(body)
            body += self._read_exactly(size)
            if len(body) > _MAX_RESPONSE_BYTES:
                raise ProtocolError("response too large")
            if self._read_exactly(2) != b"\r\n":
                raise ProtocolError("malformed chunk")

    def _read_to_close(self) -> bytes:
        while True:
            data = self._recv()
            if not data:
                body = bytes(self.buffer)
                self.buffer.clear()
                return body
            self.buffer += data
            if len(self.buffer) > _MAX_RESPONSE_BYTES:
                raise ProtocolError("response too large")


class JsonRpcClient:
    """POSTs JSON-RPC payloads to one URL; a node that cannot answer raises
    `DependencyUnavailable("chain")`."""

    def __init__(self, url: str, timeout: float) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self._tls = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._tls else 80)
        self._timeout = timeout
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host_header = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
        if ":" in parts.hostname:  # an IPv6 literal
            host_header = f"[{parts.hostname}]" + (f":{parts.port}" if parts.port else "")
        auth = ""
        if parts.username is not None:
            credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            auth = f"Authorization: Basic {base64.b64encode(credentials.encode()).decode()}\r\n"
        self._head = (
            f"POST {path} HTTP/1.1\r\nHost: {host_header}\r\n{auth}"
            "Content-Type: application/json\r\nAccept: application/json\r\nContent-Length: "
        ).encode()
        self._local = threading.local()
        # A forked child (a Celery or gunicorn worker) must not share its parent's sockets.
        this = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _forget_connections(this()))

    def post(self, payload: Any) -> Any:
        body = json.dumps(payload, separators=(",", ":")).encode()
        request = self._head + str(len(body)).encode() + b"\r\n\r\n" + body
        # A kept-alive connection the node has since closed fails on first use: try once more
        # on a new one. A timeout is not retried: the node is slow, not gone.
        for attempt in (1, 2):
            connection: _Connection | None = getattr(self._local, "connection", None)
            fresh = connection is None
            try:
                if connection is None:
                    connection = _Connection(self._host, self._port, self._tls, self._timeout)
                    self._local.connection = connection
                status, data = connection.exchange(request)
            except (OSError, ProtocolError, ValueError) as exc:
                if connection is not None:
                    connection.close()
                self._local.connection = None
                if fresh or attempt == 2 or isinstance(exc, TimeoutError):
                    raise DependencyUnavailable("chain") from exc
                continue
            if not connection.reusable:
                connection.close()
                self._local.connection = None
            if status != 200:
                raise DependencyUnavailable("chain", f"node answered HTTP {status}")
            try:
                return json.loads(data)
            except ValueError as exc:
                raise DependencyUnavailable("chain", "node answered with invalid JSON") from exc
        raise AssertionError("unreachable")


def _forget_connections(client: JsonRpcClient | None) -> None:
    if client is not None:
        client._local = threading.local()
