"""The few numbers that say whether a service is healthy, and who hears of them.

Every change goes, at once and from whichever thread made it, to the two
parts that must not depend on the service's threads: the watchdog's
kernel timers (`_watchdog`) and the block of shared memory the heartbeat
companion reads (`_shared`). So when a handler then gets stuck, both
already know everything up to the moment it did. Neither costs a message:
the block is plain memory, and the stall timer is moved only when its
deadline would otherwise come too early (see `STALL_TIMER_SLACK`).
"""

from __future__ import annotations

import threading
import time
from typing import Optional

from ._beacon import Beacon
from ._config import Limits
from ._shared import SharedVitals
from ._watchdog import EXIT_BROKER_LOST, EXIT_STALLED, ExitTimer

#: Weight of the newest job in `avg_job_ms`, an exponential moving average,
#: so a service that slows down shows it within a few jobs.
AVG_JOB_WEIGHT = 0.2
#: The stall timer is armed this much (at most 100 ms, and at most a
#: twentieth of `LIVENESS_MAX_STALL_MS`) past the deadline progress asks
#: for, and moved only once progress has caught up with that margin: a busy
#: service moves it ~10 times a second instead of on every job, and a stall
#: ends the process at most that much late (the Rust runtime's watchdog
#: looks every 250 ms). Never early.
STALL_TIMER_SLACK = 0.1


class Vitals:
    def __init__(self, limits: Limits, beacon: Beacon, shared: SharedVitals) -> None:
        self._lock = threading.Lock()
        self._beacon = beacon
        self._shared = shared
        self._kill_after = limits.disconnect_kill_ms / 1000
        self._stall_after = limits.liveness_max_stall_ms / 1000
        self._stall_slack = min(STALL_TIMER_SLACK, self._stall_after / 20)
        self._broker_timer = ExitTimer(EXIT_BROKER_LOST)
        self._stall_timer = ExitTimer(EXIT_STALLED)
        #: The deadline the stall timer is armed at, None while disarmed.
        self._stall_deadline: Optional[float] = None
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
            self._write()

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
            self._write()
        # A change of the service's own connection is news now.
        self._beacon.connection_changed()
        return True

    def set_load(self, running: int, waiting: int) -> None:
        """The dispatcher's counts. Work arriving at an idle service starts
        the stall clock now, not at the last job of long ago."""
        with self._lock:
            if running == self.running and waiting == self.waiting:
                return
            was_busy = self.running + self.waiting > 0
            busy = running + waiting > 0
            self.running, self.waiting = running, waiting
            if busy and not was_busy:
                self.progress_mono = time.monotonic()
                self._push_stall_deadline()
            elif not busy and self._stall_deadline is not None:
                self._stall_deadline = None
                self._stall_timer.disarm()
            self._write()

    def progress(self) -> None:
        """Forward progress: a long handler says it is still going."""
        with self._lock:
            self._progressed()
            self._write()

    def job(self, took: float) -> None:
        """A job ended after `took` seconds: progress, and `avg_job_ms`."""
        ms = took * 1000
        with self._lock:
            avg = self.avg_job_ms
            self.avg_job_ms = ms if avg is None else avg + AVG_JOB_WEIGHT * (ms - avg)
            self._progressed()
            self._write()

    def close(self) -> None:
        """A clean stop: neither rule may fire any more."""
        self._broker_timer.close()
        self._stall_timer.close()

    def _progressed(self) -> None:
        self.progress_mono = time.monotonic()
        self.last_progress_ts = time.time()
        if self.running + self.waiting > 0:
            self._push_stall_deadline()

    def _push_stall_deadline(self) -> None:
        """Keeps the stall timer at or past last progress + the limit."""
        due = self.progress_mono + self._stall_after
        if self._stall_deadline is None or self._stall_deadline < due:
            self._stall_deadline = due + self._stall_slack
            self._stall_timer.arm_at(self._stall_deadline)

    def _write(self) -> None:
        self._shared.write(
            self.connected,
            self.disconnected_mono,
            self.running,
            self.waiting,
            self.progress_mono,
            self.last_progress_ts,
            self.avg_job_ms,
        )
