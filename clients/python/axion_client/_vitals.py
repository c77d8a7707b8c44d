"""The few numbers that say whether a service is healthy, and who hears of them.

Every change goes, at once and from whichever thread made it, to the two
parts that must not depend on the service's threads: the watchdog's
kernel timers (`_watchdog`) and the heartbeat companion (`_beacon`). So
when a handler then gets stuck, both already know everything up to the
moment it did.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Optional

from ._beacon import Beacon
from ._config import Limits
from ._watchdog import EXIT_BROKER_LOST, EXIT_STALLED, ExitTimer

#: Weight of the newest job in `avg_job_ms`, an exponential moving average,
#: so a service that slows down shows it within a few jobs.
AVG_JOB_WEIGHT = 0.2


class Vitals:
    def __init__(self, limits: Limits, beacon: Beacon) -> None:
        self._lock = threading.Lock()
        self._beacon = beacon
        self._kill_after = limits.disconnect_kill_ms / 1000
        self._stall_after = limits.liveness_max_stall_ms / 1000
        self._broker_timer = ExitTimer(EXIT_BROKER_LOST)
        self._stall_timer = ExitTimer(EXIT_STALLED)
        now = time.monotonic()
        self.connected = False
        #: When the broker was lost, or the start before the first CONNACK.
        self.disconnected_mono: Optional[float] = now
        self.running = 0
        self.waiting = 0
        #: Last forward progress: a job ended, a handler reported progress,
        #: or work arrived at an idle service (idle is not stalled).
        self.progress_mono = now
        self.last_progress_ts: Optional[float] = None
        self.avg_job_ms: Optional[float] = None
        with self._lock:
            self._broker_timer.arm_at(now + self._kill_after)
            self._push()

    def set_connected(self, connected: bool) -> bool:
        """Returns whether this is a change."""
        with self._lock:
            if connected == self.connected:
                return False
            self.connected = connected
            if connected:
                self.disconnected_mono = None
                self._broker_timer.disarm()
            else:
                self.disconnected_mono = time.monotonic()
                self._broker_timer.arm_at(self.disconnected_mono + self._kill_after)
            self._push()
            return True

    def set_load(self, running: int, waiting: int) -> None:
        """The dispatcher's counts. Work arriving at an idle service starts
        the stall clock now, not at the last job of long ago."""
        with self._lock:
            if (running, waiting) == (self.running, self.waiting):
                return
            was_busy = self.running + self.waiting > 0
            busy = running + waiting > 0
            self.running, self.waiting = running, waiting
            if busy and not was_busy:
                self.progress_mono = time.monotonic()
                self._stall_timer.arm_at(self.progress_mono + self._stall_after)
            elif not busy:
                self._stall_timer.disarm()
            self._push()

    def progress(self) -> None:
        """Forward progress: a long handler says it is still going."""
        with self._lock:
            self._progressed()
            self._push()

    def job(self, took: float) -> None:
        """A job ended after `took` seconds: progress, and `avg_job_ms`."""
        ms = took * 1000
        with self._lock:
            avg = self.avg_job_ms
            self.avg_job_ms = ms if avg is None else avg + AVG_JOB_WEIGHT * (ms - avg)
            self._progressed()
            self._push()

    def close(self) -> None:
        """A clean stop: neither rule may fire any more."""
        self._broker_timer.close()
        self._stall_timer.close()

    def _progressed(self) -> None:
        self.progress_mono = time.monotonic()
        self.last_progress_ts = time.time()
        if self.running + self.waiting > 0:
            self._stall_timer.arm_at(self.progress_mono + self._stall_after)

    def _push(self) -> None:
        snapshot: dict[str, Any] = {
            "connected": self.connected,
            "disconnected_mono": self.disconnected_mono,
            "running": self.running,
            "waiting": self.waiting,
            "progress_mono": self.progress_mono,
            "last_progress_ts": self.last_progress_ts,
            "avg_job_ms": round(self.avg_job_ms, 3) if self.avg_job_ms is not None else None,
        }
        self._beacon.vitals(snapshot)
