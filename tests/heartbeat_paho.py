"""paho-mqtt clients for tests/heartbeat.rs, written the legacy way
(VERSION2 callback API, five-argument on_connect, retained QoS 1 heartbeats).

  heartbeat_paho.py sub HOST PORT TOPIC_FILTER N
      prints the first N heartbeat records received (one JSON object per
      line, with the topic and retain flag added) and exits 0; exits 1 after
      10 s without them.
  heartbeat_paho.py pub HOST PORT PACKAGE SERVICE INSTANCE_PORT
      runs start_heartbeat() as the legacy standard describes (interval from
      HEARTBEAT_INTERVAL_SECS) until killed; prints "ready" once the first
      record is acknowledged.
"""
import json
import os
import socket
import sys
import threading
import time

import paho.mqtt.client as mqtt


def make_paho_client():
    return mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)


def sub(host, port, topic, n):
    n = int(n)
    got = []
    done = threading.Event()

    def on_connect(client, userdata, connect_flags, reason_code, properties):
        if reason_code == 0:
            client.subscribe(topic, qos=1)

    def on_message(client, userdata, msg):
        if not msg.payload:
            return
        record = json.loads(msg.payload)
        record["_topic"] = msg.topic
        record["_retain"] = bool(msg.retain)
        got.append(record)
        if len(got) >= n:
            done.set()

    client = make_paho_client()
    client.on_connect = on_connect
    client.on_message = on_message
    client.connect(host, int(port), keepalive=30)
    client.loop_start()
    ok = done.wait(10)
    client.loop_stop()
    for record in got[:n]:
        print(json.dumps(record), flush=True)
    return 0 if ok else 1


def start_heartbeat(client, service_type, port, package, extras=None):
    """The legacy standard: a daemon thread publishing a retained record every interval."""
    interval = float(os.environ.get("HEARTBEAT_INTERVAL_SECS", "15"))
    hostname = socket.gethostname()
    topic = f"axion/{package}/heartbeat/{service_type}/{hostname}:{port}"
    started = time.time()
    stop_event = threading.Event()

    def beat():
        while not stop_event.is_set():
            record = {
                "service": service_type,
                "instance_id": f"{hostname}:{port}",
                "hostname": hostname,
                "port": port,
                "package": package,
                "uptime_seconds": int(time.time() - started),
                "pid": os.getpid(),
                "timestamp": time.time(),
            }
            record.update(extras or {})
            info = client.publish(topic, json.dumps(record), qos=1, retain=True)
            info.wait_for_publish(5)
            if not getattr(beat, "announced", False):
                beat.announced = True
                print("ready", flush=True)
            stop_event.wait(interval)

    threading.Thread(target=beat, daemon=True).start()
    return stop_event


def pub(host, port, package, service, instance_port):
    client = make_paho_client()
    client.connect(host, int(port), keepalive=30)
    client.loop_start()
    start_heartbeat(client, service, int(instance_port), package, {"lang": "python"})
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    sys.exit(sub(*rest) if mode == "sub" else pub(*rest))
