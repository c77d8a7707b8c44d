"""Axion's service runtime for Python services, natively over MQTT.

What the Rust runtime (`axion_heartbeat::runtime`) gives Rust services:
queues served by credit (claims, releases, progress for long tasks), event
handlers with replies, the retained heartbeat with its will, overload
refused at once, a drain on SIGTERM, and the fail-fast exits the
supervisor restarts on (70: broker gone longer than `DISCONNECT_KILL_MS`;
71: work pending with no progress for `LIVENESS_MAX_STALL_MS`), which hold
even while a handler is stuck in C code holding the GIL::

    import sys
    from axion_client import Service

    def generate(task):
        return {"embeddings": [embed(t) for t in task.payload["items"]]}

    sys.exit(Service("embedding", package="homechoice").queue("embedding.generate", generate).run())
"""

from ._config import ConfigError, Limits
from ._message import Event, Task
from ._service import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, EnqueueRefused, Service
from ._watchdog import EXIT_BROKER_LOST, EXIT_STALLED

__all__ = [
    "EXIT_BROKER_LOST",
    "EXIT_CONFIG",
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_STALLED",
    "ConfigError",
    "EnqueueRefused",
    "Event",
    "Limits",
    "Service",
    "Task",
]
