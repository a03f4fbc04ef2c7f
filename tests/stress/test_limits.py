"""Scenario 8, what a second start cannot take from a running server: its port, its pid
file, its Unix socket; nor can a start with an unwritable log or pid path or with invalid
options do any harm. Each attempt fails with a clear message and a non-zero exit status,
and after each one the running servers have the same master and workers, the same pid
file, and still answer."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import pytest
from conftest import REPO, children

from .common import ECHO, ask, quit_and_wait, report, start_echo

pytestmark = pytest.mark.stress


def test_a_second_start_fails_clearly_and_leaves_the_running_server_alone(
    spawn, tmp_path: Path
) -> None:
    pid_file = tmp_path / "echo.pid"
    sock_path = tmp_path / "echo.sock"
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")
    proc, address, workers = start_echo(spawn, "--pid-file", str(pid_file), workers=2)
    unix, _, unix_workers = start_echo(spawn, workers=1, bind=f"unix:{sock_path}")
    port = address[1]
    pid_text = pid_file.read_text()
    free = "127.0.0.1:0"
    cases = [
        # (name, arguments, exit status, message)
        ("port-in-use", ["--bind", f"127.0.0.1:{port}"], 2, r"Address already in use"),
        ("port-in-use-all-interfaces", ["--bind", f":{port}"], 2, r"Address already in use"),
        ("unix-socket-in-use", ["--bind", f"unix:{sock_path}"], 2,
         r"a running server is listening on this socket"),
        ("live-pid-file", ["--bind", free, "--pid-file", str(pid_file)], 1,
         rf"names pid {proc.pid}, which is running"),
        ("unwritable-log", ["--bind", free, "--log-file", f"{not_a_dir}/x.log"], 2,
         r"Not a directory: .*x\.log"),
        ("log-is-a-directory", ["--bind", free, "--log-file", str(tmp_path)], 2,
         r"Is a directory"),
        ("bad-workers", ["--bind", free, "--workers", "-1"], 2, r"workers must be >= 0"),
        ("bad-timeout", ["--bind", free, "--timeout", "0"], 2, r"timeout must be > 0"),
        ("bad-bind", ["--bind", "nonsense"], 2, r"bind: 'nonsense' has no port"),
        ("bad-user", ["--bind", free, "--user", "no-such-user-here"], 2,
         r"user 'no-such-user-here' does not exist"),
        ("unknown-option", ["--bind", free, "--wrokers", "2"], 2, r"unrecognized arguments"),
    ]  # fmt: skip
    outcomes = []
    problems = []
    for name, args, status, message in cases:
        start = time.monotonic()
        attempt = spawn([*ECHO, *args], cwd=REPO)
        code = attempt.wait(30)
        took = time.monotonic() - start
        out = attempt.output()
        outcomes.append(f"{name}:{code}")
        if code != status:
            problems.append(f"{name}: exit status {code}, expected {status}: {out}")
        if not re.search(message, out):
            problems.append(f"{name}: no /{message}/ in: {out}")
        if "Traceback" in out:
            problems.append(f"{name}: a traceback instead of a message: {out}")
        if took > 10:
            problems.append(f"{name}: took {took:.1f}s to fail")
        # The running servers are untouched.
        if children(proc.pid) != workers or children(unix.pid) != unix_workers:
            problems.append(f"{name}: the running servers' workers changed")
        if pid_file.read_text() != pid_text:
            problems.append(f"{name}: the pid file changed")
        if ask(address) != b"hello\n" or ask(str(sock_path)) != b"hello\n":
            problems.append(f"{name}: a running server stopped answering")
    report("8-second-start", attempts=len(cases), exit_statuses=",".join(outcomes))
    assert not problems, "\n".join(problems)
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock_path))  # the socket file is still the running server's
    for server in (proc, unix):
        assert quit_and_wait(server) == 0
    assert not pid_file.exists() and not sock_path.exists()


@pytest.mark.parametrize("where", ["under-a-file", "a-directory"])
def test_an_unusable_pid_file_path_is_a_clear_error(spawn, tmp_path: Path, where: str) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    path = a_file / "x.pid" if where == "under-a-file" else tmp_path
    attempt = spawn([*ECHO, "--bind", "127.0.0.1:0", "--pid-file", str(path)], cwd=REPO)
    code = attempt.wait(30)
    out = attempt.output()
    report(f"8-pid-file-{where}", exit_status=code, traceback="Traceback" in out)
    assert code != 0
    assert re.search(r"pid file .*(Not a directory|Is a directory)", out), out
    assert "Traceback" not in out, out
