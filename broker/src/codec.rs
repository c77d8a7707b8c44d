//! MQTT framing and codec selection for the one public port.
//!
//! A connection's first packet is framed here (fixed header and remaining
//! length only) so the front end can refuse an oversize CONNECT and pick
//! rumqttd's 3.1.1 or 5 codec from the protocol level. rumqttd's codecs are
//! then used for everything else, behind two guards: every packet's fields
//! must fill its remaining length exactly ([`Codec::read`]), and a decoding
//! panic on hostile bytes becomes a malformed-packet error for that one
//! client.

use std::panic::{catch_unwind, AssertUnwindSafe};

use bytes::BytesMut;
use rumqttd::protocol::{v4::V4, v5::V5, Packet, Protocol};

/// A whole packet at the start of a buffer, as [`frame`] found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framed {
    /// Packet type and flags.
    pub byte1: u8,
    /// Bytes of the whole packet, fixed header included.
    pub len: usize,
    /// Bytes after the fixed header (the remaining length).
    pub remaining: usize,
}

/// What framing the start of a buffer yields.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// More bytes are needed.
    Incomplete,
    /// A whole packet.
    Complete(Framed),
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
            return Frame::Complete(Framed {
                byte1,
                len,
                remaining,
            });
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
    #[error("malformed packet: {0}")]
    Length(#[from] LengthError),
    #[error("the MQTT decoder panicked on this packet")]
    Panicked,
    /// A packet type only a server sends (CONNACK, SUBACK, UNSUBACK,
    /// PINGRESP) or a reserved one: refused before rumqttd's decoder, which
    /// panics on some of them.
    #[error("packet type {0} is not one a client sends")]
    NotFromClient(u8),
    /// A SUBSCRIBE, UNSUBSCRIBE or QoS 1/2 PUBLISH whose packet identifier
    /// is 0, which MQTT forbids (MQTT-2.3.1-1; MQTT 5 2.2.1). rumqttd
    /// refuses it in a PUBLISH only; an (UN)SUBSCRIBE with it would be
    /// acted on and acknowledged with an id the client could not have
    /// been waiting for.
    #[error("{0} with packet identifier 0")]
    ZeroPacketId(&'static str),
}

impl DecodeError {
    /// MQTT 5's reason for closing over it: a packet that should never
    /// come is a Protocol Error, anything else a Malformed Packet.
    pub fn reason(&self) -> rumqttd::protocol::DisconnectReasonCode {
        match self {
            DecodeError::NotFromClient(_) | DecodeError::ZeroPacketId(_) => {
                rumqttd::protocol::DisconnectReasonCode::ProtocolError
            }
            _ => rumqttd::protocol::DisconnectReasonCode::MalformedPacket,
        }
    }
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

    /// Decodes the packet `framed` (from [`frame`]) at the front of `buf`
    /// and takes it off `buf`. Its fields must fill its remaining length
    /// exactly ([`check_length`]), which rumqttd does not check. After an
    /// error the connection must close: what is left in `buf` is then
    /// unspecified.
    pub fn read(
        &mut self,
        buf: &mut BytesMut,
        framed: Framed,
        max_size: usize,
    ) -> Result<Packet, DecodeError> {
        let v5 = self.is_v5();
        // CONNECT only as the first packet, which the handshake reads.
        let kind = framed.byte1 >> 4;
        if matches!(kind, 0 | 2 | 9 | 11 | 13) {
            return Err(DecodeError::NotFromClient(kind));
        }
        let result = catch_unwind(AssertUnwindSafe(|| -> Result<Packet, DecodeError> {
            let body = &buf[framed.len - framed.remaining..framed.len];
            check_length(framed.byte1, body, v5)?;
            Ok(match self {
                Codec::V4(c) => c.read_mut(buf, max_size),
                Codec::V5(c) => c.read_mut(buf, max_size),
            }?)
        }));
        match result.unwrap_or(Err(DecodeError::Panicked)) {
            Err(DecodeError::Protocol(rumqttd::protocol::Error::PacketIdZero)) => {
                Err(DecodeError::ZeroPacketId("PUBLISH"))
            }
            Ok(Packet::Subscribe(s, _)) if s.pkid == 0 => {
                Err(DecodeError::ZeroPacketId("SUBSCRIBE"))
            }
            Ok(Packet::Unsubscribe(u, _)) if u.pkid == 0 => {
                Err(DecodeError::ZeroPacketId("UNSUBSCRIBE"))
            }
            other => other,
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
            Codec::V5(c) => c.write(with_disconnect_properties(packet), out),
            Codec::V4(c) => c.write(strip_properties(packet), out),
        }
    }
}

/// rumqttd writes an MQTT 5 DISCONNECT with a reason code and no
/// properties as remaining length 1 followed by two bytes (the reason and
/// an empty property length), and one with an empty property list as a
/// bare normal disconnection: both wrong. With a reason string (which also
/// tells the client's log why) it writes a well-formed packet.
fn with_disconnect_properties(packet: Packet) -> Packet {
    match packet {
        Packet::Disconnect(d, None)
            if d.reason_code != rumqttd::protocol::DisconnectReasonCode::NormalDisconnection =>
        {
            let props = rumqttd::protocol::DisconnectProperties {
                session_expiry_interval: None,
                reason_string: Some(format!("{:?}", d.reason_code)),
                user_properties: Vec::new(),
                server_reference: None,
            };
            Packet::Disconnect(d, Some(props))
        }
        other => other,
    }
}

/// How a packet's fields fail to fill its remaining length exactly.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LengthError {
    #[error("the {0} runs past the end of the packet")]
    PastEnd(&'static str),
    #[error("a property runs past the end of its property list")]
    PastProperties,
    #[error("bytes left over after the last field: {0}")]
    LeftOver(usize),
    #[error("unknown property {0:#04x}")]
    UnknownProperty(u8),
    #[error("the {0} is not a valid variable byte integer")]
    VarInt(&'static str),
}

/// Walks the fields of a client packet's `body` (what follows its fixed
/// header) by their declared lengths and checks that the last one ends
/// exactly where the body does (MQTT-3.1.4-1; in MQTT 5 anything else is a
/// Malformed Packet, 4.13).
///
/// rumqttd's decoders take the packet by value and tell no position: they
/// ignore what follows a CONNECT's last field, bytes after a PINGREQ, a
/// 3.1.1 PUBREC/PUBREL/PUBCOMP's packet id or an MQTT 5 acknowledgement's
/// or DISCONNECT's properties, and let an MQTT 5 property run past its
/// list. Only lengths are read here (no copy, no allocation; a PUBLISH's
/// payload is not touched); rumqttd still decodes and checks the values.
fn check_length(byte1: u8, body: &[u8], v5: bool) -> Result<(), LengthError> {
    let mut f = Fields { bytes: body, at: 0 };
    match byte1 >> 4 {
        // CONNECT
        1 => {
            f.prefixed("protocol name")?;
            f.skip(1, "protocol level")?;
            let flags = f.byte("connect flags")?;
            f.skip(2, "keep alive")?;
            if v5 {
                f.properties()?;
            }
            f.prefixed("client identifier")?;
            if flags & 0x04 != 0 {
                if v5 {
                    f.properties()?;
                }
                f.prefixed("will topic")?;
                f.prefixed("will payload")?;
            }
            if flags & 0x80 != 0 {
                f.prefixed("user name")?;
            }
            if flags & 0x40 != 0 {
                f.prefixed("password")?;
            }
        }
        // PUBLISH: whatever follows the variable header is the payload.
        3 => {
            f.prefixed("topic name")?;
            if byte1 & 0x06 != 0 {
                f.skip(2, "packet identifier")?;
            }
            if v5 {
                f.properties()?;
            }
            return Ok(());
        }
        // PUBACK, PUBREC, PUBREL, PUBCOMP: MQTT 5 may add a reason code,
        // then properties.
        4..=7 => {
            f.skip(2, "packet identifier")?;
            if v5 {
                f.reason_and_properties()?;
            }
        }
        // SUBSCRIBE
        8 => {
            f.skip(2, "packet identifier")?;
            if v5 {
                f.properties()?;
            }
            while f.left() > 0 {
                f.prefixed("topic filter")?;
                f.skip(1, "subscription options")?;
            }
        }
        // UNSUBSCRIBE
        10 => {
            f.skip(2, "packet identifier")?;
            if v5 {
                f.properties()?;
            }
            while f.left() > 0 {
                f.prefixed("topic filter")?;
            }
        }
        // DISCONNECT: MQTT 5 may add a reason code, then properties.
        14 if v5 => f.reason_and_properties()?,
        // PINGREQ, 3.1.1's DISCONNECT: no body at all.
        12 | 14 => {}
        // What only a server sends, and the reserved types, are refused
        // whatever their length.
        _ => return Ok(()),
    }
    match f.left() {
        0 => Ok(()),
        n => Err(LengthError::LeftOver(n)),
    }
}

/// A read position in a packet body or in one property list.
struct Fields<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Fields<'_> {
    fn left(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn skip(&mut self, n: usize, field: &'static str) -> Result<(), LengthError> {
        if n > self.left() {
            return Err(LengthError::PastEnd(field));
        }
        self.at += n;
        Ok(())
    }

    fn byte(&mut self, field: &'static str) -> Result<u8, LengthError> {
        let b = *self.bytes.get(self.at).ok_or(LengthError::PastEnd(field))?;
        self.at += 1;
        Ok(b)
    }

    /// A two-byte length and that many bytes (string or binary data).
    fn prefixed(&mut self, field: &'static str) -> Result<(), LengthError> {
        let len = u16::from_be_bytes([self.byte(field)?, self.byte(field)?]);
        self.skip(usize::from(len), field)
    }

    fn varint(&mut self, field: &'static str) -> Result<usize, LengthError> {
        let mut value = 0;
        for shift in [0, 7, 14, 21] {
            let b = self.byte(field)?;
            value |= usize::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(LengthError::VarInt(field))
    }

    /// An MQTT 5 property list: its length, then properties that must fill
    /// exactly that many bytes.
    fn properties(&mut self) -> Result<(), LengthError> {
        let len = self.varint("property length")?;
        if len > self.left() {
            return Err(LengthError::PastEnd("property list"));
        }
        let mut list = Fields {
            bytes: &self.bytes[self.at..self.at + len],
            at: 0,
        };
        self.at += len;
        while list.left() > 0 {
            list.property().map_err(|e| match e {
                LengthError::PastEnd(_) => LengthError::PastProperties,
                other => other,
            })?;
        }
        Ok(())
    }

    /// One property: its identifier says how long its value is.
    fn property(&mut self) -> Result<(), LengthError> {
        const FIELD: &str = "property";
        match self.byte(FIELD)? {
            // Byte.
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2a => self.skip(1, FIELD),
            // Two-byte integer.
            0x13 | 0x21 | 0x22 | 0x23 => self.skip(2, FIELD),
            // Four-byte integer.
            0x02 | 0x11 | 0x18 | 0x27 => self.skip(4, FIELD),
            // Variable byte integer (Subscription Identifier).
            0x0b => self.varint(FIELD).map(drop),
            // UTF-8 string or binary data.
            0x03 | 0x08 | 0x09 | 0x12 | 0x15 | 0x16 | 0x1a | 0x1c | 0x1f => self.prefixed(FIELD),
            // User Property: a string pair.
            0x26 => {
                self.prefixed(FIELD)?;
                self.prefixed(FIELD)
            }
            id => Err(LengthError::UnknownProperty(id)),
        }
    }

    /// MQTT 5 acknowledgements and DISCONNECT: after what is fixed, a
    /// reason code if any bytes are left, then properties if any are still
    /// left (a shorter packet means success and no properties).
    fn reason_and_properties(&mut self) -> Result<(), LengthError> {
        if self.left() > 0 {
            self.skip(1, "reason code")?;
            if self.left() > 0 {
                self.properties()?;
            }
        }
        Ok(())
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

    #[test]
    fn an_mqtt5_disconnect_with_a_reason_is_well_formed() {
        let codec = Codec::V5(V5);
        let mut out = BytesMut::new();
        let d = rumqttd::protocol::Disconnect {
            reason_code: rumqttd::protocol::DisconnectReasonCode::QuotaExceeded,
        };
        codec
            .write(Packet::Disconnect(d, None), &mut out)
            .expect("encode");
        let reason = b"QuotaExceeded";
        let mut expected = vec![0xE0, 2 + 3 + reason.len() as u8, 0x97];
        expected.extend_from_slice(&[3 + reason.len() as u8, 0x1F, 0, reason.len() as u8]);
        expected.extend_from_slice(reason);
        assert_eq!(&out[..], &expected[..]);
    }
    use super::*;

    use rumqttd::protocol::{
        Connect, ConnectProperties, Disconnect, DisconnectProperties, DisconnectReasonCode, Filter,
        LastWill, LastWillProperties, Login, PingReq, PubAck, PubAckProperties, PubAckReason,
        PubComp, PubCompProperties, PubCompReason, PubRec, PubRecProperties, PubRecReason, PubRel,
        PubRelProperties, PubRelReason, PublishProperties, QoS, RetainForwardRule, Subscribe,
        SubscribeProperties, Unsubscribe, UnsubscribeProperties,
    };

    /// Every packet type a client sends, with every field and property
    /// rumqttd can encode (properties only for MQTT 5).
    fn client_packets(v5: bool) -> Vec<Packet> {
        fn user() -> Vec<(String, String)> {
            vec![("k".into(), "v".into())]
        }
        let filter = |path: &str| Filter {
            path: path.into(),
            qos: QoS::AtLeastOnce,
            nolocal: v5,
            preserve_retain: v5,
            retain_forward_rule: RetainForwardRule::OnNewSubscribe,
        };
        vec![
            Packet::Connect(
                Connect {
                    keep_alive: 30,
                    client_id: "client".into(),
                    clean_session: false,
                },
                v5.then(|| ConnectProperties {
                    session_expiry_interval: Some(60),
                    receive_maximum: Some(10),
                    max_packet_size: Some(1000),
                    topic_alias_max: Some(4),
                    request_response_info: Some(1),
                    request_problem_info: Some(1),
                    user_properties: user(),
                    authentication_method: None,
                    authentication_data: None,
                }),
                Some(LastWill {
                    topic: "will".into(),
                    message: "gone".into(),
                    qos: QoS::AtLeastOnce,
                    retain: true,
                }),
                v5.then(|| LastWillProperties {
                    delay_interval: Some(5),
                    payload_format_indicator: Some(1),
                    message_expiry_interval: Some(9),
                    content_type: Some("text/plain".into()),
                    response_topic: Some("re".into()),
                    correlation_data: Some("id".into()),
                    user_properties: user(),
                }),
                Some(Login {
                    username: "user".into(),
                    password: "pass".into(),
                }),
            ),
            Packet::Publish(
                crate::session::make_publish("t/1".into(), "p".into(), QoS::ExactlyOnce, true, 7),
                v5.then(|| PublishProperties {
                    payload_format_indicator: Some(1),
                    message_expiry_interval: Some(60),
                    topic_alias: Some(2),
                    response_topic: Some("re".into()),
                    correlation_data: Some("id".into()),
                    user_properties: user(),
                    subscription_identifiers: vec![],
                    content_type: Some("text/plain".into()),
                }),
            ),
            Packet::PubAck(
                PubAck {
                    pkid: 7,
                    reason: PubAckReason::NoMatchingSubscribers,
                },
                v5.then_some(PubAckProperties {
                    reason_string: Some("none".into()),
                    user_properties: user(),
                }),
            ),
            Packet::PubRec(
                PubRec {
                    pkid: 7,
                    reason: PubRecReason::Success,
                },
                v5.then_some(PubRecProperties {
                    reason_string: Some("ok".into()),
                    user_properties: user(),
                }),
            ),
            Packet::PubRel(
                PubRel {
                    pkid: 7,
                    reason: PubRelReason::Success,
                },
                v5.then_some(PubRelProperties {
                    reason_string: Some("ok".into()),
                    user_properties: user(),
                }),
            ),
            Packet::PubComp(
                PubComp {
                    pkid: 7,
                    reason: PubCompReason::Success,
                },
                v5.then_some(PubCompProperties {
                    reason_string: Some("ok".into()),
                    user_properties: user(),
                }),
            ),
            Packet::Subscribe(
                Subscribe {
                    pkid: 8,
                    filters: vec![filter("a/#"), filter("b")],
                },
                v5.then_some(SubscribeProperties {
                    id: Some(300),
                    user_properties: user(),
                }),
            ),
            Packet::Unsubscribe(
                Unsubscribe {
                    pkid: 9,
                    filters: vec!["a/#".into(), "b".into()],
                },
                v5.then_some(UnsubscribeProperties {
                    user_properties: user(),
                }),
            ),
            Packet::PingReq(PingReq),
            Packet::Disconnect(
                Disconnect {
                    reason_code: DisconnectReasonCode::DisconnectWithWillMessage,
                },
                v5.then_some(DisconnectProperties {
                    session_expiry_interval: Some(0),
                    reason_string: Some("bye".into()),
                    user_properties: user(),
                    server_reference: None,
                }),
            ),
        ]
    }

    fn framed(buf: &[u8]) -> Framed {
        match frame(buf, usize::MAX) {
            Frame::Complete(f) => f,
            other => panic!("not one whole packet: {other:?}"),
        }
    }

    /// `packet` with its body changed by `edit` and its remaining length
    /// made to match.
    fn edited(packet: &[u8], edit: impl FnOnce(&mut Vec<u8>)) -> BytesMut {
        let f = framed(packet);
        let mut body = packet[f.len - f.remaining..].to_vec();
        edit(&mut body);
        let mut out = vec![f.byte1];
        let mut n = body.len();
        loop {
            let b = (n % 128) as u8;
            n /= 128;
            out.push(if n > 0 { b | 0x80 } else { b });
            if n == 0 {
                break;
            }
        }
        out.extend(body);
        BytesMut::from(&out[..])
    }

    fn read(codec: &mut Codec, buf: &mut BytesMut) -> Result<Packet, DecodeError> {
        let f = framed(buf);
        codec.read(buf, f, usize::MAX)
    }

    #[test]
    fn client_packets_decode_to_their_exact_length_and_no_further() {
        for (level, v5) in [(4, false), (5, true)] {
            let mut codec = Codec::for_level(level).expect("codec");
            for packet in client_packets(v5) {
                let what = format!("level {level}: {packet:?}");
                let is_publish = matches!(packet, Packet::Publish(..));
                let mut wire = BytesMut::new();
                codec.write(packet, &mut wire).expect("encode");

                // As encoded, followed by the next packet: exactly one is taken.
                let mut buf = wire.clone();
                buf.extend_from_slice(&[0xc0, 0]);
                assert!(read(&mut codec, &mut buf).is_ok(), "{what}");
                assert_eq!(&buf[..], &[0xc0, 0], "{what}: the next packet is left");

                // A byte left over (a PUBLISH's payload just grows; in a
                // (UN)SUBSCRIBE it starts a filter that runs past the end).
                let result = read(&mut codec, &mut edited(&wire, |b| b.push(0)));
                if is_publish {
                    assert!(result.is_ok(), "{what}: {result:?}");
                } else {
                    assert!(
                        matches!(result, Err(DecodeError::Length(_))),
                        "{what}: {result:?}"
                    );
                }

                // A byte short: the last field runs past the end.
                if wire.len() > 2 && !is_publish {
                    let result = read(
                        &mut codec,
                        &mut edited(&wire, |b| {
                            b.pop();
                        }),
                    );
                    assert!(
                        matches!(
                            result,
                            Err(DecodeError::Length(
                                LengthError::PastEnd(_) | LengthError::PastProperties
                            ))
                        ),
                        "{what}: {result:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_zero_packet_id_is_a_protocol_error_where_one_is_required() {
        for (level, v5) in [(4, false), (5, true)] {
            let mut codec = Codec::for_level(level).expect("codec");
            for packet in client_packets(v5) {
                let what = format!("level {level}: {packet:?}");
                // Where the packet id sits in the body: first in an
                // (UN)SUBSCRIBE, after the topic in a PUBLISH.
                let at = match &packet {
                    Packet::Subscribe(..) | Packet::Unsubscribe(..) => 0,
                    Packet::Publish(p, _) => 2 + p.topic.len(),
                    _ => continue,
                };
                let mut wire = BytesMut::new();
                codec.write(packet, &mut wire).expect("encode");
                assert!(read(&mut codec, &mut wire.clone()).is_ok(), "{what}");
                let mut zeroed = edited(&wire, |b| b[at..at + 2].fill(0));
                match read(&mut codec, &mut zeroed) {
                    Err(e @ DecodeError::ZeroPacketId(_)) => {
                        assert_eq!(e.reason(), DisconnectReasonCode::ProtocolError, "{what}")
                    }
                    other => panic!("{what}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn fields_and_properties_past_their_end_are_named() {
        let v4_connect = raw_connect(4, b"", &[]);
        let v5_connect = raw_connect(5, &[0], &[]);
        assert_eq!(check(&v4_connect, false), Ok(()));
        assert_eq!(check(&v5_connect, true), Ok(()));
        // CONNECT: bytes after the client id; a will topic past the end.
        assert_eq!(
            check(&raw_connect(4, b"", &[0xde, 0xad]), false),
            Err(LengthError::LeftOver(2))
        );
        let mut will = raw_connect(4, b"", &[0, 200, b'w']);
        will[9] |= 0x04;
        assert_eq!(check(&will, false), Err(LengthError::PastEnd("will topic")));
        // A Session Expiry (4 bytes) in a property list of 1 byte.
        let short_list = raw_connect(5, &[1, 0x11, 0, 0, 0, 60], &[]);
        assert_eq!(check(&short_list, true), Err(LengthError::PastProperties));
        // PUBLISH (QoS 0): a property list longer than the packet, an
        // unknown property, a property length of five bytes.
        let publish = |props: &[u8]| [&[0x30, 0, 0, 1, b't'][..], props].concat();
        assert_eq!(check(&publish(&[0, 1, 2]), true), Ok(()));
        assert_eq!(
            check(&publish(&[9, 0x01, 1]), true),
            Err(LengthError::PastEnd("property list"))
        );
        assert_eq!(
            check(&publish(&[2, 0x7f, 0]), true),
            Err(LengthError::UnknownProperty(0x7f))
        );
        assert_eq!(
            check(&publish(&[0x80, 0x80, 0x80, 0x80, 0x01]), true),
            Err(LengthError::VarInt("property length"))
        );
        // A Subscription Identifier whose variable byte integer runs past its list.
        let subscribe = [0x82, 0, 0, 1, 2, 0x0b, 0x81, 0x01, 0, 1, b'a', 0];
        assert_eq!(check(&subscribe, true), Err(LengthError::PastProperties));
        // PINGREQ has no body; a 3.1.1 PUBREL only a packet id.
        assert_eq!(check(&[0xc0, 0, 0], false), Err(LengthError::LeftOver(1)));
        assert_eq!(
            check(&[0x62, 0, 0, 1, 0], false),
            Err(LengthError::LeftOver(1))
        );
        // MQTT 5: reason code alone, or reason code and properties.
        assert_eq!(check(&[0x62, 0, 0, 1, 0x92], true), Ok(()));
        assert_eq!(check(&[0xe0, 0, 0x04], true), Ok(()));
        assert_eq!(
            check(&[0xe0, 0, 0x04, 0, 0], true),
            Err(LengthError::LeftOver(1))
        );
    }

    /// A CONNECT (client id "c", clean session) with `props` (MQTT 5:
    /// the connect properties) and `extra` bytes after the client id.
    fn raw_connect(level: u8, props: &[u8], extra: &[u8]) -> Vec<u8> {
        let mut p = vec![0x10, 0, 0, 4, b'M', b'Q', b'T', b'T', level, 0x02, 0, 30];
        p.extend_from_slice(props);
        p.extend_from_slice(&[0, 1, b'c']);
        p.extend_from_slice(extra);
        p
    }

    /// [`check_length`] on `packet`, whose remaining-length byte (one byte,
    /// written as 0) is filled in here.
    fn check(packet: &[u8], v5: bool) -> Result<(), LengthError> {
        let mut packet = packet.to_vec();
        packet[1] = u8::try_from(packet.len() - 2).expect("a short packet");
        check_length(packet[0], &packet[2..], v5)
    }

    #[test]
    fn frames_and_limits() {
        assert_eq!(frame(&[], 10), Frame::Incomplete);
        assert_eq!(frame(&[0x30], 10), Frame::Incomplete);
        assert_eq!(
            frame(&[0xc0, 0x00], 10),
            Frame::Complete(Framed {
                byte1: 0xc0,
                len: 2,
                remaining: 0
            })
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
