"""The ``prefork-server`` command: serve a ``socketserver`` handler with pre-forked workers.

::

    prefork-server --bind 127.0.0.1:9000 --workers 4 examples.echo:EchoHandler

The examples reuse :func:`build_parser` and :func:`serve` so that every program of the
project takes the same options.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import socket
import socketserver
import sys
from collections.abc import Sequence
from typing import Any

from .daemon import PidFileError
from .engine import LOG_FORMAT, default_logger
from .master import BootError
from .server import PreforkTCPServer, PreforkUnixStreamServer
from .sockets import BindAddress, parse_bind

__all__ = ["build_parser", "load_target", "main", "serve"]

SIGNALS_HELP = """\
signals (send them to the master's pid):
  QUIT       graceful stop: workers finish their current connection, then exit;
             after --graceful-timeout the rest are killed
  TERM, INT  immediate stop
  WINCH      stop all workers, keep the master (ignored in a terminal's foreground,
             where a window resize sends it)
  TTIN       one worker more
  TTOU       one worker fewer
  USR1       reopen the log files (after logrotate)
  HUP        replace every worker with a fresh one, gracefully

a worker silent for longer than --timeout is killed (SIGKILL) and replaced.
"""


def build_parser(
    prog: str | None = None,
    description: str | None = None,
    target_help: str | None = None,
    default_bind: str = "127.0.0.1:9000",
) -> argparse.ArgumentParser:
    """The options every program of the project shares; add yours before parsing."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description
        or "Serve a socketserver request handler with pre-forked worker processes.",
        epilog=SIGNALS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if target_help is not None:
        parser.add_argument(
            "target", nargs="?" if "default" in target_help else None, help=target_help
        )
    parser.add_argument(
        "--bind",
        "-b",
        default=default_bind,
        metavar="ADDRESS",
        help="HOST:PORT, [IPV6]:PORT, :PORT (all interfaces) or unix:PATH "
        f"(default {default_bind})",
    )
    parser.add_argument(
        "--workers", "-w", type=int, default=10, help="number of worker processes (default 10)"
    )
    parser.add_argument(
        "--timeout",
        "-t",
        type=float,
        default=5.0,
        help="seconds a worker may go without a heartbeat before it is "
        "killed and replaced (default 5)",
    )
    parser.add_argument(
        "--graceful-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how long QUIT waits for workers before killing them (default: --timeout)",
    )
    parser.add_argument(
        "--name",
        default=None,
        metavar="APP_NAME",
        help="name in process titles, log lines and default file names",
    )
    parser.add_argument(
        "--pid-file",
        default=None,
        metavar="PATH",
        help="write the master's pid here (default with --daemon: "
        "./APP_NAME.pid; none in the foreground)",
    )
    parser.add_argument(
        "--daemon",
        "-D",
        action="store_true",
        help="detach and run in the background (log to ./APP_NAME.log)",
    )
    parser.add_argument(
        "--log-file",
        default=None,
        metavar="PATH",
        help="write the log here (default: stderr; with --daemon ./APP_NAME.log)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level (default info)",
    )
    return parser


def load_target(spec: str) -> Any:
    """Import ``module:attribute`` (``module.attr`` inside the attribute is followed)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"target must be module:attribute, not {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does, so local modules import
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def server_class_for(address: BindAddress, base: type[Any] = PreforkTCPServer) -> type[Any]:
    if address.family == socket.AF_UNIX:
        return PreforkUnixStreamServer
    if address.family == socket.AF_INET6:
        return type("PreforkTCP6Server", (base,), {"address_family": socket.AF_INET6})
    return base


def serve(
    args: argparse.Namespace,
    handler: type[socketserver.BaseRequestHandler],
    server_class: type[Any] | None = None,
    **settings: Any,
) -> int:
    """Bind ``args.bind``, then serve in the foreground or as a daemon. Returns an exit
    status; errors are printed, not raised."""
    default_name = settings.pop("app_name", None)  # always popped: app_name=name below
    name = args.name or default_name or "prefork_server"
    try:
        address = parse_bind(args.bind)
        logger = _logger(name, args)
        cls = server_class or server_class_for(address)
        server = cls(
            address.address,
            handler,
            workers=args.workers,
            timeout=args.timeout,
            graceful_timeout=args.graceful_timeout,
            app_name=name,
            pid_path=args.pid_file,
            logger=logger,
            **settings,
        )
    except (ValueError, OSError) as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 2
    with server:
        host = _describe(server, address)
        try:
            if args.daemon:
                pid = server.start()
                print(f"{name}: master pid {pid} serving on {host}")
            else:
                logger.info("listening on %s", host)
                server.serve_forever()
        except (PidFileError, BootError, RuntimeError) as e:
            print(f"{name}: {e}", file=sys.stderr)
            return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(
        prog="prefork-server",
        target_help="module:HandlerClass, a "
        "socketserver.BaseRequestHandler subclass (for example "
        "examples.echo:EchoHandler)",
    )
    args = parser.parse_args(argv)
    try:
        handler = load_target(args.target)
    except (ImportError, AttributeError, ValueError) as e:
        parser.error(f"cannot load {args.target!r}: {e}")
    if not (isinstance(handler, type) and issubclass(handler, socketserver.BaseRequestHandler)):
        parser.error(f"{args.target!r} is not a socketserver.BaseRequestHandler subclass")
    return serve(args, handler)


def _logger(name: str, args: argparse.Namespace) -> logging.Logger:
    level = getattr(logging, args.log_level.upper())
    log_path = args.log_file or (f"{name}.log" if args.daemon else None)
    if log_path is None:
        logger = default_logger(name)
    else:
        logger = logging.getLogger(f"prefork_server.{name}")
        handler = logging.FileHandler(os.path.abspath(log_path))
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)
    return logger


def _describe(server: Any, address: BindAddress) -> str:
    if address.family == socket.AF_UNIX:
        return f"unix:{server.server_address}"
    host, port = server.server_address[:2]
    return f"[{host}]:{port}" if address.family == socket.AF_INET6 else f"{host}:{port}"


if __name__ == "__main__":
    sys.exit(main())
