"""Plumbing for the end-to-end tests: a real `axion serve` on free ports with
its own data directory, services run as real processes, and a plain paho
client to watch and drive them as a user would.

`AXION_BIN` names the binary (default: `target/debug/axion` under the
repository root; `cargo build -p axion` makes it).
"""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
REPO_ROOT = PACKAGE_ROOT.parents[1]
EXAMPLE = PACKAGE_ROOT / "examples" / "embedding_worker.py"
QUEUE = "embedding.generate"


def axion_bin() -> Path:
    return Path(os.environ.get("AXION_BIN") or REPO_ROOT / "target" / "debug" / "axion")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def wait_exit(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{proc.args} did not exit within {timeout} s")


class Serve:
    """`axion serve` on free ports with its own data directory."""

    def __init__(self, args: list[str]) -> None:
        self.args = args
        self._dir = tempfile.TemporaryDirectory(prefix="axion-py-")
        self.data_dir = Path(self._dir.name)
        self.log = self.data_dir / "serve.log"
        self.proc: Optional[subprocess.Popen] = None
        # A free port can be taken before `serve` binds it: then it exits,
        # and starts again on other ports.
        for _ in range(3):
            self.mqtt_port, self.ws_port = free_port(), free_port()
            if self._spawn():
                return
        pytest.fail(f"axion serve did not start; its log:\n{self.log.read_text()}")

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    def _spawn(self) -> bool:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(axion_bin()),
                    "serve",
                    "--mqtt-listen",
                    f"127.0.0.1:{self.mqtt_port}",
                    "--ws-listen",
                    f"127.0.0.1:{self.ws_port}",
                    "--data-dir",
                    str(self.data_dir),
                    *self.args,
                ],
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if listening(self.mqtt_port) and listening(self.ws_port):
                return True
            time.sleep(0.02)
        return False

    def restart(self) -> None:
        """Kills and starts again on the same ports and data directory."""
        self.kill()
        if not self._spawn():
            pytest.fail(f"axion serve did not come back; its log:\n{self.log.read_text()}")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self.kill()
        self._dir.cleanup()


class Watcher:
    """A plain paho MQTT 5 client: what a user would point at the broker."""

    def __init__(self, serve: Serve, topics: list[str]) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.backlog: list[tuple[str, Any]] = []
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:12]}", protocol=mqtt.MQTTv5
        )
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        subscribed: queue.Queue[Any] = queue.Queue()
        self.client.on_subscribe = lambda c, u, mid, codes, p: subscribed.put(codes)
        self.client.connect("127.0.0.1", serve.mqtt_port, keepalive=30)
        self.client.loop_start()
        for t in topics:
            self.client.subscribe(t, qos=1)
            subscribed.get(timeout=10)

    def publish(self, topic: str, body: Any, response_topic: Optional[str] = None) -> None:
        props = None
        if response_topic is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = response_topic
        self.client.publish(topic, json.dumps(body), qos=1, properties=props).wait_for_publish(10)

    def enqueue(self, queue_name: str, body: dict[str, Any]) -> None:
        self.publish(f"axion/default/queue/{queue_name}/enqueue", body)

    def request(self, event_type: str, body: dict[str, Any]) -> None:
        self.publish(f"axion/default/event/{event_type.replace('.', '/')}", body)

    def next(self, pred: Callable[[str, Any], bool], timeout: float, what: str) -> Any:
        """The oldest message not yet taken (topic, JSON body) for which
        `pred` holds; the others stay for later calls."""
        for i, (topic, body) in enumerate(self.backlog):
            if pred(topic, body):
                del self.backlog[i]
                return body
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"no {what} within {timeout} s")
            try:
                m = self.messages.get(timeout=left)
            except queue.Empty:
                continue
            if not m.payload:
                continue
            body = json.loads(m.payload)
            if pred(m.topic, body):
                return body
            self.backlog.append((m.topic, body))

    def on(self, topic: str, timeout: float = 10) -> Any:
        return self.next(lambda t, _: t == topic, timeout, f"message on {topic}")

    def heartbeat(self, pred: Callable[[Any], bool], timeout: float = 10) -> Any:
        return self.next(lambda t, b: "/heartbeat/" in t and pred(b), timeout, "matching heartbeat")

    def show(self, queue_name: str) -> Any:
        """The queue owner's view of a queue (`show` over the ops topic)."""
        reply = f"t/show/{uuid.uuid4().hex}"
        self.client.subscribe(reply, qos=1)
        time.sleep(0.05)
        self.publish(f"axion/default/queue/{queue_name}/cmd", {"op": "show", "replyTo": reply})
        return self.on(reply)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Worker:
    """A service (the example by default) as a real process: a Python
    script, or a Node one (`.js`, run by `node`)."""

    def __init__(
        self, serve: Serve, env: dict[str, str], log_dir: Path, script: Path = EXAMPLE, new_session: bool = False
    ) -> None:
        self.log = log_dir / f"worker-{uuid.uuid4().hex[:8]}.log"
        full_env = {
            **os.environ,
            "AXION_MQTT_URL": serve.url,
            "PYTHONPATH": str(PACKAGE_ROOT),
            "LOG_LEVEL": "INFO",
            **env,
        }
        interpreter = "node" if script.suffix == ".js" else sys.executable
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [interpreter, str(script)], env=full_env, stdout=log, stderr=log, start_new_session=new_session
            )
        self.instance = f"{socket.gethostname()}:{self.proc.pid}"

    def wait_ready(self, watcher: Watcher, timeout: float = 15) -> Any:
        """Its heartbeat, once it says the service is connected."""
        return watcher.heartbeat(lambda hb: hb.get("pid") == self.proc.pid and hb["connected"], timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def serve_factory() -> Iterator[Callable[..., Serve]]:
    started: list[Serve] = []

    def start(*args: str) -> Serve:
        s = Serve(list(args))
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()


@pytest.fixture
def serve(serve_factory: Callable[..., Serve]) -> Serve:
    return serve_factory()


@pytest.fixture
def watcher_factory() -> Iterator[Callable[..., Watcher]]:
    made: list[Watcher] = []

    def make(serve: Serve, *topics: str) -> Watcher:
        w = Watcher(serve, list(topics))
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()


@pytest.fixture
def worker_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Worker]]:
    started: list[Worker] = []

    def start(serve: Serve, script: Path = EXAMPLE, new_session: bool = False, **env: str) -> Worker:
        w = Worker(serve, env, tmp_path, script, new_session)
        started.append(w)
        return w

    yield start
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for w in started:
        w.kill()
        if failed:
            sys.stderr.write(f"--- {w.proc.args[-1]} (pid {w.proc.pid}) log:\n{w.output()}\n")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    """Keeps each phase's report on the test, so fixtures can print the
    services' logs when it failed."""
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep
