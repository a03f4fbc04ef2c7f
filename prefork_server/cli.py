"""The ``prefork-server`` command: serve a ``socketserver`` handler with pre-forked workers.

::

    prefork-server --bind 127.0.0.1:9000 --workers 4 examples.echo:EchoHandler
    prefork-server --config echo.conf.py examples.echo:EchoHandler
    prefork-server status --pid-file echo.pid

Settings come from three places, the later winning: the defaults, a Python config file
(``--config``, see :mod:`prefork_server.config`), and the options given on the command
line. HUP re-reads the file, applies what can change in a running master (see
``RELOADABLE`` in :mod:`prefork_server.config`), and starts fresh workers, which import the
handler's module anew (unless ``--preload`` imported it once in the master).

The examples reuse :func:`build_parser` and :func:`serve` so that every program of the
project takes the same options.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import socket
import socketserver
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .config import HOOK_NAMES, RELOADABLE, SETTINGS, load_config
from .daemon import PidFileError
from .engine import LOG_FORMAT, default_logger
from .hooks import Hooks
from .master import BootError
from .server import PreforkTCPServer, PreforkThreadingMixIn, PreforkUnixStreamServer
from .sockets import BindAddress, adopt_fd, inherited_address, parse_bind
from .worker import Worker

__all__ = [
    "DEFAULTS",
    "ExtraSettings",
    "Lazy",
    "build_parser",
    "load_target",
    "main",
    "resolve_settings",
    "serve",
]

SIGNALS_HELP = """\
signals (send them to the master's pid):
  QUIT       graceful stop: workers finish their current connection, then exit;
             after --graceful-timeout the rest are killed
  TERM, INT  immediate stop (TERM is graceful, as QUIT, with --graceful-term)
  WINCH      stop all workers, keep the master (ignored in a terminal's foreground,
             where a window resize sends it)
  TTIN       one worker more
  TTOU       one worker fewer
  USR1       reopen the log files (after logrotate)
  HUP        reload: re-read --config, start fresh workers (which import the handler's
             code anew), then retire the old ones gracefully
  USR2       upgrade: exec a new master with the same command line, handing it the
             listening sockets; the pid file becomes PIDFILE.oldbin until the old
             master exits (send it QUIT once the new one serves)

a worker silent for longer than --timeout is killed (SIGKILL) and replaced.
`prefork-server status --pid-file FILE` prints a running server's workers.
"""

#: Every setting's value when neither the command line nor a config file gives one.
DEFAULTS: Mapping[str, Any] = {
    "bind": "127.0.0.1:9000",
    "workers": 10,
    "timeout": 5.0,
    "graceful_timeout": None,
    "name": None,
    "pid_file": None,
    "log_file": None,
    "log_level": "info",
    "daemon": False,
    "max_requests": 0,
    "max_requests_jitter": 0,
    "graceful_term": False,
    "user": None,
    "group": None,
    "min_spare_workers": 0,
    "max_spare_workers": None,
    "max_workers": None,
    "preload": False,
    "threads": 0,
    "socket_mode": None,
}
assert set(DEFAULTS) == set(SETTINGS)

# The settings that are the server's keywords under the same name.
_SERVER_KEYWORDS = ("workers", "timeout", "graceful_timeout", "max_requests",
                    "max_requests_jitter", "graceful_term", "user", "group",
                    "min_spare_workers", "max_spare_workers", "max_workers")  # fmt: skip


def build_parser(
    prog: str | None = None,
    description: str | None = None,
    target_help: str | None = None,
    default_bind: str = "127.0.0.1:9000",
) -> argparse.ArgumentParser:
    """The options every program of the project shares; add yours before parsing.

    Options left out on the command line parse as None; :func:`resolve_settings` fills
    them from the config file and :data:`DEFAULTS`.
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description
        or "Serve a socketserver request handler with pre-forked worker processes.",
        epilog=SIGNALS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(default_bind=default_bind)
    if target_help is not None:
        parser.add_argument(
            "target", nargs="?" if "default" in target_help else None, help=target_help
        )
    add = parser.add_argument
    add(
        "--config",
        "-c",
        metavar="FILE",
        help="a Python file setting any of these options (with _ for -) and hooks; "
        "options given here win; HUP re-reads it",
    )
    add(
        "--bind",
        "-b",
        metavar="ADDRESS",
        help="HOST:PORT, [IPV6]:PORT, :PORT (all interfaces), unix:PATH, or fd://N (a "
        f"listening socket inherited as descriptor N) (default {default_bind}; a socket "
        "passed by systemd socket activation is used when it has this address)",
    )
    add(
        "--socket-mode",
        type=_octal,
        metavar="OCTAL",
        help="permissions of a unix: socket file, whatever the umask (default 660: "
        "the owner and the group may connect)",
    )
    add("--workers", "-w", type=int, metavar="N", help="number of worker processes (default 10)")
    add(
        "--timeout",
        "-t",
        type=float,
        metavar="SECONDS",
        help="seconds a worker may go without a heartbeat before it is killed and "
        "replaced (default 5)",
    )
    add(
        "--graceful-timeout",
        type=float,
        metavar="SECONDS",
        help="how long a graceful stop waits for workers before killing them (default: --timeout)",
    )
    add(
        "--graceful-term",
        action="store_true",
        default=None,
        help="make TERM a graceful stop, as QUIT (for systemd, Docker, Kubernetes)",
    )
    add(
        "--max-requests",
        type=int,
        metavar="N",
        help="a worker retires gracefully after N connections (default 0: never)",
    )
    add(
        "--max-requests-jitter",
        type=int,
        metavar="N",
        help="add a random 0..N to each worker's --max-requests (default 0)",
    )
    add(
        "--min-spare-workers",
        type=int,
        metavar="N",
        help="adaptive pool: add workers while fewer than N are idle (default 0: a "
        "fixed pool of --workers)",
    )
    add(
        "--max-spare-workers",
        type=int,
        metavar="N",
        help="adaptive pool: retire idle workers beyond N (default 2 x --min-spare-workers)",
    )
    add(
        "--max-workers",
        type=int,
        metavar="N",
        help="adaptive pool: never more workers than N (default 4 x --workers)",
    )
    add("--user", metavar="USER", help="workers run as this user (the master binds first)")
    add("--group", metavar="GROUP", help="workers run with this group")
    add(
        "--threads",
        type=int,
        metavar="N",
        help="run up to N handler threads in each worker (default 0: one connection at "
        "a time per worker, no threads)",
    )
    add(
        "--preload",
        action="store_true",
        default=None,
        help="import the handler once in the master (workers share its memory, but HUP "
        "cannot load new code: use USR2)",
    )
    add(
        "--name",
        metavar="APP_NAME",
        help="name in process titles, log lines and default file names",
    )
    add(
        "--pid-file",
        metavar="PATH",
        help="write the master's pid here (default with --daemon: ./APP_NAME.pid; none "
        "in the foreground)",
    )
    add(
        "--daemon",
        "-D",
        action="store_true",
        default=None,
        help="detach and run in the background (log to ./APP_NAME.log)",
    )
    add(
        "--log-file",
        metavar="PATH",
        help="write the log here (default: stderr; with --daemon ./APP_NAME.log)",
    )
    add(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="log level (default info)",
    )
    return parser


#: A program's own settings: name -> (the types a config file may give, the default).
ExtraSettings = Mapping[str, tuple[tuple[type, ...], Any]]


def resolve_settings(
    args: argparse.Namespace,
    defaults: Mapping[str, Any] | None = None,
    extra: ExtraSettings | None = None,
) -> dict[str, Any]:
    """Defaults, then ``--config``'s file, then the command line: every setting of
    :data:`DEFAULTS` and of ``extra`` (a program's own, such as the HTTP example's
    limits: their command-line options must default to None), plus the file's hooks.
    Raises ``ValueError`` (or the config file's own exception) for a bad file."""
    extra = extra or {}
    settings = dict(DEFAULTS)
    settings["bind"] = getattr(args, "default_bind", DEFAULTS["bind"])
    settings.update({name: default for name, (_, default) in extra.items()})
    settings.update(defaults or {})
    config_path = getattr(args, "config", None)
    if config_path:
        types = {name: kinds for name, (kinds, _) in extra.items()}
        settings.update(load_config(config_path, types))
    for name in (*SETTINGS, *extra):
        value = getattr(args, name, None)
        if value is not None:
            settings[name] = value
    return settings


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


def _as_handler(target: Any, settings: Mapping[str, Any]) -> type[Any]:
    if not (isinstance(target, type) and issubclass(target, socketserver.BaseRequestHandler)):
        raise ValueError(f"{target!r} is not a socketserver.BaseRequestHandler subclass")
    return target


@dataclasses.dataclass(frozen=True)
class Lazy:
    """A handler that each worker builds after fork from ``module:attribute``, so that the
    master never imports the code and a HUP starts workers running the code on disk.

    ``build(target, settings)`` turns the imported object into a handler class (by
    default it checks that the object is one); ``settings`` are those in force when the
    worker is forked, so a program's own settings change on HUP as well. With
    ``--preload`` the master builds it once instead.
    """

    spec: str
    build: Callable[[Any, Mapping[str, Any]], type[Any]] = _as_handler

    def load(self, settings: Mapping[str, Any]) -> type[Any]:
        try:
            target = load_target(self.spec)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot load {self.spec!r}: {e}") from e
        return self.build(target, settings)


def check_in_child(load: Callable[[], object]) -> str | None:
    """Run ``load()`` in a forked child and return its error message, or None.

    So that the master can refuse a target that does not import, with a clear message,
    without importing it itself: workers then import the code as it is when they start,
    and a HUP picks up new code.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        code = 0
        try:
            load()
        except BaseException as e:  # noqa: BLE001 - reported to the parent, then exit
            plain = isinstance(e, (ValueError, ImportError, AttributeError))
            message = str(e) if plain else f"{type(e).__name__}: {e}"
            if isinstance(e, SyntaxError):
                message = "".join(traceback.format_exception_only(e)).strip()
            os.write(write_fd, message.encode(errors="replace") or b"error")
            code = 1
        os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        message = pipe.read().decode(errors="replace")
    os.waitpid(pid, 0)
    return message or None


def server_class_for(address: BindAddress, base: type[Any] = PreforkTCPServer) -> type[Any]:
    if address.family == socket.AF_UNIX:
        return PreforkUnixStreamServer
    if address.family == socket.AF_INET6:
        return type("PreforkTCP6Server", (base,), {"address_family": socket.AF_INET6})
    return base


class _LazyHandler:
    """Stands for the handler class in the master until a worker imports the real one."""

    def __init__(self, spec: str) -> None:
        self.spec = spec

    def __call__(self, *args: Any) -> Any:
        raise RuntimeError(f"{self.spec} was not loaded in this worker")


def serve(
    args: argparse.Namespace,
    handler: type[socketserver.BaseRequestHandler] | str | Lazy,
    server_class: type[Any] | None = None,
    mixins: tuple[type, ...] = (),
    extra_settings: ExtraSettings | None = None,
    **settings: Any,
) -> int:
    """Bind, then serve in the foreground or as a daemon, until stopped. Returns an exit
    status: 0, 1 if the server failed, 2 for bad options; errors are printed, not raised.

    ``handler`` is a handler class, or a ``module:Class`` string or a :class:`Lazy` that
    each worker imports when it starts (the master does not, unless ``--preload``), so
    that HUP loads new code. ``extra_settings`` are the program's own (see
    :func:`resolve_settings`); a config file may set them too. ``mixins`` go in front of
    the server class chosen for the address (TCP, IPv6 or Unix). ``settings`` are the
    server's keywords (``app_name`` is a default name).
    """
    default_name = settings.pop("app_name", None)
    name = args.name or default_name or "prefork_server"
    try:
        conf = resolve_settings(args, extra=extra_settings)
        pinned = {}
        if args.bind is None and not _config_sets(args, "bind"):
            activated = inherited_address()  # socket activation: use systemd's socket
            if activated is not None:
                pinned["bind"] = conf["bind"] = str(activated)
        name = conf["name"] or default_name or "prefork_server"
        lazy: Lazy | None = None
        if isinstance(handler, str):
            handler = Lazy(handler)
        if isinstance(handler, Lazy):
            if conf["preload"]:
                handler = handler.load(conf)
            else:
                lazy = loader = handler
                error = check_in_child(lambda: loader.load(conf))
                if error:
                    raise ValueError(error)
        address = _bind_address(conf["bind"])
        logger = _logger(name, conf)
        cls = server_class or server_class_for(address)
        threads = conf["threads"]
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 0:
            raise ValueError(f"threads must be an integer >= 0, not {threads!r}")
        if threads:
            mixins = (*mixins, PreforkThreadingMixIn)
        if mixins:
            cls = type(cls.__name__, (*mixins, cls), {"max_threads": threads or 16})
        if conf["socket_mode"] is not None:
            if address.family != socket.AF_UNIX:
                raise ValueError("socket_mode applies to a unix:PATH bind only")
            settings = {**settings, "socket_mode": conf["socket_mode"]}
        server = cls(
            address.address,
            handler if lazy is None else _LazyHandler(lazy.spec),
            app_name=name,
            pid_path=conf["pid_file"],
            logger=logger,
            **{key: conf[key] for key in _SERVER_KEYWORDS},
            **settings,
        )
        hooks = _Hooks(args, conf, server, logger, lazy, pinned, extra_settings or {})
        server.hooks = hooks.make(conf)
    except Exception as e:  # noqa: BLE001 - bad options or config file: a message, exit 2
        print(f"{name}: {e}", file=sys.stderr)
        return 2
    with server:
        host = _describe(server, address)
        try:
            if conf["daemon"]:
                pid = server.start()
                print(f"{name}: master pid {pid} serving on {host}")
            else:
                logger.info("listening on %s", host)
                server.serve_forever()
        except (PidFileError, BootError, RuntimeError) as e:
            print(f"{name}: {e}", file=sys.stderr)
            return 1
    return 0


class _Hooks:
    """The server's hooks from the command line: the config file's own, a worker's import
    of a lazily loaded handler, and ``on_reload``, which re-reads the config file."""

    def __init__(
        self,
        args: argparse.Namespace,
        conf: dict[str, Any],
        server: Any,
        logger: logging.Logger,
        lazy: Lazy | None,
        pinned: Mapping[str, Any],
        extra: ExtraSettings,
    ) -> None:
        self.pinned = pinned  # settings a reload keeps as they were chosen at start
        self.extra = extra
        self.args = args
        self.conf = conf  # the settings in force in the master
        self.server = server
        self.logger = logger
        self.lazy = lazy

    def make(self, conf: Mapping[str, Any]) -> Hooks:
        user = {name: conf.get(name) for name in HOOK_NAMES if name != "on_reload"}
        then = user.pop("after_fork")
        after_fork = then
        if self.lazy is not None:
            lazy = self.lazy

            def after_fork(worker: Worker) -> None:
                # Here, not in the master: a worker forked after a HUP imports new code.
                self.server.RequestHandlerClass = lazy.load(self.conf)
                if then is not None:
                    then(worker)

        return Hooks(after_fork=after_fork, on_reload=self.reload, **user)

    def reload(self) -> dict[str, Any]:
        """Re-read the config file; return what the master should apply. Raises (and
        the reload is abandoned, the current workers serving on) if the file is bad."""
        fresh = {**resolve_settings(self.args, extra=self.extra), **self.pinned}
        changes: dict[str, Any] = {}
        for key in (*DEFAULTS, *self.extra):
            if fresh[key] == self.conf[key]:
                continue
            if key in self.extra and self.lazy is not None:
                # The program's own: the new workers build their handler with it.
                self.logger.info("master: reload sets %s = %r", key, fresh[key])
                self.conf[key] = fresh[key]
            elif key not in RELOADABLE:
                self.logger.warning(
                    "master: %s changed to %r; it takes a restart or an upgrade (USR2)",
                    key,
                    fresh[key],
                )
            elif key == "log_level":
                self.logger.setLevel(getattr(logging, str(fresh[key]).upper()))
                self.logger.info("master: reload sets log_level = %r", fresh[key])
            else:
                changes[key] = fresh[key]
        # Refuse a bad value now (ValueError naming it), before anything is applied.
        dataclasses.replace(self.server._options, **changes)
        if self.lazy is not None:
            error = check_in_child(lambda: self.lazy.load(fresh))  # type: ignore[union-attr]
            if error:
                raise ValueError(error)
        changes["hooks"] = self.make(fresh)
        self.conf.update({k: fresh[k] for k in RELOADABLE if k in fresh})
        return changes


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["status"]:
        from .status import main as status_main

        return status_main(argv[1:])
    parser = build_parser(
        prog="prefork-server",
        target_help="module:HandlerClass, a "
        "socketserver.BaseRequestHandler subclass (for example "
        "examples.echo:EchoHandler)",
    )
    args = parser.parse_args(argv)
    return serve(args, args.target)


def _config_sets(args: argparse.Namespace, name: str) -> bool:
    path = getattr(args, "config", None)
    return path is not None and name in load_config(path)


def _octal(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode such as 660") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r} is not a mode from 000 to 777")
    return mode


def _bind_address(text: str) -> BindAddress:
    if text.startswith("fd://"):
        fd = text[len("fd://") :]
        if not fd.isdigit():
            raise ValueError(f"bind: {text!r} is not of the form fd://N")
        return adopt_fd(int(fd))
    return parse_bind(text)


def _logger(name: str, conf: Mapping[str, Any]) -> logging.Logger:
    level = getattr(logging, str(conf["log_level"]).upper(), None)
    if not isinstance(level, int):
        raise ValueError(f"log_level must be debug, info, warning or error, not {level!r}")
    log_path = conf["log_file"] or (f"{name}.log" if conf["daemon"] else None)
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
