"""Which node of a clustered broker to try next, and how long to wait first.

The Rust client's `Failover` (`client/src/connection.rs`), step for step:
after a failed try or a lost connection the next URL of the list is tried,
round robin, after the shortest wait; only a full round of failures waits
the growing backoff (doubling up to its bound, and back to the shortest
once a connection has lasted `STABLE`). With one URL this is a plain
doubling backoff. The refusal rule gives up only once every node refused.
"""

from __future__ import annotations

from typing import Any, Optional

from ._config import MqttUrl

#: How long a connection must last before the next failure counts as a new one.
STABLE = 10.0
#: Lasting refusals in a row a service takes before it gives up, at least.
REFUSALS_BEFORE_GIVING_UP = 3

#: CONNACK reason codes that will repeat (the Rust `lasting_refusal`):
#: unsupported protocol, client id not valid, bad user name or password,
#: not authorized, banned, bad authentication method, topic name invalid,
#: packet too large, payload format invalid, retain or QoS not supported.
LASTING_CONNACK = frozenset({0x84, 0x85, 0x86, 0x87, 0x8A, 0x8C, 0x90, 0x95, 0x99, 0x9A, 0x9B})
#: DISCONNECT reason codes that will repeat: malformed packet, protocol
#: error, not authorized, topic filter or name invalid, topic alias
#: invalid, packet too large, payload format invalid, retain or QoS not
#: supported, shared subscriptions, subscription identifiers or wildcard
#: subscriptions not supported.
LASTING_DISCONNECT = frozenset({0x81, 0x82, 0x87, 0x8F, 0x90, 0x94, 0x95, 0x99, 0x9A, 0x9B, 0x9E, 0xA1, 0xA2})
#: SUBACK reason codes that refuse a filter for good.
LASTING_SUBACK = frozenset({0x87, 0x8F, 0x9E, 0xA1, 0xA2})


class Failover:
    def __init__(self, urls: list[MqttUrl], backoff_min: float, backoff_max: float) -> None:
        if not urls:
            raise ValueError("no broker URL")
        self.urls = urls
        self.min = backoff_min
        self.max = backoff_max
        self.at = 0
        #: Failures since the last connection that lasted `STABLE`; every
        #: `len(urls)`th one ends a round.
        self.failures = 0
        self.next_wait = backoff_min
        self.since: Optional[float] = None

    @property
    def current(self) -> MqttUrl:
        return self.urls[self.at]

    def refusals_before_giving_up(self) -> int:
        return max(REFUSALS_BEFORE_GIVING_UP, len(self.urls))

    def connected(self, now: float) -> None:
        self.since = now

    def after_failure(self, now: float) -> float:
        """Moves to the next node; returns how long to wait before trying it."""
        if self.since is not None:
            if now - self.since >= STABLE:
                self.next_wait = self.min
                self.failures = 0
            self.since = None
        self.failures += 1
        self.at = (self.at + 1) % len(self.urls)
        if self.failures % len(self.urls) == 0:
            wait = self.next_wait
            self.next_wait = min(self.next_wait * 2, self.max)
            return wait
        return self.min


def point_at(client: Any, url: MqttUrl) -> None:
    """Points a paho client, not connected, at `url` for its next
    `reconnect()`. paho's `host`/`port`/`transport` setters refuse after a
    lost connection (its state stays "connection lost"), so the attributes
    they guard are set directly."""
    client._host = url.unix or url.host
    # paho wants a port even for a Unix socket, and ignores it there.
    client._port = url.port or 1883
    client._transport = "unix" if url.unix else "tcp"
    client.username_pw_set(url.user or None, url.password if url.user else None)


def reason_value(reason: Any) -> Optional[int]:
    """The numeric MQTT 5 reason code paho hands a callback, if any."""
    value = getattr(reason, "value", reason)
    return value if isinstance(value, int) else None
