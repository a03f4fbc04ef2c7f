"""Listening addresses: parsing ``--bind`` values and preparing Unix socket paths."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from dataclasses import dataclass

__all__ = ["BindAddress", "parse_bind", "clear_stale_unix_socket"]


@dataclass(frozen=True)
class BindAddress:
    """A parsed ``--bind`` value: the socket family and the address ``bind()`` takes."""

    family: socket.AddressFamily
    address: tuple[str, int] | str

    def __str__(self) -> str:
        if isinstance(self.address, str):
            return f"unix:{self.address}"
        host, port = self.address
        return f"[{host}]:{port}" if self.family == socket.AF_INET6 else f"{host}:{port}"


def parse_bind(text: str) -> BindAddress:
    """Parse ``HOST:PORT``, ``[IPV6]:PORT``, ``:PORT`` (all IPv4 interfaces) or
    ``unix:PATH``. Raises ``ValueError`` naming the ``bind`` option."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"bind must be HOST:PORT, [IPV6]:PORT or unix:PATH, not {text!r}")
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise ValueError("bind: unix: needs a path, as in unix:/run/app.sock")
        return BindAddress(socket.AF_UNIX, path)
    family = socket.AF_INET
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"bind: {text!r} is not of the form [IPV6]:PORT")
        port_text = rest[1:]
        family = socket.AF_INET6
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"bind: {text!r} has no port (HOST:PORT)")
        if ":" in host:
            raise ValueError(f"bind: write IPv6 addresses in brackets, as in [{host}]:{port_text}")
        host = host or "0.0.0.0"
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"bind: port {port_text!r} in {text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"bind: port {port} in {text!r} is out of range 0-65535")
    return BindAddress(family, (host, port))


def clear_stale_unix_socket(path: str) -> None:
    """Remove a Unix socket file left by a dead server, so that ``bind()`` can succeed.

    Raises ``FileExistsError`` if ``path`` exists and is not a socket (we never delete a
    user's file), and ``OSError(EADDRINUSE)`` if a live server still accepts on it.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket; not removing it", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "a running server is listening on this socket", path)
