"""The master's pure decisions, the scoreboard and option validation, without processes
(except for real wait statuses, which come from real children)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import socketserver

import pytest
from conftest import wait_for

from prefork_server import worker as worker_module
from prefork_server.daemon import PidFile, PidFileError
from prefork_server.engine import Options, Preforker
from prefork_server.master import (
    CRASH_WINDOW,
    FIRST_BACKOFF,
    MAX_BACKOFF,
    Action,
    SparePolicy,
    adaptive_target,
    describe_exit,
    is_spare,
    next_deadline,
    overdue,
    respawn_delay,
    signal_action,
)
from prefork_server.scoreboard import Scoreboard, SlotState, SlotView
from prefork_server.sockets import parse_bind
from prefork_server.worker import Worker


@pytest.mark.parametrize(
    ("sig", "action"),
    [
        (signal.SIGQUIT, Action.GRACEFUL_STOP),
        (signal.SIGTERM, Action.IMMEDIATE_STOP),
        (signal.SIGINT, Action.IMMEDIATE_STOP),
        (signal.SIGWINCH, Action.STOP_WORKERS),
        (signal.SIGTTIN, Action.ADD_WORKER),
        (signal.SIGTTOU, Action.REMOVE_WORKER),
        (signal.SIGUSR1, Action.REOPEN_LOGS),
        (signal.SIGHUP, Action.RELOAD),
        (signal.SIGUSR2, Action.UPGRADE),
        (signal.SIGCONT, Action.RESUMED),
        (signal.SIGPIPE, Action.IGNORE),
    ],
)
def test_signal_meanings(sig: int, action: Action) -> None:
    assert signal_action(sig) is action


def test_winch_in_a_terminal_foreground_is_a_resize_not_a_stop() -> None:
    assert signal_action(signal.SIGWINCH, terminal_foreground=True) is Action.IGNORE
    assert signal_action(signal.SIGQUIT, terminal_foreground=True) is Action.GRACEFUL_STOP


def test_overdue_workers() -> None:
    beats = {"a": 100.0, "b": 104.0, "c": 95.0}
    assert overdue(beats, now=104.5, timeout=5) == ["c"]
    assert sorted(overdue(beats, now=108.0, timeout=5)) == ["a", "c"]
    assert overdue(beats, now=100.0, timeout=5) == []  # c is exactly at the limit: not late


def test_excused_time_is_not_held_against_a_worker() -> None:
    beats = {"a": 100.0, "b": 50.0}
    # The master was stopped until 108: every beat counts as made then.
    assert overdue(beats, now=110.0, timeout=5, excused_since=108.0) == []
    assert overdue(beats, now=113.5, timeout=5, excused_since=108.0) == ["a", "b"]


def test_next_deadline() -> None:
    assert next_deadline([100.0, 90.0, 95.0], timeout=5) == 95.0
    assert next_deadline([100.0, 90.0], timeout=5, excused_since=99.0) == 104.0
    assert next_deadline([], timeout=5) is None


def test_respawn_backoff_doubles_for_crash_loops_and_resets_for_healthy_workers() -> None:
    delays = []
    delay = 0.0
    for _ in range(12):
        delay = respawn_delay(delay, lifetime=0.01)
        delays.append(delay)
    assert delays[:4] == [FIRST_BACKOFF, 2 * FIRST_BACKOFF, 4 * FIRST_BACKOFF, 8 * FIRST_BACKOFF]
    assert delays[-1] == MAX_BACKOFF
    assert all(a <= b for a, b in zip(delays, delays[1:], strict=False))
    assert respawn_delay(delay, lifetime=CRASH_WINDOW) == 0.0


def _status_of(code: str) -> int:
    pid = os.fork()
    if pid == 0:  # a real child gives the kernel's real wait status
        exec(code)  # noqa: S102
        os._exit(0)
    return os.waitpid(pid, 0)[1]


def test_exit_statuses_in_words() -> None:
    assert describe_exit(_status_of("os._exit(3)")) == "exited with status 3"
    assert describe_exit(_status_of("os._exit(0)")) == "exited with status 0"
    killed = _status_of("os.kill(os.getpid(), signal.SIGKILL)")
    assert describe_exit(killed) == "killed by SIGKILL"
    assert describe_exit(_status_of("os.kill(os.getpid(), signal.SIGTERM)")) == (
        "killed by SIGTERM"
    )


def test_scoreboard_slots_record_the_worker_side() -> None:
    board = Scoreboard()
    try:
        slot = board.allocate(0, generation=2, now=10.0)
        slot.set_pid(1234)
        view = slot.read()
        assert (view.pid, view.generation, view.state, view.booted) == (
            1234, 2, SlotState.BOOTING, False
        )  # fmt: skip
        assert view.beat == 10.0, "the spawn time counts as the first beat"
        slot.mark_booted(11.0)
        slot.busy(12.0)
        assert slot.read().state is SlotState.BUSY
        slot.idle(13.0)
        slot.set_served(1)
        view = slot.read()
        assert (view.state, view.served, view.beat, view.busy_since, view.booted) == (
            SlotState.IDLE, 1, 13.0, 12.0, True
        )  # fmt: skip
        slot.stopping()
        slot.idle(14.0)
        assert slot.read().state is SlotState.STOPPING, "a stopping worker stays stopping"
        others = [board.allocate(0, 0, 0.0) for _ in range(300)]  # grows past one segment
        assert len({s.index for s in [slot, *others]}) == 301
        # Each field lands in its own slot, in any segment (the writes go through typed
        # views of the whole segment, indexed from the slot's offset).
        for other in (others[0], others[-1]):
            other.busy(20.0 + other.index)
            other.idle(30.0 + other.index, served=other.index)
            other.set_connections(other.index + 1)
        for other in (others[0], others[-1]):
            view = other.read()
            assert (view.served, view.beat, view.busy_since, view.connections) == (
                other.index, 30.0 + other.index, 20.0 + other.index, other.index + 1
            )  # fmt: skip
        assert slot.read().beat == 14.0 and slot.read().connections == 0, "neighbours untouched"
        board.release(slot)
        assert board.allocate(0, 3, 1.0).index == slot.index, "released slots are reused"
    finally:
        board.close()


def test_fewest_connections_elsewhere_counts_only_serving_workers() -> None:
    board = Scoreboard()
    try:
        me, a, b, booting, stopping = (board.allocate(0, 1, 0.0) for _ in range(5))
        assert me.fewest_connections_elsewhere() is None, "nobody else serves yet"
        for slot in (me, a, b, stopping):
            slot.mark_booted(1.0)
        stopping.stopping()
        booting.set_connections(0)  # cannot accept yet: must not count as the least loaded
        stopping.set_connections(0)  # no longer accepts: same
        me.set_connections(3)
        a.set_connections(5)
        b.set_connections(2)
        assert me.fewest_connections_elsewhere() == 2
        b.busy(2.0)
        b.set_connections(7)
        assert me.fewest_connections_elsewhere() == 5
        assert me.read().connections == 3
        board.release(a)
        assert me.fewest_connections_elsewhere() == 7, "a freed slot is nobody"
    finally:
        board.close()


def test_idle_elsewhere_sees_only_a_live_idle_worker_without_connections() -> None:
    board = Scoreboard()
    try:
        me, other, booting = (board.allocate(0, 1, 0.0) for _ in range(3))
        me.mark_booted(10.0)
        assert not me.idle_elsewhere(since=9.0), "the booting worker does not serve yet"
        other.mark_booted(10.0)
        assert me.idle_elsewhere(since=9.0)
        assert not me.idle_elsewhere(since=11.0), "its last beat is too old: stopped"
        other.set_connections(2)  # idle between requests, but holding parked connections
        assert not me.idle_elsewhere(since=9.0)
        other.set_connections(0)
        other.busy(12.0)
        assert not me.idle_elsewhere(since=9.0)
        other.idle(13.0)
        assert me.idle_elsewhere(since=12.5)
        assert not me.idle_elsewhere(since=12.5, until=12.9), "idle only since 13.0"
        assert me.idle_elsewhere(since=12.5, until=13.0)
        assert other.idle_elsewhere(since=9.0), "from the other's side: I am the idle one"
        me.busy(13.5)
        assert not other.idle_elsewhere(since=9.0), "and only I was"
        other.stopping()
        assert not me.idle_elsewhere(since=9.0)
    finally:
        board.close()


def test_a_spare_worker_is_booting_or_idle_whatever_it_holds() -> None:
    def view(state: SlotState, connections: int) -> SlotView:
        return SlotView(1, 1, state, True, 0, 0, 0.0, 0.0, 0.0, connections)

    assert is_spare(view(SlotState.BOOTING, 0))
    assert is_spare(view(SlotState.IDLE, 0))
    assert is_spare(view(SlotState.IDLE, 3)), "idle in its loop, holding idle connections"
    assert not is_spare(view(SlotState.BUSY, 0))
    assert not is_spare(view(SlotState.BUSY, 3))
    assert not is_spare(view(SlotState.STOPPING, 0))


def test_idle_notices_the_masters_death_and_a_reopen_request_as_a_heartbeat_does() -> None:
    # Between two connections the worker loop reads only worker.alive after idle(): a
    # worker that never runs out of connections must still see its master go and USR1.
    board = Scoreboard()
    death_r, death_w = os.pipe()
    reopened: list[bool] = []
    try:
        worker = Worker(
            number=0, generation=1, slot=board.allocate(0, 1), master_pid=os.getppid(),
            death_fd=death_r, timeout=30, logger=logging.getLogger("test"),
            reopen_logs=lambda: reopened.append(True),
        )  # fmt: skip
        worker.heartbeat()
        worker._on_usr1(signal.SIGUSR1, None)  # the handler only records it
        worker.busy()
        worker.idle()
        assert reopened == [True] and worker.alive
        os.close(death_w)  # the master is gone: its end of the pipe closes

        def one_unit() -> bool:
            worker.busy()
            worker.idle()
            return not worker.alive

        wait_for(one_unit, what="the master's death seen by idle()")  # asked twice a second
    finally:
        os.close(death_r)
        board.close()


def test_the_master_never_reads_a_beat_a_worker_is_writing_as_zero() -> None:
    # struct.pack_into zeroes its span before it packs: the master, reading meanwhile,
    # once took a beat of 0 for a heartbeat missed for a day and killed a healthy worker.
    board = Scoreboard()
    slot = board.allocate(os.getpid(), 1, now=1000.0)
    child = os.fork()
    if child == 0:  # the worker: stamps as busy() and idle() do, as fast as it can
        try:
            for i in range(100_000):
                slot.busy(1000.0 + i)
                slot.idle(1000.0 + i, i)
        finally:
            os._exit(0)
    low, reads, reaped = [], 0, False
    try:
        while not reaped:
            reaped = os.waitpid(child, os.WNOHANG) != (0, 0)
            reads += 1
            beat = slot.last_beat()
            if beat < 1000.0:
                low.append(beat)
    finally:
        if not reaped:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
        board.close()
    assert reads > 1000 and low == [], f"{len(low)} of {reads} reads saw {low[:3]}"


def test_the_title_shows_busy_at_once_and_idle_only_after_a_moment(monkeypatch) -> None:
    # A title change is a system call: a worker going from one short connection to the
    # next must not pay two per connection, but a stuck one must show "busy" at once. The
    # delays are set long, then short, so that no pause of the machine can change the result.
    monkeypatch.setattr(worker_module, "TITLE_IDLE_DELAY", 3600.0)
    monkeypatch.setattr(worker_module, "TITLE_MAX_AGE", 3600.0)
    board = Scoreboard()
    shown: list[str] = []
    try:
        worker = Worker(
            number=0, generation=1, slot=board.allocate(0, 1), master_pid=os.getppid(),
            death_fd=-1, timeout=30, logger=logging.getLogger("test"), title="t worker[0]",
            set_title=shown.append,
        )  # fmt: skip
        worker.heartbeat()
        assert worker.title_due == 0.0
        for _ in range(3):
            worker.busy()
            worker.idle()
        assert shown == ["t worker[0] busy, 0 served"]
        assert worker.title_due > 0, "idle waits for a later heartbeat"
        worker.heartbeat()
        assert len(shown) == 1, "too early for idle"
        monkeypatch.setattr(worker_module, "TITLE_IDLE_DELAY", 0.05)
        worker.busy()
        worker.idle()
        assert len(shown) == 1, "still busy: no change to show"
        wait_for(lambda: worker.heartbeat() and len(shown) == 2, what="the idle title")
        assert shown[-1] == "t worker[0] idle, 4 served"
        assert worker.title_due == 0.0
        worker.busy()
        assert shown[-1] == "t worker[0] busy, 4 served", "busy shows at once"
        monkeypatch.setattr(worker_module, "TITLE_MAX_AGE", 0.0)
        worker.count_unit()  # a connection of several ended: the count shown follows
        assert shown[-1] == "t worker[0] busy, 5 served"
        worker.stop()
        worker.idle()
        assert shown[-1] == "t worker[0] stopping, 6 served", "stopping shows at once"
    finally:
        board.close()


def test_a_slot_is_shared_with_a_forked_child() -> None:
    board = Scoreboard()
    try:
        slot = board.allocate(0, 0, 0.0)
        pid = os.fork()
        if pid == 0:
            slot.mark_booted(42.0)
            os._exit(0)
        os.waitpid(pid, 0)
        assert slot.read().booted and slot.last_beat() == 42.0
    finally:
        board.close()


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"workers": -1}, "workers"),
        ({"workers": "3"}, "workers"),
        ({"workers": True}, "workers"),
        ({"workers": 2.5}, "workers"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": -1}, "timeout"),
        ({"timeout": float("nan")}, "timeout"),
        ({"timeout": "5"}, "timeout"),
        ({"graceful_timeout": -1}, "graceful_timeout"),
        ({"app_name": ""}, "app_name"),
        ({"app_name": "a/b"}, "app_name"),
        ({"pid_path": ""}, "pid_path"),
        ({"stdout_path": 3}, "stdout_path"),
        ({"logger": "log"}, "logger"),
        ({"max_boot_failures": 0}, "max_boot_failures"),
    ],
)
def test_invalid_options_name_the_option(options: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name} "):
        Options(**options)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=rf"^{name} "):
        Preforker(lambda worker: None, **options)


def test_unknown_option_and_non_callable_work_are_refused() -> None:
    with pytest.raises(TypeError):
        Preforker(lambda worker: None, wokers=3)
    with pytest.raises(ValueError, match="^work "):
        Preforker("not callable")  # type: ignore[arg-type]


def test_default_options_are_the_seeds() -> None:
    opts = Options()
    assert (opts.workers, opts.timeout, opts.app_name, opts.grace) == (10, 5.0, "preforker", 5.0)
    assert Options(logger=logging.getLogger("x"), timeout=2).grace == 2


@pytest.mark.parametrize(
    ("text", "family", "address"),
    [
        ("127.0.0.1:9000", socket.AF_INET, ("127.0.0.1", 9000)),
        (":8000", socket.AF_INET, ("0.0.0.0", 8000)),
        ("localhost:0", socket.AF_INET, ("localhost", 0)),
        ("[::1]:9000", socket.AF_INET6, ("::1", 9000)),
        ("unix:/tmp/x.sock", socket.AF_UNIX, "/tmp/x.sock"),
    ],
)
def test_parse_bind(text: str, family: int, address: object) -> None:
    parsed = parse_bind(text)
    assert (parsed.family, parsed.address) == (family, address)
    assert parse_bind(str(parsed)) == parsed


@pytest.mark.parametrize("text", ["", "9000", "host:", "host:port", "::1:80", "[::1]80",
                                  "1.2.3.4:70000", "unix:"])  # fmt: skip
def test_parse_bind_rejects_nonsense(text: str) -> None:
    with pytest.raises(ValueError, match="^bind"):
        parse_bind(text)


def test_pid_file_write_check_remove(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pid_file = PidFile(tmp_path / "x.pid")
    assert pid_file.read() is None
    pid_file.write()
    assert pid_file.read() == os.getpid()
    assert not [p for p in os.listdir(tmp_path) if p != "x.pid"], "no temp file left"
    assert pid_file.remove(pid=os.getpid() + 1) is False, "only the owner removes it"
    assert pid_file.read() == os.getpid()
    parent = os.getppid()  # a live process that is not us
    (tmp_path / "x.pid").write_text(f"{parent}\n")
    with pytest.raises(PidFileError, match=f"names pid {parent}, which is running"):
        pid_file.write()
    assert pid_file.remove() is False
    (tmp_path / "x.pid").write_text("garbage\n")
    pid_file.write()
    assert pid_file.remove() is True
    assert not (tmp_path / "x.pid").exists()


def test_adaptive_pool_decisions() -> None:
    policy = SparePolicy(min_spare=2, max_spare=4, min_workers=3, max_workers=10)
    assert adaptive_target(total=3, spare=3, policy=policy) == 3  # within bounds
    assert adaptive_target(total=3, spare=0, policy=policy) == 5  # the shortfall at once
    assert adaptive_target(total=9, spare=0, policy=policy) == 10  # capped
    assert adaptive_target(total=8, spare=6, policy=policy) == 7  # one at a time
    assert adaptive_target(total=3, spare=3, policy=policy) == 3
    assert adaptive_target(total=3, spare=6, policy=policy) == 3  # never below min_workers


@pytest.mark.parametrize(
    "hook", ["verify_request", "process_request", "finish_request", "shutdown_request",
             "close_request"],
)  # fmt: skip
def test_which_servers_a_worker_may_skip_the_connection_hooks_of(hook: str) -> None:
    # Without overrides the worker does what the hooks do without calling them; with any
    # one overridden (in a subclass, in a base after PreforkMixIn, on the instance), it
    # goes through all of them, as socketserver does.
    from prefork_server.server import (
        _CONNECTION_HOOKS,
        PreforkMixIn,
        PreforkTCPServer,
        PreforkThreadingTCPServer,
        PreforkUnixStreamServer,
        _overrides_none,
    )

    def plain(cls: type, names: tuple[str, ...] = _CONNECTION_HOOKS, **attrs: object) -> bool:
        server = cls.__new__(cls)  # no socket: the decision reads classes and attributes
        vars(server).update(attrs)
        return _overrides_none(server, names)

    assert plain(PreforkTCPServer) and plain(PreforkUnixStreamServer)
    assert not plain(PreforkThreadingTCPServer)  # its own process_request
    base = getattr(socketserver.TCPServer, hook)
    override = {hook: lambda self, *a: base(self, *a)}
    assert not plain(type("Sub", (PreforkTCPServer,), override))
    user_base = type("UserBase", (socketserver.TCPServer,), override)
    assert not plain(type("MixedIn", (PreforkMixIn, user_base), {}))
    assert not plain(PreforkTCPServer, **{hook: lambda *a: True})
    assert plain(type("Plain", (PreforkTCPServer,), {"app_name": "x"}))
    # Whether a handler may close the connection itself depends on the hooks that get it
    # after the handler: all but verify_request.
    after = _CONNECTION_HOOKS[1:]
    sub = type("Sub", (PreforkTCPServer,), override)
    assert plain(sub, after) == (hook == "verify_request")
    assert not plain(PreforkThreadingTCPServer, after)
