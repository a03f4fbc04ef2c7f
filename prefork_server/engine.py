"""Preforker: the protocol-agnostic engine (the seed's API).

::

    def work(master):
        setup_once_per_worker()
        while master.wants_me_alive():
            do_a_unit_of_work()
        clean_up()

    Preforker(work, workers=10, timeout=5).run()    # foreground, blocks until stopped
    Preforker(work, workers=10, timeout=5).start()  # daemonize; the launcher returns

Defaults that differ from the seed, because a Python user running in the foreground would
not expect the seed's: ``run()`` logs to stderr (not ``./<app_name>.log``), leaves stdout
and stderr where they are, and writes a pid file only when ``pid_path`` is given. ``start()``
keeps the seed's defaults: log, stdout and stderr to ``./<app_name>.log``, pid file
``./<app_name>.pid``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .daemon import (
    Daemon,
    PidFile,
    drop_privileges,
    redirect_stdio,
    reopen_log_handlers,
    resolve_user,
)
from .hooks import Hooks
from .master import Master, SparePolicy
from .sockets import started_by_upgrade
from .upgrade import Upgrader
from .worker import Worker

__all__ = ["Options", "Preforker", "default_logger"]

LOG_FORMAT = "%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s"


def _check_number(name: str, value: Any, *, minimum: float, integer: bool) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        what = "an integer" if integer else "a number"
        raise ValueError(f"{name} must be {what}, not {value!r}")
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, not {value!r}")


def _check_path(name: str, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ValueError(f"{name} must be a non-empty path, not {value!r}")


@dataclass(frozen=True)
class Options:
    """The validated options of a Preforker. Constructing one raises ``ValueError``
    naming the first invalid option."""

    workers: int = 10
    timeout: float = 5.0
    graceful_timeout: float | None = None  # None: the same as timeout
    app_name: str = "preforker"
    pid_path: str | None = None
    stdout_path: str | None = None
    stderr_path: str | None = None
    logger: logging.Logger | None = None
    max_boot_failures: int = 5
    max_requests: int = 0  # 0: a worker serves forever
    max_requests_jitter: int = 0
    graceful_term: bool = False
    user: str | int | None = None
    group: str | int | None = None
    hooks: Hooks = Hooks()
    listeners: tuple[socket.socket, ...] = ()
    min_spare_workers: int = 0  # 0: a fixed pool of `workers`
    max_spare_workers: int | None = None  # default: twice min_spare_workers
    max_workers: int | None = None  # default: four times workers

    def spare_policy(self) -> SparePolicy | None:
        """The adaptive pool's policy, or None for a fixed count."""
        if not self.min_spare_workers:
            return None
        max_spare = self.max_spare_workers
        if max_spare is None:
            max_spare = 2 * self.min_spare_workers
        max_workers = self.max_workers
        if max_workers is None:
            max_workers = max(4 * self.workers, self.min_spare_workers)
        return SparePolicy(self.min_spare_workers, max_spare, self.workers, max_workers)

    def __post_init__(self) -> None:
        _check_number("workers", self.workers, minimum=0, integer=True)
        _check_number("timeout", self.timeout, minimum=0, integer=False)
        if self.timeout == 0:
            raise ValueError("timeout must be > 0, not 0")
        if self.graceful_timeout is not None:
            _check_number("graceful_timeout", self.graceful_timeout, minimum=0, integer=False)
        _check_number("max_boot_failures", self.max_boot_failures, minimum=1, integer=True)
        if not isinstance(self.app_name, str) or not self.app_name or "/" in self.app_name:
            raise ValueError(
                f"app_name must be a non-empty string without '/', not {self.app_name!r}"
            )
        for name in ("pid_path", "stdout_path", "stderr_path"):
            _check_path(name, getattr(self, name))
        if self.logger is not None and not isinstance(self.logger, logging.Logger):
            raise ValueError(f"logger must be a logging.Logger, not {self.logger!r}")
        _check_number("max_requests", self.max_requests, minimum=0, integer=True)
        _check_number("max_requests_jitter", self.max_requests_jitter, minimum=0, integer=True)
        if not isinstance(self.graceful_term, bool):
            raise ValueError(f"graceful_term must be True or False, not {self.graceful_term!r}")
        resolve_user(self.user, self.group)  # a name that names nobody fails now
        _check_number("min_spare_workers", self.min_spare_workers, minimum=0, integer=True)
        if self.max_spare_workers is not None:
            _check_number("max_spare_workers", self.max_spare_workers,
                          minimum=max(1, self.min_spare_workers), integer=True)  # fmt: skip
        if self.max_workers is not None:
            _check_number("max_workers", self.max_workers, minimum=max(1, self.workers),
                          integer=True)  # fmt: skip
        if not all(isinstance(s, socket.socket) for s in self.listeners):
            raise ValueError(f"listeners must be sockets, not {self.listeners!r}")
        if not isinstance(self.hooks, Hooks):
            raise ValueError(f"hooks must be a prefork_server.Hooks, not {self.hooks!r}")

    @property
    def grace(self) -> float:
        return self.timeout if self.graceful_timeout is None else self.graceful_timeout


def default_logger(app_name: str, path: str | None = None) -> logging.Logger:
    """The logger used when none is given: ``prefork_server.<app_name>``.

    It gets a handler of its own (to ``path``, else stderr) only if neither it nor the root
    logger has one, so an application that configured logging keeps control of it.
    """
    logger = logging.getLogger(f"prefork_server.{app_name}")
    if not logger.handlers and (path is not None or not logging.getLogger().handlers):
        handler: logging.Handler
        handler = logging.FileHandler(path) if path else logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logger.addHandler(handler)
        logger.propagate = False
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    return logger


class Preforker:
    """Runs ``work(worker)`` in ``workers`` forked processes and keeps them alive.

    Methods for the caller: :meth:`run`, :meth:`start`, :meth:`stop`; after ``run()``,
    ``handed_over`` tells whether a new master started by USR2 took over the sockets.

    ``work`` receives a :class:`~prefork_server.worker.Worker` and should loop while
    ``worker.wants_me_alive()`` is true, calling it at least every ``timeout`` seconds; a
    worker that does not is killed with SIGKILL and replaced. When ``work`` returns (or
    raises, which is logged) while the master still wants the worker, it is respawned.

    Options (each invalid one raises ``ValueError`` naming it): ``workers`` (10),
    ``timeout`` (5 s), ``graceful_timeout`` (how long a graceful stop waits before
    SIGKILL; default ``timeout``), ``app_name`` ("preforker"), ``pid_path``,
    ``stdout_path``, ``stderr_path``, ``logger``, ``max_boot_failures`` (5: after that
    many workers in a row exit before their first heartbeat, the master stops with
    :class:`~prefork_server.master.BootError`), ``max_requests`` (0: unlimited; a
    worker retires gracefully after that many units of work) and ``max_requests_jitter``
    (a random 0..jitter added per worker, so they do not all restart at once),
    ``graceful_term`` (False: TERM stops at once; True: TERM stops gracefully, as QUIT),
    ``user``/``group`` (workers drop to them right after fork, before any work),
    ``listeners`` (sockets handed to the new master on a USR2 upgrade).

    Adaptive pool (off by default): with ``min_spare_workers`` > 0 the master looks twice
    a second at how many workers are idle (from the scoreboard), adds workers when fewer
    than ``min_spare_workers`` are, and retires one per look while more than
    ``max_spare_workers`` (default twice the minimum) are, never going below ``workers``
    nor above ``max_workers`` (default four times ``workers``).

    Hooks, as keywords (see :mod:`prefork_server.hooks`): ``before_fork(number)``,
    ``after_fork(worker)``, ``worker_exit(worker)``, ``on_worker_timeout(number, pid)``,
    ``on_reload()``.
    """

    def __init__(self, work: Callable[[Worker], None], **options: Any) -> None:
        if not callable(work):
            raise ValueError(f"work must be callable, not {work!r}")
        self.work = work
        hook_names = ("before_fork", "after_fork", "worker_exit", "on_worker_timeout",
                      "on_reload")  # fmt: skip
        hooks = {name: options.pop(name) for name in hook_names if name in options}
        if hooks:
            options["hooks"] = Hooks(**hooks)
        self.options = Options(**options)
        self._master: Master | None = None
        self._stop_requested: bool | None = None  # graceful?
        self._lock = threading.Lock()
        self.handed_over = False

    # -- for the caller -----------------------------------------------------------------

    def run(self) -> None:
        """Run the master in this process until it is stopped (QUIT, TERM, INT, stop()).

        Raises :class:`~prefork_server.daemon.PidFileError` if the pid file names a live
        process, and :class:`~prefork_server.master.BootError` if workers cannot boot.
        """
        opts = self.options
        logger = opts.logger or default_logger(opts.app_name)
        self._serve(logger, opts.pid_path, opts.stdout_path, opts.stderr_path)

    def start(self) -> int:
        """Daemonize: run the master in a detached process; return its pid.

        Returns once the master has written its pid file and its workers have booted;
        raises ``RuntimeError`` (with the reason and where the log is) if it failed.
        """
        opts = self.options
        pid_path = os.path.abspath(opts.pid_path or f"{opts.app_name}.pid")
        log_path = os.path.abspath(f"{opts.app_name}.log")
        PidFile(pid_path).check()  # fail here, in the caller, when we can
        # A master exec'd by an upgrade is detached already (its parent is the old daemon),
        # and no launcher waits for it: it must not fork away from the old master.
        daemon = None if started_by_upgrade() else Daemon.spawn()
        if daemon is not None:
            try:
                return daemon.wait()
            except RuntimeError as e:
                where = "its logger" if opts.logger else log_path
                raise RuntimeError(f"{opts.app_name} failed to start: {e} (see {where})") from e
        code = 1
        try:
            logger = opts.logger or default_logger(opts.app_name, log_path)
            try:
                self._serve(
                    logger,
                    pid_path,
                    _abspath(opts.stdout_path) or log_path,
                    _abspath(opts.stderr_path) or log_path,
                    on_ready=Daemon.ready,
                )
                code = 0
            except BaseException as e:
                logger.exception("master failed")
                Daemon.failed(str(e) or type(e).__name__)
        finally:
            os._exit(code)

    def stop(self, graceful: bool = True) -> None:
        """Ask the master to stop; safe from any thread. Before :meth:`run` it makes
        ``run()`` return as soon as it starts."""
        with self._lock:
            if self._master is not None:
                self._master.request_stop(graceful)
            else:
                self._stop_requested = graceful

    # -- internals ----------------------------------------------------------------------

    def _worker_hooks(self, hooks: Hooks | None = None) -> Hooks:
        """The user's hooks as the master runs them: the privilege drop first in
        ``after_fork``, and ``on_reload``'s answer validated before the master applies it."""
        hooks = self.options.hooks if hooks is None else hooks
        ids = resolve_user(self.options.user, self.options.group)
        if ids is not None:
            uid, gid = ids

            def drop(worker: Worker) -> None:
                drop_privileges(uid, gid)
                worker._arm_parent_death()

            hooks = dataclasses.replace(hooks, after_fork=_chain(drop, hooks.after_fork))
        if hooks.on_reload is not None:
            hooks = dataclasses.replace(hooks, on_reload=self._checked_reload(hooks.on_reload))
        return hooks

    def _checked_reload(self, on_reload: Callable[[], Any]) -> Callable[[], Any]:
        def reload() -> dict[str, Any] | None:
            changes = on_reload()
            if not changes:
                return None
            changes = dict(changes)
            fixed = set(changes) - RELOADABLE
            if fixed:
                raise ValueError(f"{', '.join(sorted(fixed))} cannot change on reload")
            # Options() raises ValueError naming a bad value before anything is applied.
            dataclasses.replace(self.options, **changes)
            if "hooks" in changes:
                changes["hooks"] = self._worker_hooks(changes["hooks"])
            return changes

        return reload

    def _serve(
        self,
        logger: logging.Logger,
        pid_path: str | None,
        stdout_path: str | None,
        stderr_path: str | None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        opts = self.options
        redirect_stdio(_abspath(stdout_path), _abspath(stderr_path))

        ids = resolve_user(opts.user, opts.group)
        master_pid = os.getpid()

        def reopen_logs() -> None:
            redirect_stdio(_abspath(stdout_path), _abspath(stderr_path))
            paths = reopen_log_handlers(logger)
            if ids is not None and os.getpid() == master_pid:
                # As Unicorn does: the files logrotate let us create are root's; the
                # workers, which reopen them next, run as the configured user.
                for path in {*paths, _abspath(stdout_path), _abspath(stderr_path)}:
                    if path and os.path.isfile(path):
                        with contextlib.suppress(OSError):
                            os.chown(path, *ids)

        pid_file = PidFile(pid_path) if pid_path else None
        if pid_file is not None:
            pid_file.write()
        upgrader = Upgrader(opts.listeners, pid_file, logger)
        master = Master(
            self.work,
            workers=opts.workers,
            timeout=opts.timeout,
            graceful_timeout=opts.grace,
            logger=logger,
            app_name=opts.app_name,
            max_boot_failures=opts.max_boot_failures,
            max_requests=opts.max_requests,
            max_requests_jitter=opts.max_requests_jitter,
            graceful_term=opts.graceful_term,
            hooks=self._worker_hooks(),
            upgrader=upgrader,
            spare_policy=opts.spare_policy(),
            reopen_logs=reopen_logs,
            on_ready=on_ready,
        )
        with self._lock:
            self._master = master
            if self._stop_requested is not None:
                master.request_stop(self._stop_requested)
        logger.info(
            "master %d starting %d workers (timeout %gs)", os.getpid(), opts.workers, opts.timeout
        )
        try:
            master.run()
        finally:
            self.handed_over = master.handed_over
            with self._lock:
                self._master = None
                self._stop_requested = None
            if pid_file is not None:
                pid_file.remove()
            logger.info("master %d stopped", os.getpid())


#: What an ``on_reload`` hook may return for the master to apply.
RELOADABLE = frozenset(
    {"workers", "timeout", "graceful_timeout", "max_requests", "max_requests_jitter", "hooks"}
)


def _chain(
    first: Callable[[Worker], Any], then: Callable[[Worker], Any] | None
) -> Callable[[Worker], Any]:
    def both(worker: Worker) -> None:
        first(worker)
        if then is not None:
            then(worker)

    return both


def _abspath(path: str | os.PathLike[str] | None) -> str | None:
    return None if path is None else os.path.abspath(os.fspath(path))
