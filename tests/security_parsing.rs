//! Every packet a client sends is parsed to its exact length: bytes left
//! over after the last field, or a field (or MQTT 5 property) that runs
//! past the end of the packet or of its property list, close the
//! connection and register nothing. Raw sockets against a real `axion
//! serve`; each malformed case has a well-formed twin that still works, so
//! every check can fail. A packet identifier of 0 where MQTT requires one
//! is refused the same way.

mod common;

use std::time::Duration;

use common::mqtt::{Msg, V4, V5};
use common::raw::{mqtt_str, next_packet, raw_connect, raw_subscribe, varint};
use common::Serve;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc::UnboundedReceiver;

/// A packet of type-and-flags `byte1` around `body`.
fn packet(byte1: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![byte1];
    varint(body.len(), &mut p);
    p.extend_from_slice(body);
    p
}

/// A will in a hand-made CONNECT; `topic_len` is what the packet declares.
struct Will<'a> {
    topic_len: u16,
    topic: &'a [u8],
    payload: &'a [u8],
}

impl<'a> Will<'a> {
    fn new(topic: &'a str, payload: &'a [u8]) -> Self {
        Will {
            topic_len: topic.len() as u16,
            topic: topic.as_bytes(),
            payload,
        }
    }
}

/// A CONNECT of a session that outlives the connection (3.1.1: clean
/// session off; 5: clean start off and Session Expiry 60 s given by
/// `properties`), with an optional retained QoS 1 will, and `extra` inside
/// the remaining length after the last field.
fn connect(level: u8, id: &str, properties: &[u8], will: Option<Will>, extra: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    mqtt_str(b"MQTT", &mut body);
    body.push(level);
    body.push(if will.is_some() {
        0x04 | 0x08 | 0x20
    } else {
        0
    });
    body.extend_from_slice(&30u16.to_be_bytes());
    if level == 5 {
        body.extend_from_slice(properties);
    }
    mqtt_str(id.as_bytes(), &mut body);
    if let Some(w) = will {
        if level == 5 {
            body.push(0);
        }
        body.extend_from_slice(&w.topic_len.to_be_bytes());
        body.extend_from_slice(w.topic);
        mqtt_str(w.payload, &mut body);
    }
    body.extend_from_slice(extra);
    packet(0x10, &body)
}

/// MQTT 5 CONNECT properties: Session Expiry Interval 60 s.
const EXPIRY_60: &[u8] = &[5, 0x11, 0, 0, 0, 60];

/// The next packet, which must come within 5 s.
async fn expect_packet(stream: &mut TcpStream, what: &str) -> (u8, Vec<u8>) {
    match next_packet(stream, 5_000).await {
        Some(Some(p)) => p,
        Some(None) => panic!("{what}: closed, expected a packet"),
        None => panic!("{what}: nothing within 5 s"),
    }
}

/// The broker closes the connection without sending anything more.
async fn expect_closed(stream: &mut TcpStream, what: &str) {
    match next_packet(stream, 5_000).await {
        Some(None) => {}
        Some(Some((byte1, body))) => {
            panic!("{what}: expected the connection closed, got {byte1:#04x} {body:?}")
        }
        None => panic!("{what}: neither closed nor answered within 5 s"),
    }
}

/// After a CONNACK: MQTT 5 clients get DISCONNECT 0x81 (Malformed Packet)
/// first; then the connection is closed.
async fn expect_malformed(stream: &mut TcpStream, level: u8, what: &str) {
    if level == 5 {
        let (byte1, body) = expect_packet(stream, what).await;
        assert_eq!(
            (byte1, body.first()),
            (0xe0, Some(&0x81)),
            "{what}: DISCONNECT 0x81, got {byte1:#04x} {body:?}"
        );
    }
    expect_closed(stream, what).await;
}

async fn open(port: u16, bytes: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    s.write_all(bytes).await.expect("write");
    s
}

/// Opens a connection with `connect` and returns it with the CONNACK's
/// session-present flag; the CONNACK must accept.
async fn session(port: u16, connect: &[u8], what: &str) -> (TcpStream, bool) {
    let mut s = open(port, connect).await;
    let (byte1, body) = expect_packet(&mut s, what).await;
    assert_eq!(
        (byte1, body.get(1)),
        (0x20, Some(&0)),
        "{what}: CONNACK 0, got {byte1:#04x} {body:?}"
    );
    (s, body[0] & 1 == 1)
}

/// A clean 3.1.1 or 5 session for raw packets.
async fn clean_session(port: u16, level: u8, id: &str) -> TcpStream {
    session(port, &raw_connect(level, id, 30), id).await.0
}

/// Asserts that nothing but Axion's own traffic (`axion/…`) arrives within `ms`.
async fn assert_quiet(rx: &mut UnboundedReceiver<Msg>, ms: u64, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(ms);
    while let Ok(Some(m)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        assert!(m.topic.starts_with("axion/"), "{what}: got {m:?}");
    }
}

/// The next message on a topic outside Axion's own (`axion/…`), within 5 s.
async fn next_foreign(rx: &mut UnboundedReceiver<Msg>) -> Msg {
    loop {
        let m = common::mqtt::recv(rx, 5).await;
        if !m.topic.starts_with("axion/") {
            return m;
        }
    }
}

/// The packet id of a QoS 1 or 2 PUBLISH body without properties
/// (3.1.1), or with them (5: they follow the id).
fn publish_pkid(body: &[u8]) -> [u8; 2] {
    let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
    [body[2 + topic_len], body[3 + topic_len]]
}

async fn bad_connects_are_closed_without_connack_and_leave_nothing(level: u8) {
    let serve = Serve::start();
    let port = serve.mqtt_port;
    let mut watcher = V5::connect(port, "watcher").await;
    watcher.subscribe("#", 1).await;
    let id = format!("bad-connect-{level}");
    let topic = format!("parse/will/{level}");
    let will = || Will::new(&topic, b"gone");
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "two bytes after the last field",
            connect(level, &id, EXPIRY_60, Some(will()), &[0xde, 0xad]),
        ),
        (
            "300 KB after the last field",
            connect(
                level,
                &id,
                EXPIRY_60,
                Some(will()),
                &b"x".repeat(300 * 1024),
            ),
        ),
        (
            "a will topic whose declared length runs past the end",
            connect(
                level,
                &id,
                EXPIRY_60,
                Some(Will {
                    topic_len: 60_000,
                    ..will()
                }),
                &[],
            ),
        ),
    ];
    if level == 5 {
        cases.push((
            "a Session Expiry running past its property list (length 1)",
            connect(level, &id, &[1, 0x11, 0, 0, 0, 60], Some(will()), &[]),
        ));
    }
    for (what, bytes) in cases {
        let mut s = open(port, &bytes).await;
        expect_closed(&mut s, what).await;
    }
    // No will went out, live or retained.
    assert_quiet(&mut watcher.rx, 1_000, "watcher on #").await;
    let mut late = V5::connect(port, "late").await;
    late.subscribe("#", 1).await;
    assert_quiet(&mut late.rx, 1_000, "retained on #").await;

    // No session was kept: the same id connects afresh, and its well-formed
    // CONNECT (same will) works, will included.
    let (s, present) = session(
        port,
        &connect(level, &id, EXPIRY_60, Some(will()), &[]),
        "the well-formed CONNECT",
    )
    .await;
    assert!(!present, "session present after refused CONNECTs");
    drop(s);
    let m = next_foreign(&mut watcher.rx).await;
    assert_eq!(
        (m.topic.as_str(), m.payload.as_slice()),
        (topic.as_str(), &b"gone"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_3_1_1_connect_with_bytes_left_over_gets_no_connack_and_registers_nothing() {
    bad_connects_are_closed_without_connack_and_leave_nothing(4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt5_connect_with_bytes_left_over_gets_no_connack_and_registers_nothing() {
    bad_connects_are_closed_without_connack_and_leave_nothing(5).await;
}

/// A QoS 1 PUBLISH (packet id 1) with `properties` (MQTT 5 only) and
/// `topic_len` as declared.
fn publish(level: u8, topic_len: u16, topic: &str, properties: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&topic_len.to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&[0, 1]);
    if level == 5 {
        body.extend_from_slice(properties);
    }
    body.extend_from_slice(payload);
    packet(0x32, &body)
}

/// In a PUBLISH whatever follows the topic, packet id and properties is the
/// payload: what can be left over there is a property past its list, and
/// what can run past the end is the topic or the property list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_with_a_field_past_its_end_is_not_delivered() {
    let serve = Serve::start();
    let port = serve.mqtt_port;
    let mut sub = V5::connect(port, "pub-watcher").await;
    sub.subscribe("parse/pub/#", 1).await;
    // Message Expiry Interval 60 s, in a property list of the right length.
    let expiry: &[u8] = &[5, 0x02, 0, 0, 0, 60];
    let cases: Vec<(u8, &str, Vec<u8>)> = vec![
        (
            4,
            "a topic whose declared length runs past the end",
            publish(4, 200, "parse/pub/a", &[], b"bad"),
        ),
        (
            5,
            "a topic whose declared length runs past the end",
            publish(5, 200, "parse/pub/a", expiry, b"bad"),
        ),
        (
            5,
            "a Message Expiry running past its property list (length 1)",
            publish(5, 11, "parse/pub/a", &[1, 0x02, 0, 0, 0, 60], b"bad"),
        ),
        (
            5,
            "a property list whose length runs past the end",
            publish(5, 11, "parse/pub/a", &[100, 0x02, 0, 0, 0, 60], b"bad"),
        ),
    ];
    for (level, what, bytes) in cases {
        let what = format!("{what} (level {level})");
        let mut s = clean_session(port, level, "bad-pub").await;
        s.write_all(&bytes).await.expect("write");
        expect_malformed(&mut s, level, &what).await;
    }
    assert_quiet(&mut sub.rx, 1_000, "subscriber of parse/pub/#").await;

    for level in [4, 5] {
        let mut s = clean_session(port, level, "good-pub").await;
        s.write_all(&publish(level, 11, "parse/pub/a", expiry, b"good"))
            .await
            .expect("write");
        let (byte1, _) = expect_packet(&mut s, "PUBACK").await;
        assert_eq!(byte1, 0x40, "PUBACK (level {level})");
        let m = common::mqtt::recv(&mut sub.rx, 5).await;
        assert_eq!(
            (m.topic.as_str(), m.payload.as_slice()),
            ("parse/pub/a", &b"good"[..]),
            "level {level}"
        );
    }
}

/// A SUBSCRIBE (packet id 1) of `filter` at QoS 1 with `properties` (MQTT
/// 5 only) and `extra` after its last field.
fn subscribe(level: u8, properties: &[u8], filter: &str, extra: &[u8]) -> Vec<u8> {
    let mut body = vec![0, 1];
    if level == 5 {
        body.extend_from_slice(properties);
    }
    mqtt_str(filter.as_bytes(), &mut body);
    body.push(1);
    body.extend_from_slice(extra);
    packet(0x82, &body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_with_bytes_left_over_subscribes_nothing() {
    let serve = Serve::start();
    let port = serve.mqtt_port;
    let publisher = V4::connect(port, "sub-publisher").await;
    let cases: Vec<(u8, &str, Vec<u8>)> = vec![
        (
            4,
            "a byte after the last filter",
            subscribe(4, &[], "parse/sub/#", &[0]),
        ),
        (
            5,
            "a byte after the last filter",
            subscribe(5, &[0], "parse/sub/#", &[0]),
        ),
        (
            5,
            "a Subscription Identifier running past its property list (length 1)",
            subscribe(5, &[1, 0x0b, 7], "parse/sub/#", &[]),
        ),
    ];
    for (i, (level, what, bytes)) in cases.into_iter().enumerate() {
        let what = format!("{what} (level {level})");
        let id = format!("bad-sub-{i}");
        let properties = if level == 5 { EXPIRY_60 } else { &[] };
        let kept = connect(level, &id, properties, None, &[]);
        let (mut s, _) = session(port, &kept, &what).await;
        s.write_all(&bytes).await.expect("write");
        expect_malformed(&mut s, level, &what).await;
        // The session outlives the connection; a subscription would have
        // kept this QoS 1 message for it.
        publisher.publish("parse/sub/x", b"queued", 1, false).await;
        let (mut s, present) = session(port, &kept, &what).await;
        assert!(present, "{what}: the session was kept");
        if let Some(Some((byte1, body))) = next_packet(&mut s, 1_000).await {
            panic!("{what}: the session got {byte1:#04x} {body:?}");
        }
    }

    for level in [4, 5] {
        let mut s = clean_session(port, level, "good-sub").await;
        s.write_all(&subscribe(level, &[2, 0x0b, 7], "parse/sub/#", &[]))
            .await
            .expect("write");
        let (byte1, _) = expect_packet(&mut s, "SUBACK").await;
        assert_eq!(byte1, 0x90, "SUBACK (level {level})");
        publisher.publish("parse/sub/x", b"live", 1, false).await;
        let (byte1, _) = expect_packet(&mut s, "delivery").await;
        assert_eq!(byte1 >> 4, 3, "PUBLISH (level {level})");
    }
}

/// A clean session subscribed at QoS 1 to a topic of its own, and the
/// packet id of the one message `publisher` then sends it.
async fn with_delivery(port: u16, level: u8, id: &str, publisher: &V4) -> (TcpStream, [u8; 2]) {
    let mut s = clean_session(port, level, id).await;
    let topic = format!("parse/ack/{id}");
    s.write_all(&raw_subscribe(level, &topic, 1))
        .await
        .expect("write");
    assert_eq!(expect_packet(&mut s, "SUBACK").await.0, 0x90, "{id}");
    publisher.publish(&topic, b"ack me", 1, false).await;
    let (byte1, body) = expect_packet(&mut s, "delivery").await;
    assert_eq!(byte1 & 0xf6, 0x32, "{id}: QoS 1 PUBLISH");
    (s, publish_pkid(&body))
}

/// A connection that still works answers PINGREQ with PINGRESP.
async fn expect_alive(s: &mut TcpStream, what: &str) {
    s.write_all(&[0xc0, 0]).await.expect("write");
    assert_eq!(expect_packet(s, what).await, (0xd0, vec![]), "{what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledgements_and_pings_with_bytes_left_over_close_the_connection() {
    let serve = Serve::start();
    let port = serve.mqtt_port;
    let publisher = V4::connect(port, "ack-publisher").await;

    // PUBACK: 3.1.1 has the packet id only; MQTT 5 adds a reason code and
    // a property list (here empty) after it.
    for (level, good_tail) in [(4, &[][..]), (5, &[0, 0][..])] {
        for extra in [&[0xaa][..], &[][..]] {
            let what = format!("PUBACK + {extra:?} (level {level})");
            let (mut s, pkid) = with_delivery(
                port,
                level,
                &format!("ack-{level}-{}", extra.len()),
                &publisher,
            )
            .await;
            let mut body = pkid.to_vec();
            body.extend_from_slice(good_tail);
            body.extend_from_slice(extra);
            s.write_all(&packet(0x40, &body)).await.expect("write");
            if extra.is_empty() {
                expect_alive(&mut s, &what).await;
            } else {
                expect_malformed(&mut s, level, &what).await;
            }
        }
    }

    // PUBREL (3.1.1): the client's half of its own QoS 2 publish.
    for extra in [&[0xaa][..], &[][..]] {
        let what = format!("PUBREL + {extra:?} (level 4)");
        let mut s = clean_session(port, 4, &format!("rel-{}", extra.len())).await;
        let mut body = Vec::new();
        mqtt_str(b"parse/rel", &mut body);
        body.extend_from_slice(&[0, 1]);
        body.extend_from_slice(b"exactly once");
        s.write_all(&packet(0x34, &body)).await.expect("write");
        assert_eq!(expect_packet(&mut s, &what).await, (0x50, vec![0, 1]));
        let mut body = vec![0, 1];
        body.extend_from_slice(extra);
        s.write_all(&packet(0x62, &body)).await.expect("write");
        if extra.is_empty() {
            assert_eq!(expect_packet(&mut s, &what).await, (0x70, vec![0, 1]));
        } else {
            expect_malformed(&mut s, 4, &what).await;
        }
    }

    // PINGREQ has no body at all.
    for level in [4, 5] {
        let what = format!("PINGREQ + [0] (level {level})");
        let mut s = clean_session(port, level, &format!("ping-{level}")).await;
        s.write_all(&[0xc0, 1, 0]).await.expect("write");
        expect_malformed(&mut s, level, &what).await;
        let mut s = clean_session(port, level, &format!("ping-ok-{level}")).await;
        expect_alive(&mut s, &what).await;
    }
}

/// An MQTT 5 DISCONNECT with bytes after its property list is malformed,
/// not a normal disconnection: the will goes out, as on any protocol error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt5_disconnect_with_bytes_left_over_is_malformed_not_a_clean_goodbye() {
    let serve = Serve::start();
    let port = serve.mqtt_port;
    let mut watcher = V5::connect(port, "dis-watcher").await;
    watcher.subscribe("parse/dis/#", 1).await;

    let kept = connect(
        5,
        "dis-bad",
        EXPIRY_60,
        Some(Will::new("parse/dis/bad", b"gone")),
        &[],
    );
    let (mut s, _) = session(port, &kept, "dis-bad").await;
    s.write_all(&[0xe0, 3, 0x00, 0x00, 0xaa])
        .await
        .expect("write");
    expect_malformed(&mut s, 5, "DISCONNECT + [0xaa]").await;
    let m = common::mqtt::recv(&mut watcher.rx, 5).await;
    assert_eq!(m.topic, "parse/dis/bad");

    let kept = connect(
        5,
        "dis-good",
        EXPIRY_60,
        Some(Will::new("parse/dis/good", b"gone")),
        &[],
    );
    let (mut s, _) = session(port, &kept, "dis-good").await;
    s.write_all(&[0xe0, 2, 0x00, 0x00]).await.expect("write");
    expect_closed(&mut s, "well-formed DISCONNECT").await;
    assert_quiet(&mut watcher.rx, 1_000, "after a normal DISCONNECT").await;
}

/// Packets only a server sends (CONNACK, SUBACK, UNSUBACK, PINGRESP) are
/// refused before the decoder sees them: MQTT 5 clients get DISCONNECT 0x82
/// (Protocol Error), and nothing panics in the broker (rumqttd's decoder
/// panicked on some of them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_only_a_server_sends_are_refused_before_decoding() {
    let serve = Serve::start();
    let port = serve.mqtt_port;
    let server_only: [(&str, Vec<u8>); 4] = [
        ("CONNACK", packet(0x20, &[0, 0, 0])),
        ("SUBACK", packet(0x90, &[0, 1, 0, 0])),
        ("UNSUBACK", packet(0xb0, &[0, 1, 0, 0])),
        ("PINGRESP", packet(0xd0, &[])),
    ];
    for level in [4u8, 5] {
        for (name, bytes) in &server_only {
            let what = format!("{name} from a {level} client");
            let mut s = clean_session(port, level, &format!("server-only-{level}-{name}")).await;
            s.write_all(bytes).await.expect("write");
            if level == 5 {
                let (byte1, body) = expect_packet(&mut s, &what).await;
                assert_eq!(
                    (byte1, body.first()),
                    (0xe0, Some(&0x82)),
                    "{what}: DISCONNECT 0x82, got {byte1:#04x} {body:?}"
                );
            }
            expect_closed(&mut s, &what).await;
        }
    }
    // The broker is fine and printed no panic.
    let mut alive = clean_session(port, 5, "after-server-only").await;
    expect_alive(&mut alive, "a client after the refusals").await;
    let log = std::fs::read_to_string(serve.data_dir.path().join("serve.log")).unwrap_or_default();
    assert!(
        !log.contains("panicked"),
        "the broker's log shows a panic:\n{log}"
    );
}

/// After a CONNACK: MQTT 5 clients get DISCONNECT 0x82 (Protocol Error)
/// first; then the connection is closed.
async fn expect_protocol_error(stream: &mut TcpStream, level: u8, what: &str) {
    if level == 5 {
        let (byte1, body) = expect_packet(stream, what).await;
        assert_eq!(
            (byte1, body.first()),
            (0xe0, Some(&0x82)),
            "{what}: DISCONNECT 0x82, got {byte1:#04x} {body:?}"
        );
    }
    expect_closed(stream, what).await;
}

/// A SUBSCRIBE of `filter` at QoS 1 with packet id `pkid`.
fn subscribe_with_id(level: u8, pkid: u16, filter: &str) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    if level == 5 {
        body.push(0);
    }
    mqtt_str(filter.as_bytes(), &mut body);
    body.push(1);
    packet(0x82, &body)
}

/// An UNSUBSCRIBE of `filter` with packet id `pkid`.
fn unsubscribe_with_id(level: u8, pkid: u16, filter: &str) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    if level == 5 {
        body.push(0);
    }
    mqtt_str(filter.as_bytes(), &mut body);
    packet(0xa2, &body)
}

/// A PUBLISH at `qos` (1 or 2) with packet id `pkid`.
fn publish_with_id(level: u8, qos: u8, pkid: u16, topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    mqtt_str(topic.as_bytes(), &mut body);
    body.extend_from_slice(&pkid.to_be_bytes());
    if level == 5 {
        body.push(0);
    }
    body.extend_from_slice(payload);
    packet(0x30 | (qos << 1), &body)
}

/// The topic of the next packet, which must be a PUBLISH.
async fn next_publish_topic(s: &mut TcpStream, what: &str) -> String {
    let (byte1, body) = expect_packet(s, what).await;
    assert_eq!(
        byte1 >> 4,
        3,
        "{what}: a PUBLISH, got {byte1:#04x} {body:?}"
    );
    let len = usize::from(u16::from_be_bytes([body[0], body[1]]));
    String::from_utf8(body[2..2 + len].to_vec()).expect("utf-8 topic")
}

/// MQTT requires a non-zero packet identifier in SUBSCRIBE, UNSUBSCRIBE
/// and QoS 1/2 PUBLISH (MQTT-2.3.1-1; MQTT 5 2.2.1): one with 0 closes
/// the connection (MQTT 5: DISCONNECT 0x82 first) and is not acted on,
/// while other clients carry on. Kept sessions show what a packet did
/// after its connection is gone: a subscription it made, or one it
/// removed, decides what the session is owed.
async fn packet_id_zero_closes_the_connection_and_does_nothing(level: u8) {
    let serve = Serve::start();
    let port = serve.mqtt_port;
    let publisher = V4::connect(port, &format!("zero-publisher-{level}")).await;
    // A healthy client, connected throughout.
    let mut watcher = V5::connect(port, &format!("zero-watcher-{level}")).await;
    watcher.subscribe("zero/pub/#", 1).await;
    let properties = if level == 5 { EXPIRY_60 } else { &[] };

    // SUBSCRIBE with id 0 beside a subscription made with id 1: the
    // session is owed only what the good one matches.
    let what = format!("SUBSCRIBE with packet id 0 (level {level})");
    let kept = connect(level, &format!("zero-sub-{level}"), properties, None, &[]);
    let (mut s, _) = session(port, &kept, &what).await;
    s.write_all(&subscribe_with_id(level, 1, "zero/sub/good"))
        .await
        .expect("write");
    assert_eq!(expect_packet(&mut s, &what).await.0, 0x90, "{what}: SUBACK");
    s.write_all(&subscribe_with_id(level, 0, "zero/sub/bad"))
        .await
        .expect("write");
    expect_protocol_error(&mut s, level, &what).await;
    // One publisher, so the session's queue keeps this order: had the
    // second subscription been made, `bad` would come first.
    publisher.publish("zero/sub/bad", b"bad", 1, false).await;
    publisher.publish("zero/sub/good", b"good", 1, false).await;
    let (mut s, present) = session(port, &kept, &what).await;
    assert!(present, "{what}: the session was kept");
    assert_eq!(next_publish_topic(&mut s, &what).await, "zero/sub/good");

    // UNSUBSCRIBE with id 0: the subscription stands.
    let what = format!("UNSUBSCRIBE with packet id 0 (level {level})");
    let kept = connect(level, &format!("zero-unsub-{level}"), properties, None, &[]);
    let (mut s, _) = session(port, &kept, &what).await;
    s.write_all(&subscribe_with_id(level, 1, "zero/unsub"))
        .await
        .expect("write");
    assert_eq!(expect_packet(&mut s, &what).await.0, 0x90, "{what}: SUBACK");
    s.write_all(&unsubscribe_with_id(level, 0, "zero/unsub"))
        .await
        .expect("write");
    expect_protocol_error(&mut s, level, &what).await;
    publisher
        .publish("zero/unsub", b"still subscribed", 1, false)
        .await;
    let (mut s, present) = session(port, &kept, &what).await;
    assert!(present, "{what}: the session was kept");
    assert_eq!(next_publish_topic(&mut s, &what).await, "zero/unsub");

    // PUBLISH at QoS 1 and 2 with id 0: not delivered.
    for qos in [1, 2] {
        let what = format!("QoS {qos} PUBLISH with packet id 0 (level {level})");
        let mut s = clean_session(port, level, &format!("zero-pub-{level}-{qos}")).await;
        s.write_all(&publish_with_id(level, qos, 0, "zero/pub/bad", b"bad"))
            .await
            .expect("write");
        expect_protocol_error(&mut s, level, &what).await;
    }
    // The healthy client's next message is this one: nothing came before.
    publisher
        .publish("zero/pub/after", b"after", 1, false)
        .await;
    let m = next_foreign(&mut watcher.rx).await;
    assert_eq!(
        (m.topic.as_str(), m.payload.as_slice()),
        ("zero/pub/after", &b"after"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_3_1_1_packet_id_of_zero_closes_the_connection_and_does_nothing() {
    packet_id_zero_closes_the_connection_and_does_nothing(4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt5_packet_id_of_zero_closes_the_connection_and_does_nothing() {
    packet_id_zero_closes_the_connection_and_does_nothing(5).await;
}
