//! What crossed the broker's sockets since it started: connections,
//! packets, publishes and bytes, each way.
//!
//! Counted where the bytes already pass, a batch at a time: a session adds
//! what one socket read brought and what its packets were once they are
//! decoded, and its writer task adds what one write put on the socket. So
//! the cost is a few relaxed atomic additions per read or write, never a
//! lock and never one per message. `/metrics` and the `$SYS` topics read
//! them (see [`crate::metrics`], [`crate::sys`]).

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Traffic {
    /// Connections accepted on any listener, in total.
    pub connections: AtomicU64,
    /// MQTT control packets of any type, each way (Mosquitto's
    /// `$SYS/broker/messages/…`).
    pub packets_received: AtomicU64,
    pub packets_sent: AtomicU64,
    /// PUBLISH packets, each way.
    pub publishes_received: AtomicU64,
    pub publishes_sent: AtomicU64,
    /// Bytes read from and written to client sockets, MQTT framing included.
    pub bytes_received: AtomicU64,
    pub bytes_sent: AtomicU64,
}

/// A copy of [`Traffic`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrafficSnapshot {
    pub connections: u64,
    pub packets_received: u64,
    pub packets_sent: u64,
    pub publishes_received: u64,
    pub publishes_sent: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
}

impl Traffic {
    /// Packets decoded from one client read: `packets` of which
    /// `publishes` were PUBLISH.
    pub fn decoded(&self, packets: u64, publishes: u64) {
        if packets > 0 {
            self.packets_received.fetch_add(packets, Ordering::Relaxed);
        }
        if publishes > 0 {
            self.publishes_received
                .fetch_add(publishes, Ordering::Relaxed);
        }
    }

    pub fn read(&self, bytes: usize) {
        self.bytes_received
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// One write of whole encoded packets to a client socket.
    pub fn written(&self, bytes: &[u8]) {
        let (packets, publishes) = count_packets(bytes);
        self.bytes_sent
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        self.packets_sent.fetch_add(packets, Ordering::Relaxed);
        if publishes > 0 {
            self.publishes_sent.fetch_add(publishes, Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self) -> TrafficSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        TrafficSnapshot {
            connections: get(&self.connections),
            packets_received: get(&self.packets_received),
            packets_sent: get(&self.packets_sent),
            publishes_received: get(&self.publishes_received),
            publishes_sent: get(&self.publishes_sent),
            bytes_received: get(&self.bytes_received),
            bytes_sent: get(&self.bytes_sent),
        }
    }
}

/// Packets, and PUBLISH packets among them, in a buffer of whole encoded
/// packets: only the fixed headers are read, hopping from one packet to
/// the next by its remaining length. A buffer that ends inside a packet
/// (never handed over by the session) counts what it holds whole.
pub fn count_packets(mut bytes: &[u8]) -> (u64, u64) {
    let (mut packets, mut publishes) = (0, 0);
    while let Some(&byte1) = bytes.first() {
        let mut remaining = 0usize;
        let mut shift = 0;
        let mut i = 1;
        loop {
            let Some(&b) = bytes.get(i) else {
                return (packets, publishes);
            };
            remaining |= usize::from(b & 0x7f) << shift;
            i += 1;
            if b & 0x80 == 0 || i > 4 {
                break;
            }
            shift += 7;
        }
        packets += 1;
        if byte1 >> 4 == 3 {
            publishes += 1;
        }
        bytes = bytes.get(i + remaining..).unwrap_or_default();
    }
    (packets, publishes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_packets_by_their_fixed_headers() {
        // PINGRESP, a PUBLISH of 3 bytes, a PUBACK.
        let mut b = vec![0xd0, 0x00, 0x30, 0x03, b'a', b'b', b'c', 0x40, 0x02, 0, 1];
        assert_eq!(count_packets(&b), (3, 1));
        // A PUBLISH whose remaining length takes two bytes (200).
        b.extend([0x32, 0xc8, 0x01]);
        b.extend(std::iter::repeat_n(0u8, 200));
        assert_eq!(count_packets(&b), (4, 2));
        assert_eq!(count_packets(&[]), (0, 0));
        // Cut inside a length: what is whole is counted.
        assert_eq!(count_packets(&[0xd0, 0x00, 0x30]), (1, 0));
    }

    #[test]
    fn written_adds_bytes_packets_and_publishes() {
        let t = Traffic::default();
        t.written(&[0x30, 0x03, b'a', b'b', b'c', 0xd0, 0x00]);
        t.decoded(2, 1);
        t.read(7);
        let s = t.snapshot();
        assert_eq!((s.bytes_sent, s.packets_sent, s.publishes_sent), (7, 2, 1));
        assert_eq!(
            (s.bytes_received, s.packets_received, s.publishes_received),
            (7, 2, 1)
        );
    }
}
