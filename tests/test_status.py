"""The status command reads a running master's scoreboard without disturbing it."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from conftest import REPO, wait_for, wait_workers

APP = str(REPO / "tests" / "programs" / "engine_app.py")


def status(pid_file: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "prefork_server.status", "--pid-file", str(pid_file)],
        capture_output=True, text=True, timeout=30, cwd=REPO,
    )  # fmt: skip


def test_status_prints_every_worker_of_a_running_master(spawn, tmp_path: Path) -> None:
    pid_file = tmp_path / "app.pid"
    proc = spawn([sys.executable, APP, "--events", str(tmp_path / "ev"), "--workers", "3",
                  "--pid-file", str(pid_file)])  # fmt: skip
    workers = wait_workers(proc.pid, 3)

    def all_idle() -> str | None:
        result = status(pid_file)
        return result.stdout if "3 idle" in result.stdout else None

    out = wait_for(all_idle, what="three idle workers in the status")
    assert out.startswith(f"master {proc.pid}: 3 workers")
    for pid in workers:
        assert f" {pid} " in out
    for number in range(3):
        assert f"[{number}]" in out
    served = wait_for(lambda: int(status(pid_file).stdout.split("; ")[1].split()[0]) > 10,
                      what="units of work to be counted")  # fmt: skip
    assert served
    assert wait_workers(proc.pid, 3) == workers, "reading the status disturbed nobody"
    proc.signal(signal.SIGQUIT)
    assert proc.wait() == 0
    gone = status(pid_file)
    assert gone.returncode == 1 and "no pid" in gone.stderr


def test_status_of_something_that_is_not_a_server(tmp_path: Path) -> None:
    pid_file = tmp_path / "other.pid"
    pid_file.write_text("1\n")
    result = status(pid_file)
    assert result.returncode == 1
    assert "scoreboard" in result.stderr or "Permission" in result.stderr
