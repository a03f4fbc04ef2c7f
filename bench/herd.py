"""The thundering herd: how many idle workers wake up for one new connection.

::

    python bench/herd.py                 # 16 workers, 100 sequential connections per mode
    python bench/herd.py --quick         # 30 connections

Three servers with 16 idle workers each: ``PreforkTCPServer`` serving examples.echo's handler
with ``exclusive_accept = True`` (on Linux the listening socket is registered in each
worker's epoll with ``EPOLLEXCLUSIVE``), the same with ``exclusive_accept = False`` (the
``selectors`` module, which every waiting worker hears), and the floor (``floor_echo.py``:
workers blocked in ``accept()``, which Linux wakes one at a time). Connections are made one
after another (connect, 64 bytes echoed, close, a pause for the workers to settle). Two
independent counts:

- **woken**: which workers' voluntary context switches (``/proc/PID/task/*/status``) moved
  during each connection, read without a tracer in the way;
- **strace**: ``strace -c -f -e trace=epoll_wait,accept4,accept`` on all 16 workers during a
  second series: the waits that returned and the ``accept4`` calls that failed with EAGAIN
  (a worker woken for a connection another worker took), per connection.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from echo_load import (
    BENCH,
    REPO,
    Server,
    children_of,
    echo_once,
    exit_on_sigterm,
    machine,
    serving,
    strace_counts,
    table,
)

PY = sys.executable


def voluntary_switches(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def woken_per_connection(port: int, workers: list[int], count: int, settle: float) -> list[int]:
    """For each of ``count`` sequential connections, how many workers woke up."""
    woken = []
    before = {w: voluntary_switches(w) for w in workers}
    for _ in range(count):
        if not echo_once(port, b"x" * 64):
            raise RuntimeError("no echo")
        time.sleep(settle)
        after = {w: voluntary_switches(w) for w in workers}
        woken.append(sum(1 for w in workers if after[w] != before[w]))
        before = after
    return woken


def strace_per_connection(
    port: int, workers: list[int], count: int, settle: float
) -> tuple[float, float, float]:
    """Per connection: waits that returned, accept calls, accept calls that failed."""
    with strace_counts(workers, "epoll_wait,epoll_pwait,accept4,accept") as counts:
        for _ in range(count):
            if not echo_once(port, b"x" * 64):
                raise RuntimeError("no echo")
            time.sleep(settle)
    waits = counts.calls.get("epoll_wait", 0) + counts.calls.get("epoll_pwait", 0)
    accepts = counts.calls.get("accept4", 0) + counts.calls.get("accept", 0)
    failed = counts.errors.get("accept4", 0) + counts.errors.get("accept", 0)
    return waits / count, accepts / count, failed / count


def serve(exclusive: bool, port: int, workers: int) -> int:
    """A PreforkTCPServer with examples.echo's handler and the given exclusive_accept."""
    sys.path.insert(0, str(REPO))
    from examples.echo import EchoHandler
    from prefork_server import PreforkTCPServer

    class HerdServer(PreforkTCPServer):
        exclusive_accept = exclusive
        timeout = 60.0  # idle wake-ups every 30 s: none during a measurement

    with HerdServer(("127.0.0.1", port), EchoHandler, workers=workers) as server:
        server.serve_forever()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--workers", type=int, default=16, help="idle workers (16)")
    p.add_argument("--connections", type=int, default=100, help="per mode and count (100)")
    p.add_argument("--settle", type=float, default=0.02, help="pause after each (0.02 s)")
    p.add_argument("--quick", action="store_true", help="30 connections")
    p.add_argument("--markdown", action="store_true", help="print the table in Markdown")
    p.add_argument("--serve", choices=["exclusive", "selectors"], help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        return serve(args.serve == "exclusive", args.port, args.workers)
    exit_on_sigterm()
    if args.quick:
        args.connections = 30
    me = [PY, str(BENCH / "herd.py"), "--port", "{port}", "--workers", str(args.workers)]
    servers = [
        Server("exclusive_accept = True (EPOLLEXCLUSIVE)", [*me, "--serve", "exclusive"]),
        Server("exclusive_accept = False (selectors)", [*me, "--serve", "selectors"]),
        Server("floor (blocking accept)", [PY, str(BENCH / "floor_echo.py"), "--port",
                                           "{port}", "--workers", str(args.workers)]),
    ]  # fmt: skip
    print(f"herd: {machine()}", flush=True)
    started = time.monotonic()
    rows = []
    with serving(servers, Path(tempfile.gettempdir())):
        time.sleep(0.5)  # every worker booted and waiting
        for server in servers:
            assert server.proc is not None
            workers = children_of(server.proc.pid)
            if len(workers) != args.workers:
                raise RuntimeError(f"{server.name}: {len(workers)} workers, not {args.workers}")
            woken = woken_per_connection(server.port, workers, args.connections, args.settle)
            waits, accepts, failed = strace_per_connection(
                server.port, workers, args.connections, args.settle
            )
            rows.append([server.name, f"{statistics.mean(woken):.2f}", str(max(woken)),
                         f"{waits:.2f}", f"{accepts:.2f}", f"{failed:.2f}"])  # fmt: skip
            print(f"  {server.name}: {rows[-1][1:]}", flush=True)
    print(f"\nWorkers woken per new connection ({args.workers} idle workers, "
          f"{args.connections} sequential connections)")  # fmt: skip
    header = ["server", "woken (mean)", "woken (max)", "epoll_wait returns", "accept calls",
              "accept EAGAIN"]  # fmt: skip
    print(table(header, rows, args.markdown))
    print(f"\nherd: {(time.monotonic() - started) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
