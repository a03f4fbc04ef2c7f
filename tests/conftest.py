"""Shared tools for black-box tests: real masters in their own sessions, always reaped.

Every process a test starts goes through the ``spawn`` fixture. At teardown, pass or fail,
each master's whole process tree is killed by pid (its descendants found through /proc)
and reaped, so no test leaves a process, a pid file or a socket behind.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent


def wait_for(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def run_clients(
    client: Callable[[int], None],
    count: int,
    barrier: threading.Barrier,
    what: str,
    join_timeout: float = 30.0,
) -> None:
    """Run ``client(i)`` for i in range(count), each in a daemon thread, and take part in
    ``barrier`` (made for count + 1 parties) from this thread: the test fails with
    ``what`` if it breaks. Then wait for the threads."""
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pytest.fail(what)
    for t in threads:
        t.join(join_timeout)


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process, or None if it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = data[data.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def is_alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie."""
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def children(pid: int) -> list[int]:
    """Live (non-zombie) children of ``pid``, sorted."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None and st[1] == pid and st[0] not in ("Z", "X"):
                out.append(int(entry))
    return sorted(out)


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def wait_workers(master: int, count: int, timeout: float = 10.0) -> list[int]:
    """Wait until ``master`` has exactly ``count`` live children; return their pids."""

    def exactly() -> list[int] | None:
        kids = children(master)
        return kids if len(kids) == count else None

    if count == 0:
        wait_for(lambda: not children(master), timeout, what=f"no workers of {master}")
        return []
    return wait_for(exactly, timeout, what=f"{count} workers of {master}")  # type: ignore[no-any-return]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A started master (or launcher) process and where its output goes."""

    def __init__(self, popen: subprocess.Popen[bytes], log: Path) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.log = log

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_output(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Wait for ``pattern`` (a regex) to appear in the output; return the match."""
        return wait_for(  # type: ignore[no-any-return]
            lambda: re.search(pattern, self.output()), timeout, what=f"{pattern!r} in output"
        )

    def port(self, timeout: float = 10.0) -> int:
        """The port from a ``listening on HOST:PORT`` or ``PORT=N`` line."""
        m = self.wait_output(r"(?:listening on \S*:|PORT=)(\d+)", timeout)
        return int(m.group(1))

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float = 10.0) -> int:
        return self.popen.wait(timeout)

    def workers(self) -> list[int]:
        return children(self.pid)


def kill_tree(pid: int) -> list[int]:
    """SIGKILL ``pid`` and every descendant, by pid; return the pids signalled."""
    tree = [pid, *descendants(pid)]
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return tree


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    """``spawn(code_or_argv, *args)``: start a Python program in its own session.

    A string is run as ``python -c code args...``; a list is run as it is. stdout and
    stderr go to one file, readable with ``Proc.output()``. The working directory is the
    test's ``tmp_path`` and the repository is on PYTHONPATH.
    """
    started: list[Proc] = []
    extra: list[int] = []

    def _spawn(
        program: str | list[str],
        *args: str,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        pass_fds: tuple[int, ...] = (),
    ) -> Proc:
        argv = [sys.executable, "-c", program, *args] if isinstance(program, str) else program
        log = tmp_path / f"proc{len(started)}.out"
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        full_env.pop("NOTIFY_SOCKET", None)
        full_env.update(env or {})
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd or tmp_path,
                env=full_env,
                start_new_session=True,
                pass_fds=pass_fds,
            )
        proc = Proc(popen, log)
        started.append(proc)
        return proc

    _spawn.track = extra.append  # type: ignore[attr-defined]
    yield _spawn
    killed: list[int] = []
    for pid in [p.pid for p in started] + extra:
        killed += kill_tree(pid)
    for proc in started:
        try:
            proc.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass
    wait_for(lambda: not any(is_alive(p) for p in killed), 5, what=f"{killed} to be gone")
