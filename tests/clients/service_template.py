# The legacy Python service template, as it stands after its two
# patches: `run_service` (wraps `start_service` and waits forever) and
# the fail-fast heartbeat loop that publishes `heartbeat` events
# ({"pid", "name", "ts"}) over the same BrokerClient connection. The parts the
# legacy patches show only as diff context are reconstructed around them.
#
# Changed for the tests, and only this:
# - the import line: BrokerClient comes from tests/clients/broker_client.py;
# - `BrokerClient()` takes its URL from BROKER_URL when set (the client's own
#   default, ws://localhost:7000, otherwise);
# - the `__main__` entry at the end (runs `run_service(id=<name>)`).

import asyncio
import os
import time
from broker_client import BrokerClient  # tests: was shared.py.broker_client

# Notes:
# - Heartbeats publish on the same connection; if that fails repeatedly we exit(1).


async def start_service(
    id,
    queues=None,
    topics=None,
    handle_event=lambda event, client: None,
    handle_task=lambda task, client: None,
    enable_heartbeat: bool = True,
):
    # tests: BROKER_URL added (the smallest change); was `BrokerClient()`.
    client = BrokerClient(os.environ.get("BROKER_URL", "ws://localhost:7000"))
    # env-tunable heartbeat behavior
    hb_interval = float(os.environ.get("HEARTBEAT_INTERVAL", "3"))
    hb_max_fail = int(os.environ.get("HEARTBEAT_MAX_FAILURES", "3"))

    await client.connect()
    print(f"[{id}] connected to broker")

    queues = queues or []
    topics = topics or []

    # Subscribe to topics
    for topic in topics:

        async def event_handler(event, topic=topic):
            print(f"[{id}] received event: {event['type']}")
            try:
                await handle_event(event, client)
            except Exception as e:
                print(f"[{id}] error handling event {event['type']}: {e}")

        await client.subscribe(topic, event_handler)

    # --- Heartbeat loop with fail-fast on repeated failure ---
    async def heartbeat_loop():
        if not enable_heartbeat:
            return

        failures = 0
        while True:
            try:
                # keep payload tiny; include monotonic timestamp so the reaper can detect stalls
                await client.publish(
                    "heartbeat",
                    {"pid": os.getpid(), "name": id, "ts": time.time()},
                )
                failures = 0
            except Exception as e:
                failures += 1
                print(f"[{id}] heartbeat failed ({failures}/{hb_max_fail}): {e}")
                # Exit after N consecutive failures so PM2/your launcher can restart us.
                if failures >= hb_max_fail:
                    print(f"[{id}] exiting: broker/heartbeat unavailable")
                    os._exit(1)
            await asyncio.sleep(hb_interval)

    # Optional: periodic ping to detect "connected but broken" paths
    async def ping_loop():
        # If your BrokerClient has ping/health/ready, use that; fall back to a tiny publish.
        # Any exception counts toward failure in heartbeat_loop already, so this is optional.
        while True:
            try:
                await client.ready("__ping__")  # no-op queue readiness as liveness
            except Exception:
                # Let heartbeat_loop handle the failure counting/exit; just sleep here.
                await asyncio.sleep(hb_interval)
                continue
            await asyncio.sleep(max(1.0, hb_interval))

    # Receive and handle tasks
    async def task_handler(task):
        print(f"[{id}] received task from {task['queue']}")
        await client.ack(task["id"])
        try:
            await handle_task(task, client)
        except Exception as e:
            print(f"[{id}] task failed: {e}")
        await asyncio.sleep(0.1)
        await client.ready(task["queue"])

    if queues:
        client.on_task(task_handler)
        for queue in queues:
            await client.ready(queue)

    # Kick off background monitors
    asyncio.create_task(heartbeat_loop())
    asyncio.create_task(ping_loop())

    return client


async def run_service(
    id,
    queues=None,
    topics=None,
    handle_event=lambda event, client: None,
    handle_task=lambda task, client: None,
    enable_heartbeat: bool = True,
):
    """Convenience wrapper that starts the service and waits forever."""
    await start_service(
        id=id,
        queues=queues,
        topics=topics,
        handle_event=handle_event,
        handle_task=handle_task,
        enable_heartbeat=enable_heartbeat,
    )
    await asyncio.Event().wait()


# tests: an entry point, as the legacy services have one
# (`python3 service_template.py <name>`, with BROKER_URL and HEARTBEAT_INTERVAL
# in the environment).
if __name__ == "__main__":
    import sys

    asyncio.run(run_service(id=sys.argv[1] if len(sys.argv) > 1 else "example"))
