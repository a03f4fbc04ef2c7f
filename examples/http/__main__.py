"""``python -m examples.http [options] [module:app]``: serve a WSGI application over HTTP/1.1.

The options shared by every program of the project come from
:func:`prefork_server.cli.build_parser`; the HTTP ones are added here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from prefork_server.cli import build_parser, load_target, serve

from .demo import demo_app
from .handler import HTTPSettings, make_handler

DEFAULTS = HTTPSettings()


def parser() -> argparse.ArgumentParser:
    """The command's parser: the project's common options plus the HTTP ones."""
    p = build_parser(
        prog="python -m examples.http",
        description="An HTTP/1.1 server (h11) for a WSGI application, with pre-forked workers.",
        target_help="module:app, a WSGI application (default: the built-in demo app: "
        "/ says hello, /echo echoes the body, /sleep?ms=N sleeps)",
        default_bind="127.0.0.1:8000",
    )
    http = p.add_argument_group("HTTP")
    http.add_argument(
        "--max-header-bytes",
        type=int,
        default=DEFAULTS.max_header_bytes,
        metavar="N",
        help="largest request line + headers; larger gets a 431 "
        f"(default {DEFAULTS.max_header_bytes})",
    )
    http.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULTS.max_body_bytes,
        metavar="N",
        help=f"largest request body; larger gets a 413; 0: no limit "
        f"(default {DEFAULTS.max_body_bytes})",
    )
    http.add_argument(
        "--read-timeout",
        type=float,
        default=DEFAULTS.read_timeout,
        metavar="SECONDS",
        help="a request head must arrive whole within this time, and a client may not "
        "stall a body or the response for longer (default "
        f"{DEFAULTS.read_timeout:g})",
    )
    http.add_argument(
        "--busy-read-timeout",
        type=float,
        default=DEFAULTS.busy_read_timeout,
        metavar="SECONDS",
        help="the same for a request head while other clients wait for a worker, so that "
        f"slow clients cannot hold every worker (default {DEFAULTS.busy_read_timeout:g})",
    )
    http.add_argument(
        "--keepalive-timeout",
        type=float,
        default=DEFAULTS.keepalive_timeout,
        metavar="SECONDS",
        help="close an idle keep-alive connection after this long; 0: no keep-alive "
        f"(default {DEFAULTS.keepalive_timeout:g})",
    )
    http.add_argument(
        "--keepalive-turn",
        type=int,
        default=DEFAULTS.keepalive_turn,
        metavar="N",
        help="while other clients wait for a worker, close a keep-alive connection after "
        f"N requests (default {DEFAULTS.keepalive_turn})",
    )
    http.add_argument(
        "--no-access-log",
        dest="access_log",
        action="store_false",
        help="do not log a line per request (for benchmarks)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    app = demo_app
    if args.target:
        try:
            app = load_target(args.target)
        except (ImportError, AttributeError, ValueError) as e:
            p.error(f"cannot load {args.target!r}: {e}")
        if not callable(app):
            p.error(f"{args.target!r} is not a WSGI application (not callable)")
    try:
        settings = HTTPSettings(
            max_header_bytes=args.max_header_bytes,
            max_body_bytes=args.max_body_bytes,
            read_timeout=args.read_timeout,
            busy_read_timeout=args.busy_read_timeout,
            keepalive_timeout=args.keepalive_timeout,
            keepalive_turn=args.keepalive_turn,
            access_log=args.access_log,
        )
    except ValueError as e:
        p.error(str(e))
    return serve(args, make_handler(app, settings), app_name="http")


if __name__ == "__main__":
    sys.exit(main())
