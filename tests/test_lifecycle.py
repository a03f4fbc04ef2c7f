"""Worker lifecycle beyond the seed: max_requests, hooks, reload (HUP), graceful TERM,
privilege drop, and log reopening in the workers. Real masters, real signals."""

from __future__ import annotations

import os
import pwd
import re
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO, Proc, children, is_alive, wait_for, wait_workers

APP = str(REPO / "tests" / "programs" / "engine_app.py")


def events(path: Path) -> list[tuple[int, str]]:
    if not path.exists():
        return []
    return [
        (int(pid), what)
        for pid, _, what in (line.partition(" ") for line in path.read_text().splitlines())
    ]


def pids_with(path: Path, what: str) -> list[int]:
    return [pid for pid, w in events(path) if w == what]


@pytest.fixture
def start(spawn: Callable[..., Proc], tmp_path: Path) -> Callable[..., tuple[Proc, Path]]:
    def _start(*args: str) -> tuple[Proc, Path]:
        ev = tmp_path / "events"
        return spawn([sys.executable, APP, "--events", str(ev), *args]), ev

    return _start


def booted(proc: Proc, ev: Path, count: int) -> list[int]:
    pids = wait_workers(proc.pid, count)
    wait_for(lambda: set(pids) <= set(pids_with(ev, "boot")), what="workers to boot")
    return pids


def test_max_requests_retires_workers_without_backoff(start) -> None:
    proc, ev = start("--workers", "1", "--max-requests", "5")
    wait_for(lambda: len(pids_with(ev, "after-loop")) >= 3, what="three retirements")
    served = [int(w.split()[1]) for _, w in events(ev) if w.startswith("served ")]
    assert served[:3] == [5, 5, 5]
    # The worker writes its last event before it exits; the master logs the exit and
    # forks the next one a moment later.
    wait_for(lambda: proc.output().count("retired (max_requests)") >= 3,
             what="three retirements logged")  # fmt: skip
    wait_for(lambda: len(children(proc.pid)) == 1, what="one worker running")
    out = proc.output()
    assert "respawning in" not in out and "returned from its work function" not in out


def test_max_requests_jitter_spreads_the_limits(start) -> None:
    proc, ev = start("--workers", "2", "--max-requests", "5", "--max-requests-jitter", "40")
    wait_for(lambda: len(pids_with(ev, "after-loop")) >= 6, what="six retirements")
    served = [int(w.split()[1]) for _, w in events(ev) if w.startswith("served ")]
    assert all(5 <= n <= 45 for n in served), served
    assert len(set(served)) > 1, served  # six equal draws from 41 values: ~1e-8


def test_graceful_term_makes_term_a_graceful_stop(start) -> None:
    proc, ev = start("--workers", "2", "--graceful-term")
    workers = booted(proc, ev, 2)
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0
    assert sorted(pids_with(ev, "after-loop")) == sorted(workers)


def test_hooks_run_where_documented(start) -> None:
    proc, ev = start("--workers", "2", "--hooks")
    workers = booted(proc, ev, 2)
    proc.signal(signal.SIGQUIT)
    assert proc.wait() == 0
    by_pid: dict[int, list[str]] = {}
    for pid, what in events(ev):
        by_pid.setdefault(pid, []).append(what)
    master_events = by_pid[proc.pid]
    assert sorted(master_events) == ["hook before_fork 0", "hook before_fork 1"]
    for pid in workers:
        seen = by_pid[pid]
        number = seen[0].split()[-1]
        assert seen[0] == f"hook after_fork {number}"
        assert seen[1] == "boot"
        assert seen[-1] == f"hook worker_exit {number}"


def test_a_failing_master_hook_is_logged_and_harmless(start) -> None:
    proc, ev = start("--workers", "2", "--hooks", "--failing-hook", "before_fork")
    booted(proc, ev, 2)
    assert "before_fork hook raised" in proc.output()
    assert "RuntimeError: before_fork hook failed on purpose" in proc.output()


def test_a_failing_after_fork_hook_is_a_boot_failure(start) -> None:
    proc, ev = start("--workers", "1", "--hooks", "--failing-hook", "after_fork",
                     "--max-boot-failures", "2")  # fmt: skip
    assert proc.wait(20) != 0
    assert "2 workers in a row exited before their first heartbeat" in proc.output()
    assert pids_with(ev, "boot") == []


def test_on_worker_timeout_runs_before_the_kill(start) -> None:
    proc, ev = start("--workers", "1", "--hooks", "--mode", "stuck-once", "--timeout", "0.5")
    wait_for(lambda: pids_with(ev, "stuck"), what="a stuck worker")
    stuck = pids_with(ev, "stuck")[0]
    wait_for(lambda: not is_alive(stuck), what="the kill")
    assert (proc.pid, "hook on_worker_timeout 0 " + str(stuck)) in events(ev)


def test_hup_replaces_every_worker_gracefully(start) -> None:
    proc, ev = start("--workers", "3", "--hooks")
    old = booted(proc, ev, 3)
    proc.signal(signal.SIGHUP)
    wait_for(lambda: sorted(pids_with(ev, "after-loop")) == sorted(old), what="old to leave")
    new = wait_workers(proc.pid, 3)
    assert not set(new) & set(old)
    assert (proc.pid, "hook on_reload") in events(ev)
    # Each old worker left only after its successor booted: the pool never shrank.
    order = [(pid, what) for pid, what in events(ev) if what in ("boot", "after-loop")]
    first_old_exit = next(i for i, (pid, w) in enumerate(order) if w == "after-loop")
    booted_new_before = [pid for pid, w in order[:first_old_exit] if w == "boot" and pid in new]
    assert booted_new_before, order


def test_a_reload_that_cannot_boot_keeps_the_old_workers(start, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    proc, ev = start("--workers", "2", "--fail-boot-if", str(broken), "--max-boot-failures", "3")
    old = booted(proc, ev, 2)
    broken.write_text("the new code does not import")
    proc.signal(signal.SIGHUP)
    proc.wait_output("reload failed: 3 new workers in a row", timeout=20)
    wait_for(lambda: children(proc.pid) == old, what="only the old workers")
    assert is_alive(proc.pid)
    assert pids_with(ev, "after-loop") == []


def test_a_failing_on_reload_hook_abandons_the_reload(start) -> None:
    proc, ev = start("--workers", "2", "--hooks", "--failing-hook", "on_reload")
    old = booted(proc, ev, 2)
    proc.signal(signal.SIGHUP)
    proc.wait_output("reload abandoned")
    assert children(proc.pid) == old


def test_usr1_makes_workers_reopen_their_output(start, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    proc, ev = start("--workers", "2", "--mode", "tick", "--stdout", str(out),
                     "--stderr", str(out))  # fmt: skip
    workers = booted(proc, ev, 2)
    wait_for(lambda: all(f"tick from {p}" in out.read_text() for p in workers), what="ticks")
    os.rename(out, tmp_path / "out.txt.1")
    proc.signal(signal.SIGUSR1)
    wait_for(lambda: out.exists() and all(f"tick from {p}" in out.read_text() for p in workers),
             what="every worker to write to the new file")  # fmt: skip
    assert set(workers) == set(children(proc.pid))


@pytest.mark.skipif(os.getuid() != 0, reason="dropping privileges needs root")
def test_workers_drop_to_the_configured_user(spawn) -> None:
    nobody = pwd.getpwnam("nobody")
    # The workers, once nobody, must still reach their events file: not under tmp_path.
    with tempfile.TemporaryDirectory() as shared:
        os.chmod(shared, 0o777)
        ev = Path(shared) / "events"
        proc = spawn([sys.executable, APP, "--events", str(ev), "--workers", "1",
                      "--user", "nobody"])  # fmt: skip
        worker = booted(proc, ev, 1)[0]

        def ids(pid: int) -> tuple[int, int]:
            status = Path(f"/proc/{pid}/status").read_text()
            uid = re.search(r"^Uid:\s+(\d+)", status, re.M)
            gid = re.search(r"^Gid:\s+(\d+)", status, re.M)
            assert uid and gid
            return int(uid.group(1)), int(gid.group(1))

        assert ids(worker) == (nobody.pw_uid, nobody.pw_gid)
        assert ids(proc.pid) == (0, 0), "the master keeps its privileges"
        proc.signal(signal.SIGQUIT)
        assert proc.wait() == 0


def test_usr2_execs_a_new_master_and_quit_of_the_old_hands_over(
    start, spawn, tmp_path: Path
) -> None:
    pid_file = tmp_path / "app.pid"
    oldbin = tmp_path / "app.pid.oldbin"
    old, ev = start("--workers", "2", "--pid-file", str(pid_file))
    old_workers = booted(old, ev, 2)
    old.signal(signal.SIGUSR2)
    new_pid = wait_for(lambda: (lambda p: p if p and p != old.pid else None)(_pid(pid_file)),
                       what="the new master's pid file")  # fmt: skip
    spawn.track(new_pid)  # it outlives the old master: the fixture must still reap it
    assert _pid(oldbin) == old.pid
    new_workers = wait_workers(new_pid, 2)
    assert new_pid in children(old.pid), "the new master is the old one's child"
    old.signal(signal.SIGWINCH)
    wait_for(lambda: not any(is_alive(p) for p in old_workers), what="old workers to leave")
    old.signal(signal.SIGQUIT)
    assert old.wait() == 0
    assert not oldbin.exists()
    assert _pid(pid_file) == new_pid
    assert children(new_pid) == new_workers
    os.kill(new_pid, signal.SIGQUIT)
    wait_for(lambda: not is_alive(new_pid), what="the new master to stop")
    assert not pid_file.exists()


def test_a_new_master_that_dies_gives_the_pid_file_back(start, spawn, tmp_path: Path) -> None:
    pid_file = tmp_path / "app.pid"
    old, ev = start("--workers", "1", "--pid-file", str(pid_file))
    booted(old, ev, 1)
    old.signal(signal.SIGUSR2)
    new_pid = wait_for(lambda: (lambda p: p if p and p != old.pid else None)(_pid(pid_file)),
                       what="the new master's pid file")  # fmt: skip
    spawn.track(new_pid)
    os.kill(new_pid, signal.SIGKILL)
    old.wait_output(f"new master {new_pid} killed by SIGKILL")
    wait_for(lambda: _pid(pid_file) == old.pid, what="the pid file to come back")
    assert not (tmp_path / "app.pid.oldbin").exists()
    assert len(children(old.pid)) == 1


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def test_the_adaptive_pool_grows_under_load_and_shrinks_when_idle(start, tmp_path: Path) -> None:
    load = tmp_path / "load"
    proc, ev = start("--workers", "2", "--min-spare", "1", "--max-spare", "2",
                     "--max-workers", "5", "--busy-if", str(load))  # fmt: skip
    booted(proc, ev, 2)
    load.write_text("every worker is busy now")
    wait_workers(proc.pid, 5)
    until = time.monotonic() + 1.5  # three more looks: it stays at max_workers
    while time.monotonic() < until:
        assert len(children(proc.pid)) == 5
        time.sleep(0.05)
    load.unlink()
    wait_workers(proc.pid, 2, timeout=15)  # one retired per look, down to `workers`
    proc.wait_output(r"3 of 3 workers idle; now 2 workers")
    assert "now 1 workers" not in proc.output()


def test_an_on_reload_hook_can_change_the_worker_count(start, tmp_path: Path) -> None:
    setting = tmp_path / "workers"
    proc, ev = start("--workers", "2", "--reload-from", str(setting))
    old = booted(proc, ev, 2)
    setting.write_text("3")
    proc.signal(signal.SIGHUP)
    new = wait_for(lambda: (lambda c: c if len(c) == 3 and not set(c) & set(old) else None)(
        children(proc.pid)), what="three new workers")  # fmt: skip
    assert len(new) == 3
    assert "reload sets workers = 3" in proc.output()
    setting.write_text("not a number")
    proc.signal(signal.SIGHUP)
    proc.wait_output("reload abandoned")
    assert children(proc.pid) == new
