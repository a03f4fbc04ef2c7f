"""systemd integration, without a dependency: socket activation and sd_notify.

Socket activation: systemd binds the sockets of a ``.socket`` unit and starts the service
with them as descriptors 3, 4, ... and ``LISTEN_FDS=<count>``, ``LISTEN_PID=<our pid>``.
:func:`listen_fds` returns those descriptors (only when ``LISTEN_PID`` names this process,
so a child that inherited the environment does not take them).

Readiness: with ``Type=notify``, systemd waits for ``READY=1`` on the datagram socket
named by ``NOTIFY_SOCKET``. :func:`notify` sends such a message; it is a no-op when the
variable is not set. The protocol is one datagram of newline-separated ``KEY=value`` lines,
to a filesystem path or, when the name starts with ``@``, to an abstract socket.
"""

from __future__ import annotations

import contextlib
import os
import socket

__all__ = ["SD_LISTEN_FDS_START", "listen_fds", "notify"]

SD_LISTEN_FDS_START = 3


def listen_fds(unset_environment: bool = True) -> list[int]:
    """The descriptors systemd passed to this process, or [] if none were passed to us.

    With ``unset_environment`` the variables are removed, so that workers and re-executed
    masters do not mistake them for their own.
    """
    try:
        pid = int(os.environ.get("LISTEN_PID", ""))
        count = int(os.environ.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    finally:
        if unset_environment:
            for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
                os.environ.pop(name, None)
    if pid != os.getpid() or count <= 0:
        return []
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))
    for fd in fds:
        os.set_inheritable(fd, False)  # ours now; a re-exec hands them on explicitly
    return fds


def notify(*lines: str) -> bool:
    """Send ``lines`` (such as ``"READY=1"``) to systemd. True if a message was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    message = "\n".join(lines).encode()
    with contextlib.suppress(OSError):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message)
            return True
    return False
