"""``python -m examples.echo``: the echo server on the prefork_server command line."""

import sys

from prefork_server.cli import build_parser, serve

from . import EchoHandler


def main() -> int:
    parser = build_parser(
        prog="python -m examples.echo", description="An echo server with pre-forked workers."
    )
    return serve(parser.parse_args(), EchoHandler, app_name="echo")


if __name__ == "__main__":
    sys.exit(main())
