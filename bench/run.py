"""Every benchmark in one command, bounded in time.

::

    python bench/run.py              # the full suite, under 15 minutes on 2 cores
    python bench/run.py --quick      # each script with --quick, about a minute
    python bench/run.py --only echo,herd --markdown

Runs, one after another and each as a subprocess with its own time budget: ``echo_bench.py``
(examples/echo against socketserver and the floor), ``lifecycle.py`` (start, respawn,
timeout, idle cost, memory, system calls), ``herd.py`` (workers woken per connection), and
``http_bench.py`` (examples/http against an h11 floor and gunicorn sync and gthread, with
2 and 4 workers; needs ``wrk`` and ``gunicorn``). Their output streams through as it
comes. A script that runs past its budget, or past the suite's deadline, gets SIGINT, then
SIGTERM, then SIGKILL, by its pid; each script ends the servers it started itself.
"""

from __future__ import annotations

import argparse
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent

# name, script, budget in seconds (full run, quick run), options for a full run and for a
# quick one (--quick if the script has it, else these); an option is passed only if the
# script's --help lists it. Each budget is a bound, not an estimate (a full run measured
# 675 s with 3 HTTP rounds of 3 s: echo 182, lifecycle 27, herd 14, http 452; --quick 55 s);
# the suite's own deadline (--max-minutes, 15) caps the sum.
SCRIPTS: list[tuple[str, str, tuple[int, int], dict[str, str], dict[str, str]]] = [
    ("echo", "echo_bench.py", (360, 120), {"--max-minutes": "4.5"}, {}),
    ("lifecycle", "lifecycle.py", (180, 90), {}, {}),
    ("herd", "herd.py", (90, 60), {}, {}),
    ("http", "http_bench.py", (660, 120), {"--max-minutes": "10"}, {}),
]  # fmt: skip


def header() -> str:
    lines = [f"python {platform.python_version()} ({sys.executable})"]
    for argv in (["nproc"], ["sh", "-c", "lscpu | head -n 15"], ["uname", "-sr"]):
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        lines.append(out.rstrip())
    return "\n".join(lines)


def options_of(script: Path) -> str:
    """The script's --help text (to pass only the options it has)."""
    try:
        return subprocess.run(
            [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def run(argv: list[str], budget: float) -> int:
    """Run ``argv``, its output passed through; end it by pid if it outlives ``budget``."""
    proc = subprocess.Popen(argv, cwd=BENCH.parent)
    signals: list[tuple[int, float]] = [
        (signal.SIGINT, 20.0),
        (signal.SIGTERM, 10.0),
        (signal.SIGKILL, 10.0),
    ]
    try:
        return proc.wait(budget)
    except subprocess.TimeoutExpired:
        print(f"run: {argv[1]} ran past its {budget:.0f} s; stopping it", flush=True)
        return -1
    except KeyboardInterrupt:
        # Ctrl-C reached the script too (same process group): let it clean up first.
        signals[0] = (0, 20.0)
        raise
    finally:
        for sig, grace in signals:
            if proc.poll() is not None:
                break
            if sig:
                proc.send_signal(sig)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                continue


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="each script with --quick")
    p.add_argument("--markdown", action="store_true", help="tables in Markdown")
    p.add_argument("--only", default="", help="comma-separated: echo,lifecycle,herd,http")
    p.add_argument("--max-minutes", type=float, default=15.0, help="the suite's bound (15)")
    args = p.parse_args(argv)

    def raise_exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # so that run() ends the script it runs

    signal.signal(signal.SIGTERM, raise_exit)
    only = set(args.only.split(",")) if args.only else None
    started = time.monotonic()
    deadline = started + args.max_minutes * 60
    print(header(), flush=True)
    statuses = {}
    for name, script, (full, quick), full_opts, quick_opts in SCRIPTS:
        path = BENCH / script
        if (only and name not in only) or not path.exists():
            continue
        remaining = deadline - time.monotonic()
        if remaining < 30:
            print(f"\nrun: no time left for {script}", flush=True)
            statuses[name] = "skipped (time)"
            continue
        cmd = [sys.executable, str(path)]
        helptext = options_of(path)
        if args.markdown and "--markdown" in helptext:
            cmd.append("--markdown")
        opts = full_opts
        if args.quick:
            opts = {"--quick": ""} if "--quick" in helptext else quick_opts
        for flag, value in opts.items():
            if flag in helptext:
                cmd += [flag, value] if value else [flag]
        budget = min(quick if args.quick else full, remaining)
        print(f"\n=== {' '.join(cmd[1:])} (at most {budget:.0f} s)", flush=True)
        t = time.monotonic()
        code = run(cmd, budget)
        statuses[name] = f"exit {code} after {time.monotonic() - t:.0f} s"
    print(f"\nrun: {time.monotonic() - started:.0f} s in all; "
          + ", ".join(f"{k}: {v}" for k, v in statuses.items()), flush=True)  # fmt: skip
    return 0 if all(v.startswith("exit 0") for v in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
