"""The service's live numbers in a block of shared memory.

The service writes them (`Vitals`) and its heartbeat companion reads them
whenever it publishes a record or has to say why the service ended. Shared
memory, not messages: a write is a few stores, with no system call and no
wake-up of the companion, so it costs nothing to keep them current on every
job; and the companion reads the truth even while every thread of the
service is stuck (a handler holding the GIL in C code).

The block is a `memfd` the companion inherits. A sequence number makes the
reads consistent (a seqlock): odd while a write is under way, bumped again
when it is done; a reader that sees it change or odd reads again, and after
a few tries takes what is there (each field is one aligned 8-byte store, so
a writer stopped half-way leaves old and new values, never torn ones).
"""

from __future__ import annotations

import math
import mmap
import os
import struct
import tempfile
from typing import Any, Optional

#: The write sequence, then: connected (0/1), disconnected_mono, running,
#: waiting, progress_mono, last_progress_ts, avg_job_ms. Times are
#: `time.monotonic()` (CLOCK_MONOTONIC, one clock for both processes) or
#: Unix seconds; NaN stands for None.
_SEQ = struct.Struct("@q")
_FIELDS = struct.Struct("@qdqqddd")
SIZE = _SEQ.size + _FIELDS.size
_READ_TRIES = 100


def _opt(value: Optional[float]) -> float:
    return math.nan if value is None else value


def _none(value: float) -> Optional[float]:
    return None if math.isnan(value) else value


class SharedVitals:
    """The service's (writing) end: `fd` is what the companion inherits."""

    def __init__(self) -> None:
        try:
            self.fd = os.memfd_create("axion-vitals", os.MFD_CLOEXEC)
        except (AttributeError, OSError):
            # No memfd (an old kernel or C library): an unlinked file.
            with tempfile.TemporaryFile() as f:
                self.fd = os.dup(f.fileno())
        os.ftruncate(self.fd, SIZE)
        self._map = mmap.mmap(self.fd, SIZE)
        self._seq = 0

    def close_fd(self) -> None:
        """Once the companion has it: the mapping stays."""
        os.close(self.fd)

    def write(
        self,
        connected: bool,
        disconnected_mono: Optional[float],
        running: int,
        waiting: int,
        progress_mono: float,
        last_progress_ts: Optional[float],
        avg_job_ms: Optional[float],
    ) -> None:
        """One writer at a time (the caller holds its lock)."""
        self._seq += 1
        _SEQ.pack_into(self._map, 0, self._seq)
        _FIELDS.pack_into(
            self._map,
            _SEQ.size,
            int(connected),
            _opt(disconnected_mono),
            running,
            waiting,
            progress_mono,
            _opt(last_progress_ts),
            _opt(avg_job_ms),
        )
        self._seq += 1
        _SEQ.pack_into(self._map, 0, self._seq)


class VitalsReader:
    """The companion's (reading) end."""

    def __init__(self, fd: int) -> None:
        self._map = mmap.mmap(fd, SIZE, prot=mmap.PROT_READ)
        os.close(fd)

    def read(self) -> dict[str, Any]:
        for _ in range(_READ_TRIES):
            before = _SEQ.unpack_from(self._map, 0)[0]
            fields = _FIELDS.unpack_from(self._map, _SEQ.size)
            if before % 2 == 0 and _SEQ.unpack_from(self._map, 0)[0] == before:
                break
        connected, disconnected, running, waiting, progress, last_ts, avg = fields
        return {
            "connected": bool(connected),
            "disconnected_mono": _none(disconnected),
            "running": running,
            "waiting": waiting,
            "progress_mono": progress,
            "last_progress_ts": _none(last_ts),
            "avg_job_ms": None if math.isnan(avg) else round(avg, 3),
        }
