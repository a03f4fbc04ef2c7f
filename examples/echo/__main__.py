"""``python -m examples.echo``: the echo server on the prefork_server command line."""

import sys

from prefork_server.cli import build_parser, serve

from . import EchoHandler
from .aio import AsyncioEchoMixIn


def main() -> int:
    parser = build_parser(
        prog="python -m examples.echo", description="An echo server with pre-forked workers."
    )
    parser.add_argument(
        "--asyncio",
        action="store_true",
        help="each worker runs an asyncio event loop that serves all its connections",
    )
    args = parser.parse_args()
    mixins: tuple[type, ...] = (AsyncioEchoMixIn,) if args.asyncio else ()
    if args.asyncio and args.threads:
        parser.error("--asyncio and --threads are two ways to serve many clients: pick one")
    return serve(args, EchoHandler, mixins=mixins, app_name="echo")


if __name__ == "__main__":
    sys.exit(main())
