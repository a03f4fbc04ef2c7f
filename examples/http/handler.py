"""The HTTP/1.1 request handler: h11 parses, this module does the socket I/O and WSGI.

One :class:`HTTPHandler` instance serves one connection, request after request, in the
socketserver way: the server calls ``handle()`` and closes the socket when it returns.

How a connection goes::

    wait for a head (idle: keepalive_timeout; once a byte came: read_timeout in all)
      -> h11.Request -> environ -> app(environ, start_response)
      -> head + body (a small list body: one send) -> end of the body
      -> keep-alive? read what is left of the request body, hand the bytes already
         received (pipelined requests) to a fresh h11.Connection, wait again : close

Design choices, each for a reason:

* The socket stays in blocking mode and every ``recv``/``send`` passes ``MSG_DONTWAIT``;
  waits go through ``poll()`` in slices of at most ``worker.poll_interval``, each slice
  stamping the worker's heartbeat. A keep-alive or slow client therefore never gets the
  worker killed, and never holds it longer than the configured timeouts. No ``fcntl`` per
  connection, no hidden ``poll`` before each ``recv`` as ``settimeout()`` would add. The
  exception, for the most frequent wait: the first ``keepalive_yield`` seconds of waiting
  for the next request on a keep-alive connection are a blocking ``recv`` with a kernel
  timeout (``SO_RCVTIMEO``), one system call where ``poll`` + ``recv`` would be two.
* h11 parses requests and bodies; responses are written by :mod:`.response` (see there
  why). Since h11 never sees our responses, each request gets its own ``h11.Connection``
  (0.7 us), fed with whatever the previous one had received beyond its request.
* Per-request work is kept small: the environ is a copy of a per-connection dict, header
  names map to environ keys through a per-process cache, the ``Date`` header is formatted
  once per second, a small list body goes out with its head in a single ``send``, and with
  the access log off no logging call is made at all.
* A worker serves one request at a time, so keep-alive must not starve the other clients:
  when others need the worker (its other parked connections, or a client waiting to be
  accepted while no other worker idles), a connection is parked after its response
  (``PreforkMixIn.park``: it stays open, and the worker's loop serves it again when its
  next request comes); a connection idle for 10 ms is parked too.
  Where parking is not possible (handler threads), the response says
  ``Connection: close`` instead, and an idle connection is closed once a client waits. A
  single client keeps its connection as long as nobody else needs the worker.
* Errors the client caused (malformed input, limits, timeouts) are answered with a canned
  response and ``Connection: close`` and logged at info level; application errors are
  logged with their traceback; a client that goes away is logged at debug level only.
"""

from __future__ import annotations

import logging
import os
import re
import select
import socket
import socketserver
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import h11

from .response import (
    CHUNKED,
    LENGTH,
    NO_BODY,
    ResponseError,
    build_head,
    error_response,
    http_date,
    log_time,
)
from .wsgi import (
    BadRequest,
    ClientDisconnected,
    ClientError,
    InputStream,
    PayloadTooLarge,
    RequestTimeout,
    WSGIApp,
    base_environ,
    connection_environ,
    new_key_cache,
    request_environ,
)

__all__ = ["HTTPHandler", "HTTPSettings", "make_handler"]

SERVER_SOFTWARE = "prefork-server"

_MSG_DONTWAIT: int = getattr(socket, "MSG_DONTWAIT", 0)
_RECV_SIZE = 65536
_JOIN_LIMIT = 65536  # a body up to this size is copied into one send with its head
_LINGER_SECONDS = 1.0  # after an error response: read and discard for at most this long
_LINGER_BYTES = 1 << 20
_STATE_ATTR = "_examples_http_state"
_POLLIN = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP
_POLLOUT = select.POLLOUT | select.POLLERR | select.POLLHUP
_IDLE = -1  # a poller for the client and the listening socket
_NEIGHBOURS = -2  # the same, and the worker loop's descriptor (see _wait_for_request)
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Bytes a request may start with: a method is a token; blank lines before it are allowed.
_REQUEST_START = frozenset(
    b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz\r\n"
)
_LAST_CHUNK = b"0\r\n\r\n"
_HEAD_END = re.compile(rb"\n\r?\n")  # where h11 takes a request head to end
_TIMEVAL = struct.Struct("@ll")  # struct timeval, for SO_RCVTIMEO
_WAITING_RECHECK = 0.001  # seconds a "nobody waits" answer is trusted
# An idle keep-alive connection is parked after this long (seconds), where it can be.
_PARK_MOMENT = 0.01
# A parked connection moves (is closed after its response) only to a worker idle for this
# long (seconds): not to one that is just between two connections.
_IDLE_FOR_A_MOVE = 0.005
# A worker that looks idle is trusted to take a queued client for this long (seconds);
# then a connection gives its worker up for the client anyway.
_IDLE_TRUST = 0.05
_READABLE = 1  # _wait_for_request: the socket is readable
_RECEIVED = 2  # _wait_for_request: h11 got the next bytes (or the EOF) already

# h11 names, looked up once.
_Request = h11.Request
_Data = h11.Data
_EndOfMessage = h11.EndOfMessage
_NEED_DATA = h11.NEED_DATA
_SERVER = h11.SERVER
_Connection = h11.Connection
_RemoteProtocolError = h11.RemoteProtocolError


@dataclass(frozen=True)
class HTTPSettings:
    """The HTTP limits and switches of a server; every field has a documented default.

    - ``max_header_bytes`` (16384): the request line plus headers; larger gets a 431.
    - ``max_body_bytes`` (10 MiB): a larger ``Content-Length`` gets a 413 before the
      application runs; a chunked body that grows past it makes ``wsgi.input`` raise
      :class:`~examples.http.wsgi.PayloadTooLarge` (a 413 if the application lets it
      propagate). 0 means no limit.
    - ``read_timeout`` (10 s): a request's head must arrive whole within this time of its
      first byte (of the connection's start, for the first request); each wait for more
      body bytes, and for the client to take more of the response, is at most this long.
      Then the connection is closed (after a 408 if the head was incomplete).
    - ``busy_read_timeout`` (1 s): while another client waits to be accepted, a request
      head gets only this long instead of ``read_timeout``, so that slow or silent
      clients (slowloris) cannot keep every worker from the clients behind them. Bodies
      keep ``read_timeout``: a slow upload is not cut because the server is busy.
    - ``keepalive_timeout`` (5 s): how long an idle keep-alive connection is kept; 0
      turns keep-alive off (every response says ``Connection: close``).
    - ``keepalive_turn`` (1): while other clients need the worker, a keep-alive
      connection gives it up after this many requests: it is parked, or, where it
      cannot be, its response says ``Connection: close``. Alone, a client keeps its
      worker. Larger values trade the other clients' latency for throughput.
    - ``keepalive_yield`` (0.5 s): where a connection cannot be parked (handler
      threads), an idle keep-alive connection is closed after this long if another
      client is waiting to be accepted. Closing an idle connection races with a request
      the client may be sending (RFC 9112 9.6: clients retry); waiting this long first
      makes that rare even on a loaded machine. Parking has no such race: an idle
      connection is parked after 10 ms (or this long, if shorter).
    - ``access_log`` (True): one line per request in the common log format, plus the
      duration in seconds, at info level on the ``<server logger>.access`` logger.
    - ``server_software`` (``"prefork-server"``): the ``Server`` header and
      ``SERVER_SOFTWARE``.

    Constructing one with an invalid value raises ``ValueError`` naming the field.
    """

    max_header_bytes: int = 16384
    max_body_bytes: int = 10 * 1024 * 1024
    read_timeout: float = 10.0
    busy_read_timeout: float = 1.0
    keepalive_timeout: float = 5.0
    keepalive_turn: int = 1
    keepalive_yield: float = 0.5
    access_log: bool = True
    server_software: str = SERVER_SOFTWARE

    def __post_init__(self) -> None:
        for name in ("max_header_bytes", "max_body_bytes", "keepalive_turn"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, not {value!r}")
        if self.keepalive_turn < 1:
            raise ValueError(f"keepalive_turn must be >= 1, not {self.keepalive_turn}")
        if self.max_header_bytes < 64:
            raise ValueError(f"max_header_bytes must be >= 64, not {self.max_header_bytes}")
        for name in ("read_timeout", "busy_read_timeout", "keepalive_timeout", "keepalive_yield"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, not {value!r}")
        if self.read_timeout <= 0:
            raise ValueError(f"read_timeout must be > 0, not {self.read_timeout!r}")
        software = self.server_software
        if not software or not software.isprintable() or not software.isascii():
            raise ValueError(f"server_software must be printable ASCII, not {software!r}")


_forks = 0  # processes this one has forked (os.fork: C code that forks directly is unseen)


def _count_fork() -> None:
    global _forks
    _forks += 1


os.register_at_fork(before=_count_fork)


class _PeerGone(Exception):
    """Our socket failed (reset, broken pipe, write timeout): nobody left to answer."""


class _AppError(Exception):
    """The application's response cannot be sent as it is (bad status or headers, a body
    that does not match its Content-Length)."""


class HTTPHandler(socketserver.BaseRequestHandler):
    """Serves HTTP/1.1 to one connection, request after request, with a WSGI application.

    Use :func:`make_handler` to get a subclass bound to an application and settings; the
    class attributes ``app`` and ``settings`` are what a subclass may override. The
    handler works under a ``PreforkTCPServer`` (heartbeats, graceful stop, keep-alive that
    yields to waiting clients) and under a plain ``socketserver`` server as well.

    Guarantees: responses go out in request order (pipelining); every response has
    ``Date`` and ``Server`` headers; a response after which the connection ends says
    ``Connection: close``; the ``close()`` of the application's iterable is called
    whatever happens once the application has returned it; ``handle()`` raises only for a
    bug of its own (logged by the server's ``handle_error``), never for something a client
    or the application did.
    """

    app: ClassVar[Callable[..., Iterable[bytes]]]
    settings: ClassVar[HTTPSettings] = HTTPSettings()

    request: socket.socket

    # The fields set on every connection and every request, as slots. CPython (3.11 and
    # later) shares one table of attribute names between the instances of a class only up
    # to 30 names; a handler that stored more in its __dict__ had it turned into a dict of
    # its own on each connection (about 0.5 us, and slower attribute writes after it).
    # The fields with class-level defaults below stay in the __dict__: fewer than 30.
    __slots__ = (
        "request", "client_address", "server",  # socketserver's
        "_state", "_settings", "_server_name", "_worker", "_log", "_access", "_env", "_buf",
        "_view", "_clients_waiting", "_conn",  # setup()
        "_expect_100", "_sent_100", "_body_limit", "_body_seen", "_keep_alive", "_http11",
        "_is_head", "_status", "_headers", "_framing", "_remaining", "_has_body",  # _serve()
    )  # fmt: skip

    # -- per connection -----------------------------------------------------------------

    def setup(self) -> None:
        # What is the same for every connection of a server lives on the server object,
        # which each worker has its own copy of: computed once per process, never shared.
        state = getattr(self.server, _STATE_ATTR, None)
        if state is None or state["handler"] is not type(self):
            state = self._new_process_state()
            setattr(self.server, _STATE_ATTR, state)
        self._state = state
        self._settings = settings = self.settings
        self._server_name: str = settings.server_software
        self._worker = getattr(self.server, "worker", None)
        self._log: logging.Logger = state["log"]
        self._access: logging.Logger | None = None
        if settings.access_log and state["access"].isEnabledFor(logging.INFO):
            self._access = state["access"]
        self._env = connection_environ(state["environ"], self.client_address)
        # Receive buffers are reused (h11 copies what it is given): one per connection at a
        # time, taken from the process's pool, so handler threads never share one.
        pool = state["buffers"]
        self._buf: bytearray = pool.pop() if pool else bytearray(_RECV_SIZE)
        self._view = memoryview(self._buf)
        self._clients_waiting: Callable[[], bool] | None = state["clients_waiting"]
        self._conn = _Connection(_SERVER, max_incomplete_event_size=settings.max_header_bytes)
        # The other per-connection fields start from the class defaults below (no store
        # per connection for a value that is the same for all).

    # Per-connection state: class-level defaults, set on the instance when they change.
    _eof = False
    _sends = 0
    _polls: dict[int, Any] | None = None  # poll objects, made when first needed
    _status_code = "-"
    _response_bytes = 0
    _head_sent = False
    _in_request = False
    _served = 0  # requests on this connection
    _pending = False  # whether h11 has received bytes it has not parsed yet
    _why = ""  # why the last wait ended without data, for the log
    _recv_timeout_set = False  # SO_RCVTIMEO, for the keep-alive wait
    _fed = 0  # bytes given to the current h11.Connection
    _last_read = 0  # bytes of the last read, still in self._buf
    _park_after = False  # park the connection after this response (it says keep-alive)
    _parked = False  # parked: the connection is the server's now, not to be closed here
    _conn_spent = False  # _conn has served its request, and no new one was made (parking)

    def _new_process_state(self) -> dict[str, Any]:
        worker = getattr(self.server, "worker", None)
        log = getattr(worker, "logger", None) or getattr(self.server, "logger", None)
        if log is None:
            log = logging.getLogger("examples.http")
        # A prefork server tells whether clients wait in its accept queue; a plain
        # socketserver (no worker) serves one client at a time anyway.
        clients_waiting = getattr(self.server, "clients_waiting", None)
        listener = getattr(self.server, "socket", None)
        if worker is None or clients_waiting is None or listener is None:
            clients_waiting = listener = None
        # Parking idle connections in the worker's loop (PreforkMixIn.park), where the
        # server can: a worker then serves many keep-alive clients in turn.
        can_park = getattr(self.server, "can_park", None) if worker is not None else None
        loop_fileno = getattr(self.server, "loop_fileno", None)
        if loop_fileno is None:
            can_park = None
        loop_fd = loop_fileno() if can_park is not None else -1  # type: ignore[misc]
        threads = isinstance(self.server, socketserver.ThreadingMixIn)
        state: dict[str, Any] = {
            "buffers": [],
            "listener": listener,
            "clients_waiting": clients_waiting,
            "can_park": can_park,  # None: this server cannot park at all
            # See finish(): a prefork server whose hooks allow it, no handler threads
            # (one could fork between another's check and close), and the process's fork
            # count when it started serving. An application thread that forks in that
            # same instant is not covered: a window of a few bytecodes.
            "close_here": worker is not None
            and not threads
            and bool(getattr(self.server, "handler_may_close", False)),
            "forks": _forks,
            "loop_fd": loop_fd,
            "handler": type(self),
            "log": log,
            "access": logging.getLogger(log.name + ".access"),
            "environ": base_environ(
                self.server.server_address,
                self.settings.server_software,
                multithread=threads,
            ),
            "keys": new_key_cache(),
            "quiet_until": 0.0,  # _others_waiting: nobody waited when last asked
            "busy_until": 0.0,  # _idle_elsewhere: no other worker idled when last asked
            "busy_long_until": 0.0,  # the same, for an idle time of _IDLE_FOR_A_MOVE
            "queued_since": 0.0,  # _must_yield: since when a client waits while one idles
        }
        return state

    def finish(self) -> None:
        state = self._state
        state["buffers"].append(self._buf)  # back to the pool for the next one
        if state["close_here"] and state["forks"] == _forks and not self._parked:
            # Nothing else holds the descriptor (no makefile(), and no process forked by
            # this one since it started serving: a child, of multiprocessing say, would
            # hold copies of the connections), so close() alone sends the FIN, and the
            # server's shutdown_request() saves its shutdown() (1 to 3 us a connection).
            # Elsewhere the server's shutdown() ends the connection, as socketserver's.
            self.request.close()

    def handle(self) -> None:
        first = True
        while True:
            request = self._next_request(first)
            if request is None or not self._serve(request):
                return
            if self._park_after:
                self._park_after = False
                # Unless the client has sent more already (pipelining): serve that first.
                if not self._pending and self._park(self._settings.keepalive_timeout):
                    return
            if self._conn_spent:  # not parked after all
                self._conn_spent = False
                self._conn = self._new_connection()
            first = False

    def _park(self, timeout: float) -> bool:
        """Hand the idle connection to the worker's loop (see ``PreforkMixIn.park``);
        True if it took it: the connection is then no longer this handler's."""
        if self._state["can_park"] is None:
            return False
        if self.server.park(self.request, self.client_address, timeout):  # type: ignore[attr-defined]
            self._parked = True
        return self._parked

    # -- reading ------------------------------------------------------------------------

    def _next_request(self, first: bool) -> h11.Request | None:
        """The next request's head, or None once the connection should end: EOF, idle
        timeout, graceful stop or a waiting client while idle, or an error (answered)."""
        conn = self._conn
        settings = self._settings
        idle = True  # no byte of this request seen yet
        # The first request's head is timed from the connection's start; a later one's
        # from its first byte (before that, the keep-alive timeout applies).
        now = time.monotonic()
        deadline = now + (settings.read_timeout if first else settings.keepalive_timeout)
        busy_deadline = now + settings.busy_read_timeout
        while True:
            if self._pending:  # h11 holds bytes it has not parsed: maybe a whole head
                if self._fed > settings.max_header_bytes and not self._head_fits():
                    self._reject(431, f"request head over {settings.max_header_bytes} bytes")
                    return None
                try:
                    event = conn.next_event()
                except _RemoteProtocolError as e:
                    if self._eof:
                        self._log.debug("client %s closed in a request head", self._peer())
                    else:
                        self._reject(e.error_status_hint, f"malformed request: {e}")
                    return None
                if type(event) is _Request:
                    version = event.http_version
                    if version != b"1.1" and version != b"1.0":
                        self._reject(505, f"HTTP/{version.decode('latin-1')} requested")
                        return None
                    return event
                if event is not _NEED_DATA:
                    return None  # ConnectionClosed
                if idle and conn.trailing_data[0]:  # a partial head came with the last one
                    idle = False
                    now = time.monotonic()
                    deadline = now + settings.read_timeout
                    busy_deadline = now + settings.busy_read_timeout
            received = False
            if idle and not first:
                waited = self._wait_for_request(deadline)
                if not waited:
                    return None
                received = waited is _RECEIVED
            if not received and not self._receive(
                deadline, stop_when_asked=idle, busy_deadline=busy_deadline
            ):
                if not idle:
                    self._reject(408, f"timed out reading the request head ({self._why})")
                elif first:
                    self._log.debug("client %s sent nothing (%s)", self._peer(), self._why)
                return None
            self._pending = True
            if idle and not self._eof:
                if self._buf[0] not in _REQUEST_START:
                    # Not HTTP (a TLS handshake, a binary protocol): h11 would wait for a
                    # line end that may never come. Say so at once.
                    byte = self._buf[0]
                    self._reject(400, f"not an HTTP request (first byte {byte:#04x})")
                    return None
                idle = False
                if not first:
                    now = time.monotonic()
                    deadline = now + settings.read_timeout
                    busy_deadline = now + settings.busy_read_timeout

    def _head_fits(self) -> bool:
        """Whether the head h11 is about to parse ends within ``max_header_bytes``.

        h11 limits only a head still incomplete in its buffer: one that arrived whole
        (64 KiB in one read: 15,000 tiny headers) it would parse in full, megabytes of
        objects and milliseconds of CPU, before :meth:`_serve` could measure it. Asked
        only once more than the limit has been received for this head (a big head, or
        many pipelined requests, or a body that came with its head); it searches the last
        read in place, or else a copy of what h11 holds.
        """
        limit = self._settings.max_header_bytes
        n = self._last_read
        if self._fed == n:  # h11 holds just the last read: search it where it is, no copy
            return _HEAD_END.search(self._buf, 0, min(n, limit + 4)) is not None
        # Blank lines before a request line make h11 refuse it at once: that is fine too.
        return _HEAD_END.search(self._conn.trailing_data[0], 0, limit + 4) is not None

    def _poller(self, kind: int) -> Any:
        """A poll object for the client socket: _POLLIN, _POLLOUT, or _IDLE (readable,
        plus the listening socket)."""
        polls = self._polls
        if polls is None:
            polls = self._polls = {}
        poller = polls.get(kind)
        if poller is None:
            poller = polls[kind] = select.poll()
            if kind == _IDLE or kind == _NEIGHBOURS:
                poller.register(self.request, _POLLIN)
                poller.register(self._state["listener"], select.POLLIN)
                if kind == _NEIGHBOURS:
                    poller.register(self._state["loop_fd"], select.POLLIN)
            else:
                poller.register(self.request, kind)
        return poller

    def _wait_for_request(self, deadline: float) -> int:
        """Wait, idle between two requests, until the socket is readable (_READABLE) or
        until h11 has been fed the next bytes or the EOF (_RECEIVED). False (0) on
        timeout, on a graceful stop, and when another client needs the worker."""
        worker = self._worker
        if worker is None or self._clients_waiting is None:
            return self._wait(self._poller(_POLLIN), deadline, stop_when_asked=True)
        # First give the client a moment on its own, then watch the accept queue too. The
        # moment is a blocking recv with a kernel timeout (SO_RCVTIMEO, set once per
        # connection, on its first keep-alive wait): one system call per request where a
        # poll() and then a recv() would be two.
        settings = self._settings
        moment = min(settings.keepalive_yield, settings.keepalive_timeout)
        can_park = self._state["can_park"]
        if can_park is not None and can_park():
            if self._others_parked() and self._state["loop_fd"] >= 0:
                # Wait for this client and for anything the loop has to do: the first
                # to come decides. An active client among idle parked connections then
                # keeps its worker (a poll and a recv per request, not the loop's
                # epoll_ctl, epoll_wait and a new handler); any other work parks it.
                ready = self._poller(_NEIGHBOURS).poll(
                    _ms(min(_PARK_MOMENT, deadline - time.monotonic()))
                )
                client = self.request.fileno()
                if ready and all(fd == client for fd, _ in ready):
                    return _READABLE
                moment = 0.0
            else:
                # Parking has no race to fear: the worker is not held for longer than
                # needed to catch a client's next request sent at once.
                moment = min(moment, _PARK_MOMENT)
        if moment >= 0.001:
            sock = self.request
            if not self._recv_timeout_set:
                self._recv_timeout_set = True
                seconds = int(moment)
                timeval = _TIMEVAL.pack(seconds, int((moment - seconds) * 1_000_000))
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
                except OSError:
                    return self._wait(self._poller(_POLLIN), deadline, stop_when_asked=True)
            try:
                n = sock.recv_into(self._buf, _RECV_SIZE)
            except BlockingIOError:  # the kernel timeout: nothing came in the moment
                n = -1
            except OSError:  # reset by the peer: as good as an EOF
                n = 0
            if n > 0:
                self._conn.receive_data(self._view[:n])  # type: ignore[arg-type]
                self._fed += n
                self._last_read = n
                return _RECEIVED
            if n == 0:
                self._eof = True
                self._conn.receive_data(b"")
                return _RECEIVED
        if not worker.heartbeat():
            return False
        # Idle for a moment: the connection waits parked in the worker's loop, which
        # serves other clients meanwhile, where it can; else here, until a client waits.
        if can_park is not None:
            if can_park():
                remaining = deadline - time.monotonic()
                if remaining > 0 and self._park(remaining):
                    return False
            elif self._others_parked():
                return False  # cannot park (at max_parked): others are served in turn
        return self._wait_unless_clients_wait(deadline, stop_when_asked=True)

    def _wait_for_head(self, deadline: float, busy_deadline: float, stop_when_asked: bool) -> bool:
        """Wait for more of a request head: until ``deadline``, or only until
        ``busy_deadline`` if by then another client waits to be accepted."""
        readable = self._poller(_POLLIN)
        if self._clients_waiting is None or busy_deadline >= deadline:
            return self._wait(readable, deadline, stop_when_asked)
        if self._wait(readable, busy_deadline, stop_when_asked):
            return True
        if self._why == "stopping":
            return False
        if self._others_parked():
            self._why = "other connections of this worker were waiting"
            return False
        return self._wait_unless_clients_wait(deadline, stop_when_asked)

    def _wait_unless_clients_wait(self, deadline: float, stop_when_asked: bool) -> bool:
        """Wait until the client's socket is readable (True), or until the deadline, a
        graceful stop (if ``stop_when_asked``) or a client waiting in the accept queue
        (False; ``self._why`` says which)."""
        worker = self._worker
        assert worker is not None
        poller = self._poller(_IDLE)
        listener_fd = self._state["listener"].fileno()
        slice_s = worker.poll_interval
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._why = "timeout"
                return False
            ready = poller.poll(_ms(min(remaining, slice_s)))
            if ready:
                for fd, _ in ready:
                    if fd != listener_fd:
                        return True
                self._why = "another client was waiting"
                return False
            if not worker.heartbeat() and stop_when_asked:
                self._why = "stopping"
                return False

    def _wait(self, poller: Any, deadline: float, stop_when_asked: bool) -> bool:
        """poll() in heartbeat-sized slices until ready (True) or the deadline (False);
        also False at a graceful stop if ``stop_when_asked``."""
        worker = self._worker
        slice_s = worker.poll_interval if worker is not None else 3600.0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._why = "timeout"
                return False
            if poller.poll(_ms(min(remaining, slice_s))):
                return True
            if worker is not None and not worker.heartbeat() and stop_when_asked:
                self._why = "stopping"
                return False

    def _receive(
        self, deadline: float, stop_when_asked: bool = False, busy_deadline: float = 0.0
    ) -> bool:
        """Feed h11 the next bytes (or the EOF). False on timeout (or on a graceful stop,
        if ``stop_when_asked``; or, reading a head, at ``busy_deadline`` if another client
        waits); True otherwise, with ``self._eof`` set when the client closed its side."""
        sock = self.request
        while True:
            try:
                n = sock.recv_into(self._buf, _RECV_SIZE, _MSG_DONTWAIT)
            except BlockingIOError:
                if busy_deadline:
                    if not self._wait_for_head(deadline, busy_deadline, stop_when_asked):
                        return False
                elif not self._wait(self._poller(_POLLIN), deadline, stop_when_asked):
                    return False
                continue
            except InterruptedError:
                continue
            except OSError:  # reset by the peer: as good as an EOF
                n = 0
            if n:
                self._conn.receive_data(self._view[:n])  # type: ignore[arg-type]
                self._fed += n
                self._last_read = n
            else:
                self._eof = True
                self._conn.receive_data(b"")
            return True

    # -- writing ------------------------------------------------------------------------

    def _send(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data``; raise :class:`_PeerGone` if the client is gone or takes
        nothing for ``read_timeout`` seconds."""
        sock = self.request
        self._sends += 1
        if self._sends == 2 and sock.family != socket.AF_UNIX:
            # A second write on this connection: from now on, do not let Nagle hold a
            # small one back until the previous is acknowledged (single-send connections
            # never pay for this setsockopt).
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        try:
            sent = sock.send(data, _MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        except OSError as e:
            raise _PeerGone(str(e)) from None
        size = len(data)
        if sent == size:
            return
        view = memoryview(data)
        writable = self._poller(_POLLOUT)
        timeout = self._settings.read_timeout
        deadline = time.monotonic() + timeout
        while sent < size:
            if not self._wait(writable, deadline, stop_when_asked=False):
                raise _PeerGone(f"took no data for {timeout:g}s")
            try:
                n = sock.send(view[sent:], _MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:
                raise _PeerGone(str(e)) from None
            if n:
                sent += n
                deadline = time.monotonic() + timeout

    # -- one request --------------------------------------------------------------------

    def _serve(self, request: h11.Request) -> bool:
        """Answer one request; True if the connection may carry another one."""
        started = time.monotonic() if self._access is not None else 0.0
        self._in_request = True
        conn = self._conn
        self._expect_100 = conn.they_are_waiting_for_100_continue
        self._sent_100 = False
        self._body_limit = self._settings.max_body_bytes
        self._body_seen = 0
        wsgi_input = InputStream(self._pull_body)
        raw_headers = request.headers.raw_items()
        env = request_environ(
            self._env,
            self._state["keys"],
            request.method,
            request.target,
            request.http_version,
            raw_headers,
            wsgi_input,
        )
        http11 = request.http_version == b"1.1"
        connection = env.get("HTTP_CONNECTION")
        if connection is None:
            keep = http11
        else:
            connection = connection.lower()
            keep = "close" not in connection if http11 else "keep-alive" in connection
        self._keep_alive = keep and self._settings.keepalive_timeout > 0
        self._served += 1
        self._http11 = http11
        self._is_head = request.method == b"HEAD"
        self._status: str | None = None
        self._headers: Any = None
        self._head_sent = False
        self._framing = NO_BODY
        self._remaining = 0
        self._status_code = "-"
        self._response_bytes = 0
        # _head_fits() already refused a head that runs past the limit before h11 parsed
        # it; this counts the parsed head (to within optional spaces) as a backstop.
        head_size = len(request.target) + 16
        for name, value in raw_headers:
            head_size += len(name) + len(value) + 4
        length = env.get("CONTENT_LENGTH")
        # Without either header there is no body (RFC 9112 6.3): nothing to drain later.
        self._has_body = length is not None or "HTTP_TRANSFER_ENCODING" in env
        if head_size > self._settings.max_header_bytes:
            self._reject(431, f"request head of about {head_size} bytes")
            ok = False
        elif length is not None and self._has_body and "HTTP_TRANSFER_ENCODING" in env:
            # h11 would follow Transfer-Encoding; RFC 9112 6.1 calls the pair a likely
            # request smuggling attempt, best refused.
            self._reject(400, "both Content-Length and Transfer-Encoding")
            ok = False
        elif length and self._body_limit and int(length) > self._body_limit:
            self._reject(413, f"declared body of {length} bytes is over the limit")
            ok = False
        else:
            try:
                ok = self._run_app(env)
            except _PeerGone as e:
                self._log.debug("client %s went away: %s", self._peer(), e)
                ok = False
        self._in_request = False
        if self._access is not None:
            self._log_access(request, started)
        return ok and self._next_cycle(wsgi_input)

    def _run_app(self, env: dict[str, Any]) -> bool:
        """Call the application and send its response; True if the connection may go on.
        Raises :class:`_PeerGone` when the client cannot be written to."""
        try:
            result = self.app(env, self._start_response)
        except _PeerGone:
            raise  # from write(): the client went away
        except ClientError as e:
            return self._client_error(e)
        except Exception:  # noqa: BLE001 - the application's failure, not the worker's
            self._app_failed()
            return False
        try:
            if type(result) is list and self._status is not None and not self._head_sent:
                self._send_list(result)
            else:
                for chunk in result:
                    if chunk:
                        self._write(chunk)
                self._end_body()
        except _PeerGone:
            raise
        except ClientError as e:
            return self._client_error(e)
        except Exception:  # noqa: BLE001
            self._app_failed()
            return False
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # noqa: BLE001
                    self._log.error("error in close() of the application's iterable",
                                    exc_info=True)  # fmt: skip
        return self._keep_alive

    def _start_response(
        self,
        status: str,
        headers: list[tuple[str, str]],
        exc_info: Any = None,
    ) -> Callable[[bytes], None]:
        """PEP 3333's ``start_response``: checked when the head is sent, not here."""
        if exc_info:
            try:
                if self._head_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self._status is not None:
            raise AssertionError("start_response() called again without exc_info")
        self._status = status
        self._headers = headers
        return self._write

    def _make_head(self, body_length: int) -> bytes:
        if self._status is None:
            raise _AppError("the response began before start_response() was called")
        keep = self._keep_alive
        if keep:
            if self._expect_100 and not self._sent_100:
                keep = False  # the client may or may not send the body now: cannot tell
            worker = self._worker
            if worker is not None:
                # The per-request heartbeat: a pipelining client may never let us wait.
                if not worker.heartbeat():
                    keep = False  # a graceful stop
                elif self._served >= self._settings.keepalive_turn and self._must_yield(worker):
                    # This connection had its turn and others need the worker: it waits
                    # parked in the worker's loop, or, where it cannot, it ends. It ends
                    # too when clients wait for this worker while another one idles:
                    # the client's next connection wakes that one (_should_move).
                    can_park = self._state["can_park"]
                    if can_park is not None and can_park() and not self._should_move(worker):
                        self._park_after = True
                    else:
                        keep = False
        try:
            head, framing, length, keep = build_head(
                self._status,
                self._headers,
                body_length=body_length,
                head_request=self._is_head,
                http11=self._http11,
                keep_alive=keep,
                date=http_date(time.time()),
                server=self._server_name,
            )
        except ResponseError as e:
            raise _AppError(str(e)) from None
        self._head_sent = True
        self._framing = framing
        self._remaining = length
        self._keep_alive = keep
        self._status_code = self._status[:3]
        return head

    def _write(self, data: bytes) -> None:
        """The ``write()`` callable of ``start_response``, and the body's way out."""
        if type(data) is not bytes and not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"body chunks must be bytes, not {type(data).__name__}")
        if not self._head_sent:
            self._send_body(data, self._make_head(-1))
        elif data:
            self._send_body(data, b"")

    def _send_body(self, data: bytes, head: bytes) -> None:
        """Send a body chunk framed as the head said, after ``head`` (if any)."""
        framing = self._framing
        size = len(data)
        if framing == NO_BODY or not size:
            if head:
                self._send(head)
            return
        if framing == LENGTH:
            remaining = self._remaining
            if size > remaining:
                self._send_parts(head, data[:remaining], b"")
                self._remaining = 0
                self._response_bytes += remaining
                raise _AppError(f"the body is longer than its Content-Length ({self._status})")
            self._remaining = remaining - size
            self._send_parts(head, data, b"")
        elif framing == CHUNKED:
            self._send_parts(head + b"%x\r\n" % size, data, b"\r\n")
        else:  # UNTIL_CLOSE
            self._send_parts(head, data, b"")
        self._response_bytes += size

    def _send_parts(self, before: bytes, data: bytes, after: bytes) -> None:
        if len(data) <= _JOIN_LIMIT:
            self._send(b"".join((before, data, after)) if before or after else data)
            return
        if before:
            self._send(before)
        self._send(data)
        if after:
            self._send(after)

    def _end_body(self) -> None:
        if not self._head_sent:
            self._send(self._make_head(0))
        if self._framing == CHUNKED:
            self._send(_LAST_CHUNK)
        elif self._framing == LENGTH and self._remaining:
            raise _AppError(
                f"the body is {self._remaining} bytes short of its Content-Length ({self._status})"
            )

    def _send_list(self, result: list[bytes]) -> None:
        """A list body: all of it is there, so it goes out with its head in one send when
        it is small and matches its length."""
        total = 0
        for chunk in result:
            if type(chunk) is not bytes:
                break  # the general path below will say what is wrong with it
            total += len(chunk)
        else:
            head = self._make_head(total)
            framing = self._framing
            if framing == NO_BODY:
                self._send(head)
                return
            if framing == LENGTH and self._remaining == total and total <= _JOIN_LIMIT:
                self._send(b"".join([head, *result]) if total else head)
                self._remaining = 0
                self._response_bytes = total
                return
            first = True
            for chunk in result:
                if first:
                    self._send_body(chunk, head)
                    first = False
                elif chunk:
                    self._send_body(chunk, b"")
            if first:
                self._send(head)
            self._end_body()
            return
        for chunk in result:
            if chunk:
                self._write(chunk)
        self._end_body()

    def _next_cycle(self, wsgi_input: InputStream) -> bool:
        """After a complete response on a kept connection: read what is left of the
        request body, then start a new h11.Connection with the bytes received beyond it.
        False if the connection must end after all."""
        if self._has_body and not wsgi_input.drained():
            try:
                while wsgi_input.read(_RECV_SIZE):
                    pass
            except ClientError:
                return False
        data, closed = self._conn.trailing_data
        if closed and not data:
            return False
        self._fed = len(data)
        self._last_read = -1  # what h11 holds is not in self._buf
        self._pending = bool(data) or closed
        if self._park_after and not self._pending:
            # To be parked: the handler that resumes it makes its own Connection. This
            # one (about 1 us) only if parking fails (handle()).
            self._conn_spent = True
            return True
        conn = self._conn = self._new_connection()
        if data:
            conn.receive_data(data)
        if closed:
            conn.receive_data(b"")
        return True

    def _new_connection(self) -> h11.Connection:
        return _Connection(_SERVER, max_incomplete_event_size=self._settings.max_header_bytes)

    # -- the request body ---------------------------------------------------------------

    def _pull_body(self) -> bytes:
        """The next piece of the request body for ``wsgi.input``; ``b""`` at its end."""
        if self._expect_100 and not self._sent_100:
            self._sent_100 = True
            if not self._head_sent:
                self._send(_CONTINUE)
        conn = self._conn
        timeout = self._settings.read_timeout
        while True:
            try:
                event = conn.next_event()
            except _RemoteProtocolError as e:
                if self._eof:
                    raise ClientDisconnected("the client closed in the body") from None
                raise BadRequest(f"malformed request body: {e}") from None
            if event is _NEED_DATA:
                if not self._receive(time.monotonic() + timeout):
                    raise RequestTimeout(f"no body bytes for {timeout:g}s")
                continue
            kind = type(event)
            if kind is _Data:
                data: bytes = event.data  # type: ignore[union-attr]
                self._body_seen += len(data)
                if self._body_limit and self._body_seen > self._body_limit:
                    self._keep_alive = False
                    raise PayloadTooLarge(f"body over {self._body_limit} bytes")
                return data
            if kind is _EndOfMessage:
                return b""
            raise ClientDisconnected("the client closed in the body")

    # -- errors -------------------------------------------------------------------------

    def _client_error(self, e: ClientError) -> bool:
        if isinstance(e, ClientDisconnected):
            self._log.debug("client %s went away: %s", self._peer(), e)
        elif not self._head_sent:
            self._reject(e.status, str(e))
        else:
            self._log.info("client %s: %s (after the response began)", self._peer(), e)
        return False

    def _app_failed(self) -> None:
        """Log the exception being handled, with its traceback; answer 500 if nothing was
        sent yet (else the connection is cut, which tells the client something broke)."""
        self._log.error("application error serving %s", self._peer(), exc_info=True)
        if not self._head_sent:
            self._status_code = "500"
            self._response_bytes = 0
            self._head_sent = True
            self._send(error_response(500, self._server_name, time.time()))

    def _reject(self, status: int, why: str) -> None:
        """Answer a client error with ``status`` and ``Connection: close``, log it at info
        level (and in the access log when outside a request), and linger."""
        self._log.info("%d for %s: %s", status, self._peer(), why)
        self._status_code = str(status)
        self._response_bytes = 0
        self._head_sent = True
        if self._access is not None and not self._in_request:
            self._log_access(None, time.monotonic())
        try:
            self._send(error_response(status, self._server_name, time.time()))
        except _PeerGone:
            return
        self._linger()

    def _linger(self) -> None:
        """Half-close and read what the client still sends for a moment, so that our
        error response is not destroyed by a reset (closing with unread data sends RST)."""
        sock = self.request
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        deadline = time.monotonic() + _LINGER_SECONDS
        discarded = 0
        while discarded < _LINGER_BYTES:
            try:
                n = sock.recv_into(self._buf, _RECV_SIZE, _MSG_DONTWAIT)
            except BlockingIOError:
                if not self._wait(self._poller(_POLLIN), deadline, stop_when_asked=False):
                    return
                continue
            except OSError:
                return
            if not n:
                return
            discarded += n

    # -- helpers ------------------------------------------------------------------------

    def _must_yield(self, worker: Any) -> bool:
        """Whether this connection should give its worker up after the response: other
        connections of this worker are parked (they are served in turn), or a client
        waits to be accepted and no other worker is idle to take it (or, if one looks
        idle, it has not taken the client within ``_IDLE_TRUST``: stopped, say)."""
        if self._others_parked():
            # Unless nothing else was ready when the loop last woke and the loop can be
            # watched while waiting here (see _wait_for_request), and no other worker has
            # idled for a while (then this connection moves: see _should_move).
            contended: bool = self.server.ready_at_wakeup > 1  # type: ignore[attr-defined]
            return (
                contended
                or self._state["loop_fd"] < 0
                or self._idle_elsewhere(worker, _IDLE_FOR_A_MOVE)
            )
        state = self._state
        if not self._others_waiting():
            state["queued_since"] = 0.0
            return False
        if not self._idle_elsewhere(worker):
            return True
        now = time.monotonic()
        since: float = state["queued_since"] or now
        state["queued_since"] = since
        return now - since >= _IDLE_TRUST

    def _should_move(self, worker: Any) -> bool:
        """Whether a connection giving its worker up should end rather than be parked, so
        that its client's next connection goes to another worker: only when this worker
        is shared (clients wait for it: several descriptors were ready at its last
        wake-up; or it holds other connections parked) while another worker has been
        idle for a while. Two clients that took turns on one worker while the other
        idled stayed that way before: each found the other's request alone at the
        loop's wake-up."""
        contended = self.server.ready_at_wakeup > 1  # type: ignore[attr-defined]
        shared = contended or self._others_parked()
        return shared and self._idle_elsewhere(worker, _IDLE_FOR_A_MOVE)

    def _others_parked(self) -> bool:
        """Whether this worker holds parked connections (other than this one)."""
        return self._state["can_park"] is not None and bool(self.server.parked_connections)  # type: ignore[attr-defined]

    def _idle_elsewhere(self, worker: Any, for_at_least: float = 0.0) -> bool:
        """Whether another worker idles (``Worker.idle_elsewhere``); a "no" is trusted for
        a millisecond, as in :meth:`_others_waiting`."""
        key = "busy_until" if not for_at_least else "busy_long_until"
        state = self._state
        now = time.monotonic()
        if now < state[key]:
            return False
        if worker.idle_elsewhere(for_at_least):
            return True
        state[key] = now + _WAITING_RECHECK
        return False

    def _others_waiting(self) -> bool:
        """True if a client waits in the accept queue (prefork servers only).

        Asked before each keep-alive response; after a "no", the next millisecond's
        responses take it as still "no" without asking the kernel again (a poll() each):
        a client that starts waiting then gets its turn at most a millisecond later."""
        clients_waiting = self._clients_waiting
        if clients_waiting is None:
            return False
        now = time.monotonic()
        state = self._state
        if now < state["quiet_until"]:
            return False
        if clients_waiting():
            return True
        state["quiet_until"] = now + _WAITING_RECHECK
        return False

    def _peer(self) -> str:
        address = self.client_address
        if isinstance(address, tuple) and len(address) >= 2:
            return f"{address[0]}:{address[1]}"
        return "a local client"

    def _log_access(self, request: h11.Request | None, started: float) -> None:
        if request is None:
            line = "-"
        else:
            target = request.target
            if b'"' in target or b"\\" in target:
                target = target.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
            line = (
                f"{request.method.decode('latin-1')} {target.decode('latin-1')} "
                f"HTTP/{request.http_version.decode('latin-1')}"
            )
        size = str(self._response_bytes) if self._response_bytes else "-"
        host = self._env.get("REMOTE_ADDR") or "-"
        duration = time.monotonic() - started
        assert self._access is not None
        self._access.info(
            f'{host} - - [{log_time(time.time())}] "{line}" {self._status_code} {size} '
            f"{duration:.6f}"
        )


def _ms(seconds: float) -> int:
    """A poll() timeout in whole milliseconds, rounded up so that we never spin."""
    if seconds <= 0:
        return 0
    return int(seconds * 1000) + 1


def make_handler(
    app: WSGIApp, settings: HTTPSettings | None = None, name: str = "WSGIHandler"
) -> type[HTTPHandler]:
    """A :class:`HTTPHandler` subclass serving ``app`` with ``settings`` (the defaults if
    None). Raises ``TypeError`` if ``app`` is not callable."""
    if not callable(app):
        raise TypeError(f"the WSGI application must be callable, not {app!r}")
    attrs = {
        "app": staticmethod(app),
        "settings": settings or HTTPSettings(),
        "__module__": __name__,
    }
    return type(name, (HTTPHandler,), attrs)
