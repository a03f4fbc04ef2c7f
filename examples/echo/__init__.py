"""An echo server: every byte a client sends comes back.

Run it from the repository root::

    python -m examples.echo --bind 127.0.0.1:9000 --workers 4

or through the generic command, which serves any socketserver handler::

    prefork-server --bind 127.0.0.1:9000 --workers 4 examples.echo:EchoHandler
"""

from __future__ import annotations

import socket
import socketserver
import struct
import time

__all__ = ["EchoHandler"]


class EchoHandler(socketserver.BaseRequestHandler):
    """Echo bytes as they arrive (not line by line), until the client closes.

    A connection may last longer than the worker's ``timeout``: while it waits for the
    client, the handler stamps the worker's heartbeat, so that only a handler that is
    really stuck is killed. When the worker is asked to stop (QUIT, a HUP's retirement,
    ``max_requests``), the handler still answers the first message of a connection it has
    accepted, and whatever has already arrived, then closes at the first quiet moment. A
    client that stays silent for ``request_timeout`` seconds is dropped.
    """

    request_timeout = 300.0  # an idle client is dropped after this many seconds

    def setup(self) -> None:
        # A blocking socket with kernel timeouts (SO_RCVTIMEO / SO_SNDTIMEO): recv and
        # sendall are then one system call each, where a Python-level timeout adds a
        # poll() before every call and a selector adds an epoll_wait().
        self.request.setblocking(True)
        _set_timeout(self.request, socket.SO_SNDTIMEO, self.request_timeout)

    def handle(self) -> None:
        worker = getattr(self.server, "worker", None)  # None under a plain socketserver
        wait = self.request_timeout
        if worker is not None:
            wait = min(wait, worker.poll_interval)
        _set_timeout(self.request, socket.SO_RCVTIMEO, wait)
        idle_since = time.monotonic()
        answered = False
        recv = self.request.recv
        while True:
            stopping = worker is not None and not worker.heartbeat()
            try:
                # Stopping: a connection we accepted gets its first answer; after that,
                # serve only what has already arrived.
                data = recv(65536, socket.MSG_DONTWAIT) if stopping and answered else recv(65536)
            except BlockingIOError:  # nothing within `wait` (or nothing left, stopping)
                if stopping and answered:
                    return
                if time.monotonic() - idle_since >= self.request_timeout:
                    return
                continue
            if not data:
                return
            try:
                self.request.sendall(data)
            except BlockingIOError:  # SO_SNDTIMEO: the client read nothing for that long
                return
            answered = True
            idle_since = time.monotonic()


def _set_timeout(sock: socket.socket, option: int, seconds: float) -> None:
    # A struct timeval: two C longs on Linux and the BSDs.
    whole = int(seconds)
    sock.setsockopt(
        socket.SOL_SOCKET, option, struct.pack("ll", whole, int((seconds - whole) * 1e6))
    )
