"""The benchmark's application: the smallest useful WSGI app, the same for every server."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

BODY = b"Hello, world!\n"
HEADERS = [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))]


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """``Hello, world!`` with a Content-Length, whatever the request."""
    start_response("200 OK", HEADERS)
    return [BODY]
