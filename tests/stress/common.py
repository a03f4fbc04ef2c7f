"""What the stress scenarios share: starting the echo example, reading /proc, reporting."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from conftest import REPO, Proc, is_alive, wait_for, wait_workers
from load import LoadResult

ECHO = [sys.executable, "-m", "examples.echo"]
CLI = [sys.executable, "-m", "prefork_server.cli"]
HTTP = [sys.executable, "-m", "examples.http"]
HELLO = b"Hello, world!\n"  # what the HTTP example's demo application answers on /

# A handler module for tests to write into their directory: the echo example, except that
# a message starting with "hang" hangs the handler without a heartbeat.
STUCK = """\
import time

from examples.echo import EchoHandler


class Stuck(EchoHandler):
    \"\"\"The echo example, except that a message starting with "hang" hangs the handler
    without a heartbeat.\"\"\"

    def handle(self):
        data = self.request.recv(65536)
        if data.startswith(b"hang"):
            time.sleep(3600)
        self.request.sendall(data)
        super().handle()
"""


def report(scenario: str, result: LoadResult | None = None, **figures: object) -> str:
    """Print the scenario's figures on one ``STRESS key=value ...`` line; return it."""
    parts = [f"scenario={scenario}"]
    if result is not None:
        parts += [
            f"sent={result.sent}",
            f"answered={result.answered}",
            f"failed={result.failed}",
            f"refused={result.refused}",
        ]
        for name in ("unaccepted", "aborted", "reconnects"):
            if getattr(result, name):
                parts.append(f"{name}={getattr(result, name)}")
        parts.append(f"why={result.why()}")
    for key, value in figures.items():
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        parts.append(f"{key}={text.replace(' ', '_')}")
    line = "STRESS " + " ".join(parts)
    print(f"\n{line}", flush=True)
    return line


def start_echo(
    spawn: Callable[..., Proc],
    *args: str,
    workers: int = 4,
    bind: str = "127.0.0.1:0",
    cwd: Path = REPO,
) -> tuple[Proc, tuple[str, int], list[int]]:
    """``python -m examples.echo`` on a loopback port (a free one by default);
    (proc, address, worker pids). For a ``unix:PATH`` bind the address is the path."""
    proc = spawn([*ECHO, "--bind", bind, "--workers", str(workers), *args], cwd=cwd)
    if bind.startswith("unix:"):
        proc.wait_output("listening on unix:")
        return proc, bind[len("unix:") :], wait_workers(proc.pid, workers)  # type: ignore[return-value]
    address = ("127.0.0.1", proc.port())
    return proc, address, wait_workers(proc.pid, workers)


def start_http(
    spawn: Callable[..., Proc], *args: str, workers: int = 2
) -> tuple[Proc, tuple[str, int], list[int]]:
    """``python -m examples.http`` (the demo application) on a free loopback port."""
    proc = spawn([*HTTP, "--bind", "127.0.0.1:0", "--workers", str(workers), *args], cwd=REPO)
    address = ("127.0.0.1", proc.port())
    return proc, address, wait_workers(proc.pid, workers)


def quit_and_wait(proc: Proc, timeout: float = 20.0) -> int:
    """QUIT the master and return its exit status."""
    proc.signal(signal.SIGQUIT)
    return proc.wait(timeout)


def ask(address: tuple[str, int] | str, data: bytes = b"hello\n", timeout: float = 10.0) -> bytes:
    """One echo request on a fresh connection; the answer (as many bytes as were sent)."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(address)
        s.sendall(data)
        got = b""
        while len(got) < len(data):
            chunk = s.recv(len(data) - len(got))
            if not chunk:
                break
            got += chunk
        return got


def fds(pid: int) -> dict[int, str]:
    """A process's open descriptors and what each refers to (readlink of /proc/PID/fd)."""
    out = {}
    for entry in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(entry)] = os.readlink(f"/proc/{pid}/fd/{entry}")
        except FileNotFoundError:
            pass  # closed while we looked
    return out


def proc_status(pid: int) -> dict[str, str]:
    """The fields of /proc/PID/status."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def rss_kib(pid: int) -> int:
    return int(proc_status(pid)["VmRSS"].split()[0])


def listening_ports() -> set[int]:
    """Every TCP port in the LISTEN state on this machine (IPv4 and IPv6)."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def connect_refused(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def wait_gone(pids: list[int], timeout: float, what: str) -> float:
    """Wait until none of ``pids`` runs; return how long that took."""
    start = time.monotonic()
    wait_for(lambda: not any(is_alive(p) for p in pids), timeout, interval=0.005, what=what)
    return time.monotonic() - start
