"""Scenarios 1 and 6: workers killed at random under load, and the master killed.

1. Worker chaos: under steady load, ``kill -9`` a random worker every 100 ms for 10 s.
   The master survives, the worker count is restored soon after the last kill, and the
   only failed requests are those in flight in a killed worker: at most one per kill for
   a synchronous echo worker (one connection at a time), at most the clients it held for
   one with handler threads or an event loop (each mode is run).
6. Master death: ``kill -9`` of the master, under load and with an idle client holding a
   worker, makes every worker exit within 2 s; nothing is left listening on the port or
   running, and a new server starts on the same port and the stale pid file.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import time
from pathlib import Path

import pytest
from conftest import children, descendants, is_alive, wait_for, wait_workers
from load import EchoLoad

from .common import (
    CLI,
    STUCK,
    ask,
    connect_refused,
    listening_ports,
    quit_and_wait,
    report,
    start_echo,
    wait_gone,
)

pytestmark = pytest.mark.stress

CHAOS_SECONDS = 10.0
KILL_EVERY = 0.1
# The issue asks for the pool to be whole "within a second of the last kill". Measured
# here: a few milliseconds on an idle machine. The bound leaves room for a 2-core machine
# that other test runs share, and still fails a master that respawns on its next timeout
# wake-up (seconds) instead of at once.
RESTORE_BOUND = 1.0


def spawn_times(log: str) -> dict[int, float]:
    """Worker pid -> the wall-clock time of the master's "spawned worker" line for it
    (the log's ``asctime`` has milliseconds)."""
    found = re.findall(
        r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) .*spawned worker\[\d+\] pid (\d+)$",
        log,
        re.M,
    )
    return {
        int(pid): time.mktime(time.strptime(whole, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000
        for whole, ms, pid in found
    }


@pytest.mark.parametrize(
    "mode", [[], ["--threads", "8"], ["--asyncio"]], ids=["sync", "threads", "asyncio"]
)
def test_worker_chaos_kill_9_a_random_worker_every_100ms(spawn, mode: list[str]) -> None:
    workers = 4
    concurrency = 8
    # A synchronous worker has at most one connection in flight; a worker with threads
    # or an event loop may hold every client's.
    in_flight_per_kill = concurrency if mode else 1
    proc, address, _ = start_echo(spawn, *mode, workers=workers)
    rng = random.Random(6)
    killed: list[int] = []
    with EchoLoad(address, concurrency=concurrency, timeout=10) as load:
        load.wait_answered(200)
        start = time.monotonic()
        next_kill = start
        while time.monotonic() - start < CHAOS_SECONDS:
            live = children(proc.pid)
            if live:
                victim = rng.choice(live)
                try:
                    os.kill(victim, signal.SIGKILL)
                    killed.append(victim)
                    last_kill = time.time()  # wall clock, to compare with the master's log
                except ProcessLookupError:
                    pass  # died on its own meanwhile: not our kill
            next_kill += KILL_EVERY  # the pacing is the scenario, not a wait
            if next_kill - start >= CHAOS_SECONDS:
                break  # no pause after the last kill: it would count as restoring time
            time.sleep(max(0.0, next_kill - time.monotonic()))

        def whole() -> bool:
            # The last victim may still look alive for a moment after the kill.
            pool = children(proc.pid)
            return len(pool) == workers and killed[-1] not in pool

        wait_for(whole, timeout=10, interval=0.002, what=f"{workers} workers again")
        seen_whole = time.time() - last_kill
        # When the master forked the last replacement, from its own log: this test's
        # threads (the load, this loop) share one GIL and two CPUs, so when this thread
        # sees the pool whole may be long after the master made it so.
        # The master logs a spawn just after the fork, so the line may trail the process.
        pool = children(proc.pid)
        spawned = wait_for(
            lambda: (lambda t: t if set(pool) <= set(t) else None)(spawn_times(proc.output())),
            what="the spawn lines of the current workers",
        )
        restored = max(spawned[pid] for pid in pool) - last_kill
        during = load.result.answered
        load.wait_answered(200)  # and the new workers serve
    result = load.result
    report(
        "1-worker-chaos",
        result,
        mode=" ".join(mode) or "sync",
        workers=workers,
        kills=len(killed),
        seconds=CHAOS_SECONDS,
        restored_s=restored,
        seen_whole_s=seen_whole,
        answered_during_chaos=during,
    )
    assert is_alive(proc.pid), "the master survives"
    assert result.refused == 0, result
    assert result.failed <= len(killed) * in_flight_per_kill, (
        f"more failures than {in_flight_per_kill} per kill ({len(killed)}): {result}"
    )
    assert set(result.reasons) <= {"ConnectionResetError", "closed before the answer"}, result
    unusual = [line for line in proc.output().splitlines()
               if "master:" in line and "killed by SIGKILL" not in line
               and "spawned worker" not in line]  # fmt: skip
    assert restored < RESTORE_BOUND, (
        f"{workers} workers only {restored:.2f}s after the last kill; master log:\n"
        + "\n".join(unusual[-20:])
    )
    assert ask(address) == b"hello\n"
    assert quit_and_wait(proc) == 0


def test_master_death_under_load_leaves_nothing_behind(spawn, tmp_path: Path) -> None:
    pid_file = tmp_path / "echo.pid"
    proc, address, workers = start_echo(spawn, "--pid-file", str(pid_file), workers=4)
    with socket.create_connection(address, timeout=10) as idle:
        idle.sendall(b"x")
        assert idle.recv(1) == b"x"  # a worker now waits on this client
        with EchoLoad(address, concurrency=6, timeout=5) as load:
            load.wait_answered(300)
            tree = descendants(proc.pid)
            assert sorted(tree) == sorted(workers), "workers start nothing of their own"
            proc.signal(signal.SIGKILL)
            assert proc.wait(10) == -signal.SIGKILL
            gone = wait_gone(tree, 10, "every worker to exit")
        assert idle.recv(1) == b"", "the idle client's connection was closed"
    result = load.result
    report("6-master-death", result, workers=len(workers), all_workers_gone_s=gone, idle_client=1)
    assert gone < 2.0, f"workers outlived their master by {gone:.2f}s"
    assert address[1] not in listening_ports()
    assert connect_refused(address)
    assert pid_file.exists(), "kill -9 leaves a stale pid file"
    # Nothing holds the port or the pid file: a new server takes both.
    again, _, _ = start_echo(
        spawn, "--pid-file", str(pid_file), workers=1, bind=f"127.0.0.1:{address[1]}"
    )
    assert ask(address) == b"hello\n"
    assert quit_and_wait(again) == 0


@pytest.mark.parametrize(
    "user",
    [
        pytest.param(None, id="root"),
        pytest.param(
            "nobody",
            id="user-nobody",
            marks=[
                pytest.mark.skipif(os.getuid() != 0, reason="dropping privileges needs root"),
            ],
        ),
    ],
)
def test_master_death_ends_a_worker_stuck_in_a_handler(
    spawn, tmp_path: Path, user: str | None
) -> None:
    """A worker that never calls back into the framework (a handler stuck in a C call, a
    sleep, a lock) cannot see the master-death pipe; only the kernel's parent-death
    signal ends it. --preload: the handler's module is in tmp_path, which the user
    nobody cannot read."""
    (tmp_path / "stuckmod.py").write_text(STUCK)
    extra = ["--user", user] if user else []
    proc = spawn(
        [*CLI, "--bind", "127.0.0.1:0", "--workers", "2", "--timeout", "30", "--preload",
         *extra, "stuckmod:Stuck"],
    )  # fmt: skip
    address = ("127.0.0.1", proc.port())
    workers = wait_workers(proc.pid, 2)
    for pid in workers:
        spawn.track(pid)  # reaped even if they outlive the master
    with socket.create_connection(address, timeout=10) as hung:
        hung.sendall(b"hang")
        assert ask(address) == b"hello\n", "the other worker serves"
        proc.signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
        start = time.monotonic()
        deadline = start + 3.0
        while any(is_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.01)
        left = [p for p in workers if is_alive(p)]
        gone = time.monotonic() - start
    report(
        f"6-master-death-stuck-handler-{user or 'root'}",
        workers=2,
        stuck=1,
        left_running=len(left),
        still_listening=address[1] in listening_ports(),
        waited_s=gone,
    )
    assert not left, f"workers {left} outlived their master by {gone:.1f}s"
    assert address[1] not in listening_ports()
