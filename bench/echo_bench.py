"""examples/echo against socketserver and a framework-free floor, side by side.

::

    python bench/echo_bench.py                  # 2 workers, 6 rounds of 1.5 s, C = 2, 50, 200
    python bench/echo_bench.py --quick          # 1 round of 1 s, C = 2, 50
    python bench/echo_bench.py --compare-tree /tmp/patched --only floor,examples.echo

The load client (``echo_load.py``) ping-pongs 64-byte messages over C connections against:
``python -m examples.echo --workers W`` (one connection at a time per worker), the same with
``--threads T`` and with ``--asyncio``; ``socketserver.ThreadingTCPServer`` and
``ForkingTCPServer`` serving the same ``EchoHandler``; and ``floor_echo.py``, a pre-fork loop
without a framework. Every server runs for the whole benchmark; each round runs every
scenario against every server, rotating the order from round to round so that the noise of
a shared machine hits them alike. The table shows medians over the rounds: round trips/s,
p50 and p99 latency, how many of the C connections were served at all, the CPU time the
server's processes spent per round trip (from ``/proc``: what the server costs, whatever
the client costs), the client's, the busiest worker's share of the workers' CPU (50% with 2
workers evenly loaded, 100% when one took every connection), and ratios to the floor at the
same C: of round trips/s round by round (then the median), and of the best round of each
(the most round trips/s, the least CPU per round trip).

Why "best" too: on 2 CPUs with 2 client processes and 2 workers, a run is fast when the
scheduler puts each client next to the worker that serves it and about half as fast when
it crosses them, whatever the server; the best of several rounds compares the servers in
the same placement.

The socketserver peers get ``request_queue_size = 1024`` (as PreforkTCPServer and the floor
have) instead of 5, so that the comparison is of serving, not of the listen backlog; their
other settings are the defaults (``ForkingMixIn.max_children`` is 40).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from echo_load import (
    BENCH,
    REPO,
    Server,
    children_of,
    cpu_seconds,
    exit_on_sigterm,
    fmt_us,
    machine,
    run_load,
    serving,
    session_cpu,
    table,
)

FLOOR = "floor"
ECHO = "examples.echo"


@dataclass
class Sample:
    rate: float
    p50_us: float
    p99_us: float
    served: int
    failed: int
    server_cpu_us: float  # per round trip
    client_cpu_us: float  # per round trip
    busiest: float  # the busiest worker's share of the workers' CPU (NaN: no fixed workers)


@dataclass
class Contender:
    server: Server
    many: bool  # holds more connections at once than it has workers
    samples: dict[int, list[Sample]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.server.name


def contenders(workers: int, threads: int, compare_tree: Path | None) -> list[Contender]:
    py = sys.executable
    echo = [py, "-m", "examples.echo", "--bind", "127.0.0.1:{port}", "--workers", str(workers),
            "--log-level", "warning"]  # fmt: skip
    peer = [py, str(BENCH / "echo_bench.py"), "--port", "{port}", "--serve-peer"]
    found = [
        Contender(Server(ECHO, echo), many=False),
        Contender(Server(f"{ECHO} --threads {threads}", [*echo, "--threads", str(threads)]), True),
        Contender(Server(f"{ECHO} --asyncio", [*echo, "--asyncio"]), many=True),
        Contender(Server("ThreadingTCPServer", [*peer, "threading"]), many=True),
        Contender(Server("ForkingTCPServer", [*peer, "forking"]), many=True),
        Contender(Server(FLOOR, [py, str(BENCH / "floor_echo.py"), "--port", "{port}",
                                 "--workers", str(workers)]), many=False),
    ]  # fmt: skip
    if compare_tree is not None:  # a twin of each examples.echo mode, run from that tree
        for i, c in reversed(list(enumerate(found))):
            if c.name.startswith(ECHO):
                twin = Server(f"{c.name} @{compare_tree}", c.server.argv, tree=compare_tree)
                found.insert(i + 1, Contender(twin, c.many))
    return found


def measure(contender: Contender, connections: int, duration: float) -> Sample:
    server = contender.server
    assert server.proc is not None
    pid = server.proc.pid
    cpu: list[float] = []
    workers: list[dict[int, float]] = []

    def snapshot() -> None:
        cpu.append(session_cpu(pid))
        workers.append({w: cpu_seconds(w) for w in children_of(pid)})

    result = run_load(server.port, connections, duration, on_start=snapshot, on_stop=snapshot)
    rts = max(1, result.round_trips)
    busiest = float("nan")
    if len(workers[0]) >= 2 and workers[0].keys() == workers[1].keys():
        used = [workers[1][w] - workers[0][w] for w in workers[0]]
        if sum(used) > 0:
            busiest = max(used) / sum(used)
    sample = Sample(
        rate=result.rate,
        p50_us=result.percentile(50),
        p99_us=result.percentile(99),
        served=result.served,
        failed=result.failed,
        server_cpu_us=(cpu[1] - cpu[0]) / rts * 1e6,
        client_cpu_us=result.client_cpu_per_rt(),
        busiest=busiest,
    )
    contender.samples.setdefault(connections, []).append(sample)
    time.sleep(0.2)  # let the server drain what the client left (queued connections)
    return sample


def median(values: Iterable[float]) -> float:
    """The median of the values that are numbers (NaN if none is)."""
    numbers = [v for v in values if v == v]
    return statistics.median(numbers) if numbers else float("nan")


def report(all_: list[Contender], conns: list[int], markdown: bool) -> str:
    header = ["C", "server", "served", "rt/s", "best rt/s", "p50", "p99", "server CPU/rt",
              "best CPU/rt", "client CPU/rt", "busiest worker", "rt/s vs floor",
              "best rt/s vs floor", "best CPU/rt vs floor"]  # fmt: skip
    rows = []
    floor = next(c for c in all_ if c.name == FLOOR)
    for c in conns:
        ref = floor.samples.get(c, [])
        for contender in all_:
            samples = contender.samples.get(c)
            if not samples:
                continue
            med = {k: median(getattr(s, k) for s in samples) for k in Sample.__annotations__}
            # Ratios round by round (each round ran both within seconds), then the median:
            # a slow drift of the machine's load cancels out.
            pairs = list(zip(samples, ref, strict=False))
            rate_ratio = median(s.rate / f.rate for s, f in pairs if f.rate)
            best_rate = max(s.rate for s in samples)
            best_cpu = min(s.server_cpu_us for s in samples)
            floor_rate = max((f.rate for f in ref), default=float("nan"))
            floor_cpu = min((f.server_cpu_us for f in ref), default=float("nan"))
            rows.append([
                str(c), contender.name, f"{med['served']:.0f}/{c}", f"{med['rate']:,.0f}",
                f"{best_rate:,.0f}", fmt_us(med["p50_us"]), fmt_us(med["p99_us"]),
                f"{med['server_cpu_us']:.1f} us", f"{best_cpu:.1f} us",
                f"{med['client_cpu_us']:.1f} us", percent(med["busiest"]),
                f"{rate_ratio:.2f}x", f"{best_rate / floor_rate:.2f}x",
                f"{best_cpu / floor_cpu:.2f}x",
            ])  # fmt: skip
    return table(header, rows, markdown, left=2)


def percent(share: float) -> str:
    return "-" if share != share else f"{share:.0%}"


def serve_peer(kind: str, port: int) -> int:
    """Run a plain socketserver with examples.echo's handler (a benchmark contender)."""
    import socketserver

    from examples.echo import EchoHandler

    base: type[socketserver.TCPServer] = (
        socketserver.ThreadingTCPServer if kind == "threading" else socketserver.ForkingTCPServer
    )

    class Peer(base):  # type: ignore[valid-type,misc]
        allow_reuse_address = True
        request_queue_size = 1024

    with Peer(("127.0.0.1", port), EchoHandler) as server:
        server.serve_forever()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--workers", type=int, default=2, help="workers of the pre-fork servers (2)")
    p.add_argument("--threads", type=int, default=100, help="examples.echo --threads (100)")
    p.add_argument("--rounds", type=int, default=6, help="alternating rounds (6)")
    p.add_argument("--duration", type=float, default=1.5, help="seconds per run (1.5)")
    p.add_argument("--connections", default="2,50,200", help="values of C (2,50,200)")
    p.add_argument("--only", default="", help="comma-separated server names (and the floor)")
    p.add_argument("--compare-tree", type=Path,
                   help="also run each examples.echo mode from this tree")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="1 round of 1 s, C = 2, 50")
    p.add_argument("--markdown", action="store_true", help="print the table in Markdown")
    p.add_argument("--max-minutes", type=float, default=12.0, help="start no round after (12)")
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--serve-peer", choices=["threading", "forking"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_peer:
        sys.path.insert(0, str(REPO))
        return serve_peer(args.serve_peer, args.port)
    exit_on_sigterm()
    if args.quick:
        args.rounds, args.duration, args.connections = 1, 1.0, "2,50"
    conns = [int(c) for c in args.connections.split(",")]
    all_ = contenders(args.workers, args.threads, args.compare_tree)
    if args.only:
        wanted = {FLOOR, *args.only.split(",")}
        all_ = [c for c in all_ if c.name.split(" @")[0] in wanted]

    def runs_at(c: int) -> list[Contender]:
        # C above 50 only for the servers that can hold that many (and the floor).
        return [x for x in all_ if c <= 50 or x.many or x.name == FLOOR]

    per_round = sum(len(runs_at(c)) for c in conns)
    print(f"echo_bench: {machine()}", flush=True)
    print(f"echo_bench: {args.workers} workers, {args.rounds} rounds x {per_round} runs x "
          f"{args.duration:g} s = about {args.rounds * per_round * (args.duration + 0.7) / 60:.1f}"
          " min", flush=True)  # fmt: skip
    started = time.monotonic()
    with serving([c.server for c in all_]):
        for c in all_:  # warm up: imports, first connections
            run_load(c.server.port, 2, 0.3)
        for rnd in range(args.rounds):
            if time.monotonic() - started > args.max_minutes * 60:
                print(f"echo_bench: stopping after {rnd} rounds (--max-minutes)", flush=True)
                break
            for n in conns:
                group = runs_at(n)
                shift = (rnd + n) % len(group)
                order = group[shift:] + group[:shift]
                if rnd % 2:
                    order.reverse()
                for contender in order:
                    s = measure(contender, n, args.duration)
                    print(f"  round {rnd + 1} C={n:<4} {contender.name:32} {s.rate:>9,.0f} rt/s "
                          f"p50 {fmt_us(s.p50_us):>8} p99 {fmt_us(s.p99_us):>8} "
                          f"served {s.served}/{n} server CPU {s.server_cpu_us:.1f} us/rt",
                          flush=True)  # fmt: skip
    print()
    print(report(all_, conns, args.markdown))
    print(f"\necho_bench: {(time.monotonic() - started) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
