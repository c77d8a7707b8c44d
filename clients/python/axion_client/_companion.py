"""The heartbeat companion process (`python -m axion_client._companion`).

It publishes the service's retained docs/DESIGN.md record exactly as the
Rust publisher does: over its own MQTT connection whose will is the record
as `offline`/`lost`, retained, with MQTT 5 message expiry, every
`HEARTBEAT_INTERVAL_SECS`, at once on every CONNACK, on a change of the
service's connection, on `axion/<pkg>/cmd/announce`, and when someone
else's record (a late will of an earlier run) lands on its topic. It reads
the service's live numbers from shared memory (`_shared`) each time it
builds a record; its stdin (`_beacon`) says when to publish at once and
when to stop.

When the service process ends without saying `stop` (stdin closes), the
companion works out why from the last numbers the service wrote, by the
watchdog's own rules: broker gone too long (70) or work stalled (71) — it
publishes `offline` with that reason, as the Rust watchdog does — or
neither (killed, crashed): then it drops its connection without
DISCONNECT, so the broker publishes the will, `lost`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import threading
import time
import uuid
from typing import Any, Optional

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ._beacon import nodelay
from ._config import ANNOUNCE_FLEET, MqttUrl
from ._failover import Failover, point_at
from ._shared import VitalsReader

log = logging.getLogger("axion_client")

#: Keep-alive of the heartbeat connection: the broker fires the will of a
#: hung (SIGSTOPped, partitioned) instance after 1.5 × this.
KEEP_ALIVE_SECS = 5
#: Announces and corrections are answered at most this often.
MIN_REPUBLISH_GAP = 0.5
#: How close to a watchdog threshold the last numbers must be for the
#: companion to name that rule as the reason the service ended.
RULE_SLACK = 0.25


def _proc_stat(pid: int) -> Optional[list[str]]:
    """`/proc/<pid>/stat` fields from the third on (after the command name)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def _boot_time() -> Optional[float]:
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


class _ProcessFacts:
    """What `/proc` says of the service process: who it is (for the reaper),
    its CPU and its memory, as the Rust publisher reports them."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.hz = os.sysconf("SC_CLK_TCK")
        stat = _proc_stat(pid)
        self.start_ticks = int(stat[19]) if stat else None
        btime = _boot_time()
        self.started_at = btime + self.start_ticks / self.hz if btime and self.start_ticks is not None else None
        self.host_boot_id = _read("/proc/sys/kernel/random/boot_id") if stat else None
        self._last: Optional[tuple[float, int]] = None

    def cpu_percent(self) -> Optional[float]:
        """Over the last interval; over the whole life at the first sample."""
        stat = _proc_stat(self.pid)
        if not stat or self.start_ticks is None or int(stat[19]) != self.start_ticks:
            return None
        ticks = int(stat[11]) + int(stat[12])
        now = time.time()
        pct = None
        if self._last is not None:
            secs = now - self._last[0]
            if secs > 0:
                pct = (ticks - self._last[1]) / self.hz / secs * 100.0
        elif self.started_at is not None and now > self.started_at:
            pct = ticks / self.hz / (now - self.started_at) * 100.0
        self._last = (now, ticks)
        return pct

    def memory_bytes(self) -> Optional[int]:
        statm = _read(f"/proc/{self.pid}/statm")
        if not statm:
            return None
        return int(statm.split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Companion:
    """The heartbeat of one service process: its record, its connection,
    and what it is told on stdin."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.service: str = cfg["service"]
        self.package: str = cfg["package"]
        self.hostname: str = cfg["host"]
        self.pid: int = cfg["pid"]
        self.port_slot: int = cfg["pid"]
        self.instance_id = f"{self.hostname}:{self.port_slot}"
        self.topic = f"axion/{self.package}/heartbeat/{self.service}/{self.instance_id}"
        self.announce = f"axion/{self.package}/cmd/announce"
        self.interval = max(1, int(cfg["interval_secs"]))
        self.boot_id = str(uuid.uuid4())
        self.started = time.monotonic()
        self.facts = _ProcessFacts(self.pid)
        self.lock = threading.Lock()
        self.seq = 0
        self.status = "online"
        self.vitals = VitalsReader(int(cfg["vitals_fd"]))
        self.cond = threading.Condition()
        self.pending_at: Optional[float] = None
        self.last_publish = 0.0
        self.stopping = False
        self.mqtt_up = threading.Event()
        self.mqtt_down = threading.Event()

        def props(kind: int) -> Any:
            p = Properties(kind)
            p.PayloadFormatIndicator = 1
            p.MessageExpiryInterval = int(cfg["ghost_secs"])
            p.ContentType = "application/json"
            return p

        self.publish_props = props(PacketTypes.PUBLISH)
        self.will_props = props(PacketTypes.WILLMESSAGE)
        # The broker's nodes: after a lost connection or a failed try, the
        # next one (paho's own reconnect loop then waits, 0.2 s doubling).
        self.failover = Failover([MqttUrl(**u) for u in cfg["mqtt"]], 0.2, 5.0)
        client_id = cfg["client_id"]
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
            transport="unix" if self.failover.current.unix else "tcp",
        )
        point_at(self.client, self.failover.current)
        self.client.reconnect_delay_set(0.2, 5)
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_socket_open = nodelay
        self._set_will()
        first = self.failover.current
        # paho wants a port even for a Unix socket, and ignores it there.
        self.client.connect_async(
            first.unix or first.host, first.port or 1883, keepalive=KEEP_ALIVE_SECS, clean_start=True
        )

    # The record.

    def record(self, status: str, reason: Optional[str], seq: int) -> dict[str, Any]:
        v = self.vitals.read()
        rec: dict[str, Any] = {
            "service": self.service,
            "instance_id": self.instance_id,
            "hostname": self.hostname,
            "port": self.port_slot,
            "package": self.package,
            "pid": self.pid,
            "uptime_seconds": int(time.monotonic() - self.started),
            "timestamp": time.time(),
            "status": status,
            "boot_id": self.boot_id,
            "seq": seq,
            "interval_secs": self.interval,
            "connected": v["connected"],
            "queue_depth": v["waiting"],
            "inflight": v["running"],
        }
        if reason is not None:
            rec["reason"] = reason
        optional = {
            "last_progress_ts": v["last_progress_ts"],
            "avg_job_ms": v["avg_job_ms"],
            "cpu_percent": self.facts.cpu_percent(),
            "memory_bytes": self.facts.memory_bytes(),
            "started_at": self.facts.started_at,
            "proc_start_ticks": self.facts.start_ticks,
            "host_boot_id": self.facts.host_boot_id,
        }
        rec.update({k: val for k, val in optional.items() if val is not None})
        rec.update(self.cfg.get("extras") or {})
        return rec

    def _set_will(self) -> None:
        """This run's record as `lost`, for the next connection."""
        with self.lock:
            payload = json.dumps(self.record("offline", "lost", self.seq))
        self.client.will_set(self.topic, payload, qos=1, retain=True, properties=self.will_props)

    def _publish(self, status: str, reason: Optional[str] = None) -> Any:
        # Under the lock, so records leave in `seq` order and no beat of the
        # ticker lands after the final `offline`.
        with self.lock:
            if self.stopping and status != "offline":
                return None
            self.seq += 1
            payload = json.dumps(self.record(status, reason, self.seq))
            self.last_publish = time.monotonic()
            return self.client.publish(self.topic, payload, qos=1, retain=True, properties=self.publish_props)

    # Scheduling.

    def _schedule(self, at: float) -> None:
        with self.cond:
            if self.pending_at is None or at < self.pending_at:
                self.pending_at = at
            self.cond.notify()

    def publish_now(self) -> None:
        self._schedule(time.monotonic())

    def publish_soon(self) -> None:
        """Rate-limited, for requests from others (announces, corrections)."""
        self._schedule(max(time.monotonic(), self.last_publish + MIN_REPUBLISH_GAP))

    def _ticker(self) -> None:
        next_tick = time.monotonic() + self.interval
        while True:
            with self.cond:
                while True:
                    if self.stopping:
                        return
                    now = time.monotonic()
                    due = min(next_tick, self.pending_at if self.pending_at is not None else math.inf)
                    if now >= due:
                        break
                    self.cond.wait(due - now)
                if now >= next_tick:
                    next_tick = now + self.interval
                if self.pending_at is not None and now >= self.pending_at:
                    self.pending_at = None
                status = self.status
            if self.mqtt_up.is_set():
                self._publish(status)

    # MQTT callbacks (paho's thread).

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.warning("heartbeat connection refused: %s", reason)
            return
        self.failover.connected(time.monotonic())
        self.mqtt_down.clear()
        self.mqtt_up.set()
        # Clean start: the broker remembers no subscription.
        client.subscribe([(self.announce, 1), (ANNOUNCE_FLEET, 1), (self.topic, 1)])
        self.publish_now()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.mqtt_up.clear()
        self.mqtt_down.set()
        if not self.stopping:
            log.warning("heartbeat connection lost (%s); reconnecting", reason)
            self._set_will()
            self._next_node(reason)

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        self._next_node("connection failed")

    def _next_node(self, reason: Any) -> None:
        was = self.failover.current
        self.failover.after_failure(time.monotonic())
        if self.failover.current != was:
            log.info("heartbeat: trying the next broker node %s after %s (%s)", self.failover.current, was, reason)
            point_at(self.client, self.failover.current)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        if self.stopping:
            return
        if msg.topic in (self.announce, ANNOUNCE_FLEET):
            self.publish_soon()
        elif msg.topic == self.topic and self._needs_correction(msg.payload):
            self.publish_soon()

    def _needs_correction(self, payload: bytes) -> bool:
        """Someone else's record (an earlier run's late will, a janitor's
        clear) on our topic is replaced by ours."""
        try:
            hb = json.loads(payload)
        except ValueError:
            return True
        return not isinstance(hb, dict) or hb.get("boot_id") != self.boot_id or hb.get("status") == "offline"

    # The service's side.

    def run(self) -> None:
        self.client.loop_start()
        threading.Thread(target=self._ticker, name="axion-heartbeat-tick", daemon=True).start()
        stdin = sys.stdin.buffer
        while True:
            line = stdin.readline()
            if not line:
                self._service_gone()
                return
            msg = json.loads(line)
            kind = msg.get("kind")
            if kind == "connection":
                # A change of the service's own connection is news now.
                self.publish_now()
            elif kind == "draining":
                with self.cond:
                    self.status = "draining"
                self.publish_now()
            elif kind == "stop":
                ok = self.stop(msg["reason"], float(msg.get("wait", 5.0)))
                os._exit(0 if ok else 1)

    def stop(self, reason: str, wait: float) -> bool:
        """Publishes `offline` with `reason`, waits for its PUBACK, then
        disconnects cleanly (a clean DISCONNECT suppresses the will)."""
        deadline = time.monotonic() + wait
        with self.cond:
            self.stopping = True
            self.status = "offline"
            self.cond.notify()
        if not self.mqtt_up.wait(wait):
            log.warning("final heartbeat (%s) not sent: no connection to the broker", reason)
            return False
        info = self._publish("offline", reason)
        try:
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
        except (RuntimeError, ValueError) as err:
            log.warning("final heartbeat (%s) not sent: %s", reason, err)
        published = info.is_published()
        self.client.disconnect()
        self.mqtt_down.wait(2.0)
        self.client.loop_stop()
        return published

    def _service_gone(self) -> None:
        """The service ended without `stop`: say why, if a watchdog rule did it."""
        now = time.monotonic()
        v = self.vitals.read()
        reason, detail = None, ""
        lost_for = None if v["connected"] or v["disconnected_mono"] is None else now - v["disconnected_mono"]
        stalled_for = now - v["progress_mono"] if v["running"] + v["waiting"] > 0 else None
        if lost_for is not None and lost_for + RULE_SLACK >= self.cfg["disconnect_kill_ms"] / 1000:
            reason = "broker-lost"
            detail = (
                f"exit 70: broker unreachable for {lost_for * 1000:.0f} ms "
                f"(DISCONNECT_KILL_MS={self.cfg['disconnect_kill_ms']})"
            )
        elif stalled_for is not None and stalled_for + RULE_SLACK >= self.cfg["liveness_max_stall_ms"] / 1000:
            reason = "stalled"
            detail = (
                f"exit 71: work pending ({v['running']} running, {v['waiting']} waiting) with no progress "
                f"for {stalled_for * 1000:.0f} ms (LIVENESS_MAX_STALL_MS={self.cfg['liveness_max_stall_ms']})"
            )
        if reason is None:
            log.warning("service %s (pid %d) ended without stopping; its will marks it lost", self.service, self.pid)
            os._exit(0)
        log.error("service %s (pid %d) ended by its watchdog, %s", self.service, self.pid, detail)
        if not self.mqtt_up.is_set():
            # With the broker gone the record cannot land; the will says `lost`.
            os._exit(0)
        self.stop(reason, 2.0)
        os._exit(0)


def main() -> None:
    # The service decides when to stop (it drains first); a signal meant for
    # the whole process group (Ctrl-C, a supervisor's tree kill) must not end
    # the heartbeat before the service has said `stopped`.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    line = sys.stdin.buffer.readline()
    if not line:
        return
    cfg = json.loads(line)
    logging.basicConfig(
        level=cfg.get("log_level", logging.WARNING),
        format="%(asctime)s %(levelname)s axion-heartbeat: %(message)s",
    )
    _Companion(cfg).run()


if __name__ == "__main__":
    main()
