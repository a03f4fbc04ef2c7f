"""Process plumbing: daemonizing, the pid file, stdio redirection, log reopening, titles.

Nothing here knows about workers; the engine composes these pieces.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Callable

__all__ = [
    "Daemon",
    "drop_privileges",
    "resolve_user",
    "PidFile",
    "PidFileError",
    "open_append",
    "redirect_stdio",
    "reopen_log_handlers",
    "set_process_title",
]


class PidFileError(RuntimeError):
    """The pid file names a live process, or cannot be written."""


def _pid_is_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but somebody else's
        return True
    return True


class PidFile:
    """A pid file written atomically and removed only by its owner.

    Methods for the caller: :meth:`read`, :meth:`check`, :meth:`write`, :meth:`remove`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.path.abspath(os.fspath(path))

    def read(self) -> int | None:
        """The pid in the file, or None if there is no file or no pid in it. Raises
        :class:`PidFileError` if the path cannot be a pid file (a directory, a path
        under a regular file, no permission)."""
        try:
            with open(self.path) as f:
                return int(f.read().strip() or 0) or None
        except (FileNotFoundError, ValueError):
            return None
        except OSError as e:
            raise PidFileError(f"pid file {self.path}: {e.strerror}") from None

    def check(self, own_pid: int | None = None) -> None:
        """Raise :class:`PidFileError` if the file names a live process other than ours."""
        pid = self.read()
        if pid is not None and pid != (own_pid or os.getpid()) and _pid_is_alive(pid):
            raise PidFileError(
                f"pid file {self.path} names pid {pid}, which is running: "
                "is the server already started? (stop it, or remove the file if it is not ours)"
            )

    def write(self, pid: int | None = None) -> None:
        """Write ``pid`` (default: ours) atomically: a reader sees the old file or the new.

        A stale file (its pid is not running) is replaced; a live one is refused.
        """
        pid = os.getpid() if pid is None else pid
        self.check(pid)
        directory = os.path.dirname(self.path)
        try:
            fd, tmp = tempfile.mkstemp(prefix=".pid.", dir=directory)
        except OSError as e:
            raise PidFileError(f"cannot write pid file {self.path}: {e.strerror}") from e
        try:
            with os.fdopen(fd, "w") as f:
                f.write(f"{pid}\n")
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(e, OSError):
                raise PidFileError(f"cannot write pid file {self.path}: {e.strerror}") from e
            raise

    def remove(self, pid: int | None = None) -> bool:
        """Remove the file if it still holds ``pid`` (default: ours). True if removed.

        After a zero-downtime upgrade the file belongs to the new master; the old one must
        not delete it on its way out.
        """
        pid = os.getpid() if pid is None else pid
        try:
            if self.read() != pid:
                return False
        except PidFileError:
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        return True


class Daemon:
    """The launcher's end of a double fork.

    ``Daemon.spawn()`` returns a Daemon in the launcher and None in the daemon process. The
    daemon reports back with :meth:`ready` or :meth:`failed` through a pipe; the launcher
    waits with :meth:`wait`, which returns the daemon's pid or raises with its message.
    """

    _report_fd: int = -1  # in the daemon: the write end

    def __init__(self, read_fd: int) -> None:
        self._read_fd = read_fd

    @classmethod
    def spawn(cls) -> Daemon | None:
        r, w = os.pipe()
        first = os.fork()
        if first:
            os.close(w)
            os.waitpid(first, 0)  # the intermediate child exits at once
            return cls(r)
        # The intermediate child: leave the caller's session so no terminal owns us, then
        # fork again so the daemon is not a session leader and can never get a terminal.
        os.close(r)
        try:
            os.setsid()
            if os.fork():
                os._exit(0)
        except BaseException:  # noqa: BLE001 - never return into the caller's code
            os._exit(1)
        cls._report_fd = w
        # Workers forked before the report is sent must not hold the launcher's pipe open.
        os.register_at_fork(after_in_child=cls._forget_report_fd)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.close(null)
        return None

    @classmethod
    def _forget_report_fd(cls) -> None:
        if cls._report_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(cls._report_fd)
            cls._report_fd = -1

    @classmethod
    def ready(cls) -> None:
        cls._report(f"ok {os.getpid()}\n")

    @classmethod
    def failed(cls, message: str) -> None:
        cls._report(f"error {message}\n")

    @classmethod
    def _report(cls, line: str) -> None:
        if cls._report_fd < 0:
            return
        with contextlib.suppress(OSError):
            os.write(cls._report_fd, line.encode("utf-8", "replace"))
            os.close(cls._report_fd)
        cls._report_fd = -1

    def wait(self) -> int:
        """Block until the daemon reports; return its pid or raise RuntimeError."""
        chunks = []
        while True:
            chunk = os.read(self._read_fd, 4096)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(self._read_fd)
        report = b"".join(chunks).decode("utf-8", "replace").strip()
        if report.startswith("ok "):
            return int(report[3:])
        if report.startswith("error "):
            raise RuntimeError(report[6:])
        raise RuntimeError("the daemon exited before it was ready")


def open_append(path: str) -> int:
    """Open ``path`` for appending (created 0644), as stdio and log files are."""
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def redirect_stdio(stdout_path: str | None, stderr_path: str | None) -> None:
    """Point descriptors 1 and 2 at the given paths; None or ``/dev/stdout`` keeps one as is.

    Called again on SIGUSR1, this reopens the files after a log rotation.
    """
    for fd, path, stream in ((1, stdout_path, sys.stdout), (2, stderr_path, sys.stderr)):
        if path is None or path in ("/dev/stdout", "/dev/stderr", f"/dev/fd/{fd}"):
            continue
        with contextlib.suppress(Exception):
            stream.flush()
        new = open_append(path)
        try:
            os.dup2(new, fd)
        finally:
            os.close(new)


def reopen_log_handlers(logger: logging.Logger) -> list[str]:
    """Reopen every file handler reachable from ``logger`` (after logrotate moved the
    file); return their paths. A handler whose file cannot be opened keeps its old stream
    (so no line is lost), and the first such error is raised once all were tried."""
    seen: set[int] = set()
    paths: list[str] = []
    error: OSError | None = None
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if id(handler) in seen or not isinstance(handler, logging.FileHandler):
                continue
            seen.add(id(handler))
            paths.append(handler.baseFilename)
            handler.acquire()
            try:
                new = handler._open()
            except OSError as e:
                error = error or e
                continue
            finally:
                handler.release()
            handler.acquire()
            try:
                old, handler.stream = handler.stream, new
                if old is not None:
                    old.close()
            finally:
                handler.release()
        current = current.parent if current.propagate else None
    if error is not None:
        raise error
    return paths


def resolve_user(user: str | int | None, group: str | int | None) -> tuple[int, int] | None:
    """(uid, gid) for a user and group given by name or number; None if neither is given.

    The group defaults to the user's primary group. Raises ``ValueError`` naming the
    option that names nobody.
    """
    import grp
    import pwd

    if user is None and group is None:
        return None
    uid, gid = os.getuid(), os.getgid()
    if user is not None:
        try:
            entry = pwd.getpwuid(user) if isinstance(user, int) else pwd.getpwnam(user)
        except (KeyError, TypeError):
            raise ValueError(f"user {user!r} does not exist") from None
        uid, gid = entry.pw_uid, entry.pw_gid
    if group is not None:
        try:
            gid = (grp.getgrgid(group) if isinstance(group, int) else grp.getgrnam(group)).gr_gid
        except (KeyError, TypeError):
            raise ValueError(f"group {group!r} does not exist") from None
    return uid, gid


def drop_privileges(uid: int, gid: int) -> None:
    """Become ``uid``/``gid`` for good (group first, while we still may change it)."""
    if os.getuid() == uid and os.getgid() == gid:
        return
    import pwd

    try:
        name = pwd.getpwuid(uid).pw_name
        os.initgroups(name, gid)
    except KeyError:
        os.setgroups([gid])
    os.setgid(gid)
    os.setuid(uid)


def full_process_titles() -> Callable[[str], None] | None:
    """A function that sets the whole title ``ps`` shows (setproctitle's), or None when
    only the kernel's 15-byte task name can be set."""
    try:
        import setproctitle
    except ImportError:
        return None
    return setproctitle.setproctitle


def set_process_title(title: str) -> None:
    """Show ``title`` in ``ps``: setproctitle when installed, else the kernel's task name."""
    try:
        import setproctitle

        setproctitle.setproctitle(title)
        return
    except ImportError:
        pass
    # The task name (comm) is what `ps -o comm`, top and pgrep show; the kernel keeps 15 bytes.
    with contextlib.suppress(OSError):
        with open(f"/proc/{os.getpid()}/comm", "w") as f:
            f.write(title[:15])
