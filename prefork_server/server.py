"""The ``socketserver`` face of the engine: PreforkTCPServer and friends.

::

    with PreforkTCPServer(("127.0.0.1", 9000), Handler, workers=4, timeout=30) as server:
        server.serve_forever()

The constructor binds and listens in the calling process, exactly as
``socketserver.TCPServer`` does. ``serve_forever()`` then becomes the master: it forks the
workers, which inherit the listening socket, and supervises them until ``shutdown()`` or a
signal stops it. Each worker waits in ``select()`` on the listening socket plus its wakeup
descriptors, accepts without blocking while connections are queued, and runs the handler
per connection, stamping its heartbeat before and after each one.

Any ``socketserver.BaseRequestHandler`` subclass works unchanged, and so do the mix-ins
that override ``process_request`` (``ThreadingMixIn`` runs handler threads inside each
worker).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import errno
import logging
import os
import queue
import select
import selectors
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

from .engine import RELOADABLE, Options, Preforker, default_logger
from .hooks import Hooks
from .sockets import clear_stale_unix_socket, take_inherited_socket
from .worker import Worker

__all__ = [
    "ACCEPT_BACKOFF",
    "PreforkMixIn",
    "PreforkTCPServer",
    "PreforkThreadingMixIn",
    "PreforkThreadingTCPServer",
    "PreforkUnixStreamServer",
    "accept_error_is_transient",
]

# A peer that goes away is routine for a server, not an error worth a traceback.
_PEER_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)
#: After an accept() failure that retrying at once cannot cure (out of descriptors or
#: memory), the worker stops watching the listener for this long instead of spinning.
ACCEPT_BACKOFF = 0.5
# Errors that Linux's accept() reports for the connection being accepted (see accept(2)).
_ACCEPT_NETWORK_ERRORS = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNABORTED",
        "ENETDOWN",
        "EPROTO",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
    )  # fmt: skip
    if hasattr(errno, name)
)


_NEVER = float("inf")


def _parking_limit(wanted: int) -> int:
    """``max_parked``, but at most half the descriptors this process may open."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return wanted
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(0, min(wanted, soft // 2))


def accept_error_is_transient(error: OSError) -> bool:
    """True if an ``accept()`` failure concerned only the connection being accepted
    (the client gave up while queued, or a network error Linux reports through
    ``accept()``): take the next one. False otherwise (out of descriptors or memory, or
    worse): the connection stays queued and the listener readable, so a worker that
    waits on it again at once spins; it should stop watching it for
    :data:`ACCEPT_BACKOFF` seconds. For loops of one's own (an event loop's accept)."""
    return error.errno in _ACCEPT_NETWORK_ERRORS


class PreforkMixIn(socketserver.BaseServer):
    """Turns a ``socketserver`` server class into a pre-forking one.

    Methods for the caller: ``serve_forever()``, ``start()``, ``shutdown()``,
    ``server_close()``, the context manager; ``worker`` (in a worker process: its
    :class:`~prefork_server.worker.Worker`, else None). For handlers, in a worker:
    ``clients_waiting()``; ``park()``, ``can_park()``, ``parked_connections``,
    ``ready_at_wakeup`` and ``loop_fileno()`` (idle keep-alive connections kept open in
    the worker's loop, see :meth:`park`).

    Methods that may be overridden, with their ``socketserver`` meaning: ``server_bind``,
    ``server_activate``, ``get_request``, ``verify_request``, ``process_request``,
    ``finish_request``, ``shutdown_request``, ``close_request``, ``handle_error``,
    ``service_actions`` (called in each worker after every wake-up), ``server_close``
    (by the caller, and in each worker as it leaves: ``ThreadingMixIn`` joins its threads).
    Where neither the server's classes (any class in its MRO, mix-ins after
    ``PreforkMixIn`` included) nor the instance override ``verify_request``,
    ``process_request``, ``finish_request``, ``shutdown_request`` or ``close_request``, a
    worker does what they do without calling them (about 1 us per connection); with one
    override of any of them, as found when the worker starts, all five are called as
    ``socketserver`` calls them. For handlers, :attr:`handler_may_close`.

    Hooks, methods that may be overridden (each default calls the callable of the same
    name in ``hooks``, a :class:`~prefork_server.hooks.Hooks`, if set there), and where
    they run: ``before_fork(number)`` (master), ``after_fork(worker)`` (worker, right
    after fork), ``worker_init(worker)`` (worker, after ``after_fork``, before accepting),
    ``worker_exit(worker)`` (worker, after its last connection),
    ``on_worker_timeout(number, pid)`` (master, before a silent worker is killed),
    ``on_reload()`` (master, on HUP; may return new settings). An exception in a master
    hook is logged and harmless; in ``after_fork`` or ``worker_init`` it is a boot failure.

    Settings are class attributes a subclass may override, or constructor keywords:
    ``workers`` (10), ``timeout`` (5 s: a worker silent for longer is killed; note that
    ``socketserver`` used this name for the ``handle_request()`` wait, which it still is),
    ``graceful_timeout``, ``app_name``, ``pid_path``, ``stdout_path``, ``stderr_path``,
    ``logger``, ``max_boot_failures``, ``max_requests``, ``max_requests_jitter``,
    ``graceful_term``, ``user``, ``group``, ``min_spare_workers``, ``max_spare_workers``,
    ``max_workers``, ``hooks``; their meaning is :class:`~prefork_server.Preforker`'s.

    Listening sockets survive restarts: the constructor adopts, instead of binding anew, a
    socket of the same address handed over by a previous master (USR2) or by systemd
    (``LISTEN_FDS``); ``serve_forever()`` hands its own to the next master on USR2.
    """

    workers: int = 10
    timeout: float = 5.0
    graceful_timeout: float | None = None
    app_name: str = "prefork_server"
    pid_path: str | None = None
    stdout_path: str | None = None
    stderr_path: str | None = None
    logger: logging.Logger | None = None
    max_boot_failures: int = 5
    max_requests: int = 0
    max_requests_jitter: int = 0
    graceful_term: bool = False
    user: str | int | None = None
    group: str | int | None = None
    min_spare_workers: int = 0
    max_spare_workers: int | None = None
    max_workers: int | None = None
    hooks: Hooks = Hooks()
    #: Wake one idle worker per new connection where the OS can (Linux: EPOLLEXCLUSIVE),
    #: instead of every idle worker, all but one of which then find nothing to accept.
    exclusive_accept: bool = True

    socket: socket.socket  # set by the socketserver class we are mixed with

    _SETTINGS = (
        "workers", "timeout", "graceful_timeout", "app_name", "pid_path",
        "stdout_path", "stderr_path", "logger", "max_boot_failures", "max_requests",
        "max_requests_jitter", "graceful_term", "user", "group", "min_spare_workers",
        "max_spare_workers", "max_workers", "hooks",
    )  # fmt: skip
    _HOOKS = ("before_fork", "after_fork", "worker_exit", "on_worker_timeout", "on_reload")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        settings = {k: kwargs.pop(k) for k in self._SETTINGS if k in kwargs}
        for name in self._SETTINGS:
            settings.setdefault(name, getattr(self, name))
        self._options = Options(**settings)  # raises ValueError before we bind anything
        parked = self.max_parked
        if not isinstance(parked, int) or isinstance(parked, bool) or parked < 0:
            raise ValueError(f"max_parked must be an integer >= 0, not {parked!r}")
        for name, value in settings.items():
            setattr(self, name, value)
        self._log = self.logger or default_logger(self.app_name)
        self.worker: Worker | None = None
        self._engine: Preforker | None = None
        self._serving_pid: int | None = None
        self._serving_thread: threading.Thread | None = None
        self._shut_down = threading.Event()
        self._engine_lock = threading.Lock()
        self._early_stop = False
        self._adopted = False
        self._handed_over = False
        super().__init__(*args, **kwargs)

    # -- running ------------------------------------------------------------------------

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Become the master and serve until ``shutdown()`` or a stop signal.

        ``poll_interval`` is accepted for compatibility and not used: nothing here polls.
        """
        engine = self._make_engine()
        self._shut_down.clear()
        self._serving_pid = os.getpid()
        self._serving_thread = threading.current_thread()
        try:
            with self._engine_lock:
                self._engine = engine
                if self._early_stop:
                    engine.stop()
            engine.run()
        finally:
            self._handed_over = engine.handed_over
            with self._engine_lock:
                self._engine = None
                self._early_stop = False
                self._serving_thread = None
            self._shut_down.set()

    def start(self) -> int:
        """Serve as a daemon (double fork, pid file); return the master's pid.

        The calling process keeps its copy of the listening socket; close it with
        ``server_close()`` if it has no more use for it.
        """
        return self._make_engine().start()

    def shutdown(self) -> None:
        """Stop serving gracefully and wait until ``serve_forever()`` has returned.

        Never deadlocks: called from the thread that runs ``serve_forever()``, or from a
        handler inside a worker process, it asks for the stop and returns at once. Called
        before ``serve_forever()``, it makes that return as soon as it starts.
        """
        if self.worker is not None:  # inside a worker: ask our master
            self.worker.ask_master_to_stop()
            return
        with self._engine_lock:
            engine = self._engine
            if engine is None:
                self._early_stop = True
                return
            engine.stop()
            own_thread = self._serving_thread is threading.current_thread()
        if not own_thread:
            self._shut_down.wait()

    # -- binding: adopt an inherited socket rather than bind a new one -----------------

    def server_bind(self) -> None:
        """Bind ``server_address``, or adopt the listening socket a previous master (USR2)
        or systemd handed over for that address; either way ``server_address`` is then the
        address actually bound."""
        self._adopt_inherited()
        super().server_bind()  # type: ignore[misc]

    def _adopt_inherited(self) -> bool:
        if self._adopted:
            return True
        inherited = take_inherited_socket(self.socket.family, self.socket.type, self.server_address)
        if inherited is None:
            return False
        self.socket.close()
        self.socket = _BoundSocket(
            inherited.family, inherited.type, inherited.proto, fileno=inherited.detach()
        )
        self.socket.setblocking(True)  # as a new socket is; _make_engine decides
        self._adopted = True
        return True

    # -- hooks --------------------------------------------------------------------------

    def before_fork(self, number: int) -> None:
        """In the master, before forking worker ``number``."""
        if self.hooks.before_fork is not None:
            self.hooks.before_fork(number)

    def after_fork(self, worker: Worker) -> None:
        """In a new worker, right after fork (and after a privilege drop)."""
        if self.hooks.after_fork is not None:
            self.hooks.after_fork(worker)

    def worker_init(self, worker: Worker) -> None:
        """Called once in each worker before it accepts; override to set up per-process
        state (connections, caches). An exception here counts as a boot failure."""

    def worker_exit(self, worker: Worker) -> None:
        """In a worker that leaves after its last connection (not after a kill)."""
        if self.hooks.worker_exit is not None:
            self.hooks.worker_exit(worker)

    def on_worker_timeout(self, number: int, pid: int) -> None:
        """In the master, before the silent worker ``pid`` gets SIGKILL."""
        if self.hooks.on_worker_timeout is not None:
            self.hooks.on_worker_timeout(number, pid)

    def on_reload(self) -> Mapping[str, Any] | None:
        """In the master on HUP, before the new generation is forked. May return new
        settings (``workers``, ``timeout``, ``graceful_timeout``, ``max_requests``,
        ``max_requests_jitter``, ``hooks``); raising abandons the reload. New ``hooks``
        become this server's, so the new workers run them."""
        if self.hooks.on_reload is None:
            return None
        changes = dict(self.hooks.on_reload() or {})
        fixed = set(changes) - RELOADABLE
        if fixed:
            raise ValueError(f"{', '.join(sorted(fixed))} cannot change on reload")
        # Options() raises a ValueError naming a bad value: the reload is then abandoned
        # before anything changed.
        self._options = dataclasses.replace(self._options, **changes)
        hooks = changes.pop("hooks", None)
        if hooks is not None:
            self.hooks = hooks  # ours now: the master keeps calling our methods
        for name, value in changes.items():
            setattr(self, name, value)
        return changes

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log the exception being handled, with its traceback; a peer that went away is
        logged at debug level only. Called in the worker; the connection is then closed."""
        exc = sys.exc_info()[1]
        if isinstance(exc, _PEER_GONE):
            self._log.debug("client %s went away: %s", _addr(client_address), exc)
        else:
            self._log.error(
                "error handling a request from %s", _addr(client_address), exc_info=True
            )

    def service_actions(self) -> None:
        """Called in each worker after every wake-up (at least every ``timeout / 2``)."""

    # -- the worker ---------------------------------------------------------------------

    def _make_engine(self) -> Preforker:
        # Non-blocking once, in the master: the flag lives on the open file that every
        # worker shares, and a worker that loses the accept race must get EAGAIN.
        self.socket.setblocking(False)
        opts = self._options
        skip = {"logger", "hooks", "listeners"}
        return Preforker(
            self._serve_in_worker,
            **{name: getattr(opts, name) for name in self._SETTINGS if name not in skip},
            logger=self._log,
            listeners=(self.socket,),
            # Bound methods, so that overriding a hook in a subclass is enough.
            **{name: getattr(self, name) for name in self._HOOKS},
        )

    def _serve_in_worker(self, worker: Worker) -> None:
        self.worker = worker
        self._loop_r, self._loop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.worker_init(worker)
        self.serve_in_worker(worker)
        # As a socketserver does when it is done: ThreadingMixIn waits here for its handler
        # threads, which a graceful stop must not cut short (os._exit follows).
        self.server_close()

    def serve_in_worker(self, worker: Worker) -> None:
        """The worker's main loop; return to end the worker.

        Waits on the listening socket, the worker's wake-up descriptors and its parked
        connections (see :meth:`park`); accepts without blocking while connections are
        queued, and runs each connection through ``process_request``. It may be
        overridden to run another I/O model on ``self.socket`` (an asyncio server, say);
        the override must call ``worker.heartbeat()`` at least every
        ``worker.poll_interval`` seconds and return once it is False (:meth:`park` then
        declines).
        """
        listener = self.socket.fileno()
        self._plain_hooks = _overrides_none(self, _CONNECTION_HOOKS)
        self._handler_may_close = _overrides_none(self, _CONNECTION_HOOKS[1:])
        self._accept_paused_until = 0.0
        parked = self._parked = {}
        self._loop_thread = threading.get_ident()
        loop_pid = os.getpid()
        # A process forked by a handler (ForkingMixIn, an application) has our thread
        # ident, but no loop watches its sockets, and our scoreboard slot is not its own.
        os.register_at_fork(after_in_child=self._no_parking_here)
        self._parked_limit = _parking_limit(self.max_parked)
        self._parked_expiry = _NEVER
        self._turn = 0
        try:
            with _Poller(
                listener, (*worker.wakeup_fds, self._loop_r), self.exclusive_accept
            ) as poll:
                self._poll = poll
                while self._keep_serving(worker):
                    wait = worker.poll_interval
                    paused = 0.0
                    title_due = worker.title_due
                    # No clock read unless accept() failed, the title waits for a refresh
                    # or connections are parked.
                    if self._accept_paused_until or title_due or parked:
                        now = time.monotonic()
                        if title_due:
                            wait = min(wait, max(title_due - now, 0.0))
                        if self._accept_paused_until:
                            paused = self._accept_paused_until - now
                            if paused > 0:
                                wait = min(wait, paused)
                            else:
                                self._accept_paused_until = 0.0
                        if parked:
                            wait = min(wait, max(self._parked_expiry - now, 0.0))
                    poll.watch_listener(paused <= 0 and self.ready_to_accept())
                    self._turn += 1
                    ready = poll.wait(wait)
                    self._ready_count = len(ready)
                    for fd in ready:
                        if fd == listener:
                            if worker.alive:  # not once stopping (max_requests reached)
                                self._accept_until_empty(worker)
                        elif fd in parked:
                            # Stopping, the requests already there are still answered.
                            self._resume(worker, fd)
                        elif fd == self._loop_r:
                            _drain(fd)
                        elif fd in worker.wakeup_fds:
                            worker.drain_wakeup(fd)
                    # After the events: a connection whose request came meanwhile was
                    # served above rather than closed unread.
                    if parked:
                        now = time.monotonic()
                        if now >= self._parked_expiry:
                            self._expire_parked(now)
                    self.service_actions()
                # Leaving: the requests that came already are answered (the worker says
                # Connection: close now), as a request in progress would be.
                self._turn += 1
                for fd in poll.wait(0) if parked else ():
                    if fd in parked:
                        self._resume(worker, fd)
        finally:
            # Idle between two requests, they may be closed (the client retries, RFC 9112
            # 9.6); nobody else will. Not in a child forked by a handler that returned
            # here (sys.exit): these are its parent's.
            self._parked = None
            if os.getpid() == loop_pid:
                for sock, _, _, _ in parked.values():
                    self._close_parked(sock)
                worker.set_connections(0)

    # -- parked connections -------------------------------------------------------------

    #: The most connections a worker keeps parked (see :meth:`park`); also at most half
    #: the worker's descriptor limit (``RLIMIT_NOFILE``), so that accepting never lacks one.
    #: A class attribute (set it in a subclass), not a constructor keyword.
    max_parked: int = 1000
    _parked: dict[int, tuple[Any, Any, float, int]] | None = None
    _just_parked: Any = None
    _plain_hooks = False  # set per worker: see _overrides_none()
    _handler_may_close = False
    _ready_count = 1  # descriptors ready at the loop's last wake-up

    def park(self, request: Any, client_address: Any, timeout: float) -> bool:
        """Keep the idle connection ``request`` open without a handler, so that the worker
        can serve other clients; True if it was parked.

        For a handler that serves several requests per connection (HTTP keep-alive): it
        calls this between two requests, when nothing of the next one has been read yet,
        and then returns from ``handle()`` at once, touching the socket no more. The
        connection is not closed: ``shutdown_request()`` leaves it alone. The worker's
        loop watches it; when it becomes readable (a request, the client's EOF or a
        reset), the loop runs it through ``process_request(request, client_address)``
        again: a new handler instance, as for a new connection, but ``verify_request()``
        is not asked again. A parked connection still idle after ``timeout`` seconds, or
        when the worker leaves, is closed with ``shutdown_request()``.

        False, and nothing happened, where parking is not possible: outside a worker's
        own loop (plain ``socketserver``, a handler thread, an overridden
        ``serve_in_worker``), once the worker is stopping, or with ``max_parked``
        connections parked already. The handler then carries on or closes.

        A worker with parked connections serves them and new clients in turn: a
        handler should park after each request while :attr:`parked_connections` is not
        zero, or the others wait until its client goes idle.

        Only park a connection none of whose next bytes have been read: a buffered
        ``rfile`` (``StreamRequestHandler`` with ``rbufsize`` not 0) or a TLS socket may
        hold bytes read ahead, which the next handler would never see. An exception
        raised by the handler after parking unparks the connection, and it is closed as
        usual. An override of ``shutdown_request`` must call this one, or close nothing
        that is parked. Each turn of a parked connection counts as a unit of work (for
        ``max_requests`` and the served count), as a connection does.
        """
        if not self.can_park():
            return False
        parked = self._parked
        worker = self.worker
        assert parked is not None and worker is not None
        fd = request.fileno()
        if fd < 0 or not self._poll.watch_parked(fd):
            return False
        if not parked:
            # To the back of the line on the listener (the loop registers it again), as
            # in _accept_until_empty: a worker that still idles should take the next one.
            self._poll.watch_listener(False)
        deadline = time.monotonic() + timeout
        parked[fd] = (request, client_address, deadline, self._turn)
        if deadline < self._parked_expiry:
            self._parked_expiry = deadline
        self._just_parked = request
        worker.set_connections(len(parked))
        return True

    def can_park(self) -> bool:
        """Whether :meth:`park` would park a connection now."""
        parked = self._parked
        worker = self.worker
        return (
            parked is not None
            and worker is not None
            and worker.alive
            and len(parked) < self._parked_limit
            # The loop's own thread only: handler threads keep their connections.
            and threading.get_ident() == self._loop_thread
        )

    def _no_parking_here(self) -> None:
        self._parked = None
        self._just_parked = None

    @property
    def ready_at_wakeup(self) -> int:
        """How many descriptors were ready when the worker's loop last woke up (parked
        connections with a request, the listener): more than one means that other
        clients wait for this worker while it serves one."""
        return self._ready_count

    @property
    def parked_connections(self) -> int:
        """How many connections this worker holds parked now (0 outside a worker)."""
        return len(self._parked or ())

    @property
    def handler_may_close(self) -> bool:
        """Whether a handler may close ``self.request`` itself: in a worker whose server
        overrides none of the hooks that get the connection after the handler
        (``process_request``, ``finish_request``, ``shutdown_request``,
        ``close_request``; mix-ins such as ``ThreadingMixIn`` do), which would be handed
        a closed socket. Worth it only when nothing else holds the descriptor
        (no ``makefile()`` object left open, no process forked since it was accepted):
        ``close()`` then ends the connection, and :meth:`shutdown_request` saves its
        ``shutdown()`` call. False outside a worker."""
        return self._handler_may_close

    def shutdown_request(self, request: Any) -> None:
        """As ``socketserver``'s (shut the connection down and close it), except for the
        connection just parked (see :meth:`park`), which stays open, and for one the
        handler has closed itself (see :attr:`handler_may_close`), which only goes
        through ``close_request()``."""
        if request is self._just_parked:
            self._just_parked = None
            return
        fileno = getattr(request, "fileno", None)
        if fileno is not None and fileno() < 0:
            self.close_request(request)
            return
        super().shutdown_request(request)

    def _resume(self, worker: Worker, fd: int) -> None:
        parked = self._parked
        assert parked is not None
        request, client_address, _, turn = parked[fd]
        if turn == self._turn:
            # Parked during this very wake-up, under a descriptor number whose old
            # connection the event was for: not known to be readable.
            return
        del parked[fd]
        self._poll.resumed(fd)
        if request is self._just_parked:
            self._just_parked = None
        if request.fileno() < 0:
            worker.set_connections(len(parked))
            return  # closed behind our back (an override that closes it itself)
        worker.set_connections(len(parked) + 1)  # it still counts while served
        worker.busy()
        try:
            self._process(request, client_address)
        finally:
            worker.set_connections(len(parked))
            worker.idle()

    def _expire_parked(self, now: float) -> None:
        parked = self._parked
        assert parked is not None
        expired = [fd for fd, entry in parked.items() if entry[2] <= now]
        if expired:
            # One whose request came since the loop's wait is served, not closed unread.
            check = select.poll()
            for fd in expired:
                check.register(fd, select.POLLIN)
            readable = {fd for fd, _ in check.poll(0)}
            for fd in expired:
                if fd not in readable:
                    self._close_parked(self._unwatch(fd))
        # The spared ones are watched as before; their deadline is looked at again once
        # the loop has served them, or a moment later.
        self._parked_expiry = min(
            (max(entry[2], now + 0.01) for entry in parked.values()), default=_NEVER
        )
        if self.worker is not None:
            self.worker.set_connections(len(parked))

    def _close_parked(self, request: Any) -> None:
        if request is self._just_parked:
            self._just_parked = None
        try:
            self.shutdown_request(request)
        except Exception:  # noqa: BLE001 - one connection's close must not end the loop
            self._log.exception("error closing an idle connection")

    def ready_to_accept(self) -> bool:
        """Whether the worker takes new connections now (True; a thread pool that is
        full says False). Call :meth:`wake_worker_loop` when the answer turns True."""
        return True

    def worker_is_healthy(self) -> bool:
        """Whether the worker's main loop may stamp the heartbeat (True). When False, the
        master kills the worker after ``timeout`` unless something else stamps it."""
        return True

    def clients_waiting(self) -> bool:
        """True if connections wait in the listening socket's queue (one ``poll`` call).

        A handler that keeps a connection open between requests (HTTP keep-alive) may
        check this when the connection goes idle and close it, so that its worker serves
        a client that waits rather than one that might send again: with more clients than
        workers, every client gets served. Safe to call from any thread of a worker."""
        # One poll object per thread: handler threads may ask at the same moment, and a
        # poll object raises "concurrent poll() invocation" when shared.
        local = self.__dict__.get("_waiting_local")
        if local is None:
            local = self.__dict__.setdefault("_waiting_local", threading.local())
        poller = getattr(local, "poll", None)
        if poller is None:
            poller = local.poll = select.poll()
            poller.register(self.socket, select.POLLIN)
        return bool(poller.poll(0))

    def loop_fileno(self) -> int:
        """A descriptor that is readable while the worker's loop has something to do: a
        parked connection with a request, a client in the accept queue (when the loop
        watches the listener: poll ``socket`` too), a signal. -1 outside a worker's own
        loop, or where the loop's selector has no descriptor. A handler that holds an
        idle connection while others are parked may wait on it and on its client, and
        park only when the loop has work: an active client among idle parked ones then
        keeps its worker, as it would alone."""
        poll = self.__dict__.get("_poll")
        return -1 if poll is None or self._parked is None else poll.fileno()

    def wake_worker_loop(self) -> None:
        """Make the worker's main loop look at :meth:`ready_to_accept` again; safe from
        any thread of a worker."""
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._loop_w, b"x")

    def _keep_serving(self, worker: Worker) -> bool:
        # heartbeat(), not wants_me_alive(): a wake-up is not a unit of work; each
        # connection is counted by the busy()/idle() brackets around it.
        if self.worker_is_healthy():
            return worker.heartbeat()
        # No beat, but the title the loop woke for is shown (or the loop would spin).
        worker.refresh_title()
        return worker.alive

    def _accept_until_empty(self, worker: Worker) -> None:
        if self._parked:
            # Parked connections and new ones take turns: per wake-up, as many new ones
            # as there were descriptors ready (each new one is served a request at once,
            # as each ready parked one is). And then to the back of the line of workers
            # waiting on the listener (the loop registers it again): Linux wakes the
            # first waiter (EPOLLEXCLUSIVE), and a worker with parked connections waits
            # there all the time, so it would take every new connection while another
            # worker idles.
            for _ in range(self._ready_count):
                if not (worker.alive and self.ready_to_accept() and self._accept_next(worker)):
                    break
            self._poll.watch_listener(False)
            return
        queued = False  # the queue held more than the connection the loop woke for
        while self.ready_to_accept() and self._accept_next(worker):
            if self._parked:  # that one was parked: now they all take turns, as above
                self._poll.watch_listener(False)
                return
            # idle() has just stamped the beat and made a beat's checks: no heartbeat()
            # between two connections (about 1.5 us each).
            if not worker.alive:
                return
            # Under light load a wake-up brings one connection, and an accept() that
            # finds the queue empty costs an exception: so ask first (a zero-timeout
            # poll). Once the queue has held more than one, accept again without asking
            # until the queue runs dry: the poll costs as much as an accept, and under
            # load the queue stays full for many connections (one failing accept a burst).
            if not queued:
                if not self.clients_waiting():
                    return
                queued = True

    def _accept_next(self, worker: Worker) -> bool:
        """Accept one connection and run it; False if there was none to take."""
        while True:
            try:
                request, client_address = self.get_request()
            except (BlockingIOError, InterruptedError):
                return False  # another worker won the race, or the queue is empty
            except OSError as e:
                if accept_error_is_transient(e):
                    continue
                # Another worker may take the queued connection meanwhile.
                self._accept_paused_until = time.monotonic() + ACCEPT_BACKOFF
                self._log.warning("worker[%d] cannot accept: %s; pausing %.1fs",
                                  worker.number, e, ACCEPT_BACKOFF)  # fmt: skip
                return False
            self._run_connection(worker, request, client_address)
            return True

    def _run_connection(self, worker: Worker, request: Any, client_address: Any) -> None:
        # With connections parked, this one counts too (two slot writes a connection
        # that a worker which never parks does not pay; its state says busy anyway).
        parked = self._parked
        counted = bool(parked)
        if counted:
            worker.set_connections(len(parked) + 1)  # type: ignore[arg-type]
        worker.busy()
        try:
            self._handle_one(request, client_address)
        finally:
            if counted:
                worker.set_connections(len(parked))  # type: ignore[arg-type]
            worker.idle()

    def _handle_one(self, request: Any, client_address: Any) -> bool:
        # As socketserver.BaseServer._handle_request_noblock, minus the accept. False if
        # verify_request() refused the connection: process_request() never saw it.
        if not self._plain_hooks and not self.verify_request(request, client_address):
            self._end_request(request, client_address)
            return False
        self._process(request, client_address)
        return True

    def _process(self, request: Any, client_address: Any) -> None:
        try:
            if self._plain_hooks:
                # What process_request(), finish_request(), shutdown_request() and
                # close_request() do when none is overridden, without their calls
                # (calling shutdown_request() here measured 1.5-2 us more a connection).
                self.RequestHandlerClass(request, client_address, self)  # type: ignore[arg-type]
                if request is self._just_parked:
                    self._just_parked = None
                else:
                    fileno = getattr(request, "fileno", None)
                    if fileno is None or fileno() >= 0:  # not closed by the handler
                        try:
                            request.shutdown(socket.SHUT_WR)
                        except OSError:
                            pass
                        request.close()
            else:
                self.process_request(request, client_address)
        except Exception:  # noqa: BLE001 - one bad request must not end the worker
            self.handle_error(request, client_address)
            self._unpark(request)  # parked, then failed: in no state to be served again
            self._end_request(request, client_address)
        except BaseException:
            self._unpark(request)
            self._end_request(request, client_address)
            raise

    def _end_request(self, request: Any, client_address: Any) -> None:
        # shutdown_request() where the connection is being dropped: an override that
        # fails there (on a socket in an unexpected state, say) is logged, and the
        # connection closed anyway, rather than ending the worker.
        try:
            self.shutdown_request(request)
        except Exception:  # noqa: BLE001
            self.handle_error(request, client_address)
            with contextlib.suppress(Exception):
                request.close()

    def _unpark(self, request: Any) -> None:
        if request is not self._just_parked:
            return
        self._just_parked = None
        parked = self._parked
        fd = request.fileno()
        if parked is not None and parked.get(fd, (None,))[0] is request:
            self._unwatch(fd)
            if self.worker is not None:
                self.worker.set_connections(len(parked))

    def _unwatch(self, fd: int) -> Any:
        """Take a parked connection out of the loop's watch, to be closed; return it."""
        assert self._parked is not None
        request = self._parked.pop(fd)[0]
        self._poll.forget(fd)
        return request


class PreforkThreadingMixIn(socketserver.ThreadingMixIn):
    """Handler threads inside each worker: put it first, as with ``socketserver``.

    ``class Server(PreforkThreadingMixIn, PreforkTCPServer)`` serves up to
    ``max_threads`` connections at once in each worker, one thread each. While all of a
    worker's threads are busy it accepts no more (the other workers do), and its main loop
    stops stamping the heartbeat: if none of them finishes or stamps it
    (``self.server.worker.heartbeat()``, as a long-lived handler should) within
    ``timeout``, the master kills the worker as stuck. A graceful stop waits for the
    threads (up to ``graceful_timeout``). ``daemon_threads`` is False for that reason.

    The threads are a pool, started as needed up to ``max_threads`` and kept for the
    worker's life (starting a thread per connection cost about 60 us): each runs
    ``process_request_thread(request, client_address)`` per connection, as
    ``socketserver`` does, so an override of it still applies. Thread-local state lives
    as long as its thread, across connections; context variables do not (each connection
    runs in a fresh ``contextvars.Context``, as a new thread would).
    """

    max_threads: int = 16
    daemon_threads = False
    block_on_close = True

    def worker_init(self, worker: Worker) -> None:
        self._threads_lock = threading.Lock()
        self._active_threads = 0
        self._pool: list[threading.Thread] = []
        self._idle_pool = 0  # pool threads free for the next connection (reserved ones not)
        self._work: queue.SimpleQueue[tuple[Any, Any] | None] = queue.SimpleQueue()
        super().worker_init(worker)  # type: ignore[misc]

    def ready_to_accept(self) -> bool:
        return self._active_threads < self.max_threads

    def _accept_until_empty(self, worker: Worker) -> None:
        # One connection per wake-up, then this worker goes to the back of the line of
        # workers waiting on the listener (the loop registers it again). Linux wakes the
        # first waiter in line (EPOLLEXCLUSIVE), and a worker with handler threads is
        # always waiting, so otherwise the same worker would take every connection until
        # its threads ran out while the others idled. Two epoll_ctl per connection.
        if self._accept_next(worker):  # type: ignore[attr-defined]
            self._poll.watch_listener(False)  # type: ignore[attr-defined]

    def worker_is_healthy(self) -> bool:
        return self._active_threads < self.max_threads

    def _run_connection(self, worker: Worker, request: Any, client_address: Any) -> None:
        with self._threads_lock:
            self._active_threads += 1
            worker.set_connections(self._active_threads)
            if self._active_threads == 1:
                worker.busy()
        if not self._handle_one(request, client_address):  # type: ignore[attr-defined]
            self._thread_done(pooled=False)  # refused: no thread will report it

    def process_request(self, request: Any, client_address: Any) -> None:
        start = True
        try:
            with self._threads_lock:
                # An idle pool thread is reserved for this connection, or a new one starts:
                # never more than max_threads, since at most that many connections are open.
                start = self._idle_pool == 0
                if not start:
                    self._idle_pool -= 1
            if start:
                thread = threading.Thread(
                    target=self._pool_thread,
                    name=f"handler-{len(self._pool)}",
                    daemon=self.daemon_threads,
                )
                thread.start()
                self._pool.append(thread)
        except BaseException:
            # No thread will report this connection; a reserved one goes back to idle.
            self._thread_done(pooled=not start)
            raise
        self._work.put((request, client_address))

    def _pool_thread(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            try:
                # A fresh context per connection, as a new thread would have: context
                # variables set while serving one client are not seen by the next.
                contextvars.Context().run(self.process_request_thread, *item)
            except SystemExit:
                pass  # what a handler thread's SystemExit did: end the connection quietly
            except BaseException:  # noqa: BLE001 - the thread goes on serving
                self._log.exception("error in handler thread %s",  # type: ignore[attr-defined]
                                    threading.current_thread().name)  # fmt: skip
            finally:
                # Only now, overrides of process_request_thread included, is it free.
                self._thread_done(pooled=True)

    def server_close(self) -> None:
        pool = self.__dict__.pop("_pool", None) or []
        for _ in pool:
            self._work.put(None)
        if self.block_on_close and not self.daemon_threads:
            for thread in pool:
                thread.join()  # a graceful stop lets each finish its connection
        super().server_close()

    def _thread_done(self, *, pooled: bool) -> None:
        worker: Worker = self.worker  # type: ignore[attr-defined]
        with self._threads_lock:
            self._active_threads -= 1
            if pooled:
                self._idle_pool += 1  # before the loop may accept again: it counts on it
            worker.set_connections(self._active_threads)
            if self._active_threads == 0:
                worker.idle()
            else:
                worker.heartbeat()
                worker.count_unit()
        self.wake_worker_loop()  # type: ignore[attr-defined]


class PreforkTCPServer(PreforkMixIn, socketserver.TCPServer):
    """``socketserver.TCPServer``, served by pre-forked worker processes.

    ``PreforkTCPServer(server_address, RequestHandlerClass, bind_and_activate=True,
    *, workers=10, timeout=5, ...)``; see :class:`PreforkMixIn` for the settings and the
    methods that may be overridden. Set ``address_family = socket.AF_INET6`` in a subclass
    for IPv6, as with ``socketserver``.
    """

    allow_reuse_address = True
    request_queue_size = 1024


class PreforkUnixStreamServer(PreforkMixIn, socketserver.UnixStreamServer):
    """``socketserver.UnixStreamServer``, served by pre-forked worker processes.

    A socket file left by a dead server is removed before binding; a live server's socket
    or a file that is not a socket makes the constructor raise. The socket file gets mode
    ``socket_mode`` (a keyword or a class attribute; default ``0o660``: the owner and the
    group may connect, nobody else), whatever the umask. The master that served removes the
    socket file in ``server_close()``; a server closed without serving leaves it, as
    ``socketserver`` does (the next bind removes it as stale). An address in Linux's
    abstract namespace (starting with a NUL byte) has no file, so none of this applies to
    it. A socket inherited from a previous master or from systemd keeps the mode it has.
    """

    request_queue_size = 1024
    #: Who may connect: the socket file's permission bits (connecting needs write).
    socket_mode: int = 0o660

    def __init__(self, *args: Any, socket_mode: int | None = None, **kwargs: Any) -> None:
        if socket_mode is not None:
            self.socket_mode = socket_mode
        mode = self.socket_mode
        if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o777:
            raise ValueError(f"socket_mode must be permission bits from 0 to 0o777, not {mode!r}")
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        inherited = self._adopt_inherited()
        if not inherited and not self._abstract:
            clear_stale_unix_socket(self._path)
        super().server_bind()
        if not self._abstract:
            if not inherited:
                # Before listen(): until then nobody can connect, whatever the mode was.
                os.chmod(self._path, self.socket_mode)
            self._bound_inode = os.stat(self._path).st_ino

    @property
    def _path(self) -> str:
        return os.fsdecode(self.server_address)  # type: ignore[arg-type]

    @property
    def _abstract(self) -> bool:
        return self._path.startswith("\0")

    def server_close(self) -> None:
        super().server_close()
        if self._serving_pid != os.getpid() or self._abstract or self._handed_over:
            return  # a worker, a launcher, or a master that handed over: not our file
        with contextlib.suppress(OSError):
            if os.stat(self._path).st_ino == getattr(self, "_bound_inode", None):
                os.unlink(self._path)


class _BoundSocket(socket.socket):
    """An inherited socket, bound already: ``bind()`` is a no-op, so that the usual
    ``server_bind()`` chain (``HTTPServer``'s included) runs unchanged over it."""

    def bind(self, address: Any) -> None:
        pass


class PreforkThreadingTCPServer(PreforkThreadingMixIn, PreforkTCPServer):
    """:class:`PreforkTCPServer` with up to ``max_threads`` handler threads per worker."""


class _Poller:
    """Waits on the listening socket and a worker's other descriptors.

    On Linux the listener is registered with ``EPOLLEXCLUSIVE`` (unless told not to): a
    new connection then wakes one idle worker instead of all of them. Elsewhere, the
    ``selectors`` module's best.
    """

    def __init__(self, listener: int, others: tuple[int, ...], exclusive: bool) -> None:
        self._listener = listener
        self._watching = False
        self._parked_fds: set[int] = set()
        self._epoll: Any = None
        self._selector: selectors.BaseSelector | None = None
        self._exclusive = exclusive and hasattr(select, "EPOLLEXCLUSIVE")
        if self._exclusive:
            self._epoll = select.epoll()
            for fd in others:
                self._epoll.register(fd, select.EPOLLIN)
        else:
            self._selector = selectors.DefaultSelector()
            for fd in others:
                self._selector.register(fd, selectors.EVENT_READ)
        self.watch_listener(True)

    def watch_listener(self, on: bool) -> None:
        if on == self._watching:
            return
        self._watching = on
        if self._epoll is not None:
            # EPOLLEXCLUSIVE cannot be modified, only added and removed.
            if on:
                self._epoll.register(self._listener, select.EPOLLIN | select.EPOLLEXCLUSIVE)
            else:
                self._epoll.unregister(self._listener)
        elif self._selector is not None:
            if on:
                self._selector.register(self._listener, selectors.EVENT_READ)
            else:
                self._selector.unregister(self._listener)

    def watch_parked(self, fd: int) -> bool:
        """Watch a parked connection until it is first readable (then no more, until
        watched again); False if it cannot be watched."""
        try:
            if self._epoll is not None:
                mask = select.EPOLLIN | select.EPOLLONESHOT
                if fd in self._parked_fds:
                    try:
                        self._epoll.modify(fd, mask)  # re-armed: one system call
                        return True
                    except FileNotFoundError:  # closed since, and a new connection now
                        pass
                try:
                    self._epoll.register(fd, mask)
                except FileExistsError:
                    self._epoll.modify(fd, mask)
            elif self._selector is not None:
                self._selector.register(fd, selectors.EVENT_READ)
        except (OSError, ValueError, KeyError):
            return False
        self._parked_fds.add(fd)
        return True

    def forget(self, fd: int) -> None:
        """Stop watching a parked connection (before it is closed)."""
        self._parked_fds.discard(fd)
        with contextlib.suppress(OSError, ValueError, KeyError):
            if self._epoll is not None:
                self._epoll.unregister(fd)
            elif self._selector is not None:
                self._selector.unregister(fd)

    def resumed(self, fd: int) -> None:
        """A parked connection is taken out to be served."""
        if self._selector is not None:  # epoll's one-shot watch has ended by itself
            self.forget(fd)

    def fileno(self) -> int:
        """The epoll (or kqueue...) descriptor, readable when an event waits; -1 if the
        selector has none."""
        if self._epoll is not None:
            return int(self._epoll.fileno())
        try:
            assert self._selector is not None
            return int(self._selector.fileno())  # type: ignore[attr-defined]
        except (AttributeError, OSError, ValueError):
            return -1

    def wait(self, timeout: float) -> list[int]:
        if self._epoll is not None:
            return [fd for fd, _ in self._epoll.poll(timeout)]
        assert self._selector is not None
        return [key.fd for key, _ in self._selector.select(timeout)]

    def __enter__(self) -> _Poller:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._epoll is not None:
            self._epoll.close()
        if self._selector is not None:
            self._selector.close()


# verify_request first: the others may still use the connection once the handler is done.
_CONNECTION_HOOKS = (
    "verify_request", "process_request", "finish_request", "shutdown_request", "close_request"
)  # fmt: skip
# The classes whose definitions of those hooks the worker knows (and may do without).
_KNOWN_HOOKS = (PreforkMixIn, socketserver.BaseServer, socketserver.TCPServer)


def _overrides_none(server: object, names: tuple[str, ...]) -> bool:
    """Whether ``server`` overrides none of the hooks ``names``: no class in its MRO but
    the known ones defines one (even a class after PreforkMixIn, which its
    ``shutdown_request`` reaches through ``super()``), and no instance attribute
    replaces one."""
    if any(name in vars(server) for name in names):
        return False
    return all(
        klass in _KNOWN_HOOKS
        for klass in type(server).__mro__
        if any(name in vars(klass) for name in names)
    )


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError, InterruptedError):
        while os.read(fd, 512):
            pass


def _addr(client_address: Any) -> str:
    if isinstance(client_address, tuple) and len(client_address) >= 2:
        return f"{client_address[0]}:{client_address[1]}"
    return str(client_address) or "a local client"
