"""The HTTP floor: a pre-fork h11 loop with no framework and no WSGI, for comparison.

::

    python bench/h11_floor.py --bind 127.0.0.1:8000 --workers 2

It answers every request with the bytes examples.http sends for ``bench/hello_app.py``
(the same status line, headers in the same order, the same 14-byte body), so that the
difference between the two is the framework and WSGI, not the response. What it does: bind,
listen, fork N workers; each blocks in ``accept()``, then reads with ``recv``, lets h11
parse the request, and ``sendall``s the canned response (with a ``Date`` formatted once a
second), until the client closes or asks for ``Connection: close`` (or speaks HTTP/1.0).
No timeouts, no heartbeat, no limits, no yielding to waiting clients: a keep-alive client
holds its worker until it leaves. SIGQUIT, SIGTERM or SIGINT to the master ends the
workers and the master.

``--work-us N`` makes each worker spin for N microseconds before each response: a floor
with a chosen CPU cost per request, to tell how much of a server's distance to the floor
its extra CPU per request explains (``http_bench.py --floor-work-us``).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import socket
import sys
import time
from email.utils import formatdate

import h11

BODY = b"Hello, world!\n"
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nDate: "
TAIL_KEEP = b"\r\nServer: prefork-server\r\nContent-Length: 14\r\n\r\n" + BODY
TAIL_CLOSE = b"\r\nServer: prefork-server\r\nContent-Length: 14\r\nConnection: close\r\n\r\n" + BODY


class Clock:
    """The ``Date`` header value, formatted again only when the second changes."""

    second = -1
    value = b""

    def now(self) -> bytes:
        second = int(time.time())
        if second != self.second:
            self.second, self.value = second, formatdate(second, usegmt=True).encode()
        return self.value


def wants_close(request: h11.Request) -> bool:
    if request.http_version != b"1.1":
        return True
    return any(name == b"connection" and b"close" in value.lower()
               for name, value in request.headers)  # fmt: skip


def burn(seconds: float) -> None:
    """Spin for ``seconds``: a stand-in for the work a framework does per request."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def serve(sock: socket.socket, clock: Clock, work: float = 0.0) -> None:
    """One connection: request after request, until EOF or a request that asks to close."""
    conn = h11.Connection(h11.SERVER)
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = sock.recv(65536)
            conn.receive_data(data)  # b"" is the EOF
            if not data and conn.their_state is h11.IDLE:
                return
            continue
        if type(event) is h11.Request:
            close = wants_close(event)
            continue  # read on to its EndOfMessage (no body for a GET)
        if type(event) is h11.EndOfMessage:
            if work:
                burn(work)
            sock.sendall(HEAD + clock.now() + (TAIL_CLOSE if close else TAIL_KEEP))
            if close:
                return
            # The response went out without h11, so a new Connection per request, fed with
            # what the client sent beyond this one (pipelined requests).
            rest = conn.trailing_data[0]
            conn = h11.Connection(h11.SERVER)
            if rest:
                conn.receive_data(rest)
            continue
        return  # ConnectionClosed, or Data of a body: not for this floor


def worker(listener: socket.socket, work: float) -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    clock = Clock()
    while True:
        sock, _ = listener.accept()
        try:
            serve(sock, clock, work)
        except (OSError, h11.ProtocolError):
            pass
        finally:
            sock.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--bind", default="127.0.0.1:8000", help="HOST:PORT (127.0.0.1:8000)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (2)")
    p.add_argument("--work-us", type=float, default=0.0, metavar="N",
                   help="spin N microseconds before each response (0)")  # fmt: skip
    args = p.parse_args(argv)
    if not math.isfinite(args.work_us) or args.work_us < 0:
        p.error("--work-us must be a number >= 0")
    host, _, port = args.bind.rpartition(":")
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, int(port)))
    listener.listen(1024)
    pids = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            try:
                worker(listener, args.work_us / 1e6)
            finally:
                os._exit(0)
        pids.append(pid)

    def stop(signum: int, frame: object) -> None:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for pid in pids:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        sys.exit(0)

    for sig in (signal.SIGQUIT, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main())
