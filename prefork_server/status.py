"""``prefork-server status --pid-file FILE``: a running server's scoreboard, as a table.

Reads the master's shared-memory slots through ``/proc`` (see
:func:`~prefork_server.scoreboard.read_scoreboard`); sends no signal and takes no lock, so
it never disturbs the server. Like Apache's mod_status, in a terminal.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from .daemon import PidFile, PidFileError
from .scoreboard import SlotState, SlotView, read_scoreboard

__all__ = ["format_status", "main"]


def _age(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def format_status(master_pid: int, views: Sequence[SlotView], now: float) -> str:
    """The table ``status`` prints; ``now`` is ``time.monotonic()`` (a system-wide clock,
    so ages computed here match the master's)."""
    counts = {state: sum(1 for v in views if v.state is state) for state in SlotState}
    header = (
        f"master {master_pid}: {len(views)} workers, {counts[SlotState.BUSY]} busy, "
        f"{counts[SlotState.IDLE]} idle, {counts[SlotState.BOOTING]} booting, "
        f"{counts[SlotState.STOPPING]} stopping; {sum(v.served for v in views)} served"
    )
    rows = [("worker", "pid", "gen", "state", "served", "conns", "current", "last beat", "age")]
    for v in sorted(views, key=lambda v: (v.number, v.generation)):
        current = _age(now - v.busy_since) if v.state is SlotState.BUSY else "-"
        rows.append((
            f"[{v.number}]", str(v.pid), str(v.generation), v.state.name.lower(),
            str(v.served), str(v.connections), current, _age(now - v.beat) + " ago",
            _age(now - v.spawned_at),
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    return "\n".join([header, *lines])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="prefork-server status",
        description="Print the scoreboard of a running server (pid, state, requests served, "
        "age of the current request and of the last heartbeat, per worker).",
    )
    parser.add_argument("--pid-file", required=True, help="the running master's pid file")
    args = parser.parse_args(argv)
    try:
        pid = PidFile(args.pid_file).read()
    except PidFileError as e:
        print(f"status: {e}", file=sys.stderr)
        return 1
    if pid is None:
        print(f"status: no pid in {args.pid_file}", file=sys.stderr)
        return 1
    try:
        views = read_scoreboard(pid)
    except (ProcessLookupError, FileNotFoundError, PermissionError) as e:
        print(f"status: {e}", file=sys.stderr)
        return 1
    print(format_status(pid, views, time.monotonic()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
