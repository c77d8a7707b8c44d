"""A fake embedding service on axion_client: the legacy fleet's embedding
worker, moved to the package (the Rust runtime's example, in Python).

It takes tasks from the `embedding.generate` queue and answers
`embedding.request` events that carry `replyTo`. The "model" is a hash, so
it needs no download; items are embedded one at a time and each one
reports progress, as a real batch job should. The payload can ask for
misbehaviour, so the fail-fast guarantees can be shown on a real process:

- `{"items": ["a", "b"]}` → `{"embeddings": [[…8 floats…], …], "model": "fake-hash-8"}`
  (plus `"attempts"` and `"pid"` for queue tasks, so one sees redeliveries
  and which instance did the work)
- `"delay_ms": N` → takes N ms, spread over the items (also `EMBED_DELAY_MS`)
- `"fail": "why"` → the attempt fails with that reason
- `"hang": true` → blocks for good in a system call (the GIL released)
- `"spin_in_c": true` → never returns from C code that holds the GIL
  (a regular expression with catastrophic backtracking)

Run: `AXION_MQTT_URL=mqtt://127.0.0.1:1883 python3 clients/python/examples/embedding_worker.py`
"""

from __future__ import annotations

import json
import logging
import os
import re
import select
import sys
import time
from typing import Any, Callable

from axion_client import Event, Service, Task

DIMENSIONS = 8


def generate(task: Task) -> dict[str, Any]:
    result = embed(task.payload, task.progress)
    result["attempts"] = task.attempts
    result["pid"] = os.getpid()
    return result


def request(event: Event) -> dict[str, Any]:
    return embed(event.payload, event.progress)


def embed(payload: Any, progress: Callable[[], None]) -> dict[str, Any]:
    if not isinstance(payload, dict) or not isinstance(payload.get("items"), list):
        raise ValueError("payload.items must be an array of strings")
    if isinstance(payload.get("fail"), str):
        raise RuntimeError(payload["fail"])
    if payload.get("hang") is True:
        never, _ = os.pipe()
        select.select([never], [], [])
    if payload.get("spin_in_c") is True:
        re.match(r"(a+)+$", "a" * 64 + "!")
    items = payload["items"]
    delay_ms = payload.get("delay_ms", int(os.environ.get("EMBED_DELAY_MS", "0")))
    embeddings = []
    for item in items:
        if delay_ms:
            time.sleep(delay_ms / 1000 / len(items))
        embeddings.append(fake_embedding(json.dumps(item)))
        # A batch may take longer than LIVENESS_MAX_STALL_MS; each item done
        # tells the watchdog it is moving, not hung.
        progress()
    return {"embeddings": embeddings, "model": f"fake-hash-{DIMENSIONS}"}


def fake_embedding(text: str) -> list[float]:
    """A deterministic unit vector from the text's FNV-1a hash."""
    h = 0xCBF29CE484222325
    v = []
    for i in range(DIMENSIONS):
        for b in text.encode() + bytes([i]):
            h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
        v.append((h % 2000) / 1000 - 1.0)
    norm = max(sum(x * x for x in v) ** 0.5, sys.float_info.epsilon)
    return [x / norm for x in v]


def main() -> int:
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO"),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return Service("embedding").queue("embedding.generate", generate).event("embedding.request", request).run()


if __name__ == "__main__":
    sys.exit(main())
