"""paho-mqtt for tests/mqtt_ws.rs, over MQTT over WebSocket
(`ws://host:port/mqtt`, paho's `transport="websockets"`) or plain TCP
(`mqtt://host:port`): the same script on both, so the two transports can
be compared.

Usage: python3 mqtt_ws_driver.py '<json>' with `mode`, `url`, `version`
(4 or 5) and, as the mode needs, `topic`, `qos`, `count`, `username`,
`password`, `ca` (the CA file for `wss://`). Modes:
  sub      subscribes, prints {"event":"subscribed"}, then
           {"event":"done","messages":[[payload,qos],...]} after `count`
  pub      publishes `count` messages `msg-<i>` at `qos`, each awaited
  connect  one connection: {"event":"connack","code":<reason code value>}
  raw      hand-made MQTT bytes over the `websockets` library: a CONNECT
           split across frames with a PINGREQ in the same frame as its
           end, the subprotocol echoed or not, and how the server closes
           on a text frame, on garbage and on an oversize message
Prints JSON lines; exits 1 with a reason on failure.
"""

import asyncio
import json
import os
import sys
import threading
from urllib.parse import urlparse

import paho.mqtt.client as mqtt

cfg = json.loads(sys.argv[1])
TIMEOUT = 30.0


def out(obj):
    print(json.dumps(obj), flush=True)


def fail(why):
    print(f"FAIL: {why}", file=sys.stderr, flush=True)
    os._exit(1)


def client():
    url = urlparse(cfg["url"])
    ws = url.scheme in ("ws", "wss")
    version = mqtt.MQTTv5 if cfg.get("version", 5) == 5 else mqtt.MQTTv311
    c = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"paho-{os.getpid()}-{cfg['mode']}",
        protocol=version,
        transport="websockets" if ws else "tcp",
        reconnect_on_failure=False,
    )
    if ws:
        c.ws_set_options(path=url.path or "/mqtt")
    if url.scheme == "wss":
        c.tls_set(ca_certs=cfg["ca"])
    if cfg.get("username") is not None:
        c.username_pw_set(cfg["username"], cfg.get("password"))
    return c, url.hostname, url.port


def connected():
    """A connected client running its network loop, or exits on refusal."""
    c, host, port = client()
    done = threading.Event()
    result = {}

    def on_connect(_c, _u, _flags, reason_code, _props):
        result["code"] = reason_code.value
        done.set()

    c.on_connect = on_connect
    c.connect(host, port, keepalive=30)
    c.loop_start()
    if not done.wait(TIMEOUT):
        fail("no CONNACK")
    return c, result["code"]


def stop(c):
    c.disconnect()
    c.loop_stop()


def sub():
    c, code = connected()
    if code != 0:
        fail(f"refused: {code}")
    messages = []
    subscribed = threading.Event()
    finished = threading.Event()

    def on_subscribe(_c, _u, _mid, codes, _props):
        if codes[0].value != cfg["qos"]:
            fail(f"granted {codes[0]}")
        subscribed.set()

    def on_message(_c, _u, msg):
        messages.append([msg.payload.decode(), msg.qos])
        if len(messages) == cfg["count"]:
            finished.set()

    c.on_subscribe = on_subscribe
    c.on_message = on_message
    c.subscribe(cfg["topic"], qos=cfg["qos"])
    if not subscribed.wait(TIMEOUT):
        fail("no SUBACK")
    out({"event": "subscribed"})
    if not finished.wait(TIMEOUT):
        fail(f"only {len(messages)} of {cfg['count']} messages")
    stop(c)
    out({"event": "done", "messages": messages})


def pub():
    c, code = connected()
    if code != 0:
        fail(f"refused: {code}")
    for i in range(cfg["count"]):
        info = c.publish(cfg["topic"], f"msg-{i}", qos=cfg["qos"])
        info.wait_for_publish(TIMEOUT)
        if not info.is_published():
            fail(f"msg-{i} not acknowledged")
    stop(c)
    out({"event": "done", "published": cfg["count"]})


def connect_once():
    c, code = connected()
    stop(c)
    out({"event": "connack", "code": code})


def mqtt_connect(client_id):
    """A 3.1.1 CONNECT, clean session, keep-alive 30 s."""
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x1e" + len(cid).to_bytes(2, "big") + cid
    return bytes([0x10, len(body)]) + body


async def closed(ws):
    """The server's close frame as [code, reason]; None if it sent none."""
    import websockets

    try:
        while True:
            await asyncio.wait_for(ws.recv(), TIMEOUT)
    except websockets.ConnectionClosed as e:
        return [e.rcvd.code, e.rcvd.reason] if e.rcvd else None


async def raw_checks():
    import websockets

    url = cfg["url"]
    result = {}
    async with websockets.connect(url, subprotocols=["mqtt"]) as ws:
        result["subprotocol"] = ws.subprotocol
        connect = mqtt_connect("raw-frames")
        await ws.send(connect[:3])
        await ws.send(connect[3:] + b"\xc0\x00")
        got = b""
        while len(got) < 6:
            got += await asyncio.wait_for(ws.recv(), TIMEOUT)
        result["replies"] = got.hex()
        await ws.send("text after CONNECT")
        result["text_after_connect"] = await closed(ws)
    async with websockets.connect(url, subprotocols=["mqtt"]) as ws:
        await ws.send("CONNECT, in a text frame")
        result["text"] = await closed(ws)
    async with websockets.connect(url, subprotocols=["mqtt"]) as ws:
        await ws.send(b"\xff" * 16)
        result["garbage"] = await closed(ws)
    async with websockets.connect(url, subprotocols=["mqtt"], max_size=None) as ws:
        try:
            await ws.send(b"\x10" + b"\x00" * cfg["oversize"])
        except websockets.ConnectionClosed:
            pass
        result["oversize"] = await closed(ws)
    async with websockets.connect(url) as ws:
        result["no_subprotocol"] = ws.subprotocol
        await ws.send(mqtt_connect("raw-plain"))
        result["no_subprotocol_connack"] = (await asyncio.wait_for(ws.recv(), TIMEOUT)).hex()
    out(result)


def raw():
    asyncio.run(raw_checks())


{"sub": sub, "pub": pub, "connect": connect_once, "raw": raw}.get(
    cfg["mode"], lambda: fail(f"unknown mode {cfg['mode']}")
)()
