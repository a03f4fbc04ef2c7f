"""Scenario 4, the stuck handler: a handler that hangs is killed after ``timeout`` while
the other workers keep answering, and a client that is merely idle (its handler waits for
it and stamps the heartbeat) is not mistaken for a stuck one."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from conftest import is_alive, wait_for, wait_workers
from load import EchoLoad

from .common import CLI, STUCK, quit_and_wait, report

pytestmark = pytest.mark.stress

TIMEOUT = 1.0
# The master sleeps until the oldest heartbeat's deadline, so the kill should come a few
# milliseconds after TIMEOUT; the slack is for a loaded 2-core machine.
KILL_SLACK = 1.5


def test_a_stuck_handler_is_killed_after_timeout_while_the_others_answer(
    spawn, tmp_path: Path
) -> None:
    (tmp_path / "stuckmod.py").write_text(STUCK)
    proc = spawn([*CLI, "--bind", "127.0.0.1:0", "--workers", "4", "--timeout", str(TIMEOUT),
                  "stuckmod:Stuck"])  # fmt: skip
    address = ("127.0.0.1", proc.port())
    workers = wait_workers(proc.pid, 4)
    with (
        socket.create_connection(address, timeout=10) as idle,
        EchoLoad(address, concurrency=6, timeout=10) as load,
    ):
        idle.sendall(b"idle")
        assert idle.recv(4) == b"idle"  # one worker now waits on this quiet client
        load.wait_answered(300)
        hung_at = time.monotonic()  # before the worker's last heartbeat (its accept)
        answered_before = load.result.answered
        with socket.create_connection(address, timeout=10) as hung:
            hung.sendall(b"hang")
            killed = wait_for(
                lambda: [p for p in workers if not is_alive(p)], 10, 0.005, "the kill"
            )
            kill_s = time.monotonic() - hung_at
            answered_while_stuck = load.result.answered - answered_before
            try:
                closed = hung.recv(1) == b""
            except ConnectionResetError:
                closed = True
        replacements = wait_workers(proc.pid, 4)
        load.wait_answered(300)
        idle.sendall(b"still here")
        idle_ok = idle.recv(10) == b"still here"
    result = load.result
    report(
        "4-stuck-handler",
        result,
        workers=4,
        timeout_s=TIMEOUT,
        killed_after_s=kill_s,
        answered_while_stuck=answered_while_stuck,
        idle_client_survived=idle_ok,
    )
    assert len(killed) == 1, killed
    assert TIMEOUT <= kill_s < TIMEOUT + KILL_SLACK, kill_s
    assert closed, "the stuck connection is closed by the kill"
    assert answered_while_stuck >= 50, "the other workers kept answering"
    assert result.failed == 0 and result.refused == 0, result
    assert idle_ok, "an idle client is not a stuck handler"
    assert len(set(replacements) - set(workers)) == 1
    assert proc.output().count("missed its heartbeat") == 1, proc.output()
    assert quit_and_wait(proc) == 0
