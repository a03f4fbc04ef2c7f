"""Hooks: user code the master and the workers call at fixed points of a worker's life.

Where each runs, and what an exception in it does:

- ``before_fork(number)``: in the master, just before a worker is forked. If it raises,
  the error is logged and the fork goes on.
- ``after_fork(worker)``: in the worker, right after fork, before the work function. If
  it raises, the worker exits: a boot failure, logged with its traceback.
- ``worker_exit(worker)``: in the worker, after the work function returned. Logged.
- ``on_worker_timeout(number, pid)``: in the master, before a silent worker gets SIGKILL.
  Logged; the kill goes on.
- ``on_reload()``: in the master, on HUP, before the new generation is forked. It may
  return a mapping of new settings (``workers``, ``timeout``, ``graceful_timeout``,
  ``max_requests``, ``max_requests_jitter``, ``hooks``) for the master to apply. If it
  raises, the error is logged and the reload is abandoned: the current workers serve on.

A hook that raises never kills the master.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .worker import Worker

__all__ = ["Hooks"]


@dataclass(frozen=True)
class Hooks:
    """The hooks of one server; each is a callable or None."""

    before_fork: Callable[[int], Any] | None = None
    after_fork: Callable[[Worker], Any] | None = None
    worker_exit: Callable[[Worker], Any] | None = None
    on_worker_timeout: Callable[[int, int], Any] | None = None
    on_reload: Callable[[], Any] | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and not callable(value):
                raise ValueError(f"{f.name} must be callable, not {value!r}")

    def call(self, name: str, logger: logging.Logger, *args: Any) -> bool:
        """Call hook ``name`` if set; log an exception instead of raising. True if it
        succeeded (or is not set)."""
        hook = getattr(self, name)
        if hook is None:
            return True
        try:
            hook(*args)
        except Exception:  # noqa: BLE001 - a hook must not take the master down
            logger.exception("%s hook raised", name)
            return False
        return True
