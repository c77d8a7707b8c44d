"""The fleet across languages, end to end, on a real `axion serve`: Python
workers (`axion_client`) and Node workers (`axion-client`) take tasks
enqueued by the other language's package, by both legacy clients through
the WebSocket bridge and by `axion queue enqueue`, and every task is done
and acked exactly once while a worker is killed with -9 mid-task or stopped
with SIGTERM mid-flow.

Queue `xl.py` is served by Python workers (service `xl-py`), queue
`xl.node` by Node workers (`xl-node`); the Node producer service enqueues
on `xl.py`, the Python one on `xl.node`, the legacy clients and the CLI on
both. Each language has a victim, started first and alone on its queue, so
that it takes the tasks the disruption cuts short, and a survivor, which
takes the rest and whatever the victim leaves. The workers are
`xl_service.py` and `clients/node/test-support/xl-service.js`: each
execution is a line in a file (counted here) and an `xl.done` event
(awaited here).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import pytest
from conftest import PACKAGE_ROOT, REPO_ROOT, Serve, Watcher, Worker, axion_bin, wait_exit

LANGS = ("python", "node")
SCRIPT = {
    "python": Path(__file__).with_name("xl_service.py"),
    "node": PACKAGE_ROOT.parent / "node" / "test-support" / "xl-service.js",
}
#: The queue each language's workers serve, and the service names.
QUEUE = {"python": "xl.py", "node": "xl.node"}
WORKER_SERVICE = {"python": "xl-py", "node": "xl-node"}
PRODUCER_SERVICE = {"python": "xl-py-producer", "node": "xl-node-producer"}
OTHER = {"python": "node", "node": "python"}

HEARTBEATS = "axion/default/heartbeat/+/+"
DONE = "axion/default/event/xl/done"
ANSWER = "axion/default/event/xl/answer"
STATS = "axion/default/queue/+/stats"
#: How long each flow task takes: long enough that a disruption finds work running.
FLOW_MS = 40


class Fleet:
    """Starts the services, sends the work and keeps what a test checks."""

    def __init__(self, serve: Serve, watch: Watcher, start: Callable[..., Worker], done_dir: Path) -> None:
        self.serve, self.watch, self.done_dir = serve, watch, done_dir
        self._start = start
        #: Every task a test enqueued: key → queue.
        self.expected: dict[str, str] = {}
        self.dones: list[dict[str, Any]] = []
        self.pending: list[tuple[str, subprocess.Popen]] = []
        self.answers: list[tuple[str, str, list[str]]] = []

    def start(self, lang: str, role: str, **env: str) -> Worker:
        return self._start(
            self.serve,
            SCRIPT[lang],
            XL_ROLE=role,
            XL_DONE_DIR=str(self.done_dir),
            HEARTBEAT_INTERVAL_SECS="1",
            **env,
        )

    def task(self, lang: str, source: str, i: int, **payload: Any) -> tuple[str, dict[str, Any]]:
        """A new task for `lang`'s queue: its key (also its id where the
        source lets one choose) and its payload."""
        key = f"{QUEUE[lang]}/{source}/{i}"
        self.expected[key] = QUEUE[lang]
        return key, {"key": key, **payload}

    def cli(self, lang: str, source: str, i: int, **payload: Any) -> None:
        """`axion queue enqueue`, left running; `settle()` checks it."""
        key, body = self.task(lang, source, i, **payload)
        args = ["queue", "enqueue", QUEUE[lang], "--mqtt", self.serve.url, "--id", key, "--payload", json.dumps(body)]
        self._spawn(f"axion queue enqueue {key}", [str(axion_bin()), *args])

    def legacy(self, client: str, per_queue: int) -> None:
        """Both legacy clients enqueue through the bridge (the payload only:
        the bridge picks the id); they exit once all are confirmed."""
        tasks = [
            {"queue": QUEUE[lang], "payload": self.task(lang, f"legacy-{client}", i, sleep_ms=FLOW_MS)[1]}
            for lang in LANGS
            for i in range(per_queue)
        ]
        here = Path(__file__).parent
        argv = {
            "js": ["node", str(here / "legacy_enqueue.mjs")],
            "py": [sys.executable, str(here / "legacy_enqueue.py")],
        }[client]
        self._spawn(f"legacy {client} client", [*argv, f"ws://127.0.0.1:{self.serve.ws_port}", json.dumps(tasks)])

    def _spawn(self, what: str, argv: list[str]) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "tests" / "clients")}
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.pending.append((what, proc))

    def subscribed(self, lang: str) -> None:
        """Asks `lang`'s producer `xl.<lang>.ping` until it answers: then its
        subscriptions are in place (one SUBSCRIBE carries them all)."""
        deadline = time.monotonic() + 15
        while True:
            corr = f"ping-{uuid.uuid4().hex}"
            self.watch.request(
                f"xl.{lang}.ping",
                {"type": f"xl.{lang}.ping", "payload": {}, "replyTo": "xl.answer", "correlationId": corr},
            )
            try:
                self.watch.next(answer_to(corr), 0.5, "ping answer")
                return
            except pytest.fail.Exception:
                assert time.monotonic() < deadline, f"the {lang} producer never answered"

    def produce(self, lang: str, first: int, n: int) -> None:
        """`lang`'s producer service enqueues `n` tasks on the OTHER
        language's queue through its package's `enqueue`; the answer (the
        confirmed ids) is checked by `settle()`."""
        target = OTHER[lang]
        tasks = []
        for i in range(first, first + n):
            key, body = self.task(target, f"{lang}-package", i, sleep_ms=FLOW_MS)
            tasks.append({"id": key, "payload": body})
        corr = f"produce-{uuid.uuid4().hex}"
        self.watch.request(
            f"xl.{lang}.produce",
            {
                "type": f"xl.{lang}.produce",
                "payload": {"queue": QUEUE[target], "tasks": tasks},
                "replyTo": "xl.answer",
                "correlationId": corr,
            },
        )
        self.answers.append((lang, corr, [t["id"] for t in tasks]))

    def done(self, lang: str, n: int) -> None:
        """Waits until `lang`'s workers have done `n` more tasks (their `xl.done` events)."""
        for _ in range(n):
            body = self.watch.next(
                lambda t, b: t == DONE and b["payload"]["lang"] == lang, 15, f"{lang} worker's xl.done"
            )
            self.dones.append(body["payload"])

    def acked_all(self) -> None:
        """Waits for each queue's retained stats to count every task acked."""
        for q in QUEUE.values():
            n = sum(1 for v in self.expected.values() if v == q)
            try:
                self.watch.next(acked_at_least(q, n), 20, f"{q} stats with {n} acked")
            except pytest.fail.Exception:
                shown = run_axion("queue", "show", q, "--mqtt", self.serve.url)
                done = sorted(r["key"] for r in self.executions() if r["key"] in self.expected)
                pytest.fail(f"{q}: not every task acked within 20 s; the queue:\n{shown}\ndone: {done}")

    def settle(self) -> None:
        """Every CLI and legacy enqueue confirmed, every producer answered
        with exactly the ids it was given."""
        for what, proc in self.pending:
            try:
                out, err = proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                pytest.fail(f"{what} did not finish")
            assert proc.returncode == 0, f"{what} failed: {err}"
        for lang, corr, ids in self.answers:
            answer = self.watch.next(answer_to(corr), 15, f"{lang} producer's answer")
            assert answer["source"] == PRODUCER_SERVICE[lang]
            assert answer["payload"] == {"ids": ids}, answer

    def executions(self) -> list[dict[str, Any]]:
        """Every execution the workers recorded (read once they are gone)."""
        return [json.loads(line) for f in sorted(self.done_dir.glob("*.jsonl")) for line in f.read_text().splitlines()]

    def assert_each_task_done_once(self) -> dict[str, dict[str, Any]]:
        runs = self.executions()
        counts = Counter(r["key"] for r in runs)
        twice = {k: [r for r in runs if r["key"] == k] for k, c in counts.items() if c > 1}
        assert not twice, f"done more than once: {twice}"
        lost = sorted(set(self.expected) - set(counts))
        assert not lost, f"never done: {lost}"
        assert set(counts) == set(self.expected), f"done but never enqueued: {set(counts) - set(self.expected)}"
        by_key = {r["key"]: r for r in runs}
        for key, r in by_key.items():
            assert self.expected[key] == QUEUE[r["lang"]], f"{key} done by a {r['lang']} worker: {r}"
        for lang in LANGS:
            sources = {k.split("/")[1] for k, r in by_key.items() if r["lang"] == lang}
            assert {f"{OTHER[lang]}-package", "legacy-js", "legacy-py", "cli"} <= sources, (lang, sources)
        for q in QUEUE.values():
            shown = json.loads(run_axion("queue", "show", q, "--json", "--limit", "0", "--mqtt", self.serve.url))[
                "stats"
            ]
            n = sum(1 for v in self.expected.values() if v == q)
            got = (shown["acked_total"], shown["enqueued_total"], shown["depth"], shown["inflight"], shown["dead"])
            assert got == (n, n, 0, 0, 0), f"{q}: {shown}"
        return by_key

    def stop(self, *workers: Worker) -> None:
        """SIGTERM, then exit 0: nothing is left running that could do a task again."""
        for w in workers:
            w.proc.send_signal(signal.SIGTERM)
        for w in workers:
            assert wait_exit(w.proc, 10) == 0, w.output()


def heartbeat(watch: Watcher, w: Worker, pred: Callable[[Any], bool], timeout: float = 10) -> Any:
    """The next heartbeat record of `w` for which `pred` holds."""
    return watch.heartbeat(lambda hb: hb.get("pid") == w.proc.pid and pred(hb), timeout)


def answer_to(corr: str) -> Callable[[str, Any], bool]:
    return lambda t, b: t == ANSWER and b.get("correlationId") == corr


def acked_at_least(queue: str, n: int) -> Callable[[str, Any], bool]:
    return lambda t, b: t == f"axion/default/queue/{queue}/stats" and b["acked_total"] >= n


def run_axion(*args: str) -> str:
    out = subprocess.run([str(axion_bin()), *args], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"axion {' '.join(args)}: {out.stderr}"
    return out.stdout


def monitor(serve: Serve) -> dict[int, dict[str, Any]]:
    """`axion monitor --once --json`: the workers' records, by pid."""
    records = json.loads(run_axion("monitor", "--once", "--json", "--mqtt", serve.url))
    return {r["pid"]: r for r in records if r["service"] in WORKER_SERVICE.values()}


@pytest.fixture
def fleet(serve, watcher_factory, worker_factory, tmp_path) -> Fleet:
    done_dir = tmp_path / "done"
    done_dir.mkdir()
    return Fleet(serve, watcher_factory(serve, HEARTBEATS, DONE, ANSWER, STATS), worker_factory, done_dir)


def start_the_rest(fleet: Fleet) -> tuple[dict[str, Worker], dict[str, Worker]]:
    """The survivors and both producers, started together and awaited."""
    survivors = {lang: fleet.start(lang, "worker") for lang in LANGS}
    producers = {lang: fleet.start(lang, "producer") for lang in LANGS}
    for w in survivors.values():
        w.wait_ready(fleet.watch)
    for lang in LANGS:
        fleet.subscribed(lang)
    return survivors, producers


def first_wave(fleet: Fleet) -> None:
    """Work from the other language's package and both legacy clients,
    then a few tasks done on each queue: the flow is under way."""
    for lang in LANGS:
        fleet.produce(lang, 0, 8)
    fleet.legacy("js", 6)
    fleet.legacy("py", 6)
    for lang in LANGS:
        fleet.done(lang, 4)


def second_wave(fleet: Fleet) -> None:
    """More work from the packages and `axion queue enqueue`, after the disruption."""
    for lang in LANGS:
        fleet.produce(lang, 8, 4)
        for i in range(2):
            fleet.cli(lang, "cli", i, sleep_ms=FLOW_MS)


def test_a_worker_killed_with_9_mid_task_loses_no_task_and_none_is_done_twice(fleet: Fleet):
    watch = fleet.watch
    # One slot each: once a victim holds its doomed task, it takes nothing
    # else, so nothing it finished can be lost with its unsent ack.
    victims = {lang: fleet.start(lang, "worker", MAX_INFLIGHT="1", LIVENESS_MAX_STALL_MS="60000") for lang in LANGS}
    for v in victims.values():
        v.wait_ready(watch)
    for lang, v in victims.items():
        fleet.cli(lang, "doomed", 0, block_pid=v.proc.pid)
    for v in victims.values():
        heartbeat(watch, v, lambda hb: hb["inflight"] == 1)
    survivors, producers = start_the_rest(fleet)
    first_wave(fleet)

    # Both services in the monitor, with their live fields: the victims
    # busy with their one task, the survivors with jobs done.
    for s in survivors.values():
        heartbeat(watch, s, lambda hb: hb.get("avg_job_ms") is not None)
    shown = monitor(fleet.serve)
    for lang in LANGS:
        v, s = shown[victims[lang].proc.pid], shown[survivors[lang].proc.pid]
        for r in (v, s):
            assert (r["service"], r["status"], r["connected"]) == (WORKER_SERVICE[lang], "online", True), r
            assert isinstance(r["queue_depth"], int) and isinstance(r["inflight"], int), r
        assert v["inflight"] == 1, v
        assert isinstance(s["last_progress_ts"], float) and s["avg_job_ms"] >= FLOW_MS * 0.9, s

    for v in victims.values():
        v.proc.send_signal(signal.SIGKILL)
    for v in victims.values():
        gone = heartbeat(watch, v, lambda hb: hb["status"] == "offline", timeout=5)
        assert gone["reason"] == "lost", gone
    shown = monitor(fleet.serve)
    for v in victims.values():
        assert (shown[v.proc.pid]["status"], shown[v.proc.pid]["reason"]) == ("offline", "lost"), shown[v.proc.pid]

    second_wave(fleet)
    fleet.settle()
    fleet.acked_all()
    fleet.stop(*survivors.values(), *producers.values())
    done = fleet.assert_each_task_done_once()
    for lang in LANGS:
        doomed = done[f"{QUEUE[lang]}/doomed/0"]
        assert (doomed["pid"], doomed["attempts"]) == (survivors[lang].proc.pid, 2), doomed


def test_sigterm_mid_flow_finishes_or_hands_back_each_task_and_none_is_done_twice(fleet: Fleet, tmp_path: Path):
    watch = fleet.watch
    drain_ms = 3000
    # Three slots each: one task that outlives DRAIN_MS (handed back when it
    # is up), one the test lets finish during the drain, one for the flow.
    victims = {
        lang: fleet.start(lang, "worker", MAX_INFLIGHT="3", DRAIN_MS=str(drain_ms), LIVENESS_MAX_STALL_MS="60000")
        for lang in LANGS
    }
    for v in victims.values():
        v.wait_ready(watch)
    gates = {}
    for lang, v in victims.items():
        gates[lang] = tmp_path / f"gate-{lang}"
        os.mkfifo(gates[lang])
        fleet.cli(lang, "outlives-drain", 0, block_pid=v.proc.pid)
        fleet.cli(lang, "gated", 0, gate=str(gates[lang]))
    for v in victims.values():
        heartbeat(watch, v, lambda hb: hb["inflight"] == 2)
    survivors, producers = start_the_rest(fleet)
    first_wave(fleet)

    stopped_at = time.monotonic()
    for v in victims.values():
        v.proc.send_signal(signal.SIGTERM)
    for v in victims.values():
        heartbeat(watch, v, lambda hb: hb["status"] == "draining")
    # Now the gated tasks may finish: within DRAIN_MS, so done by the victims.
    for gate in gates.values():
        try:
            os.close(os.open(gate, os.O_WRONLY | os.O_NONBLOCK))
        except OSError as err:
            pytest.fail(f"no handler waits at {gate}: {err}")
    second_wave(fleet)
    for v in victims.values():
        assert wait_exit(v.proc, drain_ms / 1000 + 5) == 0, v.output()
    assert time.monotonic() - stopped_at >= drain_ms / 1000, "waited DRAIN_MS for the task that outlives it"
    for v in victims.values():
        final = heartbeat(watch, v, lambda hb: hb["status"] == "offline", timeout=5)
        assert final["reason"] == "stopped", final

    fleet.settle()
    fleet.acked_all()
    fleet.stop(*survivors.values(), *producers.values())
    done = fleet.assert_each_task_done_once()
    for lang in LANGS:
        gated = done[f"{QUEUE[lang]}/gated/0"]
        assert (gated["pid"], gated["attempts"]) == (victims[lang].proc.pid, 1), gated
        handed_back = done[f"{QUEUE[lang]}/outlives-drain/0"]
        assert (handed_back["pid"], handed_back["attempts"]) == (survivors[lang].proc.pid, 1), handed_back
