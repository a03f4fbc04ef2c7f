"""examples/http against an h11 floor and gunicorn (sync and gthread), side by side, with wrk.

::

    python bench/http_bench.py                        # 2 and 4 workers, 5 rounds of 2 s
    python bench/http_bench.py --quick                # 2 workers, c = 2 and 50, 1 round of 1 s
    python bench/http_bench.py --workers 2 --rounds 5 --duration 5 --markdown
    python bench/chart.py                             # the PNG chart of the last run
    python bench/http_bench.py --workers 2 --only "examples.http,h11 floor" --base HEAD~1
                                                      # a change, side by side with before
    python bench/http_bench.py --workers 2 --modes keep-alive --connections 2 --rounds 20 \
        --only "examples.http,h11 floor" --floor-work-us 5
                                                      # and a floor spinning 5 us per request

Every server serves the same 14-byte response, on loopback, with the same number of workers:

- ``examples.http``: ``python -m examples.http --no-access-log`` with ``bench/hello_app.py``;
- ``h11 floor``: ``bench/h11_floor.py``, a pre-fork loop with h11 and no framework nor WSGI,
  writing the very bytes examples.http writes (blocking ``accept``, a keep-alive client
  keeps its worker until it leaves);
- ``gunicorn sync``: ``gunicorn -k sync`` with the same WSGI application (it closes every
  connection, whatever the client asks);
- ``gunicorn gthread``: ``gunicorn -k gthread --threads 4`` (keep-alive, 4 threads per
  worker);
- with ``--floor-work-us N``, ``h11 floor +N us`` too: the floor spinning N us before each
  response (user time only). With N set to examples.http's extra CPU per request over the
  floor's, it shows how much of examples.http's distance to the floor that extra CPU
  explains. Measure N on the machine at hand, and like for like: with one worker each and
  ``wrk -t1 -c1`` on the same CPU (``taskset -c 1``), or from the per-run lines of rounds
  under 0.05 rescheduling interrupts per request; the ``CPU/req`` column also counts
  rounds that ran with wrk's threads across CPUs from the workers, which cost every
  server more. Two values of N on either side of the right one bracket the answer.

For each worker count, each of keep-alive and ``Connection: close`` (``wrk -H 'Connection:
close'``) and each connection count, wrk (``-t2 --latency --timeout 5s``) runs against
every server in turn, the order rotated from one round to the next, for several rounds;
every server runs for the whole benchmark. The table shows medians over the rounds of
requests/s, wrk's p50 and p99 latency and the workers' CPU time per request (the
scheduler's on-CPU time from /proc/PID/task/*/schedstat), the socket errors and non-2xx
responses of all rounds, how many of wrk's connections were served at all (the fewest of
any round), and ratios of requests/s to gunicorn sync and to the h11 floor (the median of
the round-by-round ratios: each pair was measured minutes apart at most).

"Served": wrk does not say how many of its connections got an answer, and with one
connection per wrk thread (the only way a wrk Lua script can tell connections apart) wrk
itself costs 10 to 25% more CPU. So it is read from the kernel instead, without touching the
servers: wrk's sockets to the server's port, with the bytes each has received (its
``TCP_INFO``, through a copy of wrk's descriptor; or from ``ss -tie`` where copying is not
allowed), twice in a run (at 25% and at 90% of it). A socket present both times
(same inode) that has received no byte by the second look sat in the accept queue, unserved,
for that whole span: ``served = connections - those``. A connection the server closes is
reconnected by wrk with a new socket, which the count does not mistake for a starved one
unless it too waits the whole span.

Results also go to ``$TMPDIR/http_bench.json`` (or ``--json PATH``), which ``chart.py``
reads. Needs ``wrk``, ``ss`` (iproute2) and ``gunicorn`` (``pip install -e '.[bench]'``:
benchmark-only dependencies). Every process started here is ended by its pid.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import math
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from echo_load import (
    BENCH,
    REPO,
    Server,
    children_of,
    exit_on_sigterm,
    free_port,
    start_server,
    stop_server,
)

APP = "hello_app:app"
EXPECTED_BODY = b"Hello, world!\n"
OURS, FLOOR, SYNC, GTHREAD = "examples.http", "h11 floor", "gunicorn sync", "gunicorn gthread"
GTHREAD_THREADS = 4


@dataclass
class Sample:
    rps: float
    p50_us: float
    p99_us: float
    socket_errors: int  # connect, read, write, timeout
    non2xx: int
    requests: int
    served: int = 0  # of wrk's connections, those that got an answer
    cpu_us: float = 0.0  # the workers' CPU time (user + system) per request
    ipi: float = -1.0  # rescheduling interrupts per request, machine-wide (-1: unknown)


@dataclass
class Contender:
    name: str
    workers: int
    server: Server
    samples: dict[str, list[Sample]] = field(default_factory=dict)  # scenario key -> rounds


def scenario_key(mode: str, conns: int) -> str:
    return f"{mode} c={conns}"


def work_floor(work_us: float) -> str:
    """The name of the h11 floor that spins ``work_us`` per request (``--floor-work-us``)."""
    return f"{FLOOR} +{work_us:.10g} us"


def commands(workers: int, ours_extra: str, floor_work_us: float = 0.0) -> dict[str, list[str]]:
    py = sys.executable
    argvs = {
        OURS: [py, "-m", "examples.http", "--bind", "127.0.0.1:{port}", "--workers",
               str(workers), "--no-access-log", "--log-level", "warning", *ours_extra.split(),
               APP],
        FLOOR: [py, str(BENCH / "h11_floor.py"), "--bind", "127.0.0.1:{port}", "--workers",
                str(workers)],
        SYNC: ["gunicorn", "-b", "127.0.0.1:{port}", "-k", "sync", "-w", str(workers),
               "--log-level", "warning", APP],
        GTHREAD: ["gunicorn", "-b", "127.0.0.1:{port}", "-k", "gthread", "--threads",
                  str(GTHREAD_THREADS), "-w", str(workers), "--log-level", "warning", APP],
    }  # fmt: skip
    if floor_work_us > 0:
        argvs[work_floor(floor_work_us)] = [*argvs[FLOOR], "--work-us", f"{floor_work_us:.10g}"]
    return argvs


def answers(port: int, timeout: float = 2.0) -> bool:
    """One ``Connection: close`` GET: True if it gets a 200 with the expected body."""
    request = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(request)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError:
        return False
    return data.startswith(b"HTTP/1.1 200") and data.endswith(EXPECTED_BODY)


def start_all(contenders: list[Contender], log_dir: Path) -> None:
    """Start every server (in its own session) and wait until each answers; a server whose
    port was taken before it could bind gets another port (3 tries)."""
    for c in contenders:
        start_server(c.server, log_dir)
    for c in contenders:
        for attempt in range(3):
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                proc = c.server.proc
                if (proc is not None and proc.poll() is not None) or answers(c.server.port):
                    break
                time.sleep(0.05)
            if c.server.proc is not None and c.server.proc.poll() is None:
                if answers(c.server.port):
                    break
            stop_server(c.server)
            if attempt == 2:
                raise RuntimeError(f"{c.name} ({c.workers} workers) did not start: see its log")
            c.server.port = 0
            start_server(c.server, log_dir)


_UNITS = {"us": 1.0, "ms": 1000.0, "s": 1_000_000.0}


def _micros(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(f"cannot read a latency from {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> Sample:
    """Requests/s, p50 and p99 (microseconds) and error counts from ``wrk --latency``."""
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    p50 = p99 = float("nan")
    if m := re.search(r"^\s+50%\s+(\S+)", out, re.M):
        p50 = _micros(m.group(1))
    if m := re.search(r"^\s+99%\s+(\S+)", out, re.M):
        p99 = _micros(m.group(1))
    errors = non2xx = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors = sum(int(g) for g in m.groups())
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        non2xx = int(m.group(1))
    return Sample(rps, p50, p99, errors, non2xx, requests)


_SS_SOCKET = re.compile(r"\bino:(\d+)")
_SS_RECEIVED = re.compile(r"\bbytes_received:(\d+)")


def client_sockets(port: int, client_pid: int = 0) -> dict[int, int]:
    """wrk's established sockets to ``port``: inode -> bytes received so far.

    Read from wrk's own descriptors (:func:`_sockets_of`) where the kernel allows, else
    from ``ss``, which walks every TCP socket on the machine: with the 100,000 TIME-WAIT
    sockets of a full run's ``Connection: close`` cells that takes 20 ms of CPU, and two
    such looks in a run gave a keep-alive c = 2 cell 0.3 to 0.8 ms p99 against 0.1 ms."""
    if client_pid:
        found = _sockets_of(client_pid, port)
        if found is not None:
            return found
    out = subprocess.run(
        ["ss", "-Htnie", "state", "established", f"( dport = :{port} )"],
        capture_output=True, text=True, timeout=10,
    ).stdout  # fmt: skip
    found = {}
    inode = None
    for line in out.splitlines():
        if m := _SS_SOCKET.search(line):  # the socket's line; its tcp_info follows
            inode = int(m.group(1))
            found[inode] = 0
        if inode is not None and (m := _SS_RECEIVED.search(line)):
            found[inode] = int(m.group(1))
    return found


_PIDFD_GETFD = 438  # the same number on every Linux architecture (5.6 and later)
_TCPI_BYTES_RECEIVED = 128  # offset of tcpi_bytes_received (u64) in struct tcp_info
_TCP_ESTABLISHED = 1  # tcpi_state, the first byte of struct tcp_info
_libc: Any = None


def _sockets_of(pid: int, port: int) -> dict[int, int] | None:
    """As :func:`client_sockets`, from process ``pid``'s descriptors: each socket is
    duplicated into this process (``pidfd_getfd``: Linux 5.6+, and the right to trace
    ``pid``, which a parent has over its child unless ptrace is locked down) and asked
    for its peer and ``TCP_INFO``. None where that is not allowed."""
    global _libc
    if not hasattr(os, "pidfd_open") or not hasattr(socket, "TCP_INFO"):
        return None
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    found: dict[int, int] = {}
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            fd = _libc.syscall(_PIDFD_GETFD, pidfd, int(name), 0)
            if fd < 0:
                err = ctypes.get_errno()
                if err == errno.EBADF:
                    continue  # closed meanwhile
                if err == errno.ESRCH:
                    break  # wrk is gone, and its sockets with it
                return None  # not allowed here (EPERM) or no such call (ENOSYS)
            try:
                sock = socket.socket(fileno=fd)
            except OSError:  # not a socket (wrk's epoll, its standard streams)
                os.close(fd)
                continue
            with sock:
                try:
                    if sock.family not in (socket.AF_INET, socket.AF_INET6):
                        continue
                    if sock.type != socket.SOCK_STREAM or sock.getpeername()[1] != port:
                        continue
                    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
                    inode = os.fstat(sock.fileno()).st_ino
                except OSError:
                    continue  # not connected (yet, or any more)
                if len(info) < _TCPI_BYTES_RECEIVED + 8:
                    return None  # a kernel older than 4.1
                if info[0] != _TCP_ESTABLISHED:
                    continue  # as ss's "state established"
                found[inode] = int.from_bytes(
                    info[_TCPI_BYTES_RECEIVED : _TCPI_BYTES_RECEIVED + 8], sys.byteorder
                )
    except OSError:
        return None  # wrk exited: its /proc directory is gone
    finally:
        os.close(pidfd)
    return found


def rescheduling_interrupts() -> int:
    """All CPUs' rescheduling interrupts so far (Linux's ``RES`` line), or -1.

    One is sent when a task is woken on another CPU than the waker's. With few
    connections a round can run in two ways: each wrk thread on the CPU of the worker it
    talks to (about 0 per request) or across CPUs (0.2 to 0.9 per request, and 12-17 us
    more CPU per request for any server); which one is the scheduler's choice at the
    start of the run. This tells a slow round of that kind from a slow server."""
    try:
        with open("/proc/interrupts") as f:
            for line in f:
                fields = line.split()
                if fields and fields[0] == "RES:":
                    return sum(int(x) for x in fields[1:] if x.isdigit())
    except OSError:
        pass
    return -1


def run_wrk(port: int, mode: str, conns: int, duration: float, threads: int) -> Sample:
    """One wrk run against ``127.0.0.1:port``, with the served-connections count."""
    argv = ["wrk", f"-t{min(threads, conns)}", f"-c{conns}", f"-d{duration:g}s",
            "--latency", "--timeout", "5s"]  # fmt: skip
    if mode == "close":
        argv += ["-H", "Connection: close"]
    argv.append(f"http://127.0.0.1:{port}/")
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(max(0.0, started + 0.25 * duration - time.monotonic()))
        first = client_sockets(port, proc.pid)
        time.sleep(max(0.0, started + 0.9 * duration - time.monotonic()))
        second = client_sockets(port, proc.pid)
        out, err = proc.communicate(timeout=duration + 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {err.strip()}")
    sample = parse_wrk(out)
    starved = sum(1 for inode, got in second.items() if got == 0 and inode in first)
    sample.served = max(0, conns - starved)
    return sample


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = [f"Python {platform.python_version()}"]
    for module in ("h11", "gunicorn"):
        try:
            versions.append(f"{module} {__import__(module).__version__}")
        except ImportError:
            pass
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0]
    versions.append(wrk.split(" [")[0])
    return (f"{platform.system()} {platform.release()}, {os.cpu_count()} CPUs ({cpu}); "
            + ", ".join(versions))  # fmt: skip


def fmt_us(us: float) -> str:
    if us != us:  # NaN: no answer at all
        return "-"
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.0f} us"


def paired_ratio(group: dict[str, Contender], key: str, name: str, other: str) -> float:
    """The median over rounds of ``name``'s requests/s over ``other``'s in the same round."""
    if name not in group or other not in group:
        return float("nan")
    a, b = group[name].samples.get(key, []), group[other].samples.get(key, [])
    pairs = [x.rps / y.rps for x, y in zip(a, b, strict=False) if y.rps > 0]
    return statistics.median(pairs) if pairs else float("nan")


# Fewer rescheduling interrupts per request than this: each wrk thread ran on the CPU of the
# worker it talked to (see rescheduling_interrupts); such rounds compare like for like.
PLACED_IPI = 0.05


def placed_ratio(group: dict[str, Contender], key: str, name: str, other: str) -> tuple[float, str]:
    """The median requests/s of ``name``'s well-placed rounds (fewer than ``PLACED_IPI``
    rescheduling interrupts per request) over that of ``other``'s, and how many rounds
    each had ("3+4 of 5"). Not paired by round: both servers are seldom well placed in
    the same round. (NaN, "") if either had none, or the interrupts cannot be counted."""
    if name not in group or other not in group:
        return float("nan"), ""
    placed = [[s.rps for s in group[n].samples.get(key, []) if 0 <= s.ipi < PLACED_IPI]
              for n in (name, other)]  # fmt: skip
    if not placed[0] or not placed[1]:
        return float("nan"), ""
    rounds = len(group[name].samples.get(key, []))
    ratio = statistics.median(placed[0]) / statistics.median(placed[1])
    return ratio, f"{len(placed[0])}+{len(placed[1])} of {rounds}"


def summarize(
    contenders: list[Contender], scenarios: list[tuple[str, int]], busy_floor: str = ""
) -> list[dict]:  # type: ignore[type-arg]
    """One row per (workers, scenario, server): medians, totals, ratios (also to
    ``busy_floor``, the floor spinning per request, when it ran)."""
    rows = []
    for workers in sorted({c.workers for c in contenders}):
        group = {c.name: c for c in contenders if c.workers == workers}
        for mode, conns in scenarios:
            key = scenario_key(mode, conns)

            for name, c in group.items():
                samples = c.samples.get(key)
                if not samples:
                    continue
                placed, placed_rounds = placed_ratio(group, key, name, FLOOR)
                busy_placed, busy_placed_rounds = placed_ratio(group, key, name, busy_floor)
                rows.append({
                    "workers": workers, "mode": mode, "connections": conns, "server": name,
                    "rounds": len(samples),
                    "rps": statistics.median(s.rps for s in samples),
                    "p50_us": statistics.median(s.p50_us for s in samples),
                    "p99_us": statistics.median(s.p99_us for s in samples),
                    "socket_errors": sum(s.socket_errors for s in samples),
                    "non2xx": sum(s.non2xx for s in samples),
                    "served": min(s.served for s in samples),
                    "cpu_us": statistics.median(s.cpu_us for s in samples),
                    "vs_sync": paired_ratio(group, key, name, SYNC),
                    "vs_floor": paired_ratio(group, key, name, FLOOR),
                    "vs_floor_placed": placed, "placed_rounds": placed_rounds,
                    "busy_floor": busy_floor if busy_floor in group else "",
                    "vs_busy_floor": paired_ratio(group, key, name, busy_floor),
                    "vs_busy_floor_placed": busy_placed,
                    "busy_placed_rounds": busy_placed_rounds,
                })  # fmt: skip
    return rows


def fmt_ratio(ratio: float) -> str:
    """``1.23x``, or ``-`` when the peer was not in the run."""
    return "-" if ratio != ratio else f"{ratio:.2f}x"  # NaN is the only value not equal to itself


def _cell(r: dict, markdown: bool) -> str:  # type: ignore[type-arg]
    """``- 2 workers, keep-alive c = 2``: a row's cell, as a line of the notes under the
    tables begins."""
    mode = "keep-alive" if r["mode"] == "keep-alive" else "Connection: close"
    return f"{'- ' if markdown else '  '}{r['workers']} workers, {mode} c = {r['connections']}"


def report(rows: list[dict], markdown: bool) -> str:  # type: ignore[type-arg]
    out = []
    for workers in sorted({r["workers"] for r in rows}):
        header = ["mode", "conns", "server", "req/s", "p50", "p99", "socket errors",
                  "non-2xx", "served", "CPU/req", "vs gunicorn sync", "vs h11 floor"]  # fmt: skip
        table = []
        for r in rows:
            if r["workers"] != workers:
                continue
            label = "keep-alive" if r["mode"] == "keep-alive" else "Connection: close"
            table.append([label, str(r["connections"]), r["server"], f"{r['rps']:,.0f}",
                          fmt_us(r["p50_us"]), fmt_us(r["p99_us"]), str(r["socket_errors"]),
                          str(r["non2xx"]), f"{r['served']}/{r['connections']}",
                          f"{r['cpu_us']:.0f} us", fmt_ratio(r["vs_sync"]),
                          fmt_ratio(r["vs_floor"])])  # fmt: skip
        out.append(f"{workers} workers each:")
        if markdown:
            lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(row) + " |" for row in table]
        else:
            widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
            lines = ["  ".join(cell.rjust(w) if i > 2 else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
                     for row in [header, *table]]  # fmt: skip
        out.append("\n".join(lines))
        out.append("")
    placed = [r for r in rows if r["server"] == OURS and r["placed_rounds"]]
    if placed:
        # The plain median above counts every round; with few connections a round can also
        # run with wrk's threads across CPUs from the workers, slower for any server.
        out.append(f"{OURS} vs {FLOOR}, median requests/s over only each one's well-placed "
                   f"rounds (under {PLACED_IPI} rescheduling interrupts per request):")  # fmt: skip
        out += [f"{_cell(r, markdown)}: {fmt_ratio(r['vs_floor_placed'])} "
                f"(well-placed rounds: {r['placed_rounds']})" for r in placed]  # fmt: skip
        out.append("")
    busy = [r for r in rows if r["server"] == OURS and r.get("busy_floor")]
    if busy:
        # A floor given N us more CPU per request: with N set to examples.http's extra,
        # what is left of the distance is not that CPU (see h11_floor.py --work-us).
        out.append(f"{OURS} vs {busy[0]['busy_floor']}: the median of the rounds' ratios, "
                   f"and over only each one's well-placed rounds:")  # fmt: skip
        # .get: 1332b54's results had no well-placed ratio to the busy floor.
        out += [f"{_cell(r, markdown)}: {fmt_ratio(r['vs_busy_floor'])}; well placed "
                f"{fmt_ratio(r.get('vs_busy_floor_placed', float('nan')))}"
                + (f" ({r['busy_placed_rounds']})" if r.get("busy_placed_rounds") else "")
                for r in busy]  # fmt: skip
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--workers", default="2,4", help="worker counts, comma-separated (2,4)")
    # Five short rounds rather than three longer ones: on a shared machine a server can
    # have a slow run or two (session 8's full run: examples.http at keep-alive c = 2 ran
    # at 0.64x the floor in 2 of 3 rounds, 0.85x in the other), and a median of five
    # needs three of them to move.
    p.add_argument("--rounds", type=int, default=5, help="rounds (5)")
    p.add_argument("--duration", type=float, default=2.0, help="seconds per wrk run (2)")
    p.add_argument("--connections", default="2,50,200", help="wrk -c values (2,50,200)")
    p.add_argument("--threads", type=int, default=2, help="wrk -t (2)")
    p.add_argument("--modes", default="keep-alive,close", help="keep-alive and/or close")
    p.add_argument("--only", default="", help="servers, comma-separated (default: all 4)")
    p.add_argument("--markdown", action="store_true", help="print the tables in Markdown")
    p.add_argument("--quick", action="store_true", help="2 workers, c = 2 and 50, 1 round of 1 s")
    p.add_argument("--json", default="", metavar="PATH",
                   help="where to write the results ($TMPDIR/http_bench.json)")  # fmt: skip
    p.add_argument("--ours", default="", metavar="OPTIONS",
                   help="extra options for examples.http, e.g. '--keepalive-turn 4'")  # fmt: skip
    p.add_argument("--max-minutes", type=float, default=15.0,
                   help="start no round that would end past this (15)")  # fmt: skip
    p.add_argument("--floor-work-us", type=float, default=0.0, metavar="N",
                   help="also run the h11 floor spinning N us per request (h11_floor.py "
                        "--work-us); set N to examples.http's extra CPU per request")  # fmt: skip
    p.add_argument("--base", default="", metavar="REV",
                   help="also run examples.http as of git revision REV (a temporary "
                        "worktree): a change measured side by side")  # fmt: skip
    args = p.parse_args(argv)
    exit_on_sigterm()
    if args.quick:
        args.workers, args.connections, args.rounds, args.duration = "2", "2,50", 1, 1.0
    for tool, hint in (("wrk", "apt-get install wrk"), ("ss", "apt-get install iproute2"),
                       ("gunicorn", "pip install -e '.[bench]'")):  # fmt: skip
        if shutil.which(tool) is None:
            print(f"http_bench: {tool} is not installed ({hint})", file=sys.stderr)
            return 2
    scenarios = [(mode, int(c)) for mode in args.modes.split(",")
                 for c in args.connections.split(",")]  # fmt: skip
    names = args.only.split(",") if args.only else [OURS, FLOOR, SYNC, GTHREAD]
    if not math.isfinite(args.floor_work_us) or args.floor_work_us < 0:
        p.error("--floor-work-us must be a number >= 0")
    busy_floor = work_floor(args.floor_work_us) if args.floor_work_us > 0 else ""
    if busy_floor:
        names.append(busy_floor)
    names = list(dict.fromkeys(names))  # once each, in order
    known = commands(1, args.ours, args.floor_work_us)
    unknown = [n for n in names if n not in known]
    if unknown:
        p.error(f"--only: no server named {', '.join(map(repr, unknown))} "
                f"(known: {', '.join(known)})")  # fmt: skip
    # The worktree is made once every server's command is known (bad options fail first),
    # inside the try below, whose finally removes it.
    base_tree = None
    if args.base:  # git makes the directory
        base_tree = Path(tempfile.gettempdir()) / f"http_bench-base-{os.getpid()}"
    contenders = []
    for workers in (int(w) for w in args.workers.split(",")):
        argvs = commands(workers, args.ours, args.floor_work_us)
        for name in names:
            path = os.pathsep.join([str(REPO), str(BENCH)])
            server = Server(f"{name} w{workers}", argvs[name], free_port(), cwd=BENCH,
                            env={"PYTHONPATH": path})  # fmt: skip
            contenders.append(Contender(name, workers, server))
        if base_tree is not None:
            name = f"{OURS}@{args.base}"
            path = os.pathsep.join([str(base_tree), str(base_tree / "bench")])
            server = Server(f"{name} w{workers}", argvs[OURS], free_port(), tree=base_tree,
                            cwd=base_tree / "bench", env={"PYTHONPATH": path})  # fmt: skip
            contenders.append(Contender(name, workers, server))
    runs = len(scenarios) * len(contenders)
    print(f"http_bench: {machine()}", flush=True)
    print(
        f"http_bench: {args.rounds} rounds x {runs} runs of {args.duration:g} s = about "
        f"{args.rounds * runs * (args.duration + 0.3) / 60:.1f} min",
        flush=True,
    )
    log_dir = Path(os.environ.get("TMPDIR", "/tmp"))
    started = time.monotonic()
    round_time = 0.0
    try:
        if base_tree is not None:
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--quiet",
                            str(base_tree), args.base], check=True)  # fmt: skip
        start_all(contenders, log_dir)
        for c in contenders:  # warm up: imports, caches, first connections
            run_wrk(c.server.port, "keep-alive", 2, 1.0, 2)
        name_width = max(len(c.name) for c in contenders)
        for rnd in range(args.rounds):
            elapsed = time.monotonic() - started
            if rnd and elapsed + round_time > args.max_minutes * 60:
                print(f"http_bench: stopping after {rnd} rounds (--max-minutes)", flush=True)
                break
            round_started = time.monotonic()
            for i, (mode, conns) in enumerate(scenarios):
                for workers in sorted({c.workers for c in contenders}):
                    group = [c for c in contenders if c.workers == workers]
                    k = (rnd + i) % len(group)
                    for c in group[k:] + group[:k]:
                        assert c.server.proc is not None
                        pids = children_of(c.server.proc.pid)
                        cpu_before = workers_cpu(pids)
                        ipi_before = rescheduling_interrupts()
                        sample = run_wrk(c.server.port, mode, conns, args.duration, args.threads)
                        used = workers_cpu(pids) - cpu_before
                        sample.cpu_us = used * 1e6 / max(sample.requests, 1)
                        if ipi_before >= 0:
                            ipis = rescheduling_interrupts() - ipi_before
                            sample.ipi = ipis / max(sample.requests, 1)
                        c.samples.setdefault(scenario_key(mode, conns), []).append(sample)
                        print(f"  round {rnd + 1} w={workers} {mode:10} c={conns:<4} "
                              f"{c.name:{name_width}} {sample.rps:>9,.0f} req/s  p50 "
                              f"{fmt_us(sample.p50_us):>9}  p99 {fmt_us(sample.p99_us):>9}  "
                              f"errors {sample.socket_errors}+{sample.non2xx}  served "
                              f"{sample.served}/{conns}  CPU {sample.cpu_us:.0f} us/req"
                              + (f"  IPI {sample.ipi:.2f}/req" if sample.ipi >= 0 else ""),
                              flush=True)  # fmt: skip
            round_time = time.monotonic() - round_started
    finally:
        for c in contenders:
            stop_server(c.server)
        if base_tree is not None and base_tree.exists():
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force",
                            str(base_tree)], check=False)  # fmt: skip
    rows = summarize(contenders, scenarios, busy_floor)
    results = Path(args.json) if args.json else log_dir / "http_bench.json"
    results.write_text(json.dumps({
        "machine": machine(), "argv": sys.argv[1:], "duration": args.duration,
        "gthread_threads": GTHREAD_THREADS, "rows": rows,
        "samples": {f"{c.name} w{c.workers}": {k: [asdict(s) for s in v]
                                               for k, v in c.samples.items()}
                    for c in contenders},
    }, indent=1))  # fmt: skip
    print()
    print(report(rows, args.markdown))
    print(f"http_bench: results in {results}; {time.monotonic() - started:.0f} s in all")
    return 0


_TICK = os.sysconf("SC_CLK_TCK")


def workers_cpu(pids: list[int]) -> float:
    """CPU seconds of ``pids`` so far, all threads (gone processes count 0): the
    scheduler's on-CPU time in nanoseconds (``/proc/PID/task/*/schedstat``), or else
    user + system time in clock ticks, which are samples (a process that runs in short
    bursts between waits is charged a tick or nothing) and blur differences of a few
    percent."""
    total = 0.0
    for pid in pids:
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
            total += sum(int((t / "schedstat").read_text().split()[0]) for t in tasks) / 1e9
            continue
        except (OSError, ValueError, IndexError):
            pass
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += (int(fields[11]) + int(fields[12])) / _TICK
    return total


if __name__ == "__main__":
    sys.exit(main())
