//! MQTT framing and codec selection for the one public port.
//!
//! A connection's first packet is framed here (fixed header and remaining
//! length only) so the front end can refuse an oversize CONNECT and pick
//! rumqttd's 3.1.1 or 5 codec from the protocol level. rumqttd's codecs are
//! then used for everything else, behind a guard: a decoding panic on
//! hostile bytes becomes a malformed-packet error for that one client.

use std::panic::{catch_unwind, AssertUnwindSafe};

use bytes::BytesMut;
use rumqttd::protocol::{v4::V4, v5::V5, Packet, Protocol};

/// What framing the start of a buffer yields.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// More bytes are needed.
    Incomplete,
    /// A whole packet of `len` bytes (header included) with first byte `byte1`.
    Complete {
        byte1: u8,
        len: usize,
        remaining: usize,
    },
    /// The packet announces more than the limit allows.
    TooLarge { remaining: usize },
    /// The remaining length is not a valid variable byte integer.
    Malformed,
}

/// Frames the packet at the start of `buf` without decoding it.
pub fn frame(buf: &[u8], max_remaining: usize) -> Frame {
    let Some(&byte1) = buf.first() else {
        return Frame::Incomplete;
    };
    let mut remaining = 0usize;
    let mut shift = 0;
    for (i, &b) in buf[1..].iter().enumerate() {
        remaining |= usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            if remaining > max_remaining {
                return Frame::TooLarge { remaining };
            }
            let len = 1 + (i + 1) + remaining;
            if buf.len() < len {
                return Frame::Incomplete;
            }
            return Frame::Complete {
                byte1,
                len,
                remaining,
            };
        }
        shift += 7;
        if shift > 21 {
            return Frame::Malformed;
        }
    }
    Frame::Incomplete
}

/// The protocol level of a complete CONNECT packet (4 = 3.1.1, 5 = 5),
/// or `None` if the packet is not a well-formed CONNECT header.
pub fn connect_level(packet: &[u8]) -> Option<u8> {
    if packet.first()? >> 4 != 1 {
        return None;
    }
    // Skip the variable-length remaining-length field.
    let mut i = 1;
    while *packet.get(i)? & 0x80 != 0 {
        i += 1;
    }
    i += 1;
    let name_len = usize::from(u16::from_be_bytes([*packet.get(i)?, *packet.get(i + 1)?]));
    let name = packet.get(i + 2..i + 2 + name_len)?;
    if name != b"MQTT" {
        return None;
    }
    packet.get(i + 2 + name_len).copied()
}

/// The connect-flags byte of a complete CONNECT packet.
pub fn connect_flags(packet: &[u8]) -> Option<u8> {
    let mut i = 1;
    while *packet.get(i)? & 0x80 != 0 {
        i += 1;
    }
    i += 1;
    let name_len = usize::from(u16::from_be_bytes([*packet.get(i)?, *packet.get(i + 1)?]));
    packet.get(i + 2 + name_len + 1).copied()
}

/// Why the connect flags are malformed (MQTT-3.1.2-3, 3.1.2-11..14, 3.1.2-22), if they are.
pub fn check_connect_flags(flags: u8, level: u8) -> Result<(), &'static str> {
    let will = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    if flags & 0x01 != 0 {
        return Err("reserved connect flag set");
    }
    if will_qos == 3 {
        return Err("will QoS 3");
    }
    if !will && (will_qos != 0 || will_retain) {
        return Err("will QoS or retain set without a will");
    }
    if level == 4 && flags & 0x80 == 0 && flags & 0x40 != 0 {
        return Err("password without a user name");
    }
    Ok(())
}

/// Why a packet could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("malformed packet: {0}")]
    Protocol(#[from] rumqttd::protocol::Error),
    #[error("the MQTT decoder panicked on this packet")]
    Panicked,
}

/// rumqttd's 3.1.1 or 5 codec, chosen once per connection.
pub enum Codec {
    V4(V4),
    V5(V5),
}

impl Codec {
    pub fn for_level(level: u8) -> Option<Self> {
        match level {
            4 => Some(Codec::V4(V4)),
            5 => Some(Codec::V5(V5)),
            _ => None,
        }
    }

    pub fn is_v5(&self) -> bool {
        matches!(self, Codec::V5(_))
    }

    /// Decodes one complete packet (already framed) from the front of `buf`.
    pub fn read(&mut self, buf: &mut BytesMut, max_size: usize) -> Result<Packet, DecodeError> {
        let result = catch_unwind(AssertUnwindSafe(|| match self {
            Codec::V4(c) => c.read_mut(buf, max_size),
            Codec::V5(c) => c.read_mut(buf, max_size),
        }));
        match result {
            Ok(r) => Ok(r?),
            Err(_) => Err(DecodeError::Panicked),
        }
    }

    /// Encodes `packet` for this client. MQTT 5 properties are dropped for
    /// 3.1.1 clients (rumqttd's v4 encoder panics on them).
    pub fn write(
        &self,
        packet: Packet,
        out: &mut BytesMut,
    ) -> Result<usize, rumqttd::protocol::Error> {
        match self {
            Codec::V5(c) => c.write(packet, out),
            Codec::V4(c) => c.write(strip_properties(packet), out),
        }
    }
}

fn strip_properties(packet: Packet) -> Packet {
    match packet {
        Packet::ConnAck(a, _) => Packet::ConnAck(a, None),
        Packet::Publish(p, _) => Packet::Publish(p, None),
        Packet::PubAck(a, _) => Packet::PubAck(a, None),
        Packet::SubAck(a, _) => Packet::SubAck(a, None),
        Packet::PubRec(a, _) => Packet::PubRec(a, None),
        Packet::PubRel(a, _) => Packet::PubRel(a, None),
        Packet::PubComp(a, _) => Packet::PubComp(a, None),
        Packet::UnsubAck(a, _) => Packet::UnsubAck(a, None),
        Packet::Disconnect(d, _) => Packet::Disconnect(d, None),
        Packet::Subscribe(s, _) => Packet::Subscribe(s, None),
        Packet::Unsubscribe(u, _) => Packet::Unsubscribe(u, None),
        Packet::Connect(c, _, w, _, l) => Packet::Connect(c, None, w, None, l),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_and_limits() {
        assert_eq!(frame(&[], 10), Frame::Incomplete);
        assert_eq!(frame(&[0x30], 10), Frame::Incomplete);
        assert_eq!(
            frame(&[0xc0, 0x00], 10),
            Frame::Complete {
                byte1: 0xc0,
                len: 2,
                remaining: 0
            }
        );
        assert_eq!(frame(&[0x30, 0x05, 1, 2], 10), Frame::Incomplete);
        assert_eq!(
            frame(&[0x30, 0x80, 0x01], 10),
            Frame::TooLarge { remaining: 128 }
        );
        assert_eq!(
            frame(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], usize::MAX),
            Frame::Malformed
        );
    }

    #[test]
    fn checks_connect_flags() {
        assert!(check_connect_flags(0x02, 4).is_ok());
        assert!(check_connect_flags(0xc2 | 0x04 | 0x08 | 0x20, 4).is_ok());
        assert!(check_connect_flags(0x03, 4).is_err(), "reserved bit");
        assert!(
            check_connect_flags(0x02 | 0x18 | 0x04, 4).is_err(),
            "will QoS 3"
        );
        assert!(
            check_connect_flags(0x02 | 0x08, 4).is_err(),
            "will QoS without will"
        );
        assert!(
            check_connect_flags(0x42, 4).is_err(),
            "password without user (3.1.1)"
        );
        assert!(check_connect_flags(0x42, 5).is_ok(), "allowed in MQTT 5");
        let v4 = [
            0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 1, b'a',
        ];
        assert_eq!(connect_flags(&v4), Some(2));
    }

    #[test]
    fn reads_connect_level() {
        // CONNECT, v4, keep-alive 60, client id "a".
        let v4 = [
            0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 1, b'a',
        ];
        assert_eq!(connect_level(&v4), Some(4));
        let mut v5 = v4;
        v5[8] = 5;
        assert_eq!(connect_level(&v5), Some(5));
        assert_eq!(connect_level(&[0x30, 0]), None);
        assert_eq!(connect_level(&[0x10, 2, 0, 9]), None);
    }
}
