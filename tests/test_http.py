"""examples/http: an HTTP/1.1 server for WSGI applications, tested as its users meet it.

Real servers (``python -m examples.http``) started through the ``spawn`` fixture, talked to
by real clients over loopback: ``http.client``, raw sockets (pipelining, malformed input,
limits, slow clients), ``curl`` and ``wrk`` when installed, ``wsgiref.validate``-wrapped
applications and a Flask application. The response writer and the WSGI pieces are also
tested directly, with h11 as the reference parser of what we write.
"""

from __future__ import annotations

import contextlib
import email.utils
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h11
import pytest
from conftest import REPO, Proc, children, is_alive, run_clients, wait_for, wait_workers

from examples.http import HTTPSettings, make_handler
from examples.http.response import (
    CHUNKED,
    LENGTH,
    NO_BODY,
    UNTIL_CLOSE,
    ResponseError,
    build_head,
    error_response,
)
from examples.http.wsgi import InputStream, base_environ, new_key_cache, request_environ
from prefork_server.scoreboard import SlotState, read_scoreboard

HTTP = [sys.executable, "-W", "error::Warning:wsgiref.validate", "-m", "examples.http"]
PROGRAMS = REPO / "tests" / "programs"
CLF = re.compile(
    r'127\.0\.0\.1 - - \[\d{2}/\w{3}/\d{4}:\d{2}:\d{2}:\d{2} [+-]\d{4}\] "(?P<line>[^"]*)" '
    r"(?P<status>\d{3}|-) (?P<size>\d+|-) (?P<duration>\d+\.\d{6})"
)


# -- a real server, and raw HTTP on a socket ------------------------------------------------


@dataclass
class Server:
    proc: Proc
    port: int
    initial_workers: list[int] = field(default_factory=list)

    def connect(self, timeout: float = 10.0) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def client(self, timeout: float = 10.0) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def get(self, path: str, **kwargs: Any) -> tuple[int, dict[str, str], bytes]:
        conn = self.client()
        try:
            conn.request("GET", path, **kwargs)
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def output(self) -> str:
        return self.proc.output()

    def assert_workers_unchanged(self) -> None:
        assert self.proc.workers() == self.initial_workers, self.output()

    def assert_clean_log(self) -> None:
        out = self.output()
        assert "Traceback" not in out and " ERROR " not in out, out
        assert "Exception ignored" not in out, out


@pytest.fixture
def serve(spawn: Callable[..., Proc]) -> Callable[..., Server]:
    """``serve(*options, workers=2, app="http_apps:app")``: a running examples.http; the
    demo application with ``app=None``."""

    def _serve(*options: str, workers: int = 2, app: str | None = "http_apps:app") -> Server:
        argv = [*HTTP, "--bind", "127.0.0.1:0", "--workers", str(workers), *options]
        if app:
            argv.append(app)
        env = {"PYTHONPATH": os.pathsep.join([str(REPO), str(PROGRAMS)])}
        proc = spawn(argv, cwd=REPO, env=env)
        port = proc.port()
        return Server(proc, port, wait_workers(proc.pid, workers))

    return _serve


@dataclass
class Response:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes
    head: bytes


def read_response(f: io.BufferedReader, head_request: bool = False) -> Response:
    """One response from ``f``, framed as RFC 9112 says (1xx responses are returned too)."""
    status_line = f.readline()
    if not status_line:
        raise EOFError("the server closed the connection")
    head = [status_line]
    version, status, reason = status_line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    assert version == "HTTP/1.1", status_line
    headers: dict[str, str] = {}
    while True:
        line = f.readline()
        head.append(line)
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        key = name.lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    code = int(status)
    if head_request or code < 200 or code in (204, 304):
        body = b""
    elif headers.get("transfer-encoding") == "chunked":
        parts = []
        while True:
            size = int(f.readline().split(b";")[0], 16)
            if size == 0:
                while f.readline() not in (b"\r\n", b""):
                    pass
                break
            parts.append(f.read(size))
            assert f.read(2) == b"\r\n"
        body = b"".join(parts)
    elif "content-length" in headers:
        body = f.read(int(headers["content-length"]))
    else:
        body = f.read()
    return Response(code, reason, headers, body, b"".join(head))


def exchange(s: socket.socket, data: bytes, count: int = 1) -> list[Response]:
    """Send ``data``, read ``count`` responses."""
    s.sendall(data)
    f = s.makefile("rb")
    return [read_response(f) for _ in range(count)]


def at_eof(s: socket.socket, timeout: float = 10.0) -> bool:
    """True once the server has closed ``s`` (EOF or reset), reading and dropping the rest."""
    s.settimeout(timeout)
    try:
        while s.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


def get(path: str, *headers: str, version: str = "1.1", body: bytes = b"") -> bytes:
    lines = [f"GET {path} HTTP/{version}", "Host: test", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def post(path: str, body: bytes, *headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: test", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def chunked(pieces: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n\r\n"


# -- http.client: keep-alive, HEAD, chunked both ways, 100-continue -------------------------


def test_keep_alive_with_http_client_serves_one_connection_many_requests(serve) -> None:
    server = serve()
    conn = server.client()
    conn.request("GET", "/pid")
    r = conn.getresponse()
    pid = r.read()
    sock = conn.sock
    for _ in range(5):
        conn.request("GET", "/hello")
        r = conn.getresponse()
        assert (r.status, r.read()) == (200, b"hello")
        assert r.getheader("Server") == "prefork-server"
        assert r.getheader("Connection") is None
        date = email.utils.parsedate_to_datetime(r.getheader("Date"))
        assert abs((datetime.now(timezone.utc) - date).total_seconds()) < 60
    conn.request("GET", "/pid")
    r = conn.getresponse()
    assert r.read() == pid, "the same worker served the whole connection"
    assert conn.sock is sock, "http.client never had to reconnect"
    conn.close()
    server.assert_clean_log()


def test_head_has_the_get_headers_and_no_body(serve) -> None:
    server = serve()
    conn = server.client()
    conn.request("HEAD", "/hello")
    r = conn.getresponse()
    assert r.status == 200
    assert r.getheader("Content-Length") == "5"
    assert r.read() == b""
    conn.request("HEAD", "/gen?n=3&size=4")  # a body of unknown length: chunked for GET
    r = conn.getresponse()
    assert r.getheader("Transfer-Encoding") == "chunked"
    assert r.read() == b""
    conn.request("GET", "/hello")  # would read stray body bytes if HEAD had sent any
    r = conn.getresponse()
    assert r.read() == b"hello"
    conn.close()
    server.assert_clean_log()


def test_chunked_upload_and_chunked_response_with_http_client(serve) -> None:
    server = serve(app=None)  # the demo: /echo streams a chunked upload back chunked
    # Small enough for the socket buffers: http.client reads only once it has sent it all.
    payload = [os.urandom(n) for n in (1, 100, 30000, 3)]
    conn = server.client()
    conn.request("POST", "/echo", body=iter(payload), encode_chunked=True,
                 headers={"Transfer-Encoding": "chunked"})  # fmt: skip
    r = conn.getresponse()
    assert r.status == 200
    assert r.getheader("Transfer-Encoding") == "chunked"
    assert r.read() == b"".join(payload)
    conn.request("POST", "/echo", body=b"with a length")
    r = conn.getresponse()
    assert (r.getheader("Content-Length"), r.read()) == ("13", b"with a length")
    conn.close()
    server.assert_clean_log()


def test_chunked_upload_reaches_a_validated_app_as_exactly_its_body(serve) -> None:
    server = serve()
    conn = server.client()
    pieces = [b"first line\n", b"second ", b"line\nno newline at the end"]
    conn.request("POST", "/lines", body=iter(pieces), encode_chunked=True,
                 headers={"Transfer-Encoding": "chunked"})  # fmt: skip
    r = conn.getresponse()
    assert json.loads(r.read()) == ["first line\n", "second line\n", "no newline at the end"]
    conn.close()
    server.assert_clean_log()


def test_100_continue_is_sent_when_the_app_reads_the_body(serve) -> None:
    server = serve("--max-body-bytes", "1000")
    conn = server.client()
    conn.putrequest("POST", "/env")
    conn.putheader("Content-Length", "11")
    conn.putheader("Expect", "100-continue")
    conn.endheaders()
    conn.sock.settimeout(10)
    interim = conn.sock.recv(100, socket.MSG_PEEK)
    assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), interim
    conn.send(b"hello there")
    r = conn.getresponse()  # http.client skips the 100 itself
    assert r.status == 200
    assert json.loads(r.read())["body"] == "hello there"
    conn.request("GET", "/hello")  # and the connection goes on
    assert conn.getresponse().read() == b"hello"
    conn.close()

    # An application that never reads the body: no 100, and the connection ends, since
    # the client may or may not send the body now.
    with server.connect() as s:
        (r,) = exchange(s, get("/ignore-body", "Content-Length: 5", "Expect: 100-continue"))
        assert (r.status, r.headers.get("connection")) == (200, "close")
        assert at_eof(s)

    # Too large a body: 413 at once, no 100, the application never runs.
    with server.connect() as s:
        (r,) = exchange(s, post("/env", b"", "Expect: 100-continue").replace(
            b"Content-Length: 0", b"Content-Length: 5000"))  # fmt: skip
        assert (r.status, r.headers["connection"]) == (413, "close")
        assert at_eof(s)
    server.assert_clean_log()


# -- raw sockets: pipelining, HTTP/1.0, byte by byte ----------------------------------------


PIPELINE = [
    get("/hello"),
    post("/env", b"abc", "Content-Type: text/plain"),
    get("/gen?n=2&size=3"),
    b"HEAD /hello HTTP/1.1\r\nHost: test\r\n\r\n",
    post("/lines", b"x\ny\n"),
    get("/pid"),
]


def _check_pipeline(f: io.BufferedReader) -> None:
    hello, env, gen, head, lines, pid = (
        read_response(f, head_request=(i == 3)) for i in range(len(PIPELINE))
    )
    assert (hello.status, hello.body) == (200, b"hello")
    assert json.loads(env.body)["body"] == "abc", "wsgi.input stopped at the body's end"
    assert gen.body == b"aaabbb"
    assert (head.headers["content-length"], head.body) == ("5", b"")
    assert json.loads(lines.body) == ["x\n", "y\n"]
    assert int(pid.body) > 0


def test_pipelined_requests_are_answered_in_order(serve) -> None:
    server = serve()
    with server.connect() as s:
        s.sendall(b"".join(PIPELINE))
        _check_pipeline(s.makefile("rb"))
    server.assert_clean_log()


def test_requests_sent_byte_by_byte_are_parsed_whole(serve) -> None:
    server = serve()
    with server.connect() as s:
        for byte in b"".join(PIPELINE):
            s.send(bytes([byte]))
        _check_pipeline(s.makefile("rb"))
    server.assert_clean_log()


def test_http_1_0_keep_alive_only_when_asked(serve) -> None:
    server = serve()
    with server.connect() as s:
        f = s.makefile("rb")
        for _ in range(2):
            s.sendall(get("/hello", "Connection: keep-alive", version="1.0"))
            r = read_response(f)
            assert (r.status, r.body, r.headers["connection"]) == (200, b"hello", "keep-alive")
        s.sendall(get("/gen?n=2&size=2", "Connection: keep-alive", version="1.0"))
        r = read_response(f)  # no length known, no chunked for 1.0: the body ends at EOF
        assert (r.body, r.headers["connection"]) == (b"aabb", "close")
        assert "transfer-encoding" not in r.headers
    with server.connect() as s:
        (r,) = exchange(s, get("/hello", version="1.0"))
        assert (r.status, r.headers["connection"]) == (200, "close")
        assert at_eof(s)
    server.assert_clean_log()


def test_connection_close_is_honoured(serve) -> None:
    server = serve()
    with server.connect() as s:
        (r,) = exchange(s, get("/hello", "Connection: close"))
        assert (r.body, r.headers["connection"]) == (b"hello", "close")
        assert at_eof(s)


def test_a_connection_ends_at_its_response_although_the_app_forked_a_child_holding_it(
    serve,
) -> None:
    # HTTP/1.0 without a length: the client reads to the end of the connection, which
    # close() alone would not give while the child holds a copy of the descriptor.
    server = serve(workers=1)
    (worker,) = server.initial_workers
    try:
        with server.connect() as s:
            (r,) = exchange(s, get("/fork", version="1.0"))
            assert r.status == 200 and "content-length" not in r.headers
            assert at_eof(s)
        child = int(r.body)
        for _ in range(3):  # later connections too, each closed by the server
            with server.connect() as s:
                (r,) = exchange(s, get("/gen?n=2&size=3", version="1.0"))
                assert r.body == b"aaabbb" and at_eof(s)
        assert children(worker) == [child]  # still there: it held the first connection
        assert server.get(f"/reap?pid={child}")[2] == b"reaped"
    finally:
        for pid in children(worker):  # if the test failed before the worker reaped it
            os.kill(pid, signal.SIGKILL)
    server.assert_clean_log()


# -- malformed input, limits, slow and idle clients -----------------------------------------

MALFORMED = {
    "bad request line": b"GET\r\n\r\n",
    "bad method": b"G(T / HTTP/1.1\r\nHost: x\r\n\r\n",
    "unknown version": b"GET / HTTP/2.7\r\nHost: x\r\n\r\n",
    "header without colon": b"GET / HTTP/1.1\r\nHost: x\r\nNoColonHere\r\n\r\n",
    "space before colon": b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
    "NUL in a header": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "no Host in 1.1": b"GET / HTTP/1.1\r\n\r\n",
    "bad Content-Length": b"POST /env HTTP/1.1\r\nHost: x\r\nContent-Length: 1x\r\n\r\n",
    "two Content-Lengths": b"POST /env HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
    b"Content-Length: 2\r\n\r\nab",
    "length and chunked": b"POST /env HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "bad chunk size": b"POST /env HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"zz\r\nabc\r\n0\r\n\r\n",
    "truncated chunk": b"POST /env HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabcdef\r\n0\r\n\r\n",
    "TLS handshake": bytes.fromhex("160301020001000001fc0303") + os.urandom(32),
    "binary garbage": b"\x00\xff\xfe garbage \x01\x02\r\n\r\n",
}


@pytest.mark.parametrize("payload", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_input_gets_400_and_close_and_the_worker_goes_on(serve, payload) -> None:
    server = serve()
    status = 505 if b"HTTP/2.7" in payload else 400
    with server.connect() as s:
        (r,) = exchange(s, payload)
        assert (r.status, r.headers["connection"]) == (status, "close"), r
        assert at_eof(s)
    server.proc.wait_output(rf"INFO {status} for 127\.0\.0\.1:\d+: ")
    status, _, body = server.get("/hello")
    assert (status, body) == (200, b"hello")
    server.assert_workers_unchanged()
    server.assert_clean_log()


def test_limits_431_and_413(serve) -> None:
    server = serve("--max-header-bytes", "1024", "--max-body-bytes", "1000")
    with server.connect() as s:
        (r,) = exchange(s, get("/hello", "X-Big: " + "b" * 2000))
        assert (r.status, r.headers["connection"]) == (431, "close")
        assert at_eof(s)
    with server.connect() as s:  # declared too large: answered before the body is sent
        (r,) = exchange(s, post("/env", b"").replace(b"Length: 0", b"Length: 1001"))
        assert (r.status, r.headers["connection"]) == (413, "close")
        assert at_eof(s)
    with server.connect() as s:  # chunked, growing past the limit while the app reads
        head = b"POST /env HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        (r,) = exchange(s, head + chunked([b"x" * 600, b"y" * 600]))
        assert (r.status, r.headers["connection"]) == (413, "close")
        assert at_eof(s)
    with server.connect() as s:  # exactly at the limits: fine
        (r,) = exchange(s, post("/env", b"z" * 1000))
        assert (r.status, len(json.loads(r.body)["body"])) == (200, 1000)
    server.assert_workers_unchanged()
    server.assert_clean_log()


def test_the_head_limit_counts_the_head_only(serve) -> None:
    # The limit is checked before h11 parses a head that arrived whole; what came with the
    # head (a body, pipelined requests) must not count against it.
    server = serve("--max-header-bytes", "1024")
    with server.connect() as s:
        responses = exchange(s, get("/hello") * 200, count=200)  # 6 KB in one send
        assert {(r.status, r.body) for r in responses} == {(200, b"hello")}
    with server.connect() as s:
        (r,) = exchange(s, post("/env", b"q" * 5000))  # one send: the body follows its head
        assert (r.status, len(json.loads(r.body)["body"])) == (200, 5000)
    with server.connect() as s:  # a head of about 1000 bytes, its end in a second send
        head = post("/env", b"w" * 3000, "X-Pad: " + "p" * 900)
        cut = head.index(b"\r\n\r\n") + 3
        s.sendall(head[:cut])
        (r,) = exchange(s, head[cut:])
        assert (r.status, len(json.loads(r.body)["body"])) == (200, 3000)
    with server.connect() as s:  # over the limit, whole in one send: refused unparsed
        (r,) = exchange(s, get("/hello", *["a: b"] * 400) + get("/hello"))
        assert (r.status, r.headers["connection"]) == (431, "close")
        assert at_eof(s)
    server.assert_workers_unchanged()
    server.assert_clean_log()


def test_slow_and_silent_clients_give_way_to_waiting_ones(serve) -> None:
    # One worker, a long read timeout: without --busy-read-timeout the client behind the
    # slow and the silent connection would wait a minute.
    server = serve("--read-timeout", "30", "--busy-read-timeout", "0.5", workers=1)
    with server.connect() as slow, server.connect() as silent:
        slow.sendall(b"GET /hello HTTP/1.1\r\nHo")  # and nothing more
        started = time.monotonic()
        status, _, body = server.get("/hello")
        assert (status, body) == (200, b"hello")
        assert time.monotonic() - started < 8
        r = read_response(slow.makefile("rb"))
        assert (r.status, r.headers["connection"]) == (408, "close")
        assert at_eof(slow)
        assert at_eof(silent)  # connected, sent nothing: closed without a word
    server.proc.wait_output(
        r"408 for 127\.0\.0\.1:\d+: timed out reading the request head "
        r"\(another client was waiting\)"
    )
    server.assert_workers_unchanged()
    server.assert_clean_log()


def test_alone_a_slow_client_gets_the_whole_read_timeout(serve) -> None:
    server = serve("--read-timeout", "3", "--busy-read-timeout", "0.2", workers=1)
    with server.connect() as slow:
        slow.sendall(b"GET /hello HTTP/1.1\r\nHo")
        time.sleep(0.8)  # the scenario: slower than busy-read-timeout, nobody waiting
        slow.sendall(b"st: x\r\n\r\n")
        r = read_response(slow.makefile("rb"))
        assert (r.status, r.body) == (200, b"hello")
    with server.connect() as silent:
        connected = time.monotonic()
        assert at_eof(silent)  # nothing sent: closed after the read timeout
        assert 2.8 <= time.monotonic() - connected < 10
    server.assert_clean_log()


@pytest.mark.parametrize("threads", [False, True], ids=["parked", "threads-close-it"])
def test_an_idle_keep_alive_client_gives_way_to_a_waiting_one(serve, threads: bool) -> None:
    """The only worker holds an idle keep-alive connection when another client comes: the
    newcomer is served long before the keep-alive timeout. A plain worker parks the idle
    connection, which stays open and is served again; a handler thread cannot park, so
    it closes it."""
    server = serve("--keepalive-timeout", "60", *(["--threads", "1"] if threads else []),
                   workers=1)  # fmt: skip
    idle = server.client()
    idle.request("GET", "/hello")
    assert idle.getresponse().read() == b"hello"
    sock = idle.sock
    started = time.monotonic()
    status, _, body = server.get("/hello")  # the only worker holds `idle`'s connection
    assert (status, body) == (200, b"hello")
    assert time.monotonic() - started < 5, "served long before the keep-alive timeout"
    if threads:
        assert at_eof(idle.sock)
    else:
        idle.request("GET", "/hello")
        assert idle.getresponse().read() == b"hello"
        assert idle.sock is sock, "the parked connection was kept"
    idle.close()

    # Alone, a client keeps its connection across idle moments.
    alone = server.client()
    alone.request("GET", "/hello")
    alone.getresponse().read()
    sock = alone.sock
    time.sleep(0.7)  # the scenario: idle for longer than keepalive_yield (0.5 s)
    alone.request("GET", "/hello")
    assert alone.getresponse().read() == b"hello"
    assert alone.sock is sock
    alone.close()
    server.assert_clean_log()


@contextlib.contextmanager
def keeps_sending(conn: http.client.HTTPConnection) -> Iterator[None]:
    """While in the block, a thread sends ``GET /hello`` on ``conn`` back to back."""
    done = threading.Event()

    def send() -> None:
        while not done.is_set():
            conn.request("GET", "/hello")
            conn.getresponse().read()

    sender = threading.Thread(target=send)
    sender.start()
    try:
        yield
    finally:
        done.set()
        sender.join(30)


def all_workers_idle(server: Server) -> bool:
    views = read_scoreboard(server.proc.pid)
    return len(views) == len(server.initial_workers) and all(
        v.booted and v.state == SlotState.IDLE for v in views
    )


def test_two_workers_keep_200_keep_alive_clients_and_answer_each_in_turn(serve) -> None:
    """200 keep-alive clients against 2 workers: every one is answered while all 200
    connections are open, then answered again on the same connection, which never says
    ``Connection: close``: the idle connections wait parked in their worker's loop."""
    server = serve("--no-access-log", "--keepalive-timeout", "60")
    # Both take connections from the start (else one takes all, and some move later).
    wait_for(lambda: all_workers_idle(server), what="both workers waiting for clients")
    clients = 200
    everybody_answered = threading.Barrier(clients + 1, timeout=60)
    answered_twice = threading.Barrier(clients, timeout=60)
    results: list[tuple[int, ...] | None] = [None] * clients

    def client(i: int) -> None:
        with server.connect(timeout=60) as s:
            f = s.makefile("rb")
            s.sendall(get(f"/hello?n={i}"))
            first = read_response(f)
            try:
                everybody_answered.wait()  # nobody leaves before all were answered
            except threading.BrokenBarrierError:
                return
            s.sendall(get(f"/pid?n={i}"))
            second = read_response(f)
            results[i] = (first.status, second.status,
                          "close" in (first.headers.get("connection"),
                                      second.headers.get("connection")))  # fmt: skip
            # A worker whose clients all left would be idle, and the other one would
            # then hand it connections (closing them): not what this test is about.
            with contextlib.suppress(threading.BrokenBarrierError):
                answered_twice.wait()

    run_clients(client, clients, everybody_answered,
                "not every client was answered while all 200 were connected", 60)  # fmt: skip
    assert results == [(200, 200, False)] * clients
    server.assert_workers_unchanged()
    server.assert_clean_log()


def test_two_keep_alive_clients_get_a_worker_each(serve) -> None:
    """As many clients as workers: each keeps its connection and a worker of its own (a
    worker gives up a connection for a waiting client only when no other worker idles)."""
    server = serve("--no-access-log")
    wait_for(lambda: all_workers_idle(server), what="both workers waiting for clients")
    socks = [server.connect(), server.connect()]  # both queue before either asks
    try:
        files = [s.makefile("rb") for s in socks]
        pids: list[set[bytes]] = [set(), set()]
        for _ in range(100):
            for s in socks:
                s.sendall(get("/pid"))
            for i, f in enumerate(files):
                r = read_response(f)
                assert (r.status, r.headers.get("connection")) == (200, None)
                pids[i].add(r.body)
        assert len(pids[0]) == len(pids[1]) == 1
        assert pids[0] != pids[1], "both connections on one worker while the other idles"
    finally:
        for s in socks:
            s.close()
    server.assert_clean_log()


@pytest.mark.parametrize("together", [True, False], ids=["at-once", "in-turn"])
def test_parked_connections_move_to_a_worker_that_became_idle(serve, together: bool) -> None:
    """Two keep-alive clients end up on one worker while the other is busy (with a slow
    request); once that one idles, one of the two connections is ended after a response
    and its client's next connection goes to the idle worker: whether the clients send
    at once (a client waits for the worker) or in turn (each finds the worker free, and
    the connections only take turns in its loop)."""
    server = serve("--no-access-log", "--keepalive-timeout", "60")
    wait_for(lambda: all_workers_idle(server), what="both workers waiting for clients")
    with server.connect() as slow:
        slow.sendall(get("/drip?n=2&ms=1500", "Connection: close"))
        assert slow.recv(12, socket.MSG_PEEK) == b"HTTP/1.1 200"  # a worker is busy
        a, b = server.client(), server.client()
        try:
            last: dict[int, bytes] = {}
            for i in (0, 1):  # both on the other worker: a is parked to serve b
                conn = (a, b)[i]
                conn.request("GET", "/pid")
                last[i] = conn.getresponse().read()
            assert last[0] == last[1]
            assert at_eof(slow), "the slow request ended: its worker idles"
            moved = False
            for _ in range(50):
                # At once: that worker then has a client waiting while it serves one.
                for i, conn in enumerate((a, b)):
                    conn.request("GET", "/pid")  # reconnects after a Connection: close
                    if not together:
                        r = conn.getresponse()
                        assert r.status == 200
                        last[i] = r.read()
                        moved = moved or r.will_close
                for i, conn in enumerate((a, b) if together else ()):
                    r = conn.getresponse()
                    assert r.status == 200
                    last[i] = r.read()
                    moved = moved or r.will_close
                if last[0] != last[1]:
                    break
            assert moved and last[0] != last[1], "still both on one worker"
        finally:
            a.close()
            b.close()
    server.assert_clean_log()


def test_a_queued_client_is_served_although_the_idle_worker_is_stopped(serve) -> None:
    """A worker gives its keep-alive client up for a queued one only if no other worker
    idles, since the idle one would take it; but one that looks idle and does not take
    it (here: SIGSTOP, its heartbeat still fresh with --timeout 60) is trusted only for a
    moment."""
    server = serve("--timeout", "60", "--no-access-log", "--keepalive-timeout", "60")
    wait_for(lambda: all_workers_idle(server), what="both workers waiting for clients")
    busy = server.client()
    busy.request("GET", "/pid")
    serving = int(busy.getresponse().read())
    (stopped,) = [pid for pid in server.initial_workers if pid != serving]
    os.kill(stopped, signal.SIGSTOP)
    try:
        with keeps_sending(busy):  # never idle long enough to be parked for idleness
            started = time.monotonic()
            status, _, body = server.get("/pid")
            assert (status, int(body)) == (200, serving)
            assert time.monotonic() - started < 5, "waited for the stopped worker"
    finally:
        busy.close()
        os.kill(stopped, signal.SIGCONT)
    server.assert_clean_log()


def test_an_active_client_among_idle_parked_ones_keeps_its_worker_but_not_from_them(
    serve,
) -> None:
    """One worker holds 10 idle parked connections. An active client keeps its worker
    between its requests (it is not parked and resumed each time, which cost 10 us more
    per request), yet a request on a parked connection is answered while the active
    client keeps sending: the handler waits on its client and on the worker's loop."""
    server = serve("--keepalive-timeout", "60", "--no-access-log", workers=1)
    idle = [server.connect() for _ in range(10)]
    try:
        for s in idle:
            assert exchange(s, get("/hello"))[0].status == 200
        wait_for(lambda: read_scoreboard(server.proc.pid)[0].connections == 10,
                 what="10 connections parked")  # fmt: skip
        active = server.client()
        active.request("GET", "/hello")
        active.getresponse().read()
        served_before = read_scoreboard(server.proc.pid)[0].served
        for _ in range(100):
            active.request("GET", "/hello")
            assert active.getresponse().read() == b"hello"
        # Each turn of a parked connection counts as a unit: 100 turns if it was parked.
        assert read_scoreboard(server.proc.pid)[0].served - served_before < 10

        try:
            with keeps_sending(active):
                started = time.monotonic()
                (r,) = exchange(idle[3], get("/pid"))
                assert r.status == 200
                assert time.monotonic() - started < 5, "a parked client starved"
        finally:
            active.close()
    finally:
        for s in idle:
            s.close()
    server.assert_clean_log()


def test_a_worker_with_parked_connections_retires_cleanly_at_max_requests(serve) -> None:
    """Three keep-alive clients sending at once, one worker with ``--max-requests 5``: the
    worker serves what is there, closes its parked connections and retires as such (a
    busy connection once turned its "stopping" state back into "busy", and the master
    took the exit for a worker that returned from its work by mistake)."""
    server = serve("--max-requests", "5", "--keepalive-timeout", "60", workers=1)
    socks = [server.connect() for _ in range(3)]
    pids: set[bytes] = set()
    try:
        for _ in range(12):
            for s in socks:
                s.sendall(get("/pid"))
            for i, s in enumerate(socks):
                try:
                    r = read_response(s.makefile("rb"))
                except (EOFError, ConnectionResetError):  # closed unanswered: retry it
                    socks[i].close()
                    socks[i] = s = server.connect()
                    s.sendall(get("/pid"))
                    r = read_response(s.makefile("rb"))
                assert r.status == 200
                pids.add(r.body)
                if r.headers.get("connection") == "close":
                    assert at_eof(s)
                    socks[i].close()
                    socks[i] = server.connect()
    finally:
        for s in socks:
            s.close()
    assert len(pids) >= 3, "36 requests, a new worker every 5"
    out = server.output()
    assert out.count("retired (max_requests)") >= 2, out
    assert "returned from its work function" not in out, out
    server.assert_clean_log()


def test_keep_alive_timeout_closes_an_idle_connection(serve) -> None:
    server = serve("--keepalive-timeout", "0.5", workers=1)
    with server.connect() as s:
        exchange(s, get("/hello"))
        idle_from = time.monotonic()
        assert at_eof(s)
        assert 0.4 <= time.monotonic() - idle_from < 5
    server.assert_clean_log()
    off = serve("--keepalive-timeout", "0", workers=1)
    with off.connect() as s:
        (r,) = exchange(s, get("/hello"))
        assert r.headers["connection"] == "close"
        assert at_eof(s)


def test_an_idle_keep_alive_outlives_the_worker_timeout_and_quit_ends_it(serve) -> None:
    server = serve("--timeout", "1", "--keepalive-timeout", "30", workers=1)
    with server.connect() as s:
        f = s.makefile("rb")
        s.sendall(get("/pid"))
        pid = read_response(f).body
        time.sleep(2.5)  # the scenario: idle for 2.5 timeouts
        s.sendall(get("/pid"))
        assert read_response(f).body == pid
        server.assert_workers_unchanged()
        quit_at = time.monotonic()
        server.proc.signal(signal.SIGQUIT)
        assert at_eof(s)
        assert server.proc.wait() == 0
        assert time.monotonic() - quit_at < 5
    assert "missed its heartbeat" not in server.output() and "killed" not in server.output()


def test_requests_under_way_at_quit_are_finished_the_last_with_connection_close(serve) -> None:
    server = serve("--timeout", "5", workers=1)
    with server.connect() as s:
        s.sendall(get("/drip?n=4&ms=200") + get("/hello"))  # the second one pipelined
        assert s.recv(12, socket.MSG_PEEK) == b"HTTP/1.1 200"  # the application runs
        server.proc.signal(signal.SIGQUIT)
        f = s.makefile("rb")
        drip = read_response(f)
        assert drip.body == b"drop 0\ndrop 1\ndrop 2\ndrop 3\n", "finished, not cut"
        hello = read_response(f)
        assert (hello.body, hello.headers["connection"]) == (b"hello", "close")
        assert at_eof(s)
    assert server.proc.wait() == 0


def test_the_sleep_route_past_the_timeout_gets_the_worker_replaced(serve) -> None:
    server = serve("--timeout", "1", workers=1, app=None)
    (old,) = server.initial_workers
    with server.connect() as s:
        s.sendall(get("/sleep?ms=30000"))
        assert at_eof(s, timeout=15), "the stuck worker was killed"
    wait_for(lambda: not is_alive(old), what="the old worker to be gone")
    (new,) = wait_workers(server.proc.pid, 1)
    assert new != old
    status, _, body = server.get("/")
    assert (status, body) == (200, b"Hello, world!\n")


# -- the application's side: errors, write(), close(), the environ --------------------------


def test_application_errors_get_500_and_a_logged_traceback(serve) -> None:
    server = serve(workers=1)
    status, headers, body = server.get("/raise")
    assert (status, headers["connection"]) == (500, "close")
    server.proc.wait_output(r"(?s)ERROR application error.*RuntimeError: boom before")

    conn = server.client()
    conn.request("GET", "/raise-late")  # after the head: the connection is cut
    r = conn.getresponse()
    with pytest.raises(http.client.IncompleteRead):
        r.read()
    conn.close()
    server.proc.wait_output(r"(?s)RuntimeError: boom in the middle of the body")

    status, _, body = server.get("/exc-info")  # start_response again with exc_info
    assert (status, body) == (503, b"sorry")

    status, headers, _ = server.get("/bad-header")
    assert status == 500 and "set-cookie" not in headers
    server.proc.wait_output(r"invalid header value for X-Evil")

    with server.connect() as s:
        s.sendall(get("/short"))  # 5 of the 10 bytes it declared: the connection is cut
        r = read_response(s.makefile("rb"))
        assert r.body == b"12345"
        assert at_eof(s)
    server.proc.wait_output(r"5 bytes short of its Content-Length")

    assert server.get("/hello")[2] == b"hello"
    server.assert_workers_unchanged()


def test_a_client_that_leaves_mid_response_is_not_an_error(serve) -> None:
    server = serve(workers=1)
    closes_before = int(server.get("/closes")[2])
    with server.connect() as s:
        s.sendall(get("/gen?n=4000&size=65536"))  # 250 MiB: far more than buffers hold
        assert s.recv(65536)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    # /gen is wrapped by the validator, whose close() is how we see the iterable closed:
    # the /closes count includes it.
    wait_for(lambda: int(server.get("/closes")[2]) > closes_before, what="close()")
    server.assert_workers_unchanged()
    server.assert_clean_log()


def test_write_callable_and_close_are_honoured(serve) -> None:
    server = serve(workers=1)
    before = int(server.get("/closes")[2])
    status, headers, body = server.get("/write")
    assert (status, body) == (200, b"written then returned")
    assert headers["transfer-encoding"] == "chunked"
    server.get("/hello")
    assert int(server.get("/closes")[2]) == before + 2
    status, headers, body = server.get("/no-content")
    assert (status, body) == (204, b"")
    assert "content-length" not in headers and "transfer-encoding" not in headers
    server.assert_clean_log()


def test_the_environ_is_complete_and_correct(serve) -> None:
    server = serve()
    with server.connect() as s:
        client_port = s.getsockname()[1]
        request = (
            b"POST /e%6Ev?x=1&y=%20 HTTP/1.1\r\nHost: example.org:81\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 13\r\nX-Custom: one\r\n"
            b"x-custom: two\r\nCookie: a=1\r\nCookie: b=2\r\nX_Smuggled: evil\r\n\r\n"
            b"body of 13 b!" + get("/hello")
        )
        env_response, hello = exchange(s, request, count=2)
    env = json.loads(env_response.body)
    assert env["REQUEST_METHOD"] == "POST"
    assert env["PATH_INFO"] == "/env" and env["RAW_URI"] == "/e%6Ev?x=1&y=%20"
    assert env["SCRIPT_NAME"] == ""
    assert env["QUERY_STRING"] == "x=1&y=%20"
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert (env["SERVER_NAME"], env["SERVER_PORT"]) == ("127.0.0.1", str(server.port))
    assert (env["REMOTE_ADDR"], env["REMOTE_PORT"]) == ("127.0.0.1", str(client_port))
    assert env["HTTP_HOST"] == "example.org:81"
    assert (env["CONTENT_TYPE"], env["CONTENT_LENGTH"]) == ("text/plain", "13")
    assert env["HTTP_X_CUSTOM"] == "one, two"
    assert env["HTTP_COOKIE"] == "a=1; b=2"
    assert not any("SMUGGLED" in key for key in env), "names with _ are dropped"
    assert env["body"] == "body of 13 b!"
    assert env["wsgi.version"] == [1, 0] and env["wsgi.url_scheme"] == "http"
    assert env["wsgi.multiprocess"] is True and env["wsgi.multithread"] is False
    assert env["wsgi.input_terminated"] is True
    assert env["has_file_wrapper"] is True
    assert env["SERVER_SOFTWARE"] == "prefork-server"
    assert hello.body == b"hello"
    with server.connect() as s:  # absolute-form target: the authority is the host
        (r,) = exchange(s, b"GET http://elsewhere:8080/env?q HTTP/1.1\r\nHost: x\r\n\r\n")
        env = json.loads(r.body)
        assert (env["HTTP_HOST"], env["PATH_INFO"], env["QUERY_STRING"]) == (
            "elsewhere:8080", "/env", "q")  # fmt: skip
    server.assert_clean_log()


def test_unix_socket_bind(spawn, tmp_path: Path) -> None:
    path = tmp_path / "h.sock"
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), str(PROGRAMS)])}
    proc = spawn([*HTTP, "--bind", f"unix:{path}", "--workers", "1", "http_apps:app"],
                 cwd=REPO, env=env)  # fmt: skip
    proc.wait_output(r"listening on unix:")
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        (r,) = exchange(s, get("/env"))
    env_seen = json.loads(r.body)
    assert (env_seen["SERVER_NAME"], env_seen["SERVER_PORT"]) == ("localhost", "")
    assert env_seen["REMOTE_ADDR"] == ""


def test_handler_threads_serve_concurrently_and_say_so(serve) -> None:
    server = serve("--threads", "4", workers=1, app=None)
    started = time.monotonic()
    sockets = [server.connect() for _ in range(4)]
    for s in sockets:
        s.sendall(get("/sleep?ms=600", "Connection: close"))
    for s in sockets:
        r = read_response(s.makefile("rb"))
        assert (r.status, r.body) == (200, b"slept 600 ms\n")
        s.close()
    assert time.monotonic() - started < 2.2, "four sleeps side by side, not one by one"
    threaded = serve("--threads", "2", workers=1)
    assert json.loads(threaded.get("/env")[2])["wsgi.multithread"] is True
    server.assert_clean_log()
    threaded.assert_clean_log()


def test_handler_threads_answer_every_keep_alive_request_while_clients_wait(serve) -> None:
    # Each response on a kept connection asks whether clients wait in the accept queue;
    # handler threads asking at the same moment once shared one poll object, which
    # raises "concurrent poll() invocation": a 500 for the request.
    server = serve("--threads", "4", workers=1)
    statuses: list[int] = []

    def client() -> None:
        for _ in range(20):  # reconnects whenever the server turns the connection over
            conn = server.client()
            try:
                for _ in range(25):
                    conn.request("GET", "/hello")
                    response = conn.getresponse()
                    response.read()
                    statuses.append(response.status)
                    if response.will_close:
                        break
            finally:
                conn.close()

    threads = [threading.Thread(target=client) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(statuses) >= 12 * 20 and set(statuses) == {200}, sorted(set(statuses))
    server.assert_workers_unchanged()
    server.assert_clean_log()


# -- the access log --------------------------------------------------------------------------


def test_access_log_in_common_log_format_and_its_switch(serve) -> None:
    server = serve(workers=1)
    server.get("/hello?a=1")
    with server.connect() as s:
        exchange(s, b"NOT HTTP AT ALL\r\n\r\n")
    server.proc.wait_output(r'"GET /hello\?a=1 HTTP/1\.1" 200 5 ')
    (m,) = [m for m in CLF.finditer(server.output()) if m["line"] == "GET /hello?a=1 HTTP/1.1"]
    assert (m["status"], m["size"]) == ("200", "5") and float(m["duration"]) < 5
    server.proc.wait_output(r'\] "-" 400 - ')

    quiet = serve("--no-access-log", workers=1)
    quiet.get("/hello")
    with quiet.connect() as s:
        exchange(s, b"NOT HTTP AT ALL\r\n\r\n")
    quiet.proc.wait_output(r"INFO 400 for 127\.0\.0\.1")  # still logged, as an event
    assert not CLF.search(quiet.output()), quiet.output()


# -- real clients and a real framework ------------------------------------------------------


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl(serve, tmp_path: Path) -> None:
    server = serve(app=None)
    base = f"http://127.0.0.1:{server.port}"

    def curl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["curl", "-sS", "--max-time", "20", *args], capture_output=True,
                              text=True, timeout=30, check=True)  # fmt: skip

    both = curl("-v", f"{base}/", f"{base}/sleep?ms=1")
    assert both.stdout == "Hello, world!\nslept 1 ms\n"
    assert re.search(r"Re-?using existing connection", both.stderr), both.stderr
    head = curl("-I", f"{base}/")
    assert "HTTP/1.1 200 OK" in head.stdout and "Content-Length: 14" in head.stdout
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(300_000))
    up = subprocess.run(["curl", "-sS", "--max-time", "20", "-H", "Transfer-Encoding: chunked",
                         "--data-binary", f"@{data}", f"{base}/echo"],
                        capture_output=True, timeout=30, check=True)  # fmt: skip
    assert up.stdout == data.read_bytes()
    cont = curl("-v", "-H", "Expect: 100-continue", "--data-binary", f"@{data}",
                "-o", os.devnull, f"{base}/echo")  # fmt: skip
    assert "HTTP/1.1 100 Continue" in cont.stderr and "HTTP/1.1 200 OK" in cont.stderr
    server.assert_clean_log()


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
@pytest.mark.parametrize("close", [False, True], ids=["keep-alive", "connection-close"])
def test_wrk_smoke(serve, close: bool) -> None:
    server = serve("--no-access-log", app=None)
    extra = ["-H", "Connection: close"] if close else []
    out = subprocess.run(
        ["wrk", "-t2", "-c20", "-d2s", "--timeout", "5s", *extra, f"http://127.0.0.1:{server.port}/"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert "Socket errors" not in out, out  # connect/read/write errors and timeouts
    assert "Non-2xx" not in out, out
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    assert requests > 200, out
    server.assert_workers_unchanged()
    server.assert_clean_log()


def test_a_flask_app_end_to_end(serve) -> None:
    pytest.importorskip("flask")
    server = serve(app="http_flask_app:app")
    conn = server.client()
    conn.request("GET", "/")
    assert conn.getresponse().read() == b"flask says hi"
    conn.request("GET", "/greet/ana?lang=pt")
    r = conn.getresponse()
    assert r.getheader("Content-Type") == "application/json"
    assert json.loads(r.read()) == {"hello": "ana", "lang": "pt"}
    conn.request("POST", "/sum", body=json.dumps([1, 2, 3.5]),
                 headers={"Content-Type": "application/json"})  # fmt: skip
    assert json.loads(conn.getresponse().read()) == {"sum": 6.5, "count": 3}
    payload = b"DATA" + os.urandom(200_000)
    conn.request("POST", "/upload", body=iter([payload[:70000], payload[70000:]]),
                 encode_chunked=True, headers={"Transfer-Encoding": "chunked"})  # fmt: skip
    assert json.loads(conn.getresponse().read()) == {"size": len(payload), "first": "DATA"}
    conn.request("GET", "/stream")
    r = conn.getresponse()
    assert r.getheader("Transfer-Encoding") == "chunked"
    assert r.read() == b"0\n1\n2\n3\n4\n"
    conn.request("GET", "/missing")
    r = conn.getresponse()
    assert r.status == 404 and b"Not Found" in r.read()
    conn.close()
    server.assert_clean_log()


# -- the command line ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-body-bytes", "-1"], r"max_body_bytes must be an integer >= 0"),
        (["--max-header-bytes", "10"], r"max_header_bytes must be >= 64"),
        (["--read-timeout", "0"], r"read_timeout must be > 0"),
        (["--keepalive-timeout", "-1"], r"keepalive_timeout must be a number >= 0"),
        (["nosuchmodule:app"], r"cannot load 'nosuchmodule:app'"),
        (["http_apps:CLOSED"], r"is not a WSGI application"),
    ],
)
def test_bad_http_options_exit_2(spawn, args: list[str], message: str) -> None:
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), str(PROGRAMS)])}
    proc = spawn([*HTTP, "--bind", "127.0.0.1:0", *args], cwd=REPO, env=env)
    assert proc.wait() == 2
    assert re.search(message, proc.output()), proc.output()
    assert "Traceback" not in proc.output()


def test_help_lists_the_http_options(spawn) -> None:
    proc = spawn([*HTTP, "--help"], cwd=REPO)
    assert proc.wait() == 0
    for option in ("--max-header-bytes", "--max-body-bytes", "--read-timeout",
                   "--keepalive-timeout", "--no-access-log", "--workers", "--timeout",
                   "--pid-file", "--daemon", "--name"):  # fmt: skip
        assert option in proc.output()


# -- the pieces, without a server: h11 is the judge of what we write ------------------------


def parse_with_h11(data: bytes, method: bytes = b"GET") -> tuple[h11.Response, bytes, bool]:
    """(response, body, complete) as an h11 client reads ``data``."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(data)
    client.receive_data(b"")
    response = None
    body = b""
    while True:
        event = client.next_event()
        if isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            assert response is not None
            return response, body, isinstance(event, h11.EndOfMessage)
        else:
            raise AssertionError(event)


def head_for(status: str = "200 OK", headers: list[tuple[str, str]] | None = None,
             **kwargs: Any) -> tuple[bytes, int, int, bool]:  # fmt: skip
    options: dict[str, Any] = {"body_length": -1, "head_request": False, "http11": True,
                               "keep_alive": True, "date": "D", "server": "S"}  # fmt: skip
    options.update(kwargs)
    return build_head(status, headers if headers is not None else [], **options)


@pytest.mark.parametrize(
    ("status", "headers", "kwargs", "framing", "keep"),
    [
        ("200 OK", [("Content-Length", "5")], {}, LENGTH, True),
        ("200 OK", [], {"body_length": 5}, LENGTH, True),
        ("200 OK", [], {}, CHUNKED, True),
        ("200 OK", [], {"http11": False}, UNTIL_CLOSE, False),
        ("200 OK", [], {"http11": False, "body_length": 3}, LENGTH, True),
        ("200 OK", [], {"head_request": True}, NO_BODY, True),
        ("204 No Content", [], {}, NO_BODY, True),
        ("304 Not Modified", [("Content-Length", "9")], {}, NO_BODY, True),
        ("200 OK", [("Connection", "close")], {}, CHUNKED, False),
        ("200 OK", [], {"keep_alive": False}, CHUNKED, False),
    ],
)
def test_framing_decisions(status, headers, kwargs, framing, keep) -> None:
    head, got_framing, _, got_keep = head_for(status, headers, **kwargs)
    assert (got_framing, got_keep) == (framing, keep)
    assert head.endswith(b"\r\n\r\n") and head.startswith(f"HTTP/1.1 {status}\r\n".encode())
    assert (b"\r\nConnection: close\r\n" in head) is (not keep)
    if framing == NO_BODY and status[:3] in ("204", "304"):
        assert b"Transfer-Encoding" not in head
    if framing == CHUNKED:
        assert b"\r\nTransfer-Encoding: chunked\r\n" in head


def test_hop_by_hop_headers_are_dropped_and_date_server_kept_once() -> None:
    head, *_ = head_for(headers=[("Transfer-Encoding", "gzip"), ("Keep-Alive", "x"),
                                 ("Date", "Mine"), ("Server", "Mine")], body_length=0)  # fmt: skip
    text = head.decode()
    assert "gzip" not in text and "Keep-Alive" not in text
    assert text.count("Date:") == 1 and "Date: Mine" in text
    assert text.count("Server:") == 1 and "Server: Mine" in text


def test_a_head_served_from_the_cache_is_the_head_built_anew() -> None:
    headers = [("Content-Type", "text/plain"), ("Content-Length", "5")]
    first = head_for(headers=headers, date="Mon, 01 Jan 2001 00:00:00 GMT")
    again = head_for(headers=list(headers), date="Tue, 02 Jan 2001 00:00:00 GMT")
    assert again == (first[0].replace(b"Mon, 01", b"Tue, 02"), *first[1:]), "a fresh Date"
    assert b"Date: Tue, 02 Jan 2001 00:00:00 GMT\r\n" in again[0]
    assert head_for(headers=iter(headers)) == head_for(headers=headers), "any iterable"
    listed = head_for(headers=[["Content-Length", "5"]])  # lists, not tuples: not cached
    assert listed == head_for(headers=[("Content-Length", "5")])
    assert b"Connection: close" in head_for(headers=headers, keep_alive=False)[0]
    assert b"Connection: close" not in head_for(headers=headers)[0], "keep_alive is in the key"
    mine = head_for(headers=[("Date", "Mine")], date="D2")[0]
    assert b"Date: Mine\r\n" in mine and b"D2" not in mine
    with pytest.raises(ResponseError):  # an invalid head is never cached as valid
        head_for(headers=[("X", "a\nb")])
    with pytest.raises(ResponseError):
        head_for(headers=[("X", "a\nb")])


@pytest.mark.parametrize(
    ("status", "headers"),
    [
        ("200", []),
        ("101 Switching Protocols", []),
        ("100 Continue", []),
        ("2000 OK", []),
        ("abc OK", []),
        ("200 OK\r\nX: y", []),
        ("200 OK", [("Bad Name", "v")]),
        ("200 OK", [("X", "a\nb")]),
        ("200 OK", [("X", "a\rb")]),
        ("200 OK", [("X", "\x00")]),
        ("200 OK", [("X", "\u20ac")]),
        ("200 OK", [("Content-Length", "-1")]),
        ("200 OK", [("Content-Length", "1"), ("Content-Length", "2")]),
        ("200 OK", [(b"X", "bytes name")]),
        ("200 OK", [("X",)]),
    ],
)
def test_invalid_status_or_headers_are_refused(status, headers) -> None:
    with pytest.raises(ResponseError):
        head_for(status, headers)


try:  # not in the test extra: the property test runs where hypothesis is installed
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None  # type: ignore[assignment]


def check_written_response_with_h11(
    code: int, headers: list[tuple[str, str]], body: list[bytes], declare: bool, http11: bool
) -> None:
    headers = [(n, v) for n, v in headers if n.lower() not in
               ("content-length", "transfer-encoding", "connection", "keep-alive", "te",
                "trailer", "upgrade", "proxy-connection")]  # fmt: skip
    data = b"".join(body)
    if declare:
        headers.append(("Content-Length", str(len(data))))
    head, framing, length, keep = head_for(f"{code} Whatever", headers, http11=http11)
    if framing == CHUNKED:
        wire = head + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in body if p) + b"0\r\n\r\n"
    else:
        wire = head + data
    response, got, complete = parse_with_h11(wire)
    assert response.status_code == code and got == data
    assert complete or framing == UNTIL_CLOSE
    sent = {(n.lower(), v) for n, v in response.headers}
    for name, value in headers:
        assert (name.lower().encode(), value.encode()) in sent


if given is not None:
    _names = st.from_regex(r"\A[A-Za-z][A-Za-z0-9-]{0,15}\Z")
    _values = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40).map(
        str.strip
    )

    @settings(max_examples=150, deadline=None)
    @given(
        code=st.sampled_from([200, 201, 202, 203, 206, 404, 500]),
        headers=st.lists(st.tuples(_names, _values), max_size=6),
        body=st.lists(st.binary(max_size=50), max_size=5),
        declare=st.booleans(),
        http11=st.booleans(),
    )
    def test_what_we_write_is_what_h11_reads(code, headers, body, declare, http11) -> None:
        check_written_response_with_h11(code, headers, body, declare, http11)

else:  # pragma: no cover

    def test_what_we_write_is_what_h11_reads() -> None:
        pytest.skip("hypothesis is not installed")


@pytest.mark.parametrize("declare", [False, True])
@pytest.mark.parametrize("http11", [False, True])
def test_what_we_write_is_what_h11_reads_for_fixed_cases(declare: bool, http11: bool) -> None:
    check_written_response_with_h11(
        201, [("X-A", "1"), ("x-b", ""), ("Set-Cookie", "a=b; Path=/")],
        [b"", b"abc", b"\r\n0\r\n\r\n"], declare, http11,
    )  # fmt: skip


def test_error_responses_are_complete_http() -> None:
    response, body, complete = parse_with_h11(error_response(431, "S", 0.0))
    assert response.status_code == 431 and complete
    assert body == b"431 Request Header Fields Too Large\n"
    assert (b"connection", b"close") in list(response.headers)


def _stream(pieces: list[bytes]) -> InputStream:
    source: Iterator[bytes] = iter([*pieces, b""])
    return InputStream(lambda: next(source))


@pytest.mark.parametrize("split", ["whole", "bytes", "uneven"])
def test_input_stream_reads_exactly_the_body(split: str) -> None:
    body = b"line one\nline two\n\nlast"
    if split == "whole":
        pieces = [body]
    elif split == "bytes":
        pieces = [bytes([b]) for b in body]
    else:
        pieces = [body[:3], body[3:11], body[11:]]
    assert _stream(pieces).read() == body
    assert _stream(pieces).read(None) == body
    s = _stream(pieces)
    assert s.read(4) + s.read(0) + s.read(6) + s.read(100) == body
    assert s.read(1) == b"" and s.read() == b"" and s.drained()
    assert list(_stream(pieces)) == [b"line one\n", b"line two\n", b"\n", b"last"]
    assert _stream(pieces).readlines() == [b"line one\n", b"line two\n", b"\n", b"last"]
    s = _stream(pieces)
    assert s.readline(4) == b"line" and s.readline() == b" one\n" and s.readline(0) == b""
    s = _stream(pieces)
    assert b"".join(iter(lambda: s.read1(5), b"")) == body


def test_request_environ_maps_headers_and_target() -> None:
    base = base_environ(("0.0.0.0", 80), "S")
    env = request_environ(
        base, new_key_cache(), b"GET", b"/a%20b?q=%20", b"1.0",
        [(b"Host", b"h"), (b"Content-Type", b"t"), (b"X-A", b"1"), (b"x-a", b"2"),
         (b"Under_Score", b"u")],
        _stream([]),
    )  # fmt: skip
    assert env["PATH_INFO"] == "/a b" and env["QUERY_STRING"] == "q=%20"
    assert env["SERVER_PROTOCOL"] == "HTTP/1.0" and env["CONTENT_TYPE"] == "t"
    assert env["HTTP_X_A"] == "1, 2" and "HTTP_UNDER_SCORE" not in env
    assert "HTTP_CONTENT_TYPE" not in env and base.get("PATH_INFO") is None


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="read_timeout"):
        HTTPSettings(read_timeout=0)
    with pytest.raises(ValueError, match="max_body_bytes"):
        HTTPSettings(max_body_bytes=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="server_software"):
        HTTPSettings(server_software="a\r\nb")
    with pytest.raises(TypeError):
        make_handler("not an app")  # type: ignore[arg-type]


def test_a_handler_keeps_few_enough_fields_in_its_dict_to_share_their_names() -> None:
    # CPython shares one table of attribute names between the instances of a class up to
    # 30 names; past it, each handler's __dict__ becomes a table of its own on every
    # connection. The per-request fields are slots so that the rest stays under that.
    # Served under a plain socketserver, which the handler supports too.
    import socketserver

    seen: list[dict[str, Any]] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    class Recording(make_handler(app)):  # type: ignore[misc]
        def finish(self) -> None:
            seen.append(dict(vars(self)))
            super().finish()

    with socketserver.TCPServer(("127.0.0.1", 0), Recording) as server:
        server.timeout = 10  # handle_request() returns even if the client never connects
        thread = threading.Thread(target=server.handle_request)
        thread.start()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
            for i in range(3):  # keep-alive, then close: both paths set their fields
                close = {"Connection": "close"} if i == 2 else {}
                conn.request("POST", "/", body=b"x" * i, headers=close)
                response = conn.getresponse()
                assert (response.status, response.read()) == (200, b"ok")
            conn.close()
        finally:
            thread.join(10)
    assert len(seen) == 1
    assert 0 < len(seen[0]) < 30, sorted(seen[0])
    assert "_status" not in seen[0] and "request" not in seen[0], "slots, not in the dict"
