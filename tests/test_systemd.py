"""The systemd protocols, spoken for real: our own datagram socket plays systemd."""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import REPO, Proc, wait_workers

from prefork_server import systemd

APP = str(REPO / "tests" / "programs" / "engine_app.py")


class FakeSystemd:
    """A datagram socket that collects sd_notify messages."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address if not address.startswith("@") else "\0" + address[1:])
        self.address = address
        self.messages: list[str] = []

    def next(self, timeout: float = 10.0) -> str:
        self.sock.settimeout(timeout)
        message = self.sock.recv(4096).decode()
        self.messages.append(message)
        return message

    def wait_for(self, line: str, timeout: float = 10.0) -> str:
        while True:
            message = self.next(timeout)
            if line in message.splitlines():
                return message


@pytest.fixture(params=["path", "abstract"])
def fake_systemd(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FakeSystemd]:
    if request.param == "path":
        address = str(tmp_path / "notify.sock")
    else:
        address = f"@prefork-test-{os.getpid()}-{id(request)}"
    fake = FakeSystemd(address)
    yield fake
    fake.sock.close()


def test_the_master_reports_ready_reloading_and_stopping(
    spawn: Callable[..., Proc], tmp_path: Path, fake_systemd: FakeSystemd
) -> None:
    proc = spawn([sys.executable, APP, "--events", str(tmp_path / "ev"), "--workers", "2"],
                 env={"NOTIFY_SOCKET": fake_systemd.address})  # fmt: skip
    ready = fake_systemd.wait_for("READY=1")
    assert f"MAINPID={proc.pid}" in ready.splitlines()
    assert len(wait_workers(proc.pid, 2)) == 2, "READY comes once the workers are up"
    proc.signal(signal.SIGHUP)
    fake_systemd.wait_for("RELOADING=1")
    fake_systemd.wait_for("READY=1")
    proc.signal(signal.SIGQUIT)
    fake_systemd.wait_for("STOPPING=1")
    assert proc.wait() == 0


def test_notify_without_a_socket_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False


def test_listen_fds_only_for_the_named_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_FDS", "2")
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    assert systemd.listen_fds() == []
    assert "LISTEN_FDS" not in os.environ, "the variables are consumed"
    monkeypatch.setenv("LISTEN_FDS", "nonsense")
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    assert systemd.listen_fds() == []
