"""Operating a server from the command line: config files, reload (HUP), upgrade (USR2),
inherited sockets (``--bind fd://N``, systemd socket activation), log reopening, status.

Real ``prefork-server`` masters, real signals, real sockets; the load runs are bounded
and print their figures (run pytest with ``-s`` to see them).
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO, Proc, children, is_alive, wait_for, wait_workers
from load import EchoLoad

from prefork_server.scoreboard import read_scoreboard

CLI = [sys.executable, "-m", "prefork_server.cli"]

HANDLER = """\
import socketserver

class Handler(socketserver.BaseRequestHandler):
    def handle(self):
        data = self.request.recv(1024)
        self.request.sendall(b"{version} " + data)
"""


@pytest.fixture
def app(tmp_path: Path) -> Callable[[str], None]:
    """``app(version)``: (re)write ``verapp.Handler``, which answers ``VERSION data``."""

    def write(version: str) -> None:
        (tmp_path / "verapp.py").write_text(HANDLER.replace("{version}", version))

    write("v1")
    return write


@pytest.fixture
def cli(spawn: Callable[..., Proc]) -> Callable[..., Proc]:
    """``cli(*args)``: ``prefork-server ARGS`` in the test's directory, where a stale .pyc
    cannot stand for a module rewritten within the same second."""

    def run(*args: str, **kwargs: object) -> Proc:
        env = {"PYTHONDONTWRITEBYTECODE": "1", **kwargs.pop("env", {})}  # type: ignore[dict-item]
        return spawn([*CLI, *args], env=env, **kwargs)

    return run


def ask(address: tuple[str, int] | str, data: bytes = b"hello") -> bytes:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(address)
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(1024):
            answer += chunk
        return answer


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def booted(master: int, count: int) -> list[int]:
    """Wait until ``master`` has ``count`` workers that have booted (imported their code),
    read from its scoreboard as ``prefork-server status`` does."""

    def ready() -> list[int] | None:
        try:
            slots = read_scoreboard(master)
        except FileNotFoundError:  # it says "listening" before it makes its scoreboard
            return None
        views = [v for v in slots if v.booted]
        return sorted(v.pid for v in views) if len(views) == count else None

    return wait_for(ready, 20, what=f"{count} booted workers of {master}")  # type: ignore[no-any-return]


def replaced(master: int, old: list[int], count: int) -> list[int]:
    """Wait until ``master`` has ``count`` workers, none of them in ``old``."""

    def fresh() -> list[int] | None:
        kids = children(master)
        return kids if len(kids) == count and not set(kids) & set(old) else None

    return wait_for(fresh, 20, what=f"{count} new workers of {master}")  # type: ignore[no-any-return]


# -- config files -------------------------------------------------------------------------


def test_a_config_file_sets_options_and_the_command_line_wins(cli, app, tmp_path: Path) -> None:
    (tmp_path / "conf.py").write_text("workers = 3\nbind = '127.0.0.1:0'\n")
    from_file = cli("--config", "conf.py", "verapp:Handler")
    wait_workers(from_file.pid, 3)
    overridden = cli("--config", "conf.py", "--workers", "1", "verapp:Handler")
    wait_workers(overridden.pid, 1)
    assert ask(("127.0.0.1", overridden.port())) == b"v1 hello"
    for proc in (from_file, overridden):
        proc.signal(signal.SIGQUIT)
        assert proc.wait() == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("wrokers = 3\n", r"unknown setting 'wrokers'"),
        ("workers = 'three'\n", r"workers must be int, not 'three'"),
        ("workers = -1\n", r"workers must be >= 0, not -1"),
        ("workers = (\n", r"SyntaxError|never closed"),
        ("max_workers = 1\nworkers = 2\n", r"max_workers must be >= 2"),
    ],
)
def test_a_bad_config_file_is_an_error(cli, app, tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "conf.py").write_text(text)
    proc = cli("--config", "conf.py", "--bind", "127.0.0.1:0", "verapp:Handler")
    assert proc.wait() == 2
    assert re.search(message, proc.output()), proc.output()
    assert "listening" not in proc.output()


def test_config_hooks_run_in_the_master_and_the_workers(cli, app, tmp_path: Path) -> None:
    (tmp_path / "conf.py").write_text(
        textwrap.dedent(
            """\
            import os
            workers = 2
            def before_fork(number):
                print(f"BEFORE_FORK {number} in {os.getpid()}", flush=True)
            def after_fork(worker):
                worker.logger.info("AFTER_FORK %d in %d", worker.number, os.getpid())
            """
        )
    )
    proc = cli("--config", "conf.py", "--bind", "127.0.0.1:0", "verapp:Handler")
    workers = wait_workers(proc.pid, 2)
    for pid in workers:
        proc.wait_output(rf"AFTER_FORK \d in {pid}")
    proc.wait_output(rf"BEFORE_FORK 1 in {proc.pid}")
    proc.signal(signal.SIGQUIT)
    assert proc.wait() == 0


# -- HUP: reload --------------------------------------------------------------------------


def test_hup_rereads_the_config_and_imports_new_code(cli, app, tmp_path: Path) -> None:
    conf = tmp_path / "conf.py"
    conf.write_text("workers = 2\nmax_requests = 0\n")
    proc = cli("--config", str(conf), "--bind", "127.0.0.1:0", "verapp:Handler")
    address = ("127.0.0.1", proc.port())
    old = wait_workers(proc.pid, 2)
    assert ask(address) == b"v1 hello"
    app("v2")
    conf.write_text("workers = 3\nmax_requests = 0\n")
    proc.signal(signal.SIGHUP)
    replaced(proc.pid, old, 3)
    assert ask(address) == b"v2 hello"
    proc.wait_output(r"reload sets workers = 3")
    proc.signal(signal.SIGQUIT)
    assert proc.wait() == 0


def test_preload_imports_once_so_hup_keeps_the_old_code(cli, app) -> None:
    proc = cli("--preload", "--workers", "1", "--bind", "127.0.0.1:0", "verapp:Handler")
    address = ("127.0.0.1", proc.port())
    old = wait_workers(proc.pid, 1)
    app("v2")
    proc.signal(signal.SIGHUP)
    replaced(proc.pid, old, 1)
    assert ask(address) == b"v1 hello"
    proc.signal(signal.SIGQUIT)
    assert proc.wait() == 0


def test_hup_with_code_that_cannot_boot_keeps_the_old_workers(cli, app, tmp_path: Path) -> None:
    proc = cli("--workers", "2", "--bind", "127.0.0.1:0", "verapp:Handler")
    address = ("127.0.0.1", proc.port())
    old = booted(proc.pid, 2)  # both imported v1 before the deploy breaks it
    (tmp_path / "verapp.py").write_text("raise ImportError('broken deploy')\n")
    proc.signal(signal.SIGHUP)
    # The new code is tried in a short-lived child first: the reload is refused before any
    # worker is replaced (code that imports but cannot boot is rolled back instead: see
    # test_lifecycle.py).
    proc.wait_output(r"reload abandoned; the current workers keep serving", timeout=30)
    assert "broken deploy" in proc.output(), "the log says why"
    assert all(is_alive(pid) for pid in old)
    assert ask(address) == b"v1 hello"
    app("v3")  # fixed: the next HUP goes through
    proc.signal(signal.SIGHUP)
    replaced(proc.pid, old, 2)
    assert ask(address) == b"v3 hello"
    proc.signal(signal.SIGQUIT)
    assert proc.wait() == 0


@pytest.mark.parametrize("broken", ["workers = (\n", "workers = -5\n", "bogus = 1\n"])
def test_hup_with_a_broken_config_changes_nothing(cli, app, tmp_path: Path, broken: str) -> None:
    conf = tmp_path / "conf.py"
    conf.write_text("workers = 2\n")
    proc = cli("--config", str(conf), "--bind", "127.0.0.1:0", "verapp:Handler")
    address = ("127.0.0.1", proc.port())
    workers = wait_workers(proc.pid, 2)
    conf.write_text(broken)
    proc.signal(signal.SIGHUP)
    proc.wait_output(r"reload abandoned; the current workers keep serving")
    assert children(proc.pid) == workers
    assert ask(address) == b"v1 hello"
    proc.signal(signal.SIGQUIT)
    assert proc.wait() == 0


def test_hup_under_load_fails_no_request(cli, app) -> None:
    proc = cli("--workers", "2", "--bind", "127.0.0.1:0", "examples.echo:EchoHandler", cwd=REPO)
    address = ("127.0.0.1", proc.port())
    old = wait_workers(proc.pid, 2)
    with EchoLoad(address, concurrency=8) as load:
        load.wait_answered(300)
        for _ in range(3):
            proc.signal(signal.SIGHUP)
            old = replaced(proc.pid, old, 2)
            load.wait_answered(300)
    print(f"\nHUP x3 under load: {load.result}")
    assert load.result.failed == 0 and load.result.refused == 0, load.result
    proc.signal(signal.SIGQUIT)
    assert proc.wait() == 0


# -- USR2: upgrade ------------------------------------------------------------------------


def test_usr2_under_load_fails_and_refuses_nothing(spawn, cli, tmp_path: Path) -> None:
    pid_file = tmp_path / "echo.pid"
    old = cli("--workers", "2", "--bind", "127.0.0.1:0", "--pid-file", str(pid_file),
              "examples.echo:EchoHandler", cwd=REPO)  # fmt: skip
    address = ("127.0.0.1", old.port())
    old_workers = wait_workers(old.pid, 2)
    with EchoLoad(address, concurrency=8) as load:
        load.wait_answered(300)
        old.signal(signal.SIGUSR2)
        new = wait_for(lambda: (lambda p: p if p and p != old.pid else None)(read_pid(pid_file)),
                       what="the new master's pid file")  # fmt: skip
        spawn.track(new)
        assert read_pid(tmp_path / "echo.pid.oldbin") == old.pid
        new_workers = wait_workers(new, 2)
        load.wait_answered(300)
        old.signal(signal.SIGQUIT)  # QUIT alone: the old workers finish, the master goes
        assert old.wait(20) == 0
        assert not any(is_alive(p) for p in old_workers)
        load.wait_answered(300)
    print(f"\nUSR2 + QUIT of the old master under load: {load.result}")
    assert load.result.failed == 0 and load.result.refused == 0, load.result
    assert read_pid(pid_file) == new and not (tmp_path / "echo.pid.oldbin").exists()
    assert children(new) == new_workers
    os.kill(new, signal.SIGQUIT)
    wait_for(lambda: not is_alive(new), what="the new master to stop")
    assert not pid_file.exists()


def test_hup_to_the_old_master_rolls_an_upgrade_back(spawn, cli, app, tmp_path: Path) -> None:
    pid_file = tmp_path / "app.pid"
    old = cli("--workers", "1", "--bind", "127.0.0.1:0", "--pid-file", str(pid_file),
              "verapp:Handler")  # fmt: skip
    address = ("127.0.0.1", old.port())
    old_workers = booted(old.pid, 1)
    app("v2")  # the "new release"
    old.signal(signal.SIGUSR2)
    new = wait_for(lambda: (lambda p: p if p and p != old.pid else None)(read_pid(pid_file)),
                   what="the new master's pid file")  # fmt: skip
    spawn.track(new)
    wait_workers(new, 1)
    old.signal(signal.SIGWINCH)
    wait_for(lambda: not any(is_alive(p) for p in old_workers), what="old workers to stop")
    assert ask(address) == b"v2 hello"
    app("v1")  # the release is bad: put the old code back and roll back
    old.signal(signal.SIGHUP)
    wait_workers(old.pid, 1 + 1)  # its new worker, and the new master (its child)
    os.kill(new, signal.SIGQUIT)
    wait_for(lambda: not is_alive(new), what="the new master to stop")
    wait_for(lambda: read_pid(pid_file) == old.pid, what="the pid file to come back")
    assert not (tmp_path / "app.pid.oldbin").exists()
    assert ask(address) == b"v1 hello"
    old.signal(signal.SIGQUIT)
    assert old.wait() == 0


def test_usr2_on_a_unix_socket_leaves_the_file_to_the_new_master(
    spawn, cli, app, tmp_path: Path
) -> None:
    path = tmp_path / "app.sock"
    pid_file = tmp_path / "app.pid"
    old = cli("--workers", "1", "--bind", f"unix:{path}", "--pid-file", str(pid_file),
              "verapp:Handler")  # fmt: skip
    wait_for(path.exists, what="the socket file")
    wait_workers(old.pid, 1)
    old.signal(signal.SIGUSR2)
    new = wait_for(lambda: (lambda p: p if p and p != old.pid else None)(read_pid(pid_file)),
                   what="the new master's pid file")  # fmt: skip
    spawn.track(new)
    wait_workers(new, 1)
    old.signal(signal.SIGQUIT)
    assert old.wait() == 0
    assert path.exists(), "the old master must not remove the socket the new one serves"
    assert ask(str(path)) == b"v1 hello"
    os.kill(new, signal.SIGQUIT)
    wait_for(lambda: not is_alive(new), what="the new master to stop")
    assert not path.exists()


# -- inherited sockets --------------------------------------------------------------------


def listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


def test_bind_fd_serves_on_an_inherited_socket(cli, app) -> None:
    with listening_socket() as sock:
        fd = sock.fileno()
        proc = cli("--workers", "1", "--bind", f"fd://{fd}", "verapp:Handler", pass_fds=(fd,))
        port = proc.port()
        assert port == sock.getsockname()[1]
        wait_workers(proc.pid, 1)
        assert ask(("127.0.0.1", port)) == b"v1 hello"
    proc.signal(signal.SIGQUIT)
    assert proc.wait() == 0


@pytest.mark.parametrize("fd", ["0", "99", "x"])
def test_bind_fd_that_is_not_a_listening_socket_is_an_error(cli, app, fd: str) -> None:
    proc = cli("--bind", f"fd://{fd}", "verapp:Handler")
    assert proc.wait() == 2
    assert re.search(r"bind: .*fd://", proc.output()), proc.output()


def test_systemd_socket_activation_and_readiness(spawn, app, tmp_path: Path) -> None:
    notify_path = tmp_path / "notify"
    with (
        listening_socket() as sock,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify,
    ):
        notify.bind(str(notify_path))
        notify.settimeout(15)
        fd = sock.fileno()
        # As systemd does: the socket as descriptor 3, LISTEN_PID naming the exec'd process.
        wrapper = (
            "import os, sys\n"
            f"os.dup2({fd}, 3)\n"
            f"os.close({fd})\n"
            "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1')\n"
            "os.execv(sys.argv[1], sys.argv[1:])\n"
        )
        proc = spawn(
            [sys.executable, "-c", wrapper, *CLI, "--workers", "2", "verapp:Handler"],
            env={"NOTIFY_SOCKET": str(notify_path), "PYTHONDONTWRITEBYTECODE": "1"},
            pass_fds=(fd,),
        )
        assert proc.port() == sock.getsockname()[1], "no --bind: systemd's socket is used"
        messages = notify.recv(4096).decode()
        assert "READY=1" in messages and f"MAINPID={proc.pid}" in messages
        wait_workers(proc.pid, 2)
        assert ask(("127.0.0.1", sock.getsockname()[1])) == b"v1 hello"
        proc.signal(signal.SIGQUIT)
        assert "STOPPING=1" in notify.recv(4096).decode()
        assert proc.wait() == 0


# -- logs and status ----------------------------------------------------------------------


def test_usr1_reopens_the_log_file_after_a_rotation(cli, app, tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    proc = cli("--workers", "1", "--bind", "127.0.0.1:0", "--log-file", str(log),
               "verapp:Handler")  # fmt: skip
    wait_for(lambda: log.exists() and "listening on" in log.read_text(), what="the log")
    wait_workers(proc.pid, 1)
    log.rename(tmp_path / "app.log.1")
    proc.signal(signal.SIGUSR1)
    wait_for(log.exists, what="a new log file")
    proc.signal(signal.SIGTTIN)
    wait_for(lambda: "one worker more" in log.read_text(), what="the new log to be written")
    assert "one worker more" not in (tmp_path / "app.log.1").read_text()
    proc.signal(signal.SIGQUIT)
    assert proc.wait() == 0


def test_status_subcommand_and_graceful_term(cli, app, tmp_path: Path) -> None:
    pid_file = tmp_path / "app.pid"
    proc = cli("--workers", "2", "--bind", "127.0.0.1:0", "--pid-file", str(pid_file),
               "--graceful-term", "--max-requests", "1000", "verapp:Handler")  # fmt: skip
    address = ("127.0.0.1", proc.port())
    workers = wait_workers(proc.pid, 2)
    for _ in range(3):
        assert ask(address) == b"v1 hello"
    status = cli("status", "--pid-file", str(pid_file))
    assert status.wait() == 0
    out = status.output()
    assert f"master {proc.pid}: 2 workers" in out, out
    assert "3 served" in out, out
    for pid in workers:
        assert re.search(rf"\b{pid}\b", out), out
    proc.signal(signal.SIGTERM)
    proc.wait_output(r"master: graceful stop")
    assert proc.wait() == 0


WSGI_APP = """\
def app(environ, start_response):
    body = environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"{version} " + str(len(body)).encode()]
"""


def test_hup_reloads_the_http_examples_app_and_its_limits(spawn, tmp_path: Path) -> None:
    (tmp_path / "wsgiapp.py").write_text(WSGI_APP.replace("{version}", "v1"))
    conf = tmp_path / "conf.py"
    conf.write_text("workers = 1\nmax_body_bytes = 100\n")
    proc = spawn([sys.executable, "-m", "examples.http", "--bind", "127.0.0.1:0",
                  "--config", str(conf), "wsgiapp:app"],
                 env={"PYTHONDONTWRITEBYTECODE": "1"})  # fmt: skip
    port = proc.port()
    old = booted(proc.pid, 1)

    def post(size: int) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("POST", "/", body=b"x" * size)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    assert post(50) == (200, b"v1 50")
    assert post(200)[0] == 413
    (tmp_path / "wsgiapp.py").write_text(WSGI_APP.replace("{version}", "v2"))
    conf.write_text("workers = 1\nmax_body_bytes = 1000\n")
    proc.signal(signal.SIGHUP)
    replaced(proc.pid, old, 1)
    assert post(200) == (200, b"v2 200")
    proc.wait_output(r"reload sets max_body_bytes = 1000")
    proc.signal(signal.SIGQUIT)
    assert proc.wait() == 0
