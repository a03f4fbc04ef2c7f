"""An echo server: every byte a client sends comes back.

Run it from the repository root::

    python -m examples.echo --bind 127.0.0.1:9000 --workers 4

or through the generic command, which serves any socketserver handler::

    prefork-server --bind 127.0.0.1:9000 --workers 4 examples.echo:EchoHandler
"""

from __future__ import annotations

import selectors
import socketserver
import time

__all__ = ["EchoHandler"]


class EchoHandler(socketserver.BaseRequestHandler):
    """Echo bytes as they arrive (not line by line), until the client closes.

    A connection may last longer than the worker's ``timeout``: while it waits for the
    client, the handler stamps the worker's heartbeat, so that only a handler that is
    really stuck is killed. It ends the connection when the worker is asked to stop (QUIT),
    and drops a client that stays silent for ``request_timeout`` seconds.
    """

    request_timeout = 300.0  # an idle client is dropped after this many seconds

    def setup(self) -> None:
        self.request.settimeout(self.request_timeout)

    def handle(self) -> None:
        worker = getattr(self.server, "worker", None)  # None under a plain socketserver
        wait = self.request_timeout
        if worker is not None:
            wait = min(wait, worker.poll_interval)
        idle_since = time.monotonic()
        with selectors.DefaultSelector() as selector:
            selector.register(self.request, selectors.EVENT_READ)
            while worker is None or worker.heartbeat():
                if not selector.select(wait):
                    if time.monotonic() - idle_since >= self.request_timeout:
                        return
                    continue
                data = self.request.recv(65536)
                if not data:
                    return
                self.request.sendall(data)
                idle_since = time.monotonic()
