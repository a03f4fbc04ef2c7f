"""More connections than workers: handler threads in each worker, and asyncio workers.

The proof of concurrency is not a duration: 200 clients connect to 2 workers and every
one of them gets its first answer while all 200 connections are still open, which a
worker serving one connection at a time could never do.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO, Proc, is_alive, run_clients, wait_for, wait_workers

from prefork_server.scoreboard import read_scoreboard

ECHO = [sys.executable, "-m", "examples.echo"]
CLI = [sys.executable, "-m", "prefork_server.cli"]
CLIENTS = 200


def hold_many(port: int, clients: int = CLIENTS) -> list[bool]:
    """Open ``clients`` connections; each sends a message and waits for its echo while
    every other connection stays open; then each sends a second one. True per client
    whose two echoes came back right."""
    first_answers = threading.Barrier(clients + 1, timeout=30)
    results = [False] * clients

    def client(i: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            first = f"first {i}\n".encode()
            s.sendall(first)
            ok = recv_exactly(s, len(first)) == first
            try:
                first_answers.wait()  # nobody closes before everybody was answered
            except threading.BrokenBarrierError:
                return
            second = f"second {i}\n".encode()
            s.sendall(second)
            results[i] = ok and recv_exactly(s, len(second)) == second

    run_clients(client, clients, first_answers,
                "not every client got its first answer while all were connected")  # fmt: skip
    return results


def recv_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


@pytest.fixture
def run(spawn: Callable[..., Proc]) -> Callable[..., Proc]:
    def _run(*argv: str, cwd: Path = REPO) -> Proc:
        return spawn(list(argv), cwd=cwd)

    return _run


@pytest.mark.parametrize("mode", [["--threads", "128"], ["--asyncio"]], ids=["threads", "asyncio"])
def test_two_workers_serve_200_clients_at_once(run, mode: list[str]) -> None:
    proc = run(*ECHO, "--bind", "127.0.0.1:0", "--workers", "2", *mode)
    port = proc.port()
    wait_workers(proc.pid, 2)
    results = hold_many(port)
    assert all(results), f"{results.count(False)} clients failed"
    # Every connection counts in the scoreboard, also those that overlapped in a worker.
    wait_for(lambda: sum(v.served for v in read_scoreboard(proc.pid)) == CLIENTS,
             what=f"{CLIENTS} connections counted as served")  # fmt: skip
    proc.signal(signal.SIGQUIT)
    assert proc.wait(30) == 0
    assert "Traceback" not in proc.output()


def test_without_threads_two_workers_cannot_hold_200_clients(run) -> None:
    """The control: the same clients against plain workers break the barrier."""
    proc = run(*ECHO, "--bind", "127.0.0.1:0", "--workers", "2")
    port = proc.port()
    wait_workers(proc.pid, 2)
    socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
    try:
        for s in socks:
            s.sendall(b"x")
        answered = []
        for s in socks:
            s.settimeout(1.0)  # the two held workers answer at once; the third never does
            try:
                answered.append(s.recv(1) == b"x")
            except TimeoutError:
                answered.append(False)
        assert answered.count(True) == 2, "a third client waits while two hold the workers"
    finally:
        for s in socks:
            s.close()
    proc.signal(signal.SIGQUIT)
    assert proc.wait(30) == 0


THREAD_APP = """\
import itertools, socketserver, threading

# Thread identities are reused once a thread ends; a thread-local tag is not.
tags = itertools.count()
local = threading.local()

class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        if not hasattr(local, "tag"):
            local.tag = next(tags)
        for line in self.rfile:  # until the client closes
            self.wfile.write(b"%d\\n" % local.tag)
"""


def test_handler_threads_are_a_pool_kept_across_connections(run, tmp_path: Path) -> None:
    (tmp_path / "threadapp.py").write_text(THREAD_APP)
    proc = run(*CLI, "--bind", "127.0.0.1:0", "--workers", "1", "--threads", "3",
               "threadapp:Handler", cwd=tmp_path)  # fmt: skip
    port = proc.port()
    wait_workers(proc.pid, 1)

    def thread_of(s: socket.socket) -> bytes:
        s.sendall(b"which\n")
        return s.makefile("rb").readline()

    def all_done() -> bool:
        return [v.connections for v in read_scoreboard(proc.pid)] == [0]

    one_at_a_time = set()
    for _ in range(10):  # each connection ends before the next: one thread serves all
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            one_at_a_time.add(thread_of(s))
        wait_for(all_done, what="the worker to count the connection out")
    assert len(one_at_a_time) == 1, one_at_a_time
    held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
    at_once = {thread_of(s) for s in held}
    assert len(at_once) == 3, "three connections at once, three threads"
    for s in held:
        s.close()
    wait_for(all_done, what="the worker to count the connections out")
    again = set()
    for _ in range(6):  # back to back this time: the pool never grows past three
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            again.add(thread_of(s))
    assert len(one_at_a_time | at_once | again) <= 3, "no thread beyond the pool's three"
    proc.signal(signal.SIGQUIT)
    assert proc.wait(30) == 0


REFUSING_APP = """\
import contextvars, sys

from examples.echo import EchoHandler
from prefork_server.cli import build_parser, serve

seen = contextvars.ContextVar("seen", default=None)


class RefuseFirstFive:
    refused = 0

    def verify_request(self, request, client_address):
        if type(self).refused < 5:
            type(self).refused += 1
            return False
        return True


class Handler(EchoHandler):
    def setup(self):
        # A context variable set by the previous connection on this thread must not leak.
        assert seen.get() is None, "a context variable leaked from the last connection"
        seen.set(self.client_address)
        super().setup()


sys.exit(serve(build_parser().parse_args(), Handler, mixins=(RefuseFirstFive,)))
"""


def test_refused_connections_free_their_thread_and_context_does_not_leak(
    run, tmp_path: Path
) -> None:
    script = tmp_path / "refusing.py"
    script.write_text(REFUSING_APP)
    proc = run(sys.executable, str(script), "--bind", "127.0.0.1:0", "--workers", "1",
               "--threads", "2", cwd=REPO)  # fmt: skip
    port = proc.port()
    wait_workers(proc.pid, 1)
    for _ in range(5):  # more refusals than threads: each must free its place
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            assert s.recv(1) == b"", "a refused connection is closed at once"
    for i in range(4):  # the pool's threads serve these in turn
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"%d" % i)
            assert recv_exactly(s, 1) == b"%d" % i
    proc.signal(signal.SIGQUIT)
    assert proc.wait(30) == 0
    assert "Traceback" not in proc.output(), proc.output()[-3000:]


UNHEALTHY_APP = """\
import sys

from examples.echo import EchoHandler
from prefork_server.cli import build_parser, serve


class UnhealthyAfterOne:
    def worker_is_healthy(self):
        return self.worker.served == 0  # then no heartbeat: replaced after the timeout


sys.exit(serve(build_parser().parse_args(), EchoHandler, mixins=(UnhealthyAfterOne,)))
"""


def test_an_unhealthy_worker_waits_quietly_for_its_end(run, tmp_path: Path) -> None:
    # worker_is_healthy() False: the loop stamps no heartbeat, so it must not wake to
    # show the idle title either (only a heartbeat shows it): it would spin at 0 s.
    pytest.importorskip("setproctitle")  # the title is what made it wake
    script = tmp_path / "unhealthy.py"
    script.write_text(UNHEALTHY_APP)
    proc = run(sys.executable, str(script), "--bind", "127.0.0.1:0", "--workers", "1",
               "--timeout", "30", cwd=REPO)  # fmt: skip
    port = proc.port()
    (worker,) = wait_workers(proc.pid, 1)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"x")
        assert recv_exactly(s, 1) == b"x"
    wait_for(lambda: [v.served for v in read_scoreboard(proc.pid)] == [1], what="one served")
    before, started = cpu_seconds(worker), time.monotonic()
    time.sleep(1.0)  # a measuring window, not a wait for a condition
    busy = (cpu_seconds(worker) - before) / (time.monotonic() - started)
    assert busy < 0.3, f"the worker used {busy:.0%} of a CPU while it had nothing to do"
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0


STUCK_APP = """\
import socketserver, time

class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        line = self.rfile.readline()
        if line.startswith(b"stuck"):
            self.wfile.write(b"stuck\\n")
            time.sleep(3600)
        self.wfile.write(line)
"""


def test_a_worker_whose_threads_are_all_stuck_is_killed(run, tmp_path: Path) -> None:
    (tmp_path / "stuckapp.py").write_text(STUCK_APP)
    proc = run(*CLI, "--bind", "127.0.0.1:0", "--workers", "1", "--threads", "2",
               "--timeout", "1", "stuckapp:Handler", cwd=tmp_path)  # fmt: skip
    port = proc.port()
    (worker,) = wait_workers(proc.pid, 1)

    def stick() -> socket.socket:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"stuck\n")
        assert s.makefile("rb").readline() == b"stuck\n"
        return s

    first = stick()
    # One thread of two stuck: the worker still has room, heartbeats, and answers.
    for i in range(3):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"ping %d\n" % i)
            assert s.makefile("rb").readline() == b"ping %d\n" % i
    proc.wait_output(r"spawned worker\[0\]")
    assert is_alive(worker)
    second = stick()  # now every thread is stuck: no more heartbeat
    proc.wait_output(rf"worker\[0\] \(pid {worker}\) missed its heartbeat", timeout=15)
    wait_for(lambda: not is_alive(worker), what="the stuck worker to be killed")
    for s in (first, second):
        assert s.recv(10) == b"", "its connections die with it"
        s.close()
    (replacement,) = wait_workers(proc.pid, 1)
    assert replacement != worker
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"after\n")
        assert s.makefile("rb").readline() == b"after\n"
    proc.signal(signal.SIGQUIT)
    assert proc.wait(30) == 0


@pytest.mark.parametrize("mode", [["--threads", "8"], ["--asyncio"]], ids=["threads", "asyncio"])
def test_quit_answers_what_each_connection_was_sent(run, mode: list[str]) -> None:
    proc = run(*ECHO, "--bind", "127.0.0.1:0", "--workers", "1", *mode)
    port = proc.port()
    wait_workers(proc.pid, 1)
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(5)]
    for i, s in enumerate(socks):
        s.sendall(b"hello %d" % i)
        assert recv_exactly(s, 7) == b"hello %d" % i
    proc.signal(signal.SIGQUIT)
    for s in socks:
        assert s.recv(10) == b"", "an idle connection is closed by a graceful stop"
        s.close()
    assert proc.wait(30) == 0


IMPATIENT_ASYNCIO = """\
import sys

from examples.echo import EchoHandler
from examples.echo.aio import AsyncioEchoMixIn
from prefork_server.cli import build_parser, serve


class Impatient(AsyncioEchoMixIn):
    request_timeout = 0.5


sys.exit(serve(build_parser().parse_args(), EchoHandler, mixins=(Impatient,)))
"""


def test_asyncio_drops_a_silent_client_and_keeps_a_talking_one(run, tmp_path: Path) -> None:
    script = tmp_path / "impatient.py"
    script.write_text(IMPATIENT_ASYNCIO)
    proc = run(sys.executable, str(script), "--bind", "127.0.0.1:0", "--workers", "1")
    port = proc.port()
    (worker,) = wait_workers(proc.pid, 1)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as silent,
        socket.create_connection(("127.0.0.1", port), timeout=10) as talker,
    ):
        silent.sendall(b"once")
        assert recv_exactly(silent, 4) == b"once"
        silent_from = time.monotonic()
        # The talker speaks every 0.1 s, well within request_timeout, for 1.5 s.
        for i in range(15):
            talker.sendall(b"%02d" % i)
            assert recv_exactly(talker, 2) == b"%02d" % i
            time.sleep(0.1)  # the client's pace, not a wait for the server
        assert silent.recv(1) == b"", "dropped after request_timeout"
        assert 0.4 <= time.monotonic() - silent_from < 5
        talker.sendall(b"still")
        assert recv_exactly(talker, 5) == b"still"
    assert proc.workers() == [worker]
    proc.signal(signal.SIGQUIT)
    assert proc.wait(30) == 0


@pytest.mark.parametrize("mode", [["--threads", "8"], ["--asyncio"]], ids=["threads", "asyncio"])
def test_workers_with_many_connections_share_them(run, mode: list[str]) -> None:
    """An event loop, or the main thread of a worker with handler threads, always waits
    on the listener, so without a policy the worker that is awake anyway (serving a busy
    client) wins the race for the next connection while the other one idles: two busy
    clients would share one worker. Each round opens two chatty connections: each worker
    must hold one."""
    proc = run(*ECHO, "--bind", "127.0.0.1:0", "--workers", "2", *mode)
    port = proc.port()

    def counts() -> list[int]:
        return sorted(v.connections for v in read_scoreboard(proc.pid) if v.booted)

    wait_for(lambda: len(counts()) == 2, what="both workers booted")
    done = threading.Event()

    def chatter(s: socket.socket) -> None:
        while not done.is_set():  # keeps its worker's event loop awake
            s.sendall(b"x" * 64)
            if len(recv_exactly(s, 64)) < 64:
                return

    for round in range(3):
        socks: list[socket.socket] = []
        chatters: list[threading.Thread] = []
        done.clear()
        try:
            for i in range(2):  # one at a time: the first is busy when the second comes
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                socks.append(s)
                s.sendall(b"%d" % i)
                assert recv_exactly(s, 1) == b"%d" % i
                chatters.append(threading.Thread(target=chatter, args=(s,), daemon=True))
                chatters[-1].start()
            assert counts() == [1, 1], f"round {round}: {counts()}"
        finally:
            done.set()
            for t in chatters:
                t.join(10)
            for s in socks:
                s.close()
        wait_for(lambda: counts() == [0, 0], what="the connections to be counted out")
    proc.signal(signal.SIGQUIT)
    assert proc.wait(30) == 0


EMFILE_CONFIG = """\
import os
import resource


def after_fork(worker):
    # Room for a few connections only, counted from what the worker holds now (its
    # event loop or poller will take a few more).
    limit = len(os.listdir("/proc/self/fd")) + 8
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc")
@pytest.mark.parametrize("mode", [["--threads", "32"], ["--asyncio"]], ids=["threads", "asyncio"])
def test_out_of_descriptors_pauses_accepting_and_loses_no_client(
    run, tmp_path: Path, mode: list[str]
) -> None:
    (tmp_path / "conf.py").write_text(EMFILE_CONFIG)
    proc = run(*ECHO, "--bind", "127.0.0.1:0", "--workers", "1", "--config",
               str(tmp_path / "conf.py"), *mode)  # fmt: skip
    port = proc.port()
    (worker,) = wait_workers(proc.pid, 1)
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(16)]
    try:
        for i, s in enumerate(socks):
            s.sendall(b"%02d" % i)
        proc.wait_output(r"\[Errno 24\] Too many open files")
        # Out of descriptors, the worker must not spin on its readable listener.
        before, started = cpu_seconds(worker), time.monotonic()
        time.sleep(1.0)  # a measuring window, not a wait for a condition
        busy = (cpu_seconds(worker) - before) / (time.monotonic() - started)
        assert busy < 0.3, f"the worker used {busy:.0%} of a CPU while it could not accept"
        assert proc.output().count("Too many open files") <= 6, "one warning per pause"
        answered = []
        for s in socks:
            s.settimeout(0.2)
            try:
                answered.append(recv_exactly(s, 2) != b"")
            except TimeoutError:
                answered.append(False)
        assert 0 < sum(answered) < len(socks), answered
        # Each client that got its answer leaves, freeing a descriptor in the worker for
        # a queued one: in the end every client is answered.
        waiting = {i: s for i, s in enumerate(socks) if not answered[i]}
        for s, done in zip(socks, answered, strict=True):
            if done:
                s.close()
        deadline = time.monotonic() + 20
        while waiting and time.monotonic() < deadline:
            for i, s in list(waiting.items()):
                s.settimeout(0.05)
                try:
                    data = recv_exactly(s, 2)
                except TimeoutError:
                    continue
                assert data == b"%02d" % i, f"client {i} got {data!r}"
                s.close()
                del waiting[i]
        assert not waiting, f"queued clients never answered: {sorted(waiting)}"
    finally:
        for s in socks:
            s.close()
    assert proc.workers() == [worker], "the worker survived"
    proc.signal(signal.SIGQUIT)
    assert proc.wait(30) == 0


@pytest.mark.parametrize("mode", [["--threads", "4"], ["--asyncio"]], ids=["threads", "asyncio"])
def test_the_title_says_busy_while_a_connection_lasts_and_idle_after(run, mode) -> None:
    pytest.importorskip("setproctitle")  # without it only the 15-byte task name can change
    proc = run(*ECHO, "--bind", "127.0.0.1:0", "--workers", "1", "--timeout", "30", *mode)
    port = proc.port()
    (worker,) = wait_workers(proc.pid, 1)

    def title() -> str:
        return Path(f"/proc/{worker}/cmdline").read_text().replace("\0", " ").strip()

    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"one\n")
        assert recv_exactly(s, 4) == b"one\n"
        wait_for(lambda: "worker[0] busy, 0 served" in title(), what="the busy title")
    # Shown once the worker has been idle a moment: its loop wakes for it, although the
    # heartbeat alone would come only every 7.5 s (timeout 30).
    wait_for(lambda: "worker[0] idle, 1 served" in title(), timeout=5, what="the idle title")
    proc.signal(signal.SIGQUIT)
    assert proc.wait(30) == 0
