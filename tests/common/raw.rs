//! Hand-made MQTT packets, for what no client library will send: malformed
//! packets, protocol violations and exact byte checks.
#![allow(dead_code)]

use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

pub fn varint(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

pub fn mqtt_str(s: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// A raw CONNECT (clean session) for protocol `level` 4 or 5.
pub fn raw_connect(level: u8, client_id: &str, keep_alive: u16) -> Vec<u8> {
    raw_connect_flags(level, client_id, keep_alive, 0x02)
}

/// A raw CONNECT with the given connect flags (0x00: persistent session).
pub fn raw_connect_flags(level: u8, client_id: &str, keep_alive: u16, flags: u8) -> Vec<u8> {
    let mut body = Vec::new();
    mqtt_str(b"MQTT", &mut body);
    body.push(level);
    body.push(flags);
    body.extend_from_slice(&keep_alive.to_be_bytes());
    if level == 5 {
        body.push(0);
    }
    mqtt_str(client_id.as_bytes(), &mut body);
    let mut packet = vec![0x10];
    varint(body.len(), &mut packet);
    packet.extend(body);
    packet
}

pub fn raw_publish(level: u8, topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    mqtt_str(topic.as_bytes(), &mut body);
    if level == 5 {
        body.push(0);
    }
    body.extend_from_slice(payload);
    let mut packet = vec![0x30];
    varint(body.len(), &mut packet);
    packet.extend(body);
    packet
}

/// A raw SUBSCRIBE (packet id 1) of one filter with `options` (QoS in the
/// low bits; MQTT 5 adds an empty property list).
pub fn raw_subscribe(level: u8, filter: &str, options: u8) -> Vec<u8> {
    let mut body = vec![0, 1];
    if level == 5 {
        body.push(0);
    }
    mqtt_str(filter.as_bytes(), &mut body);
    body.push(options);
    let mut packet = vec![0x82];
    varint(body.len(), &mut packet);
    packet.extend(body);
    packet
}

/// Reads whatever the broker sends within `ms` (empty if it closed).
pub async fn read_reply(stream: &mut TcpStream, ms: u64) -> Vec<u8> {
    let mut buf = vec![0u8; 256];
    match tokio::time::timeout(Duration::from_millis(ms), stream.read(&mut buf)).await {
        Ok(Ok(n)) => buf[..n].to_vec(),
        Ok(Err(_)) => Vec::new(),
        Err(_) => panic!("the broker neither answered nor closed within {ms} ms"),
    }
}

/// The next whole packet: (first byte, body); `Some(None)` if the broker
/// closed the connection, `None` if nothing came within `ms`.
pub async fn next_packet(stream: &mut TcpStream, ms: u64) -> Option<Option<(u8, Vec<u8>)>> {
    let read = async {
        let byte1 = stream.read_u8().await.ok()?;
        let (mut len, mut shift) = (0usize, 0);
        loop {
            let b = stream.read_u8().await.ok()?;
            len |= usize::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0u8; len];
        stream.read_exact(&mut body).await.ok()?;
        Some((byte1, body))
    };
    tokio::time::timeout(Duration::from_millis(ms), read)
        .await
        .ok()
}

/// Reads one whole packet: (first byte, body). `None` if the broker closed
/// the connection; panics if nothing comes within `ms`.
pub async fn read_packet(stream: &mut TcpStream, ms: u64) -> Option<(u8, Vec<u8>)> {
    next_packet(stream, ms)
        .await
        .unwrap_or_else(|| panic!("no packet within {ms} ms"))
}
