"""A lean closed-loop HTTP/1.1 load generator for the benchmarks (stdlib only).

The load generator shares the CPU with the server it measures, so every microsecond it spends
per request is taken from the server. Requests are rendered to bytes before the clock starts;
the measured loop is one epoll (or poll) over keep-alive sockets, one `send` and usually
one `recv` per request, and a response parser that only looks for the status code, the end of
the headers and `Content-Length`. Like wrk, each connection sends its next request only after
it has read the whole previous response.
"""

from __future__ import annotations

import gc
import multiprocessing
import select
import socket
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, NamedTuple

RECV_SIZE = 65536


class ProtocolError(Exception):
    """The server answered something this minimal client does not parse."""


@dataclass
class LoadResult:
    elapsed: float  # wall time from the first request sent to the last response read
    latencies: list[float]  # sorted, seconds
    statuses: dict[int, int]
    cpu_seconds: float  # the generator processes' own CPU time during the measured loop
    reconnects: int  # connections the server closed and the generator reopened
    resent: int  # requests sent again on a reopened connection
    processes: int


class _Outcome(NamedTuple):
    started: float
    finished: float
    cpu_seconds: float
    latencies: list[float]
    statuses: list[int]
    reconnects: int
    resent: int


def render_requests(host: str, port: int, path: str, bodies: list[bytes]) -> list[bytes]:
    head = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
    prefix = head.encode("ascii")
    return [b"%sContent-Length: %d\r\n\r\n%s" % (prefix, len(body), body) for body in bodies]


def _connect(address: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(address)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class _Conn:
    __slots__ = ("buf", "request", "resent", "sock", "started")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.request = b""
        self.resent = False
        self.started = 0.0


def _drive(
    address: tuple[str, int], requests: list[bytes], socks: list[socket.socket], timeout: float
) -> _Outcome:
    """Send every request once over the connected keep-alive `socks`; closed loop."""
    perf_counter = time.perf_counter
    conns = [_Conn(sock) for sock in socks]
    by_fd: dict[int, _Conn] = {}
    # epoll where there is one: selectors' wrapper adds a per-request cost to the loop when each
    # response wakes the process from sleep, which is the case at the server's real rates, and
    # the load generator must not be what limits the measurement.
    if hasattr(select, "epoll"):
        poller: Any = select.epoll()
        ready, wait_for = select.EPOLLIN, timeout
    else:
        poller = select.poll()
        ready, wait_for = select.POLLIN, timeout * 1000
    latencies: list[float] = []
    statuses: list[int] = []
    reconnects = resent = 0

    def watch(c: _Conn) -> None:
        by_fd[c.sock.fileno()] = c
        poller.register(c.sock.fileno(), ready)

    def forget(c: _Conn) -> None:
        poller.unregister(c.sock.fileno())
        del by_fd[c.sock.fileno()]
        c.sock.close()

    def reopen(c: _Conn) -> None:
        forget(c)
        c.sock = _connect(address)
        watch(c)

    def resend(c: _Conn) -> None:
        # gunicorn may close an idle keep-alive connection (its keepalive timeout, a worker
        # restart) just as we reuse it: reopen it and send the request once more.
        nonlocal reconnects, resent
        if c.resent:
            raise ConnectionError("server closed the connection again after a resend")
        reopen(c)
        reconnects += 1
        resent += 1
        c.resent = True
        c.sock.sendall(c.request)

    for c in conns:
        watch(c)
    active = len(conns)
    # Nothing cyclic is made in the loop, and a full collection would walk (and un-share) all
    # of the heap this process inherited from the bench when it was forked.
    gc.disable()
    cpu_started = time.process_time()
    started = perf_counter()
    for i, c in enumerate(conns):
        c.request = requests[i]
        c.started = perf_counter()
        c.sock.sendall(c.request)
    next_index = len(conns)
    total = len(requests)
    poll = poller.poll
    while active:
        events = poll(wait_for)
        if not events:
            raise TimeoutError(f"no response for {timeout:.0f} s ({len(latencies)} done)")
        for fd, _ in events:
            c = by_fd[fd]
            try:
                data = c.sock.recv(RECV_SIZE)
            except ConnectionResetError:
                data = b""
            if not data:
                if c.buf:
                    raise ConnectionError("server closed the connection mid-response")
                resend(c)
                continue
            buf = c.buf + data if c.buf else data
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                c.buf = buf
                continue
            head = buf[:end].lower()
            if not head.startswith(b"http/1."):
                raise ProtocolError(f"not an HTTP/1.x response: {buf[:40]!r}")
            status = int(buf[9:12])
            if b"\r\ntransfer-encoding:" in head:
                raise ProtocolError("chunked (Transfer-Encoding) responses are not supported")
            at = head.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = head.find(b"\r\n", at + 17)
                length = int(head[at + 17 : stop if stop >= 0 else end])
            elif status in (204, 304):
                length = 0
            else:
                raise ProtocolError(f"response {status} has no Content-Length")
            size = end + 4 + length
            if len(buf) < size:
                c.buf = buf
                continue
            if len(buf) > size:
                raise ProtocolError("bytes after the response on a closed-loop connection")
            latencies.append(perf_counter() - c.started)
            statuses.append(status)
            c.buf = b""
            if next_index < total:
                if b"\r\nconnection: close" in head:
                    reopen(c)
                    reconnects += 1
                c.request = requests[next_index]
                next_index += 1
                c.resent = False
                c.started = perf_counter()
                try:
                    c.sock.sendall(c.request)
                except (BrokenPipeError, ConnectionResetError):
                    resend(c)
            else:
                forget(c)
                active -= 1
    finished = perf_counter()
    cpu = time.process_time() - cpu_started
    gc.enable()
    return _Outcome(started, finished, cpu, latencies, statuses, reconnects, resent)


def _generator(
    pipe: Connection,
    go: Any,
    address: tuple[str, int],
    path: str,
    bodies: list[bytes],
    connections: int,
    timeout: float,
) -> None:
    """One load process: report ready once connected, wait for `go`, send the outcome back."""
    try:
        requests = render_requests(address[0], address[1], path, bodies)
        socks = [_connect(address) for _ in range(min(connections, len(requests)))]
        pipe.send(("ready", None))
        go.wait()
        pipe.send(("done", _drive(address, requests, socks, timeout)))
    except BaseException as exc:
        pipe.send(("error", "".join(traceback.format_exception(exc))))
    finally:
        pipe.close()


def _receive(pipe: Connection, process: Any) -> Any:
    wait([pipe, process.sentinel])
    if not pipe.poll():
        raise RuntimeError(f"load generator process exited with code {process.exitcode}")
    kind, payload = pipe.recv()
    if kind == "error":
        raise RuntimeError(f"load generator failed:\n{payload}")
    return payload


def run_load(
    port: int,
    bodies: list[bytes],
    concurrency: int,
    *,
    host: str = "127.0.0.1",
    path: str = "/mint",
    processes: int = 1,
    timeout: float = 60.0,
) -> LoadResult:
    """POST each body once over `concurrency` keep-alive connections, closed loop.

    Bodies and connections are split between `processes` load processes; each connection takes
    the next unsent body of its process as soon as it has read a response.
    """
    processes = max(1, min(processes, concurrency, len(bodies)))
    go = multiprocessing.Event()
    workers = []
    for i in range(processes):
        parent_end, child_end = multiprocessing.Pipe()
        connections = concurrency // processes + (i < concurrency % processes)
        args = (child_end, go, (host, port), path, bodies[i::processes], connections, timeout)
        process = multiprocessing.Process(target=_generator, args=args, daemon=True)
        process.start()
        child_end.close()
        workers.append((parent_end, process))
    try:
        for pipe, process in workers:
            _receive(pipe, process)
        go.set()
        outcomes: list[_Outcome] = [_receive(pipe, process) for pipe, process in workers]
    except BaseException:
        for _, process in workers:
            process.terminate()  # the others may be waiting for `go`, or mid-run
        raise
    finally:
        for pipe, process in workers:
            process.join()
            pipe.close()
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    for o in outcomes:
        latencies.extend(o.latencies)
        statuses.update(o.statuses)
    return LoadResult(
        elapsed=max(o.finished for o in outcomes) - min(o.started for o in outcomes),
        latencies=sorted(latencies),
        statuses=dict(statuses),
        cpu_seconds=sum(o.cpu_seconds for o in outcomes),
        reconnects=sum(o.reconnects for o in outcomes),
        resent=sum(o.resent for o in outcomes),
        processes=processes,
    )
