"""A bounded load client of the project's own, for tests that apply a fault under load.

Each of ``concurrency`` threads opens a connection, sends one message, reads its echo
and closes, again and again, until stopped. Every request ends in exactly one of:
answered (the right bytes came back), refused (the connect was refused: nobody
listening), or failed (anything else, with the reason kept).
"""

from __future__ import annotations

import collections
import os
import socket
import threading
import time
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    sent: int = 0
    answered: int = 0
    refused: int = 0
    failed: int = 0
    reasons: collections.Counter[str] = field(default_factory=collections.Counter)

    def __str__(self) -> str:
        why = ", ".join(f"{k}: {n}" for k, n in self.reasons.most_common()) or "-"
        return (
            f"sent {self.sent}, answered {self.answered}, failed {self.failed}, "
            f"refused {self.refused} (reasons: {why})"
        )


class EchoLoad:
    """``with EchoLoad(address) as load: ...``; ``load.result`` once the block ends.

    Bounded: it stops at the end of the block, or after ``max_seconds`` whatever happens.
    Loopback only: the address must be 127.0.0.1, ::1 or a Unix socket path.
    """

    def __init__(
        self,
        address: tuple[str, int] | str,
        concurrency: int = 8,
        max_seconds: float = 60.0,
        timeout: float = 10.0,
    ) -> None:
        if isinstance(address, tuple):
            assert address[0] in ("127.0.0.1", "::1"), "load tests stay on loopback"
        self.address = address
        self.concurrency = concurrency
        self.max_seconds = max_seconds
        self.timeout = timeout
        self.result = LoadResult()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> EchoLoad:
        self._deadline = time.monotonic() + self.max_seconds
        for i in range(self.concurrency):
            t = threading.Thread(target=self._run, args=(i,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 5)

    def wait_answered(self, count: int, timeout: float = 10.0) -> None:
        """Block until at least ``count`` more requests have been answered."""
        target = self.result.answered + count
        deadline = time.monotonic() + timeout
        while self.result.answered < target:
            if time.monotonic() > deadline:
                raise AssertionError(f"load stalled: {self.result}")
            time.sleep(0.01)

    def _family(self) -> int:
        if isinstance(self.address, str):
            return socket.AF_UNIX
        return socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET

    def _run(self, index: int) -> None:
        n = 0
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            n += 1
            message = f"{index}:{n}:".encode() + os.urandom(16).hex().encode() + b"\n"
            outcome = self._one(message)
            with self._lock:
                self.result.sent += 1
                if outcome == "answered":
                    self.result.answered += 1
                elif outcome == "refused":
                    self.result.refused += 1
                else:
                    self.result.failed += 1
                    self.result.reasons[outcome] += 1

    def _one(self, message: bytes) -> str:
        try:
            with socket.socket(self._family(), socket.SOCK_STREAM) as s:
                s.settimeout(self.timeout)
                try:
                    s.connect(self.address)
                except ConnectionRefusedError:
                    return "refused"
                s.sendall(message)
                got = b""
                while len(got) < len(message):
                    chunk = s.recv(len(message) - len(got))
                    if not chunk:
                        return "closed before the answer"
                    got += chunk
                return "answered" if got == message else "wrong answer"
        except OSError as e:
            return type(e).__name__
