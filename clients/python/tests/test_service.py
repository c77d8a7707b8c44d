"""End-to-end tests of axion_client: the example embedding service and a
producer as real processes against a real `axion serve`, checked the way
an operator would — the retained heartbeat seen by a plain subscriber,
replies on `replyTo`, the queue owner's view, exit codes and their timing.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import QUEUE, REPO_ROOT, axion_bin, wait_exit

RESULT = "axion/default/event/embedding/result"
HEARTBEATS = "axion/default/heartbeat/embedding/+"


def test_heartbeat_record_is_retained_live_and_goes_offline_on_kill_9(serve, watcher_factory, worker_factory):
    w = worker_factory(serve, HEARTBEAT_INTERVAL_SECS="1")
    watch = watcher_factory(serve, HEARTBEATS, RESULT)
    first = w.wait_ready(watch)

    # A subscriber arriving later is handed the record at once: it is retained.
    late = watcher_factory(serve, f"axion/default/heartbeat/embedding/{w.instance}")
    hb = late.heartbeat(lambda hb: True, timeout=2)
    host = socket.gethostname()
    assert hb["service"] == "embedding"
    assert (hb["instance_id"], hb["hostname"], hb["port"], hb["pid"]) == (w.instance, host, w.proc.pid, w.proc.pid)
    assert (hb["package"], hb["status"], hb["interval_secs"]) == ("default", "online", 1)
    assert (hb["connected"], hb["queue_depth"], hb["inflight"]) == (True, 0, 0)
    assert hb["boot_id"] == first["boot_id"] and hb["seq"] >= first["seq"]
    assert hb["worker"] == f"axion-svc-embedding-{host}-{w.proc.pid}", "the worker id the queue owner releases by"
    assert isinstance(hb["proc_start_ticks"], int) and hb["host_boot_id"], "what the reaper needs"
    assert isinstance(hb["timestamp"], float) and isinstance(hb["uptime_seconds"], int)

    watch.enqueue(QUEUE, {"payload": {"items": ["a", "b"]}, "replyTo": "embedding.result"})
    assert len(watch.on(RESULT)["payload"]["embeddings"]) == 2
    live = watch.heartbeat(lambda hb: isinstance(hb.get("avg_job_ms"), (int, float)))
    assert isinstance(live["last_progress_ts"], float) and live["seq"] > hb["seq"]

    monitor = subprocess.run(
        [str(axion_bin()), "monitor", "--once", "--json", "--service", "embedding", "--mqtt", serve.url],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert w.instance in monitor.stdout, f"axion monitor shows the instance: {monitor.stdout}"

    w.proc.send_signal(signal.SIGKILL)
    gone = watch.heartbeat(lambda hb: hb["status"] == "offline", timeout=5)
    assert (gone["reason"], gone["boot_id"]) == ("lost", first["boot_id"]), "the will, at once"


def test_tasks_from_a_producer_and_the_cli_reach_the_handler_once_and_are_acked(serve, watcher_factory, worker_factory):
    worker_factory(serve, MAX_INFLIGHT="2")
    watch = watcher_factory(serve, RESULT)
    for i in range(5):
        watch.enqueue(QUEUE, {"payload": {"items": [f"t{i}"]}, "replyTo": "embedding.result", "correlationId": f"c{i}"})
    cli = subprocess.run(
        [
            str(axion_bin()),
            "queue",
            "enqueue",
            QUEUE,
            "--mqtt",
            serve.url,
            "--payload",
            '{"items": ["cli"]}',
            "--reply-to",
            "embedding.result",
            "--correlation-id",
            "cli",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert cli.returncode == 0, cli.stderr
    seen = {}
    for _ in range(6):
        r = watch.on(RESULT)
        assert r["source"] == "embedding" and r["payload"]["attempts"] == 1, r
        assert r["correlationId"] not in seen, f"done twice: {r}"
        seen[r["correlationId"]] = r
    assert set(seen) == {"c0", "c1", "c2", "c3", "c4", "cli"}
    stats = watch.show(QUEUE)["stats"]
    assert (stats["acked_total"], stats["depth"], stats["inflight"]) == (6, 0, 0), stats


def test_a_service_enqueues_confirmed_by_the_owner_and_hears_refusals(serve_factory, watcher_factory, worker_factory):
    serve = serve_factory("--queue-limit", "tiny=1")
    producer = worker_factory(serve, Path(__file__).with_name("producer_service.py"))
    worker_factory(serve)
    watch = watcher_factory(
        serve, RESULT, "axion/default/event/submit/reply", "axion/default/event/jobs/submitted", "axion/+/heartbeat/+/+"
    )
    producer.wait_ready(watch)

    def submit(queue: str, task: dict, corr: str) -> dict:
        body = {
            "type": "jobs.submit",
            "payload": {"queue": queue, "task": task, "reply_to": "embedding.result"},
            "replyTo": "submit.reply",
            "correlationId": corr,
        }
        # The first request may beat the producer's subscription: ask until answered.
        deadline = time.monotonic() + 10
        while True:
            watch.request("jobs.submit", body)
            try:
                return watch.next(lambda t, b: b.get("correlationId") == corr, 1.0, "submit reply")
            except pytest.fail.Exception:
                assert time.monotonic() < deadline, "the producer never answered"

    reply = submit(QUEUE, {"items": ["from-python"]}, "s1")
    task_id = reply["payload"]["id"]
    submitted = watch.on("axion/default/event/jobs/submitted")
    assert submitted["payload"] == {"id": task_id, "queue": QUEUE}
    result = watch.on(RESULT)
    assert len(result["payload"]["embeddings"]) == 1

    assert "id" in submit("tiny", {"n": 1}, "s2")["payload"]
    refused = submit("tiny", {"n": 2}, "s3")["payload"]
    assert "full" in refused["error"], refused


def test_long_task_reports_progress_and_keeps_its_ack_wait(serve_factory, watcher_factory, worker_factory):
    serve = serve_factory("--ack-wait-ms", "600")
    w = worker_factory(serve, AXION_QUEUE_ACK_WAIT_MS="600", LIVENESS_MAX_STALL_MS="1000")
    watch = watcher_factory(serve, RESULT)
    # 2.4 s of work, 400 ms per item: longer than both the ack wait and
    # the stall limit, but never 1 s without progress.
    watch.enqueue(
        QUEUE,
        {
            "payload": {"items": list("abcdef"), "delay_ms": 2400},
            "replyTo": "embedding.result",
            "correlationId": "long",
        },
    )
    r = watch.on(RESULT, timeout=15)
    assert r["correlationId"] == "long"
    assert r["payload"]["attempts"] == 1, "never redelivered under a 600 ms ack wait"
    assert w.proc.poll() is None, "progress kept the watchdog from calling it stalled"


def test_overload_is_refused_at_once(serve, watcher_factory, worker_factory):
    w = worker_factory(serve, MAX_INFLIGHT="1", MAX_QUEUE="2", EMBED_DELAY_MS="300")
    watch = watcher_factory(serve, "axion/default/event/burst/reply")
    w.wait_ready(watcher_factory(serve, HEARTBEATS))
    n = 20
    start = time.monotonic()
    for i in range(n):
        watch.request(
            "embedding.request",
            {"type": "embedding.request", "payload": {"items": [i]}, "replyTo": "burst.reply", "correlationId": str(i)},
        )
    answers = {}
    while len(answers) < n:
        r = watch.on("axion/default/event/burst/reply", timeout=15)
        assert r["correlationId"] not in answers, "one answer per request"
        answers[r["correlationId"]] = (r["payload"], time.monotonic() - start)
    overloaded = [(p, at) for p, at in answers.values() if p.get("overloaded") is True]
    results = [p for p, _ in answers.values() if "embeddings" in p]
    assert len(overloaded) + len(results) == n
    assert len(results) >= 3, "what fitted (1 running + 2 waiting) was done"
    assert overloaded, "the burst beyond the limits was refused"
    for p, at in overloaded:
        assert isinstance(p["retry_after_ms"], int) and p["retry_after_ms"] > 0, p
        assert at < 1.5, f"refused at once, not after the work: {at:.2f} s"


def test_sigterm_finishes_the_running_task_then_exits_0(serve, watcher_factory, worker_factory):
    w = worker_factory(serve, DRAIN_MS="5000", HEARTBEAT_INTERVAL_SECS="1")
    watch = watcher_factory(serve, RESULT, HEARTBEATS)
    watch.enqueue(
        QUEUE,
        {"payload": {"items": ["x"], "delay_ms": 3000}, "replyTo": "embedding.result", "correlationId": "t"},
    )
    watch.heartbeat(lambda hb: hb["inflight"] == 1)
    w.proc.send_signal(signal.SIGTERM)
    order = []
    while order[-1:] != ["offline"]:
        body = watch.next(lambda t, b: True, 10, "the drain sequence")
        if body.get("type") == "embedding.result":
            assert body["correlationId"] == "t"
            order.append("result")
        elif body.get("status") in ("draining", "offline"):
            order.append(body["status"])
            if body["status"] == "offline":
                assert body["reason"] == "stopped"
    assert order.index("draining") < order.index("result") < order.index("offline"), order
    assert wait_exit(w.proc, 5) == 0
    stats = watch.show(QUEUE)["stats"]
    assert (stats["acked_total"], stats["depth"]) == (1, 0), stats


def test_sigterm_hands_back_a_task_that_outlives_drain_ms_to_another_worker(serve, watcher_factory, worker_factory):
    a = worker_factory(serve, DRAIN_MS="300", HEARTBEAT_INTERVAL_SECS="1")
    watch = watcher_factory(serve, RESULT, HEARTBEATS)
    watch.enqueue(
        QUEUE, {"payload": {"items": ["x"], "delay_ms": 3000}, "id": "handed-back", "replyTo": "embedding.result"}
    )
    watch.heartbeat(lambda hb: hb["pid"] == a.proc.pid and hb["inflight"] == 1)
    t0 = time.monotonic()
    a.proc.send_signal(signal.SIGTERM)
    assert wait_exit(a.proc, 5) == 0
    assert time.monotonic() - t0 < 0.3 + 1.5
    b = worker_factory(serve)
    r = watch.on(RESULT, timeout=15)
    assert r["payload"]["pid"] == b.proc.pid
    assert r["payload"]["attempts"] == 1, "handed back, not counted as an attempt"


def test_kill_9_mid_task_hands_it_to_another_worker_at_once(serve, watcher_factory, worker_factory):
    workers = [worker_factory(serve, HEARTBEAT_INTERVAL_SECS="1") for _ in range(2)]
    watch = watcher_factory(serve, RESULT, HEARTBEATS)
    for w in workers:
        w.wait_ready(watch)
    watch.enqueue(QUEUE, {"payload": {"items": ["x"], "delay_ms": 3000}, "replyTo": "embedding.result"})
    holder = watch.heartbeat(lambda hb: hb["inflight"] == 1)["pid"]
    [held] = [w for w in workers if w.proc.pid == holder]
    [other] = [w for w in workers if w.proc.pid != holder]
    held.proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    r = watch.on(RESULT, timeout=15)
    assert (r["payload"]["pid"], r["payload"]["attempts"]) == (other.proc.pid, 2)
    # 3 s of work: redelivered through the will, not after the 30 s ack wait.
    assert time.monotonic() - killed < 10


def test_broker_killed_exits_70_within_the_limit(serve, watcher_factory, worker_factory):
    w = worker_factory(serve, DISCONNECT_KILL_MS="1500")
    w.wait_ready(watcher_factory(serve, HEARTBEATS))
    serve.kill()
    killed = time.monotonic()
    code = wait_exit(w.proc, 10)
    took = time.monotonic() - killed
    assert code == 70, w.output()
    assert 1.5 <= took <= 2.5, f"exit {took:.2f} s after the broker died (limit 1.5 s + 1 s)"


@pytest.mark.parametrize(
    "stuck",
    [
        pytest.param({"spin_in_c": True}, id="C code holding the GIL"),
        pytest.param({"hang": True}, id="blocking system call"),
    ],
)
def test_stuck_handler_exits_71_and_says_stalled(stuck, serve, watcher_factory, worker_factory):
    w = worker_factory(serve, LIVENESS_MAX_STALL_MS="1500", HEARTBEAT_INTERVAL_SECS="1")
    probe = "axion/default/event/probe/reply"
    watch = watcher_factory(serve, HEARTBEATS, probe)
    w.wait_ready(watch)
    watch.enqueue(QUEUE, {"payload": {"items": ["x"], **stuck}})
    busy = time.monotonic()
    # The heartbeat keeps going while the handler is stuck.
    stuck_hb = watch.heartbeat(lambda hb: hb["inflight"] == 1)
    holds_gil = stuck.get("spin_in_c") is True
    if holds_gil:
        # With a free slot, a request would be answered at once, unless the
        # stuck handler holds the GIL and every Python thread of the service
        # waits for it.
        watch.request(
            "embedding.request", {"type": "embedding.request", "payload": {"items": ["y"]}, "replyTo": "probe.reply"}
        )
    code = wait_exit(w.proc, 10)
    took = time.monotonic() - busy
    assert code == 71, w.output()
    assert 1.4 <= took <= 2.5, f"exit {took:.2f} s after the handler got stuck (limit 1.5 s + 1 s)"
    final = watch.heartbeat(lambda hb: hb["status"] == "offline", timeout=5)
    assert (final["reason"], final["inflight"], final["boot_id"]) == ("stalled", 1, stuck_hb["boot_id"]), final
    if holds_gil:
        answered = [b for t, b in watch.backlog if t == probe]
        assert not answered, f"the service ran Python code while stuck, so the GIL was free: {answered}"


def test_idle_service_outlives_the_stall_limit_and_still_works(serve, watcher_factory, worker_factory):
    w = worker_factory(serve, LIVENESS_MAX_STALL_MS="800")
    watch = watcher_factory(serve, RESULT, HEARTBEATS)
    w.wait_ready(watch)
    # The property under test is "nothing happens while idle": wait 2.5x the limit and look.
    time.sleep(2.0)
    assert w.proc.poll() is None, "an idle service must not be killed as stalled"
    watch.enqueue(QUEUE, {"payload": {"items": ["x"]}, "replyTo": "embedding.result", "correlationId": "after-idle"})
    assert watch.on(RESULT)["correlationId"] == "after-idle"
    assert w.proc.poll() is None


def test_a_configuration_error_exits_78():
    bad = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from axion_client import Service; sys.exit(Service('a/b').queue('q', print).run())",
        ],
        env={"PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 78, bad.stderr
    assert "must not contain" in bad.stderr


def test_task_and_event_bodies_round_trip_as_json(serve, watcher_factory, worker_factory):
    w = worker_factory(serve)
    watch = watcher_factory(serve, "axion/default/event/req/reply", HEARTBEATS)
    w.wait_ready(watch)
    body = {
        "type": "embedding.request",
        "payload": {"items": ["x", {"k": [1, 2]}]},
        "replyTo": "req.reply",
        "correlationId": "e1",
    }
    watch.request("embedding.request", body)
    r = watch.on("axion/default/event/req/reply")
    assert r["correlationId"] == "e1" and r["type"] == "req.reply" and r["source"] == "embedding"
    assert len(r["payload"]["embeddings"]) == 2
    watch.request("embedding.request", {**body, "payload": {"fail": "nope", "items": []}, "correlationId": "e2"})
    assert watch.on("axion/default/event/req/reply")["payload"] == {"error": "nope"}


def test_a_task_from_the_legacy_python_client_through_the_bridge_is_done(serve, watcher_factory, worker_factory):
    worker_factory(serve)
    watch = watcher_factory(serve, f"axion/default/queue/{QUEUE}/ack")
    legacy = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import asyncio, sys\n"
            "from broker_client import BrokerClient\n"
            "async def main():\n"
            "    c = BrokerClient(sys.argv[1])\n"
            "    await c.connect()\n"
            f"    await c.enqueue({QUEUE!r}, {{'items': ['legacy']}})\n"
            "    await asyncio.sleep(60)\n"
            "asyncio.run(main())\n",
            f"ws://127.0.0.1:{serve.ws_port}",
        ],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT / "tests" / "clients")},
    )
    try:
        assert watch.on(f"axion/default/queue/{QUEUE}/ack", timeout=15)["id"]
    finally:
        legacy.kill()
        legacy.wait()


def test_a_forked_child_does_not_keep_a_killed_service_looking_alive(serve, watcher_factory, worker_factory):
    w = worker_factory(serve, Path(__file__).with_name("forking_service.py"))
    watch = watcher_factory(serve, "axion/default/heartbeat/forking/+", "axion/default/event/fork/done")
    w.wait_ready(watch)
    watch.enqueue("fork.jobs", {"payload": {}, "replyTo": "fork.done"})
    child = watch.on("axion/default/event/fork/done")["payload"]["child"]
    try:
        w.proc.send_signal(signal.SIGKILL)
        gone = watch.heartbeat(lambda hb: hb["status"] == "offline", timeout=5)
        assert gone["reason"] == "lost"
    finally:
        os.kill(child, signal.SIGKILL)


def test_sigint_to_the_whole_process_group_still_ends_with_stopped(serve, watcher_factory, worker_factory):
    # Ctrl-C in a terminal, or a supervisor's tree kill, reaches the
    # heartbeat companion too: the record must still end `stopped`, not `lost`.
    w = worker_factory(serve, new_session=True)
    watch = watcher_factory(serve, HEARTBEATS)
    w.wait_ready(watch)
    os.killpg(w.proc.pid, signal.SIGINT)
    assert wait_exit(w.proc, 10) == 0
    final = watch.heartbeat(lambda hb: hb["status"] == "offline", timeout=5)
    assert final["reason"] == "stopped"


def test_the_broker_unix_socket_serves_as_well(serve, watcher_factory, worker_factory):
    w = worker_factory(serve, AXION_MQTT_URL=f"unix://{serve.data_dir / 'mqtt.sock'}")
    watch = watcher_factory(serve, RESULT, HEARTBEATS)
    w.wait_ready(watch)
    watch.enqueue(QUEUE, {"payload": {"items": ["u"]}, "replyTo": "embedding.result", "correlationId": "unix"})
    assert watch.on(RESULT)["correlationId"] == "unix"


def test_a_broker_back_within_the_limit_gets_the_service_back(serve, watcher_factory, worker_factory):
    w = worker_factory(serve, DISCONNECT_KILL_MS="10000")
    before = w.wait_ready(watcher_factory(serve, HEARTBEATS))
    serve.restart()
    watch = watcher_factory(serve, RESULT, HEARTBEATS)
    # Reconnected: a new record of this run, and fresh credit brings work.
    back = watch.heartbeat(lambda hb: hb["seq"] > before["seq"] and hb["connected"])
    assert (back["status"], back["boot_id"]) == ("online", before["boot_id"])
    watch.enqueue(QUEUE, {"payload": {"items": ["again"]}, "replyTo": "embedding.result", "correlationId": "back"})
    assert watch.on(RESULT)["correlationId"] == "back"
    assert w.proc.poll() is None


def test_tasks_handed_back_at_the_end_of_a_drain_reach_another_worker_at_once(
    serve, watcher_factory, worker_factory, tmp_path
):
    # The owner delivers what the drain hands back through the queue's
    # shared subscription. A stopping worker still in that group would get
    # about half of it and drop it unseen: those tasks would wait out the
    # ack wait (30 s) instead of moving at once.
    script = Path(__file__).with_name("xl_service.py")
    env = {"XL_ROLE": "worker", "XL_DONE_DIR": str(tmp_path), "HEARTBEAT_INTERVAL_SECS": "1"}
    a = worker_factory(serve, script, DRAIN_MS="300", **env)
    watch = watcher_factory(serve, "axion/default/heartbeat/xl-py/+", "axion/default/event/xl/done")
    a.wait_ready(watch)
    for i in range(8):
        watch.enqueue("xl.py", {"payload": {"key": f"k{i}", "block_pid": a.proc.pid}, "id": f"k{i}"})
    watch.heartbeat(lambda hb: hb["pid"] == a.proc.pid and hb["inflight"] == 8)
    b = worker_factory(serve, script, **env)
    b.wait_ready(watch)
    a.proc.send_signal(signal.SIGTERM)
    assert wait_exit(a.proc, 5) == 0
    done = {}
    for _ in range(8):
        try:
            d = watch.next(lambda t, body: t == "axion/default/event/xl/done", 5, "done task")["payload"]
        except pytest.fail.Exception:
            break
        done[d["key"]] = d
    assert set(done) == {f"k{i}" for i in range(8)}, f"done within 5 s of the drain: {sorted(done)}"
    assert {(d["pid"], d["attempts"]) for d in done.values()} == {(b.proc.pid, 1)}


def test_handler_threads_are_reused_and_a_blocked_one_holds_only_its_slot(serve, watcher_factory, worker_factory):
    script = Path(__file__).with_name("pool_service.py")
    w = worker_factory(serve, script, MAX_INFLIGHT="3", HEARTBEAT_INTERVAL_SECS="1")
    done = "axion/default/event/pool/done"
    watch = watcher_factory(serve, "axion/default/heartbeat/pool/+", done)
    w.wait_ready(watch)
    watch.enqueue("pool.jobs", {"payload": {"block": True}, "id": "blocked"})
    watch.heartbeat(lambda hb: hb["pid"] == w.proc.pid and hb["inflight"] == 1)
    n = 30
    for i in range(n):
        watch.enqueue("pool.jobs", {"payload": {}, "replyTo": "pool.done", "correlationId": str(i)})
    answers = [watch.on(done) for _ in range(n)]
    assert {a["correlationId"] for a in answers} == {str(i) for i in range(n)}, "the other slots kept working"
    threads = {a["payload"]["thread"] for a in answers}
    assert len(threads) <= 2, f"{n} tasks on {len(threads)} threads: the two free slots' threads are reused"
    # The live numbers follow within an interval: the blocked job still runs,
    # the rest is done and timed.
    hb = watch.heartbeat(
        lambda hb: hb["pid"] == w.proc.pid and hb["inflight"] == 1 and isinstance(hb.get("avg_job_ms"), (int, float))
    )
    assert hb["queue_depth"] == 0 and time.time() - hb["last_progress_ts"] < 5, hb
    stats = watch.show("pool.jobs")["stats"]
    assert (stats["acked_total"], stats["inflight"]) == (n, 1), stats


def test_a_service_started_before_its_broker_connects_once_the_broker_is_up(serve, watcher_factory, worker_factory):
    serve.kill()
    w = worker_factory(serve, DISCONNECT_KILL_MS="10000")
    deadline = time.monotonic() + 10
    while "cannot reach the broker" not in w.output():
        assert time.monotonic() < deadline and w.proc.poll() is None, w.output()
        time.sleep(0.05)  # polling the log for the refused attempt
    # It keeps trying; once the broker is back: a record, credit and work.
    serve.restart()
    watch = watcher_factory(serve, RESULT, HEARTBEATS)
    w.wait_ready(watch)
    watch.enqueue(QUEUE, {"payload": {"items": ["late"]}, "replyTo": "embedding.result", "correlationId": "late"})
    assert watch.on(RESULT)["correlationId"] == "late"
    assert w.proc.poll() is None


NODE_EXAMPLE = REPO_ROOT / "clients" / "node" / "examples" / "embedding-worker.js"


def test_python_and_node_workers_take_their_tasks_by_directed_delivery_once_each(
    serve, watcher_factory, worker_factory
):
    ready = f"axion/default/queue/{QUEUE}/ready"
    directed = f"axion/default/queue/{QUEUE}/tasks/+"
    watch = watcher_factory(serve, RESULT, HEARTBEATS, ready, directed)
    workers = [
        worker_factory(serve, AXION_DIRECTED_DELIVERY="1", MAX_INFLIGHT="2"),
        worker_factory(serve, NODE_EXAMPLE, AXION_DIRECTED_DELIVERY="true", MAX_INFLIGHT="2"),
    ]
    for w in workers:
        w.wait_ready(watch)
    # Each asks for its tasks on its own topic, in its credit.
    named: set[str] = set()
    while len(named) < 2:
        credit = watch.next(
            lambda t, b: t == ready and b.get("directed") is True and b["worker"] not in named, 10, "directed credit"
        )
        named.add(credit["worker"])
    # Long enough that both are needed.
    for i in range(20):
        watch.enqueue(
            QUEUE,
            {"payload": {"items": [f"t{i}"], "delay_ms": 100}, "replyTo": "embedding.result", "correlationId": f"c{i}"},
        )
    done: dict[str, int] = {}
    for _ in range(20):
        r = watch.on(RESULT)
        assert r["correlationId"] not in done, f"done twice: {r}"
        done[r["correlationId"]] = r["payload"]["pid"]
    assert set(done.values()) == {w.proc.pid for w in workers}, done
    # Every delivery went to the topic of the worker whose credit it used.
    for _ in range(20):
        record = watch.next(lambda t, _: t.startswith(directed[:-1]), 5, "a directed task record")
        assert record["worker"] in named, record
    stats = watch.show(QUEUE)["stats"]
    assert (stats["acked_total"], stats["stray_acks_total"], stats["depth"], stats["inflight"]) == (20, 0, 0, 0), stats
