"""The fail-fast watchdog: deadlines kept by the kernel, fired without the GIL.

A Python thread cannot be the watchdog: a handler stuck in C code that holds
the GIL (a pathological regular expression, a C extension that never
releases it) stops every Python thread, the watchdog's too. A watchdog
process cannot be it either: it could kill the service, but the supervisor
(PM2) would then see a signal, not exit code 70 or 71.

So each rule is a POSIX timer (`timer_create` with `SIGEV_THREAD`) whose
expiry makes the C library start a native thread that calls `_exit(code)`
directly: no Python code, no GIL, and the process's own exit status is the
code. The service moves the deadlines as it runs: the broker timer is armed
while the broker is unreachable (at loss + `DISCONNECT_KILL_MS`) and
disarmed on reconnect; the stall timer is armed while work is pending (at
last progress + `LIVENESS_MAX_STALL_MS`), pushed back on every progress and
disarmed when idle. A service that cannot move a deadline in time is by
definition the one that must die.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

from ._config import ConfigError

#: Exit code when the broker stayed unreachable too long.
EXIT_BROKER_LOST = 70
#: Exit code when pending work made no progress for too long.
EXIT_STALLED = 71

_CLOCK_MONOTONIC = 1
_SIGEV_THREAD = 2
_TIMER_ABSTIME = 1


class _Sigevent(ctypes.Structure):
    # struct sigevent on Linux (glibc and musl): the value the notify
    # function receives, then signo, notify, and the SIGEV_THREAD pair,
    # padded to 64 bytes.
    _fields_ = [
        ("value", ctypes.c_void_p),
        ("signo", ctypes.c_int),
        ("notify", ctypes.c_int),
        ("function", ctypes.c_void_p),
        ("attribute", ctypes.c_void_p),
        ("_pad", ctypes.c_byte * 32),
    ]


class _Timespec(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("interval", _Timespec), ("value", _Timespec)]


def _libc() -> ctypes.CDLL:
    """The C library with `timer_create` (in libc since glibc 2.34, librt before)."""
    for name in (None, ctypes.util.find_library("rt")):
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError:
            continue
        if hasattr(lib, "timer_create") and hasattr(lib, "_exit"):
            return lib
    raise ConfigError("the watchdog needs POSIX timers (timer_create); this platform has none")


class ExitTimer:
    """One deadline that ends the process with `code` when it passes.

    `arm_at` and `disarm` are two syscalls each (ctypes releases the GIL
    around them), cheap enough to call on every job.
    """

    def __init__(self, code: int) -> None:
        self._lib = _libc()
        self._lib.timer_create.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        self._lib.timer_settime.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        self._lib.timer_delete.argtypes = [ctypes.c_void_p]
        # The notify function gets `value` as its one argument: `_exit(code)`.
        self._event = _Sigevent(
            value=code,
            notify=_SIGEV_THREAD,
            function=ctypes.cast(self._lib._exit, ctypes.c_void_p).value,
        )
        self._timer = ctypes.c_void_p()
        if self._lib.timer_create(_CLOCK_MONOTONIC, ctypes.byref(self._event), ctypes.byref(self._timer)) != 0:
            err = ctypes.get_errno()
            raise ConfigError(f"cannot create the watchdog timer: {os.strerror(err)}")
        self._lock = threading.Lock()

    def arm_at(self, deadline: float) -> None:
        """Fires at `deadline`, in `time.monotonic()` seconds (CLOCK_MONOTONIC)."""
        # 0 would disarm; a deadline already past fires at once.
        deadline = max(deadline, 1e-6)
        sec = int(deadline)
        spec = _Itimerspec(value=_Timespec(sec, int((deadline - sec) * 1e9)))
        self._settime(spec, _TIMER_ABSTIME)

    def disarm(self) -> None:
        self._settime(_Itimerspec(), 0)

    def _settime(self, spec: _Itimerspec, flags: int) -> None:
        with self._lock:
            if self._timer is not None:
                self._lib.timer_settime(self._timer, flags, ctypes.byref(spec), None)

    def close(self) -> None:
        """Disarms and frees the timer: after a clean stop nothing may fire."""
        with self._lock:
            if self._timer is not None:
                self._lib.timer_delete(self._timer)
                self._timer = None
