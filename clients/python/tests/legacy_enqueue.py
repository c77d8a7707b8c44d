"""Enqueues tasks with the legacy Python client (`tests/clients/broker_client.py`,
unchanged) through the WebSocket bridge, and waits until the bridge has
confirmed each one (`{"enqueued": {"id", "queue"}}`, sent once the queue
owner has the task on disk). The client drops frames it does not know, so
a subclass looks at each frame first. Prints the confirmations as one JSON
line.

Usage: python3 legacy_enqueue.py <ws-url> '[{"queue": …, "payload": …}, …]'
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from broker_client import BrokerClient


class Confirming(BrokerClient):
    def __init__(self, url: str, expected: int) -> None:
        super().__init__(url)
        self.expected = expected
        self.confirmed: list[Any] = []
        self.error: Any = None
        self.finished = asyncio.Event()

    async def _listen(self) -> None:
        async for msg in self.ws:
            frame = json.loads(msg)
            if "error" in frame:
                self.error = frame
            elif "enqueued" in frame:
                self.confirmed.append(frame["enqueued"])
            if self.error is not None or len(self.confirmed) == self.expected:
                break
        self.finished.set()


async def main(url: str, tasks: list[dict[str, Any]]) -> None:
    client = Confirming(url, len(tasks))
    await client.connect()
    for task in tasks:
        await client.enqueue(task["queue"], task["payload"])
    await client.finished.wait()
    if client.error is not None or len(client.confirmed) != len(tasks):
        sys.exit(f"not confirmed: {client.error or 'the bridge closed the connection'}")
    print(json.dumps(client.confirmed))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
