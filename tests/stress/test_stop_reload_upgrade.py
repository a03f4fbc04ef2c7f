"""Scenarios 2 and 3: the signals that end or replace workers, each under steady load.

2. Graceful stop: QUIT while clients are sending. Every request that a worker accepted is
   answered in full; the master exits with status 0 and removes its pid file. To tell a
   connection that a worker accepted from one still waiting in the kernel's listen queue
   when the last listener closed, the handler is the echo example plus one byte sent the
   moment a worker takes the connection (load's ``greeting``): connections reset before
   that byte are counted apart, as *unaccepted*.
3. Reload and upgrade: HUP (five times), and USR2 followed by QUIT of the old master, each
   under load from short connections and from persistent ones at once: zero failed
   requests and zero refused connections. A persistent connection that a retiring worker
   closes between two requests is reopened, and counted as a reconnect.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from conftest import children, is_alive, wait_for, wait_workers
from load import EchoLoad, PersistentEchoLoad

from .common import CLI, ask, quit_and_wait, report, start_echo

pytestmark = pytest.mark.stress

MARKED = """\
from examples.echo import EchoHandler


class MarkedEcho(EchoHandler):
    \"\"\"The echo example, plus b"+" sent as soon as a worker has the connection.\"\"\"

    def handle(self):
        self.request.sendall(b"+")
        super().handle()
"""


def test_graceful_stop_under_load_answers_every_accepted_request(spawn, tmp_path: Path) -> None:
    (tmp_path / "marked.py").write_text(MARKED)
    pid_file = tmp_path / "echo.pid"
    proc = spawn([*CLI, "--bind", "127.0.0.1:0", "--workers", "4", "--pid-file", str(pid_file),
                  "--graceful-timeout", "20", "marked:MarkedEcho"])  # fmt: skip
    address = ("127.0.0.1", proc.port())
    wait_workers(proc.pid, 4)
    with EchoLoad(address, concurrency=8, timeout=10, greeting=b"+") as load:
        load.wait_answered(1000)
        quit_at = time.monotonic()
        proc.signal(signal.SIGQUIT)
        status = proc.wait(30)
        stop_s = time.monotonic() - quit_at
        answered_at_exit = load.result.answered
        # Keep sending for a moment: now nobody listens.
        wait_for(lambda: load.result.refused >= 50, what="connections refused after the exit")
    result = load.result
    report(
        "2-graceful-stop",
        result,
        workers=4,
        quit_to_exit_s=stop_s,
        answered_before_exit=answered_at_exit,
    )
    assert status == 0, proc.output()
    assert not pid_file.exists()
    assert result.failed == 0, result
    assert "deadline passed" not in proc.output(), "no worker had to be killed"
    assert stop_s < 5, "nothing waited for the graceful timeout (20 s)"


def replaced(master: int, old: list[int], count: int) -> list[int]:
    """Wait until ``master`` has ``count`` workers, none of them in ``old``."""

    def fresh() -> list[int] | None:
        kids = children(master)
        return kids if len(kids) == count and not set(kids) & set(old) else None

    return wait_for(fresh, 20, what=f"{count} new workers of {master}")  # type: ignore[no-any-return]


def test_hup_five_times_under_load_fails_and_refuses_nothing(spawn) -> None:
    workers = 4
    proc, address, old = start_echo(spawn, workers=workers)
    took = []
    with (
        EchoLoad(address, concurrency=6, timeout=10) as load,
        PersistentEchoLoad(address, concurrency=2, timeout=10) as steady,
    ):
        load.wait_answered(300)
        steady.wait_answered(300)
        for _ in range(5):
            start = time.monotonic()
            proc.signal(signal.SIGHUP)
            old = replaced(proc.pid, old, workers)
            took.append(time.monotonic() - start)
            load.wait_answered(200)
            steady.wait_answered(100)
    report("3-hup-x5", load.result, workers=workers, reload_s_max=max(took))
    report("3-hup-x5-persistent", steady.result, workers=workers)
    for result in (load.result, steady.result):
        assert result.failed == 0 and result.refused == 0, result
    assert "deadline passed" not in proc.output(), "no old worker had to be killed"
    assert quit_and_wait(proc) == 0


def test_usr2_then_quit_of_the_old_master_under_load_fails_nothing(spawn, tmp_path: Path) -> None:
    workers = 4
    pid_file = tmp_path / "echo.pid"
    old, address, old_workers = start_echo(spawn, "--pid-file", str(pid_file), workers=workers)

    def new_master() -> int | None:
        try:
            pid = int(pid_file.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return pid if pid != old.pid else None

    with (
        EchoLoad(address, concurrency=6, timeout=10) as load,
        PersistentEchoLoad(address, concurrency=2, timeout=10) as steady,
    ):
        load.wait_answered(300)
        steady.wait_answered(300)
        start = time.monotonic()
        old.signal(signal.SIGUSR2)
        new = wait_for(new_master, 20, what="the new master's pid file")
        spawn.track(new)
        wait_workers(new, workers, timeout=20)
        upgraded = time.monotonic() - start
        load.wait_answered(200)
        old.signal(signal.SIGQUIT)
        assert old.wait(30) == 0
        handed_over = time.monotonic() - start
        assert not any(is_alive(p) for p in old_workers)
        load.wait_answered(300)
        steady.wait_answered(300)
    report(
        "3-usr2-quit-old", load.result, workers=workers, new_master_serving_s=upgraded,
        old_master_gone_s=handed_over,
    )  # fmt: skip
    report("3-usr2-quit-old-persistent", steady.result, workers=workers)
    for result in (load.result, steady.result):
        assert result.failed == 0 and result.refused == 0, result
    assert not Path(f"{pid_file}.oldbin").exists()
    assert ask(address) == b"hello\n"
    os.kill(new, signal.SIGQUIT)
    wait_for(lambda: not is_alive(new), 20, what="the new master to stop")
    assert not pid_file.exists()
