"""``python -m examples.http [options] [module:app]``: serve a WSGI application over HTTP/1.1.

The options shared by every program of the project come from
:func:`prefork_server.cli.build_parser`; the HTTP ones are added here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from prefork_server.cli import ExtraSettings, Lazy, build_parser, serve

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
        metavar="N",
        help="largest request line + headers; larger gets a 431 "
        f"(default {DEFAULTS.max_header_bytes})",
    )
    http.add_argument(
        "--max-body-bytes",
        type=int,
        metavar="N",
        help=f"largest request body; larger gets a 413; 0: no limit "
        f"(default {DEFAULTS.max_body_bytes})",
    )
    http.add_argument(
        "--read-timeout",
        type=float,
        metavar="SECONDS",
        help="a request head must arrive whole within this time, and a client may not "
        "stall a body or the response for longer (default "
        f"{DEFAULTS.read_timeout:g})",
    )
    http.add_argument(
        "--busy-read-timeout",
        type=float,
        metavar="SECONDS",
        help="the same for a request head while other clients wait for a worker, so that "
        f"slow clients cannot hold every worker (default {DEFAULTS.busy_read_timeout:g})",
    )
    http.add_argument(
        "--keepalive-timeout",
        type=float,
        metavar="SECONDS",
        help="close an idle keep-alive connection after this long; 0: no keep-alive "
        f"(default {DEFAULTS.keepalive_timeout:g})",
    )
    http.add_argument(
        "--keepalive-turn",
        type=int,
        metavar="N",
        help="while other clients need the worker, a keep-alive connection gives it up "
        f"(parked, or closed) after N requests (default {DEFAULTS.keepalive_turn})",
    )
    http.add_argument(
        "--no-access-log",
        dest="access_log",
        action="store_false",
        default=None,
        help="do not log a line per request (for benchmarks)",
    )
    return p


#: The HTTP settings, which a ``--config`` file may set too; HUP applies them to the new
#: workers (they build their handler after fork).
HTTP_SETTINGS: ExtraSettings = {
    "max_header_bytes": ((int,), DEFAULTS.max_header_bytes),
    "max_body_bytes": ((int,), DEFAULTS.max_body_bytes),
    "read_timeout": ((int, float), DEFAULTS.read_timeout),
    "busy_read_timeout": ((int, float), DEFAULTS.busy_read_timeout),
    "keepalive_timeout": ((int, float), DEFAULTS.keepalive_timeout),
    "keepalive_turn": ((int,), DEFAULTS.keepalive_turn),
    "access_log": ((bool,), DEFAULTS.access_log),
}

DEMO = "examples.http.demo:demo_app"


def build_handler(app: Any, settings: Mapping[str, Any]) -> type[Any]:
    """The handler for ``app`` with the HTTP settings in force (``ValueError`` naming a
    bad one, or if ``app`` is not a WSGI application)."""
    if not callable(app):
        raise ValueError(f"{app!r} is not a WSGI application (not callable)")
    return make_handler(app, HTTPSettings(**{name: settings[name] for name in HTTP_SETTINGS}))


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # Each worker imports the application after fork (unless --preload), so that HUP
    # serves the code now on disk; a target that does not import is an error at start.
    target = Lazy(args.target or DEMO, build_handler)
    return serve(args, target, extra_settings=HTTP_SETTINGS, app_name="http")


if __name__ == "__main__":
    sys.exit(main())
