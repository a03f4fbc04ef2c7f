"""Configuration files: plain Python, read at start and again on every HUP.

A config file sets module-level names that match the command-line options (with ``_``
for ``-``) and may define hook functions::

    # echo.conf.py
    bind = "127.0.0.1:9000"
    workers = 4
    timeout = 30
    max_requests = 10000
    max_requests_jitter = 500

    def after_fork(worker):
        worker.logger.info("worker %d ready", worker.number)

Options given on the command line win over the file. Unknown names (other than private
ones, starting with ``_``, and imported modules) are an error, so that a typo does not
silently do nothing.
"""

from __future__ import annotations

import os
import runpy
import types
from collections.abc import Mapping
from typing import Any

__all__ = ["HOOK_NAMES", "RELOADABLE", "SETTINGS", "load_config"]

#: Settings a config file may set, with the type each must have.
SETTINGS: Mapping[str, tuple[type, ...]] = {
    "bind": (str,),
    "workers": (int,),
    "timeout": (int, float),
    "graceful_timeout": (int, float),
    "name": (str,),
    "pid_file": (str,),
    "log_file": (str,),
    "log_level": (str,),
    "daemon": (bool,),
    "max_requests": (int,),
    "max_requests_jitter": (int,),
    "graceful_term": (bool,),
    "user": (str, int),
    "group": (str, int),
    "min_spare_workers": (int,),
    "max_spare_workers": (int,),
    "max_workers": (int,),
    "preload": (bool,),
    "threads": (int,),
    "socket_mode": (int,),
}

HOOK_NAMES = ("before_fork", "after_fork", "worker_exit", "on_worker_timeout", "on_reload")

#: What a HUP can change in a running master; the rest needs a restart or an upgrade.
RELOADABLE = frozenset(
    {"workers", "timeout", "graceful_timeout", "max_requests", "max_requests_jitter",
     "log_level", *HOOK_NAMES}
)  # fmt: skip


def load_config(
    path: str | os.PathLike[str], extra: Mapping[str, tuple[type, ...]] | None = None
) -> dict[str, Any]:
    """Run the file and return its settings and hooks. Raises ``ValueError`` naming the
    file and the offending name for an unknown setting or a value of the wrong type, and
    lets the file's own exceptions (``SyntaxError``, ``NameError`` ...) through.

    ``extra`` adds a program's own settings (name -> the types allowed)."""
    known = {**SETTINGS, **(extra or {})}
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"config: {path} is not a file")
    namespace = runpy.run_path(path, run_name="__prefork_config__")
    settings: dict[str, Any] = {}
    for name, value in namespace.items():
        if name.startswith("_") or isinstance(value, types.ModuleType):
            continue
        if name in HOOK_NAMES:
            if not callable(value):
                raise ValueError(f"config {path}: {name} must be a function")
            settings[name] = value
            continue
        if callable(value):
            continue  # helper functions and imported names
        if name not in known:
            raise ValueError(f"config {path}: unknown setting {name!r}")
        kinds = known[name]
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            wanted = " or ".join(k.__name__ for k in kinds)
            raise ValueError(f"config {path}: {name} must be {wanted}, not {value!r}")
        settings[name] = value
    return settings
