"""A service that enqueues work for others: on a `jobs.submit` request it
enqueues the request's payload on the queue it names and answers with the
id the queue owner confirmed (or the owner's refusal as `{"error"}`). Its
handler is a coroutine, which runs `enqueue` (blocking) in a thread."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from axion_client import Event, Service

service = Service("producer")


async def submit(event: Event) -> dict[str, Any]:
    queue = event.payload["queue"]
    task_id = await asyncio.to_thread(
        service.enqueue, queue, event.payload["task"], reply_to=event.payload.get("reply_to")
    )
    service.publish("jobs.submitted", {"id": task_id, "queue": queue})
    return {"id": task_id}


if __name__ == "__main__":
    sys.exit(service.event("jobs.submit", submit).run())
