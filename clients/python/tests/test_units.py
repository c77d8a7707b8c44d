"""The pure parts, checked alone: URLs, names, replies and envelopes."""

from __future__ import annotations

import json

import pytest

from axion_client._config import ConfigError, Limits, MqttUrl, validate_event_type, validate_level
from axion_client._message import ReplyTarget, parse_event


def test_broker_urls_parse_as_the_rust_runtime_parses_them():
    u = MqttUrl.parse("mqtt://bob:s3cr:et@broker.local:1884")
    assert (u.host, u.port, u.user, u.password) == ("broker.local", 1884, "bob", "s3cr:et")
    assert MqttUrl.parse("tcp://h").port == 1883
    assert MqttUrl.parse("mqtt://[::1]:1999").host == "::1"
    assert MqttUrl.parse("unix://u:p@/run/axion/mqtt.sock").unix == "/run/axion/mqtt.sock"
    assert "p" not in str(MqttUrl.parse("mqtt://u:p@h:1")), "no password in logs"
    for bad in ["http://h", "mqtt://h:x", "mqtt://h:70000", "mqtt://:1", "unix://relative"]:
        with pytest.raises(ConfigError):
            MqttUrl.parse(bad)


def test_limits_come_from_the_environment(monkeypatch):
    assert Limits() == Limits(8, 256, 10_000, 30_000, 5_000, 30_000)
    monkeypatch.setenv("MAX_INFLIGHT", "3")
    monkeypatch.setenv("LIVENESS_MAX_STALL_MS", "1500")
    assert (Limits.from_env().max_inflight, Limits.from_env().liveness_max_stall_ms) == (3, 1500)
    monkeypatch.setenv("DRAIN_MS", "soon")
    with pytest.raises(ConfigError, match="DRAIN_MS"):
        Limits.from_env()
    with pytest.raises(ConfigError):
        Limits(max_inflight=0).validate()


def test_names_are_checked():
    validate_level("queue", "embedding.generate")
    for bad in ["", "a/b", "a+", "#", "a\0"]:
        with pytest.raises(ConfigError):
            validate_level("package", bad)
    for good in ["fs.change", "fs.+", "fs.#", "a"]:
        validate_event_type(good)
    for bad in ["", "a..b", "a/b", "fs.#.x", "a+.b", "."]:
        with pytest.raises(ConfigError):
            validate_event_type(bad)


def test_reply_to_is_an_event_type_or_a_topic():
    t = ReplyTarget.resolve("p", "embedding.result", None, None)
    assert (t.topic, t.event_type) == ("axion/p/event/embedding/result", "embedding.result")
    t = ReplyTarget.resolve("p", "axion/p/event/a/b", "c1", None)
    assert (t.topic, t.event_type) == ("axion/p/event/a/b", "a.b")
    body = json.loads(t.envelope("svc", {"x": 1}))
    assert (body["payload"], body["source"], body["correlationId"]) == ({"x": 1}, "svc", "c1")
    assert body["timestamp"].endswith("Z")
    assert ReplyTarget.resolve("p", "a.#", None, None) is None
    assert ReplyTarget.resolve("p", "", None, None) is None


def test_envelopes_and_bare_payloads_both_parse():
    body = b'{"type":"fs.change","payload":{"path":"/a"},"replyTo":"r.t","correlationId":"c1"}'
    e = parse_event("p", "axion/p/event/fs/change", body, None, None, lambda: None)
    assert (e.type, e.payload, e.reply_to, e.correlation_id) == ("fs.change", {"path": "/a"}, "r.t", "c1")
    e = parse_event("p", "axion/p/event/temp", b"21.5", "x/y", b"k", lambda: None)
    assert (e.type, e.payload, e.reply_to, e.correlation_id) == ("temp", 21.5, "x/y", "k")
    assert parse_event("p", "axion/p/event/t", b"not json", None, None, lambda: None).payload == "not json"
