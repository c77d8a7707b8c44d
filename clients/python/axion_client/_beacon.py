"""The service's side of its heartbeat companion process.

The Rust runtime publishes its heartbeat from a thread of its own, so the
record keeps going out (and tells the truth) while a handler is stuck. A
Python thread cannot promise that: a handler holding the GIL in C code
stops them all. So the heartbeat lives in a child process with its own
interpreter and its own MQTT connection (`_companion`). It reads the
service's live numbers from shared memory (`_shared`); its stdin carries
the configuration, the few moments that need a record at once (the
service's connection changed, the drain began) and the final `stop`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from typing import Any


class Beacon:
    """The service's handle on its heartbeat companion; usable from any thread."""

    def __init__(self, config: dict[str, Any], vitals_fd: int) -> None:
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "axion_client._companion"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            env=env,
            pass_fds=(vitals_fd,),
        )
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._detach)
        self._send({**config, "vitals_fd": vitals_fd})

    def _detach(self) -> None:
        """In a process forked from the service (multiprocessing): let go of
        the companion's stdin, whose end of file is how the companion learns
        that the service ended."""
        self._lock = threading.Lock()
        if self._proc.stdin is not None:
            self._proc.stdin.close()

    def alive(self) -> bool:
        return self._proc.poll() is None

    def connection_changed(self) -> None:
        """Publishes a record at once: the service's connection changed (the
        numbers are in the shared block already)."""
        self._send({"kind": "connection"})

    def draining(self) -> None:
        """Publishes `draining` at once."""
        self._send({"kind": "draining"})

    def stop(self, reason: str, wait: float) -> bool:
        """Publishes `offline` with `reason`, waits at most `wait` seconds for
        the broker to take it; True once it did."""
        self._send({"kind": "stop", "reason": reason, "wait": wait})
        try:
            return self._proc.wait(wait + 2.0) == 0
        except subprocess.TimeoutExpired:
            self._proc.kill()
            return False

    def _send(self, message: dict[str, Any]) -> None:
        line = (json.dumps(message) + "\n").encode()
        with self._lock:
            stdin = self._proc.stdin
            if stdin is None or stdin.closed:
                return
            try:
                stdin.write(line)
                stdin.flush()
            except (BrokenPipeError, ValueError):
                # Gone: the service's tick notices and ends the service.
                stdin.close()


def nodelay(client: Any, userdata: Any, sock: Any) -> None:
    """paho's socket-open hook: every heartbeat and queue hand-off is a small
    message, and Nagle's algorithm would hold each back ~40 ms."""
    if getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
