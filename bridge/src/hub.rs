//! Which MQTT filters the bridge wants, who wants each, and the fan-out of
//! every event that arrives on one.
//!
//! All WebSocket clients share one MQTT connection. Each distinct filter is
//! one MQTT subscription, reference-counted by the clients that asked for
//! it (subscribed on the first, unsubscribed after the last) and tagged
//! with its own MQTT 5 Subscription Identifier. A message therefore names
//! the subscriptions it matched, and goes once to each client of each of
//! them: the JSON frame is built once and shared, whether the broker sends
//! one copy listing several identifiers (Mosquitto) or one copy per
//! subscription (rumqttd). A client holding two overlapping patterns gets
//! the event once per pattern, as an MQTT client would.
//!
//! Events the bridge's own WebSocket clients publish are fanned out here
//! directly ([`Hub::dispatch_local`]) rather than after a round trip
//! through the broker: the event subscriptions are No Local, so the broker
//! does not send the bridge its own publishes back. That saves the return
//! trip's decode, copy and wake-ups on every event, and the latency of it.
//!
//! The number of distinct filters is bounded: the embedded rumqttd never
//! frees a filter once created (about 7 KB each), so an unbounded number of
//! distinct legacy topics would grow the broker forever.

use crate::client::{ClientHandle, Metrics, Offer};
use crate::protocol;
use axum::extract::ws::Utf8Bytes;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::v5::mqttbytes::QoS;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

/// Largest MQTT 5 Subscription Identifier (a variable byte integer).
const MAX_SUBSCRIPTION_ID: usize = 268_435_455;

/// `source` of an event that a plain MQTT device published without one.
pub const MQTT_SOURCE: &str = "mqtt";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubscribeError {
    #[error(
        "too many distinct subscriptions on this bridge (limit {0}); unsubscribe from some first"
    )]
    TooManyFilters(usize),
}

struct Entry {
    id: usize,
    qos: QoS,
    /// Event filters are No Local: the bridge delivers its own clients'
    /// events to its clients itself (see [`Hub::dispatch_local`]).
    no_local: bool,
    clients: HashMap<u64, Arc<ClientHandle>>,
    /// Held by the bridge itself (task queues, replies), whoever is connected.
    pinned: bool,
}

#[derive(Default)]
struct Registry {
    filters: HashMap<String, Entry>,
    by_id: HashMap<usize, String>,
    /// The filters with `+` or `#`: the only ones a topic must be matched
    /// against one by one; any other filter matches just the equal topic.
    wildcards: Vec<String>,
    next_id: usize,
}

impl Registry {
    fn allocate_id(&mut self) -> usize {
        loop {
            self.next_id = if self.next_id >= MAX_SUBSCRIPTION_ID {
                1
            } else {
                self.next_id + 1
            };
            if !self.by_id.contains_key(&self.next_id) {
                return self.next_id;
            }
        }
    }

    fn remove(&mut self, filter: &str) {
        if let Some(entry) = self.filters.remove(filter) {
            self.by_id.remove(&entry.id);
            self.wildcards.retain(|w| w != filter);
        }
    }

    fn entry(&mut self, filter: &str, qos: QoS, max: usize) -> Result<&mut Entry, SubscribeError> {
        if !self.filters.contains_key(filter) {
            if self.filters.len() >= max {
                return Err(SubscribeError::TooManyFilters(max));
            }
            let id = self.allocate_id();
            self.by_id.insert(id, filter.to_string());
            if filter.contains(['+', '#']) {
                self.wildcards.push(filter.to_string());
            }
            self.filters.insert(
                filter.to_string(),
                Entry {
                    id,
                    qos,
                    no_local: false,
                    clients: HashMap::new(),
                    pinned: false,
                },
            );
        }
        self.filters
            .get_mut(filter)
            .ok_or(SubscribeError::TooManyFilters(max))
    }
}

/// The MQTT subscription a filter needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wanted {
    /// Its Subscription Identifier.
    pub id: usize,
    pub qos: QoS,
    pub no_local: bool,
}

pub struct Hub {
    /// `axion/<pkg>/event/`
    pub event_prefix: String,
    max_filters: usize,
    registry: Mutex<Registry>,
    pub metrics: Arc<Metrics>,
}

impl Hub {
    pub fn new(package: &str, max_filters: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            event_prefix: format!("axion/{package}/event/"),
            max_filters,
            registry: Mutex::new(Registry::default()),
            metrics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        // A panic while holding this lock cannot leave the maps half-updated
        // in a way that matters more than stopping fan-out for everyone.
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The MQTT filter of a legacy pattern (`fs.+` → `axion/<pkg>/event/fs/+`).
    pub fn event_filter(&self, pattern: &str) -> String {
        protocol::type_to_topic(&self.event_prefix, pattern)
    }

    /// Adds `client` to `filter`'s subscribers.
    pub fn subscribe(
        &self,
        filter: &str,
        client: &Arc<ClientHandle>,
    ) -> Result<(), SubscribeError> {
        let mut reg = self.lock();
        let entry = reg.entry(filter, QoS::AtMostOnce, self.max_filters)?;
        entry.no_local = true;
        entry.clients.insert(client.key, client.clone());
        Ok(())
    }

    /// Removes a client from `filter`; the entry goes when nobody holds it.
    pub fn unsubscribe(&self, filter: &str, key: u64) {
        let mut reg = self.lock();
        let remove = match reg.filters.get_mut(filter) {
            Some(entry) => {
                entry.clients.remove(&key);
                entry.clients.is_empty() && !entry.pinned
            }
            None => false,
        };
        if remove {
            reg.remove(filter);
        }
    }

    /// Keeps `filter` subscribed for the bridge's lifetime.
    pub fn pin(&self, filter: &str, qos: QoS) -> Result<(), SubscribeError> {
        let mut reg = self.lock();
        let entry = reg.entry(filter, qos, self.max_filters)?;
        entry.pinned = true;
        entry.qos = qos;
        Ok(())
    }

    /// What the MQTT side should hold for `filter`, or `None` when nobody
    /// wants it.
    pub fn desired(&self, filter: &str) -> Option<Wanted> {
        self.lock().filters.get(filter).map(|e| Wanted {
            id: e.id,
            qos: e.qos,
            no_local: e.no_local,
        })
    }

    pub fn all_filters(&self) -> Vec<String> {
        self.lock().filters.keys().cloned().collect()
    }

    pub fn filter_count(&self) -> usize {
        self.lock().filters.len()
    }

    /// Fans an event-topic message out to the WebSocket subscribers it
    /// matched. Never blocks: full client queues disconnect their client.
    pub fn dispatch_event(&self, topic: &str, payload: &[u8], props: Option<&PublishProperties>) {
        let Some(frame) = self.event_frame(topic, payload, props) else {
            return;
        };
        let ids = props
            .map(|p| p.subscription_identifiers.as_slice())
            .unwrap_or(&[]);
        let reg = self.lock();
        let mut delivered = 0;
        if ids.is_empty() {
            // A broker without Subscription Identifiers: match locally.
            for (filter, entry) in &reg.filters {
                if rumqttc::v5::mqttbytes::matches(topic, filter) {
                    delivered += self.deliver(entry, &frame);
                }
            }
        }
        for id in ids {
            if let Some(entry) = reg.by_id.get(id).and_then(|f| reg.filters.get(f)) {
                delivered += self.deliver(entry, &frame);
            }
        }
        drop(reg);
        self.metrics
            .events_delivered
            .fetch_add(delivered, Ordering::Relaxed);
    }

    /// Fans a frame for `topic` out to every client whose filter matches
    /// it, once per matching filter (as the broker would). Used for the
    /// events this bridge's own clients publish, which the broker does not
    /// send back to it (No Local). Clients whose queue is full are
    /// returned, for the caller to wait on (see `client.rs`).
    pub fn dispatch_local(&self, topic: &str, frame: &Utf8Bytes) -> Vec<Arc<ClientHandle>> {
        let reg = self.lock();
        let mut full = Vec::new();
        let mut delivered = 0;
        let mut deliver = |entry: &Entry| {
            for client in entry.clients.values() {
                match client.offer(frame.clone()) {
                    Offer::Queued => delivered += 1,
                    Offer::Full(_) => full.push(client.clone()),
                    Offer::Gone => {}
                }
            }
        };
        if let Some(entry) = reg.filters.get(topic) {
            deliver(entry);
        }
        for filter in &reg.wildcards {
            if rumqttc::v5::mqttbytes::matches(topic, filter) {
                if let Some(entry) = reg.filters.get(filter) {
                    deliver(entry);
                }
            }
        }
        drop(reg);
        self.metrics
            .events_delivered
            .fetch_add(delivered, Ordering::Relaxed);
        full
    }

    fn deliver(&self, entry: &Entry, frame: &Utf8Bytes) -> u64 {
        let mut delivered = 0;
        for client in entry.clients.values() {
            if client.send(frame.clone(), &self.metrics) {
                delivered += 1;
            }
        }
        delivered
    }

    /// `{"event": <envelope>}` for a message on an event topic. The bridge's
    /// own (complete) envelopes pass through byte for byte; anything else
    /// is completed or wrapped as docs/DESIGN.md says.
    pub fn event_frame(
        &self,
        topic: &str,
        payload: &[u8],
        props: Option<&PublishProperties>,
    ) -> Option<Utf8Bytes> {
        let event_type = protocol::topic_to_type(&self.event_prefix, topic)?;
        let corr = props.and_then(|p| p.correlation_data.as_ref());
        let response = props.and_then(|p| p.response_topic.as_deref());
        if let Ok(text) = std::str::from_utf8(payload) {
            if let Ok(probe) = serde_json::from_str::<Probe>(text) {
                if probe.is_complete(corr.is_some(), response.is_some()) {
                    return Some(wrap_frame(text));
                }
            }
        }
        let mut envelope = match serde_json::from_slice::<Value>(payload) {
            Ok(Value::Object(obj)) if matches!(obj.get("type"), Some(Value::String(_))) => obj,
            parsed => {
                let payload = match parsed {
                    Ok(v) => v,
                    Err(_) => Value::String(String::from_utf8_lossy(payload).into_owned()),
                };
                let mut obj = Map::new();
                obj.insert("type".into(), Value::String(event_type));
                obj.insert("payload".into(), payload);
                obj
            }
        };
        if !protocol::truthy(envelope.get("source")) {
            envelope.insert("source".into(), Value::String(MQTT_SOURCE.into()));
        }
        if !protocol::truthy(envelope.get("timestamp")) {
            envelope.insert("timestamp".into(), Value::String(protocol::now_iso()));
        }
        if let (Some(corr), false) = (corr, protocol::truthy(envelope.get("correlationId"))) {
            envelope.insert(
                "correlationId".into(),
                Value::String(String::from_utf8_lossy(corr).into_owned()),
            );
        }
        if let (Some(topic), false) = (response, protocol::truthy(envelope.get("replyTo"))) {
            let reply = protocol::topic_to_type(&self.event_prefix, topic)
                .unwrap_or_else(|| topic.to_string());
            envelope.insert("replyTo".into(), Value::String(reply));
        }
        let text = serde_json::to_string(&Value::Object(envelope)).ok()?;
        Some(wrap_frame(&text))
    }
}

fn wrap_frame(envelope_json: &str) -> Utf8Bytes {
    let mut s = String::with_capacity(envelope_json.len() + 10);
    s.push_str("{\"event\":");
    s.push_str(envelope_json);
    s.push('}');
    Utf8Bytes::from(s)
}

/// Just enough of an envelope to know it needs no change.
#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(rename = "type", borrow)]
    ty: Option<&'a RawValue>,
    #[serde(borrow)]
    source: Option<&'a RawValue>,
    #[serde(borrow)]
    timestamp: Option<&'a RawValue>,
    #[serde(rename = "correlationId", borrow)]
    correlation_id: Option<&'a RawValue>,
    #[serde(rename = "replyTo", borrow)]
    reply_to: Option<&'a RawValue>,
}

impl Probe<'_> {
    fn is_complete(&self, has_corr_prop: bool, has_response_prop: bool) -> bool {
        let truthy = |v: Option<&RawValue>| {
            v.is_some_and(|r| !matches!(r.get(), "null" | "false" | "0" | "\"\"" | "-0"))
        };
        self.ty.is_some_and(|t| t.get().starts_with('"'))
            && truthy(self.source)
            && truthy(self.timestamp)
            && (!has_corr_prop || truthy(self.correlation_id))
            && (!has_response_prop || truthy(self.reply_to))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> Hub {
        Hub::new("p", 2, Arc::new(Metrics::default()))
    }

    fn event(frame: Utf8Bytes) -> Value {
        let v: Value = serde_json::from_str(frame.as_str()).unwrap();
        v["event"].clone()
    }

    #[test]
    fn complete_envelopes_pass_through() {
        let h = hub();
        let raw = r#"{"type":"a.b","source":"s","payload":1,"timestamp":"t"}"#;
        let f = h
            .event_frame("axion/p/event/a/b", raw.as_bytes(), None)
            .unwrap();
        assert_eq!(f.as_str(), format!("{{\"event\":{raw}}}"));
    }

    #[test]
    fn plain_payloads_are_wrapped() {
        let h = hub();
        let e = event(
            h.event_frame("axion/p/event/fs/change", b"{\"x\":1}", None)
                .unwrap(),
        );
        assert_eq!(e["type"], "fs.change");
        assert_eq!(e["payload"]["x"], 1);
        assert_eq!(e["source"], MQTT_SOURCE);
        let e = event(h.event_frame("axion/p/event/t", b"hello", None).unwrap());
        assert_eq!(e["payload"], "hello");
        let props = PublishProperties {
            correlation_data: Some(bytes::Bytes::from_static(b"c1")),
            response_topic: Some("axion/p/event/reply/here".into()),
            ..Default::default()
        };
        let e = event(
            h.event_frame("axion/p/event/t", b"5", Some(&props))
                .unwrap(),
        );
        assert_eq!(e["payload"], 5);
        assert_eq!(e["correlationId"], "c1");
        assert_eq!(e["replyTo"], "reply.here");
        assert!(h.event_frame("axion/p/queue/q/tasks", b"1", None).is_none());
    }

    #[test]
    fn filters_are_bounded_and_refcounted() {
        let h = hub();
        let (tx, _rx) = tokio::sync::mpsc::channel(4);
        let c = Arc::new(ClientHandle::new(
            1,
            "c".into(),
            tx,
            1 << 20,
            Default::default(),
        ));
        h.subscribe("a", &c).unwrap();
        h.subscribe("b", &c).unwrap();
        assert_eq!(h.subscribe("c", &c), Err(SubscribeError::TooManyFilters(2)));
        h.unsubscribe("a", 1);
        assert!(h.desired("a").is_none());
        assert!(h.subscribe("c", &c).is_ok());
    }
}
