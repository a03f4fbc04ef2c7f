"""Scenario 7, leaks: 10,000 connections, one in ten reset by the client mid-request (half
a message, then RST). Afterwards each worker's open descriptors and threads, the master's
descriptors and the process tree are exactly as they were before, no worker died, and
each worker's resident memory grew by less than ``RSS_BOUND_KIB``.

The baseline is taken after a warm-up of 1,000 connections: the first ones allocate what
a worker keeps for its life (imported modules, buffers, the allocator's arenas).
"""

from __future__ import annotations

import time

import pytest
from conftest import children, wait_for
from load import EchoLoad

from .common import fds, proc_status, quit_and_wait, report, rss_kib, start_echo

pytestmark = pytest.mark.stress

CONNECTIONS = 10_000
WARM_UP = 1_000
ABORT_EVERY = 10
# The documented bound on a worker's RSS growth over CONNECTIONS connections after the
# warm-up. A worker that kept as little as 100 bytes per connection (a socket object, a
# traceback, a list entry) would grow by about 1 MiB; the measured growth is 0-200 KiB.
RSS_BOUND_KIB = 1024


def snapshot(master: int, workers: list[int]) -> dict[str, object]:
    figures: dict[str, object] = {"master_fds": sorted(fds(master)), "tree": children(master)}
    for pid in workers:
        status = proc_status(pid)
        figures[f"{pid}_fds"] = sorted(fds(pid))
        figures[f"{pid}_threads"] = status["Threads"]
        figures[f"{pid}_children"] = children(pid)
    return figures


def test_10000_connections_some_reset_leak_nothing(spawn) -> None:
    workers = 2
    proc, address, pids = start_echo(spawn, workers=workers)
    (listener,) = [t for t in fds(proc.pid).values() if t.startswith("socket:")]

    def settled() -> bool:
        """No worker holds a connection: every client is gone and every handler done."""
        return all(
            [t for t in fds(pid).values() if t.startswith("socket:")] == [listener] for pid in pids
        )

    with EchoLoad(address, concurrency=8, limit=WARM_UP, abort_every=ABORT_EVERY) as warm:
        warm.wait_done()
    wait_for(settled, what="the warm-up connections to end")
    before = snapshot(proc.pid, pids)
    rss_before = {pid: rss_kib(pid) for pid in pids}
    start = time.monotonic()
    with EchoLoad(address, concurrency=8, limit=CONNECTIONS, abort_every=ABORT_EVERY) as load:
        load.wait_done(90)
    took = time.monotonic() - start
    wait_for(settled, what="the connections to end")
    # A handler may still be returning; give the descriptor tables a moment to agree.
    deadline = time.monotonic() + 5
    while (after := snapshot(proc.pid, pids)) != before and time.monotonic() < deadline:
        time.sleep(0.05)
    growth = {pid: rss_kib(pid) - rss_before[pid] for pid in pids}
    result = load.result
    report(
        "7-leaks",
        result,
        workers=workers,
        connections=CONNECTIONS,
        seconds=took,
        fds_per_worker=len(before[f"{pids[0]}_fds"]),  # type: ignore[arg-type]
        rss_growth_kib_max=max(growth.values()),
        rss_bound_kib=RSS_BOUND_KIB,
    )
    assert result.sent == CONNECTIONS, result
    # Each of the 8 threads aborts its every tenth request.
    assert abs(result.aborted - CONNECTIONS // ABORT_EVERY) <= 8, result
    assert result.failed == 0 and result.refused == 0, result
    assert after == before, f"before {before}\nafter {after}"
    assert children(proc.pid) == pids, "no worker died"
    assert max(growth.values()) < RSS_BOUND_KIB, growth
    out = proc.output()
    assert "Traceback" not in out and " ERROR " not in out, out[-3000:]
    assert quit_and_wait(proc) == 0
