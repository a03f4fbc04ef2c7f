"""A ping-pong load client for echo servers, and the plumbing the echo benchmarks share.

::

    python bench/echo_load.py --port 9000 --connections 50 --duration 5

Each of C connections sends a 64-byte message and waits for the whole echo before it sends
the next, for D seconds. The client is built so as not to be the bottleneck on a small
machine: the connections are split over P processes (default: one per CPU, at most C); a
process holding one connection uses blocking ``send``/``recv`` (two system calls per round
trip, as little as a client can do), a process holding several waits for all of them in one
``epoll``. It reports round trips per second, the p50 and p99 latency of a round trip, how
many connections got at least one answer (a worker that serves one connection at a time
leaves the others waiting in the accept queue: they count as not served), and the client's
own CPU time per round trip.

The rest of the module starts the servers under test and ends them, and reads their CPU
time from ``/proc``: :func:`start_server` runs a command in a session of its own, so that
:func:`stop_server` finds every process it started (workers, forked handlers) by session
id and ends each by its pid. Linux only; loopback only.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import os
import pickle
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
LOOPBACK = "127.0.0.1"
MESSAGE_SIZE = 64
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the load client ----------------------------------------------------------------------


@dataclass
class LoadResult:
    connections: int
    duration: float  # seconds measured (the same window in every client process)
    round_trips: int = 0
    served: int = 0  # connections that got at least one answer
    failed: int = 0  # connections refused, reset or closed by the server
    client_cpu: float = 0.0  # seconds of CPU the client processes used while measuring
    latencies_ns: array.array[int] = field(default_factory=lambda: array.array("q"))

    @property
    def rate(self) -> float:
        """Round trips per second."""
        return self.round_trips / self.duration if self.duration > 0 else 0.0

    def percentile(self, q: float) -> float:
        """The q-th percentile (0..100) of the round-trip latency, in microseconds."""
        if not self.latencies_ns:
            return float("nan")
        ordered = sorted(self.latencies_ns)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] / 1000

    def client_cpu_per_rt(self) -> float:
        """Microseconds of client CPU per round trip."""
        return self.client_cpu / self.round_trips * 1e6 if self.round_trips else float("nan")

    def __str__(self) -> str:
        return (
            f"{self.rate:,.0f} round trips/s, p50 {fmt_us(self.percentile(50))}, "
            f"p99 {fmt_us(self.percentile(99))}, served {self.served}/{self.connections}, "
            f"failed {self.failed}, client CPU {self.client_cpu_per_rt():.1f} us/round trip"
        )


def run_load(
    port: int,
    connections: int,
    duration: float,
    *,
    processes: int | None = None,
    size: int = MESSAGE_SIZE,
    connect_timeout: float = 5.0,
    on_start: Callable[[], None] | None = None,
    on_stop: Callable[[], None] | None = None,
) -> LoadResult:
    """Ping-pong ``size``-byte messages over ``connections`` connections to loopback
    ``port`` for ``duration`` seconds.

    ``on_start`` is called once every connection is made, just before the clients start;
    ``on_stop`` as soon as the first client reports that its time is up (to read the
    server's CPU time over the measured window only). Bounded: connecting takes at most
    ``connect_timeout``, measuring ``duration``; every client process is reaped, and
    killed by its pid first if anything went wrong.
    """
    procs = max(1, min(connections, processes or os.cpu_count() or 1))
    shares = [connections // procs + (i < connections % procs) for i in range(procs)]
    go_r, go_w = os.pipe()
    children: dict[int, int] = {}  # pid -> read end of the pipe it reports on
    result = LoadResult(connections, duration)
    try:
        for share in shares:
            res_r, res_w = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: never returns
                code = 1
                try:
                    os.close(go_w)
                    os.close(res_r)
                    _client(port, share, duration, size, connect_timeout, go_r, res_w)
                    code = 0
                finally:
                    os._exit(code)
            os.close(res_w)
            children[pid] = res_r
        os.close(go_r)
        go_r = -1
        # Every process connects first and says so; closing the pipe starts them together.
        for res_r in children.values():
            ready, _, _ = select.select([res_r], [], [], connect_timeout + 5)
            if not ready or os.read(res_r, 1) != b"r":
                raise RuntimeError("a load client process did not connect")
        if on_start is not None:
            on_start()
        os.close(go_w)
        go_w = -1
        for pid in list(children):
            fd, children[pid] = children[pid], -1  # _read_report closes it, come what may
            out = _read_report(fd, duration + 15)
            if on_stop is not None:
                on_stop()
                on_stop = None
            os.waitpid(pid, 0)
            del children[pid]
            result.round_trips += out["round_trips"]
            result.served += out["served"]
            result.failed += out["failed"]
            result.client_cpu += out["cpu"]
            result.latencies_ns.frombytes(out["latencies"])
    finally:
        for fd in (go_r, go_w, *children.values()):
            if fd >= 0:
                os.close(fd)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    return result


class _Report(TypedDict):
    """What a client process sends back, pickled."""

    round_trips: int
    served: int  # its connections that completed a round trip
    failed: int
    cpu: float  # its user + system seconds
    latencies: bytes  # array("q") of round-trip times in ns


def _read_report(fd: int, timeout: float) -> _Report:
    deadline = time.monotonic() + timeout
    data = b""
    try:
        while True:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise RuntimeError("a load client process did not report in time")
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    report: _Report = pickle.loads(data)
    return report


def _client(
    port: int,
    count: int,
    duration: float,
    size: int,
    connect_timeout: float,
    go_fd: int,
    report_fd: int,
) -> None:
    """One client process: connect ``count`` sockets, say ``r``, wait for the go, run,
    report a pickled dict on ``report_fd``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent ends us (at the deadline)
    socks, failed = _connect_all(port, count, connect_timeout)
    os.write(report_fd, b"r")
    os.read(go_fd, 1)  # returns at EOF: the parent closed its end
    cpu0 = _cpu_self()
    start = time.perf_counter_ns()
    deadline = start + int(duration * 1e9)
    message = b"x" * size
    lat = array.array("q")
    per_conn = [0] * len(socks)
    if len(socks) == 1:
        failed += _ping_pong_blocking(socks[0], message, deadline, lat, per_conn)
    elif socks:
        failed += _ping_pong_epoll(socks, message, deadline, lat, per_conn)
    cpu = _cpu_self() - cpu0
    report: _Report = {
        "round_trips": len(lat),
        "served": sum(1 for n in per_conn if n),
        "failed": failed,
        "cpu": cpu,
        "latencies": lat.tobytes(),
    }
    with os.fdopen(report_fd, "wb") as f:
        pickle.dump(report, f)
    for s in socks:
        s.close()


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _connect_all(port: int, count: int, timeout: float) -> tuple[list[socket.socket], int]:
    """Connect ``count`` sockets at once (non-blocking); return those connected and the
    number that failed. A connection waiting in an accept queue is connected: whether a
    worker ever takes it is what the run shows."""
    pending: dict[int, socket.socket] = {}
    failed = 0
    with select.epoll() as ep:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(False)
            err = s.connect_ex((LOOPBACK, port))
            if err not in (0, 115):  # 115: EINPROGRESS
                s.close()
                failed += 1
                continue
            pending[s.fileno()] = s
            ep.register(s.fileno(), select.EPOLLOUT)
        connected = []
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for fd, _ in ep.poll(max(0.0, deadline - time.monotonic())):
                s = pending.pop(fd)
                ep.unregister(fd)
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    s.close()
                    failed += 1
                else:
                    connected.append(s)
    for s in pending.values():
        s.close()
    return connected, failed + len(pending)


def _ping_pong_blocking(
    s: socket.socket, message: bytes, deadline: int, lat: array.array[int], per_conn: list[int]
) -> int:
    """One connection: blocking send/recv; a kernel receive timeout (no ``poll`` per call,
    as a Python-level timeout would add) lets it notice the deadline. Returns failures."""
    s.setblocking(True)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 100_000))
    size = len(message)
    now = time.perf_counter_ns
    try:
        while True:
            sent = now()
            s.send(message)
            got = 0
            while got < size:
                try:
                    data = s.recv(65536)
                except BlockingIOError:  # SO_RCVTIMEO expired: nothing yet
                    if now() >= deadline:
                        return 0
                    continue
                if not data:
                    return 1
                got += len(data)
            done = now()
            if done >= deadline:
                return 0
            lat.append(done - sent)
            per_conn[0] += 1
    except OSError:
        return 1


def _ping_pong_epoll(
    socks: list[socket.socket],
    message: bytes,
    deadline: int,
    lat: array.array[int],
    per_conn: list[int],
) -> int:
    """Several connections in one ``epoll``: each sends again as soon as its whole echo is
    back. Returns the number of connections that failed."""
    size = len(message)
    now = time.perf_counter_ns
    index = {s.fileno(): i for i, s in enumerate(socks)}
    by_fd = {s.fileno(): s for s in socks}
    got = dict.fromkeys(by_fd, 0)
    sent: dict[int, int] = {}
    failed = 0
    with select.epoll() as ep:
        for fd, s in by_fd.items():
            try:
                s.send(message)
            except OSError:
                failed += 1
                continue
            sent[fd] = now()
            ep.register(fd, select.EPOLLIN)
        while True:
            remaining = (deadline - now()) / 1e9
            if remaining <= 0:
                break
            for fd, _ in ep.poll(remaining):
                s = by_fd[fd]
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    ep.unregister(fd)
                    failed += 1
                    continue
                got[fd] += len(data)
                if got[fd] < size:
                    continue
                got[fd] -= size
                done = now()
                if done >= deadline:
                    break
                lat.append(done - sent[fd])
                per_conn[index[fd]] += 1
                try:
                    s.send(message)
                except OSError:
                    ep.unregister(fd)
                    failed += 1
                    continue
                sent[fd] = done
    return failed


# -- the servers under test -------------------------------------------------------------


@dataclass
class Server:
    """A server command to benchmark; ``{port}`` in ``argv`` is replaced by its port."""

    name: str
    argv: list[str]
    port: int = 0
    env: dict[str, str] = field(default_factory=dict)  # added to the environment
    tree: Path = REPO  # the source tree it runs from (first on PYTHONPATH)
    cwd: Path | None = None  # where it runs (default: its tree)
    proc: subprocess.Popen[bytes] | None = None


def free_port() -> int:
    """A loopback port free now, below the kernel's ephemeral range: a port from that
    range may be taken by any outgoing connection (ours or another program's) before the
    server binds it."""
    import random

    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(50):
        port = random.randrange(10000, max(10001, low))
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind((LOOPBACK, port))
            return port
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def python_env(tree: Path = REPO, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a server: ``tree`` first on ``sys.path`` (so the working tree,
    or a scratch copy of it, is what runs), unbuffered output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tree), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def start_server(server: Server, log_dir: Path) -> None:
    """Start ``server`` in a session of its own (stop_server relies on it), in its tree
    (``python -m`` puts the working directory first on ``sys.path``)."""
    if not server.port:
        server.port = free_port()
    argv = [a.replace("{port}", str(server.port)) for a in server.argv]
    safe = "".join(c if c.isalnum() else "_" for c in server.name)
    with open(log_dir / f"bench-{safe}.log", "wb") as log:  # the last start's log
        server.proc = subprocess.Popen(
            argv,
            cwd=server.cwd or server.tree,
            env=python_env(server.tree, server.env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_until_echoes(server: Server, timeout: float = 20.0) -> float:
    """Poll until the server echoes a message; return the seconds it took."""
    start = time.monotonic()
    deadline = start + timeout
    while time.monotonic() < deadline:
        if server.proc is not None and server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with status {server.proc.returncode}")
        if echo_once(server.port, timeout=max(0.1, deadline - time.monotonic())):
            return time.monotonic() - start
        time.sleep(0.005)
    raise RuntimeError(f"{server.name} did not echo on port {server.port} in {timeout}s")


def echo_once(port: int, message: bytes = b"ping", timeout: float = 5.0) -> bool:
    """Connect, send ``message``, read its echo, close. False if refused or wrong."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
            s.sendall(message)
            got = b""
            while len(got) < len(message):
                chunk = s.recv(65536)
                if not chunk:
                    return False
                got += chunk
            return got == message
    except OSError:
        return False


def stop_server(server: Server) -> None:
    """End the server and everything it started: SIGTERM to its master, then SIGKILL to
    every process of its session, each by pid."""
    proc = server.proc
    if proc is None:
        return
    members = session_members(proc.pid)
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    for pid in set(members + session_members(proc.pid)) - {proc.pid}:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    server.proc = None


@contextlib.contextmanager
def serving(servers: Sequence[Server], log_dir: Path | None = None) -> Iterator[None]:
    """Start every server, wait until each echoes, and stop them all whatever happens."""
    log_dir = log_dir or Path(os.environ.get("TMPDIR", "/tmp"))
    try:
        for server in servers:
            start_server(server, log_dir)
        for server in servers:
            for attempt in range(3):
                try:
                    wait_until_echoes(server)
                    break
                except RuntimeError:
                    # Most likely its port was taken before it could bind: another one.
                    stop_server(server)
                    if attempt == 2:
                        raise
                    server.port = 0
                    start_server(server, log_dir)
        yield
    finally:
        for server in servers:
            stop_server(server)


# -- /proc ------------------------------------------------------------------------------


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (field 3 onwards), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def session_members(sid: int, zombies: bool = False) -> list[int]:
    """Pids of the live processes in session ``sid`` (the master, workers, handlers),
    with the exited ones not reaped yet if ``zombies``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = proc_stat(int(entry))
            if fields and int(fields[3]) == sid and (zombies or fields[0] not in ("Z", "X")):
                found.append(int(entry))
    return found


def children_of(pid: int) -> list[int]:
    """Live child pids of ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = proc_stat(int(entry))
            if fields and int(fields[1]) == pid and fields[0] not in ("Z", "X"):
                found.append(int(entry))
    return sorted(found)


def cpu_seconds(pid: int, with_children: bool = True) -> float:
    """User + system CPU of ``pid`` (all its threads), plus that of its reaped children."""
    fields = proc_stat(pid)
    if fields is None:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    if with_children:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
    return ticks / CLK_TCK


def session_cpu(sid: int) -> float:
    """CPU seconds used so far by session ``sid``: each live process plus what it reaped.
    Unchanged when a process exits and its parent reaps it, so differences are exact."""
    return sum(cpu_seconds(pid) for pid in session_members(sid, zombies=True))


def status_field(pid: int, name: str) -> int:
    """An integer field of /proc/PID/status (``voluntary_ctxt_switches``...), 0 if gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# -- strace ---------------------------------------------------------------------------


@dataclass
class SyscallCounts:
    calls: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def per(self, n: int, top: int = 6) -> str:
        """The most frequent calls per unit of ``n``, as ``recvfrom 1.00, sendto 1.00``."""
        ranked = sorted(self.calls.items(), key=lambda kv: -kv[1])[:top]
        return ", ".join(f"{name} {calls / n:.2f}" for name, calls in ranked) or "-"


@contextlib.contextmanager
def strace_counts(
    pids: Sequence[int], calls: str | None = None, timeout: float = 10.0
) -> Iterator[SyscallCounts]:
    """``strace -c -f`` attached to ``pids`` for the duration of the block; the counts are
    filled in when the block ends (strace is stopped with SIGINT, by its pid). ``calls``
    is an optional ``-e trace=`` list."""
    import tempfile

    counts = SyscallCounts()
    with tempfile.TemporaryDirectory(prefix="bench-strace-") as tmp:
        out, err = Path(tmp) / "counts", Path(tmp) / "stderr"
        argv = ["strace", "-c", "-f", "-o", str(out)]
        if calls:
            argv += ["-e", f"trace={calls}"]
        for pid in pids:
            argv += ["-p", str(pid)]
        with open(err, "wb") as err_file:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=err_file)
        try:
            deadline = time.monotonic() + timeout
            while err.read_text().count("attached") < len(pids):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"strace did not attach: {err.read_text().strip()}")
                time.sleep(0.02)
            yield counts
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if out.exists():
            parse_strace_counts(out.read_text(), counts)


def parse_strace_counts(text: str, into: SyscallCounts) -> None:
    """Read the table of ``strace -c`` (``% time seconds usecs/call calls [errors]
    syscall``), without its total line."""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) in (5, 6) and parts[0][0].isdigit() and parts[-1] != "total":
            into.calls[parts[-1]] = into.calls.get(parts[-1], 0) + int(parts[3])
            if len(parts) == 6:
                into.errors[parts[-1]] = into.errors.get(parts[-1], 0) + int(parts[4])


# -- output -----------------------------------------------------------------------------


def fmt_us(us: float) -> str:
    if us != us:  # NaN
        return "-"
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.0f} us"


def table(
    header: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool = False, left: int = 1
) -> str:
    """A table as aligned text (the first ``left`` columns to the left, the others to the
    right), or as Markdown."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [header, *rows]
    )


def exit_on_sigterm() -> None:
    """Make SIGTERM raise SystemExit, so that ``finally`` blocks end what we started."""

    def raise_exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, raise_exit)


def machine() -> str:
    """One line on the machine: kernel, CPUs, CPU model, Python."""
    import platform

    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"{platform.system()} {platform.release()}, {os.cpu_count()} CPUs ({cpu}), "
        f"Python {platform.python_version()}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--port", type=int, required=True, help="loopback port of the echo server")
    p.add_argument("--connections", "-c", type=int, default=2, help="connections (2)")
    p.add_argument("--duration", "-d", type=float, default=3.0, help="seconds (3)")
    p.add_argument("--processes", "-p", type=int, default=None, help="client processes")
    p.add_argument("--size", type=int, default=MESSAGE_SIZE, help="message bytes (64)")
    p.add_argument("--quick", action="store_true", help="one second")
    args = p.parse_args(argv)
    exit_on_sigterm()
    duration = 1.0 if args.quick else args.duration
    result = run_load(
        args.port, args.connections, duration, processes=args.processes, size=args.size
    )
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
