"""Scenario 5, hostile input: property-based fuzzing (hypothesis) of the HTTP example
over a real socket. Requests are generated well-formed, then mutated (bytes inserted,
replaced by NUL, CR, LF and the like, deleted, repeated; truncated; huge headers; bad
chunk sizes; bad Content-Lengths), followed by a pipelined request or garbage, and sent in
random pieces before a half-close. Every answer must read, with h11 as the client, as zero
or more complete HTTP responses followed by a clean close (the last one may be cut short
only if it was streamed while the application read a request body that h11 finds
malformed or truncated: the response had begun, and closing is how HTTP says it failed);
a request that h11 (as the server) reads whole or finds malformed must get at least one
response; no answer is a 500; no worker dies; the next good request is answered; nothing
is logged as an error.

The inputs are derandomized: every run sends the same ones, so CI cannot flake on a new
draw; raise ``EXAMPLES`` (or drop ``derandomize``) to explore further.
"""

from __future__ import annotations

import socket
import time

import pytest

from .common import HELLO, quit_and_wait, report, start_http

hypothesis = pytest.importorskip("hypothesis")
h11 = pytest.importorskip("h11")
st = hypothesis.strategies

pytestmark = pytest.mark.stress

METHODS = [b"GET", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"]
# Not /sleep: a mutated ms=... could ask the application itself to hang.
TARGETS = [b"/", b"/echo", b"/missing", b"/?a=b&c", b"*", b"http://x/echo", b"/%00%ff"]
TOKEN = st.text("abcdefghijklmnopqrstuvwxyz-ABCXYZ0123456789!#$%&'*+.^_`|~", min_size=1,
                max_size=12).map(str.encode)  # fmt: skip
VALUE = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


EXAMPLES = 600


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """A well-formed request (or close to one) with a random body and framing."""
    method = draw(st.sampled_from(METHODS))
    target = draw(st.sampled_from(TARGETS))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
    headers = [b"Host: fuzz"]
    headers += [name + b": " + value for name, value in draw(st.lists(st.tuples(TOKEN, VALUE),
                                                                       max_size=4))]  # fmt: skip
    body = draw(st.binary(max_size=300))
    framing = draw(st.sampled_from(["length", "chunked", "none"]))
    if framing == "length":
        headers.append(b"Content-Length: %d" % len(body))
    elif framing == "chunked":
        headers.append(b"Transfer-Encoding: chunked")
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True) if b > a]
        body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    else:
        body = b""
    if draw(st.booleans()):
        headers.append(draw(st.sampled_from([b"Connection: close", b"Connection: keep-alive",
                                             b"Expect: 100-continue"])))  # fmt: skip
    return (
        b" ".join([method, target, version]) + b"\r\n" + b"\r\n".join(headers) + b"\r\n\r\n" + body
    )


@st.composite
def mutations(draw: st.DrawFn, raw: bytes) -> bytes:
    """``raw`` with 0 to 3 mutations of the kinds that break parsers."""
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(raw)))
        kind = draw(st.sampled_from(["insert", "replace", "delete", "repeat", "truncate",
                                     "huge header", "chunk size", "length"]))  # fmt: skip
        if kind == "insert":
            raw = raw[:at] + draw(st.binary(min_size=1, max_size=16)) + raw[at:]
        elif kind == "replace" and at < len(raw):
            byte = draw(st.sampled_from([b"\x00", b"\r", b"\n", b" ", b":", b"\t", b"\x7f",
                                         b"\xff", b"\x80"]))  # fmt: skip
            raw = raw[:at] + byte + raw[at + 1 :]
        elif kind == "delete":
            raw = raw[:at] + raw[at + draw(st.integers(1, 16)) :]
        elif kind == "repeat":
            raw = raw[:at] + raw[at : at + 32] * draw(st.integers(2, 50)) + raw[at:]
        elif kind == "truncate":
            raw = raw[:at]
        elif kind == "huge header":
            size = draw(st.sampled_from([1000, 16_000, 17_000, 100_000]))
            line_end = raw.find(b"\r\n") + 2 if b"\r\n" in raw else 0
            raw = raw[:line_end] + b"X-Huge: " + b"h" * size + b"\r\n" + raw[line_end:]
        elif kind == "chunk size":
            bad = draw(st.sampled_from([b"zz", b"-1", b"f" * 40, b"1;" + b"x" * 200, b"", b" 5"]))
            raw = raw.replace(b"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\n\r\n" + bad
                              + b"\r\nabc\r\n0\r\n\r\n", 1)  # fmt: skip
        elif kind == "length":
            value = draw(st.sampled_from([b"-1", b"99999999999999999999", b"1, 2", b"0x10",
                                          b"100"]))  # fmt: skip
            raw = raw.replace(b"\r\n\r\n", b"\r\nContent-Length: " + value + b"\r\n\r\n", 1)
    return raw


@st.composite
def hostile(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    """One or two (pipelined) mutated requests, or garbage, and where to split the send."""
    data = draw(mutations(draw(requests())))
    follow = draw(st.sampled_from(["nothing", "request", "garbage"]))
    if follow == "request":
        data += draw(mutations(draw(requests())))
    elif follow == "garbage":
        data += draw(st.binary(min_size=1, max_size=200))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=3)))
    return data, cuts


def responses(data: bytes) -> tuple[list[int], bool]:
    """The status codes in what the server sent, read with h11 as the client, and whether
    the last response was cut short: zero or more complete responses, then the end of the
    connection, except that the connection may end inside the body of a streamed
    (chunked) last response. Raises AssertionError for anything else."""
    if not data:
        return [], False  # a clean close without a word
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(data)
    conn.receive_data(b"")
    statuses: list[int] = []
    streamed = False
    try:
        while True:
            if conn.our_state is h11.IDLE:
                # h11 reads a response only to a request it sent: a stand-in for ours.
                conn.send(h11.Request(method="GET", target="/", headers=[("Host", "fuzz")]))
                conn.send(h11.EndOfMessage())
            event = conn.next_event()
            if isinstance(event, h11.Response):
                statuses.append(event.status_code)
                streamed = (b"transfer-encoding", b"chunked") in list(event.headers)
            elif isinstance(event, h11.EndOfMessage):
                streamed = False
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    if not conn.trailing_data[0]:
                        return statuses, False  # the connection ended after a whole response
                    conn.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                return statuses, False
            elif event is h11.NEED_DATA:
                raise AssertionError("the connection ended inside a response")
    except h11.RemoteProtocolError as e:
        if streamed and "incomplete chunked read" in str(e):
            return statuses, True
        raise AssertionError(f"not well-formed HTTP ({e}): {data[:500]!r}") from None


def bad_body(data: bytes) -> bool:
    """Whether h11, as the server, finds a request in ``data`` whose head is fine but whose
    body is malformed or cut short by the end of the connection. An application that
    streams its answer while it reads the body (the demo's ``/echo`` with a chunked body)
    has begun its response by then: ending the connection is the only honest way left to
    say that the response is incomplete (RFC 9112, 7.1)."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16384)
    conn.receive_data(data)
    conn.receive_data(b"")
    in_body = False
    try:
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Request):
                in_body = True
            elif isinstance(event, h11.EndOfMessage):
                in_body = False
                conn.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
                conn.send(h11.EndOfMessage())
                conn.start_next_cycle()
            elif not isinstance(event, h11.Data):
                return False  # the end of the data, or a head that never completed
    except (h11.RemoteProtocolError, h11.LocalProtocolError):
        return in_body


def must_answer(data: bytes) -> bool:
    """Whether the server owes the client a response for ``data`` (followed by the end of
    the connection), judged by h11 as the server with our default head limit: yes if the
    first head is malformed before the end, or arrives whole with a body that is complete
    or malformed; no if the head is cut short, or the body is cut short by the end of the
    connection (the client left before it finished its request)."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16384)
    conn.receive_data(data)
    try:
        if not isinstance(conn.next_event(), h11.Request):
            return False  # the head is not complete before the end
    except h11.RemoteProtocolError:
        return True
    conn.receive_data(b"")
    try:
        while isinstance(conn.next_event(), h11.Data):
            pass
    except h11.RemoteProtocolError as e:
        return "without sending complete message body" not in str(e)
    return True


def test_hostile_input_gets_well_formed_answers_and_kills_no_worker(spawn) -> None:
    proc, address, pids = start_http(spawn, "--read-timeout", "2", workers=2)
    seen: dict[str, int] = {}

    def exchange(data: bytes, cuts: list[int]) -> bytes:
        got = bytearray()
        with socket.create_connection(address, timeout=10) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
                    s.sendall(data[a:b])
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the server answered and closed before we were done: allowed
            try:
                while chunk := s.recv(65536):
                    got += chunk
            except ConnectionResetError:
                pass  # after what we read: the data we sent past its error
        return bytes(got)

    @hypothesis.settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,  # the same inputs on every run: CI stays deterministic
        database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.given(hostile())
    def check(case: tuple[bytes, list[int]]) -> None:
        data, cuts = case
        statuses, cut = responses(exchange(data, cuts))
        assert statuses or not must_answer(data), f"no response to {data[:300]!r}"
        assert not cut or bad_body(data), f"a response cut short for {data[:300]!r}"
        assert 500 not in statuses, f"a server error for {data[:300]!r}"
        key = ",".join(map(str, statuses)) + ("-cut" if cut else "") or "closed"
        seen[key] = seen.get(key, 0) + 1
        assert proc.workers() == pids, f"a worker died on {data[:300]!r}"
        good = exchange(b"GET / HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\n\r\n", [])
        assert good.startswith(b"HTTP/1.1 200 ") and good.endswith(HELLO), good

    start = time.monotonic()
    check()
    took = time.monotonic() - start
    out = proc.output()
    common = sorted(seen.items(), key=lambda kv: -kv[1])[:8]
    report(
        "5-hostile-input",
        examples=sum(seen.values()),
        seconds=took,
        outcomes=";".join(f"{k}:{n}" for k, n in common),
        workers_unchanged=proc.workers() == pids,
    )
    assert "Traceback" not in out and " ERROR " not in out, out[-5000:]
    assert quit_and_wait(proc) == 0
