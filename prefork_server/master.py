"""The master: keeps N workers alive, kills the hung ones, and obeys signals.

The loop (:meth:`Master.run`) fits on one screen and does, in order:

1. reap every dead child (``waitpid(-1, WNOHANG)`` until nothing is left), log why it died;
2. take one queued signal or request and dispatch it in :meth:`Master._dispatch`, then loop;
3. otherwise kill workers whose heartbeat or stop deadline has passed, and spawn or retire
   workers to match the wanted count;
4. sleep in ``select()`` on the wakeup pipe until the nearest deadline.

Signals are recorded by ``signal.set_wakeup_fd``: Python's C-level handler writes the
signal's number to the wakeup pipe, one byte per delivery, which also wakes the loop. The
loop reads those bytes into an uncapped deque, so every delivered signal is acted on: five
TTINs add five workers. (The Python-level handlers do nothing; Python runs them once per
batch of identical signals, so they could not count. The kernel itself merges a signal
sent again while the first is still pending.) Everything else happens in the loop.

The decisions that need no process -- what a signal means, which workers are overdue, how
long to wait before respawning -- are module-level pure functions, unit-tested as such.
"""

from __future__ import annotations

import collections
import enum
import logging
import os
import random
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import FrameType
from typing import TypeVar

from . import systemd
from .daemon import full_process_titles, set_process_title
from .hooks import Hooks
from .scoreboard import Scoreboard, Slot, SlotState, SlotView
from .upgrade import Upgrader
from .worker import Worker, load_prctl

__all__ = [
    "Action",
    "BootError",
    "Master",
    "SparePolicy",
    "adaptive_target",
    "describe_exit",
    "is_spare",
    "next_deadline",
    "overdue",
    "respawn_delay",
    "signal_action",
]

K = TypeVar("K")

# A worker that dies sooner than this after its spawn is part of a crash loop.
CRASH_WINDOW = 1.0
FIRST_BACKOFF = 0.1
MAX_BACKOFF = 10.0
# If the master wakes this much later than it planned, it was stopped or starved.
STALL_MARGIN = 1.0

HANDLED_SIGNALS = (
    "SIGQUIT", "SIGTERM", "SIGINT", "SIGWINCH", "SIGTTIN", "SIGTTOU",
    "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGCHLD", "SIGCONT",
)  # fmt: skip


class BootError(RuntimeError):
    """Workers kept failing before their first heartbeat; the master gave up."""


class Action(enum.Enum):
    """What the master does in response to a signal or request."""

    GRACEFUL_STOP = "graceful stop"
    IMMEDIATE_STOP = "immediate stop"
    STOP_WORKERS = "stop all workers, keep the master"
    ADD_WORKER = "one worker more"
    REMOVE_WORKER = "one worker fewer"
    REOPEN_LOGS = "reopen log files"
    RELOAD = "reload: replace every worker"
    UPGRADE = "re-exec for an upgrade"
    RESUMED = "resumed after a stop"
    WAKE = "wake up"
    IGNORE = "ignore"


def signal_action(
    signum: int, *, terminal_foreground: bool = False, graceful_term: bool = False
) -> Action:
    """What a signal sent to the master means.

    ``terminal_foreground`` is True when the master runs in the foreground of a terminal:
    there a window resize sends SIGWINCH, so WINCH must not stop the workers.
    ``graceful_term`` makes TERM a graceful stop, as systemd, Docker and Kubernetes expect.
    """
    table = {
        signal.SIGQUIT: Action.GRACEFUL_STOP,
        signal.SIGTERM: Action.GRACEFUL_STOP if graceful_term else Action.IMMEDIATE_STOP,
        signal.SIGINT: Action.IMMEDIATE_STOP,
        signal.SIGWINCH: Action.IGNORE if terminal_foreground else Action.STOP_WORKERS,
        signal.SIGTTIN: Action.ADD_WORKER,
        signal.SIGTTOU: Action.REMOVE_WORKER,
        signal.SIGUSR1: Action.REOPEN_LOGS,
        signal.SIGHUP: Action.RELOAD,
        signal.SIGUSR2: Action.UPGRADE,
        signal.SIGCONT: Action.RESUMED,
        signal.SIGCHLD: Action.WAKE,
    }
    return table.get(signal.Signals(signum), Action.IGNORE)


def overdue(
    beats: Mapping[K, float], now: float, timeout: float, excused_since: float = 0.0
) -> list[K]:
    """The keys whose last beat is more than ``timeout`` ago.

    A beat older than ``excused_since`` counts as made then: after the master was stopped
    or the machine suspended, no worker is blamed for time it did not have.
    """
    return [k for k, beat in beats.items() if now - max(beat, excused_since) > timeout]


def next_deadline(
    beats: Iterable[float], timeout: float, excused_since: float = 0.0
) -> float | None:
    """When the first of these workers becomes overdue, or None if there are none."""
    return min((max(b, excused_since) + timeout for b in beats), default=None)


@dataclass(frozen=True)
class SparePolicy:
    """Apache-prefork-style adaptive pool: keep between ``min_spare`` and ``max_spare``
    idle workers, with never fewer than ``min_workers`` nor more than ``max_workers``."""

    min_spare: int
    max_spare: int
    min_workers: int
    max_workers: int

    #: How often the master looks at the idle count (seconds).
    interval: float = 0.5


def is_spare(view: SlotView) -> bool:
    """Whether a worker is spare: booting, or idle. An idle worker may hold idle
    connections (parked keep-alive ones, an event loop's): it takes a new client at once
    all the same. Counting it busy would grow the pool for clients that send nothing,
    and a new worker, being idle, soon gets a client moved to it and looks busy too."""
    return view.state in (SlotState.IDLE, SlotState.BOOTING)


def adaptive_target(total: int, spare: int, policy: SparePolicy) -> int:
    """How many workers to want, given ``total`` wanted now of which ``spare`` are idle
    (or booting, or not yet forked).

    Too few spare: add the shortfall at once (a burst of load should not wait a second per
    worker). Too many: retire one per look, so a short lull does not empty the pool.
    """
    if spare < policy.min_spare:
        return min(policy.max_workers, total + policy.min_spare - spare)
    if spare > policy.max_spare:
        return max(policy.min_workers, total - 1)
    return max(policy.min_workers, min(policy.max_workers, total))


def respawn_delay(previous: float, lifetime: float) -> float:
    """How long to wait before respawning a worker that lived ``lifetime`` seconds.

    A worker that ran for :data:`CRASH_WINDOW` or more is replaced at once and resets the
    backoff; one that died sooner doubles the previous delay, from
    :data:`FIRST_BACKOFF` up to :data:`MAX_BACKOFF`.
    """
    if lifetime >= CRASH_WINDOW:
        return 0.0
    return min(MAX_BACKOFF, max(FIRST_BACKOFF, previous * 2))


def describe_exit(status: int) -> str:
    """A wait status in words: ``exited with status 3``, ``killed by SIGKILL``."""
    if os.WIFEXITED(status):
        return f"exited with status {os.WEXITSTATUS(status)}"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"killed by {name}"
    return f"ended with wait status {status}"


# Deaths that somebody else caused: no crash loop, no boot failure.
_EXTERNAL_KILLS = frozenset({signal.SIGKILL, signal.SIGTERM, signal.SIGINT})


@dataclass
class _Child:
    pid: int
    number: int
    generation: int
    slot: Slot
    spawned_at: float
    retiring: bool = False  # asked to stop gracefully (QUIT sent)
    stop_deadline: float | None = None  # SIGKILL once passed
    killed: str | None = None  # why the master sent SIGKILL


def _terminal_foreground() -> bool:
    """True if our process group is the foreground group of a controlling terminal."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


class Master:
    """Forks ``workers`` children that each run ``target(worker)``, and keeps them alive.

    Methods for the caller: :meth:`run` (blocks until stopped), :meth:`request_stop`
    (thread-safe), :attr:`worker_pids`.

    Not meant to be subclassed; customise through the callables given to the constructor.
    """

    def __init__(
        self,
        target: Callable[[Worker], None],
        *,
        workers: int,
        timeout: float,
        graceful_timeout: float,
        logger: logging.Logger,
        app_name: str,
        max_boot_failures: int = 5,
        max_requests: int = 0,
        max_requests_jitter: int = 0,
        graceful_term: bool = False,
        hooks: Hooks | None = None,
        upgrader: Upgrader | None = None,
        spare_policy: SparePolicy | None = None,
        reopen_logs: Callable[[], None] | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self._target = target
        self._wanted = workers
        self._configured = workers  # what HUP goes back to (after WINCH, TTIN, TTOU)
        self._timeout = timeout
        self._graceful_timeout = graceful_timeout
        self._log = logger
        self._app_name = app_name
        self._max_boot_failures = max_boot_failures
        self._max_requests = max_requests
        self._max_requests_jitter = max_requests_jitter
        self._graceful_term = graceful_term
        self._hooks = hooks or Hooks()
        self._upgrader = upgrader
        self._spare_policy = spare_policy
        self._next_adapt = 0.0
        self._new_master: int | None = None
        self._reopen_logs = reopen_logs
        self._on_ready = on_ready

        self._children: dict[int, _Child] = {}
        self._scoreboard = Scoreboard()
        self._generation = 0
        self._queue: collections.deque[int | Action] = collections.deque()
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        # Every worker inherits the read end; it reaches EOF when the master is gone.
        self._death_r, self._death_w = os.pipe()
        self._stopping: Action | None = None
        self._excused_since = 0.0
        self._next_spawn_at = 0.0
        self._backoff = 0.0
        self._boot_failures = 0
        self._fatal: str | None = None
        # Until every wanted worker has booted (at start, and again after a reload).
        self._ready_pending = True
        self._pid = os.getpid()
        self._saved_handlers: dict[int, object] = {}
        self._saved_wakeup_fd: int | None = None

    # -- for the caller -----------------------------------------------------------------

    @property
    def worker_pids(self) -> list[int]:
        return sorted(self._children)

    @property
    def handed_over(self) -> bool:
        """True if a new master started by USR2 was alive when this one stopped: the
        listening sockets (and a Unix socket's file) are its now."""
        return self._new_master is not None

    def request_stop(self, graceful: bool = True) -> None:
        """Ask the loop to stop. Safe from any thread and from signal handlers."""
        self._queue.append(Action.GRACEFUL_STOP if graceful else Action.IMMEDIATE_STOP)
        self._wake()

    def run(self) -> None:
        """Run the master loop until a stop completes. Raises :class:`BootError`."""
        set_process_title(f"{self._app_name} master")
        load_prctl()  # once here, not in every worker as it boots
        self._install_signals()
        try:
            while True:
                self._read_signals()
                self._reap()
                if self._stopping is not None and not self._children:
                    break
                if self._queue:
                    self._dispatch(self._next_action())
                    continue
                now = time.monotonic()
                self._enforce_deadlines(now)
                if self._stopping is None:
                    self._adapt_worker_count(now)
                    self._maintain_worker_count(now)
                    self._check_ready()
                self._sleep(now)
        finally:
            if self._upgrader is not None:
                self._upgrader.finish()
            self._kill_leftovers()
            self._restore_signals()
            self._scoreboard.close()
            for fd in (self._wake_r, self._wake_w, self._death_r, self._death_w):
                os.close(fd)
        if self._fatal is not None:
            raise BootError(self._fatal)

    # -- signals ------------------------------------------------------------------------

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            self._log.warning(
                "master loop runs outside the main thread: signals are not handled, "
                "only shutdown() stops it"
            )
            return
        self._saved_wakeup_fd = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for name in HANDLED_SIGNALS:
            signum = getattr(signal, name)
            self._saved_handlers[signum] = signal.signal(signum, self._on_signal)

    def _restore_signals(self) -> None:
        for signum, handler in self._saved_handlers.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._saved_handlers.clear()
        if self._saved_wakeup_fd is not None:
            signal.set_wakeup_fd(self._saved_wakeup_fd)
            self._saved_wakeup_fd = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """Nothing to do: the C-level handler already wrote ``signum`` to the wakeup pipe."""

    def _read_signals(self) -> None:
        """Move the signal numbers waiting in the wakeup pipe into the queue."""
        while True:
            try:
                data = os.read(self._wake_r, 4096)
            except (BlockingIOError, InterruptedError):
                return
            # 0 is a plain wake-up (request_stop); SIGCHLD only wakes us to reap.
            self._queue.extend(b for b in data if b and b != signal.SIGCHLD)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # a full pipe already wakes the loop; a closed one means we are done

    def _stop_queued(self, signum: int) -> bool:
        """Whether ``signum`` waits in the queue and means a stop to the master."""
        # A signal sent to the whole group is pending in the master before any worker
        # it killed can be reaped, but may have come after this loop's _read_signals().
        self._read_signals()
        if signum not in self._queue:  # Actions are not ints: only signals match
            return False
        action = signal_action(signum, graceful_term=self._graceful_term)
        return action in (Action.GRACEFUL_STOP, Action.IMMEDIATE_STOP)

    def _next_action(self) -> Action:
        item = self._queue.popleft()
        if isinstance(item, Action):
            return item
        # Only a WINCH needs the (syscall-costly) question of who owns the terminal.
        in_terminal = item == signal.SIGWINCH and _terminal_foreground()
        return signal_action(
            item, terminal_foreground=in_terminal, graceful_term=self._graceful_term
        )

    def _dispatch(self, action: Action) -> None:
        """The one place where a signal or request turns into work."""
        if action not in (Action.WAKE, Action.IGNORE, Action.RESUMED):
            self._log.info("master: %s", action.value)
        now = time.monotonic()
        if action is Action.GRACEFUL_STOP:
            self._begin_stop(Action.GRACEFUL_STOP, now)
        elif action is Action.IMMEDIATE_STOP:
            self._begin_stop(Action.IMMEDIATE_STOP, now)
        elif action is Action.STOP_WORKERS:
            self._wanted = 0
        elif action is Action.ADD_WORKER:
            self._wanted += 1
        elif action is Action.REMOVE_WORKER:
            self._wanted = max(0, self._wanted - 1)
        elif action is Action.REOPEN_LOGS:
            self._reopen()
        elif action is Action.RELOAD:
            self._reload()
        elif action is Action.UPGRADE:
            self._upgrade()
        elif action is Action.RESUMED:
            self._excuse(now, "was continued (SIGCONT)")
        elif action is Action.IGNORE:
            self._log.info("master: ignoring a signal (SIGWINCH in a terminal is a resize)")

    # -- workers ------------------------------------------------------------------------

    def _reload(self) -> None:
        try:
            changes = self._hooks.on_reload() if self._hooks.on_reload else None
            if changes:
                self._reconfigure(changes)
        except Exception:  # noqa: BLE001 - a bad config must not take the master down
            self._log.exception("master: reload abandoned; the current workers keep serving")
            return
        self._generation += 1
        self._wanted = self._configured
        self._boot_failures = 0
        self._ready_pending = True
        systemd.notify("RELOADING=1")

    def _reconfigure(self, changes: Mapping[str, object]) -> None:
        """Apply the settings an ``on_reload`` hook returned (validated by the caller)."""
        for name, value in changes.items():
            if name == "workers":
                self._configured = int(value)  # type: ignore[call-overload]
            elif name == "timeout":
                self._timeout = float(value)  # type: ignore[arg-type]
            elif name == "graceful_timeout":
                self._graceful_timeout = float(value)  # type: ignore[arg-type]
            elif name == "max_requests":
                self._max_requests = int(value)  # type: ignore[call-overload]
            elif name == "max_requests_jitter":
                self._max_requests_jitter = int(value)  # type: ignore[call-overload]
            elif name == "hooks" and isinstance(value, Hooks):
                self._hooks = value
            else:
                raise ValueError(f"{name} cannot change on reload")
            self._log.info("master: reload sets %s = %r", name, value)

    def _upgrade(self) -> None:
        if self._upgrader is None:
            self._log.warning("master: this server cannot re-exec itself; USR2 ignored")
        elif self._new_master is not None:
            self._log.warning("master: upgrade already under way (new master %d)",
                              self._new_master)  # fmt: skip
        else:
            try:
                self._new_master = self._upgrader.start()
            except (OSError, RuntimeError) as e:  # RuntimeError: PidFileError
                self._log.error("master: cannot start a new master: %s", e)

    def _spawn(self, number: int, now: float) -> None:
        self._hooks.call("before_fork", self._log, number)
        slot = self._scoreboard.allocate(0, self._generation, now, number)
        handled = {getattr(signal, n) for n in HANDLED_SIGNALS}
        # Block our signals across fork so that the child cannot run the master's handlers
        # before it installs its own; whatever arrives meanwhile stays pending, not lost.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, handled)
        try:
            pid = os.fork()
        except OSError as e:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            self._scoreboard.release(slot)
            self._log.error("master: cannot fork worker[%d]: %s", number, e)
            self._backoff = respawn_delay(self._backoff, 0.0)
            self._next_spawn_at = now + self._backoff
            return
        if pid == 0:
            self._become_worker(number, slot, old_mask)  # never returns
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        slot.set_pid(pid)
        self._children[pid] = _Child(pid, number, self._generation, slot, now)
        self._log.info("master: spawned worker[%d] pid %d", number, pid)

    def _become_worker(self, number: int, slot: Slot, old_mask: Iterable[int]) -> None:
        code = 1
        try:
            title = f"{self._app_name} worker[{number}]"
            set_process_title(title)
            signal.set_wakeup_fd(-1)
            for fd in (self._wake_r, self._wake_w, self._death_w, self._scoreboard.fd):
                if fd >= 0:  # the scoreboard's mapping outlives its descriptor
                    os.close(fd)
            self._queue.clear()
            limit = self._max_requests
            if limit:
                limit += random.randint(0, self._max_requests_jitter)
            worker = Worker(
                number=number,
                generation=self._generation,
                slot=slot,
                master_pid=self._pid,
                death_fd=self._death_r,
                timeout=self._timeout,
                logger=self._log,
                reopen_logs=self._reopen_logs,
                max_requests=limit,
                title=title,
                set_title=full_process_titles(),
            )
            worker._install_signals()
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            if self._hooks.after_fork is not None:
                self._hooks.after_fork(worker)  # raising here is a boot failure
            self._target(worker)
            self._hooks.call("worker_exit", self._log, worker)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001 - log it; the master decides what next
            self._log.exception("worker[%d] (pid %d) crashed", number, os.getpid())
            code = 1
        finally:
            _flush_everything(self._log)
            os._exit(code)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self._children.pop(pid, None)
            if child is None:
                if pid == self._new_master and self._upgrader is not None:
                    self._new_master = None
                    self._upgrader.new_master_exited(pid, describe_exit(status))
                continue  # otherwise not ours to care about (a hook's subprocess)
            view = child.slot.read()
            if child.slot.stop_asked() and self._stopping is None:
                self._log.info("master: worker[%d] (pid %d) asked for a graceful stop",
                               child.number, pid)  # fmt: skip
                self._queue.append(Action.GRACEFUL_STOP)
            self._scoreboard.release(child.slot)
            self._worker_exited(child, status, view.booted, view.state is SlotState.STOPPING)

    def _worker_exited(self, child: _Child, status: int, booted: bool, retired: bool) -> None:
        now = time.monotonic()
        lifetime = now - child.spawned_at
        how = describe_exit(status)
        name = f"worker[{child.number}] (pid {child.pid})"
        if child.killed is not None:
            self._log.error("master: %s %s after %s", name, how, child.killed)
            return
        if child.retiring or self._stopping is not None:
            self._log.info("master: %s %s", name, how)
            return
        if os.WIFSIGNALED(status) and self._stop_queued(os.WTERMSIG(status)):
            # The signal went to the whole process group (Ctrl-C in a terminal, `kill --
            # -PGID`, systemd's KillMode=control-group): the master got it too and stops
            # next. A stop, not a crash; and no replacement.
            self._log.info("master: %s %s (the master got it too, and stops)", name, how)
            return
        signaled = os.WIFSIGNALED(status) and os.WTERMSIG(status) in _EXTERNAL_KILLS
        clean = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        if clean and retired:
            self._log.info("master: %s retired (max_requests); replacing it", name)
            return
        if clean:
            self._log.warning("master: %s returned from its work function", name)
        else:
            self._log.error("master: %s %s", name, how)
        if signaled:
            return  # somebody killed it: replace it at once
        if not booted and os.WIFEXITED(status):
            self._boot_failures += 1
            if self._boot_failures >= self._max_boot_failures and self._old_generation_serves():
                self._log.error(
                    "master: reload failed: %d new workers in a row exited before their "
                    "first heartbeat (last: %s); the previous generation keeps serving",
                    self._boot_failures, how,
                )  # fmt: skip
                self._generation = max(
                    c.generation
                    for c in self._children.values()
                    if c.generation < self._generation and not c.retiring
                )
                self._boot_failures = 0
                return
            if self._boot_failures >= self._max_boot_failures:
                self._fatal = (
                    f"{self._boot_failures} workers in a row exited before their first "
                    f"heartbeat (last: {how}); giving up. See the log for their tracebacks."
                )
                self._log.critical("master: %s", self._fatal)
                self._begin_stop(Action.IMMEDIATE_STOP, now)
                return
        elif booted:
            self._boot_failures = 0
        self._backoff = respawn_delay(self._backoff, lifetime)
        if self._backoff:
            self._next_spawn_at = max(self._next_spawn_at, now + self._backoff)
            self._log.warning(
                "master: %s lived %.2fs; respawning in %.2fs", name, lifetime, self._backoff
            )

    def _old_generation_serves(self) -> bool:
        return any(
            c.generation < self._generation and not c.retiring for c in self._children.values()
        )

    def _adapt_worker_count(self, now: float) -> None:
        policy = self._spare_policy
        if policy is None or now < self._next_adapt:
            return
        self._next_adapt = now + policy.interval
        serving = [c for c in self._children.values() if not c.retiring]
        idle = sum(1 for c in serving if is_spare(c.slot.read()))
        spare = idle + max(0, self._wanted - len(serving))  # not forked yet: spare soon
        target = adaptive_target(self._wanted, spare, policy)
        if target != self._wanted:
            self._log.info("master: %d of %d workers idle; now %d workers", idle,
                           len(serving), target)  # fmt: skip
            self._wanted = target

    def _maintain_worker_count(self, now: float) -> None:
        serving = [c for c in self._children.values() if not c.retiring]
        for child in serving:
            if child.number >= self._wanted:
                self._retire(child, now)
        # After a reload, an old worker leaves once its successor has booted (and after a
        # failed reload, the new workers leave the old ones their places back).
        current = {c.number: c for c in serving if c.generation == self._generation}
        for child in serving:
            successor = current.get(child.number)
            if child.generation != self._generation and successor is not None:
                if successor.slot.read().booted:
                    self._retire(child, now)
        if now < self._next_spawn_at:
            return
        for number in range(self._wanted):
            if number not in current:
                self._spawn(number, now)

    def _retire(self, child: _Child, now: float) -> None:
        child.retiring = True
        child.stop_deadline = now + self._graceful_timeout
        self._signal(child, signal.SIGQUIT)

    def _signal(self, child: _Child, signum: int) -> None:
        try:
            os.kill(child.pid, signum)
        except ProcessLookupError:
            pass  # already dead, reaped on the next turn

    def _enforce_deadlines(self, now: float) -> None:
        beats = {pid: c.slot.last_beat() for pid, c in self._children.items() if c.killed is None}
        for pid in overdue(beats, now, self._timeout, self._excused_since):
            child = self._children[pid]
            self._hooks.call("on_worker_timeout", self._log, child.number, pid)
            child.killed = f"timeout (no heartbeat for {now - beats[pid]:.1f}s)"
            self._log.error(
                "master: worker[%d] (pid %d) missed its heartbeat for %.1fs "
                "(timeout %gs); killing it", child.number, pid, now - beats[pid], self._timeout
            )  # fmt: skip
            self._signal(child, signal.SIGKILL)
        for child in self._children.values():
            if child.killed is None and child.stop_deadline is not None:
                if now >= child.stop_deadline:
                    child.killed = "the graceful stop deadline passed"
                    self._signal(child, signal.SIGKILL)

    def _begin_stop(self, how: Action, now: float) -> None:
        if self._stopping is Action.IMMEDIATE_STOP:
            return  # already the strongest stop
        self._stopping = how
        self._ready_pending = False
        if self._new_master is None:  # after an upgrade, the service is not stopping
            systemd.notify("STOPPING=1")
        for child in self._children.values():
            if how is Action.IMMEDIATE_STOP:
                child.retiring = True
                child.stop_deadline = now + min(self._graceful_timeout, 2.0)
                self._signal(child, signal.SIGTERM)
            elif not child.retiring:
                self._retire(child, now)

    def _kill_leftovers(self) -> None:
        """On the way out, whatever happened: no worker outlives its master."""
        for child in self._children.values():
            self._signal(child, signal.SIGKILL)
        for pid in list(self._children):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            self._children.pop(pid, None)

    def _reopen(self) -> None:
        if self._reopen_logs is not None:
            try:
                self._reopen_logs()
            except OSError as e:
                self._log.error("master: cannot reopen logs: %s", e)
        for child in self._children.values():
            self._signal(child, signal.SIGUSR1)

    def _check_ready(self) -> None:
        """Ready: every wanted worker is of the current generation and has booted."""
        if not self._ready_pending:
            return
        current = [c for c in self._children.values() if not c.retiring]
        if any(c.generation != self._generation for c in current):
            return
        if sum(1 for c in current if c.slot.read().booted) < self._wanted:
            return
        self._ready_pending = False
        systemd.notify("READY=1", f"MAINPID={self._pid}")
        if self._on_ready is not None:
            self._on_ready()
            self._on_ready = None  # the launcher hears about the first start only

    # -- sleeping -----------------------------------------------------------------------

    def _sleep(self, now: float) -> None:
        deadlines = []
        beat_deadline = next_deadline(
            (c.slot.last_beat() for c in self._children.values() if c.killed is None),
            self._timeout,
            self._excused_since,
        )
        if beat_deadline is not None:
            deadlines.append(beat_deadline)
        deadlines.extend(
            c.stop_deadline for c in self._children.values() if c.stop_deadline is not None
        )
        if self._stopping is None and self._next_spawn_at > now:
            deadlines.append(self._next_spawn_at)
        if self._stopping is None and self._spare_policy is not None:
            deadlines.append(self._next_adapt)
        timeout = max(0.0, min(deadlines) - now) if deadlines else None
        if self._ready_pending or not self._saved_handlers:
            # Booting workers and (without signals) dying ones do not wake us: look often.
            timeout = 0.05 if self._ready_pending else min(timeout or 0.5, 0.5)
        try:
            select.select([self._wake_r], [], [], timeout)
        except InterruptedError:
            pass
        woke = time.monotonic()
        if timeout is not None and woke - (now + timeout) > STALL_MARGIN:
            self._excuse(woke, f"slept {woke - now:.1f}s instead of {timeout:.1f}s")

    def _excuse(self, now: float, why: str) -> None:
        self._excused_since = now
        self._log.info("master: %s; every worker gets a fresh timeout", why)


def _flush_everything(logger: logging.Logger) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed or broken stream must not block exit
            pass
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            try:
                handler.flush()
            except Exception:  # noqa: BLE001
                pass
        current = current.parent if current.propagate else None
