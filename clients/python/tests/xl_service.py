"""The Python side of the cross-language test (`test_cross_language.py`);
`clients/node/test-support/xl-service.js` is the Node side, and behaves
the same.

`XL_ROLE=worker`: service `xl-py`, serving queue `xl.py`. A task's payload
is `{"key", "sleep_ms"?, "block_pid"?, "gate"?}`:

- `block_pid` equal to this process's pid: the handler never returns (it
  stands for work cut short by `kill -9` or handed back by the drain);
- `gate`: the path of a FIFO; the handler opens it for reading, which
  blocks until the test opens it for writing;
- `sleep_ms`: then it takes that long.

Once done, the handler appends `{"key", "id", "attempts", "pid", "lang"}`
as one JSON line to `$XL_DONE_DIR/python-<pid>.jsonl` (what the test
counts), publishes it as event `xl.done` (what the test awaits) and returns
it, which acks the task.

`XL_ROLE=producer`: service `xl-py-producer`. Event `xl.python.ping` is
answered with `{}` (its answer shows the service is subscribed);
`xl.python.produce`
`{"queue", "tasks": [{"id", "payload"}]}` enqueues each task through
`Service.enqueue`, one after the other, and answers `{"ids": [...]}` with
the ids the queue owner confirmed.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from axion_client import Event, Service, Task

ROLE = os.environ["XL_ROLE"]
service = Service("xl-py" if ROLE == "worker" else "xl-py-producer")


def work(task: Task) -> dict[str, Any]:
    payload = task.payload
    if payload.get("block_pid") == os.getpid():
        threading.Event().wait()
    if "gate" in payload:
        with open(payload["gate"], "rb") as gate:
            gate.read()
    if payload.get("sleep_ms"):
        time.sleep(payload["sleep_ms"] / 1000)
    done = {"key": payload["key"], "id": task.id, "attempts": task.attempts, "pid": os.getpid(), "lang": "python"}
    with open(Path(os.environ["XL_DONE_DIR"]) / f"python-{os.getpid()}.jsonl", "a") as f:
        f.write(json.dumps(done) + "\n")
    service.publish("xl.done", done)
    return done


def produce(event: Event) -> dict[str, Any]:
    queue = event.payload["queue"]
    return {"ids": [service.enqueue(queue, t["payload"], id=t["id"]) for t in event.payload["tasks"]]}


if __name__ == "__main__":
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if ROLE == "worker":
        service.queue("xl.py", work)
    else:
        service.event("xl.python.ping", lambda event: {}).event("xl.python.produce", produce)
    sys.exit(service.run())
