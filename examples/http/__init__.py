"""An HTTP/1.1 server for any WSGI application, on h11 and pre-forked workers.

Run it from the repository root (h11 is its only dependency: ``pip install -e '.[http]'``)::

    python -m examples.http --bind 127.0.0.1:8000 --workers 4            # the demo app
    python -m examples.http --bind 127.0.0.1:8000 --workers 4 myapp:app  # your WSGI app

Or from Python, with any ``prefork_server`` server class::

    from prefork_server import PreforkTCPServer
    from examples.http import HTTPSettings, make_handler

    handler = make_handler(app, HTTPSettings(read_timeout=5, access_log=False))
    with PreforkTCPServer(("127.0.0.1", 8000), handler, workers=4, timeout=30) as server:
        server.serve_forever()

Modules: ``handler`` (the h11 driver and the socket I/O), ``wsgi`` (environ and
``wsgi.input``, no I/O), ``demo`` (the built-in application), ``__main__`` (the command
line). The behaviour, the options and their defaults are described in ``docs/http.md``.
"""

from .demo import demo_app
from .handler import HTTPHandler, HTTPSettings, make_handler

__all__ = ["HTTPHandler", "HTTPSettings", "demo_app", "make_handler"]
