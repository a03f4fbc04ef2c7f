"""Listening addresses: parsing ``--bind`` values and preparing Unix socket paths."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from dataclasses import dataclass

__all__ = [
    "BindAddress",
    "adopt_fd",
    "clear_stale_unix_socket",
    "inherited_address",
    "inherited_sockets",
    "parse_bind",
    "started_by_upgrade",
    "take_inherited_socket",
]


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


# -- sockets handed to us by a previous master (USR2) or by systemd ------------------------


class _Inherited:
    """The listening descriptors this process was started with, read once."""

    def __init__(self) -> None:
        self.loaded = False
        self.fds: list[int] = []
        self.from_upgrade = False

    def load(self) -> None:
        if self.loaded:
            return
        self.loaded = True
        from .systemd import listen_fds
        from .upgrade import FDS_ENV, FDS_PID_ENV

        names = os.environ.pop(FDS_ENV, "")
        owner = os.environ.pop(FDS_PID_ENV, "")
        if names and owner == str(os.getpid()):
            self.fds = [int(n) for n in names.split(",") if n.strip().isdigit()]
            self.from_upgrade = True
            for fd in self.fds:
                os.set_inheritable(fd, False)
        systemd_fds = listen_fds()
        self.fds += [fd for fd in systemd_fds if fd not in self.fds]


_inherited = _Inherited()


def started_by_upgrade() -> bool:
    """True in a master that a previous master exec'd for a zero-downtime upgrade."""
    _inherited.load()
    return _inherited.from_upgrade


def take_inherited_socket(
    family: int, type: int, address: object | None = None
) -> socket.socket | None:
    """Claim an inherited listening socket of this family and type, or None.

    With an ``address``, only a socket bound there matches, except that port 0 (any
    port) matches any port. A claimed socket is not offered again.
    """
    _inherited.load()
    for fd in list(_inherited.fds):
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            _inherited.fds.remove(fd)
            continue
        if (
            sock.family == family
            and sock.type == type
            and _same_address(family, sock.getsockname(), address)
        ):
            _inherited.fds.remove(fd)
            return sock
        sock.detach()  # not ours to close: another server may claim it
    return None


def inherited_address() -> BindAddress | None:
    """The address of the first inherited listening socket not claimed yet, or None.
    Claims nothing: the server that binds this address adopts the socket."""
    _inherited.load()
    for fd in _inherited.fds:
        with contextlib.suppress(OSError, ValueError):
            return _address_of(fd)
    return None


def _address_of(fd: int) -> BindAddress:
    sock = socket.socket(fileno=fd)
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        if sock.type != socket.SOCK_STREAM or not listening:
            raise ValueError(f"bind: fd://{fd} is not a listening stream socket")
        if sock.family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
            raise ValueError(f"bind: fd://{fd} has an unsupported family {sock.family!r}")
        family = socket.AddressFamily(sock.family)
        address = sock.getsockname()
    finally:
        sock.detach()
    if family == socket.AF_UNIX:
        return BindAddress(family, os.fsdecode(address))
    return BindAddress(family, (address[0], address[1]))


def adopt_fd(fd: int) -> BindAddress:
    """Offer the listening socket on descriptor ``fd`` (``--bind fd://N``) to the next
    server that binds its address; return that address. Raises ``ValueError`` if ``fd``
    is not a listening stream socket."""
    try:
        address = _address_of(fd)
    except OSError as e:
        raise ValueError(f"bind: fd://{fd} is not a socket ({e.strerror})") from None
    _inherited.load()
    if fd not in _inherited.fds:
        _inherited.fds.append(fd)
    os.set_inheritable(fd, False)  # the workers get it through the server, not by number
    return address


def inherited_sockets() -> list[socket.socket]:
    """Claim every inherited socket not claimed yet (for ``Preforker`` users who bind
    their own sockets: check this first, and bind only if it is empty)."""
    _inherited.load()
    socks = []
    for fd in _inherited.fds:
        with contextlib.suppress(OSError):
            socks.append(socket.socket(fileno=fd))
    _inherited.fds.clear()
    return socks


def _same_address(family: int, bound: object, wanted: object | None) -> bool:
    if wanted is None:
        return True
    if family == socket.AF_UNIX:
        return os.fsdecode(bound) == os.fsdecode(wanted)  # type: ignore[arg-type]
    if not isinstance(bound, tuple) or not isinstance(wanted, tuple):
        return False
    host, port = wanted[0], wanted[1]
    if port not in (0, bound[1]):
        return False
    try:
        resolved = {info[4][0] for info in socket.getaddrinfo(host, None, family)}
    except OSError:
        return False
    return bound[0] in resolved or host in ("", "0.0.0.0", "::") and bound[0] in ("0.0.0.0", "::")
