"""What a service is told by its environment: broker URL, limits, names.

The variables, their defaults and their checks are the Rust runtime's
(`heartbeat/src/runtime/limits.rs`, `heartbeat/src/url.rs`), so an operator
tunes a Python service exactly as a Rust one.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional

#: Broker URL when neither the caller nor `AXION_MQTT_URL` gives one.
DEFAULT_MQTT_URL = "mqtt://127.0.0.1:1883"
#: Package when neither the caller nor `AXION_PACKAGE` gives one.
DEFAULT_PACKAGE = "default"
#: `HEARTBEAT_INTERVAL_SECS` default.
DEFAULT_INTERVAL_SECS = 15
#: `HEARTBEAT_GHOST_SECS` default: how long a dead instance's record stays retained.
DEFAULT_GHOST_SECS = 3600


class ConfigError(ValueError):
    """The service cannot run as configured; `run()` returns 78 (EX_CONFIG)."""


def env_or(name: str, default: str) -> str:
    """`name` from the environment, `default` when unset or blank."""
    value = os.environ.get(name, "").strip()
    return value or default


def env_flag(name: str) -> bool:
    """A yes/no switch from the environment (`1`/`true`, `0`/`false`, unset
    or blank for no), read as the Rust runtime reads it; anything else is a
    config error."""
    raw = os.environ.get(name, "").strip().lower()
    if raw in ("", "0", "false"):
        return False
    if raw in ("1", "true"):
        return True
    raise ConfigError(f"environment variable {name}={raw!r} is not 1, true, 0 or false")


def env_int(name: str, default: int) -> int:
    """A whole number from the environment; a malformed one is a config error."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit():
        raise ConfigError(f"environment variable {name}={raw!r} is not a whole number")
    return int(raw)


@dataclass(frozen=True)
class Limits:
    """How much work a service takes and how quickly it gives up."""

    #: Handlers running at once (`MAX_INFLIGHT`); also the queue credit.
    max_inflight: int = 8
    #: Requests waiting for a slot (`MAX_QUEUE`); beyond it an event request
    #: is answered `overloaded` at once.
    max_queue: int = 256
    #: Exit 70 after the broker has been unreachable this long.
    disconnect_kill_ms: int = 10_000
    #: Exit 71 after work has been pending this long with no progress.
    liveness_max_stall_ms: int = 30_000
    #: How long SIGTERM waits for running handlers before handing their tasks back.
    drain_ms: int = 5_000
    #: The queue owner's ack wait; `progress` goes out every third of it
    #: while a task is held.
    ack_wait_ms: int = 30_000

    @classmethod
    def from_env(cls) -> "Limits":
        """The defaults, overridden by `MAX_INFLIGHT`, `MAX_QUEUE`,
        `DISCONNECT_KILL_MS`, `LIVENESS_MAX_STALL_MS`, `DRAIN_MS` and
        `AXION_QUEUE_ACK_WAIT_MS` when set."""
        d = cls()
        return cls(
            max_inflight=env_int("MAX_INFLIGHT", d.max_inflight),
            max_queue=env_int("MAX_QUEUE", d.max_queue),
            disconnect_kill_ms=env_int("DISCONNECT_KILL_MS", d.disconnect_kill_ms),
            liveness_max_stall_ms=env_int("LIVENESS_MAX_STALL_MS", d.liveness_max_stall_ms),
            drain_ms=env_int("DRAIN_MS", d.drain_ms),
            ack_wait_ms=env_int("AXION_QUEUE_ACK_WAIT_MS", d.ack_wait_ms),
        )

    def validate(self) -> None:
        """Refuses limits that would make the service useless or the watchdog blind."""
        if self.max_inflight < 1:
            raise ConfigError("MAX_INFLIGHT must be at least 1")
        if self.max_queue < 0 or self.drain_ms < 0:
            raise ConfigError("MAX_QUEUE and DRAIN_MS must not be negative")
        if self.disconnect_kill_ms < 1 or self.liveness_max_stall_ms < 1:
            raise ConfigError("DISCONNECT_KILL_MS/LIVENESS_MAX_STALL_MS must be at least 1")
        if self.ack_wait_ms < 30:
            raise ConfigError("AXION_QUEUE_ACK_WAIT_MS must be at least 30")


@dataclass(frozen=True)
class MqttUrl:
    """`mqtt://[user[:password]@]host[:port]` or `unix://[user[:password]@]/path`."""

    host: str
    port: int
    unix: Optional[str] = None
    user: Optional[str] = None
    password: Optional[str] = None

    @classmethod
    def parse(cls, url: str) -> "MqttUrl":
        if url.startswith("unix://"):
            rest = url[len("unix://") :]
            at = rest.find("@/")
            creds, path = (rest[:at], rest[at + 1 :]) if at >= 0 else (None, rest)
            if not path.startswith("/") or len(path) < 2:
                raise ConfigError(
                    f"broker URL {url!r} must name an absolute socket path, as in unix:///run/axion/mqtt.sock"
                )
            user, password = _credentials(creds)
            return cls(host="", port=0, unix=path, user=user, password=password)
        for scheme in ("mqtt://", "tcp://"):
            if url.startswith(scheme):
                rest = url[len(scheme) :].rstrip("/")
                break
        else:
            raise ConfigError(f"broker URL {url!r} must start with mqtt:// (or tcp://, or unix:// for a Unix socket)")
        creds, _, hostport = rest.rpartition("@")
        user, password = _credentials(creds or None)
        host, port = hostport, 1883
        head, sep, tail = hostport.rpartition(":")
        # An IPv6 literal without a port ("[::1]") ends in "]".
        if sep and not tail.endswith("]"):
            if not tail.isdigit() or int(tail) > 65535:
                raise ConfigError(f"broker URL {url!r} has an invalid port {tail!r}")
            host, port = head, int(tail)
        host = host.strip("[]")
        if not host:
            raise ConfigError(f"broker URL {url!r} has no host")
        return cls(host=host, port=port, user=user, password=password)

    def with_env_credentials(self) -> "MqttUrl":
        """Fills user and password from `AXION_MQTT_USER`/`AXION_MQTT_PASSWORD`
        when the URL carries none."""
        user = self.user or os.environ.get("AXION_MQTT_USER") or None
        password = self.password if self.password is not None else os.environ.get("AXION_MQTT_PASSWORD")
        return MqttUrl(self.host, self.port, self.unix, user, password)

    def __str__(self) -> str:
        # The password never reaches a log line.
        user = f"{self.user}@" if self.user else ""
        if self.unix:
            return f"unix://{user}{self.unix}"
        return f"mqtt://{user}{self.host}:{self.port}"


def parse_broker_urls(text: str) -> list[MqttUrl]:
    """The brokers a service may reach, in the order it tries them: one URL,
    or the nodes of a clustered broker comma-separated
    (`mqtt://a:1883,mqtt://b:1883`). Each entry is checked on its own, and
    a bad one is named by its position."""
    entries = [e.strip() for e in text.split(",")]
    if len(entries) == 1:
        if not entries[0]:
            raise ConfigError("no broker URL given")
        return [MqttUrl.parse(entries[0])]
    urls = []
    for i, entry in enumerate(entries, 1):
        if not entry:
            raise ConfigError(f"the broker URL list has an empty entry (entry {i}); separate URLs with single commas")
        try:
            urls.append(MqttUrl.parse(entry))
        except ConfigError as err:
            raise ConfigError(f"entry {i} of the broker URL list: {err}") from None
    return urls


def _credentials(creds: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    if creds is None:
        return None, None
    user, sep, password = creds.partition(":")
    return user, (password if sep else None)


def validate_level(what: str, value: str) -> None:
    """Checks that `value` can stand as one topic level (docs/DESIGN.md "Topic tree")."""
    if not value:
        raise ConfigError(f"{what} must not be empty")
    if any(c in value for c in "/+#\0"):
        raise ConfigError(f"{what} {value!r} must not contain '/', '+', '#' or NUL")


def validate_event_type(event_type: str) -> None:
    """Dot-separated non-empty segments; `+` and `#` only as whole segments, `#` last."""
    segs = event_type.split(".")
    ok = (
        bool(event_type)
        and "/" not in event_type
        and "\0" not in event_type
        and all(
            s and (s in ("+", "#") or ("+" not in s and "#" not in s)) and (s != "#" or i == len(segs) - 1)
            for i, s in enumerate(segs)
        )
    )
    if not ok:
        raise ConfigError(
            f"event type {event_type!r} must be dot-separated non-empty segments without '/' "
            "('+' and '#' only as whole segments)"
        )


def sanitize_client_id(raw: str) -> str:
    """A client id any broker accepts: anything outside a safe set becomes `_`
    (rumqttd's listener dies on `/ + # $` in a client id)."""
    return re.sub(r"[^A-Za-z0-9\-_.:]", "_", raw)


def event_topic(package: str, event_type: str) -> str:
    """`axion/<pkg>/event/<t1>/<t2>/…` for the event type `t1.t2.…`."""
    return f"axion/{package}/event/{event_type.replace('.', '/')}"


def queue_topic(package: str, queue: str, leaf: str) -> str:
    """`axion/<pkg>/queue/<queue>/<leaf>`."""
    return f"axion/{package}/queue/{queue}/{leaf}"


def queue_tasks_shared(package: str, queue: str) -> str:
    """The shared subscription workers use; one group name per queue, because
    rumqttd keys shared groups by name alone."""
    return f"$share/{package}.{queue}/{queue_topic(package, queue, 'tasks')}"


def queue_tasks_directed(package: str, queue: str, worker: str) -> str:
    """`axion/<pkg>/queue/<queue>/tasks/<worker>`: where the owner delivers a
    worker's tasks by directed delivery (a broker without shared
    subscriptions)."""
    return f"{queue_topic(package, queue, 'tasks')}/{worker}"


def announce_topic(package: str) -> str:
    """`axion/<pkg>/cmd/announce`: anyone may ask every instance to republish."""
    return f"axion/{package}/cmd/announce"


# Asks every instance of every package to republish its heartbeat (what a
# fleet-wide reader such as `axion monitor` sends on connect).
ANNOUNCE_FLEET = "axion/cmd/announce"
