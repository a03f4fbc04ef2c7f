"""The floor: a framework-free pre-forked echo server, what any pre-fork server costs at least.

::

    python bench/floor_echo.py --port 9100 --workers 2

Bind, listen, fork N workers; each blocks in ``accept()`` and echoes with ``recv``/``sendall``
until the client closes: two system calls per message, no heartbeat, no supervision. The
master waits for its workers; on SIGTERM or SIGINT it kills them by pid. Workers also get
SIGTERM from Linux if the master dies (``PR_SET_PDEATHSIG``), so none outlives a benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import socket
import sys


def serve(listener: socket.socket) -> None:
    while True:
        conn, _ = listener.accept()
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(65536):
                conn.sendall(data)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--port", type=int, default=9100, help="loopback port (9100)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (2)")
    args = p.parse_args(argv)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", args.port))
    listener.listen(1024)
    pids = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            try:
                ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
                serve(listener)
            finally:
                os._exit(0)
        pids.append(pid)

    def stop(signum: int, frame: object) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for pid in pids:
        os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
