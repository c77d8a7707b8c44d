"""The benchmark's legacy Python worker: the legacy Python client
(`tests/clients/broker_client.py`) through the bridge, in the legacy
service template's style (on each task: ack, then pull again), holding
`credits` pulls. Prints `ready` once connected.

Usage: python3 legacy_worker.py <ws-url> <queue> <credits>
"""

import asyncio
import sys

from broker_client import BrokerClient


async def main(url: str, queue: str, credits: int) -> None:
    client = BrokerClient(url)
    await client.connect()

    async def on_task(task: dict) -> None:
        await client.ack(task["id"])
        await client.pull(queue)

    client.on_task(on_task)
    for _ in range(credits):
        await client.pull(queue)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
