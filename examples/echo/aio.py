"""The echo server on asyncio: each worker runs an event loop on the inherited socket.

The Python counterpart of the preforker gem's EventMachine example: the master, the
signals and the heartbeat are the same; inside a worker, one event loop serves every
connection that worker accepts. ``python -m examples.echo --asyncio``.

The heartbeat is a task that calls ``worker.heartbeat()`` every ``poll_interval / 2``
seconds: if anything blocks the event loop for longer than ``timeout``, the task cannot
run, and the master kills the worker, as it would a stuck synchronous handler.

Balance: an event loop waits on the listener even while it serves, so the worker that is
awake anyway (serving a busy client) wins the race for each new connection, and could take
every one while another worker idles. Each worker records how many connections it holds in
its scoreboard slot (``worker.set_connections``); one that holds some while another
serving worker holds none (``worker.fewest_connections_elsewhere() == 0``) leaves the new
connection to that one for up to ``ACCEPT_DEFER`` seconds before taking it itself. A
worker with no connection never defers, so it always listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import Any

from prefork_server import Worker
from prefork_server.server import ACCEPT_BACKOFF, accept_error_is_transient
from prefork_server.worker import TITLE_IDLE_DELAY

__all__ = ["AsyncioEchoMixIn"]

#: How long a worker that holds connections, while another holds none, leaves a new
#: connection to the others before it accepts it itself.
ACCEPT_DEFER = 0.002


class AsyncioEchoMixIn:
    """Put in front of a prefork server class; replaces the worker's main loop.

    A graceful stop (QUIT, HUP, ``max_requests``) closes the listening socket in this
    worker, lets each connection answer what it has already received, and closes it.
    """

    socket: Any
    request_timeout = 300.0  # an idle client is dropped after this many seconds

    def serve_in_worker(self, worker: Worker) -> None:
        asyncio.run(self._serve(worker))

    async def _serve(self, worker: Worker) -> None:
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        self._active = 0

        def woken(fd: int) -> None:
            worker.drain_wakeup(fd)
            if not worker.heartbeat():
                stopping.set()

        for fd in worker.wakeup_fds:
            loop.add_reader(fd, woken, fd)
        # Each connection's task, and whether it is waiting for a client that has had
        # every answer (only those are cut short by a graceful stop).
        clients: dict[asyncio.Task[None], bool] = {}
        # When each connection last heard from its client: the heartbeat loop drops those
        # silent for request_timeout (one sweep, not a timer per read).
        self._last_heard: dict[asyncio.Task[None], float] = {}
        title_timer: asyncio.TimerHandle | None = None

        def show_title() -> None:
            nonlocal title_timer
            title_timer = None
            if not worker.heartbeat():
                stopping.set()
            elif worker.title_due:  # busy again, and idle again since the timer was set
                title_timer = loop.call_later(worker.title_due - time.monotonic(), show_title)

        async def client(conn: socket.socket) -> None:
            nonlocal title_timer
            task = asyncio.current_task()
            assert task is not None
            clients[task] = False
            writer = None
            try:
                reader, writer = await asyncio.open_connection(sock=conn)
                await self._echo(reader, writer, stopping, clients, task)
            except (ConnectionError, asyncio.TimeoutError, asyncio.CancelledError):
                pass
            finally:
                if writer is not None:
                    writer.close()
                else:
                    conn.close()
                del clients[task]
                self._last_heard.pop(task, None)
                self._active -= 1
                worker.set_connections(self._active)
                if retry is not None and self._active == 0:
                    # With no connection left, the others may leave the next one to
                    # us: listen again at once.
                    accept_late()
                if self._active == 0:
                    worker.idle()
                    if worker.title_due and title_timer is None:
                        # The title says "idle" only at a heartbeat after a moment.
                        title_timer = loop.call_later(TITLE_IDLE_DELAY, show_title)
                else:
                    worker.count_unit()
                if not worker.heartbeat():  # max_requests may have been reached
                    stopping.set()

        listener = self.socket
        retry: asyncio.TimerHandle | None = None

        def accept() -> None:
            nonlocal retry
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return  # another worker was quicker
            except OSError as e:
                if accept_error_is_transient(e):
                    return  # that connection's own error: the next may be fine
                # The listener stays readable: stop watching it for a while, or spin.
                worker.logger.warning(
                    "worker[%d] cannot accept: %s; pausing %.1fs",
                    worker.number, e, ACCEPT_BACKOFF,
                )  # fmt: skip
                if retry is None:
                    loop.remove_reader(listener.fileno())
                else:
                    retry.cancel()
                retry = loop.call_later(ACCEPT_BACKOFF, accept_late)
                return
            conn.setblocking(False)
            # Counted now, not when the task starts, so that the next readable()
            # compares this worker's load with the others' truthfully.
            self._active += 1
            worker.set_connections(self._active)
            if self._active == 1:
                worker.busy()
            loop.create_task(client(conn))

        def readable() -> None:
            nonlocal retry
            if not (self._active and worker.fewest_connections_elsewhere() == 0):
                accept()  # one per wake-up: the load is compared again before the next
                return
            # Another worker holds no connection: let it take this one. If it has not
            # within a moment, take it ourselves (nothing waits long).
            loop.remove_reader(listener.fileno())
            retry = loop.call_later(ACCEPT_DEFER, accept_late)

        def accept_late() -> None:
            nonlocal retry
            if retry is not None:
                retry.cancel()
            retry = None
            if listener.fileno() < 0:
                return  # stopping: the listener is closed
            accept()
            if retry is None:  # not paused by accept() (out of descriptors)
                loop.add_reader(listener.fileno(), readable)

        loop.add_reader(listener.fileno(), readable)
        try:
            while not stopping.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stopping.wait(), worker.poll_interval / 2)
                if not worker.heartbeat():
                    stopping.set()
                silent_since = loop.time() - self.request_timeout
                for task, heard in list(self._last_heard.items()):
                    if heard < silent_since:
                        task.cancel()
        finally:
            if title_timer is not None:
                title_timer.cancel()
            if retry is not None:
                retry.cancel()
                retry = None
            else:
                loop.remove_reader(listener.fileno())
            listener.close()  # this worker's copy: the others keep accepting
            for fd in worker.wakeup_fds:
                loop.remove_reader(fd)
            for task, quiet in list(clients.items()):
                if quiet:
                    task.cancel()
            if clients:  # the others answer what they were sent, then close
                await asyncio.wait(set(clients), timeout=worker.timeout)

    async def _echo(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        stopping: asyncio.Event,
        clients: dict[asyncio.Task[None], bool],
        task: asyncio.Task[None],
    ) -> None:
        answered = False
        loop = asyncio.get_running_loop()
        while not (stopping.is_set() and answered):
            clients[task] = answered  # from now on a stop may cancel us
            self._last_heard[task] = loop.time()
            data = await reader.read(65536)
            clients[task] = False
            if not data:
                return
            writer.write(data)
            await writer.drain()
            answered = True
