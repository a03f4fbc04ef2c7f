"""A PreforkTCPServer / PreforkUnixStreamServer program for the black-box tests.

It binds, prints where it listens (``PORT=N`` or ``PATH=...``), serves until stopped,
then prints ``DONE children=N`` (N: child processes left, zombies included) and exits 0.

Handlers (``--handler``):

* ``lines``: a plain ``socketserver.StreamRequestHandler`` that echoes every line.
* ``http``: ``http.server.SimpleHTTPRequestHandler`` serving ``--dir``.
* ``wsgi``: examples.http's handler with an application that says hello and its pid.
* ``ctl``: reads one command line and answers it:

  - ``pid``: ``<pid>``
  - ``raise``: raises RuntimeError (the connection is closed)
  - ``sleep S N``: ``sleeping <pid>``, sleeps S seconds, ``slept <pid>`` and N bytes "x"
  - ``stuck``: ``stuck <pid>``, then sleeps without a heartbeat
  - ``stream``: 64 KiB chunks for as long as the client reads (bounded)
  - ``shutdown``: calls ``server.shutdown()`` (inside the worker), ``bye <pid>``

* ``park``: per turn, reads one line and answers ``<pid> <parked> <verified> <line>``
  (``parked``: the connections the worker held parked; ``verified``: how often
  ``verify_request`` ran in this worker), then parks the connection for
  ``--park-timeout`` seconds, or says ``not parked`` and closes it. A line starting with
  ``raise`` makes it raise after parking; ``sleep S`` says ``sleeping`` and sleeps S
  seconds before answering.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import logging
import os
import socket
import socketserver
import struct
import sys
import threading
import time
from pathlib import Path

from prefork_server import PreforkMixIn, PreforkTCPServer, PreforkUnixStreamServer


class LineEcho(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line)


class Ctl(socketserver.StreamRequestHandler):
    def say(self, text: str) -> None:
        self.wfile.write(f"{text}\n".encode())
        self.wfile.flush()

    def handle(self) -> None:
        command, *args = self.rfile.readline().decode().split()
        pid = os.getpid()
        if command == "pid":
            self.say(str(pid))
        elif command == "raise":
            raise RuntimeError("boom in the handler")
        elif command == "sleep":
            self.say(f"sleeping {pid}")
            time.sleep(float(args[0]))
            self.say(f"slept {pid}")
            self.wfile.write(b"x" * int(args[1]))
        elif command == "hold":  # keep the worker until another client waits
            self.say(f"holding {pid}")
            while not self.server.clients_waiting():  # type: ignore[attr-defined]
                time.sleep(0.01)
            self.say(f"yielded {pid}")
        elif command == "stuck":
            self.say(f"stuck {pid}")
            time.sleep(3600)
        elif command == "stream":
            chunk = b"y" * 65536
            for _ in range(16384):  # 1 GiB at most: the client resets long before
                self.wfile.write(chunk)
        elif command == "shutdown":
            self.server.shutdown()
            self.say(f"bye {pid}")
        else:
            self.say(f"unknown {command}")


class Parking(socketserver.BaseRequestHandler):
    timeout = 30.0

    def handle(self) -> None:
        line = b""
        while not line.endswith(b"\n"):
            chunk = self.request.recv(4096)
            if not chunk:
                return
            line += chunk
        server: PreforkTCPServer = self.server  # type: ignore[assignment]
        if line.startswith(b"sleep"):
            self.request.sendall(b"sleeping\n")
            time.sleep(float(line.split()[1]))
        verified = getattr(server, "verified", 0)
        self.request.sendall(b"%d %d %d " % (os.getpid(), server.parked_connections, verified)
                             + line)  # fmt: skip
        if not server.park(self.request, self.client_address, self.timeout):
            self.request.sendall(b"not parked\n")
        elif line.startswith(b"raise"):
            raise RuntimeError("boom after parking")


class CountingVerify:
    """Counts verify_request() calls in the worker (a mix-in)."""

    def verify_request(self, request: object, client_address: object) -> bool:
        self.verified = getattr(self, "verified", 0) + 1
        return True


class TCPServer(CountingVerify, PreforkTCPServer):
    pass


class SaysBye(socketserver.TCPServer):
    """A server class of the user's own, after PreforkMixIn in the MRO: its
    shutdown_request(), reached through PreforkMixIn's super(), says bye to the client."""

    def shutdown_request(self, request: socket.socket) -> None:
        with contextlib.suppress(OSError):
            request.sendall(b"bye\n")
        super().shutdown_request(request)


class ByeServer(PreforkMixIn, SaysBye):
    allow_reuse_address = True


class LingerServer(PreforkTCPServer):
    """A close_request() that touches the socket (as one setting SO_LINGER would)."""

    def close_request(self, request: socket.socket) -> None:
        request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 5))
        super().close_request(request)


class LingerAfterHandler(PreforkTCPServer):
    """A finish_request() that touches the socket after the handler is done."""

    def finish_request(self, request: socket.socket, client_address: object) -> None:
        super().finish_request(request, client_address)
        request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 5))


def wsgi_hello(environ: dict, start_response: object) -> list[bytes]:
    query = environ.get("QUERY_STRING", "")
    if query.startswith("sleep="):
        print("APP SLEEPING", flush=True)
        time.sleep(float(query[len("sleep=") :]))
    start_response("200 OK", [("Content-Type", "text/plain")])  # type: ignore[operator]
    return [b"hello from %d" % os.getpid()]


class NoParkingServer(PreforkTCPServer):
    """Says it can park, then declines every park(): a handler's "not parked after all"."""

    def park(self, request: object, client_address: object, timeout: float) -> bool:
        return False


class TCP6Server(PreforkTCPServer):
    address_family = socket.AF_INET6


class HTTPServer(PreforkTCPServer, http.server.HTTPServer):
    pass


class ThreadingServer(socketserver.ThreadingMixIn, PreforkTCPServer):
    pass


class ForkingServer(socketserver.ForkingMixIn, PreforkTCPServer):
    pass


def children_left() -> int:
    """Children of this process, zombies included, found through /proc."""
    me = os.getpid()
    count = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            data = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(data[data.rindex(")") + 2 :].split()[1]) == me:
            count += 1
    return count


def ask_pid(server: socketserver.BaseServer) -> str:
    family = server.socket.family
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(server.server_address)
        s.sendall(b"pid\n")
        return s.makefile().readline().strip()


def shut_down_after_first_answer(server: socketserver.BaseServer) -> None:
    """A thread of the master: be the first client, then call shutdown()."""
    print(f"ANSWERED {ask_pid(server)}", flush=True)
    server.shutdown()
    print(f"SHUTDOWN RETURNED children={children_left()}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--server", choices=["tcp", "tcp6", "unix", "http", "threading", "forking",
                                        "bye", "linger", "linger-after", "noparking"],
                   default="tcp")  # fmt: skip
    p.add_argument("--handler", choices=["lines", "ctl", "http", "park", "wsgi"], default="ctl")
    p.add_argument("--park-timeout", type=float, default=30.0)
    p.add_argument("--bind", default="127.0.0.1", help="host, or the socket path for unix "
                   "(@name: in the abstract namespace)")  # fmt: skip
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--dir", help="what the http handler serves")
    p.add_argument("--shutdown-before", action="store_true", help="shutdown() first")
    p.add_argument("--shutdown-after-first", action="store_true")
    p.add_argument("--debug", action="store_true", help="log at debug level")
    a = p.parse_args()
    if a.debug:  # the server's default logger keeps a level that is already set
        logging.getLogger("prefork_server.prefork_server").setLevel(logging.DEBUG)

    Parking.timeout = a.park_timeout
    handler: object = {"lines": LineEcho, "ctl": Ctl, "park": Parking}.get(a.handler)
    if a.handler == "http":
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=a.dir)
    elif a.handler == "wsgi":  # examples.http's handler, with a hello application
        from examples.http import make_handler

        handler = make_handler(wsgi_hello)
    if a.server == "unix":
        cls: type[socketserver.BaseServer] = PreforkUnixStreamServer
        address: object = "\0" + a.bind[1:] if a.bind.startswith("@") else a.bind  # abstract
    else:
        cls = {"tcp": TCPServer, "tcp6": TCP6Server, "http": HTTPServer,
               "threading": ThreadingServer, "forking": ForkingServer, "bye": ByeServer,
               "linger": LingerServer, "linger-after": LingerAfterHandler,
               "noparking": NoParkingServer}[a.server]  # fmt: skip
        address = (a.bind, 0)
    with cls(address, handler, workers=a.workers, timeout=a.timeout) as server:
        if a.server == "unix":
            print(f"PATH={server.server_address}", flush=True)
        else:
            print(f"PORT={server.server_address[1]}", flush=True)
        if a.shutdown_before:
            server.shutdown()
        if a.shutdown_after_first:
            threading.Thread(target=shut_down_after_first_answer, args=(server,)).start()
        started = time.monotonic()
        server.serve_forever()
        print(f"SERVE_FOREVER RETURNED after {time.monotonic() - started:.2f}s", flush=True)
    for thread in threading.enumerate():
        if thread is not threading.main_thread():
            thread.join()
    print(f"DONE children={children_left()}", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
