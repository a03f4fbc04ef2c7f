"""Shared-memory slots: one per live worker, written by the worker, read by the master.

Why shared memory and not a pipe or a file touch: the heartbeat is stamped on every unit
of work, so it must cost no system call. A worker writes ``time.monotonic()`` (a vDSO call
on Linux, not a syscall) into its slot; the master reads the slot when it decides who is
overdue. The worker's writes are single stores of aligned 8-byte (or 4-byte) values
through typed ``memoryview`` casts of the mapping, so a reader never sees a torn value on
the platforms we run on (see :class:`_Views`).

The memory is a shared ``mmap`` made by the master *before* it forks the worker that will
own the slot, so the child inherits the mapping. Slots live in fixed-size segments; when
all are taken the master maps another segment, so the worker count can grow (TTIN,
adaptive pools) without remapping memory a running worker already uses.

On Linux the segments are pages of a ``memfd`` (a file with no name on any filesystem),
so ``prefork-server status`` can read the table of a running master through
``/proc/<pid>/fd`` without disturbing it, and nothing is left on disk when the master
dies. Elsewhere the segments are anonymous memory and only the master can read them.
"""

from __future__ import annotations

import enum
import mmap
import os
import struct
import time
from dataclasses import dataclass

__all__ = ["Scoreboard", "Slot", "SlotState", "SlotView", "read_scoreboard"]


class SlotState(enum.IntEnum):
    """What a worker is doing, as recorded in its slot."""

    FREE = 0  # no worker owns the slot
    BOOTING = 1  # forked, has not yet called wants_me_alive()
    IDLE = 2  # between units of work
    BUSY = 3  # inside a unit of work (a connection, for servers)
    STOPPING = 4  # asked to stop gracefully


# pid, generation, state, booted, number, (pad: the first byte is the stop request),
# served, beat, busy_since, spawned_at, connections. Native byte order ("="), as the
# worker's typed views write it; standard sizes, no padding beyond what is written here.
_LAYOUT = struct.Struct("=iIBBHxxxxQdddI")
_BEAT = struct.Struct("=d")
_CONNECTIONS = struct.Struct("=I")
_STATE_OFFSET = 8
_BOOTED_OFFSET = 9
_ASKS_STOP_OFFSET = 12
_SERVED_OFFSET = 16
_BEAT_OFFSET = 24
_BUSY_SINCE_OFFSET = 32
_CONNECTIONS_OFFSET = 48

# The states as plain ints, for the worker's per-connection writes (an IntEnum converts
# more slowly).
_BUSY, _IDLE, _STOPPING = int(SlotState.BUSY), int(SlotState.IDLE), int(SlotState.STOPPING)

SLOT_SIZE = 64
SLOTS_PER_SEGMENT = mmap.PAGESIZE // SLOT_SIZE
SEGMENT_SIZE = SLOTS_PER_SEGMENT * SLOT_SIZE
MEMFD_NAME = "prefork_server-scoreboard"
assert _LAYOUT.size <= SLOT_SIZE
# Each field of the views aligned on its size; busy_since right after beat (Slot.busy).
assert _SERVED_OFFSET % 8 == _BEAT_OFFSET % 8 == _CONNECTIONS_OFFSET % 4 == 0
assert _BEAT_OFFSET + 8 == _BUSY_SINCE_OFFSET and SLOT_SIZE % 8 == 0


class _Views:
    """Typed views of one segment, for the worker's hot writes: ``d[i] = now`` stores one
    aligned double. Packing bytes with a ``Struct`` and copying them into the mapping cost
    about 5 us more per connection in examples.http (busy() and idle(); one worker under
    ``wrk -c50``, ``Connection: close``, 8 alternating rounds: 78 against 83 us), far
    more than ``timeit`` shows (0.18 against 0.34 us a call): the kernel's work for each
    connection leaves the caches cold, and every object a write touches costs a miss.
    Never ``struct.pack_into``: it zeroes the span before packing field after field, and
    the master, reading meanwhile, once took a beat of 0 for a heartbeat missed "for
    88140 s" and killed a healthy worker."""

    __slots__ = ("raw", "d", "q", "i")

    def __init__(self, mem: mmap.mmap) -> None:
        self.raw = memoryview(mem)
        self.d = self.raw.cast("d")
        self.q = self.raw.cast("Q")
        self.i = self.raw.cast("I")

    def release(self) -> None:
        """Let the segment's mapping be closed (it cannot while views of it exist)."""
        for view in (self.d, self.q, self.i, self.raw):
            view.release()


@dataclass(frozen=True)
class SlotView:
    """A consistent-enough copy of one slot, for the master and the status command."""

    pid: int
    generation: int
    state: SlotState
    booted: bool
    number: int
    served: int
    beat: float
    busy_since: float
    spawned_at: float
    connections: int = 0  # open connections, for workers that serve several at once


class Slot:
    """One worker's record. The worker writes it; anyone holding the mapping may read it.

    The write methods are the worker's hot path: each field is one aligned store (see
    :class:`_Views`).
    """

    __slots__ = (
        "_mem", "_offset", "index", "_views", "_state", "_beat", "_served", "_connections",
        "_stopping",
    )  # fmt: skip

    def __init__(self, mem: mmap.mmap, offset: int, index: int, views: _Views) -> None:
        self._mem = mem
        self._offset = offset
        self.index = index
        self._views = views
        # Indexes of the fields in the typed views.
        self._state = offset + _STATE_OFFSET
        self._beat = (offset + _BEAT_OFFSET) // 8  # busy_since follows
        self._served = (offset + _SERVED_OFFSET) // 8
        self._connections = (offset + _CONNECTIONS_OFFSET) // 4
        self._stopping = False  # kept here: only the worker writes its state

    def reset(self, pid: int, generation: int, now: float, number: int = 0) -> None:
        """Claim the slot for a newly forked worker (called by the master)."""
        # The spawn time counts as the first beat, so a worker is given a full timeout to boot.
        self._stopping = False
        _LAYOUT.pack_into(
            self._mem, self._offset, pid, generation, SlotState.BOOTING, 0, number, 0, now, 0.0,
            now, 0,
        )  # fmt: skip

    def set_pid(self, pid: int) -> None:
        struct.pack_into("=i", self._mem, self._offset, pid)

    def clear(self) -> None:
        _LAYOUT.pack_into(self._mem, self._offset, 0, 0, SlotState.FREE, 0, 0, 0, 0.0, 0.0, 0.0, 0)

    def beat(self, now: float) -> None:
        self._views.d[self._beat] = now

    def mark_booted(self, now: float) -> None:
        self._mem[self._offset + _BOOTED_OFFSET] = 1
        self.idle(now)

    def busy(self, now: float) -> None:
        views = self._views
        d, i = views.d, self._beat
        d[i] = now
        d[i + 1] = now  # busy_since
        if not self._stopping:  # a stopping worker may finish work, and stays stopping
            views.raw[self._state] = _BUSY

    def idle(self, now: float, served: int = -1) -> None:
        """Idle since ``now``; with ``served``, the served count is recorded too."""
        views = self._views
        if served >= 0:
            views.q[self._served] = served
        views.d[self._beat] = now
        if not self._stopping:
            views.raw[self._state] = _IDLE

    def set_served(self, served: int) -> None:
        """Record how many units of work the worker has done (it keeps the count)."""
        self._views.q[self._served] = served

    def stopping(self) -> None:
        self._stopping = True
        self._views.raw[self._state] = _STOPPING

    def ask_stop(self) -> None:
        """The worker asks the master to stop the whole server (read when it exits)."""
        self._mem[self._offset + _ASKS_STOP_OFFSET] = 1

    def stop_asked(self) -> bool:
        return bool(self._mem[self._offset + _ASKS_STOP_OFFSET])

    def set_connections(self, count: int) -> None:
        self._views.i[self._connections] = count

    def fewest_connections_elsewhere(self) -> int | None:
        """The fewest connections held by another worker that is serving (booted, not
        stopping) in this slot's segment, or None if there is none. A worker sees the
        segments mapped before it was forked; this reads only its own (64 slots with
        4 KiB pages), which is every worker of all but the largest pools."""
        mem, fewest = self._mem, None
        # One slice per field across the segment: far cheaper than reading 64 slots.
        states = mem[_STATE_OFFSET:SEGMENT_SIZE:SLOT_SIZE]
        booted = mem[_BOOTED_OFFSET:SEGMENT_SIZE:SLOT_SIZE]
        mine = self._offset // SLOT_SIZE
        for i, state in enumerate(states):
            if i == mine or state not in _SERVING or not booted[i]:
                continue
            count = _CONNECTIONS.unpack_from(mem, i * SLOT_SIZE + _CONNECTIONS_OFFSET)[0]
            if fewest is None or count < fewest:
                fewest = count
        return fewest

    def idle_elsewhere(self, since: float, until: float = float("inf")) -> bool:
        """Whether another serving worker of this slot's segment is idle, holds no
        connection, and last stamped its heartbeat between ``since`` (a stopped process,
        SIGSTOP say, looks idle but stamps no more) and ``until`` (an idle worker that
        waits stamps only when it wakes: so it has been idle since then at least)."""
        mem = self._mem
        states = mem[_STATE_OFFSET:SEGMENT_SIZE:SLOT_SIZE]
        mine = self._offset // SLOT_SIZE
        i = states.find(_IDLE)
        while i >= 0:
            if i != mine and mem[i * SLOT_SIZE + _BOOTED_OFFSET]:
                base = i * SLOT_SIZE
                if (
                    not _CONNECTIONS.unpack_from(mem, base + _CONNECTIONS_OFFSET)[0]
                    and since <= _BEAT.unpack_from(mem, base + _BEAT_OFFSET)[0] <= until
                ):
                    return True
            i = states.find(_IDLE, i + 1)
        return False

    def last_beat(self) -> float:
        return float(_BEAT.unpack_from(self._mem, self._offset + _BEAT_OFFSET)[0])

    def read(self) -> SlotView:
        return _view(self._mem, self._offset)


_SERVING = frozenset({int(SlotState.IDLE), int(SlotState.BUSY)})


def _view(buffer: bytes | mmap.mmap, offset: int) -> SlotView:
    pid, gen, state, booted, number, served, beat, busy_since, spawned, conns = _LAYOUT.unpack_from(
        buffer, offset
    )
    return SlotView(
        pid, gen, SlotState(state), bool(booted), number, served, beat, busy_since, spawned,
        conns,
    )  # fmt: skip


class Scoreboard:
    """The master's table of slots. Not thread-safe: only the master loop allocates."""

    def __init__(self) -> None:
        self._segments: list[mmap.mmap] = []
        self._views: list[_Views] = []
        self._free: list[int] = []
        self._slots: list[Slot] = []
        self.fd = -1  # the memfd behind the slots, or -1 for anonymous memory
        if hasattr(os, "memfd_create"):
            try:
                self.fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC)
            except OSError:  # an old kernel, or a sandbox that forbids it
                self.fd = -1

    def allocate(
        self, pid: int, generation: int, now: float | None = None, number: int = 0
    ) -> Slot:
        """Return a free slot, already reset for a worker that is about to be forked."""
        if not self._free:
            self._grow()
        index = self._free.pop()
        slot = self._slots[index]
        slot.reset(pid, generation, time.monotonic() if now is None else now, number)
        return slot

    def release(self, slot: Slot) -> None:
        slot.clear()
        self._free.append(slot.index)

    def in_use(self) -> list[SlotView]:
        free = set(self._free)
        return [s.read() for s in self._slots if s.index not in free]

    def close(self) -> None:
        for views in self._views:
            views.release()
        self._views.clear()
        for mem in self._segments:
            mem.close()
        self._segments.clear()
        self._slots.clear()
        self._free.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _grow(self) -> None:
        if self.fd >= 0:
            offset = len(self._segments) * SEGMENT_SIZE
            os.ftruncate(self.fd, offset + SEGMENT_SIZE)
            mem = mmap.mmap(self.fd, SEGMENT_SIZE, flags=mmap.MAP_SHARED, offset=offset)
        else:
            mem = mmap.mmap(-1, SEGMENT_SIZE, flags=mmap.MAP_SHARED)
        self._segments.append(mem)
        views = _Views(mem)
        self._views.append(views)
        base = len(self._slots)
        for i in range(SLOTS_PER_SEGMENT):
            self._slots.append(Slot(mem, i * SLOT_SIZE, base + i, views))
        # Hand out low indexes first so that a small pool stays in the first segment.
        self._free.extend(reversed(range(base, base + SLOTS_PER_SEGMENT)))


def read_scoreboard(master_pid: int) -> list[SlotView]:
    """The live slots of a running master, read through ``/proc/<pid>/fd``.

    Needs the master's user or root. Raises ``ProcessLookupError`` if there is no such
    process and ``FileNotFoundError`` if it has no scoreboard we can read.
    """
    fd_dir = f"/proc/{master_pid}/fd"
    try:
        entries = os.listdir(fd_dir)
    except FileNotFoundError:
        raise ProcessLookupError(f"no process {master_pid}") from None
    for entry in entries:
        try:
            target = os.readlink(f"{fd_dir}/{entry}")
        except OSError:
            continue
        if target.startswith(f"/memfd:{MEMFD_NAME}"):
            with open(f"{fd_dir}/{entry}", "rb") as f:
                data = f.read()
            views = (_view(data, off) for off in range(0, len(data) - SLOT_SIZE + 1, SLOT_SIZE))
            return [v for v in views if v.pid and v.state is not SlotState.FREE]
    raise FileNotFoundError(f"process {master_pid} has no prefork_server scoreboard")
