"""A Preforker program for the black-box tests, steered by its command line.

Each worker appends "<pid> <event>" lines to --events, so a test can see what ran.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from prefork_server import Preforker


def record(path: str, what: str) -> None:
    with open(path, "a") as f:
        f.write(f"{os.getpid()} {what}\n")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--events", required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("--graceful-timeout", type=float, default=None)
    p.add_argument(
        "--mode",
        default="loop",
        choices=["loop", "return", "raise", "bootfail", "stuck-once", "print", "tick"],
    )
    p.add_argument("--daemon", action="store_true")
    p.add_argument("--pid-file")
    p.add_argument("--stdout")
    p.add_argument("--stderr")
    p.add_argument("--app-name", default="enginetest")
    p.add_argument("--max-boot-failures", type=int, default=5)
    p.add_argument("--max-requests", type=int, default=0)
    p.add_argument("--max-requests-jitter", type=int, default=0)
    p.add_argument("--graceful-term", action="store_true")
    p.add_argument("--user")
    p.add_argument("--hooks", action="store_true", help="record every hook call")
    p.add_argument("--failing-hook", help="this hook raises")
    p.add_argument("--fail-boot-if", help="workers fail to boot while this file exists")
    p.add_argument("--busy-if", help="workers are busy while this file exists")
    p.add_argument("--reload-from", help="on HUP, read the worker count from this file")
    p.add_argument("--min-spare", type=int, default=0)
    p.add_argument("--max-spare", type=int)
    p.add_argument("--max-workers", type=int)
    a = p.parse_args()

    def hook(name: str):  # noqa: ANN202
        def call(*args: object) -> None:
            shown = [getattr(x, "number", x) for x in args]  # a Worker shows as its number
            record(a.events, f"hook {name} {' '.join(map(str, shown))}".strip())
            if name == a.failing_hook:
                raise RuntimeError(f"{name} hook failed on purpose")

        return call

    hook_names = ["before_fork", "after_fork", "worker_exit", "on_worker_timeout", "on_reload"]
    hooks = {name: hook(name) for name in hook_names} if a.hooks else {}
    if a.reload_from:

        def reload_settings() -> dict[str, object]:
            with open(a.reload_from) as f:
                return {"workers": int(f.read())}

        hooks["on_reload"] = reload_settings

    def work(master):  # noqa: ANN001 - the seed's name for the worker handle
        record(a.events, "boot")
        if a.mode == "bootfail" or (a.fail_boot_if and os.path.exists(a.fail_boot_if)):
            raise RuntimeError("cannot boot")
        if a.mode == "stuck-once":
            try:  # the first worker to get here hangs without a heartbeat, the rest work
                os.close(os.open(a.events + ".stuck", os.O_CREAT | os.O_EXCL))
                record(a.events, "stuck")
                while True:
                    time.sleep(1)
            except FileExistsError:
                pass
        while master.wants_me_alive():
            if a.mode == "return":
                record(a.events, "returning")
                return
            if a.mode == "raise":
                raise ValueError("boom in the work function")
            if a.busy_if and os.path.exists(a.busy_if):
                master.busy()
                time.sleep(0.05)
                master.idle()
                continue
            if a.mode == "tick":
                print(f"tick from {os.getpid()}", flush=True)
            if a.mode == "print":
                print(f"stdout from {os.getpid()}", flush=True)
                print(f"stderr from {os.getpid()}", file=sys.stderr, flush=True)
                record(a.events, "printed")
                a.mode = "loop"
            time.sleep(0.02)
        record(a.events, "after-loop")
        record(a.events, f"served {master.served}")

    engine = Preforker(
        work,
        workers=a.workers,
        timeout=a.timeout,
        graceful_timeout=a.graceful_timeout,
        app_name=a.app_name,
        pid_path=a.pid_file,
        stdout_path=a.stdout,
        stderr_path=a.stderr,
        max_boot_failures=a.max_boot_failures,
        max_requests=a.max_requests,
        max_requests_jitter=a.max_requests_jitter,
        graceful_term=a.graceful_term,
        user=a.user,
        min_spare_workers=a.min_spare,
        max_spare_workers=a.max_spare,
        max_workers=a.max_workers,
        **hooks,
    )
    if a.daemon:
        print(f"DAEMON={engine.start()}", flush=True)
    else:
        engine.run()


if __name__ == "__main__":
    main()
