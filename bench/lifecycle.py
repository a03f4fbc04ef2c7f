"""What the master and its workers cost and how fast they react, next to the floor.

::

    python bench/lifecycle.py            # every figure, about 1.5 minutes
    python bench/lifecycle.py --quick    # fewer repetitions, 3 s of idling
    python bench/lifecycle.py --only start,syscalls

Figures (medians of a few repetitions; ``examples.echo`` unless said otherwise):

- **start**: from ``Popen`` to the first echoed message, with N = 2 and 8 workers, and to
  all N workers forked; the floor and a bare ``python -c pass`` for reference.
- **respawn**: from ``kill -9`` of the only worker to the next connection's echo (a new
  worker answers: the master reaped, forked, and the new worker accepted).
- **timeout**: a handler module written to a temporary directory answers one byte and
  sleeps forever, served by ``python -m prefork_server.cli --timeout T``; how long after
  that byte the connection is cut (the master killed the worker), and how much later than
  T that is.
- **idle**: CPU time and wake-ups (voluntary context switches) of the master and of each
  worker over 10 s without clients, for the sync, ``--threads`` and ``--asyncio`` modes
  and the floor, all idling in the same window.
- **memory**: PSS and USS (private) per process from ``/proc/PID/smaps_rollup``.
- **syscalls**: ``strace -c -f`` on the workers (and separately on the master) while one
  connection makes M round trips, and while M connections make one round trip each;
  calls per request, against the floor.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from echo_load import (
    BENCH,
    LOOPBACK,
    REPO,
    Server,
    children_of,
    echo_once,
    exit_on_sigterm,
    machine,
    run_load,
    serving,
    start_server,
    stop_server,
    strace_counts,
    table,
)

PY = sys.executable
LOG_DIR = Path(tempfile.gettempdir())


def echo_server(workers: int, *extra: str, timeout: float | None = None) -> Server:
    argv = [PY, "-m", "examples.echo", "--bind", "127.0.0.1:{port}", "--workers", str(workers),
            "--log-level", "warning", *extra]  # fmt: skip
    if timeout is not None:
        argv += ["--timeout", str(timeout)]
    name = " ".join(["examples.echo", *extra]).strip()
    return Server(name, argv)


def floor_server(workers: int) -> Server:
    return Server("floor", [PY, str(BENCH / "floor_echo.py"), "--port", "{port}",
                            "--workers", str(workers)])  # fmt: skip


@contextlib.contextmanager
def one(server: Server) -> Iterator[Server]:
    with serving([server], LOG_DIR):
        yield server


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


# -- start --------------------------------------------------------------------------------


def time_start(make: Callable[[int], Server], workers: int) -> tuple[float, float]:
    """Seconds from Popen to the first echo, and to all workers forked."""
    server = make(workers)
    start = time.monotonic()
    first = forked = float("nan")
    try:
        start_server(server, LOG_DIR)
        assert server.proc is not None
        deadline = start + 20
        while time.monotonic() < deadline and (first != first or forked != forked):
            if server.proc.poll() is not None:
                raise RuntimeError(f"{server.name} exited with {server.proc.returncode}")
            if forked != forked and len(children_of(server.proc.pid)) >= workers:
                forked = time.monotonic() - start
            if first != first and echo_once(server.port, timeout=2):
                first = time.monotonic() - start
            time.sleep(0.002)
    finally:
        stop_server(server)
    return first, forked


def bench_start(reps: int) -> list[list[str]]:
    rows = []
    bare = []
    for _ in range(reps):
        t = time.monotonic()
        subprocess.run([PY, "-c", "pass"], check=True)
        bare.append(time.monotonic() - t)
    rows.append(["python -c pass (interpreter start)", "-", ms(statistics.median(bare)), "-"])
    for n in (2, 8):
        for make in (lambda w: echo_server(w), floor_server):
            runs = [time_start(make, n) for _ in range(reps)]
            rows.append([
                make(n).name, str(n), ms(statistics.median(r[0] for r in runs)),
                ms(statistics.median(r[1] for r in runs)),
            ])  # fmt: skip
    return rows


# -- respawn ------------------------------------------------------------------------------


def bench_respawn(reps: int) -> list[list[str]]:
    times = []
    with one(echo_server(1)) as server:
        assert server.proc is not None
        for _ in range(reps):
            (old,) = children_of(server.proc.pid)
            assert echo_once(server.port)
            time.sleep(0.2)  # the worker is back in its wait
            start = time.monotonic()
            signal_pid(old, signal.SIGKILL)
            if not echo_once(server.port, timeout=10):
                raise RuntimeError("no answer after the worker was killed")
            times.append(time.monotonic() - start)
            new = children_of(server.proc.pid)
            assert new and new[0] != old, (old, new)
    return [["examples.echo", "1", ms(statistics.median(times)), ms(max(times))]]


def signal_pid(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


# -- timeout ------------------------------------------------------------------------------

SLEEPY = '''\
"""A handler that answers one byte, then is stuck for good (lifecycle.py's timeout test)."""
import socketserver
import time


class Sleepy(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.sendall(b"s")
        time.sleep(1e9)
'''


def bench_timeout(reps: int, timeouts: tuple[float, ...]) -> list[list[str]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-sleepy-") as tmp:
        Path(tmp, "bench_sleepy.py").write_text(SLEEPY)
        for timeout in timeouts:
            argv = [PY, "-m", "prefork_server.cli", "--bind", "127.0.0.1:{port}",
                    "--workers", "1", "--timeout", str(timeout), "--log-level", "error",
                    "bench_sleepy:Sleepy"]  # fmt: skip
            server = Server(f"prefork-server --timeout {timeout:g}", argv, cwd=Path(tmp))
            cut = []
            try:
                start_server(server, LOG_DIR)
                for _ in range(reps):
                    cut.append(stuck_for(server.port, timeout + 30))
            finally:
                stop_server(server)
            late = [c - timeout for c in cut]
            rows.append([server.name, ms(statistics.median(cut)), ms(statistics.median(late)),
                         ms(max(late))])  # fmt: skip
    return rows


def stuck_for(port: int, limit: float) -> float:
    """Connect (retrying until the server listens), wait for the handler's byte, then
    return how long the connection stayed open."""
    deadline = time.monotonic() + limit
    while True:
        try:
            s = socket.create_connection((LOOPBACK, port), timeout=limit)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    with s:
        if s.recv(1) != b"s":
            raise RuntimeError("the stuck handler did not answer")
        start = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            while s.recv(1):
                pass
        return time.monotonic() - start


# -- idle and memory ----------------------------------------------------------------------


def idle_servers() -> list[Server]:
    return [echo_server(2), echo_server(2, "--threads", "16"), echo_server(2, "--asyncio"),
            floor_server(2)]  # fmt: skip


def process_figures(pid: int) -> tuple[float, int]:
    """CPU seconds (nanosecond resolution, from schedstat) and voluntary context switches
    (each a wake-up after a wait), summed over the process's threads."""
    cpu, wakes = 0.0, 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            cpu += int((task / "schedstat").read_text().split()[0]) / 1e9
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    wakes += int(line.split()[1])
    return cpu, wakes


def bench_idle_and_memory(seconds: float) -> tuple[list[list[str]], list[list[str]]]:
    servers = idle_servers()
    idle_rows, memory_rows = [], []
    with serving(servers, LOG_DIR):
        roles: dict[str, list[tuple[str, int]]] = {}
        for server in servers:
            assert server.proc is not None
            run_load(server.port, 2, 0.5)  # touch the pages a served connection needs
            master = server.proc.pid
            roles[server.name] = [("master", master)] + [("worker", w) for w in children_of(master)]
        time.sleep(1.0)
        before = {pid: process_figures(pid) for procs in roles.values() for _, pid in procs}
        time.sleep(seconds)
        after = {pid: process_figures(pid) for procs in roles.values() for _, pid in procs}
        for name, procs in roles.items():
            for role in ("master", "worker"):
                pids = [pid for r, pid in procs if r == role]
                cpu = statistics.mean(after[p][0] - before[p][0] for p in pids)
                wakes = statistics.mean(after[p][1] - before[p][1] for p in pids)
                idle_rows.append([name, role + ("s (each)" if role == "worker" else ""),
                                  f"{cpu * 1000:.2f} ms", f"{wakes:.1f}"])  # fmt: skip
                pss = statistics.mean(smaps(p, "Pss") for p in pids)
                uss = statistics.mean(smaps(p, "Private_Clean") + smaps(p, "Private_Dirty")
                                      for p in pids)  # fmt: skip
                rss = statistics.mean(smaps(p, "Rss") for p in pids)
                memory_rows.append([name, role, f"{pss / 1024:.1f} MiB", f"{uss / 1024:.1f} MiB",
                                    f"{rss / 1024:.1f} MiB"])  # fmt: skip
    return idle_rows, memory_rows


def smaps(pid: int, name: str) -> int:
    """A field of /proc/PID/smaps_rollup, in KiB."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return 0


# -- system calls ---------------------------------------------------------------------------


def ping_pong(port: int, count: int) -> None:
    with socket.create_connection((LOOPBACK, port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            s.sendall(b"x" * 64)
            got = 0
            while got < 64:
                chunk = s.recv(65536)
                if not chunk:
                    raise RuntimeError("the server closed the connection")
                got += len(chunk)


def one_per_connection(port: int, count: int) -> None:
    for _ in range(count):
        if not echo_once(port, b"x" * 64, timeout=10):
            raise RuntimeError("no echo")


def bench_syscalls(round_trips: int, connections: int) -> list[list[str]]:
    rows = []
    for server in (echo_server(2), floor_server(2)):
        with one(server):
            assert server.proc is not None
            master = server.proc.pid
            workers = children_of(master)
            loads = (
                (f"round trip on an open connection (x{round_trips})", ping_pong, round_trips),
                (f"connection with one round trip (x{connections})", one_per_connection,
                 connections),
            )  # fmt: skip
            for label, load, n in loads:
                with strace_counts(workers) as in_workers, strace_counts([master]) as in_master:
                    load(server.port, n)
                    time.sleep(0.1)  # the last connection's close
                rows.append([server.name, label, f"{in_workers.total / n:.2f}",
                             in_workers.per(n), f"{in_master.total / n:.3f}"])  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--only", default="start,respawn,timeout,idle,syscalls",
                   help="comma-separated figures (default: all)")  # fmt: skip
    p.add_argument("--reps", type=int, default=5, help="repetitions of the timed figures (5)")
    p.add_argument("--idle-seconds", type=float, default=10.0, help="idle window (10)")
    p.add_argument("--quick", action="store_true", help="2 repetitions, 3 s idle")
    p.add_argument("--markdown", action="store_true", help="print the tables in Markdown")
    args = p.parse_args(argv)
    exit_on_sigterm()
    if args.quick:
        args.reps, args.idle_seconds = 2, 3.0
    only = set(args.only.split(","))
    sys.path.insert(0, str(REPO))
    md = args.markdown
    print(f"lifecycle: {machine()}", flush=True)
    started = time.monotonic()

    def show(title: str, header: list[str], rows: list[list[str]]) -> None:
        print(f"\n{title}\n" + table(header, rows, md), flush=True)

    if "start" in only:
        show("Start: from Popen to the first echo, and to N workers forked (median)",
             ["server", "workers", "first answer", "all forked"],
             bench_start(max(1, args.reps - 2)))  # fmt: skip
    if "respawn" in only:
        show("Respawn: from kill -9 of the only worker to the next echo",
             ["server", "workers", "median", "max"], bench_respawn(args.reps))  # fmt: skip
    if "timeout" in only:
        timeouts = (1.0,) if args.quick else (1.0, 2.0)
        show("Stuck handler: how long its connection lives (the master kills the worker)",
             ["server", "cut after (median)", "late (median)", "late (max)"],
             bench_timeout(max(2, args.reps - 2), timeouts))  # fmt: skip
    if "idle" in only or "memory" in only:
        idle, memory = bench_idle_and_memory(args.idle_seconds)
        show(f"Idle for {args.idle_seconds:g} s: CPU time and wake-ups (voluntary context "
             "switches), 2 workers, timeout 5 s",
             ["server", "process", "CPU", "wake-ups"], idle)  # fmt: skip
        show("Memory after serving: proportional (PSS), private (USS) and resident set, "
             "mean per process",
             ["server", "process", "PSS", "USS", "RSS"], memory)  # fmt: skip
    if "syscalls" in only:
        rounds, conns = (500, 100) if args.quick else (2000, 300)
        show("System calls per request (strace -c -f), 2 workers",
             ["server", "requests", "per request, workers", "most frequent, per request",
              "master"], bench_syscalls(rounds, conns))  # fmt: skip
    print(f"\nlifecycle: {(time.monotonic() - started) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
