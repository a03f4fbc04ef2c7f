"""Zero-downtime upgrade by re-exec (SIGUSR2), as Unicorn does it.

1. The old master renames its pid file to ``<pid file>.oldbin`` and forks a child that
   execs the same command line (``sys.orig_argv``) with the listening sockets left open
   and named in ``PREFORK_SERVER_FDS`` (``PREFORK_SERVER_FDS_PID`` guards them, as
   ``LISTEN_PID`` does for systemd: only the exec'd process itself takes them).
2. The new master adopts those sockets instead of binding (so no connection is refused
   at any moment: the kernel's accept queue never closes), writes the pid file, and forks
   its workers. Both generations now accept on the same sockets.
3. The operator sends WINCH then QUIT to the old master (or QUIT alone). To roll back
   instead, HUP the old master (it respawns its workers) and QUIT the new one.

If the new master dies while the old one runs, the old master renames ``.oldbin`` back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence

from .daemon import PidFile

__all__ = ["FDS_ENV", "FDS_PID_ENV", "Upgrader"]

FDS_ENV = "PREFORK_SERVER_FDS"
FDS_PID_ENV = "PREFORK_SERVER_FDS_PID"


class Upgrader:
    """The old master's side of an upgrade. Methods for the master: :meth:`start`,
    :meth:`new_master_exited`, :meth:`finish`."""

    def __init__(
        self,
        listeners: Sequence[socket.socket],
        pid_file: PidFile | None,
        logger: logging.Logger,
        argv: Sequence[str] | None = None,
    ) -> None:
        self._listeners = list(listeners)
        self._pid_file = pid_file
        self._log = logger
        self._argv = list(argv or getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
        self._cwd = os.getcwd()
        self._renamed = False

    @property
    def old_path(self) -> str | None:
        return None if self._pid_file is None else self._pid_file.path + ".oldbin"

    def start(self) -> int:
        """Fork and exec the new master; return its pid. Raises OSError."""
        if self._pid_file is not None and self._pid_file.read() == os.getpid():
            assert self.old_path is not None
            os.replace(self._pid_file.path, self.old_path)
            self._renamed = True
        fds = [s.fileno() for s in self._listeners]
        try:
            pid = os.fork()
        except OSError:
            self._restore_pid_file()
            raise
        if pid == 0:
            self._exec(fds)  # never returns
        self._log.info("master: started new master %d for the upgrade (%s)", pid,
                       " ".join(self._argv))  # fmt: skip
        return pid

    def _exec(self, fds: list[int]) -> None:
        try:
            os.chdir(self._cwd)
            for fd in fds:
                os.set_inheritable(fd, True)
            env = dict(os.environ)
            env[FDS_ENV] = ",".join(map(str, fds))
            env[FDS_PID_ENV] = str(os.getpid())  # exec keeps the pid
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            os.execve(self._argv[0], self._argv, env)
        except BaseException as e:  # noqa: BLE001 - never return into the master's code
            with contextlib.suppress(Exception):
                os.write(2, f"prefork_server: cannot exec {self._argv}: {e}\n".encode())
        os._exit(127)

    def new_master_exited(self, pid: int, how: str) -> None:
        """The new master died while we still run: the upgrade failed, take the file back."""
        self._log.error("master: new master %d %s; this master stays in charge", pid, how)
        self._restore_pid_file()

    def finish(self) -> None:
        """On our way out: remove ``.oldbin`` if it is still ours."""
        if self._renamed and self.old_path is not None:
            PidFile(self.old_path).remove()

    def _restore_pid_file(self) -> None:
        if not self._renamed or self._pid_file is None or self.old_path is None:
            return
        current = self._pid_file.read()
        if current is None or current != os.getpid():
            with contextlib.suppress(OSError):
                os.replace(self.old_path, self._pid_file.path)
        self._renamed = False
