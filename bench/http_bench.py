"""examples/http against gunicorn's sync worker, side by side, with wrk.

::

    python bench/http_bench.py                       # 2 workers, 3 rounds of 5 s
    python bench/http_bench.py --workers 4 --rounds 5 --connections 4,64 --markdown

Both servers serve the same hello-world WSGI application (``bench/hello_app.py``) with the
same number of workers, on loopback. For each connection count and each of keep-alive and
``Connection: close`` (``wrk -H 'Connection: close'``), wrk runs against one server and then
the other, alternating which goes first, for several rounds; the table shows the medians
of requests/s, of wrk's p50 and p99 latency and of the workers' CPU time per request (from
/proc: the figure least disturbed by other load on the machine), and the ratio of
requests/s. Machines are noisy: compare the ratios of one run, not absolute figures
across runs.

Needs ``wrk`` and ``gunicorn`` (``pip install gunicorn``: a benchmark-only dependency).
Every process started here is ended by its pid (masters first, then any worker left).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
APP = "hello_app:app"
EXPECTED_BODY = b"Hello, world!\n"


@dataclass
class Sample:
    rps: float
    p50_us: float
    p99_us: float
    errors: int  # socket errors (connect, read, write, timeout) plus non-2xx responses
    requests: int = 0
    cpu_us: float = 0.0  # the workers' CPU time (user + system) per request


@dataclass
class Server:
    name: str
    argv: list[str]
    port: int
    proc: subprocess.Popen[bytes] | None = None
    samples: dict[tuple[str, int], list[Sample]] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children(pid: int) -> list[int]:
    """Live child pids of ``pid``, from /proc (Linux)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            found.append(int(entry))
    return found


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of ``pids`` so far (from /proc; gone processes count 0)."""
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])
    return total / _TICK


def wait_until_serving(server: Server, timeout: float = 20.0) -> None:
    """Poll with real requests until the server answers 200 with the expected body."""
    deadline = time.monotonic() + timeout
    request = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    while time.monotonic() < deadline:
        assert server.proc is not None
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with status {server.proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=2) as s:
                s.sendall(request)
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            if data.startswith(b"HTTP/1.1 200") and data.endswith(EXPECTED_BODY):
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{server.name} did not answer on port {server.port} in {timeout}s")


@contextlib.contextmanager
def running(servers: list[Server], log_dir: Path) -> Iterator[None]:
    """Start every server in its own session; end them all by pid, whatever happens."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(BENCH), env.get("PYTHONPATH", "")])
    logs = []
    try:
        for server in servers:
            log = open(log_dir / f"{server.name.split()[0]}.log", "wb")  # noqa: SIM115
            logs.append(log)
            server.proc = subprocess.Popen(
                server.argv, cwd=BENCH, env=env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        for server in servers:
            wait_until_serving(server)
        yield
    finally:
        for server in servers:
            stop(server)
        for log in logs:
            log.close()


def stop(server: Server) -> None:
    """QUIT (graceful for both servers), then KILL by pid: the master and its workers."""
    proc = server.proc
    if proc is None or proc.poll() is not None:
        return
    workers = children(proc.pid)
    proc.send_signal(signal.SIGQUIT)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    for pid in workers + children(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


_UNITS = {"us": 1.0, "ms": 1000.0, "s": 1_000_000.0}


def _micros(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(f"cannot read a latency from {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> Sample:
    """Requests/s, p50 and p99 (microseconds) and error count from ``wrk --latency``."""
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    p50 = _micros(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _micros(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    errors = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(g) for g in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    return Sample(rps, p50, p99, errors, requests)


def run_wrk(port: int, mode: str, connections: int, duration: float, threads: int) -> Sample:
    """One wrk run against ``127.0.0.1:port``."""
    argv = ["wrk", f"-t{min(threads, connections)}", f"-c{connections}", f"-d{duration:g}s",
            "--latency", "--timeout", "5s"]  # fmt: skip
    if mode == "close":
        argv += ["-H", "Connection: close"]
    argv.append(f"http://127.0.0.1:{port}/")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=True)
    return parse_wrk(out.stdout)


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = [f"Python {platform.python_version()}"]
    for module in ("h11", "gunicorn"):
        with contextlib.suppress(ImportError):
            versions.append(f"{module} {__import__(module).__version__}")
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0]
    versions.append(wrk.split(" [")[0])
    return (f"{platform.system()} {platform.release()}, {os.cpu_count()} CPUs ({cpu}); "
            + ", ".join(versions))  # fmt: skip


def _fmt_us(us: float) -> str:
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.0f} us"


def report(ours: Server, theirs: Server, scenarios: list[tuple[str, int]], markdown: bool) -> str:
    rows = []
    for mode, conns in scenarios:
        a, b = ours.samples.get((mode, conns)), theirs.samples.get((mode, conns))
        if not a or not b:
            continue
        med = {
            name: (
                statistics.median(s.rps for s in samples),
                statistics.median(s.p50_us for s in samples),
                statistics.median(s.p99_us for s in samples),
                sum(s.errors for s in samples),
                statistics.median(s.cpu_us for s in samples),
            )
            for name, samples in ((ours.name, a), (theirs.name, b))
        }
        (ra, pa50, pa99, ea, ca), (rb, pb50, pb99, eb, cb) = med[ours.name], med[theirs.name]
        label = "keep-alive" if mode == "keep-alive" else "Connection: close"
        rows.append([label, str(conns), f"{ra:,.0f}", _fmt_us(pa50), _fmt_us(pa99), str(ea),
                     f"{ca:.0f} us", f"{rb:,.0f}", _fmt_us(pb50), _fmt_us(pb99), str(eb),
                     f"{cb:.0f} us", f"{ra / rb:.2f}x"])  # fmt: skip
    header = ["mode", "conns", "ours req/s", "p50", "p99", "errors", "CPU/req",
              "gunicorn req/s", "p50", "p99", "errors", "CPU/req", "ratio"]  # fmt: skip
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.rjust(w) if i > 0 else cell.ljust(w)
                  for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
        for row in [header, *rows]
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--workers", type=int, default=2, help="workers for each server (2)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (3)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run (5)")
    p.add_argument("--connections", default="2,50", help="wrk -c values, comma-separated")
    p.add_argument("--threads", type=int, default=2, help="wrk -t (2)")
    p.add_argument("--modes", default="keep-alive,close", help="keep-alive and/or close")
    p.add_argument("--markdown", action="store_true", help="print the table in Markdown")
    p.add_argument("--ours", default="", metavar="OPTIONS",
                   help="extra options for examples.http, e.g. '--keepalive-turn 4'")  # fmt: skip
    p.add_argument("--max-minutes", type=float, default=15.0,
                   help="start no new round after this long (15)")  # fmt: skip
    args = p.parse_args(argv)
    for tool in ("wrk", "gunicorn"):
        if shutil.which(tool) is None:
            hint = "pip install gunicorn" if tool == "gunicorn" else "apt-get install wrk"
            print(f"http_bench: {tool} is not installed ({hint})", file=sys.stderr)
            return 2
    scenarios = [(mode, int(c)) for mode in args.modes.split(",")
                 for c in args.connections.split(",")]  # fmt: skip
    ours = Server(
        "examples.http",
        [sys.executable, "-m", "examples.http", "--bind", "", "--workers", str(args.workers),
         "--no-access-log", "--log-level", "warning", *args.ours.split(), APP],
        free_port(),
    )  # fmt: skip
    ours.argv[ours.argv.index("--bind") + 1] = f"127.0.0.1:{ours.port}"
    theirs = Server(
        "gunicorn sync",
        ["gunicorn", "-k", "sync", "-w", str(args.workers), "--log-level", "warning", APP],
        free_port(),
    )
    theirs.argv[1:1] = ["-b", f"127.0.0.1:{theirs.port}"]
    runs = len(scenarios) * 2 * args.rounds
    print(f"http_bench: {machine()}", flush=True)
    print(f"http_bench: {args.workers} workers each, {args.rounds} rounds x {len(scenarios)} "
          f"scenarios x 2 servers x {args.duration:g}s = about "
          f"{runs * (args.duration + 0.5) / 60:.1f} min", flush=True)  # fmt: skip
    log_dir = Path(os.environ.get("TMPDIR", "/tmp"))
    started = time.monotonic()
    with running([ours, theirs], log_dir):
        for server in (ours, theirs):  # warm up: imports, caches, connections
            run_wrk(server.port, "keep-alive", 2, 1.0, 1)
        for rnd in range(args.rounds):
            if time.monotonic() - started > args.max_minutes * 60:
                print(f"http_bench: stopping after {rnd} rounds (--max-minutes)", flush=True)
                break
            for mode, conns in scenarios:
                order = [ours, theirs] if (rnd + conns) % 2 == 0 else [theirs, ours]
                for server in order:
                    assert server.proc is not None
                    workers = children(server.proc.pid)
                    cpu_before = cpu_seconds(workers)
                    sample = run_wrk(server.port, mode, conns, args.duration, args.threads)
                    used = cpu_seconds(workers) - cpu_before
                    sample.cpu_us = used * 1e6 / max(sample.requests, 1)
                    server.samples.setdefault((mode, conns), []).append(sample)
                    print(f"  round {rnd + 1} {mode:10} c={conns:<4} {server.name:14} "
                          f"{sample.rps:>10,.0f} req/s  p50 {_fmt_us(sample.p50_us):>9}  "
                          f"p99 {_fmt_us(sample.p99_us):>9}  errors {sample.errors}  "
                          f"worker CPU {sample.cpu_us:.0f} us/req",
                          flush=True)  # fmt: skip
    print()
    print(report(ours, theirs, scenarios, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
