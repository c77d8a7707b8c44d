"""What handlers receive (a task record, an event envelope) and where their
answers go.

`replyTo` is an event type in the legacy protocol (`embedding.result` →
`axion/<pkg>/event/embedding/result`) and a whole topic when it comes as an
MQTT 5 Response Topic; both are resolved here, once, so tasks, events and
overload refusals reply the same way. Replies are event envelopes
(docs/DESIGN.md "Bodies"), so WebSocket clients of the bridge receive them
like any other event.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Optional

from ._config import event_topic

log = logging.getLogger("axion_client")


@dataclass
class Task:
    """A task as the queue owner delivered it (docs/DESIGN.md "Task record")."""

    id: str
    queue: str
    payload: Any
    #: Unix milliseconds.
    created_at: int
    #: Deliveries including this one.
    attempts: int
    reply_to: Optional[str] = None
    correlation_id: Optional[str] = None
    _progress: Callable[[], None] = field(default=lambda: None, repr=False, compare=False)

    def progress(self) -> None:
        """Tells the watchdog this long task is still moving, so a job longer
        than `LIVENESS_MAX_STALL_MS` is not mistaken for a hang. (The queue
        owner's ack wait is extended automatically.)"""
        self._progress()


@dataclass
class Event:
    """An event as received (docs/DESIGN.md "Event envelope")."""

    #: `t1.t2.…`, from the envelope or, for a bare MQTT payload, the topic.
    type: str
    payload: Any
    #: The MQTT topic it arrived on.
    topic: str
    source: Optional[str] = None
    timestamp: Optional[str] = None
    correlation_id: Optional[str] = None
    #: Where the answer goes: an event type or a whole topic.
    reply_to: Optional[str] = None
    _progress: Callable[[], None] = field(default=lambda: None, repr=False, compare=False)

    def progress(self) -> None:
        """See `Task.progress`."""
        self._progress()


def task_from_wire(body: dict, queue: str, progress: Callable[[], None]) -> Task:
    """The handler's view of a task record (`worker` stays with the engine)."""
    return Task(
        id=str(body["id"]),
        queue=body.get("queue") or queue,
        payload=body.get("payload"),
        created_at=int(body.get("createdAt") or 0),
        attempts=int(body.get("attempts") or 0),
        reply_to=body.get("replyTo") or None,
        correlation_id=body.get("correlationId") or None,
        _progress=progress,
    )


@dataclass(frozen=True)
class ReplyTarget:
    """Where and how to answer one request."""

    topic: str
    #: The event type of the reply envelope.
    event_type: str
    correlation_id: Optional[str] = None
    #: MQTT 5 Correlation Data to echo.
    correlation_data: Optional[bytes] = None

    @classmethod
    def resolve(
        cls,
        package: str,
        reply_to: Optional[str],
        correlation_id: Optional[str],
        correlation_data: Optional[bytes],
    ) -> Optional["ReplyTarget"]:
        """`reply_to` is an event type, or a topic when it has a `/`; `None`
        when there is none or it cannot be a publish topic."""
        if not reply_to:
            return None
        if "/" in reply_to:
            prefix = f"axion/{package}/event/"
            topic = reply_to
            event_type = reply_to[len(prefix) :].replace("/", ".") if reply_to.startswith(prefix) else reply_to
        else:
            topic, event_type = event_topic(package, reply_to), reply_to
        if any(c in topic for c in "+#\0") or topic.startswith("$"):
            log.warning("reply target %r is not a publish topic; no reply sent", reply_to)
            return None
        return cls(topic, event_type, correlation_id, correlation_data)

    def envelope(self, source: str, payload: Any) -> bytes:
        """The reply envelope around `payload`."""
        env = {"type": self.event_type, "source": source, "payload": payload, "timestamp": now_iso()}
        if self.correlation_id:
            env["correlationId"] = self.correlation_id
        return json.dumps(env).encode()


def parse_event(
    package: str,
    topic: str,
    body: bytes,
    response_topic: Optional[str],
    correlation_data: Optional[bytes],
    progress: Callable[[], None],
) -> Event:
    """An envelope, or a bare MQTT payload that gets its type from the topic
    (as the bridge does)."""
    prefix = f"axion/{package}/event/"
    topic_type = (topic[len(prefix) :] if topic.startswith(prefix) else topic).replace("/", ".")
    try:
        value = json.loads(body)
    except ValueError:
        value = body.decode("utf-8", errors="replace")
    data_corr = correlation_data.decode("utf-8", errors="replace") if correlation_data else None

    if isinstance(value, dict) and isinstance(value.get("type"), str):

        def text(key: str) -> Optional[str]:
            v = value.get(key)
            return v if isinstance(v, str) and v else None

        return Event(
            type=text("type") or topic_type,
            payload=value.get("payload"),
            topic=topic,
            source=text("source"),
            timestamp=text("timestamp"),
            correlation_id=text("correlationId") or data_corr,
            reply_to=response_topic or text("replyTo"),
            _progress=progress,
        )
    return Event(
        type=topic_type,
        payload=value,
        topic=topic,
        correlation_id=data_corr,
        reply_to=response_topic,
        _progress=progress,
    )


def event_envelope(event_type: str, source: str, payload: Any, **extra: Any) -> bytes:
    """An event envelope as `publish` sends it."""
    env = {"type": event_type, "source": source, "payload": payload, "timestamp": now_iso()}
    env.update({k: v for k, v in extra.items() if v is not None})
    return json.dumps(env).encode()


def now_iso() -> str:
    """ISO-8601 UTC with milliseconds, as the Rust runtime writes it."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
