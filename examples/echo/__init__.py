"""An echo server: every byte a client sends comes back.

Run it from the repository root::

    python -m examples.echo --bind 127.0.0.1:9000 --workers 4

or through the generic command, which serves any socketserver handler::

    prefork-server --bind 127.0.0.1:9000 --workers 4 examples.echo:EchoHandler
"""

from __future__ import annotations

import socketserver

__all__ = ["EchoHandler"]


class EchoHandler(socketserver.BaseRequestHandler):
    """Echo bytes as they arrive (not line by line), until the client closes."""

    request_timeout = 300.0  # an idle client is dropped after this many seconds

    def setup(self) -> None:
        self.request.settimeout(self.request_timeout)

    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)
