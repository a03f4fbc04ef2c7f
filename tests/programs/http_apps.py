"""WSGI applications for the black-box tests of examples/http (``http_apps:app``).

Most routes are wrapped in ``wsgiref.validate.validator``: a PEP 3333 violation by the
server then raises inside the application (a 500 and a traceback in the log), and the
tests look for both. Run the server with ``-W error::Warning:wsgiref.validate`` so that the
validator's warnings fail the same way.

Routes:

- ``/hello``: ``hello`` with a Content-Length (validated)
- ``/env``: the CGI part of the environ as JSON, plus ``body`` (wsgi.input read in small
  pieces) and a few ``wsgi.*`` values (validated)
- ``/lines``: the body's lines, read with readline(), as a JSON list (validated)
- ``/write``: the start_response ``write()`` callable, then an iterable (validated)
- ``/gen?n=N&size=S``: N chunks of S bytes from a generator, no Content-Length
  (validated)
- ``/drip?n=N&ms=M``: N chunks ``drop <i>\n``, M ms apart (validated)
- ``/closes``: how many iterables this worker has closed so far (one per response)
- ``/raise``: raises before start_response
- ``/raise-late``: raises after the first chunk went out
- ``/exc-info``: starts a 200, fails, restarts with a 503 through ``exc_info``
- ``/bad-header``: a header value with a newline (response splitting attempt)
- ``/short``: declares Content-Length 10 and sends 5 bytes
- ``/no-content``: 204
- ``/ignore-body``: answers without reading the body
- ``/pid``: the worker's pid
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs
from wsgiref.validate import validator

StartResponse = Callable[..., Any]
Environ = dict[str, Any]

CLOSED = 0  # iterables closed in this worker


class Closing:
    """An iterable over ``chunks`` that counts its close() in CLOSED."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._chunks)

    def close(self) -> None:
        global CLOSED
        CLOSED += 1


def _text(start_response: StartResponse, body: bytes, status: str = "200 OK") -> Closing:
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return Closing([body])


def hello(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    return _text(start_response, b"hello")


def env(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    stream = environ["wsgi.input"]
    pieces = []
    while piece := stream.read(7):  # small reads: the stream must keep its place
        pieces.append(piece)
    out = {k: v for k, v in environ.items() if "." not in k}
    out["body"] = b"".join(pieces).decode("latin-1")
    out["wsgi.multiprocess"] = environ["wsgi.multiprocess"]
    out["wsgi.multithread"] = environ["wsgi.multithread"]
    out["wsgi.url_scheme"] = environ["wsgi.url_scheme"]
    out["wsgi.version"] = list(environ["wsgi.version"])
    out["wsgi.input_terminated"] = environ.get("wsgi.input_terminated")
    out["has_file_wrapper"] = "wsgi.file_wrapper" in environ
    body = json.dumps(out).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])  # fmt: skip
    return Closing([body])


def lines(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    stream = environ["wsgi.input"]
    got = []
    while line := stream.readline():
        got.append(line.decode("latin-1"))
    return _text(start_response, json.dumps(got).encode())


def write(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    w = start_response("200 OK", [("Content-Type", "text/plain")])
    w(b"written ")
    w(b"then ")
    return Closing([b"returned"])


def gen(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    query = parse_qs(environ["QUERY_STRING"])
    n = int(query.get("n", ["3"])[0])
    size = int(query.get("size", ["5"])[0])
    start_response("200 OK", [("Content-Type", "application/octet-stream")])

    def chunks() -> Iterator[bytes]:
        for i in range(n):
            yield bytes([97 + i % 26]) * size

    return Closing(chunks())


def drip(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    query = parse_qs(environ["QUERY_STRING"])
    n = int(query.get("n", ["3"])[0])
    pause = int(query.get("ms", ["100"])[0]) / 1000
    start_response("200 OK", [("Content-Type", "text/plain")])

    def chunks() -> Iterator[bytes]:
        for i in range(n):
            if i:
                time.sleep(pause)
            yield b"drop %d\n" % i

    return Closing(chunks())


def closes(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    body = str(CLOSED).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def boom(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    raise RuntimeError("boom before the response")


def boom_late(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])

    def chunks() -> Iterator[bytes]:
        yield b"first chunk"
        raise RuntimeError("boom in the middle of the body")

    return chunks()


def exc_info(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    try:
        raise ValueError("changed my mind")
    except ValueError:
        start_response("503 Service Unavailable", [("Content-Type", "text/plain")],
                       sys.exc_info())  # fmt: skip
    return [b"sorry"]


def bad_header(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    start_response("200 OK", [("X-Evil", "a\r\nSet-Cookie: stolen=1")])
    return [b"never sent"]


def short(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Length", "10")])
    return [b"12345"]


def no_content(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    start_response("204 No Content", [])
    return []


def ignore_body(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    return _text(start_response, b"did not read it")


def pid(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    return _text(start_response, str(os.getpid()).encode())


def fork(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """Forks a child that holds every descriptor of the worker (its connections too) for
    a minute, as an application's multiprocessing child would; the body is its pid."""
    child = os.fork()
    if child == 0:
        time.sleep(60)
        os._exit(0)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(child).encode()]


def reap(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """Ends and reaps the child ``/fork`` started (``?pid=N``)."""
    child = int(parse_qs(environ["QUERY_STRING"])["pid"][0])
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)
    return _text(start_response, b"reaped")


VALIDATED = {
    "/hello": hello,
    "/env": env,
    "/lines": lines,
    "/write": write,
    "/gen": gen,
    "/drip": drip,
    "/ignore-body": ignore_body,
    "/pid": pid,
    "/fork": fork,
    "/reap": reap,
    "/no-content": no_content,
}
PLAIN = {
    "/closes": closes,
    "/raise": boom,
    "/raise-late": boom_late,
    "/exc-info": exc_info,
    "/bad-header": bad_header,
    "/short": short,
}
ROUTES: dict[str, Callable[[Environ, StartResponse], Iterable[bytes]]] = {
    **{path: validator(route) for path, route in VALIDATED.items()},
    **PLAIN,
}


def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    route = ROUTES.get(environ["PATH_INFO"])
    if route is None:
        return _text(start_response, b"no such route", "404 Not Found")
    return route(environ, start_response)
