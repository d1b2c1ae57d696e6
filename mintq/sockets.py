"""Sockets for the request path: one syscall, and one release of the GIL, per send or receive."""

from __future__ import annotations

import socket
import struct
from typing import Any

import redis


def time_out_in_the_kernel(sock: socket.socket, timeout: float) -> None:
    """Make `sock` blocking, with its sends and receives timing out in the kernel
    (SO_SNDTIMEO, SO_RCVTIMEO; an expired one fails with EAGAIN).

    With a Python-level timeout, CPython polls before every send and receive: a second
    syscall, and a second release of the GIL that another thread of the process takes, per
    call. The timeout still bounds each call, as before.
    """
    seconds = max(timeout, 1e-6)
    timeval = struct.pack("ll", int(seconds), int((seconds % 1) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    sock.settimeout(None)


class KernelTimeoutRedisConnection(redis.Connection):
    """A redis-py connection whose socket timeout is enforced by the kernel.

    redis-py sets its `socket_timeout` on the socket (CPython then polls before each send and
    receive) and sets it again after every read with a timeout of its own (such as the check
    the pool runs on each checkout). Here the connection keeps no Python-level timeout, so those
    become blocking calls, and the kernel bounds each by the same `socket_timeout`. An expired
    one fails with EAGAIN, which redis-py raises as a `ConnectionError` and answers by
    dropping the connection, as it does a timeout.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kernel_timeout: float | None = self.socket_timeout
        self.socket_timeout = None

    def _connect(self) -> socket.socket:
        sock: socket.socket = super()._connect()
        if self.kernel_timeout is not None:
            time_out_in_the_kernel(sock, self.kernel_timeout)
        return sock
