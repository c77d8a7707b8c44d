"""A service given several broker URLs (`AXION_MQTT_URL=mqtt://a,mqtt://b`)
fails over between them, as the Rust runtime does: two `axion serve` stand
in for the nodes of a clustered broker."""

from __future__ import annotations

import subprocess
import time

from conftest import QUEUE, axion_bin, wait_exit

RESULT = "axion/default/event/embedding/result"
HEARTBEATS = "axion/default/heartbeat/embedding/+"
PASSWORD = "s3cret-pass"


def test_a_dead_first_url_is_passed_over_for_the_live_second(serve_factory, watcher_factory, worker_factory):
    dead, live = serve_factory(), serve_factory()
    dead.kill()
    w = worker_factory(live, AXION_MQTT_URL=f"{dead.url},{live.url}")
    watch = watcher_factory(live, RESULT, HEARTBEATS)
    w.wait_ready(watch)
    watch.enqueue(QUEUE, {"payload": {"items": ["x"]}, "replyTo": "embedding.result", "correlationId": "second"})
    assert watch.on(RESULT)["correlationId"] == "second"


def test_the_service_moves_to_the_second_node_when_the_first_dies(serve_factory, watcher_factory, worker_factory):
    a, b = serve_factory(), serve_factory()
    w = worker_factory(a, AXION_MQTT_URL=f"{a.url},{b.url}", DISCONNECT_KILL_MS="1500")
    w.wait_ready(watcher_factory(a, HEARTBEATS))
    watch = watcher_factory(b, RESULT, HEARTBEATS)
    a.kill()
    killed = time.monotonic()
    # Both the service's connection and its heartbeat's are on B.
    w.wait_ready(watch, timeout=10)
    watch.enqueue(QUEUE, {"payload": {"items": ["y"]}, "replyTo": "embedding.result", "correlationId": "moved"})
    assert watch.on(RESULT)["correlationId"] == "moved"
    # Past DISCONNECT_KILL_MS since A died: the time without any node is what counts.
    time.sleep(max(0.0, killed + 3.0 - time.monotonic()))
    assert w.proc.poll() is None, w.output()


def test_every_node_refusing_the_credentials_exits_78(serve_factory, worker_factory, tmp_path):
    hashed = subprocess.run(
        [str(axion_bin()), "passwd", "--password", PASSWORD], capture_output=True, text=True, check=True
    ).stdout.strip()
    auth = tmp_path / "auth.toml"
    auth.write_text(f'[roles.all]\npublish = ["#"]\nsubscribe = ["#"]\n\n[users.worker]\n{hashed}\nroles = ["all"]\n')
    a, b = serve_factory("--auth-file", str(auth)), serve_factory("--auth-file", str(auth))
    bad = f"mqtt://worker:wrong@127.0.0.1:{a.mqtt_port},mqtt://worker:wrong@127.0.0.1:{b.mqtt_port}"
    w = worker_factory(a, AXION_MQTT_URL=bad)
    code = wait_exit(w.proc, 30)
    assert code == 78, w.output()
    assert "refused" in w.output()
