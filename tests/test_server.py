"""Black-box tests of PreforkTCPServer and PreforkUnixStreamServer: real masters, workers,
sockets and signals. The servers run in tests/programs/server_app.py (see its docstring
for the handlers); the option checks and the context manager run in-process, since they
fork nothing."""

from __future__ import annotations

import errno
import http.client
import logging
import os
import random
import re
import signal
import socket
import socketserver
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, Proc, is_alive, wait_for, wait_workers

from prefork_server import PreforkTCPServer, PreforkUnixStreamServer

APP = str(REPO / "tests" / "programs" / "server_app.py")

Address = Any  # a port on 127.0.0.1, a (host, port) tuple, or a Unix socket path


@pytest.fixture
def app(spawn: Callable[..., Proc]) -> Callable[..., Proc]:
    """``app(*args)``: start server_app.py with these arguments."""

    def _app(*args: str) -> Proc:
        return spawn([sys.executable, APP, *args])

    return _app


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[Path]:
    """A Unix socket path short enough for sun_path (108 bytes)."""
    path = tmp_path / "s.sock"
    if len(os.fsencode(path)) < 100:
        yield path
        return
    short = Path(tempfile.mkdtemp(prefix="pf", dir="/tmp"))
    yield short / "s.sock"
    for entry in short.iterdir():
        entry.unlink()
    short.rmdir()


def connect(address: Address, timeout: float = 10.0) -> socket.socket:
    if isinstance(address, int):
        address = ("127.0.0.1", address)
    if isinstance(address, (str, Path)):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address = os.fspath(address)
    else:
        s = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
    s.settimeout(timeout)
    try:
        s.connect(address)
    except BaseException:
        s.close()
        raise
    return s


def recv_all(s: socket.socket) -> bytes:
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def exchange(address: Address, payload: bytes) -> bytes:
    """Send ``payload`` (from a thread, so that a large echo cannot deadlock), close our
    side, and return everything the server sends until it closes."""
    with connect(address) as s:
        sender = threading.Thread(target=lambda: (s.sendall(payload), s.shutdown(socket.SHUT_WR)))
        sender.start()
        try:
            return recv_all(s)
        finally:
            sender.join()


def ask(address: Address, command: str) -> str:
    """One command to the ``ctl`` handler; its whole answer."""
    return exchange(address, f"{command}\n".encode()).decode()


def ask_pid(address: Address) -> int:
    return int(ask(address, "pid"))


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


# -- 1. handlers from the standard library ------------------------------------------------


def test_simple_http_request_handler_serves_files(app, tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    rng = random.Random(1)
    files = {
        f"f{i}.bin": rng.randbytes(rng.choice([0, 1, 1000, 70_000, 300_000])) for i in range(6)
    }
    for name, data in files.items():
        (www / name).write_bytes(data)
    proc = app("--server", "http", "--handler", "http", "--dir", str(www), "--workers", "2")
    port = proc.port()

    def fetch(name: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", f"/{name}")
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    names = sorted(files) * 2  # twelve requests for two workers
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(fetch, names))
    assert [status for status, _ in results] == [200] * len(names)
    assert [body for _, body in results] == [files[name] for name in names]
    assert fetch("missing.txt")[0] == 404
    assert re.search(r'"GET /f0\.bin HTTP/1\.1" 200', proc.output())  # the handler's own log
    assert len(wait_workers(proc.pid, 2)) == 2, "no worker died along the way"
    proc.signal(signal.SIGQUIT)
    assert proc.wait() == 0
    assert "Traceback" not in proc.output()


def test_stream_request_handler_echoes_lines(app) -> None:
    proc = app("--handler", "lines", "--workers", "2")
    port = proc.port()
    rng = random.Random(2)
    for n in range(6):
        lines = [rng.randbytes(rng.randrange(0, 2000)).replace(b"\n", b"") + b"\n"
                 for _ in range(20)]  # fmt: skip
        lines.append(b"z" * 100_000 + b"\n")
        payload = b"".join(lines)
        if n % 2:
            payload += b"no newline at the end"
        assert exchange(port, payload) == payload
    proc.signal(signal.SIGQUIT)
    assert proc.wait() == 0
    assert "Traceback" not in proc.output()


def test_threading_mixin_handlers_finish_on_quit(app) -> None:
    """ThreadingMixIn runs handlers in threads inside each worker; a graceful stop waits
    for them as it waits for a synchronous handler."""
    proc = app("--server", "threading", "--workers", "1")
    port = proc.port()
    with connect(port) as s:
        s.sendall(b"sleep 0.7 50000\n")
        f = s.makefile("rb")
        pid = int(f.readline().split()[1])
        assert ask_pid(port) == pid, "a second connection is served while the first sleeps"
        proc.signal(signal.SIGQUIT)
        rest = f.read()
    assert rest == f"slept {pid}\n".encode() + b"x" * 50_000
    assert proc.wait() == 0
    assert "DONE children=0" in proc.output()


# -- 3. handler errors and vanishing clients -----------------------------------------------


def test_a_handler_that_raises_is_logged_and_the_worker_serves_on(app) -> None:
    proc = app("--workers", "1")
    port = proc.port()
    pid = ask_pid(port)
    assert ask(port, "raise") == "", "the failed connection is closed without an answer"
    out = proc.wait_output(r"RuntimeError: boom in the handler").string
    assert re.search(r"ERROR error handling a request from 127\.0\.0\.1:\d+\nTraceback", out)
    assert ask_pid(port) == pid
    assert proc.workers() == [pid]
    assert "exited" not in proc.output()


def test_a_client_reset_mid_response_is_not_a_traceback(app) -> None:
    proc = app("--workers", "1", "--debug")
    port = proc.port()
    pid = ask_pid(port)
    s = connect(port)
    s.sendall(b"stream\n")
    got = 0
    while got < 200_000:  # the handler is writing: now reset the connection
        got += len(s.recv(65536))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")  # l_onoff 1, 0 s
    s.close()
    assert ask_pid(port) == pid  # one worker: the streaming handler has ended
    out = proc.wait_output(r"went away").string
    assert re.search(r"DEBUG client 127\.0\.0\.1:\d+ went away: \[Errno (32|104)\]", out), out
    assert "Traceback" not in out and "ERROR" not in out


# -- 4. the heartbeat ---------------------------------------------------------------------


def test_a_stuck_handler_is_killed_while_the_other_worker_serves(app) -> None:
    timeout = 1.0
    proc = app("--workers", "2", "--timeout", str(timeout))
    port = proc.port()
    workers = wait_workers(proc.pid, 2)
    stuck_conn = connect(port)
    stuck_conn.sendall(b"stuck\n")
    stuck = int(stuck_conn.makefile("rb").readline().split()[1])
    stuck_at = time.monotonic()
    (other,) = set(workers) - {stuck}
    answers = []  # meanwhile, the other worker answers
    while time.monotonic() - stuck_at < timeout / 2 or not answers:
        answers.append(ask_pid(port))
    assert set(answers) == {other}
    assert len(answers) >= 3, "answered at once, not after the stuck one was replaced"
    proc.wait_output(rf"worker\[\d\] \(pid {stuck}\) missed its heartbeat", timeout=timeout + 5)
    wait_for(lambda: not is_alive(stuck), timeout=5, what="the stuck worker to die")
    assert timeout * 0.9 <= time.monotonic() - stuck_at <= timeout + 3
    assert stuck_conn.recv(10) == b"", "its connection dies with it"
    stuck_conn.close()
    replacements = wait_workers(proc.pid, 2)
    (new,) = set(replacements) - {other}
    assert new != stuck
    # Two connections held at once take both workers: the new one serves too. (An idle
    # worker is woken by EPOLLEXCLUSIVE in no fixed order, so one at a time may not.)
    held = [connect(port), connect(port)]
    for conn in held:
        conn.sendall(b"sleep 0.5 0\n")
    serving = {int(conn.makefile("rb").readline().split()[1]) for conn in held}
    assert serving == {other, new}
    for conn in held:
        conn.close()
    proc.signal(signal.SIGQUIT)
    assert proc.wait() == 0


# -- 5. Unix sockets ----------------------------------------------------------------------


def test_unix_server_serves_and_removes_its_socket_on_quit(app, sock_path: Path) -> None:
    proc = app("--server", "unix", "--bind", str(sock_path), "--workers", "2")
    proc.wait_output(r"PATH=")
    assert stat.S_ISSOCK(sock_path.lstat().st_mode)
    pids = {ask_pid(sock_path) for _ in range(6)}
    assert pids <= set(wait_workers(proc.pid, 2))
    assert re.fullmatch(r"sleeping (\d+)\nslept \1\nxxx", ask(sock_path, "sleep 0 3"))
    assert ask(sock_path, "raise") == ""
    proc.wait_output(r"error handling a request from a local client\nTraceback")
    proc.signal(signal.SIGQUIT)
    assert proc.wait() == 0
    assert not os.path.lexists(sock_path)


def test_unix_server_replaces_a_stale_socket_file(app, sock_path: Path) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sock_path))
    dead.listen()
    dead.close()  # a server that died without unlinking its socket
    assert stat.S_ISSOCK(sock_path.lstat().st_mode)
    with pytest.raises(ConnectionRefusedError):
        connect(sock_path)
    proc = app("--server", "unix", "--bind", str(sock_path), "--workers", "1")
    proc.wait_output(r"PATH=")
    assert ask_pid(sock_path) in proc.workers()
    proc.signal(signal.SIGQUIT)
    assert proc.wait() == 0


def test_unix_server_refuses_to_replace_a_regular_file(sock_path: Path) -> None:
    sock_path.write_text("precious\n")
    with pytest.raises(FileExistsError, match="not a socket") as info:
        PreforkUnixStreamServer(str(sock_path), socketserver.BaseRequestHandler, workers=1)
    assert str(sock_path) in str(info.value)
    assert sock_path.read_text() == "precious\n"


def test_unix_socket_mode_is_660_whatever_the_umask_and_can_be_set(sock_path: Path) -> None:
    old_umask = os.umask(0)  # the most permissive: the socket must not inherit it
    try:
        with PreforkUnixStreamServer(str(sock_path), socketserver.BaseRequestHandler) as s:
            assert stat.S_IMODE(sock_path.lstat().st_mode) == 0o660
            s.server_close()
        os.umask(0o077)  # and the most restrictive: an explicit mode wins
        with PreforkUnixStreamServer(
            str(sock_path), socketserver.BaseRequestHandler, socket_mode=0o666
        ):
            assert stat.S_IMODE(sock_path.lstat().st_mode) == 0o666
    finally:
        os.umask(old_umask)
    sock_path.unlink()  # never served, so server_close() leaves it (see the class doc)
    for bad in (0o1000, -1, "660", True):
        with pytest.raises(ValueError, match="socket_mode"):
            PreforkUnixStreamServer(
                str(sock_path), socketserver.BaseRequestHandler, socket_mode=bad
            )
    assert not os.path.lexists(sock_path), "a bad mode is refused before binding"


def test_unix_server_refuses_a_live_servers_socket(app, sock_path: Path) -> None:
    proc = app("--server", "unix", "--bind", str(sock_path), "--workers", "1")
    proc.wait_output(r"PATH=")
    inode = sock_path.lstat().st_ino
    with pytest.raises(OSError, match="running server") as info:
        PreforkUnixStreamServer(str(sock_path), socketserver.BaseRequestHandler, workers=1)
    assert info.value.errno == errno.EADDRINUSE
    assert sock_path.lstat().st_ino == inode, "the live server's socket is untouched"
    assert ask_pid(sock_path) in proc.workers()
    proc.signal(signal.SIGQUIT)
    assert proc.wait() == 0
    assert not os.path.lexists(sock_path)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract sockets are Linux's")
def test_unix_server_in_the_abstract_namespace(app) -> None:
    name = f"@prefork-test-{os.getpid()}-{time.monotonic_ns()}"
    proc = app("--server", "unix", "--bind", name, "--workers", "1")
    proc.wait_output(r"PATH=")
    address = "\0" + name[1:]
    assert ask_pid(address) in proc.workers()
    proc.signal(signal.SIGQUIT)
    assert proc.wait() == 0
    assert "Traceback" not in proc.output()
    with pytest.raises(ConnectionRefusedError):
        connect(address)


# -- 6. IPv6 ------------------------------------------------------------------------------


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback (::1)")
def test_an_ipv6_subclass_serves_on_the_ipv6_loopback(app) -> None:
    proc = app("--server", "tcp6", "--bind", "::1", "--workers", "2")
    port = proc.port()
    pids = {ask_pid(("::1", port)) for _ in range(4)}
    assert pids <= set(proc.workers())
    proc.signal(signal.SIGQUIT)
    assert proc.wait() == 0


# -- 7. shutdown() and the context manager ------------------------------------------------


def test_shutdown_from_another_thread_returns_after_serve_forever(app) -> None:
    proc = app("--workers", "2", "--shutdown-after-first")
    assert proc.wait() == 0
    out = proc.output()
    workers = [int(pid) for pid in re.findall(r"spawned worker\[\d\] pid (\d+)", out)]
    assert len(workers) == 2, out
    answered = int(re.search(r"ANSWERED (\d+)", out).group(1))
    assert answered in workers
    # shutdown() returned only once the workers were gone and reaped.
    assert "SHUTDOWN RETURNED children=0" in out
    assert "DONE children=0" in out
    assert out.index("ANSWERED") < out.index("master: graceful stop")
    assert not any(is_alive(p) for p in workers)


def test_shutdown_before_serve_forever_makes_it_return_at_once(app) -> None:
    proc = app("--workers", "2", "--shutdown-before")
    assert proc.wait() == 0
    out = proc.output()
    elapsed = float(re.search(r"SERVE_FOREVER RETURNED after ([\d.]+)s", out).group(1))
    assert elapsed < 1.0
    assert "spawned worker" not in out
    assert "DONE children=0" in out


def test_shutdown_inside_a_handler_stops_the_server_gracefully(app) -> None:
    proc = app("--workers", "2")
    port = proc.port()
    with connect(port) as slow:  # a request in flight elsewhere must still be answered
        slow.sendall(b"sleep 0.8 1000\n")
        f = slow.makefile("rb")
        busy = int(f.readline().split()[1])
        (idle,) = set(wait_workers(proc.pid, 2)) - {busy}
        assert ask(port, "shutdown") == f"bye {idle}\n"
        assert f.read() == f"slept {busy}\n".encode() + b"x" * 1000
    assert proc.wait() == 0
    out = proc.output()
    assert "master: graceful stop" in out
    assert "missed its heartbeat" not in out and "killed" not in out
    assert "DONE children=0" in out


def test_the_context_manager_closes_the_socket() -> None:
    with PreforkTCPServer(("127.0.0.1", 0), socketserver.BaseRequestHandler, workers=1) as s:
        port = s.server_address[1]
        with connect(port):  # listening (the kernel accepts into the backlog)
            pass
    assert s.socket.fileno() == -1
    with pytest.raises(ConnectionRefusedError):
        connect(port)


def test_a_connection_the_handler_closed_goes_through_close_request_without_shutdown() -> None:
    calls: list[str] = []

    class Recording(socket.socket):
        def shutdown(self, how: int) -> None:
            calls.append("shutdown")
            super().shutdown(how)

    class Server(PreforkTCPServer):
        def close_request(self, request: socket.socket) -> None:
            calls.append("close_request")
            super().close_request(request)

    with Server(("127.0.0.1", 0), socketserver.BaseRequestHandler, workers=1) as server:
        for closed_by_handler in (True, False):
            a, b = socket.socketpair()
            request = Recording(fileno=a.detach())
            if closed_by_handler:
                request.close()
            calls.clear()
            server.shutdown_request(request)
            expected = ["close_request"] if closed_by_handler else ["shutdown", "close_request"]
            assert calls == expected
            assert request.fileno() == -1
            assert b.recv(1) == b""  # the peer sees the end of the connection either way
            b.close()


def test_a_shutdown_request_of_a_class_after_the_mixin_is_still_called(app) -> None:
    # PreforkMixIn first, then the user's own TCPServer subclass whose shutdown_request()
    # PreforkMixIn's reaches through super(): the worker must not do without it.
    proc = app("--server", "bye", "--workers", "1")
    with connect(proc.port()) as s:
        s.sendall(b"pid\n")
        f = s.makefile("rb")
        assert f.readline().strip().isdigit()
        assert f.readline() == b"bye\n"
        assert closed_by_server(s)
    proc.signal(signal.SIGQUIT)
    assert proc.wait() == 0


@pytest.mark.parametrize("server", ["linger", "linger-after"])
def test_examples_http_leaves_the_socket_to_a_hook_that_uses_it(app, server: str) -> None:
    # The HTTP handler closes its connection itself only where the server lets it: a
    # close_request() or finish_request() override that touches the socket after the
    # handler still gets an open one.
    proc = app("--server", server, "--handler", "wsgi", "--workers", "1")
    port = proc.port()
    workers = wait_workers(proc.pid, 1)
    for _ in range(3):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/", headers={"Connection": "close"})
        r = conn.getresponse()
        assert (r.status, r.read()) == (200, b"hello from %d" % workers[0])
        conn.close()
    assert proc.workers() == workers, proc.output()  # no worker crashed
    proc.signal(signal.SIGQUIT)
    assert proc.wait() == 0
    assert "Traceback" not in proc.output() and "crashed" not in proc.output()


def test_examples_http_serves_on_when_a_planned_park_is_declined(app) -> None:
    # A's response is made while B waits in the accept queue of the only worker: the
    # handler plans to park A's connection, and so makes no new h11 connection for it;
    # the server declines the park. A's next request, already in the socket, must then
    # be read by a fresh h11 connection, not the one that served the first request.
    proc = app("--server", "noparking", "--handler", "wsgi", "--workers", "1")
    port = proc.port()
    worker = wait_workers(proc.pid, 1)[0]
    hello = b"hello from %d" % worker
    with connect(port) as a:
        a.sendall(b"GET /?sleep=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        proc.wait_output("APP SLEEPING")  # the first request has been read
        with connect(port) as b:
            b.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            a.sendall(b"GET /second HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer_a = recv_all(a)
            answer_b = recv_all(b)
    assert answer_a.count(b"HTTP/1.1 200 OK") == 2, answer_a
    assert answer_a.count(hello) == 2, answer_a
    assert answer_b.startswith(b"HTTP/1.1 200 OK") and answer_b.endswith(hello), answer_b
    assert proc.workers() == [worker], proc.output()
    proc.signal(signal.SIGQUIT)
    assert proc.wait() == 0
    assert "Traceback" not in proc.output(), proc.output()


# -- 8. a graceful stop with a request in flight ------------------------------------------


def test_quit_lets_the_request_in_flight_finish(app) -> None:
    proc = app("--workers", "2", "--timeout", "5")
    port = proc.port()
    wait_workers(proc.pid, 2)
    with connect(port) as s:
        s.sendall(b"sleep 1.5 200000\n")
        f = s.makefile("rb")
        busy = int(f.readline().split()[1])
        proc.signal(signal.SIGQUIT)
        # The idle worker leaves at once; the busy one stays until its answer is out.
        assert wait_workers(proc.pid, 1) == [busy]
        assert f.read() == f"slept {busy}\n".encode() + b"x" * 200_000
    assert proc.wait() == 0
    out = proc.output()
    assert re.search(rf"worker\[\d\] \(pid {busy}\) exited with status 0", out), out
    assert "DONE children=0" in out


# -- 9. invalid options -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("workers", -1),
        ("workers", "3"),
        ("workers", 2.0),
        ("timeout", 0),
        ("timeout", -1),
        ("timeout", float("nan")),
        ("graceful_timeout", -1),
        ("app_name", "a/b"),
        ("app_name", ""),
        ("logger", "x"),
        ("max_boot_failures", 0),
        ("pid_path", ""),
    ],
)
def test_an_invalid_option_raises_value_error_naming_it(option: str, value: object) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = None
    with pytest.raises(ValueError, match=rf"^{option} "):
        server = PreforkTCPServer(
            ("127.0.0.1", port), socketserver.BaseRequestHandler, **{option: value}
        )
    if server is not None:
        server.server_close()
    with socket.socket() as s:  # nothing was left bound
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


def test_an_invalid_class_attribute_is_refused_too() -> None:
    class Bad(PreforkTCPServer):
        workers = -1

    with pytest.raises(ValueError, match="^workers "):
        Bad(("127.0.0.1", 0), socketserver.BaseRequestHandler)

    class BadParking(PreforkTCPServer):
        max_parked = -5

    with pytest.raises(ValueError, match="^max_parked must be an integer >= 0, not -5"):
        BadParking(("127.0.0.1", 0), socketserver.BaseRequestHandler)


def test_valid_options_become_attributes() -> None:
    logger = logging.getLogger("test_server.valid")
    with PreforkTCPServer(("127.0.0.1", 0), socketserver.BaseRequestHandler, workers=3,
                          timeout=2, app_name="valid", logger=logger) as s:  # fmt: skip
        assert (s.workers, s.timeout, s.app_name, s.logger) == (3, 2, "valid", logger)
    assert PreforkTCPServer.workers == 10, "settings live on the instance, not the class"


# -- 10. descriptors ----------------------------------------------------------------------


def _fds(pid: int) -> dict[int, tuple[str, int]]:
    """fd -> (what it points to, its open flags), from /proc."""
    out = {}
    for entry in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{entry}")
            info = Path(f"/proc/{pid}/fdinfo/{entry}").read_text()
        except FileNotFoundError:
            continue
        flags = int(re.search(r"flags:\s*([0-7]+)", info).group(1), 8)
        out[int(entry)] = (target, flags)
    return out


def test_a_worker_holds_the_listener_but_not_the_masters_pipes(app) -> None:
    """What it checks, through /proc/<pid>/fd and fdinfo: the master's listening socket is
    in the worker; the master holds both ends of its pipes (the signal wakeup pipe, and the
    pipe whose EOF tells workers that the master died); the worker holds no write end of
    any of them (one would keep that pipe from ever reaching EOF, or let a worker wake the
    master's loop), at least one of them not at all (the wakeup pipe), and the read end of
    at least one (the master-death pipe)."""
    proc = app("--workers", "1")
    port = proc.port()
    (worker,) = wait_workers(proc.pid, 1)
    assert ask_pid(port) == worker  # booted and serving
    master_fds, worker_fds = _fds(proc.pid), _fds(worker)

    sockets = {t for t, _ in master_fds.values() if t.startswith("socket:")}
    assert len(sockets) == 1, master_fds  # the listener, nothing else
    assert sockets <= {t for t, _ in worker_fds.values()}

    def ends(fds: dict[int, tuple[str, int]]) -> set[tuple[str, int]]:
        return {(t, flags & os.O_ACCMODE) for t, flags in fds.values() if t.startswith("pipe:")}

    master_ends, worker_ends = ends(master_fds), ends(worker_fds)
    master_pipes = {t for t, _ in master_ends}
    assert len(master_pipes) >= 2, master_fds
    assert all((t, os.O_RDONLY) in master_ends and (t, os.O_WRONLY) in master_ends
               for t in master_pipes), master_fds  # fmt: skip
    shared = {(t, mode) for t, mode in worker_ends if t in master_pipes}
    assert {mode for _, mode in shared} == {os.O_RDONLY}, (master_fds, worker_fds)
    assert {t for t, _ in shared} < master_pipes, "the wakeup pipe stays in the master"


def test_process_titles_show_each_workers_state(app) -> None:
    pytest.importorskip("setproctitle")  # without it only the 15-byte task name can change
    proc = app("--workers", "1", "--timeout", "30")
    port = proc.port()
    (worker,) = wait_workers(proc.pid, 1)

    def title() -> str:
        return Path(f"/proc/{worker}/cmdline").read_text().replace("\0", " ").strip()

    ask_pid(port)
    wait_for(lambda: re.search(r"worker\[0\] idle, 1 served", title()), what="idle title")
    stuck = connect(port)
    stuck.sendall(b"stuck\n")
    wait_for(lambda: re.search(r"worker\[0\] busy, 1 served", title()), what="busy title")
    stuck.close()
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0


def test_clients_waiting_tells_a_handler_that_another_client_queues(app) -> None:
    proc = app("--workers", "1", "--timeout", "30")
    port = proc.port()
    (worker,) = wait_workers(proc.pid, 1)
    holder = connect(port)
    holder.sendall(b"hold\n")
    lines = holder.makefile("rb")
    assert lines.readline() == f"holding {worker}\n".encode()
    holder.settimeout(0.3)
    with pytest.raises(TimeoutError):  # nobody waits yet: the handler keeps the worker
        holder.recv(1)
    holder.settimeout(10)
    assert ask_pid(port) == worker, "the queued client is served once the holder yields"
    assert lines.readline() == f"yielded {worker}\n".encode()
    holder.close()
    proc.signal(signal.SIGQUIT)
    assert proc.wait() == 0


# -- 6. parked connections (PreforkMixIn.park) --------------------------------------------


def park_turn(s: socket.socket, line: str) -> tuple[int, int, int, str]:
    """One turn of the ``park`` handler: ``(pid, parked, verified, line)`` of its answer."""
    s.sendall(f"{line}\n".encode())
    answer = b""
    while not answer.endswith(b"\n"):
        chunk = s.recv(4096)
        assert chunk, f"closed instead of answering {line!r} (got {answer!r})"
        answer += chunk
    pid, parked, verified, text = answer.decode().split(" ", 3)
    assert text.endswith("\n") and "not parked" not in text, answer
    return int(pid), int(parked), int(verified), text.strip()


def closed_by_server(s: socket.socket, timeout: float = 10.0) -> bool:
    s.settimeout(timeout)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def scoreboard_connections(master: int) -> int:
    from prefork_server.scoreboard import read_scoreboard

    return sum(view.connections for view in read_scoreboard(master))


def test_one_worker_keeps_idle_connections_parked_and_serves_each_again(app) -> None:
    """One worker, 30 clients: each is answered and its connection parked, open, while the
    worker serves the next; then each is served again on its own connection, by a new
    handler but without a second verify_request(). Without parking a single worker could
    answer none of the second turns while another connection is open."""
    proc = app("--handler", "park", "--workers", "1", "--timeout", "30")
    port = proc.port()
    (worker,) = wait_workers(proc.pid, 1)
    clients = [connect(port) for _ in range(30)]
    try:
        for i, s in enumerate(clients):
            assert park_turn(s, f"first {i}") == (worker, i, i + 1, f"first {i}")
        wait_for(lambda: scoreboard_connections(proc.pid) == 30, what="30 parked in the status")
        for i, s in reversed(list(enumerate(clients))):
            assert park_turn(s, f"second {i}") == (worker, 29, 30, f"second {i}")
        for s in clients[:15]:  # clients that leave: their parked connections are closed
            s.close()
        wait_for(lambda: scoreboard_connections(proc.pid) == 15, what="15 parked left")
        assert park_turn(clients[20], "third") == (worker, 14, 30, "third")
        proc.signal(signal.SIGQUIT)  # idle connections end with the worker, at once
        assert all(closed_by_server(s) for s in clients[15:])
        assert proc.wait() == 0
    finally:
        for s in clients:
            s.close()
    assert "DONE children=0" in proc.output()
    assert "Traceback" not in proc.output()


def test_a_parked_connection_idle_past_its_timeout_is_closed(app) -> None:
    proc = app("--handler", "park", "--workers", "1", "--park-timeout", "0.5")
    port = proc.port()
    (worker,) = wait_workers(proc.pid, 1)
    with connect(port) as idle, connect(port) as talking:
        park_turn(idle, "once")
        idle_from = time.monotonic()
        # Each turn parks again with a fresh timeout: 8 turns 0.2 s apart outlive it.
        for i in range(8):
            assert park_turn(talking, f"turn {i}")[0] == worker
            time.sleep(0.2)  # the scenario: a client that pauses less than the timeout
        assert closed_by_server(idle)
        assert 0.4 <= time.monotonic() - idle_from < 10
        assert park_turn(talking, "still open")[3] == "still open"
    proc.signal(signal.SIGQUIT)
    assert proc.wait() == 0
    assert "Traceback" not in proc.output()


def test_a_parked_connection_whose_request_came_in_time_is_served_late_not_closed(
    app,
) -> None:
    """Its request came before its timeout, while the worker was busy with another client
    until after it: it is answered, not closed unread."""
    proc = app("--handler", "park", "--workers", "1", "--park-timeout", "0.5")
    port = proc.port()
    with connect(port) as parked, connect(port) as slow:
        park_turn(parked, "first")
        slow.sendall(b"sleep 1.5\n")  # the worker is busy until past the timeout
        slow_lines = slow.makefile("rb")
        assert slow_lines.readline() == b"sleeping\n"
        parked.sendall(b"in time\n")  # the scenario: sent well within the 0.5 s
        answer = parked.makefile("rb").readline()
        assert answer.endswith(b" in time\n"), answer
        assert slow_lines.readline().endswith(b" sleep 1.5\n")
    proc.signal(signal.SIGQUIT)
    assert proc.wait() == 0


def test_a_handler_that_raises_after_parking_gets_its_connection_closed(app) -> None:
    proc = app("--handler", "park", "--workers", "1")
    port = proc.port()
    with connect(port) as calm, connect(port) as failing:
        park_turn(calm, "calm")
        assert park_turn(failing, "raise")[1:3] == (1, 2)
        assert closed_by_server(failing), "not served again after the error"
        wait_for(lambda: scoreboard_connections(proc.pid) == 1, what="only calm parked")
        assert park_turn(calm, "still here")[1:] == (0, 2, "still here")
    proc.wait_output(r"(?s)error handling a request.*RuntimeError: boom after parking")
    proc.signal(signal.SIGQUIT)
    assert proc.wait() == 0


@pytest.mark.parametrize("server", ["threading", "forking"])
def test_handler_threads_and_forked_children_do_not_park(app, server: str) -> None:
    proc = app("--server", server, "--handler", "park", "--workers", "1")
    port = proc.port()
    with connect(port) as s:
        s.sendall(b"hello\n")
        f = s.makefile("rb")
        assert f.readline().endswith(b" hello\n")
        assert f.readline() == b"not parked\n"
        assert closed_by_server(s)
    proc.signal(signal.SIGQUIT)
    assert proc.wait() == 0
