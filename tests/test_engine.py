"""Black-box tests of the Preforker engine: real masters, real workers, real signals."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO, Proc, children, is_alive, wait_for, wait_workers

APP = str(REPO / "tests" / "programs" / "engine_app.py")


def events(path: Path) -> list[tuple[int, str]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        pid, _, what = line.partition(" ")
        out.append((int(pid), what))
    return out


def pids_with(path: Path, what: str) -> list[int]:
    return [pid for pid, w in events(path) if w == what]


@pytest.fixture
def start(spawn: Callable[..., Proc], tmp_path: Path) -> Callable[..., tuple[Proc, Path]]:
    def _start(*args: str) -> tuple[Proc, Path]:
        ev = tmp_path / "events"
        proc = spawn([sys.executable, APP, "--events", str(ev), *args])
        return proc, ev

    return _start


def booted(proc: Proc, ev: Path, count: int) -> list[int]:
    """Wait until ``count`` workers run and each has recorded its boot."""
    pids = wait_workers(proc.pid, count)
    wait_for(lambda: set(pids) <= set(pids_with(ev, "boot")), what="workers to boot")
    return pids


# -- stopping ----------------------------------------------------------------------------


def test_quit_lets_code_after_the_worker_loop_run(start, tmp_path: Path) -> None:
    pid_file = tmp_path / "app.pid"
    proc, ev = start("--workers", "3", "--pid-file", str(pid_file))
    workers = booted(proc, ev, 3)
    assert pid_file.read_text().strip() == str(proc.pid)
    proc.signal(signal.SIGQUIT)
    assert proc.wait() == 0
    assert sorted(pids_with(ev, "after-loop")) == sorted(workers)
    assert not any(is_alive(p) for p in workers)
    assert not pid_file.exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_term_and_int_stop_at_once_without_the_code_after_the_loop(
    start, tmp_path: Path, sig: int
) -> None:
    pid_file = tmp_path / "app.pid"
    proc, ev = start("--workers", "2", "--pid-file", str(pid_file))
    workers = booted(proc, ev, 2)
    proc.signal(sig)
    assert proc.wait() == 0
    assert pids_with(ev, "after-loop") == []
    assert not any(is_alive(p) for p in workers)
    assert not pid_file.exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_sent_to_the_whole_process_group_is_no_error(start, sig: int) -> None:
    # Ctrl-C in a terminal sends INT to the foreground process group, workers included;
    # `kill -- -PGID` and systemd's KillMode=control-group send TERM to every process.
    # Workers killed by that signal are part of the stop: no ERROR, no replacement.
    proc, ev = start("--workers", "2")
    workers = booted(proc, ev, 2)
    os.killpg(proc.pid, sig)  # the master leads its own session, hence its group
    assert proc.wait() == 0
    out = proc.output()
    assert "ERROR" not in out, out
    assert out.count("spawned worker") == 2, out
    assert not any(is_alive(p) for p in workers)


def test_quit_kills_workers_that_outlive_the_graceful_timeout(start) -> None:
    proc, ev = start("--workers", "2", "--mode", "stuck-once", "--timeout", "30",
                     "--graceful-timeout", "0.5")  # fmt: skip
    wait_for(lambda: pids_with(ev, "stuck"), what="a stuck worker")
    stuck = pids_with(ev, "stuck")[0]
    booted(proc, ev, 2)
    proc.signal(signal.SIGQUIT)
    assert proc.wait() == 0
    assert not is_alive(stuck)
    assert "graceful stop deadline passed" in proc.output()


# -- the worker count --------------------------------------------------------------------


def test_ttin_ttou_and_winch_change_the_live_worker_count(start) -> None:
    proc, ev = start("--workers", "2")
    booted(proc, ev, 2)
    proc.signal(signal.SIGTTIN)
    wait_workers(proc.pid, 3)
    proc.signal(signal.SIGTTOU)
    wait_workers(proc.pid, 2)
    for n in range(2, 6):  # never below zero: one TTIN afterwards brings exactly one back
        # One at a time: the kernel merges a signal sent again while the first is pending.
        proc.signal(signal.SIGTTOU)
        wait_for(lambda n=n: proc.output().count("one worker fewer") == n, what="a TTOU")
    wait_workers(proc.pid, 0)
    proc.signal(signal.SIGTTIN)
    wait_workers(proc.pid, 1)
    proc.signal(signal.SIGTTIN)
    wait_workers(proc.pid, 2)
    proc.signal(signal.SIGWINCH)
    wait_workers(proc.pid, 0)
    assert is_alive(proc.pid), "WINCH must keep the master"
    proc.signal(signal.SIGTTIN)
    wait_workers(proc.pid, 1)
    proc.signal(signal.SIGQUIT)
    assert proc.wait() == 0


def test_retired_workers_finish_their_loop(start) -> None:
    proc, ev = start("--workers", "2")
    workers = booted(proc, ev, 2)
    proc.signal(signal.SIGWINCH)
    wait_workers(proc.pid, 0)
    assert sorted(pids_with(ev, "after-loop")) == sorted(workers)


# -- respawning --------------------------------------------------------------------------


def test_a_worker_whose_function_returns_is_respawned_with_backoff(start) -> None:
    proc, ev = start("--workers", "1", "--mode", "return")
    wait_for(lambda: len(set(pids_with(ev, "returning"))) >= 4, what="four generations")
    out = proc.output()
    assert "returned from its work function" in out
    delays = [float(d) for d in re.findall(r"respawning in ([\d.]+)s", out)]
    assert delays[:3] == [0.1, 0.2, 0.4], out
    assert is_alive(proc.pid)


def test_a_worker_that_raises_is_logged_and_respawned(start) -> None:
    proc, ev = start("--workers", "2", "--mode", "raise")
    wait_for(lambda: len(set(pids_with(ev, "boot"))) >= 4, what="respawns")
    out = proc.output()
    assert "Traceback" in out and "ValueError: boom in the work function" in out
    assert "exited with status 1" in out
    assert is_alive(proc.pid)


def test_workers_that_cannot_boot_stop_the_master_with_an_error(start) -> None:
    proc, ev = start("--workers", "2", "--mode", "bootfail", "--max-boot-failures", "3")
    assert proc.wait(20) != 0
    out = proc.output()
    assert "3 workers in a row exited before their first heartbeat" in out
    assert "RuntimeError: cannot boot" in out
    # The third failure stops it; the other worker slot may have started one more.
    assert 3 <= len(pids_with(ev, "boot")) <= 4
    assert children(proc.pid) == []


def test_a_worker_killed_from_outside_is_replaced_at_once(start) -> None:
    proc, ev = start("--workers", "2")
    first = booted(proc, ev, 2)
    os.kill(first[0], signal.SIGKILL)

    def replaced() -> bool:
        # One snapshot: two reads could see the old worker alive, then already a zombie.
        now = children(proc.pid)
        return len(now) == 2 and first[0] not in now

    wait_for(replaced, timeout=2, what="a replacement worker")
    assert "killed by SIGKILL" in proc.output()
    assert "respawning in" not in proc.output()


# -- the heartbeat -----------------------------------------------------------------------


def test_a_stuck_worker_is_killed_after_timeout_and_replaced(start) -> None:
    timeout = 1.0
    proc, ev = start("--workers", "2", "--mode", "stuck-once", "--timeout", str(timeout))
    wait_for(lambda: pids_with(ev, "stuck"), what="a stuck worker")
    stuck_at = time.monotonic()
    stuck = pids_with(ev, "stuck")[0]
    wait_for(lambda: not is_alive(stuck), timeout=timeout + 5, what="the stuck worker to die")
    waited = time.monotonic() - stuck_at
    assert timeout * 0.9 <= waited <= timeout + 2.0, waited
    assert re.search(rf"worker\[\d\] \(pid {stuck}\) missed its heartbeat", proc.output())
    replacements = wait_workers(proc.pid, 2)
    assert stuck not in replacements


def test_a_worker_that_heartbeats_is_never_killed(start) -> None:
    proc, ev = start("--workers", "2", "--timeout", "0.3")
    workers = booted(proc, ev, 2)
    until = time.monotonic() + 2.0  # about seven timeouts
    while time.monotonic() < until:
        assert children(proc.pid) == workers
        time.sleep(0.05)
    assert "missed its heartbeat" not in proc.output()


def test_stopping_and_continuing_the_whole_group_kills_nobody(start) -> None:
    timeout = 0.5
    proc, ev = start("--workers", "2", "--timeout", str(timeout))
    workers = booted(proc, ev, 2)
    os.killpg(proc.pid, signal.SIGSTOP)  # a Ctrl-Z, or a frozen container
    try:
        wait_for(lambda: all(_state(p) == "T" for p in [proc.pid, *workers]), what="stopped")
        resume_after = time.monotonic() + 4 * timeout
        wait_for(lambda: time.monotonic() >= resume_after, what="the pause")
    finally:
        os.killpg(proc.pid, signal.SIGCONT)
    settle = time.monotonic() + 4 * timeout
    while time.monotonic() < settle:
        assert children(proc.pid) == workers
        time.sleep(0.05)
    assert "missed its heartbeat" not in proc.output()


def test_stopping_and_continuing_the_master_alone_kills_nobody(start) -> None:
    timeout = 0.5
    proc, ev = start("--workers", "2", "--timeout", str(timeout))
    workers = booted(proc, ev, 2)
    proc.signal(signal.SIGSTOP)
    try:
        wait_for(lambda: _state(proc.pid) == "T", what="the master to stop")
        resume_after = time.monotonic() + 4 * timeout
        wait_for(lambda: time.monotonic() >= resume_after, what="the pause")
    finally:
        proc.signal(signal.SIGCONT)
    settle = time.monotonic() + 4 * timeout
    while time.monotonic() < settle:
        assert children(proc.pid) == workers
        time.sleep(0.05)


def _state(pid: int) -> str:
    data = Path(f"/proc/{pid}/stat").read_text()
    return data[data.rindex(")") + 2 :].split()[0]


def test_killing_the_master_makes_every_worker_exit(start) -> None:
    proc, ev = start("--workers", "3", "--timeout", "30")
    workers = booted(proc, ev, 3)
    proc.signal(signal.SIGKILL)
    proc.wait()
    killed_at = time.monotonic()
    wait_for(lambda: not any(is_alive(p) for p in workers), timeout=5, what="orphans to exit")
    assert time.monotonic() - killed_at < 2.0


def test_an_idle_master_uses_no_measurable_cpu(start) -> None:
    proc, ev = start("--workers", "2", "--timeout", "5")
    booted(proc, ev, 2)

    def cpu_ticks() -> int:
        data = Path(f"/proc/{proc.pid}/stat").read_text()
        fields = data[data.rindex(")") + 2 :].split()
        return int(fields[11]) + int(fields[12])  # utime + stime

    before = cpu_ticks()
    until = time.monotonic() + 3.0
    wait_for(lambda: time.monotonic() >= until, what="three idle seconds", interval=0.2)
    assert cpu_ticks() - before <= 3  # clock ticks (10 ms each): at most a few wake-ups


# -- pid file, daemon, output ------------------------------------------------------------


def test_a_live_pid_file_refuses_a_second_start(start, spawn, tmp_path: Path) -> None:
    pid_file = tmp_path / "app.pid"
    first, ev = start("--workers", "1", "--pid-file", str(pid_file))
    booted(first, ev, 1)
    second = spawn([sys.executable, APP, "--events", str(tmp_path / "ev2"),
                    "--pid-file", str(pid_file)])  # fmt: skip
    assert second.wait() != 0
    assert f"names pid {first.pid}, which is running" in second.output()
    assert pid_file.read_text().strip() == str(first.pid)
    assert is_alive(first.pid) and len(children(first.pid)) == 1


def test_a_stale_pid_file_is_replaced(start, tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    pid_file = tmp_path / "app.pid"
    pid_file.write_text(f"{dead.pid}\n")
    proc, ev = start("--workers", "1", "--pid-file", str(pid_file))
    booted(proc, ev, 1)
    assert pid_file.read_text().strip() == str(proc.pid)
    proc.signal(signal.SIGQUIT)
    assert proc.wait() == 0
    assert not pid_file.exists()


def test_start_daemonizes_and_quit_cleans_up(spawn, tmp_path: Path) -> None:
    pid_file = tmp_path / "d.pid"
    ev = tmp_path / "events"
    launcher = spawn([sys.executable, APP, "--events", str(ev), "--daemon", "--workers", "2",
                      "--pid-file", str(pid_file), "--app-name", "dtest"])  # fmt: skip
    assert launcher.wait() == 0
    master = int(launcher.wait_output(r"DAEMON=(\d+)").group(1))
    spawn.track(master)  # type: ignore[attr-defined]
    assert pid_file.read_text().strip() == str(master)
    # The launcher led its own session (start_new_session); the daemon left it.
    assert os.getsid(master) not in (launcher.pid, os.getsid(0)), "the daemon needs a session"
    assert os.getsid(master) != master, "not a session leader: it can never get a terminal"
    workers = wait_workers(master, 2)
    assert set(workers) <= set(pids_with(ev, "boot")), "start() returns once workers booted"
    log = tmp_path / "dtest.log"
    assert f"master {master} starting 2 workers" in log.read_text()
    os.kill(master, signal.SIGQUIT)
    wait_for(lambda: not is_alive(master), what="the daemon to exit")
    assert not pid_file.exists()
    assert not any(is_alive(p) for p in workers)
    assert sorted(pids_with(ev, "after-loop")) == sorted(workers)


def test_start_reports_a_daemon_that_failed(spawn, tmp_path: Path) -> None:
    launcher = spawn([sys.executable, APP, "--events", str(tmp_path / "ev"), "--daemon",
                      "--mode", "bootfail", "--max-boot-failures", "2",
                      "--app-name", "failing"])  # fmt: skip
    assert launcher.wait(20) != 0
    out = launcher.output()
    assert "failing failed to start" in out and "2 workers in a row" in out
    assert str(tmp_path / "failing.log") in out
    assert not (tmp_path / "failing.pid").exists()


@pytest.mark.parametrize("layout", ["separate", "shared", "devnull"])
def test_stdout_and_stderr_go_where_they_are_told(start, tmp_path: Path, layout: str) -> None:
    out_path = {"separate": tmp_path / "out.txt", "shared": tmp_path / "both.txt",
                "devnull": Path(os.devnull)}[layout]  # fmt: skip
    err_path = {"separate": tmp_path / "err.txt", "shared": tmp_path / "both.txt",
                "devnull": Path(os.devnull)}[layout]  # fmt: skip
    proc, ev = start("--workers", "2", "--mode", "print",
                     "--stdout", str(out_path), "--stderr", str(err_path))  # fmt: skip
    wait_for(lambda: len(pids_with(ev, "printed")) == 2, what="both workers to print")
    workers = pids_with(ev, "printed")
    proc.signal(signal.SIGQUIT)
    assert proc.wait() == 0
    if layout == "devnull":
        assert "stdout from" not in proc.output() and "stderr from" not in proc.output()
        return
    out, err = out_path.read_text(), err_path.read_text()
    for pid in workers:
        assert f"stdout from {pid}" in out
        assert f"stderr from {pid}" in err
    if layout == "separate":
        assert "stderr from" not in out and "stdout from" not in err
    assert "stdout from" not in proc.output()


def test_usr1_reopens_stdout_after_a_rotation(start, tmp_path: Path) -> None:
    out_path = tmp_path / "out.txt"
    proc, ev = start("--workers", "1", "--stdout", str(out_path), "--stderr", str(out_path))
    booted(proc, ev, 1)
    rotated = tmp_path / "out.txt.1"
    os.rename(out_path, rotated)
    proc.signal(signal.SIGUSR1)
    wait_for(lambda: out_path.exists() and "reopen log files" in rotated.read_text(),
             what="the master to reopen")  # fmt: skip
    proc.signal(signal.SIGQUIT)
    assert proc.wait() == 0
    assert "stopped" in out_path.read_text()


def test_process_titles_name_the_role(start) -> None:
    proc, ev = start("--workers", "2", "--app-name", "t")
    workers = booted(proc, ev, 2)

    def title(pid: int) -> str:
        cmdline = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
        return Path(f"/proc/{pid}/comm").read_text().strip() + " | " + cmdline

    assert "t master" in title(proc.pid)
    assert sorted(re.search(r"t worker\[(\d)\]", title(p)).group(1) for p in workers) == ["0", "1"]
