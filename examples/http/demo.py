"""The built-in demo application, served when no ``module:app`` is given.

Routes:

- ``/`` -- ``Hello, world!`` (the benchmark's route).
- ``/echo`` -- the request body back, with the request's ``Content-Type``. A body sent
  with ``Content-Length`` comes back with one; a chunked body comes back chunked, each
  piece as soon as it was read.
- ``/sleep?ms=N`` -- answers after N milliseconds (N at most 600000). Sleeping longer than
  the worker ``--timeout`` shows the master killing and replacing a stuck worker.
- anything else -- 404.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs

__all__ = ["demo_app"]

HELLO = b"Hello, world!\n"
_MAX_SLEEP_MS = 600_000


def demo_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """A WSGI application with the routes listed in the module's docstring."""
    path = environ["PATH_INFO"]
    if path == "/":
        start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
        return [HELLO]
    if path == "/echo":
        return _echo(environ, start_response)
    if path == "/sleep":
        return _sleep(environ, start_response)
    return _plain(start_response, "404 Not Found", b"not found\n")


def _echo(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    content_type = environ.get("CONTENT_TYPE") or "application/octet-stream"
    body = environ["wsgi.input"]
    if environ.get("CONTENT_LENGTH"):
        data = body.read()
        start_response("200 OK", [("Content-Type", content_type),
                                  ("Content-Length", str(len(data)))])  # fmt: skip
        return [data]
    start_response("200 OK", [("Content-Type", content_type)])
    return _stream(body)


def _stream(body: Any) -> Iterator[bytes]:
    read = getattr(body, "read1", body.read)  # read1: what has arrived, without waiting
    while chunk := read(65536):
        yield chunk


def _sleep(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    query = parse_qs(environ.get("QUERY_STRING", ""))
    try:
        ms = int(query.get("ms", ["0"])[0])
    except ValueError:
        ms = -1
    if not 0 <= ms <= _MAX_SLEEP_MS:
        return _plain(start_response, "400 Bad Request", b"ms must be 0..600000\n")
    time.sleep(ms / 1000)
    return _plain(start_response, "200 OK", b"slept %d ms\n" % ms)


def _plain(start_response: Callable[..., Any], status: str, body: bytes) -> list[bytes]:
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body)))])  # fmt: skip
    return [body]
