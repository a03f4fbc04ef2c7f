"""A bounded load client of the project's own, for tests that apply a fault under load.

:class:`EchoLoad`: each of ``concurrency`` threads opens a connection, sends one message,
reads its echo and closes, again and again, until stopped (or until ``limit`` requests
in all). Every request ends in exactly one of: answered (the right bytes came back),
refused (the connect was refused: nobody listening), failed (anything else, with the
reason kept), and two outcomes that only the options below produce:

- ``greeting``: the server is expected to send these bytes as soon as a worker accepts
  the connection, before the echo. A connection closed or reset before any byte of the
  greeting arrived was never taken by a worker (it sat in the listen queue when the last
  listener closed): it counts as *unaccepted*, not failed. Once the greeting arrived,
  anything but the full echo is a failure.
- ``abort_every``: every Nth request of each thread sends half its message and resets
  the connection (RST, via ``SO_LINGER`` 0), as a client that gives up mid-request;
  it counts as *aborted*.

:class:`HTTPLoad`: the same, with ``GET`` requests for an HTTP server.

:class:`PersistentEchoLoad`: each thread keeps one connection open and sends message
after message on it. A connection that the server closes between two requests (no byte
of the answer came back) is reopened and the request sent again, counted as a
*reconnect*; a partial or wrong answer is a failure.
"""

from __future__ import annotations

import collections
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

# How a connection that the server dropped looks from the client.
_DROPPED = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


@dataclass
class LoadResult:
    sent: int = 0
    answered: int = 0
    refused: int = 0
    failed: int = 0
    reasons: collections.Counter[str] = field(default_factory=collections.Counter)
    unaccepted: int = 0  # with a greeting: dropped before a worker took the connection
    aborted: int = 0  # reset on purpose by the client (abort_every)
    reconnects: int = 0  # persistent connections closed by the server between requests
    max_latency: float = 0.0  # seconds, the slowest request from connect to its outcome

    def __str__(self) -> str:
        why = ", ".join(f"{k}: {n}" for k, n in self.reasons.most_common()) or "-"
        extra = "".join(
            f", {name} {n}"
            for name, n in (
                ("unaccepted", self.unaccepted),
                ("aborted", self.aborted),
                ("reconnects", self.reconnects),
            )
            if n
        )
        return (
            f"sent {self.sent}, answered {self.answered}, failed {self.failed}, "
            f"refused {self.refused}{extra} (reasons: {why})"
        )

    def why(self) -> str:
        """The failure reasons on one line, ``-`` if none."""
        return ",".join(f"{k}:{n}" for k, n in self.reasons.most_common()) or "-"


class EchoLoad:
    """``with EchoLoad(address) as load: ...``; ``load.result`` once the block ends.

    Bounded: it stops at the end of the block, after ``limit`` requests if one is given,
    or after ``max_seconds`` whatever happens. Loopback only: the address must be
    127.0.0.1, ::1 or a Unix socket path.
    """

    def __init__(
        self,
        address: tuple[str, int] | str,
        concurrency: int = 8,
        max_seconds: float = 60.0,
        timeout: float = 10.0,
        *,
        limit: int | None = None,
        greeting: bytes = b"",
        abort_every: int = 0,
    ) -> None:
        if isinstance(address, tuple):
            assert address[0] in ("127.0.0.1", "::1"), "load tests stay on loopback"
        self.address = address
        self.concurrency = concurrency
        self.max_seconds = max_seconds
        self.timeout = timeout
        self.limit = limit
        self.greeting = greeting
        self.abort_every = abort_every
        self.result = LoadResult()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._tickets = 0

    def __enter__(self) -> EchoLoad:
        self._deadline = time.monotonic() + self.max_seconds
        for i in range(self.concurrency):
            t = threading.Thread(target=self._run, args=(i,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop sending and wait for the requests in flight (also done by the block's end)."""
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 5)

    def wait_answered(self, count: int, timeout: float = 10.0) -> None:
        """Block until at least ``count`` more requests have been answered."""
        target = self.result.answered + count
        deadline = time.monotonic() + timeout
        while self.result.answered < target:
            if time.monotonic() > deadline:
                raise AssertionError(f"load stalled: {self.result}")
            time.sleep(0.01)

    def wait_done(self, timeout: float = 60.0) -> None:
        """With a ``limit``: block until every thread has finished."""
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                raise AssertionError(f"load did not finish in {timeout}s: {self.result}")

    def _family(self) -> int:
        if isinstance(self.address, str):
            return socket.AF_UNIX
        return socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET

    def _more(self) -> bool:
        """Take a ticket for one more request, or say that the load is over."""
        if self._stop.is_set() or time.monotonic() >= self._deadline:
            return False
        with self._lock:
            if self.limit is not None and self._tickets >= self.limit:
                return False
            self._tickets += 1
            return True

    def _count(self, outcome: str, latency: float = 0.0) -> None:
        with self._lock:
            self.result.sent += 1
            self.result.max_latency = max(self.result.max_latency, latency)
            if outcome in ("answered", "refused", "unaccepted", "aborted"):
                setattr(self.result, outcome, getattr(self.result, outcome) + 1)
            else:
                self.result.failed += 1
                self.result.reasons[outcome] += 1

    def _run(self, index: int) -> None:
        n = 0
        while self._more():
            n += 1
            message = f"{index}:{n}:".encode() + os.urandom(16).hex().encode() + b"\n"
            start = time.monotonic()
            if self.abort_every and n % self.abort_every == 0:
                outcome = self._abort(message)
            else:
                outcome = self._one(message)
            self._count(outcome, time.monotonic() - start)

    def _one(self, message: bytes) -> str:
        expected = self.greeting + message
        got = b""
        try:
            with socket.socket(self._family(), socket.SOCK_STREAM) as s:
                s.settimeout(self.timeout)
                try:
                    s.connect(self.address)
                except ConnectionRefusedError:
                    return "refused"
                s.sendall(message)
                while len(got) < len(expected):
                    chunk = s.recv(len(expected) - len(got))
                    if not chunk:
                        break
                    got += chunk
        except _DROPPED as e:
            if self.greeting and not got:
                return "unaccepted"
            return type(e).__name__
        except OSError as e:
            return type(e).__name__
        if got == expected:
            return "answered"
        if self.greeting and not got:
            return "unaccepted"
        if len(got) < len(expected) and expected.startswith(got):
            return "closed before the answer"
        return "wrong answer"

    def _abort(self, message: bytes) -> str:
        """Send half the message, then reset the connection."""
        try:
            with socket.socket(self._family(), socket.SOCK_STREAM) as s:
                s.settimeout(self.timeout)
                try:
                    s.connect(self.address)
                except ConnectionRefusedError:
                    return "refused"
                s.sendall(message[: len(message) // 2])
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError as e:
            return type(e).__name__
        return "aborted"


class HTTPLoad(EchoLoad):
    """Like :class:`EchoLoad`, but each request is ``GET path`` with ``Connection: close``
    on a fresh connection; answered means status 200 and a body ending with ``expect``."""

    def __init__(
        self,
        address: tuple[str, int] | str,
        concurrency: int = 4,
        max_seconds: float = 60.0,
        timeout: float = 10.0,
        *,
        path: str = "/",
        expect: bytes = b"",
        limit: int | None = None,
    ) -> None:
        super().__init__(address, concurrency, max_seconds, timeout, limit=limit)
        self.request = f"GET {path} HTTP/1.1\r\nHost: load\r\nConnection: close\r\n\r\n".encode()
        self.expect = expect

    def _one(self, message: bytes) -> str:
        got = b""
        try:
            with socket.socket(self._family(), socket.SOCK_STREAM) as s:
                s.settimeout(self.timeout)
                try:
                    s.connect(self.address)
                except ConnectionRefusedError:
                    return "refused"
                s.sendall(self.request)
                while chunk := s.recv(65536):
                    got += chunk
        except OSError as e:
            return type(e).__name__
        if not got:
            return "closed without a response"
        status = got.split(b"\r\n", 1)[0]
        if not status.startswith(b"HTTP/1.1 "):
            return "not an HTTP response"
        if not status.startswith(b"HTTP/1.1 200 "):
            return status[9:12].decode("latin-1", "replace")
        return "answered" if got.endswith(self.expect) else "wrong answer"


class PersistentEchoLoad(EchoLoad):
    """Like :class:`EchoLoad`, but each thread sends its messages over one connection,
    reopened only when the server closes it. Use no more threads than the server has
    connections to give (a plain echo worker serves one connection at a time)."""

    def __init__(
        self,
        address: tuple[str, int] | str,
        concurrency: int = 2,
        max_seconds: float = 60.0,
        timeout: float = 10.0,
        *,
        limit: int | None = None,
    ) -> None:
        super().__init__(address, concurrency, max_seconds, timeout, limit=limit)

    def _run(self, index: int) -> None:
        sock: socket.socket | None = None
        n = 0
        try:
            while self._more():
                n += 1
                message = f"{index}:{n}:".encode() + os.urandom(16).hex().encode() + b"\n"
                start = time.monotonic()
                for _ in range(3):  # a request is retried on a fresh connection, twice
                    fresh = sock is None
                    if sock is None:
                        sock = socket.socket(self._family(), socket.SOCK_STREAM)
                        sock.settimeout(self.timeout)
                        try:
                            sock.connect(self.address)
                        except OSError as e:
                            sock.close()
                            sock = None
                            outcome = (
                                "refused"
                                if isinstance(e, ConnectionRefusedError)
                                else type(e).__name__
                            )
                            break
                    outcome, got = self._ask(sock, message)
                    if outcome == "answered" or got or fresh:
                        break  # answered, or failed with a partial answer or at once
                    # Closed between two requests: what a server that retires a worker
                    # does at a quiet moment. Reconnect and send the request again.
                    sock.close()
                    sock = None
                    with self._lock:
                        self.result.reconnects += 1
                if outcome != "answered" and sock is not None:
                    sock.close()
                    sock = None
                self._count(outcome, time.monotonic() - start)
        finally:
            if sock is not None:
                sock.close()

    def _ask(self, sock: socket.socket, message: bytes) -> tuple[str, bytes]:
        got = b""
        try:
            sock.sendall(message)
            while len(got) < len(message):
                chunk = sock.recv(len(message) - len(got))
                if not chunk:
                    return ("closed before the answer", got)
                got += chunk
        except OSError as e:
            return (type(e).__name__, got)
        return ("answered" if got == message else "wrong answer", got)
