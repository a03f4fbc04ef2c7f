"""Black-box tests of the command line: ``prefork-server`` and ``python -m examples.echo``,
started as real processes from the repository root, talked to over real sockets."""

from __future__ import annotations

import os
import random
import re
import select
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import REPO, Proc, is_alive, wait_for, wait_workers

CLI = [sys.executable, "-m", "prefork_server.cli"]
ECHO = [sys.executable, "-m", "examples.echo"]
SCRIPT = Path(sys.executable).parent / "prefork-server"  # the installed console script

OPTIONS = ["--bind", "--workers", "--timeout", "--graceful-timeout", "--name", "--pid-file",
           "--daemon", "--log-file", "--log-level", "--help", "--config", "--graceful-term",
           "--max-requests", "--max-requests-jitter", "--min-spare-workers",
           "--max-spare-workers", "--max-workers", "--user", "--group", "--preload",
           "--socket-mode"]  # fmt: skip
SIGNALS = ["QUIT", "TERM", "INT", "WINCH", "TTIN", "TTOU", "USR1", "HUP", "USR2"]


@pytest.fixture
def run(spawn: Callable[..., Proc]) -> Callable[..., Proc]:
    """``run(argv)``: start a command with the repository root as working directory."""

    def _run(argv: list[str]) -> Proc:
        return spawn(argv, cwd=REPO)

    return _run


def recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def echo_session(address: tuple[str, int], payloads: list[bytes]) -> list[bytes]:
    """Send each payload on one connection and read its echo (the sending runs in a
    thread, so a large payload cannot deadlock against its own echo)."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    echoed = []
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(address)
        for payload in payloads:
            sender = threading.Thread(target=s.sendall, args=(payload,))
            sender.start()
            try:
                echoed.append(recv_exactly(s, len(payload)))
            finally:
                sender.join()
        s.shutdown(socket.SHUT_WR)
        assert s.recv(1) == b"", "the server closes once we have"
    return echoed


def check_echo(address: tuple[str, int], clients: int, seed: int) -> None:
    """``clients`` concurrent clients, each with several payloads up to 200 KB."""
    rng = random.Random(seed)
    sessions = []
    for _ in range(clients):
        sizes = [1, rng.randrange(2, 4096), rng.randrange(4096, 200_000), 200_000]
        rng.shuffle(sizes)
        sessions.append([rng.randbytes(n) for n in sizes])
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda p: echo_session(address, p), sessions))
    for sent, echoed in zip(sessions, results, strict=True):
        assert [len(e) for e in echoed] == [len(p) for p in sent]
        assert echoed == sent


def quit_cleanly(proc: Proc) -> str:
    proc.signal(signal.SIGQUIT)
    assert proc.wait() == 0
    out = proc.output()
    assert "Traceback" not in out and " ERROR " not in out, out
    return out


# -- serving ------------------------------------------------------------------------------


def test_the_echo_example_under_more_clients_than_workers(run) -> None:
    proc = run([*ECHO, "--bind", "127.0.0.1:0", "--workers", "2"])
    port = proc.port()
    workers = wait_workers(proc.pid, 2)
    check_echo(("127.0.0.1", port), clients=20, seed=3)
    assert proc.workers() == workers, "no worker died or was replaced"
    out = quit_cleanly(proc)
    assert "prefork_server.echo[" in out, "the example's app name is in its log lines"


@pytest.mark.skipif(not SCRIPT.exists(), reason="the console script is not installed")
def test_the_console_script_serves_a_handler_by_name(run) -> None:
    proc = run([str(SCRIPT), "--bind", "127.0.0.1:0", "--workers", "2",
                "examples.echo:EchoHandler"])  # fmt: skip
    port = proc.port()
    check_echo(("127.0.0.1", port), clients=5, seed=4)
    quit_cleanly(proc)


def test_name_sets_the_app_name_of_the_echo_example(run) -> None:
    proc = run([*ECHO, "--bind", "127.0.0.1:0", "--workers", "1", "--name", "myecho"])
    port = proc.port()
    check_echo(("127.0.0.1", port), clients=1, seed=5)
    out = quit_cleanly(proc)
    assert "prefork_server.myecho[" in out


def test_an_idle_echo_client_outlives_the_timeout_and_quit_ends_it(run) -> None:
    timeout = 0.5
    proc = run([*ECHO, "--bind", "127.0.0.1:0", "--workers", "1", "--timeout", str(timeout),
                "--graceful-timeout", "5"])  # fmt: skip
    port = proc.port()
    (worker,) = wait_workers(proc.pid, 1)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"hello")
        assert recv_exactly(s, 5) == b"hello"
        idle_until = time.monotonic() + 3 * timeout  # silent for longer than the timeout
        wait_for(lambda: proc.workers() != [worker] or time.monotonic() >= idle_until,
                 timeout=10, what="the idle period")  # fmt: skip
        assert proc.workers() == [worker], proc.output()
        s.sendall(b"still there")
        assert recv_exactly(s, 11) == b"still there"
        quit_at = time.monotonic()
        proc.signal(signal.SIGQUIT)
        assert s.recv(1) == b"", "QUIT ends the idle connection"
        assert proc.wait() == 0
        assert time.monotonic() - quit_at < 2.5, "no wait for the graceful timeout (5 s)"
    out = proc.output()
    assert "missed its heartbeat" not in out and "deadline passed" not in out, out


def impatient_echo(spawn, tmp_path: Path) -> tuple[Proc, int, int]:
    """One echo worker whose handler drops a client after 0.5 s: (proc, port, worker)."""
    (tmp_path / "shortecho.py").write_text(
        "from examples.echo import EchoHandler\n\n\n"
        "class Impatient(EchoHandler):\n    request_timeout = 0.5\n"
    )
    # A module in the working directory, as `python -m` would find it.
    proc = spawn([*CLI, "--bind", "127.0.0.1:0", "--workers", "1", "--timeout", "5",
                  "shortecho:Impatient"], cwd=tmp_path)  # fmt: skip
    port = proc.port()
    (worker,) = wait_workers(proc.pid, 1)
    return proc, port, worker


def test_request_timeout_drops_a_silent_echo_client(spawn, tmp_path: Path) -> None:
    proc, port, worker = impatient_echo(spawn, tmp_path)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"ping")
        assert recv_exactly(s, 4) == b"ping"
        silent_from = time.monotonic()
        assert s.recv(1) == b"", "dropped"
        assert 0.4 <= time.monotonic() - silent_from < 3
    assert proc.workers() == [worker]
    quit_cleanly(proc)


def test_request_timeout_drops_an_echo_client_that_never_reads(spawn, tmp_path: Path) -> None:
    proc, port, worker = impatient_echo(spawn, tmp_path)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        # Send and never read: the echo fills both buffers, the worker's send blocks,
        # and after request_timeout the worker gives up on this client.
        s.setblocking(False)
        chunk, sent, deadline = b"x" * 65536, 0, time.monotonic() + 20
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            while time.monotonic() < deadline and sent < 1 << 30:
                try:
                    sent += s.send(chunk)
                except BlockingIOError:
                    select.select([], [s], [], 0.1)
        assert time.monotonic() < deadline
    check_echo(("127.0.0.1", port), clients=2, seed=8)  # the same worker serves on
    assert proc.workers() == [worker]
    assert "Traceback" not in proc.output()
    quit_cleanly(proc)


def test_ipv6_bind(run) -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback (::1)")
    proc = run([*CLI, "--bind", "[::1]:0", "--workers", "2", "examples.echo:EchoHandler"])
    port = int(proc.wait_output(r"listening on \[::1\]:(\d+)").group(1))
    check_echo(("::1", port), clients=3, seed=6)
    quit_cleanly(proc)


def unix_echo(path: Path, data: bytes) -> bytes:
    """Send ``data`` over the Unix socket at ``path``; what comes back, as long."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(data)
        return recv_exactly(s, len(data))


def test_unix_bind_serves_and_removes_the_socket_on_quit(run, tmp_path: Path) -> None:
    path = Path(os.path.relpath(tmp_path / "e.sock", REPO))  # relative to the working dir
    proc = run([*CLI, "--bind", f"unix:{path}", "--workers", "1", "examples.echo:EchoHandler"])
    proc.wait_output(rf"listening on unix:{re.escape(str(path))}")
    full = REPO / path
    assert stat.S_ISSOCK(full.lstat().st_mode)
    assert unix_echo(full, b"over a unix socket") == b"over a unix socket"
    quit_cleanly(proc)
    assert not os.path.lexists(full)


def test_socket_mode_sets_who_may_connect_to_a_unix_socket(run, tmp_path: Path) -> None:
    path = tmp_path / "private.sock"
    proc = run([*CLI, "--bind", f"unix:{path}", "--workers", "1", "--socket-mode", "600",
                "examples.echo:EchoHandler"])  # fmt: skip
    proc.wait_output("listening on unix:")
    assert stat.S_IMODE(path.lstat().st_mode) == 0o600
    assert unix_echo(path, b"mine") == b"mine"
    quit_cleanly(proc)


def test_daemon_serves_in_the_background_until_quit(spawn, tmp_path: Path) -> None:
    pid_file = tmp_path / "echo.pid"
    launcher = spawn([*ECHO, "--bind", "127.0.0.1:0", "--workers", "2", "--daemon",
                      "--pid-file", str(pid_file)])  # fmt: skip
    assert launcher.wait() == 0
    m = launcher.wait_output(r"echo: master pid (\d+) serving on 127\.0\.0\.1:(\d+)")
    master, port = int(m.group(1)), int(m.group(2))
    spawn.track(master)  # type: ignore[attr-defined]
    assert pid_file.read_text().strip() == str(master)
    workers = wait_workers(master, 2)
    check_echo(("127.0.0.1", port), clients=4, seed=7)
    os.kill(master, signal.SIGQUIT)
    wait_for(lambda: not is_alive(master), what="the daemon to exit")
    assert not pid_file.exists()
    assert not any(is_alive(p) for p in workers)
    log = (tmp_path / "echo.log").read_text()  # the daemon's log, in its working directory
    assert f"master {master} stopped" in log and "Traceback" not in log


def test_a_live_pid_file_is_an_error(run, tmp_path: Path) -> None:
    pid_file = tmp_path / "live.pid"
    pid_file.write_text(f"{os.getpid()}\n")  # this test's own process: alive
    proc = run([*ECHO, "--bind", "127.0.0.1:0", "--pid-file", str(pid_file)])
    assert proc.wait() == 1
    assert f"names pid {os.getpid()}, which is running" in proc.output()
    assert "Traceback" not in proc.output()
    assert pid_file.read_text() == f"{os.getpid()}\n"


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bind", "nonsense"], r"bind: 'nonsense' has no port"),
        (["--bind", "127.0.0.1:99999"], r"bind: port 99999 .* out of range"),
        (["--bind", "::1:80"], r"bind: write IPv6 addresses in brackets"),
        (["--workers", "-1"], r"workers must be >= 0, not -1"),
        (["--timeout", "0"], r"timeout must be > 0"),
        (["--graceful-timeout", "-2"], r"graceful_timeout must be >= 0"),
        (["--name", "a/b"], r"app_name must be a non-empty string without '/'"),
        (["--workers", "three"], r"argument --workers/-w: invalid int value: 'three'"),
        (["TARGET=nosuchmodule:X"], r"cannot load 'nosuchmodule:X': No module named"),
        (["TARGET=examples.echo:Nope"], r"cannot load 'examples.echo:Nope'"),
        (["TARGET=examples.echo"], r"target must be module:attribute"),
        (["TARGET=socketserver:TCPServer"], r"is not a socketserver.BaseRequestHandler subclass"),
        (["--socket-mode", "8"], r"--socket-mode: '8' is not an octal mode such as 660"),
        (["--socket-mode", "1777"], r"--socket-mode: '1777' is not a mode from 000 to 777"),
        (["--socket-mode", "600"], r"socket_mode applies to a unix:PATH bind only"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(run, args: list[str], message: str) -> None:
    target = "examples.echo:EchoHandler"
    argv = []
    for arg in args:
        if arg.startswith("TARGET="):
            target = arg[len("TARGET=") :]
        else:
            argv.append(arg)
    if "--bind" not in argv:
        argv += ["--bind", "127.0.0.1:0"]
    proc = run([*CLI, *argv, target])
    assert proc.wait() == 2
    out = proc.output()
    assert re.search(message, out), out
    assert "Traceback" not in out and "listening" not in out


def test_a_regular_file_at_the_unix_path_is_an_error(run, tmp_path: Path) -> None:
    precious = tmp_path / "data"
    precious.write_text("keep me\n")
    proc = run([*CLI, "--bind", f"unix:{precious}", "examples.echo:EchoHandler"])
    assert proc.wait() == 2
    assert re.search(r"exists and is not a socket; not removing it: '.*data'", proc.output())
    assert precious.read_text() == "keep me\n"


def test_a_port_in_use_is_an_error(run) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run([*ECHO, "--bind", f"127.0.0.1:{port}"])
        assert proc.wait() == 2
    assert "Address already in use" in proc.output()
    assert "Traceback" not in proc.output()


@pytest.mark.parametrize("program", [CLI, ECHO], ids=["prefork-server", "examples.echo"])
def test_help_names_every_option_and_signal(run, program: list[str]) -> None:
    proc = run([*program, "--help"])
    assert proc.wait() == 0
    out = proc.output()
    for option in OPTIONS:
        assert re.search(rf"(^|\s){option}\b", out), option
    for name in SIGNALS:
        assert re.search(rf"^\s+(\w+, )?{name}\b", out, re.MULTILINE), name
    if program is CLI:
        assert "module:HandlerClass" in out
