"""Drives the legacy broker_client.py (unchanged) and raw `websockets`
through the bridge for tests/bridge.rs, with paho-mqtt on the MQTT side.

Usage: python3 py_driver.py <scenario> <ws-url> <mqtt-host> <mqtt-port> <package>
Prints one JSON line with what it saw; exits 1 with a reason on failure.
"""

import asyncio
import json
import sys
import threading
import time
import urllib.request

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
import websockets

from broker_client import BrokerClient


def fail(why):
    print(f"FAIL: {why}", file=sys.stderr)
    sys.exit(1)


async def until(cond, seconds, what, tick=None, every=0.05):
    end = time.monotonic() + seconds
    next_tick = 0.0
    while not cond():
        if time.monotonic() > end:
            fail(f"timed out waiting for {what}")
        if tick and time.monotonic() >= next_tick:
            res = tick()
            if asyncio.iscoroutine(res):
                await res
            next_tick = time.monotonic() + every
        await asyncio.sleep(0.005)


def mqtt_client(host, port, topic):
    got = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.on_message = lambda _c, _u, m: got.append(m)
    c.on_connect = lambda cl, _u, _f, _rc, _p: cl.subscribe(topic, qos=0)
    c.connect(host, port)
    c.loop_start()
    return c, got


async def mqtt_side(url, host, port, pkg):
    prefix = f"axion/{pkg}/event/"
    paho, got = mqtt_client(host, port, prefix + "#")
    client = BrokerClient(url=url)
    await client.connect()
    seen = []

    async def handler(event):
        seen.append(event)

    # The legacy client routes by concrete type, so the wildcard
    # subscriptions get their concrete handlers in its public dict too.
    await client.subscribe("sensor.+", handler)
    client.event_handlers["sensor.temp"] = handler
    await client.subscribe("deep.#", handler)
    client.event_handlers["deep.a.b.c"] = handler

    # MQTT -> WS: a plain JSON payload is wrapped.
    await until(lambda: any(e["type"] == "sensor.temp" for e in seen), 5, "a wrapped device event",
                lambda: paho.publish(prefix + "sensor/temp", json.dumps({"celsius": 21})))
    e = next(e for e in seen if e["type"] == "sensor.temp")
    if e["payload"] != {"celsius": 21} or e["source"] != "mqtt" or not e["timestamp"].endswith("Z"):
        fail(f"bad wrapped event {e}")
    # A non-JSON payload travels as a string; MQTT 5 properties as fields.
    props = Properties(PacketTypes.PUBLISH)
    props.CorrelationData = b"corr-9"
    props.ResponseTopic = prefix + "reply/py"
    await until(lambda: any(x.get("payload") == "hello" for x in seen), 5, "a string payload",
                lambda: paho.publish(prefix + "sensor/temp", "hello", properties=props))
    e = next(x for x in seen if x.get("payload") == "hello")
    if e.get("correlationId") != "corr-9" or e.get("replyTo") != "reply.py":
        fail(f"MQTT 5 properties not carried: {e}")
    await until(lambda: any(x["type"] == "deep.a.b.c" for x in seen), 5, "a '#' delivery",
                lambda: paho.publish(prefix + "deep/a/b/c", "1"))

    # WS -> MQTT: envelope, properties, and per-publisher order.
    n = 300
    await until(lambda: any(m.topic == prefix + "fs/change" for m in got), 5, "the bridge's publish",
                lambda: client.publish("fs.change", {"probe": True}, correlationId="c1", replyTo="reply.py"))
    m = next(m for m in got if m.topic == prefix + "fs/change")
    body = json.loads(m.payload)
    if body["source"] != client.client_id or body["type"] != "fs.change" or body["correlationId"] != "c1":
        fail(f"bad envelope on MQTT {body}")
    if getattr(m.properties, "CorrelationData", None) != b"c1" or getattr(m.properties, "ResponseTopic", None) != prefix + "reply/py":
        fail(f"MQTT 5 properties missing: {m.properties}")
    for i in range(n):
        await client.publish("order.check", {"seq": i})
    await until(lambda: sum(1 for m in got if m.topic == prefix + "order/check") >= n, 10, f"{n} ordered events")
    order = [json.loads(m.payload)["payload"]["seq"] for m in got if m.topic == prefix + "order/check"]
    if order != list(range(n)):
        fail(f"order broken: {order[:20]}")

    # Unsubscribe. A sentinel arriving proves the bridge has taken the
    # unsubscribe (sent before the sentinel's subscribe); an event published
    # after that, and before a second sentinel that arrives, must not come.
    # (Publishing both from the start raced: an event routed just before
    # the unsubscribe was rightly delivered.)
    await client.unsubscribe("sensor.+")
    # The handler stays (recording apart), so that a frame the bridge
    # still sent would show rather than be dropped by the client.
    after = []

    async def record_after(event):
        after.append(event)

    client.event_handlers["sensor.temp"] = record_after
    await client.subscribe("sentinel.x", handler)

    def sentinel(payload):
        return any(x["type"] == "sentinel.x" and x.get("payload") == payload for x in seen)

    await until(lambda: sentinel("s"), 5, "the sentinel", lambda: paho.publish(prefix + "sentinel/x", "s"))
    after.clear()  # routed before the bridge took the unsubscribe
    paho.publish(prefix + "sensor/temp", "late")
    paho.publish(prefix + "sentinel/x", "second")
    await until(lambda: sentinel("second"), 5, "the second sentinel")
    if after:
        fail("event delivered after unsubscribe")
    paho.loop_stop()
    print(json.dumps({"ok": True, "ordered": len(order)}))


BIG = "x" * (2 * 1024 * 1024)
CORPUS = [
    ("{x", "invalid json"),
    ("", "invalid json"),
    ("[" * 5000 + "]" * 5000, "invalid json"),
    ("[]", "JSON object"),
    ('"text"', "JSON object"),
    ("null", "JSON object"),
    ("{}", '"action"'),
    ('{"action": 7}', '"action"'),
    ('{"action": "fly"}', "unknown action"),
    ('{"action": "subscribe"}', '"topic"'),
    ('{"action": "subscribe", "topic": 5}', '"topic"'),
    ('{"action": "subscribe", "topic": "a/b"}', '"topic"'),
    ('{"action": "subscribe", "topic": "a.b+"}', '"topic"'),
    ('{"action": "subscribe", "topic": "a.#.b"}', '"topic"'),
    ('{"action": "subscribe", "topic": "a\\u0000b"}', '"topic"'),
    ('{"action": "subscribe", "topic": "a..b"}', '"topic"'),
    ('{"action": "subscribe", "topic": "' + "a." * 600 + 'b"}', '"topic"'),
    ('{"action": "unsubscribe", "topic": ["x"]}', '"topic"'),
    ('{"action": "publish"}', '"message"'),
    ('{"action": "publish", "message": "x"}', '"message"'),
    ('{"action": "publish", "message": {}}', "message.type"),
    ('{"action": "publish", "message": {"type": 7}}', "message.type"),
    ('{"action": "publish", "message": {"type": ""}}', "message.type"),
    ('{"action": "publish", "message": {"type": "a.+"}}', "message.type"),
    ('{"action": "publish", "message": {"type": "a#"}}', "message.type"),
    ('{"action": "publish", "message": {"type": "a/b"}}', "message.type"),
    ('{"action": "publish", "message": {"type": "a\\u0000"}}', "message.type"),
    ('{"action": "enqueue"}', '"queue"'),
    ('{"action": "enqueue", "queue": "a/b", "task": 1}', '"queue"'),
    ('{"action": "pull", "queue": ""}', '"queue"'),
    ('{"action": "ready", "queue": "q#"}', '"queue"'),
    ('{"action": "ack"}', '"taskId"'),
    ('{"action": "ack", "taskId": 3}', '"taskId"'),
    ('{"action": "ack", "taskId": "never-pulled"}', "not held"),
    ('{"action": "fail", "taskId": "t", "reason": [1]}', '"reason"'),
    (BIG, "frame too large"),
    (b"\x00\xffbinary", "binary"),
]


async def bad_input(url, _host, _port, _pkg):
    bystander = await websockets.connect(url)
    await bystander.send(json.dumps({"action": "subscribe", "topic": "ok.test"}))
    ws = await websockets.connect(url, max_size=None)
    for frame, expected in CORPUS:
        await ws.send(frame)
        reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
        if expected not in reply.get("error", ""):
            fail(f"frame {frame[:60]!r}: expected an error with {expected!r}, got {reply}")
    # A heartbeat is accepted silently; the same connection still works.
    await ws.send(json.dumps({"action": "heartbeat", "anything": [1, 2]}))
    await ws.send(json.dumps({"action": "subscribe", "topic": "ok.test"}))
    own = []
    other = []

    async def drain(sock, into):
        while True:
            m = json.loads(await sock.recv())
            if "event" in m:
                into.append(m["event"])
            elif "error" in m:
                fail(f"unexpected error after the corpus: {m}")
    tasks = [asyncio.create_task(drain(ws, own)), asyncio.create_task(drain(bystander, other))]
    msg = json.dumps({"action": "publish", "message": {"type": "ok.test", "payload": "still here"}})
    await until(lambda: own and other, 5, "events after the corpus", lambda: ws.send(msg))
    for t in tasks:
        t.cancel()
    print(json.dumps({"ok": True, "frames": len(CORPUS), "after": own[0]}))


def stats(url):
    with urllib.request.urlopen("http" + url[2:] + "/stats", timeout=5) as r:
        return json.load(r)


def counts(url):
    s = stats(url)
    return s["events_published"], s["events_kept_local"]


async def mqtt_subscriber(host, port, topic, **connect):
    """A paho client told (SUBACK) that it holds `topic`, and what it gets."""
    got = []
    subscribed = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, **connect.pop("client", {}))
    c.on_message = lambda _c, _u, m: got.append(json.loads(m.payload))
    c.on_subscribe = lambda *_: subscribed.set()
    c.connect(host, port, **connect)
    c.loop_start()
    c.subscribe(topic, qos=0)
    await until(subscribed.is_set, 5, f"the SUBACK of {topic}")
    return c, got


async def local_only(url, host, port, pkg):
    """Events only WebSocket clients read, then MQTT subscribers of each kind."""
    prefix = f"axion/{pkg}/event/"
    sub = BrokerClient(url=url)
    await sub.connect()
    pub = BrokerClient(url=url)
    await pub.connect()
    seen = []

    async def handler(event):
        seen.append(event)

    await sub.subscribe("local.x", handler)
    await until(lambda: seen, 5, "the WebSocket subscription", lambda: pub.publish("local.x", {"probe": True}))
    n = 50
    published, kept = counts(url)
    for i in range(n):
        await pub.publish("local.x", {"seq": i})
    await until(lambda: sum(1 for e in seen if "seq" in e["payload"]) == n, 5, f"{n} events")
    alone = [a - b for a, b in zip(counts(url), (published, kept))]

    # An MQTT client that has its SUBACK gets the very next event, whatever
    # its filter: published once, with no retry.
    heard = []
    for name, topic in [
        ("exact", prefix + "local/x"),
        ("wildcard", prefix + "#"),
        ("shared", "$share/g/" + prefix + "local/+"),
    ]:
        c, got = await mqtt_subscriber(host, port, topic)
        await pub.publish("local.x", {"for": name})
        await until(lambda: any(m["payload"].get("for") == name for m in got), 5,
                    f"the event for the {name} subscriber")
        heard.append(name)
        c.disconnect()
        c.loop_stop()

    # Once they are gone, events stay with the WebSocket clients again
    # (only `axion serve` can tell; `axion bridge` publishes every event).
    again = alone[1] > 0
    if again:
        _, base = counts(url)
        await until(lambda: counts(url)[1] > base, 5, "events kept local again",
                    lambda: pub.publish("local.x", {"again": True}), every=0.2)

    # A kept session away still reads: events are published for it.
    c, _ = await mqtt_subscriber(host, port, prefix + "local/x", clean_start=False,
                                 properties=session_expiry(600), client={"client_id": f"kept-{pkg}"})
    c.disconnect()
    c.loop_stop()
    published, _ = counts(url)
    seen.clear()
    await pub.publish("local.x", {"away": True})
    await until(lambda: seen, 5, "the event published while the kept session is away")
    away = counts(url)[0] - published
    print(json.dumps({"ok": True, "alone": {"published": alone[0], "kept": alone[1]}, "heard": heard,
                      "again": again, "published_for_away": away}))


async def resubscribe(url, host, port, pkg):
    """A WebSocket subscription that outlives the bridge's MQTT session:
    an MQTT event reaches it, the test ends the bridge's session (after a
    "ready" line, until a line on stdin), and an MQTT event reaches it again."""
    prefix = f"axion/{pkg}/event/"
    paho, _ = mqtt_client(host, port, prefix + "nothing/here")
    client = BrokerClient(url=url)
    await client.connect()
    seen = []

    async def handler(event):
        seen.append(event)

    await client.subscribe("re.x", handler)
    await until(lambda: seen, 5, "an MQTT event before", lambda: paho.publish(prefix + "re/x", "before"))
    print(json.dumps({"ready": True}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await until(lambda: any(e["payload"] == "after" for e in seen), 10,
                "an MQTT event after the bridge connected again",
                lambda: paho.publish(prefix + "re/x", "after"), every=0.2)
    paho.loop_stop()
    print(json.dumps({"ok": True}))


async def first_pulls(url, _host, _port, _pkg):
    """A pull on a queue nobody pulled from before, over and over: the
    bridge subscribes to the queue's tasks and says ready in one go, and the
    waiting task must come at once (not after the owner's ack wait)."""
    producer = await websockets.connect(url)
    worker = await websockets.connect(url)
    rounds = 20
    for i in range(rounds):
        queue = f"fresh{i}"
        await producer.send(json.dumps({"action": "enqueue", "queue": queue, "task": {"i": i}}))
        reply = json.loads(await asyncio.wait_for(producer.recv(), 5))
        if "enqueued" not in reply:
            fail(f"round {i}: enqueue not confirmed: {reply}")
        await worker.send(json.dumps({"action": "pull", "queue": queue}))
        try:
            got = json.loads(await asyncio.wait_for(worker.recv(), 5))
        except asyncio.TimeoutError:
            fail(f"round {i}: no task within 5 s of the first pull on {queue}")
        if got.get("task", {}).get("payload") != {"i": i}:
            fail(f"round {i}: expected the task, got {got}")
        await worker.send(json.dumps({"action": "ack", "taskId": got["task"]["id"]}))
    print(json.dumps({"ok": True, "rounds": rounds}))


def session_expiry(secs):
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = secs
    return props


SCENARIOS = {
    "mqtt": mqtt_side,
    "bad": bad_input,
    "local": local_only,
    "resubscribe": resubscribe,
    "first_pulls": first_pulls,
}

if __name__ == "__main__":
    scenario, url, host, port, pkg = sys.argv[1:6]
    if scenario not in SCENARIOS:
        fail(f"unknown scenario {scenario}")
    asyncio.run(SCENARIOS[scenario](url, host, int(port), pkg))
