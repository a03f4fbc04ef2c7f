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
    really stuck is killed. When the worker is asked to stop (QUIT, a HUP's retirement,
    ``max_requests``), the handler still answers the first message of a connection it has
    accepted, and whatever has already arrived, then closes at the first quiet moment. A
    client that stays silent for ``request_timeout`` seconds is dropped.
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
        answered = False
        with selectors.DefaultSelector() as selector:
            selector.register(self.request, selectors.EVENT_READ)
            while True:
                stopping = worker is not None and not worker.heartbeat()
                # Stopping: a connection we accepted gets its first answer; after that,
                # serve only what has already arrived.
                if not selector.select(0 if stopping and answered else wait):
                    if stopping and answered:
                        return
                    if time.monotonic() - idle_since >= self.request_timeout:
                        return
                    continue
                data = self.request.recv(65536)
                if not data:
                    return
                self.request.sendall(data)
                answered = True
                idle_since = time.monotonic()
