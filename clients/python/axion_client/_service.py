"""`Service`: the Rust runtime's `Service`, for Python, on paho-mqtt.

One MQTT 5 connection serves the queues through the credit protocol of
`bridge/QUEUE-CONTRACT.md` and the event topics. One thread, the
dispatcher (the thread that calls `run()`), owns every decision and runs
paho's network loop itself: a task is read, decided on and answered on one
thread, with no hand-off. The handler threads and the signal handlers only
post to its inbox (and wake it only when it sleeps), so no state is shared
between them but the inbox and the vitals. What one turn of the loop read
is answered together: the acks, replies and one credit top-up for all of
it leave in one go.

Credit follows free capacity: each queue is told it may send as many tasks
as there are free handler slots (`MAX_INFLIGHT` minus running minus
waiting), and a task another shared-group member's credit brought is
claimed only into a free slot, otherwise released at once, so a busy
instance never sits on work another could do.

Each running job has a thread to itself, so a handler that blocks holds
only its slot: the threads are kept and reused, one per slot at most
(`MAX_INFLIGHT`), started as the load first needs them. Coroutine handlers
run on one shared asyncio loop. A handler that never returns cannot be
stopped from inside Python: the watchdog's kernel timers end the process
instead (`_watchdog`).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import queue as queue_mod
import select
import signal
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ._beacon import Beacon, nodelay
from ._client import GatheringClient
from ._config import (
    DEFAULT_GHOST_SECS,
    DEFAULT_INTERVAL_SECS,
    DEFAULT_MQTT_URL,
    DEFAULT_PACKAGE,
    ConfigError,
    Limits,
    MqttUrl,
    announce_topic,
    env_flag,
    env_int,
    env_or,
    event_topic,
    parse_broker_urls,
    queue_tasks_directed,
    queue_tasks_shared,
    queue_topic,
    sanitize_client_id,
    validate_event_type,
    validate_level,
)
from ._failover import LASTING_CONNACK, LASTING_DISCONNECT, LASTING_SUBACK, Failover, point_at, reason_value
from ._message import Event, ReplyTarget, Task, event_envelope, parse_event, task_from_wire
from ._shared import SharedVitals
from ._vitals import Vitals

log = logging.getLogger("axion_client")

#: Exit code of a clean stop (after draining).
EXIT_OK = 0
#: Exit code for any other start-up failure.
EXIT_FAILURE = 1
#: Exit code when the service cannot start as configured (sysexits EX_CONFIG).
EXIT_CONFIG = 78

#: How often the dispatcher looks at the clock when nothing arrives.
TICK = 0.02
#: Short, so a broker back within `DISCONNECT_KILL_MS` is found in time.
BACKOFF_MIN, BACKOFF_MAX = 0.1, 1.0
KEEP_ALIVE_SECS = 5
#: How long the final releases and acks may take to leave.
FINAL_FLUSH = 2.0
#: How long the clean stop waits for the `offline`/`stopped` PUBACK.
FINAL_HEARTBEAT_WAIT = 5.0
#: `retry_after_ms` bounds and the guess before any job has finished.
RETRY_AFTER_MIN_MS, RETRY_AFTER_MAX_MS, RETRY_AFTER_UNKNOWN_MS = 50.0, 60_000.0, 250.0
#: An enqueue not confirmed within this is published again under the same
#: id (the owner enqueues an id once), as the bridge does.
ENQUEUE_RETRY = 3.0

Handler = Callable[[Any], Any]


@dataclass
class _Held:
    queue: str
    progress_sent: float


@dataclass
class _Running:
    #: (task id, queue) for a task; None for an event.
    task: Optional[tuple[str, str]]
    reply: Optional[ReplyTarget]


@dataclass
class _Job:
    arg: Union[Task, Event]
    handler: Handler
    reply: Optional[ReplyTarget] = None


@dataclass
class _Confirmation:
    done: threading.Event = field(default_factory=threading.Event)
    body: dict[str, Any] = field(default_factory=dict)


class EnqueueRefused(Exception):
    """The queue owner refused an enqueue (a full queue, a bad request);
    `reply` is its answer."""

    def __init__(self, reply: dict[str, Any]) -> None:
        super().__init__(reply.get("error", "enqueue refused"))
        self.reply = reply


class Service:
    """A service definition; `run()` runs it and returns the exit code.

    Unset values come from the environment: `AXION_MQTT_URL` (and
    `AXION_MQTT_USER`/`AXION_MQTT_PASSWORD`), `AXION_PACKAGE`,
    `AXION_DIRECTED_DELIVERY` and the `Limits` variables.

    `directed_delivery=True` takes tasks on this worker's own topic
    (`…/tasks/<worker>`) instead of the queue's shared subscription, for
    brokers whose shared subscriptions do not span the cluster; a node whose
    CONNACK says it has no shared subscriptions switches on its own.
    """

    def __init__(
        self,
        name: str,
        package: Optional[str] = None,
        mqtt: Optional[str] = None,
        limits: Optional[Limits] = None,
        directed_delivery: Optional[bool] = None,
    ) -> None:
        self.name = name
        self._package = package
        self._mqtt = mqtt
        self._limits = limits
        self._directed = directed_delivery
        self._queues: dict[str, Handler] = {}
        self._duplicate_queue: Optional[str] = None
        self._events: list[tuple[str, Handler]] = []
        self._engine: Optional[_Engine] = None

    def queue(self, name: str, handler: Handler) -> "Service":
        """Serves queue `name`: each `Task` goes to `handler` (a function or a
        coroutine function); its return value acks the task and goes to the
        task's `replyTo`, an exception fails the attempt (the queue retries)."""
        if name in self._queues:
            self._duplicate_queue = name
        self._queues[name] = handler
        return self

    def event(self, event_type: str, handler: Handler) -> "Service":
        """Handles events of `event_type` (`fs.change`, or with `+`/`#`
        segments). When an event carries `replyTo`, the result (or
        `{"error"}`) is published there."""
        self._events.append((event_type, handler))
        return self

    def publish(
        self, event_type: str, payload: Any, *, reply_to: Optional[str] = None, correlation_id: Optional[str] = None
    ) -> None:
        """Publishes an event envelope (QoS 1) while the service runs."""
        engine = self._running()
        if "+" in event_type or "#" in event_type:
            raise ValueError(f"cannot publish to the wildcard event type {event_type!r}")
        validate_event_type(event_type)
        body = event_envelope(event_type, self.name, payload, replyTo=reply_to, correlationId=correlation_id)
        engine.client.publish(event_topic(engine.package, event_type), body, qos=1)

    def enqueue(
        self,
        queue: str,
        payload: Any,
        *,
        id: Optional[str] = None,
        reply_to: Optional[str] = None,
        correlation_id: Optional[str] = None,
        max_attempts: Optional[int] = None,
        delay_ms: Optional[int] = None,
        timeout: float = 10.0,
    ) -> str:
        """Enqueues a task and returns its id once the queue owner confirmed
        it is on disk. Blocks (call it from a handler, or through
        `asyncio.to_thread` in a coroutine); raises `EnqueueRefused` when the
        owner refuses it and `TimeoutError` when no confirmation comes."""
        engine = self._running()
        validate_level("queue", queue)
        return engine.enqueue(
            queue, payload, id or uuid.uuid4().hex, reply_to, correlation_id, max_attempts, delay_ms, timeout
        )

    def _running(self) -> "_Engine":
        if self._engine is None:
            raise RuntimeError(f"service {self.name!r} is not running")
        return self._engine

    def run(self) -> int:
        """Runs until SIGTERM/SIGINT and returns 0 after draining; a broken
        configuration returns 78. Must be called from the main thread (it
        owns the signals). Exits 70 and 71 are not returned: the watchdog
        ends the process with them."""
        try:
            engine = self._prepare()
        except ConfigError as err:
            log.error("service %s cannot run: %s", self.name, err)
            return EXIT_CONFIG
        self._engine = engine
        try:
            return engine.run()
        finally:
            self._engine = None

    def _prepare(self) -> "_Engine":
        package = self._package or env_or("AXION_PACKAGE", DEFAULT_PACKAGE)
        given = self._mqtt or env_or("AXION_MQTT_URL", DEFAULT_MQTT_URL)
        urls = [u.with_env_credentials() for u in parse_broker_urls(given)]
        limits = self._limits or Limits.from_env()
        limits.validate()
        directed = self._directed if self._directed is not None else env_flag("AXION_DIRECTED_DELIVERY")
        validate_level("package", package)
        validate_level("service", self.name)
        if not self._queues and not self._events:
            raise ConfigError("a service needs at least one queue or event handler")
        if self._duplicate_queue is not None:
            raise ConfigError(f"queue {self._duplicate_queue!r} has two handlers")
        for q in self._queues:
            validate_level("queue", q)
        for t, _ in self._events:
            validate_event_type(t)
        if threading.current_thread() is not threading.main_thread():
            raise ConfigError("run() must be called from the main thread (it handles SIGTERM)")
        host = socket.gethostname()
        validate_level("host", host)
        pid = os.getpid()
        client_id = sanitize_client_id(f"axion-svc-{self.name}-{host}-{pid}")
        shared = SharedVitals()
        beacon = Beacon(
            {
                "service": self.name,
                "package": package,
                "host": host,
                "pid": pid,
                "client_id": sanitize_client_id(f"axion-hb-{self.name}-{host}-{pid}"),
                "mqtt": [
                    {"host": u.host, "port": u.port, "unix": u.unix, "user": u.user, "password": u.password}
                    for u in urls
                ],
                "interval_secs": env_int("HEARTBEAT_INTERVAL_SECS", DEFAULT_INTERVAL_SECS),
                "ghost_secs": env_int("HEARTBEAT_GHOST_SECS", DEFAULT_GHOST_SECS),
                # The queue owner hands this worker's tasks to others when the
                # heartbeat turns offline (QUEUE-CONTRACT "Worker liveness").
                "extras": {"worker": client_id},
                "disconnect_kill_ms": limits.disconnect_kill_ms,
                "liveness_max_stall_ms": limits.liveness_max_stall_ms,
                "log_level": log.getEffectiveLevel(),
            },
            shared.fd,
        )
        shared.close_fd()
        vitals = Vitals(limits, beacon, shared)
        events = [(t, event_topic(package, t), h) for t, h in self._events]
        return _Engine(
            self.name, package, client_id, urls, dict(self._queues), events, limits, vitals, beacon, directed
        )


class _Engine:
    """The dispatcher and everything it owns."""

    def __init__(
        self,
        service: str,
        package: str,
        client_id: str,
        urls: list[MqttUrl],
        queues: dict[str, Handler],
        events: list[tuple[str, str, Handler]],
        limits: Limits,
        vitals: Vitals,
        beacon: Beacon,
        directed: bool,
    ) -> None:
        self.service = service
        self.package = package
        self.client_id = client_id
        #: The broker's nodes, and which one the client is pointed at.
        self.failover = Failover(urls, BACKOFF_MIN, BACKOFF_MAX)
        self.handlers = queues
        self.events = events
        self.limits = limits
        self.vitals = vitals
        self.beacon = beacon
        #: What other threads post to the dispatcher (`_post`).
        self.inbox: deque[tuple[Any, ...]] = deque()
        #: Whether the dispatcher is (about to be) asleep in `select`, so a
        #: post must wake it; read without a lock (see `_post`).
        self.sleeping = False
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        #: Taken to wake the dispatcher and to close the pipe: a handler
        #: outliving `run()` must not write into a reused descriptor.
        self.wake_lock = threading.RLock()
        self.wake_open = True
        self.dispatcher: Optional[int] = None
        #: Jobs for the handler threads, and how many threads there are.
        self.jobs: queue_mod.SimpleQueue[tuple[int, _Job]] = queue_mod.SimpleQueue()
        self.pool_size = 0
        self.announce = announce_topic(package)
        self.reply_topic = f"axion/{package}/reply/{client_id}"
        self.task_topics = {queue_topic(package, q, "tasks"): q for q in queues}
        self.task_topics.update({queue_tasks_directed(package, q, client_id): q for q in queues})
        #: Directed delivery asked for whatever the broker offers.
        self.force_directed = directed
        #: Whether tasks come on this worker's own topic: forced, or the
        #: node's CONNACK says it has no shared subscriptions.
        self.directed = directed
        self.connected = False
        #: A connection attempt is under way on a thread of its own.
        self.connecting: Optional[threading.Thread] = None
        self.next_connect_at: Optional[float] = time.monotonic()
        #: The broker's lasting refusal behind the loss being handled, and
        #: how many came in a row, from whichever node.
        self.refusal: Optional[str] = None
        self.refusals = 0
        #: Set when every node refused this service for good: `run()` returns 78.
        self.gave_up: Optional[str] = None
        self.drain_deadline: Optional[float] = None
        #: The UNSUBSCRIBE from the queues' shared groups, and its UNSUBACK.
        self.leave_mid: Optional[int] = None
        self.left_queues = False
        self.waiting: deque[_Job] = deque()
        self.running: dict[int, _Running] = {}
        #: Admitted into `running`, not yet handed to a handler thread.
        self.starting: list[tuple[int, _Job]] = []
        #: Something changed that credit, the vitals or `starting` must follow.
        self.changed = False
        self.next_seq = 0
        self.held: dict[str, _Held] = {}
        self.outstanding = {q: 0 for q in queues}
        self.refusing = False
        self.last_progress_check = time.monotonic()
        #: Publishes not yet acknowledged, oldest first.
        self.unacked: deque[mqtt.MQTTMessageInfo] = deque()
        #: What waits for the connection (acks, replies, releases, claims).
        self.outbox: list[tuple[str, bytes, Optional[Properties]]] = []
        #: Set before our own DISCONNECT.
        self.closing = False
        self.confirmations: dict[bytes, _Confirmation] = {}
        self.confirm_lock = threading.Lock()
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.loop_lock = threading.Lock()

        self.client = GatheringClient(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
            transport="unix" if urls[0].unix else "tcp",
        )
        # No window on our side: paho walks every unacknowledged publish on
        # each PUBACK while one is set. What this service has in flight is
        # bounded by its tasks and jobs, far below the broker's Receive
        # Maximum (65 535).
        self.client.max_inflight_messages_set(0)
        self.client.max_queued_messages_set(0)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_unsubscribe = self._on_unsubscribe
        self.client.on_socket_open = nodelay
        # The dispatcher runs paho's network loop itself; this tells it of a
        # publish from another thread (`Service.publish`, `enqueue`).
        self.client.on_socket_register_write = self._on_want_write

    # --- paho's callbacks: run on the dispatcher, from `loop_read` ----------

    @property
    def url(self) -> MqttUrl:
        """The node the client is pointed at."""
        return self.failover.current

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.warning("broker %s refused the connection: %s", self.url, reason)
            if reason_value(reason) in LASTING_CONNACK:
                self.refusal = f"the broker refused the connection: {reason}"
            return
        self.failover.connected(time.monotonic())
        self.vitals.set_connected(True)
        # Absent means available (MQTT 5, 3.2.2.3.13).
        shared = getattr(props, "SharedSubscriptionAvailable", 1) != 0
        directed = self.force_directed or not shared
        log.info("connected to the broker %s (shared subscriptions: %s)", self.url, shared)
        if directed != self.directed:
            log.info(
                "task delivery changes with this node: tasks come on %s",
                "this worker's own topic" if directed else "the shared subscription",
            )
        self.directed = directed
        # A clean session: subscriptions first, then fresh credit. A
        # draining service joins no queue's shared group (see `_leave_queues`).
        draining = self.drain_deadline is not None
        filters = [] if draining else [(self._tasks_filter(q), 1) for q in self.handlers]
        filters += [(f, 1) for _, f, _ in self.events]
        filters += [(self.announce, 1), (self.reply_topic, 1)]
        client.subscribe(filters)
        self.connected = True
        if draining:
            self.left_queues = True
        self._reannounce()
        outbox, self.outbox = self.outbox, []
        for topic, body, props in outbox:
            self._send(topic, body, props)

    def _tasks_filter(self, queue: str) -> str:
        """Where this worker takes the tasks of `queue`."""
        if self.directed:
            return queue_tasks_directed(self.package, queue, self.client_id)
        return queue_tasks_shared(self.package, queue)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if self.closing:
            # Our own DISCONNECT: no loss to report, and the broker rule
            # must not fire while the final heartbeat goes out.
            return
        if reason_value(reason) in LASTING_DISCONNECT and self.refusal is None:
            self.refusal = f"the broker disconnected this client: {reason}"
        self._lost(reason)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        refused = [str(c) for c in codes if c.is_failure]
        if not refused:
            self.refusals = 0
        elif any(reason_value(c) in LASTING_SUBACK for c in codes):
            # No retry makes the broker allow or support it: a service that
            # cannot take its work must not look alive.
            self._give_up(f"the broker refused a subscription this service needs: {', '.join(refused)}")
        else:
            log.error(
                "the broker refused a subscription (%s); this service will not receive that work", ", ".join(refused)
            )

    def _on_unsubscribe(self, client: mqtt.Client, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        if mid == self.leave_mid:
            self.left_queues = True

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == self.reply_topic:
            self._on_confirmation(msg)
        else:
            self._on_publish(msg)

    def _on_want_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if threading.get_ident() != self.dispatcher:
            self._wake()

    # --- posting to the dispatcher, from any thread ------------------------

    def _post(self, item: tuple[Any, ...]) -> None:
        """Hands `item` to the dispatcher. The dispatcher sets `sleeping`
        before it looks at the inbox a last time and sleeps, so either it
        sees the item or this sees `sleeping` and wakes it: a busy
        dispatcher costs no system call."""
        self.inbox.append(item)
        if self.sleeping:
            self._wake()

    def _wake(self) -> None:
        with self.wake_lock:
            if not self.wake_open:
                return
            try:
                os.write(self.wake_w, b"\0")
            except BlockingIOError:
                pass  # full: it is awake enough

    # --- the dispatcher ----------------------------------------------------

    def run(self) -> int:
        def stop(signum: int, frame: Any) -> None:
            self._post(("signal", signal.Signals(signum).name))

        previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
        log.info(
            "service %s starting: package %s, worker %s, broker %s, queues %s, events %s, "
            "max_inflight %d, max_queue %d",
            self.service,
            self.package,
            self.client_id,
            self.url,
            list(self.handlers),
            [t for t, _, _ in self.events],
            self.limits.max_inflight,
            self.limits.max_queue,
        )
        self.dispatcher = threading.get_ident()
        try:
            # paho wants a port even for a Unix socket, and ignores it there.
            self.client.connect_async(
                self.url.unix or self.url.host, self.url.port or 1883, keepalive=KEEP_ALIVE_SECS, clean_start=True
            )
            self._dispatch()
            if self.gave_up is None:
                self._finish()
        finally:
            self.vitals.close()
            for s, h in previous.items():
                signal.signal(s, h)
            with self.wake_lock:
                self.wake_open = False
                os.close(self.wake_r)
                os.close(self.wake_w)
        return EXIT_OK if self.gave_up is None else EXIT_CONFIG

    def _network(self, timeout: float) -> None:
        """One turn of the network: sleeps up to `timeout` (or until a post
        or the socket wakes it), then reads what came; paho's callbacks run
        here."""
        sock = None if self.connecting else self.client.socket()
        rlist: list[Any] = [self.wake_r]
        wlist: list[Any] = []
        pending = False
        if sock is not None:
            rlist.append(sock)
            if self.client.want_write() or self.client.unsent():
                wlist.append(sock)
            pending = self.client.pending()
        self.sleeping = True
        if self.inbox or pending:
            timeout = 0.0
        try:
            readable, _, _ = select.select(rlist, wlist, [], timeout)
        except (OSError, ValueError):
            readable = []
        self.sleeping = False
        if self.wake_r in readable:
            try:
                while os.read(self.wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        if sock is not None and (pending or sock in readable):
            self.client.loop_read()

    def _write(self) -> None:
        """Hands what was published to the socket, in one `send`."""
        if self.connecting or self.client.socket() is None:
            return
        if self.client.want_write():
            self.client.loop_write()
        self.client.flush()

    def _dispatch(self) -> None:
        next_tick = time.monotonic()
        while True:
            now = time.monotonic()
            wait = next_tick - now
            if self.next_connect_at is not None:
                wait = min(wait, self.next_connect_at - now)
            self._network(max(0.0, wait))
            while self.inbox:
                self._on_item(self.inbox.popleft())
            if self.gave_up is not None:
                return
            self._settle()
            self._write()
            now = time.monotonic()
            if self.next_connect_at is not None and now >= self.next_connect_at and self.connecting is None:
                self._connect()
            if now < next_tick:
                continue
            next_tick = now + TICK
            if self.connecting is None and self.client.socket() is not None:
                self.client.loop_misc()
            elif self.connecting is None and self.next_connect_at is None and not self.closing:
                # The socket went without a word from paho.
                self._lost("connection closed")
            self._on_tick()
            self._write()
            if not self.beacon.alive():
                # Its connection is gone, so its will said `lost` and the
                # queue owner is handing our tasks to others: stop now,
                # before any of them is done twice.
                log.error("the heartbeat process ended; exiting")
                os._exit(EXIT_FAILURE)
            if self.drain_deadline is not None:
                if not self.running and self._out_of_groups():
                    log.info("drain complete: every running handler finished")
                    return
                if time.monotonic() >= self.drain_deadline:
                    self._abandon_running()
                    return

    def _connect(self) -> None:
        """Connects on a thread of its own (a TCP connect can take seconds);
        the dispatcher leaves the client alone until it is done."""
        self.next_connect_at = None

        point_at(self.client, self.url)

        def attempt() -> None:
            try:
                self.client.reconnect()
                failure = None
            except Exception as err:  # noqa: BLE001 (any failure means: try again later)
                failure = str(err) or type(err).__name__
            self._post(("connect-attempt", failure))

        self.connecting = threading.Thread(target=attempt, name="axion-connect", daemon=True)
        self.connecting.start()

    def _lost(self, reason: Any) -> None:
        """The connection is gone: count the time, try the next node after a pause."""
        if self.vitals.set_connected(False):
            log.warning("lost the broker %s (%s); reconnecting", self.url, reason)
        self.connected = False
        if self.next_connect_at is None and self.connecting is None:
            self._retry(reason)

    def _retry(self, reason: Any) -> None:
        """Counts a lasting refusal (giving up once every node refused, as
        often as the Rust runtime allows) and schedules the next try, on
        the next node."""
        why, self.refusal = self.refusal, None
        if why is None:
            self.refusals = 0
        else:
            self.refusals += 1
            limit = self.failover.refusals_before_giving_up()
            log.warning("the broker %s refused this service (%d of %d): %s", self.url, self.refusals, limit, why)
            if self.refusals >= limit:
                self._give_up(why)
                return
        was = self.url
        wait = self.failover.after_failure(time.monotonic())
        if self.url != was:
            log.info("trying the next broker node %s after %s (%s) in %.1f s", self.url, was, reason, wait)
        self.next_connect_at = time.monotonic() + wait

    def _give_up(self, why: str) -> None:
        log.error(
            "%s; giving up (exit 78: restarting will not help until the broker or this service's "
            "configuration changes)",
            why,
        )
        self.gave_up = why
        self.next_connect_at = None

    def _finish(self) -> None:
        """Lets acks, results and releases leave, disconnects, says `stopped`."""
        deadline = time.monotonic() + FINAL_FLUSH
        if self.connecting is not None:
            self.connecting.join(FINAL_FLUSH)
            self.connecting = None
        while self.connected and self._prune_unacked() and time.monotonic() < deadline:
            self._network(min(TICK, max(0.0, deadline - time.monotonic())))
            self._write()
        if self._prune_unacked() or self.outbox:
            log.warning(
                "stopping with %d messages not acknowledged; held tasks come back through the "
                "heartbeat or the ack wait",
                len(self.unacked) + len(self.outbox),
            )
        self.closing = True
        if self.client.socket() is not None:
            self.client.disconnect()
            while self.client.socket() is not None and time.monotonic() < deadline + FINAL_FLUSH:
                self._write()
                if self.client.socket() is not None:
                    self._network(TICK)
            if self.client.socket() is not None:
                log.warning("MQTT connection did not close in time")
        stopped = self.beacon.stop("stopped", FINAL_HEARTBEAT_WAIT)
        log.info("service stopped (final heartbeat %s)", "sent" if stopped else "not sent")

    def _prune_unacked(self) -> int:
        """Forgets the acknowledged publishes; returns how many are left."""
        unacked = self.unacked
        while unacked and unacked[0].is_published():
            unacked.popleft()
        return len(unacked)

    def _on_item(self, item: tuple[Any, ...]) -> None:
        kind = item[0]
        if kind == "done":
            self._on_done(item[1], item[2], item[3], item[4])
        elif kind == "connect-attempt":
            self.connecting = None
            failure = item[1]
            if failure is not None:
                # Once per outage, for each node: then quietly.
                if self.failover.failures < len(self.failover.urls):
                    log.warning("cannot reach the broker %s (%s); retrying", self.url, failure)
                self._retry(failure)
        elif kind == "signal":
            self._begin_drain(item[1])

    def _free_slots(self) -> int:
        """Handler slots neither running nor promised to a waiting job."""
        return max(0, self.limits.max_inflight - len(self.running) - len(self.waiting))

    def _on_publish(self, msg: mqtt.MQTTMessage) -> None:
        topic = msg.topic
        if topic == self.announce:
            # The queue owner restarted and lost our credit.
            self._reannounce()
            return
        queue = self.task_topics.get(topic)
        if queue is not None:
            try:
                wire = json.loads(msg.payload)
                if not isinstance(wire, dict) or "id" not in wire:
                    raise ValueError("no id")
            except ValueError as err:
                log.warning("task record on %s unreadable (%s); ignored (the ack wait brings it back)", queue, err)
                return
            self._on_task(queue, wire)
            return
        match = next((h for _, f, h in self.events if mqtt.topic_matches_sub(f, topic)), None)
        if match is None:
            return
        props = msg.properties
        response_topic = getattr(props, "ResponseTopic", None)
        corr_data = getattr(props, "CorrelationData", None)
        event = parse_event(self.package, topic, msg.payload, response_topic, corr_data, self.vitals.progress)
        reply = ReplyTarget.resolve(self.package, event.reply_to, event.correlation_id, corr_data)
        full = len(self.running) >= self.limits.max_inflight and len(self.waiting) >= self.limits.max_queue
        if self.drain_deadline is not None or full:
            if not self.refusing:
                self.refusing = True
                log.warning(
                    "refusing requests: at the admission limit (running %d, waiting %d, draining %s)",
                    len(self.running),
                    len(self.waiting),
                    self.drain_deadline is not None,
                )
            self._refuse(reply)
            return
        self.refusing = False
        self.waiting.append(_Job(event, match, reply))
        self._after_change()

    def _refuse(self, reply: Optional[ReplyTarget]) -> None:
        """Answers `overloaded` at once, so the caller retries elsewhere or
        later instead of hanging."""
        if reply is None:
            return
        self._reply(reply, {"overloaded": True, "retry_after_ms": self._retry_after_ms()})

    def _retry_after_ms(self) -> int:
        """A guess at when a slot frees: the average job times the rounds of work ahead."""
        rounds = len(self.waiting) // self.limits.max_inflight + 1
        avg = self.vitals.avg_job_ms if self.vitals.avg_job_ms is not None else RETRY_AFTER_UNKNOWN_MS
        return int(min(max(avg * rounds, RETRY_AFTER_MIN_MS), RETRY_AFTER_MAX_MS))

    def _on_task(self, queue: str, wire: dict[str, Any]) -> None:
        me = self.client_id
        worker = wire.get("worker")
        addressed_to_me = worker is None or worker == me
        if addressed_to_me:
            self.outstanding[queue] = max(0, self.outstanding[queue] - 1)
        task_id = str(wire["id"])
        if task_id in self.held:
            # Delivered again (ack wait ran out while it waited here): keep
            # the one copy, and make sure the owner files it under us.
            if not addressed_to_me:
                self._claim(queue, task_id)
            self._after_change()
            return
        take = self.drain_deadline is None and (addressed_to_me or self._free_slots() > 0)
        if not take:
            self._task_message(queue, "release", {"id": task_id, "worker": me})
            self._after_change()
            return
        if not addressed_to_me:
            self._claim(queue, task_id)
            self.outstanding[queue] = max(0, self.outstanding[queue] - 1)
        self.held[task_id] = _Held(queue, time.monotonic())
        self.waiting.append(_Job(task_from_wire(wire, queue, self.vitals.progress), self.handlers[queue]))
        self._after_change()

    def _claim(self, queue: str, task_id: str) -> None:
        self._task_message(queue, "progress", {"id": task_id, "worker": self.client_id})

    def _after_change(self) -> None:
        """Admits waiting jobs into free slots now; credit, the vitals and
        the handler threads follow in `_settle`, once for all that the
        dispatcher read in one turn."""
        while len(self.running) < self.limits.max_inflight and self.waiting:
            self.starting.append(self._admit(self.waiting.popleft()))
        self.changed = True

    def _settle(self) -> None:
        """Tops up credit, updates the vitals, then hands the admitted jobs
        to the handler threads.

        The jobs go last: a handler that gets stuck in C code holding the
        GIL stops this thread too, so the watchdog and the heartbeat must
        already know about its job by then."""
        if not self.changed:
            return
        self.changed = False
        self._top_up()
        self.vitals.set_load(len(self.running), len(self.waiting))
        if not self.starting:
            return
        starting, self.starting = self.starting, []
        # Never fewer threads than running jobs, so each handed-out job
        # finds an idle one; none beyond MAX_INFLIGHT.
        while self.pool_size < len(self.running):
            self.pool_size += 1
            threading.Thread(target=self._handler_thread, name=f"axion-handler-{self.pool_size}", daemon=True).start()
        for item in starting:
            self.jobs.put(item)

    def _admit(self, job: _Job) -> tuple[int, _Job]:
        """Counts `job` as running; returns it for a handler thread."""
        seq = self.next_seq
        self.next_seq += 1
        if isinstance(job.arg, Task):
            task = job.arg
            reply = ReplyTarget.resolve(self.package, task.reply_to, task.correlation_id, None)
            self.running[seq] = _Running((task.id, task.queue), reply)
        else:
            self.running[seq] = _Running(None, job.reply)
        return seq, job

    def _handler_thread(self) -> None:
        """A handler thread: runs jobs one after another."""
        while True:
            self._run_job(*self.jobs.get())

    def _run_job(self, seq: int, job: _Job) -> None:
        """Runs one job and posts its outcome."""
        started = time.monotonic()
        try:
            result = job.handler(job.arg)
            if inspect.isawaitable(result):
                result = asyncio.run_coroutine_threadsafe(_awaited(result), self._async_loop()).result()
            json.dumps(result)
            outcome: tuple[bool, Any] = (True, result)
        except BaseException as err:  # any failure of a handler fails its attempt
            reason = str(err) or type(err).__name__
            if isinstance(err, TypeError) and "JSON serializable" in reason:
                reason = f"the handler's result is not JSON: {reason}"
            log.warning("handler for %s failed: %s", _describe(job.arg), reason, exc_info=True)
            outcome = (False, reason)
        self._post(("done", seq, outcome[0], outcome[1], time.monotonic() - started))

    def _async_loop(self) -> asyncio.AbstractEventLoop:
        """One asyncio loop for every coroutine handler, started on first use."""
        with self.loop_lock:
            if self.loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="axion-asyncio", daemon=True).start()
                self.loop = loop
            return self.loop

    def _on_done(self, seq: int, ok: bool, value: Any, took: float) -> None:
        run = self.running.pop(seq, None)
        if run is None:
            return
        self.vitals.job(took)
        if run.task is not None:
            task_id, queue = run.task
            if self.held.pop(task_id, None) is None:
                # Already handed back by the drain.
                self._after_change()
                return
            if ok:
                # Named, so the owner counts an ack of a task it handed to
                # another worker (a copy a cluster delivered twice).
                self._task_message(queue, "ack", {"id": task_id, "worker": self.client_id})
                if run.reply is not None:
                    self._reply(run.reply, value)
            else:
                log.info("task %s on %s failed; the queue retries it: %s", task_id, queue, value)
                self._task_message(queue, "fail", {"id": task_id, "reason": value})
        elif run.reply is not None:
            self._reply(run.reply, value if ok else {"error": value})
        self._after_change()

    def _on_tick(self) -> None:
        self._prune_unacked()
        every = self.limits.ack_wait_ms / 3000
        now = time.monotonic()
        if now - self.last_progress_check < min(every, 0.25):
            return
        self.last_progress_check = now
        # Long tasks keep their ack wait alive, whether running or waiting.
        for task_id, held in self.held.items():
            if now - held.progress_sent >= every:
                held.progress_sent = now
                self._task_message(held.queue, "progress", {"id": task_id})

    def _top_up(self) -> None:
        """Gives each queue credit up to the free slots (additive `ready`)."""
        if not self.connected or self.drain_deadline is not None:
            return
        free = self._free_slots()
        for q in self.handlers:
            have = self.outstanding[q]
            if have < free:
                self._credit(q, {"worker": self.client_id, "credits": free - have})
                self.outstanding[q] = free

    def _reannounce(self) -> None:
        """Sets each queue's credit to the free slots (`reset`): on connect
        and when the owner asks after its restart."""
        free = 0 if self.drain_deadline is not None else self._free_slots()
        for q in self.handlers:
            self._credit(q, {"worker": self.client_id, "credits": free, "reset": True})
            self.outstanding[q] = free

    def _credit(self, queue: str, body: dict[str, Any]) -> None:
        # Credit is stale after a reconnect (a `reset` follows): not sent
        # while disconnected.
        if self.connected:
            if self.directed:
                body["directed"] = True
            self._send(queue_topic(self.package, queue, "ready"), json.dumps(body).encode())

    def _task_message(self, queue: str, leaf: str, body: dict[str, Any]) -> None:
        self._send(queue_topic(self.package, queue, leaf), json.dumps(body).encode())

    def _reply(self, target: ReplyTarget, payload: Any) -> None:
        props = None
        if target.correlation_data is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = target.correlation_data
            props.PayloadFormatIndicator = 1
            props.ContentType = "application/json"
        self._send(target.topic, target.envelope(self.service, payload), props)

    def _send(self, topic: str, body: bytes, props: Optional[Properties] = None) -> None:
        """QoS 1, leaving at the end of the dispatcher's turn; kept in the
        outbox while disconnected."""
        if self.connected:
            self.unacked.append(self.client.publish(topic, body, qos=1, properties=props))
        else:
            self.outbox.append((topic, body, props))

    def _begin_drain(self, why: str) -> None:
        """SIGTERM/SIGINT: no more credit, `draining` heartbeat, waiting work
        handed back or refused, running handlers get `DRAIN_MS`."""
        if self.drain_deadline is not None:
            # A second signal is an operator who does not want to wait.
            log.warning("second signal (%s): handing running tasks back now", why)
            self.drain_deadline = time.monotonic()
            return
        log.info(
            "draining (%s): %d running, %d waiting, DRAIN_MS=%d",
            why,
            len(self.running),
            len(self.waiting),
            self.limits.drain_ms,
        )
        self.drain_deadline = time.monotonic() + self.limits.drain_ms / 1000
        self.beacon.draining()
        self._reannounce()
        self._leave_queues()
        waiting, self.waiting = self.waiting, deque()
        for job in waiting:
            if isinstance(job.arg, Task):
                self.held.pop(job.arg.id, None)
                self._task_message(job.arg.queue, "release", {"id": job.arg.id, "worker": self.client_id})
            else:
                self._refuse(job.reply)
        self.changed = True

    def _leave_queues(self) -> None:
        """Leaves the queues' shared groups (or own topics). The owner delivers what others
        hand back (this service's releases too) through the group, to any
        member: a member no longer reading would take a task meant for
        another worker and drop it, and the task would wait out the ack wait.
        What arrives before the UNSUBACK is released as usual."""
        self.left_queues = False
        self.leave_mid = None
        if self.handlers and self.connected:
            _, self.leave_mid = self.client.unsubscribe([self._tasks_filter(q) for q in self.handlers])

    def _out_of_groups(self) -> bool:
        """Whether no more task can reach this service: its UNSUBACK came,
        it serves no queue, or the connection is down (and a reconnect while
        draining subscribes no queue)."""
        return self.left_queues or not self.handlers or not self.connected

    def _abandon_running(self) -> None:
        """`DRAIN_MS` is up: hand the unfinished tasks back (not counted as
        an attempt); their threads are left to die with the process."""
        log.warning("drain time is up; handing %d unfinished jobs back", len(self.running))
        running, self.running = self.running, {}
        for run in running.values():
            if run.task is not None:
                task_id, queue = run.task
                self.held.pop(task_id, None)
                self._task_message(queue, "release", {"id": task_id, "worker": self.client_id})
            else:
                self._refuse(run.reply)
        self.vitals.set_load(0, 0)
        self._write()

    # --- enqueue, from any thread ------------------------------------------

    def enqueue(
        self,
        queue: str,
        payload: Any,
        task_id: str,
        reply_to: Optional[str],
        correlation_id: Optional[str],
        max_attempts: Optional[int],
        delay_ms: Optional[int],
        timeout: float,
    ) -> str:
        body: dict[str, Any] = {"payload": payload, "id": task_id}
        for key, value in (
            ("replyTo", reply_to),
            ("correlationId", correlation_id),
            ("maxAttempts", max_attempts),
            ("delayMs", delay_ms),
        ):
            if value is not None:
                body[key] = value
        data = json.dumps(body).encode()
        corr = task_id.encode()
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = corr
        waiter = _Confirmation()
        with self.confirm_lock:
            self.confirmations[corr] = waiter
        deadline = time.monotonic() + timeout
        try:
            while True:
                self.client.publish(queue_topic(self.package, queue, "enqueue"), data, qos=1, properties=props)
                left = deadline - time.monotonic()
                if waiter.done.wait(max(0.0, min(ENQUEUE_RETRY, left))):
                    break
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"enqueue of {task_id} on {queue!r} not confirmed within {timeout} s")
        finally:
            with self.confirm_lock:
                self.confirmations.pop(corr, None)
        if "error" in waiter.body:
            raise EnqueueRefused(waiter.body)
        return str(waiter.body.get("id", task_id))

    def _on_confirmation(self, msg: mqtt.MQTTMessage) -> None:
        corr = getattr(msg.properties, "CorrelationData", None)
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        if not isinstance(body, dict):
            return
        with self.confirm_lock:
            waiter = self.confirmations.get(corr) if corr is not None else None
        if waiter is not None:
            waiter.body = body
            waiter.done.set()


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def _describe(arg: Union[Task, Event]) -> str:
    if isinstance(arg, Task):
        return f"task {arg.id} on {arg.queue}"
    return f"event {arg.type}"
