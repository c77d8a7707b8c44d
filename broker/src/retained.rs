//! Retained messages, kept by the front end instead of rumqttd's router.
//!
//! The router sends a new subscriber at most one read batch of retained
//! messages (100 for a QoS 1 subscription) and drops the rest, so a
//! dashboard subscribing to `axion/+/heartbeat/+/+` would see only part of
//! the fleet. It also clears a retained message on any empty publish, even
//! without the retain flag, and ignores MQTT 5 retain handling. Axion keeps
//! retained messages here, bounded in count and bytes, and hands the router
//! only live traffic.

use std::collections::HashMap;
use std::time::Instant;

use bytes::Bytes;
use rumqttd::protocol::PublishProperties;

/// One retained message, stored under its router-form (escaped) topic.
#[derive(Debug, Clone)]
pub struct Retained {
    pub payload: Bytes,
    pub qos: u8,
    /// Boxed: most retained messages have none, and the inline struct
    /// would cost every entry a few hundred bytes.
    pub properties: Option<Box<PublishProperties>>,
    stored: Instant,
}

impl Retained {
    /// A message with no properties, stored now.
    pub fn new(payload: Bytes, qos: u8) -> Self {
        Self {
            payload,
            qos,
            properties: None,
            stored: Instant::now(),
        }
    }
}

/// What happened to a retained publish.
#[derive(Debug, PartialEq, Eq)]
pub enum Stored {
    Kept,
    Cleared,
    /// The store is full: the message was delivered but not retained.
    Refused,
}

#[derive(Debug)]
pub struct RetainedStore {
    map: HashMap<Bytes, Retained>,
    bytes: usize,
    max_messages: usize,
    max_bytes: usize,
    pub refused_total: u64,
}

impl RetainedStore {
    pub fn new(max_messages: usize, max_bytes: usize) -> Self {
        Self {
            map: HashMap::new(),
            bytes: 0,
            max_messages,
            max_bytes,
            refused_total: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Stores (or, for an empty payload, clears) the retained message of `topic`.
    pub fn store(
        &mut self,
        topic: Bytes,
        payload: Bytes,
        qos: u8,
        properties: Option<PublishProperties>,
    ) -> Stored {
        if let Some(old) = self.map.remove(&topic) {
            self.bytes -= topic.len() + old.payload.len();
        }
        if payload.is_empty() {
            return Stored::Cleared;
        }
        let size = topic.len() + payload.len();
        if self.map.len() >= self.max_messages || self.bytes + size > self.max_bytes {
            self.refused_total += 1;
            return Stored::Refused;
        }
        self.bytes += size;
        // Copies, not the views the session decoded: those share the read
        // buffer their packet came in with everything else in that read,
        // which a message kept for days would hold in memory beyond what
        // the bounds above count.
        let (topic, payload) = (
            Bytes::copy_from_slice(&topic),
            Bytes::copy_from_slice(&payload),
        );
        let retained = Retained {
            payload,
            qos,
            properties: properties.map(Box::new),
            stored: Instant::now(),
        };
        self.map.insert(topic, retained);
        Stored::Kept
    }

    /// Puts back a message read from disk at start, stored `age` ago (its
    /// expiry keeps counting from then). Past the bounds it is skipped.
    pub fn restore(
        &mut self,
        topic: Bytes,
        payload: Bytes,
        qos: u8,
        properties: Option<PublishProperties>,
        age: std::time::Duration,
    ) -> bool {
        if self.store(topic.clone(), payload, qos, properties) != Stored::Kept {
            return false;
        }
        if let Some(r) = self.map.get_mut(&topic) {
            r.stored = Instant::now().checked_sub(age).unwrap_or(r.stored);
        }
        true
    }

    /// Retained messages matching a router-form filter, with their message
    /// expiry counted down; expired ones are dropped on the way.
    pub fn matching(&mut self, filter: &str) -> Vec<(Bytes, Retained)> {
        let now = Instant::now();
        let mut expired = Vec::new();
        let mut out = Vec::new();
        for (topic, retained) in &self.map {
            let Ok(topic_str) = std::str::from_utf8(topic) else {
                continue;
            };
            if !rumqttd::protocol::matches(topic_str, filter) {
                continue;
            }
            let mut retained = retained.clone();
            if let Some(props) = retained.properties.as_mut() {
                if let Some(expiry) = props.message_expiry_interval {
                    let age = now.duration_since(retained.stored).as_secs();
                    if age >= u64::from(expiry) {
                        expired.push(topic.clone());
                        continue;
                    }
                    // MQTT-3.3.2-6: the receiver sees the time left.
                    props.message_expiry_interval = Some(expiry - age as u32);
                }
            }
            out.push((topic.clone(), retained));
        }
        for topic in expired {
            if let Some(old) = self.map.remove(&topic) {
                self.bytes -= topic.len() + old.payload.len();
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_clears_and_bounds() {
        let mut store = RetainedStore::new(2, 1024);
        assert_eq!(
            store.store(Bytes::from("a/b"), Bytes::from("1"), 1, None),
            Stored::Kept
        );
        assert_eq!(
            store.store(Bytes::from("a/c"), Bytes::from("2"), 0, None),
            Stored::Kept
        );
        assert_eq!(
            store.store(Bytes::from("a/d"), Bytes::from("3"), 0, None),
            Stored::Refused
        );
        // Replacing an existing topic is always allowed.
        assert_eq!(
            store.store(Bytes::from("a/b"), Bytes::from("10"), 1, None),
            Stored::Kept
        );
        assert_eq!(store.matching("a/+").len(), 2);
        assert_eq!(
            store.store(Bytes::from("a/b"), Bytes::new(), 1, None),
            Stored::Cleared
        );
        let left = store.matching("#");
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].1.payload, Bytes::from("2"));
    }

    #[test]
    fn expired_messages_are_not_delivered() {
        let mut store = RetainedStore::new(10, 1024);
        let props = PublishProperties {
            message_expiry_interval: Some(0),
            ..Default::default()
        };
        store.store(Bytes::from("x"), Bytes::from("gone"), 0, Some(props));
        assert!(store.matching("x").is_empty());
        assert!(store.is_empty());
    }

    #[test]
    fn a_retained_message_does_not_hold_the_buffer_it_arrived_in() {
        let mut store = RetainedStore::new(10, 1024 * 1024);
        // Topic and payload decoded from one read with 64 KiB more in it.
        let mut read = vec![b'x'; 64 * 1024];
        read[..3].copy_from_slice(b"a/b");
        let read = Bytes::from(read);
        let (topic, payload) = (read.slice(..3), read.slice(3..8));
        drop(read);
        store.store(topic.clone(), payload.clone(), 1, None);
        drop(payload);
        assert!(
            topic.is_unique(),
            "the store holds on to the read buffer its message came in"
        );
        assert_eq!(store.matching("a/b")[0].1.payload, Bytes::from("xxxxx"));
    }
}
