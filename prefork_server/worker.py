"""The worker side: what a forked worker sees of the master.

A worker is handed a :class:`Worker` (the seed called it ``master``, because it is the
master's voice inside the worker). Its one duty is to call :meth:`Worker.wants_me_alive`
at least once every ``timeout`` seconds; the call is both the heartbeat and the stop check.

How a worker learns that it should stop:

* SIGQUIT from the master (graceful): a flag, so the current unit of work finishes and the
  next ``wants_me_alive()`` returns False.
* The master died: the master holds one end of a socket pair whose other end every
  worker inherits; when the master is gone that end reaches EOF. Loops that ``select()`` include
  :attr:`Worker.wakeup_fds` and notice at once; ``wants_me_alive()`` also looks at most
  every half second (one zero-timeout ``select``), and on Linux the kernel sends SIGTERM
  when the parent dies (``PR_SET_PDEATHSIG``) so a worker stuck in foreign code exits too.
* SIGTERM / SIGINT: the default action, so the worker dies at once, running no cleanup.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType

from .scoreboard import Slot

__all__ = ["Worker"]

# How often wants_me_alive() checks the master-death pipe (seconds of monotonic time).
_PARENT_CHECK_INTERVAL = 0.5

# The process title follows the worker's state, but a title change is a system call
# (prctl) and two per connection are measurable. "busy" shows at once (a stuck worker must
# show it); "idle" only once the worker has stayed idle this long (seconds), so that a
# worker going from one short connection to the next keeps showing "busy"; and the served
# count shown is refreshed at most this often (seconds) while the state does not change.
TITLE_IDLE_DELAY = 0.1
TITLE_MAX_AGE = 1.0

# Signals a worker ignores: they are meant for the master (and reach workers only when sent
# to the whole process group, e.g. a terminal resize sends WINCH).
_IGNORED_IN_WORKER = ("SIGWINCH", "SIGTTIN", "SIGTTOU", "SIGHUP", "SIGUSR2")


class Worker:
    """A worker's handle on its master, passed to the work function.

    Methods for the caller:

    - :meth:`wants_me_alive` -- heartbeat and stop check; call it at least every ``timeout``.
    - :meth:`heartbeat` -- the same without counting a unit of work.
    - :meth:`busy` / :meth:`idle` -- bracket one unit of work (a connection) so the
      scoreboard shows what the worker does; both also count as a heartbeat.
    - :attr:`title_due` -- when a loop that blocks should wake, for the process title;
      :meth:`refresh_title` shows it where :meth:`heartbeat` may not be called.
    - :attr:`wakeup_fds` -- descriptors to include in a ``select()`` so that a stop request
      or the master's death wakes the worker at once.
    - :attr:`poll_interval` -- the longest a loop should block between two heartbeats.
    - :meth:`ask_master_to_stop` -- a graceful stop of the whole server, from a worker.
    - :meth:`count_unit`, :attr:`alive` -- for workers that run several units at once.

    Attributes a caller may read: ``number`` (the worker's index, 0..workers-1),
    ``generation``, ``master_pid``, ``timeout``, ``logger``.
    """

    def __init__(
        self,
        *,
        number: int,
        generation: int,
        slot: Slot,
        master_pid: int,
        death_fd: int,
        timeout: float,
        logger: logging.Logger,
        reopen_logs: Callable[[], None] | None = None,
        max_requests: int = 0,
        title: str = "",
        set_title: Callable[[str], None] | None = None,
    ) -> None:
        self.number = number
        self.generation = generation
        self.master_pid = master_pid
        self.timeout = timeout
        self.logger = logger
        self._slot = slot
        self._death_fd = death_fd
        self._reopen_logs = reopen_logs
        self._alive = True
        self._booted = False
        self._reopen_requested = False
        self._next_parent_check = 0.0
        self._signal_r = -1
        self._signal_w = -1
        self.max_requests = max_requests  # 0: no limit
        self.served = 0  # units of work done, as counted for max_requests
        self._brackets = False  # True once busy()/idle() count the units
        self._title = title
        self._set_title = set_title
        self._shown = ""
        self._shown_at = 0.0
        self._title_due = 0.0  # when heartbeat() shows "idle": 0.0 for never
        self._connections = 0  # as last written to the slot (the master resets it to 0)

    # -- for the work function ----------------------------------------------------------

    @property
    def poll_interval(self) -> float:
        """Block at most this long between heartbeats: half the timeout."""
        return self.timeout / 2

    @property
    def wakeup_fds(self) -> tuple[int, ...]:
        """Descriptors that become readable when the worker should re-check its state.

        One reaches EOF when the master dies; the other receives a byte on every signal the
        worker handles (SIGQUIT, SIGUSR1). Readable descriptors can be drained with
        :meth:`drain_wakeup`.
        """
        fds = (self._death_fd, self._signal_r)
        return tuple(fd for fd in fds if fd >= 0)

    def wants_me_alive(self) -> bool:
        """Stamp the heartbeat; return False once the worker should leave its loop.

        Each call after the first counts one unit of work (for ``max_requests`` and the
        scoreboard), unless the worker brackets its units with :meth:`busy`/:meth:`idle`.
        Costs no system call on the common path (a shared-memory write), except a
        zero-timeout ``select`` on the master-death pipe at most twice a second.
        """
        if self._booted and not self._brackets:
            self._slot.idle(time.monotonic())
            self._count_unit()
        return self.heartbeat()

    def heartbeat(self) -> bool:
        """Stamp the heartbeat and return what :meth:`wants_me_alive` would, without
        counting a unit of work: for loops that wake up with nothing to do."""
        now = time.monotonic()
        if not self._booted:
            self._booted = True
            self._slot.mark_booted(now)
        else:
            self._slot.beat(now)
        if self._reopen_requested or now >= self._next_parent_check:
            self._checks_due(now)
        if self._set_title is not None:
            if not self._alive:
                if self._shown != "stopping":
                    self._show_title("stopping", now)
            elif self._title_due and now >= self._title_due:
                self._show_title("idle", now)
        return self._alive

    def _checks_due(self, now: float) -> None:
        # What a beat looks after besides the stamp: a log reopening asked by USR1, and
        # at most twice a second, whether the master is still there.
        if self._reopen_requested:
            self._reopen_requested = False
            if self._reopen_logs is not None:
                try:
                    self._reopen_logs()
                except OSError as e:  # the old files stay open: nothing is lost
                    self.logger.warning("worker[%d] cannot reopen logs: %s", self.number, e)
        if self._alive and now >= self._next_parent_check:
            self._next_parent_check = now + _PARENT_CHECK_INTERVAL
            if self.master_is_gone():
                self.logger.warning(
                    "worker[%d] master %d is gone, exiting", self.number, self.master_pid
                )
                self._alive = False

    def refresh_title(self) -> None:
        """Show the title :attr:`title_due` waits for, without stamping the heartbeat:
        for a loop that may not stamp it (all its handler threads are stuck, say) but
        wakes by :attr:`title_due` all the same."""
        if self._title_due and self._alive:
            now = time.monotonic()
            if now >= self._title_due:
                self._show_title("idle", now)

    def busy(self) -> None:
        """Mark the start of a unit of work (counts as a heartbeat).

        Once a worker uses busy()/idle(), only idle() counts units of work for
        ``max_requests``; otherwise each wants_me_alive() after the first counts one.
        """
        self._brackets = True
        now = time.monotonic()
        self._slot.busy(now)
        if self._set_title is not None:
            self._title_due = 0.0
            if self._shown != "busy" or now - self._shown_at >= TITLE_MAX_AGE:
                self._show_title("busy", now)

    def idle(self) -> None:
        """Mark the end of a unit of work: heartbeat (with what :meth:`heartbeat` looks
        after: log reopening, the master's death), and one more unit served; afterwards
        :attr:`alive` says whether to go on, so a loop need not call :meth:`heartbeat`
        too between two units.

        The process title says "idle" only once the worker has been idle for
        ``TITLE_IDLE_DELAY`` seconds, at a later :meth:`heartbeat`; a loop that blocks
        should wake by :attr:`title_due` for it."""
        now = time.monotonic()
        self.served += 1
        self._slot.idle(now, self.served)
        self._check_max_requests()
        if self._reopen_requested or now >= self._next_parent_check:
            self._checks_due(now)
        if self._set_title is not None:
            if self._alive:
                self._title_due = now + TITLE_IDLE_DELAY
            else:
                self._show_title("stopping", now)

    @property
    def title_due(self) -> float:
        """When (``time.monotonic()``) a :meth:`heartbeat` should come to show the
        process title "idle", or 0.0 if no title change waits. A worker loop that blocks
        caps its wait so as to wake by then."""
        return self._title_due

    def ask_master_to_stop(self) -> None:
        """Ask the master for a graceful stop of the whole server (what ``shutdown()``
        does in a handler). This worker stops too, after its current unit of work; when
        it exits, the master, which reads the request in its slot, stops the others. No
        signal is sent, so it works whatever user the worker runs as."""
        self._slot.ask_stop()
        self.stop()

    def count_unit(self) -> None:
        """Count one unit of work without changing the state shown (for workers that run
        several at once, such as handler threads: see :meth:`busy`)."""
        self._brackets = True
        self._count_unit()
        # A worker that always holds some connection never calls busy() again: refresh
        # the served count it shows here, as busy() would.
        if self._set_title is not None and self._shown == "busy":
            now = time.monotonic()
            if now - self._shown_at >= TITLE_MAX_AGE:
                self._show_title("busy", now)

    def set_connections(self, count: int) -> None:
        """Record how many connections this worker holds now (a worker that serves
        several at once: threads, an event loop). Shown by ``prefork-server status`` and
        read by the other workers' :meth:`fewest_connections_elsewhere`. No system
        call, and no write when the count is the one last recorded. Threads that call
        it must take turns (as they must for the count to be right at all)."""
        # A parked connection's turn would otherwise write the same count three times
        # (resumed, parked again, done).
        if count != self._connections:
            self._connections = count
            self._slot.set_connections(count)

    def fewest_connections_elsewhere(self) -> int | None:
        """The fewest connections another serving worker holds (as recorded with
        :meth:`set_connections`), or None if no other worker serves. Reads shared memory
        only: no system call.

        For workers that accept while they already serve: the kernel wakes whichever
        worker waits on the listener, and an event loop always waits, so one worker can
        end up with every connection while another idles. A worker that holds connections
        while another holds none may leave a new connection to that one (for a moment
        only: it must still accept if nobody else does).
        """
        return self._slot.fewest_connections_elsewhere()

    def idle_elsewhere(self, for_at_least: float = 0.0) -> bool:
        """Whether another worker waits for work: idle, holding no connection (as
        recorded with :meth:`set_connections`), alive by its heartbeat, and, if
        ``for_at_least`` is given, waiting for that many seconds at least. Reads shared
        memory only: no system call.

        For a worker about to give up a connection because a client waits to be
        accepted: if another worker is idle, the kernel wakes that one for the client,
        and giving up would only move work around. And for a worker that holds several
        connections: one of them would be better served by a worker that has been idle
        for a while (not one that is just between two connections). Like
        :meth:`fewest_connections_elsewhere`, it sees the workers of its own scoreboard
        segment (64 with 4 KiB pages)."""
        now = time.monotonic()
        return self._slot.idle_elsewhere(now - self.poll_interval - 1.0, now - for_at_least)

    @property
    def alive(self) -> bool:
        """What :meth:`heartbeat` would return, without stamping the heartbeat: for a
        worker that must not look alive (all its handler threads are stuck)."""
        return self._alive

    def _show_title(self, state: str, now: float) -> None:
        # Without setproctitle the title names the role only.
        self._shown = state
        self._shown_at = now
        self._title_due = 0.0
        assert self._set_title is not None
        self._set_title(f"{self._title} {state}, {self.served} served")

    def _count_unit(self) -> None:
        self.served += 1
        self._slot.set_served(self.served)
        self._check_max_requests()

    def _check_max_requests(self) -> None:
        if self.max_requests and self.served >= self.max_requests and self._alive:
            self.logger.info("worker[%d] served %d units of work (max_requests); retiring",
                             self.number, self.served)  # fmt: skip
            self.stop()

    def stop(self) -> None:
        """Make the next :meth:`wants_me_alive` return False (as SIGQUIT does)."""
        self._alive = False
        self._slot.stopping()

    def master_is_gone(self) -> bool:
        """True if the master process has exited (its pipe reached EOF)."""
        if self._death_fd < 0:
            return os.getppid() != self.master_pid
        readable, _, _ = select.select([self._death_fd], [], [], 0)
        return bool(readable)

    def drain_wakeup(self, fd: int) -> None:
        """Consume a readable wakeup descriptor; notices the master's death."""
        if fd == self._death_fd:
            if self._alive:
                self.logger.warning(
                    "worker[%d] master %d is gone, exiting", self.number, self.master_pid
                )
            self._alive = False
            return
        try:
            while os.read(fd, 512):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    # -- set up by the master right after fork ------------------------------------------

    def _install_signals(self) -> None:
        """Runs in the child right after fork: replace the master's handlers."""
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        self._signal_r, self._signal_w = r, w
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        signal.signal(signal.SIGQUIT, self._on_quit)
        signal.signal(signal.SIGUSR1, self._on_usr1)
        for name in ("SIGTERM", "SIGINT", "SIGCHLD", "SIGCONT"):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
        for name in _IGNORED_IN_WORKER:
            signal.signal(getattr(signal, name), signal.SIG_IGN)
        self._arm_parent_death()

    def _arm_parent_death(self) -> None:
        """(Again) ask the kernel for SIGTERM when the master dies. Linux forgets the
        request when the process's credentials change, so a privilege drop re-arms it."""
        _set_parent_death_signal(signal.SIGTERM)
        # The master may have died before the prctl: then no signal will come.
        if os.getppid() != self.master_pid:
            self._alive = False

    def _on_quit(self, signum: int, frame: FrameType | None) -> None:
        self._alive = False
        self._slot.stopping()

    def _on_usr1(self, signum: int, frame: FrameType | None) -> None:
        self._reopen_requested = True


_prctl: Callable[..., int] | None = None
_prctl_loaded = False


def load_prctl() -> None:
    """Resolve libc's ``prctl`` through ctypes, once. The master calls this before it
    forks, so that a booting worker does not import ctypes (files opened while it
    boots, and milliseconds per worker) to set its parent-death signal. Linux only."""
    global _prctl, _prctl_loaded
    if _prctl_loaded:
        return
    _prctl_loaded = True
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        _prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # no libc symbol: the pipe still works
        _prctl = None


def _set_parent_death_signal(signum: int) -> None:
    """Ask Linux to send ``signum`` when the master dies; a no-op elsewhere."""
    load_prctl()
    if _prctl is not None:
        pr_set_pdeathsig = 1
        _prctl(pr_set_pdeathsig, int(signum), 0, 0, 0)
