//! A bounded fuzz of the MQTT 3.1.1 and 5 packet decoder clients reach:
//! random bytes, and valid packets mutated (bytes flipped, inserted,
//! dropped, lengths rewritten). Whatever arrives, framing and decoding
//! answer a packet or an error: never a panic, and never one caught
//! inside rumqttd's decoder (the length checks must refuse it first).

use axion_broker::codec::{frame, Codec, DecodeError, Frame};
use bytes::BytesMut;
use proptest::prelude::*;

/// Well-formed client packets, 3.1.1 and 5, to mutate.
fn seeds() -> Vec<(u8, Vec<u8>)> {
    vec![
        // PUBLISH QoS 0, 1 (v4); QoS 1 with properties (v5).
        (
            4,
            vec![0x30, 0x07, 0x00, 0x03, b'a', b'/', b'b', b'h', b'i'],
        ),
        (
            4,
            vec![
                0x32, 0x09, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x01, b'h', b'i',
            ],
        ),
        (
            5,
            vec![
                0x32, 0x10, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x01, 0x05, 0x02, 0x00, 0x00, 0x00,
                0x3C, 0x01, b'h', b'i',
            ],
        ),
        // SUBSCRIBE (v4, v5 with a subscription identifier).
        (
            4,
            vec![0x82, 0x08, 0x00, 0x01, 0x00, 0x03, b'a', b'/', b'#', 0x01],
        ),
        (
            5,
            vec![
                0x82, 0x0B, 0x00, 0x01, 0x02, 0x0B, 0x07, 0x00, 0x03, b'a', b'/', b'#', 0x01,
            ],
        ),
        // UNSUBSCRIBE.
        (
            4,
            vec![0xA2, 0x07, 0x00, 0x02, 0x00, 0x03, b'a', b'/', b'b'],
        ),
        (
            5,
            vec![0xA2, 0x08, 0x00, 0x02, 0x00, 0x00, 0x03, b'a', b'/', b'b'],
        ),
        // PUBACK, PUBREC, PUBREL, PUBCOMP (v5 with reason and properties).
        (4, vec![0x40, 0x02, 0x00, 0x01]),
        (5, vec![0x50, 0x04, 0x00, 0x01, 0x00, 0x00]),
        (
            5,
            vec![0x62, 0x07, 0x00, 0x01, 0x92, 0x03, 0x1F, 0x00, 0x00],
        ),
        (4, vec![0x70, 0x02, 0x00, 0x01]),
        // PINGREQ, DISCONNECT (v5 with session expiry).
        (4, vec![0xC0, 0x00]),
        (
            5,
            vec![0xE0, 0x07, 0x00, 0x05, 0x11, 0x00, 0x00, 0x00, 0x0A],
        ),
    ]
}

/// Frames and decodes everything in `bytes` as a client's stream would be,
/// until it needs more bytes or an error closes the connection.
fn decode_stream(level: u8, bytes: &[u8]) -> Result<(), String> {
    const MAX: usize = 64 * 1024;
    let mut codec = Codec::for_level(level).expect("3.1.1 or 5");
    let mut buf = BytesMut::from(bytes);
    loop {
        let framed = match frame(&buf, MAX) {
            Frame::Complete(f) => f,
            Frame::Incomplete | Frame::TooLarge { .. } | Frame::Malformed => return Ok(()),
        };
        match codec.read(&mut buf, framed, MAX) {
            Ok(_) => {}
            Err(DecodeError::Panicked) => {
                return Err(format!("rumqttd's decoder panicked on {bytes:02X?}"))
            }
            Err(_) => return Ok(()),
        }
    }
}

/// One change to a packet.
#[derive(Debug, Clone)]
enum Mutation {
    Set(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Remove),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn mutate(mut packet: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let n = packet.len().max(1);
        match *m {
            Mutation::Set(i, b) if !packet.is_empty() => packet[i % n] = b,
            Mutation::Insert(i, b) => packet.insert(i % (packet.len() + 1), b),
            Mutation::Remove(i) if !packet.is_empty() => {
                packet.remove(i % n);
            }
            Mutation::Truncate(i) => packet.truncate(i % n),
            _ => {}
        }
    }
    packet
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 20_000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_bytes_never_panic(level in prop_oneof![Just(4u8), Just(5u8)],
                                bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        prop_assert!(decode_stream(level, &bytes).is_ok(), "{:?}", decode_stream(level, &bytes));
    }

    #[test]
    fn mutated_packets_never_panic(seed in 0usize..13,
                                   mutations in proptest::collection::vec(mutation(), 1..6),
                                   behind in proptest::collection::vec(any::<u8>(), 0..16)) {
        let seeds = seeds();
        let (level, packet) = seeds[seed % seeds.len()].clone();
        let mut stream = mutate(packet.clone(), &mutations);
        // A valid packet behind the mutated one, and a few stray bytes.
        stream.extend_from_slice(&packet);
        stream.extend_from_slice(&behind);
        prop_assert!(decode_stream(level, &stream).is_ok(), "{:?}", decode_stream(level, &stream));
    }
}

#[test]
fn every_seed_decodes() {
    for (level, packet) in seeds() {
        let mut codec = Codec::for_level(level).expect("level");
        let mut buf = BytesMut::from(&packet[..]);
        let Frame::Complete(framed) = frame(&buf, 1 << 16) else {
            panic!("seed does not frame: {packet:02X?}");
        };
        codec
            .read(&mut buf, framed, 1 << 16)
            .unwrap_or_else(|e| panic!("seed {packet:02X?} (level {level}): {e}"));
        assert!(buf.is_empty(), "seed {packet:02X?} fills its length");
    }
}
