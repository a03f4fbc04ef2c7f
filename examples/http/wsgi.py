"""The WSGI side (PEP 3333): the environ, ``wsgi.input``, and the client errors it raises.

Nothing here touches a socket or h11's state: the handler gives :class:`InputStream` a
``pull()`` function that returns the next piece of the request body (``b""`` at its end),
and :func:`request_environ` turns a parsed request into an environ. Both are pure enough to
be tested without a server.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import unquote_to_bytes
from wsgiref.util import FileWrapper

__all__ = [
    "BadRequest",
    "ClientDisconnected",
    "ClientError",
    "InputStream",
    "PayloadTooLarge",
    "RequestTimeout",
    "WSGIApp",
    "base_environ",
    "new_key_cache",
    "request_environ",
]

#: A WSGI application: ``app(environ, start_response) -> iterable of bytes``.
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class ClientError(Exception):
    """The client broke the request; raised by ``wsgi.input`` reads.

    An application may let it propagate: if nothing was sent yet the server answers with
    ``status`` and ``Connection: close``, logs one line at info level, and closes the
    connection. The worker goes on serving other clients.
    """

    status: int = 400
    reason: str = "Bad Request"


class BadRequest(ClientError):
    """Malformed body framing (a bad chunk size, a truncated chunk)."""


class PayloadTooLarge(ClientError):
    """The body grew past the server's ``max_body_bytes``."""

    status = 413
    reason = "Content Too Large"


class RequestTimeout(ClientError):
    """The client sent nothing for ``read_timeout`` seconds in the middle of a body."""

    status = 408
    reason = "Request Timeout"


class ClientDisconnected(ClientError):
    """The client closed the connection before the end of the body; nobody to answer."""


class InputStream:
    """``wsgi.input``: reads exactly the request body, pulling it from the connection.

    ``pull()`` returns the next piece of the body, ``b""`` once it is complete, and raises
    :class:`ClientError` subclasses when the client misbehaves. Reading past the end
    returns ``b""`` and never blocks. Nothing is pulled before the application reads (so
    ``Expect: 100-continue`` is answered only when the body is wanted).
    """

    __slots__ = ("_pull", "_buf", "_eof")

    def __init__(self, pull: Callable[[], bytes]) -> None:
        self._pull = pull
        self._buf = bytearray()
        self._eof = False

    def _fill(self) -> bool:
        """Append one more piece to the buffer; False at the end of the body."""
        if self._eof:
            return False
        chunk = self._pull()
        if not chunk:
            self._eof = True
            return False
        self._buf += chunk
        return True

    def read(self, size: int | None = -1) -> bytes:
        """Up to ``size`` bytes (all the rest if ``size`` is negative or None); fewer only
        at the end of the body."""
        buf = self._buf
        if size is None or size < 0:
            while self._fill():
                pass
            data = bytes(buf)
            buf.clear()
            return data
        while len(buf) < size and self._fill():
            pass
        data = bytes(buf[:size])
        del buf[:size]
        return data

    def read1(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (any number if negative) of what is buffered, or else of
        the next piece of the body: waits for the client at most once. ``b""`` at the
        end. Not part of PEP 3333; for streaming a body through as it arrives."""
        buf = self._buf
        if not buf and not self._fill():
            return b""
        if size is None or size < 0:
            size = len(buf)
        data = bytes(buf[:size])
        del buf[:size]
        return data

    def readline(self, size: int | None = -1) -> bytes:
        """One line, with its ``\\n``, of at most ``size`` bytes if ``size`` >= 0."""
        limit = -1 if size is None else size
        buf = self._buf
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end >= 0:
                cut = end + 1
                break
            if 0 <= limit <= len(buf):
                cut = limit
                break
            start = len(buf)
            if not self._fill():
                cut = len(buf)
                break
        if 0 <= limit < cut:
            cut = limit
        data = bytes(buf[:cut])
        del buf[:cut]
        return data

    def readlines(self, hint: int = -1) -> list[bytes]:
        """All the remaining lines (stopping once ``hint`` bytes were read, if > 0)."""
        lines = []
        total = 0
        while line := self.readline():
            lines.append(line)
            total += len(line)
            if 0 < hint <= total:
                break
        return lines

    def __iter__(self) -> Iterator[bytes]:
        while line := self.readline():
            yield line

    def drained(self) -> bool:
        """True once the whole body has been pulled from the connection."""
        return self._eof


# Header names as the environ spells them. Names with "_" are dropped (None): a client
# could otherwise smuggle "X_Forwarded_For" past a proxy that only strips
# "X-Forwarded-For", since both would become HTTP_X_FORWARDED_FOR.
_SPECIAL_KEYS = {b"content-type": "CONTENT_TYPE", b"content-length": "CONTENT_LENGTH"}
_MAX_CACHED_KEYS = 512


def _cgi_key(name: bytes) -> str | None:
    name = name.lower()
    if b"_" in name:
        return None
    special = _SPECIAL_KEYS.get(name)
    if special is not None:
        return special
    return "HTTP_" + name.decode("latin-1").upper().replace("-", "_")


class _KeyCache(dict[bytes, "str | None"]):
    """header name (as received) -> environ key; bounded so random names cannot grow it."""

    def __missing__(self, name: bytes) -> str | None:
        key = _cgi_key(name)
        if len(self) < _MAX_CACHED_KEYS:
            self[name] = key
        return key


def new_key_cache() -> dict[bytes, str | None]:
    """A bounded cache of header name (as received) -> environ key, for one worker."""
    return _KeyCache()


def base_environ(
    server_address: Any, server_software: str, multithread: bool = False
) -> dict[str, Any]:
    """The part of the environ that is the same for every request a server receives.

    ``server_address`` is the bound address: ``(host, port, ...)`` for TCP, a path (or
    bytes) for a Unix socket, which gives ``SERVER_NAME`` ``localhost`` and an empty
    ``SERVER_PORT``. ``multithread`` is ``wsgi.multithread`` (handler threads in a worker).
    """
    if isinstance(server_address, tuple):
        server_name, server_port = str(server_address[0]), str(server_address[1])
    else:
        server_name, server_port = "localhost", ""
    return {
        "SCRIPT_NAME": "",
        "SERVER_NAME": server_name,
        "SERVER_PORT": server_port,
        "SERVER_SOFTWARE": server_software,
        "GATEWAY_INTERFACE": "CGI/1.1",
        "REMOTE_ADDR": "",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": multithread,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "wsgi.input_terminated": True,  # wsgi.input ends at the end of the body
        "wsgi.file_wrapper": FileWrapper,
    }


def connection_environ(base: dict[str, Any], client_address: Any) -> dict[str, Any]:
    """``base`` plus what is the same for every request of one connection (the peer)."""
    env = base.copy()
    if isinstance(client_address, tuple) and len(client_address) >= 2:
        env["REMOTE_ADDR"] = str(client_address[0])
        env["REMOTE_PORT"] = str(client_address[1])
    return env


def request_environ(
    base: dict[str, Any],
    key_cache: dict[bytes, str | None],
    method: bytes,
    target: bytes,
    http_version: bytes,
    headers: Iterable[tuple[bytes, bytes]],
    wsgi_input: InputStream,
) -> dict[str, Any]:
    """The environ of one request: a copy of ``base`` completed with the request's data.

    ``headers`` are ``(name, value)`` pairs as received (any case); repeated headers
    are joined with ``", "`` (``"; "`` for Cookie); names containing ``_`` are dropped.
    An absolute-form target (``http://host/path``) sets ``HTTP_HOST`` from its authority.
    ``PATH_INFO`` is percent-decoded and, like every value, decoded as latin-1 (PEP 3333).
    """
    env = base.copy()
    if target[:1] != b"/" and target != b"*":
        # absolute-form (a request to a proxy): scheme://authority/path?query
        _, sep, rest = target.partition(b"://")
        if sep:
            authority, slash, path_and_query = rest.partition(b"/")
            target = slash + path_and_query or b"/"
            env["HTTP_HOST"] = authority.decode("latin-1")  # overrides Host, RFC 9112 3.2.2
    path, _, query = target.partition(b"?")
    if b"%" in path:
        path = unquote_to_bytes(path)
    env["REQUEST_METHOD"] = method.decode("latin-1")
    env["PATH_INFO"] = path.decode("latin-1")
    env["QUERY_STRING"] = query.decode("latin-1")
    env["RAW_URI"] = target.decode("latin-1")
    env["SERVER_PROTOCOL"] = "HTTP/" + http_version.decode("latin-1")
    env["wsgi.input"] = wsgi_input
    for name, raw_value in headers:
        key = key_cache[name]
        if key is None:
            continue
        value = raw_value.decode("latin-1")
        if key in env:
            if key == "HTTP_HOST":
                continue  # the absolute-form target's authority wins
            env[key] += ("; " if key == "HTTP_COOKIE" else ", ") + value
        else:
            env[key] = value
    return env
