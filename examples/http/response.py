"""Writing responses: the head, the body's framing, canned error responses. No I/O.

h11 parses every request (head and body). Responses are serialized here instead of by
``h11.Connection.send``, for speed: h11 validates and normalizes the headers twice per
response and runs its state machine for each event, about 25 us per response on the
benchmark machine, more than everything else the worker does per request; this module
does the same job in about 3 us. What h11 would have guaranteed is guaranteed here, and
tested:

- the status is three digits, a space and a reason; header names are tokens; values and
  the reason hold no CR, LF or NUL (no response splitting);
- the body's framing follows RFC 9112 6.3: no body for HEAD, 204 and 304; the
  application's ``Content-Length`` when it gave one (and the body is held to it: more is
  cut off, less ends the connection); chunked for an HTTP/1.1 client otherwise; for an
  HTTP/1.0 client the end of the connection;
- hop-by-hop headers from the application are dropped (PEP 3333 forbids them), except that
  ``Connection: close`` is honoured; the server writes its own ``Connection`` header:
  ``close`` when the connection ends after this response, ``keep-alive`` for an HTTP/1.0
  client whose connection stays open.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from email.utils import formatdate
from typing import Any

__all__ = [
    "CHUNKED",
    "LENGTH",
    "NO_BODY",
    "UNTIL_CLOSE",
    "ResponseError",
    "build_head",
    "error_response",
    "http_date",
    "log_time",
]

# How the body of a response is delimited.
LENGTH = 0  # Content-Length
CHUNKED = 1  # Transfer-Encoding: chunked
UNTIL_CLOSE = 2  # the end of the connection (HTTP/1.0 client, length unknown)
NO_BODY = 3  # HEAD, 204, 304: no body whatever the headers say

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+").fullmatch
_BAD_TEXT = re.compile(r"[\x00\r\n]").search
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
     "upgrade"}
)  # fmt: skip

# Header kinds, as the cache below remembers them.
_PLAIN, _LENGTH_HEADER, _DATE, _SERVER, _CLOSE, _DROP = range(6)
_MAX_CACHED_HEADERS = 1024


class ResponseError(Exception):
    """The application's status or headers cannot be sent as they are."""


def _classify(name: str, value: str) -> tuple[str, int, int]:
    """``("Name: value\\r\\n", kind, content length or -1)`` for one application header;
    raises :class:`ResponseError` for an invalid one."""
    if type(name) is not str or type(value) is not str:
        raise ResponseError(f"header names and values must be str: {name!r}: {value!r}")
    if not _TOKEN(name):
        raise ResponseError(f"invalid header name {name!r}")
    if _BAD_TEXT(value):
        raise ResponseError(f"invalid header value for {name}: {value!r}")
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        raise ResponseError(f"header value for {name} is not latin-1: {value!r}") from None
    lower = name.lower()
    line = f"{name}: {value}\r\n"
    if lower == "content-length":
        digits = value.strip()
        if not digits.isdigit() or not digits.isascii():
            raise ResponseError(f"invalid Content-Length {value!r}")
        return line, _LENGTH_HEADER, int(digits)
    if lower == "date":
        return line, _DATE, -1
    if lower == "server":
        return line, _SERVER, -1
    if lower in _HOP_BY_HOP:
        if lower == "connection" and "close" in value.lower():
            return "", _CLOSE, -1
        return "", _DROP, -1
    return line, _PLAIN, -1


# (name, value) -> _classify(name, value): applications send the same headers over and
# over; bounded, so that varying values (a Date, a length) cannot grow it forever.
_header_cache: dict[tuple[str, str], tuple[str, int, int]] = {}
# Whole heads, keyed on everything they depend on but the date: an application answers
# most requests with the same status and headers, and a cached head costs a dictionary
# lookup instead of about 1 us of checks and joins per response.
_head_cache: dict[tuple[Any, ...], tuple[bytes, bytes | None, int, int, bool]] = {}
_MAX_CACHED_HEADS = 512


def build_head(
    status: str,
    headers: Iterable[tuple[str, str]],
    *,
    body_length: int,
    head_request: bool,
    http11: bool,
    keep_alive: bool,
    date: str,
    server: str,
) -> tuple[bytes, int, int, bool]:
    """Serialize a response head.

    ``body_length`` is the length of the body when the server knows it (a list body),
    else -1; ``keep_alive`` whether the connection may stay open as far as the client and
    the server are concerned. Returns ``(head, framing, length, keep_alive)``: the bytes
    to send, how the body is delimited (:data:`LENGTH`, :data:`CHUNKED`,
    :data:`UNTIL_CLOSE`, :data:`NO_BODY`), the body's length for :data:`LENGTH` (what the
    application declared wins over ``body_length``), and whether the connection stays
    open after this response (the head says ``Connection: close`` if not). Raises
    :class:`ResponseError` for an invalid status or header.
    """
    pairs = tuple(headers)  # once: ``headers`` may be any iterable
    key: tuple[Any, ...] | None = (
        status, pairs, body_length, head_request, http11, keep_alive, server
    )  # fmt: skip
    try:
        cached = _head_cache.get(key)  # type: ignore[arg-type]
    except TypeError:  # a header pair that is a list: not hashable, still acceptable
        key = cached = None
    if cached is None:
        cached = _head_parts(status, pairs, body_length, head_request, http11, keep_alive,
                             server)  # fmt: skip
        if key is not None:
            if len(_head_cache) >= _MAX_CACHED_HEADS:
                _head_cache.clear()  # varying heads (lengths, cookies): start again
            _head_cache[key] = cached
    before, after, framing, length, keep = cached
    if after is None:  # the application sent its own Date
        return before, framing, length, keep
    return b"".join((before, date.encode("latin-1"), after)), framing, length, keep


def _head_parts(
    status: str,
    headers: Iterable[tuple[str, str]],
    body_length: int,
    head_request: bool,
    http11: bool,
    keep_alive: bool,
    server: str,
) -> tuple[bytes, bytes | None, int, int, bool]:
    """:func:`build_head`'s work, with the head split where the ``Date`` value goes
    (``after`` is None when the application gave its own ``Date``)."""
    if type(status) is not str or len(status) < 4 or status[3] != " ":
        raise ResponseError(f"invalid status {status!r}")
    code_text = status[:3]
    if not code_text.isdigit() or not code_text.isascii() or _BAD_TEXT(status):
        raise ResponseError(f"invalid status {status!r}")
    code = int(code_text)
    if code < 200:  # 1xx are interim: the server sends 100 Continue itself, nothing else
        raise ResponseError(f"an application cannot send an interim status: {status!r}")
    lines = ["HTTP/1.1 ", status, "\r\n"]
    declared = -1
    has_date = has_server = False
    cache = _header_cache
    for pair in headers:
        try:
            entry = cache.get(pair)
        except TypeError:  # a list instead of a tuple: not hashable, still acceptable
            entry = None
        if entry is None:
            try:
                name, value = pair
            except (TypeError, ValueError):
                raise ResponseError(f"a header must be a (name, value) pair: {pair!r}") from None
            entry = _classify(name, value)
            if len(cache) < _MAX_CACHED_HEADERS:
                cache[(name, value)] = entry
        line, kind, length = entry
        if kind == _PLAIN:
            lines.append(line)
        elif kind == _LENGTH_HEADER:
            if declared >= 0 and length != declared:
                raise ResponseError("conflicting Content-Length headers")
            declared = length
        elif kind == _DATE:
            has_date = True
            lines.append(line)
        elif kind == _SERVER:
            has_server = True
            lines.append(line)
        elif kind == _CLOSE:
            keep_alive = False
    date_at = -1
    if not has_date:
        lines.append("Date: ")
        date_at = len(lines)
        lines.append("\r\n")
    if not has_server:
        lines += ("Server: ", server, "\r\n")
    if code == 204 or code == 304:
        framing, length = NO_BODY, 0
        if code == 304 and declared >= 0:
            lines.append(f"Content-Length: {declared}\r\n")  # the GET's length, allowed
    else:
        length = declared if declared >= 0 else body_length
        if length >= 0:
            framing = LENGTH
            lines.append(f"Content-Length: {length}\r\n")
        elif http11:
            framing = CHUNKED
            lines.append("Transfer-Encoding: chunked\r\n")
        else:
            framing = UNTIL_CLOSE
        if head_request:
            framing = NO_BODY
        elif framing == UNTIL_CLOSE:
            keep_alive = False
    if not keep_alive:
        lines.append("Connection: close\r\n\r\n")
    elif not http11:
        lines.append("Connection: keep-alive\r\n\r\n")
    else:
        lines.append("\r\n")
    parts: tuple[bytes, bytes | None]
    try:
        if date_at < 0:
            parts = ("".join(lines).encode("latin-1"), None)
        else:
            parts = ("".join(lines[:date_at]).encode("latin-1"),
                     "".join(lines[date_at:]).encode("latin-1"))  # fmt: skip
    except UnicodeEncodeError:
        raise ResponseError(f"status is not latin-1: {status!r}") from None
    return parts[0], parts[1], framing, length, keep_alive


# -- cached clocks ------------------------------------------------------------------------

_date_second = -1
_date_value = ""
_log_second = -1
_log_value = ""


def http_date(now: float) -> str:
    """The ``Date`` header value for ``now`` (a ``time.time()``), formatted once a second."""
    global _date_second, _date_value
    second = int(now)
    if second != _date_second:
        _date_value = formatdate(second, usegmt=True)
        _date_second = second
    return _date_value


def log_time(now: float) -> str:
    """``now`` as the common log format writes it (``10/Oct/2000:13:55:36 -0700``), in
    local time, formatted once a second."""
    global _log_second, _log_value
    second = int(now)
    if second != _log_second:
        _log_value = time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime(second))
        _log_second = second
    return _log_value


# -- canned responses ---------------------------------------------------------------------

REASONS = {
    400: "Bad Request",
    408: "Request Timeout",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    505: "HTTP Version Not Supported",
}


def error_response(status: int, server: str, now: float) -> bytes:
    """A complete ``Connection: close`` response with a short plain-text body."""
    reason = REASONS.get(status, "Error")
    body = f"{status} {reason}\n"
    return (
        f"HTTP/1.1 {status} {reason}\r\nDate: {http_date(now)}\r\nServer: {server}\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
        f"Connection: close\r\n\r\n{body}"
    ).encode("latin-1")
