"""Security: what a worker holds, the files a server creates, and privilege dropping.

- Workers hold no descriptor they do not need, read from ``/proc/<pid>/fd`` and
  ``fdinfo``: their standard streams (the master's), the master's log files (write-only),
  the listening socket, the read end of the master-death pipe, the scoreboard's mapping,
  and pipes and an epoll set of their own (both ends of each pipe). Not the master's
  signal pipe, not the write end of the death pipe (a worker holding it would never see
  the master die), not a daemon launcher's report pipe, not a client's socket once the
  connection is over. In the foreground, as a daemon, and after a USR2 upgrade (nothing
  of the old master's but the listening socket).
- The pid file is 0644 whatever the umask and is written by rename, so a symlink planted
  at its path is replaced, never followed; a Unix socket is 0660 (only its owner and group
  may connect) whatever the umask.
- ``--user nobody``: each worker runs as nobody (real, effective, saved and filesystem
  ids, supplementary groups, no capabilities) before it handles a request, as the handler
  itself reports; the master stays root to bind and to manage the workers.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, children, is_alive, wait_for, wait_workers

from prefork_server.scoreboard import read_scoreboard

from .common import CLI, ECHO, ask, fds, proc_status, quit_and_wait, report, start_echo

pytestmark = pytest.mark.stress

needs_root = pytest.mark.skipif(os.getuid() != 0, reason="dropping privileges needs root")


class Fd:
    """One open descriptor: what it is (readlink), which object (inode), its access mode."""

    def __init__(self, pid: int, fd: int) -> None:
        self.fd = fd
        self.target = os.readlink(f"/proc/{pid}/fd/{fd}")
        st = os.stat(f"/proc/{pid}/fd/{fd}")
        self.object = (st.st_dev, st.st_ino)
        info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        flags = re.search(r"flags:\s*([0-7]+)", info)
        assert flags, info
        self.mode = int(flags.group(1), 8) & os.O_ACCMODE

    @property
    def kind(self) -> str:
        if self.target.startswith(("pipe:", "socket:", "anon_inode:")):
            return self.target.split(":")[0] if "[" in self.target else self.target
        if self.target.startswith("/memfd:"):
            return "memfd"
        return "file"

    def __repr__(self) -> str:
        return f"{self.fd}->{self.target}({'rw' if self.mode == os.O_RDWR else 'rw'[self.mode]})"


def table(pid: int) -> dict[int, Fd]:
    out = {}
    for entry in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(entry)] = Fd(pid, int(entry))
        except FileNotFoundError:
            pass
    return out


def pipes_held_whole(fds: dict[int, Fd]) -> set[tuple[int, int]]:
    """The pipes of which this table holds both the read and the write end."""
    ends: dict[tuple[int, int], set[int]] = {}
    for fd in fds.values():
        if fd.kind == "pipe":
            ends.setdefault(fd.object, set()).add(fd.mode)
    return {obj for obj, modes in ends.items() if {os.O_RDONLY, os.O_WRONLY} <= modes}


def unneeded(worker: int, master: int) -> list[str]:
    """What ``worker`` holds that it does not need, judged against its ``master``."""
    w, m = table(worker), table(master)
    problems = []
    listeners = {fd.object for fd in m.values() if fd.kind == "socket"}
    master_pipes = {fd.object for fd in m.values() if fd.kind == "pipe"}
    master_logs = {fd.object for fd in m.values() if fd.kind == "file" and fd.mode == os.O_WRONLY}
    own_pipes = pipes_held_whole(w) - master_pipes
    shared_pipes = set()
    memfds = 0
    for n, fd in w.items():
        if n in (0, 1, 2):
            if n not in m or m[n].object != fd.object:
                problems.append(f"{fd}: not the master's standard stream")
        elif fd.kind == "socket":
            if fd.object not in listeners:
                problems.append(f"{fd}: a socket that is not a listener")
        elif fd.kind == "pipe":
            if fd.object in master_pipes:
                shared_pipes.add(fd.object)
                if fd.mode != os.O_RDONLY:
                    problems.append(f"{fd}: the write end of a master's pipe")
            elif fd.object not in own_pipes:
                problems.append(f"{fd}: one end of a pipe that is neither ours nor the master's")
        elif fd.kind == "memfd":
            memfds += 1
        elif fd.kind == "file" and fd.mode == os.O_WRONLY and fd.object in master_logs:
            pass  # a log file: the logger writes to it in each worker
        elif fd.target != "anon_inode:[eventpoll]":
            problems.append(f"{fd}: unexpected")
    if len(shared_pipes) != 1:
        problems.append(f"holds {len(shared_pipes)} of the master's pipes, not 1 (its death pipe)")
    if memfds > 1:
        problems.append(f"{memfds} scoreboard descriptors (its mapping needs one)")
    return problems


def master_problems(master: int) -> list[str]:
    """A master holds its pipes whole (a lone end would be somebody else's, such as a
    daemon launcher's report pipe) and one listening socket."""
    m = table(master)
    whole = pipes_held_whole(m)
    problems = [f"{fd}: a lone pipe end" for fd in m.values()
                if fd.kind == "pipe" and fd.object not in whole]  # fmt: skip
    sockets = [fd for fd in m.values() if fd.kind == "socket"]
    if len(sockets) != 1:
        problems.append(f"sockets: {sockets}")
    return problems


def wait_idle(master: int, workers: list[int]) -> None:
    """Wait until no worker holds a client's socket any more (the client has closed; the
    handler may still be returning)."""
    listener = {fd.object for fd in table(master).values() if fd.kind == "socket"}

    def idle() -> bool:
        return all(
            {fd.object for fd in table(w).values() if fd.kind == "socket"} == listener
            for w in workers
        )

    wait_for(idle, 5, what="the workers to close their connections")


@pytest.mark.parametrize("mode", ["foreground", "daemon"])
def test_workers_hold_only_the_descriptors_they_need(spawn, tmp_path: Path, mode: str) -> None:
    if mode == "foreground":
        proc, address, workers = start_echo(spawn, workers=2)
        master = proc.pid
    else:
        launcher = spawn([*ECHO, "--bind", "127.0.0.1:0", "--workers", "2", "--daemon",
                          "--pid-file", str(tmp_path / "echo.pid")], cwd=tmp_path)  # fmt: skip
        assert launcher.wait(30) == 0, launcher.output()
        m = launcher.wait_output(r"master pid (\d+) serving on 127\.0\.0\.1:(\d+)")
        master, address = int(m.group(1)), ("127.0.0.1", int(m.group(2)))
        spawn.track(master)
        workers = wait_workers(master, 2)
    # Both have booted (nothing half-imported), and served and finished a few connections.
    wait_for(lambda: sum(v.booted for v in read_scoreboard(master)) == 2, 10,
             what="both workers booted")  # fmt: skip
    for _ in range(20):
        assert ask(address) == b"hello\n"
    wait_idle(master, workers)
    problems = {w: unneeded(w, master) for w in workers}
    problems[master] = master_problems(master)
    report(
        f"security-fds-{mode}",
        workers=len(workers),
        master_fds=len(table(master)),
        worker_fds=len(table(workers[0])),
        unneeded=sum(len(p) for p in problems.values()),
    )
    assert not any(problems.values()), (problems, {w: table(w) for w in [master, *workers]})
    os.kill(master, signal.SIGQUIT)
    wait_for(lambda: not is_alive(master), 20, what="the master to stop")


def test_after_an_upgrade_nothing_of_the_old_master_is_held(spawn, tmp_path: Path) -> None:
    pid_file = tmp_path / "echo.pid"
    old, address, _ = start_echo(spawn, "--pid-file", str(pid_file), workers=2)
    old.signal(signal.SIGUSR2)

    def new_master() -> int | None:
        try:
            pid = int(pid_file.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return pid if pid != old.pid else None

    new = wait_for(new_master, 20, what="the new master")
    spawn.track(new)
    new_workers = wait_workers(new, 2)
    for _ in range(10):
        assert ask(address) == b"hello\n"
    wait_idle(new, new_workers)
    old_fds = table(old.pid)
    old_objects = {fd.object for fd in old_fds.values() if fd.kind in ("pipe", "memfd")}
    problems = master_problems(new)
    for pid in [new, *new_workers]:
        held = [fd for fd in table(pid).values() if fd.object in old_objects]
        problems += [f"{pid} holds the old master's {fd}" for fd in held]
    problems += [f"{w}: {p}" for w in new_workers for p in unneeded(w, new)]
    report("security-fds-after-usr2", new_workers=len(new_workers), unneeded=len(problems))
    assert not problems, problems
    assert quit_and_wait(old) == 0
    os.kill(new, signal.SIGQUIT)
    wait_for(lambda: not is_alive(new), 20, what="the new master to stop")


def with_umask(mask: int, argv: list[str]) -> list[str]:
    """``argv`` run with this umask."""
    setter = f"import os, sys; os.umask({mask:#o}); os.execv(sys.argv[1], sys.argv[1:])"
    return [sys.executable, "-c", setter, *argv]


def test_pid_file_and_unix_socket_permissions(spawn, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    victim.chmod(0o600)
    pid_file = tmp_path / "echo.pid"
    pid_file.symlink_to(victim)  # planted by somebody who hoped we would write through it
    # umask 0: the pid file's mode must not depend on the umask the server started with.
    proc = spawn(with_umask(0, [*ECHO, "--bind", "127.0.0.1:0", "--workers", "1",
                                "--pid-file", str(pid_file)]), cwd=REPO)  # fmt: skip
    proc.port()
    wait_workers(proc.pid, 1)
    pid_stat = pid_file.lstat()
    modes = {}
    for mask in (0o022, 0):
        path = tmp_path / f"echo{mask:o}.sock"
        unix = spawn(with_umask(mask, [*ECHO, "--bind", f"unix:{path}", "--workers", "1"]),
                     cwd=REPO)  # fmt: skip
        unix.wait_output("listening on unix:")
        modes[mask] = path.lstat()
        assert ask(str(path)) == b"hello\n"
        assert quit_and_wait(unix) == 0
    report(
        "security-file-modes",
        pid_file_umask_0=oct(stat.S_IMODE(pid_stat.st_mode)),
        unix_socket_umask_022=oct(stat.S_IMODE(modes[0o022].st_mode)),
        unix_socket_umask_0=oct(stat.S_IMODE(modes[0].st_mode)),
        planted_symlink="replaced" if stat.S_ISREG(pid_stat.st_mode) else "followed",
    )
    assert victim.read_text() == "precious\n" and stat.S_IMODE(victim.stat().st_mode) == 0o600
    assert stat.S_ISREG(pid_stat.st_mode), "the symlink was replaced, not followed"
    assert pid_file.read_text() == f"{proc.pid}\n"
    assert stat.S_IMODE(pid_stat.st_mode) == 0o644 and pid_stat.st_uid == os.getuid()
    for mode in modes.values():
        assert stat.S_ISSOCK(mode.st_mode)
        assert stat.S_IMODE(mode.st_mode) == 0o660, "owner and group only, whatever the umask"
    assert quit_and_wait(proc) == 0


WHOAMI = """\
import os
import socketserver


class WhoAmI(socketserver.BaseRequestHandler):
    \"\"\"Answers with the ids the handler runs with.\"\"\"

    def handle(self):
        self.request.recv(64)
        ids = (os.getresuid(), os.getresgid(), sorted(os.getgroups()))
        self.request.sendall(repr(ids).encode())
"""


@needs_root
def test_workers_drop_privileges_before_any_request(spawn, tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    uid, gid = nobody.pw_uid, nobody.pw_gid
    groups = sorted(os.getgrouplist("nobody", gid))
    (tmp_path / "whoami.py").write_text(WHOAMI)
    # --preload: tmp_path is not readable by nobody, so the master imports the handler.
    proc = spawn([*CLI, "--bind", "127.0.0.1:0", "--workers", "2", "--user", "nobody",
                  "--preload", "whoami:WhoAmI"])  # fmt: skip
    address = ("127.0.0.1", proc.port())
    workers = wait_workers(proc.pid, 2)
    answers = set()
    for _ in range(20):  # the first request of each worker among them
        with socket.create_connection(address, timeout=10) as s:
            s.sendall(b"who?")
            answers.add(s.recv(256).decode())
    expected = repr(((uid,) * 3, (gid,) * 3, groups))
    for pid in workers:  # one of them may not have served yet, nor finished dropping
        wait_for(lambda: proc_status(pid)["Uid"].split() == [str(uid)] * 4,  # noqa: B023
                 5, what=f"worker {pid} to run as nobody")  # fmt: skip
    statuses = {pid: proc_status(pid) for pid in workers}
    master = proc_status(proc.pid)
    report(
        "security-privilege-drop",
        workers=len(workers),
        handler_sees=answers.pop() if len(answers) == 1 else answers,
        worker_uid=statuses[workers[0]]["Uid"].replace("\t", ","),
        worker_capeff=statuses[workers[0]]["CapEff"],
        master_uid=master["Uid"].split()[0],
    )
    assert answers <= {expected}, (answers, expected)
    for status in statuses.values():
        assert status["Uid"].split() == [str(uid)] * 4, status["Uid"]
        assert status["Gid"].split() == [str(gid)] * 4, status["Gid"]
        assert sorted(int(g) for g in status["Groups"].split()) == groups, status["Groups"]
        assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0, status
    assert master["Uid"].split()[0] == "0", "the master keeps its privileges"
    assert quit_and_wait(proc) == 0


@needs_root
def test_the_echo_example_imported_by_workers_as_nobody(spawn) -> None:
    """Without --preload each worker imports the handler after the drop, as nobody."""
    proc, address, workers = start_echo(spawn, "--user", "nobody", workers=2)
    assert ask(address) == b"hello\n"
    nobody = str(pwd.getpwnam("nobody").pw_uid)
    for pid in workers:  # a worker drops its privileges right after the fork: just after
        wait_for(lambda: proc_status(pid)["Uid"].split() == [nobody] * 4,  # noqa: B023
                 5, what=f"worker {pid} to run as nobody")  # fmt: skip
    assert quit_and_wait(proc) == 0


@pytest.fixture
def log_dir() -> Iterator[Path]:
    """A log directory the workers' user can reach, as /var/log/app is (pytest's own
    temporary directories are root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="prefork-log-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@needs_root
def test_usr1_after_a_privilege_drop_keeps_the_workers_and_their_log(spawn, log_dir: Path) -> None:
    tmp_path = log_dir
    log = tmp_path / "echo.log"
    proc = spawn([*ECHO, "--bind", "127.0.0.1:0", "--workers", "2", "--user", "nobody",
                  "--log-file", str(log)], cwd=REPO)  # fmt: skip
    port = wait_for(lambda: log.exists() and re.search(r"listening on \S+:(\d+)", log.read_text()),
                    what="the log's listening line")  # fmt: skip
    address = ("127.0.0.1", int(port.group(1)))
    workers = wait_workers(proc.pid, 2)
    with socket.create_connection(address, timeout=10) as client:
        client.sendall(b"before")
        assert client.recv(6) == b"before"
        log.rename(tmp_path / "echo.log.1")  # as logrotate does
        proc.signal(signal.SIGUSR1)
        wait_for(log.exists, what="the master to reopen the log")
        # Each worker reopens at its next heartbeat (at most timeout / 2 = 2.5 s away); an
        # idle worker's next heartbeat is its poll timeout. Wait for both.
        wait_for(lambda: _reopened_or_gone(workers), 10, 0.05, "the workers' reopen")
        client.sendall(b"after")
        answer = client.recv(5)
    report(
        "security-usr1-after-drop",
        workers_kept=children(proc.pid) == workers,
        answer_after=answer.decode() or "-",
    )
    out = log.read_text() + proc.output()
    assert children(proc.pid) == workers, out
    assert answer == b"after", out
    assert "Traceback" not in out and "Logging error" not in out, out
    assert quit_and_wait(proc) == 0


def _reopened_or_gone(workers: list[int]) -> bool:
    """True once every worker has either dropped the rotated log or exited."""
    for pid in workers:
        if is_alive(pid) and any(t.endswith("echo.log.1") for t in fds(pid).values()):
            return False
    return True


STOPPER = """\
import socketserver


class Stopper(socketserver.BaseRequestHandler):
    \"\"\"Stops the whole server from inside a request, as the README says a handler may.\"\"\"

    def handle(self):
        self.request.recv(16)
        self.server.shutdown()
        self.request.sendall(b"stopping")
"""


@needs_root
def test_shutdown_from_a_handler_after_a_privilege_drop_stops_the_server(
    spawn, tmp_path: Path
) -> None:
    (tmp_path / "stopper.py").write_text(STOPPER)
    # --preload: tmp_path is not readable by nobody, so the master imports the handler.
    proc = spawn([*CLI, "--bind", "127.0.0.1:0", "--workers", "1", "--user", "nobody",
                  "--preload", "stopper:Stopper"])  # fmt: skip
    address = ("127.0.0.1", proc.port())
    (worker,) = wait_workers(proc.pid, 1)
    wait_for(lambda: proc_status(worker)["Uid"].split()[0] != "0", 5, what="the drop")
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(b"stop")
        answer = s.recv(16)
    status: int | str = "not asked"
    if answer == b"stopping":  # else the request failed: no use waiting for the master
        try:
            status = proc.wait(10)
        except subprocess.TimeoutExpired:
            status = "still running"
    report("security-shutdown-after-drop", answer=answer.decode() or "-", master=status)
    assert answer == b"stopping", proc.output()
    assert status == 0, proc.output()
