//! What handlers receive (a task record, an event envelope) and where their
//! answers go.
//!
//! `replyTo` is an event type in the legacy protocol (`embedding.result` →
//! `axion/<pkg>/event/embedding/result`) and a whole topic when it comes as
//! an MQTT 5 Response Topic; both are resolved here, once, so tasks, events
//! and overload refusals reply the same way. Replies are event envelopes
//! (docs/DESIGN.md "Bodies"), so WebSocket clients of the bridge receive them
//! like any other event.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::{Map, Value};

use super::vitals::Vitals;
use axion_wire::queue::TaskRecord;
use axion_wire::topics;

/// A task as the queue owner delivered it (docs/DESIGN.md "Task record").
#[derive(Debug, Clone)]
pub struct Task {
    pub id: String,
    pub queue: String,
    pub payload: Value,
    /// Unix milliseconds.
    pub created_at: u64,
    /// Deliveries including this one.
    pub attempts: u32,
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
    pub(crate) vitals: Arc<Vitals>,
}

impl Task {
    /// Tells the watchdog that this long task is still moving, so a job
    /// longer than `LIVENESS_MAX_STALL_MS` is not mistaken for a hang.
    /// (The queue owner's ack wait is extended automatically.)
    pub fn progress(&self) {
        self.vitals.progress();
    }
}

/// An event as received (docs/DESIGN.md "Event envelope").
#[derive(Debug, Clone)]
pub struct Event {
    /// `t1.t2.…`, from the envelope or, for a bare MQTT payload, the topic.
    pub event_type: String,
    pub source: Option<String>,
    pub payload: Value,
    pub timestamp: Option<String>,
    pub correlation_id: Option<String>,
    /// Where the answer goes: an event type or a whole topic.
    pub reply_to: Option<String>,
    /// The MQTT topic it arrived on.
    pub topic: String,
    pub(crate) vitals: Arc<Vitals>,
}

impl Event {
    /// See [`Task::progress`].
    pub fn progress(&self) {
        self.vitals.progress();
    }
}

/// The handler's view of a task record that arrived on `queue`'s topic.
pub(crate) fn into_task(record: TaskRecord<'_>, queue: &str, vitals: Arc<Vitals>) -> Task {
    Task {
        id: record.id.into_owned(),
        queue: record
            .queue
            .map_or_else(|| queue.to_string(), Cow::into_owned),
        // The record parsed, so its payload is valid JSON.
        payload: serde_json::from_str(record.payload.get()).unwrap_or(Value::Null),
        created_at: record.created_at,
        attempts: record.attempts,
        reply_to: record
            .reply_to
            .map(Cow::into_owned)
            .filter(|r| !r.is_empty()),
        correlation_id: record
            .correlation_id
            .map(Cow::into_owned)
            .filter(|c| !c.is_empty()),
        vitals,
    }
}

/// Where and how to answer one request.
#[derive(Debug, Clone)]
pub(crate) struct ReplyTarget {
    pub topic: String,
    /// The event type of the reply envelope.
    pub event_type: String,
    pub correlation_id: Option<String>,
    /// MQTT 5 Correlation Data to echo.
    pub correlation_data: Option<Bytes>,
}

impl ReplyTarget {
    /// Resolves `reply_to` (an event type, or a topic when it has a `/`).
    /// `None` when there is none or it cannot be a publish topic.
    pub fn resolve(
        package: &str,
        reply_to: Option<&str>,
        correlation_id: Option<String>,
        correlation_data: Option<Bytes>,
    ) -> Option<Self> {
        let reply_to = reply_to.filter(|r| !r.is_empty())?;
        let (topic, event_type) = if reply_to.contains('/') {
            let prefix = format!("axion/{package}/event/");
            let event_type = reply_to
                .strip_prefix(&prefix)
                .map(|t| t.replace('/', "."))
                .unwrap_or_else(|| reply_to.to_string());
            (reply_to.to_string(), event_type)
        } else {
            (topics::event(package, reply_to), reply_to.to_string())
        };
        if topic.contains(['+', '#', '\0']) || topic.starts_with('$') {
            tracing::warn!(
                reply_to,
                "reply target is not a publish topic; no reply sent"
            );
            return None;
        }
        Some(Self {
            topic,
            event_type,
            correlation_id,
            correlation_data,
        })
    }

    /// The reply envelope around `payload`.
    pub fn envelope(&self, source: &str, payload: Value) -> Vec<u8> {
        let mut env = Map::new();
        env.insert("type".into(), Value::String(self.event_type.clone()));
        env.insert("source".into(), Value::String(source.to_string()));
        env.insert("payload".into(), payload);
        env.insert("timestamp".into(), Value::String(now_iso()));
        if let Some(c) = &self.correlation_id {
            env.insert("correlationId".into(), Value::String(c.clone()));
        }
        serde_json::to_vec(&Value::Object(env)).unwrap_or_default()
    }
}

/// Parses what arrived on an event topic: an envelope, or a bare MQTT
/// payload that gets its type from the topic (as the bridge does).
pub(crate) fn parse_event(
    package: &str,
    topic: &str,
    body: &[u8],
    response_topic: Option<String>,
    correlation_data: Option<&Bytes>,
    vitals: Arc<Vitals>,
) -> Event {
    let prefix = format!("axion/{package}/event/");
    let topic_type = topic
        .strip_prefix(&prefix)
        .unwrap_or(topic)
        .replace('/', ".");
    let value: Value = serde_json::from_slice(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()));
    let data_corr = correlation_data.map(|d| String::from_utf8_lossy(d).into_owned());
    let text = |m: &Map<String, Value>, k: &str| {
        m.get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    match value {
        Value::Object(mut m) if m.get("type").is_some_and(Value::is_string) => Event {
            event_type: text(&m, "type").unwrap_or(topic_type),
            source: text(&m, "source"),
            timestamp: text(&m, "timestamp"),
            correlation_id: text(&m, "correlationId").or(data_corr),
            reply_to: response_topic.or_else(|| text(&m, "replyTo")),
            payload: m.remove("payload").unwrap_or(Value::Null),
            topic: topic.to_string(),
            vitals,
        },
        other => Event {
            event_type: topic_type,
            source: None,
            timestamp: None,
            correlation_id: data_corr,
            reply_to: response_topic,
            payload: other,
            topic: topic.to_string(),
            vitals,
        },
    }
}

fn now_iso() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vitals() -> Arc<Vitals> {
        Arc::new(Vitals::new(1, 1))
    }

    #[test]
    fn reply_to_is_an_event_type_or_a_topic() {
        let t = ReplyTarget::resolve("p", Some("embedding.result"), None, None).unwrap();
        assert_eq!(t.topic, "axion/p/event/embedding/result");
        assert_eq!(t.event_type, "embedding.result");
        let t = ReplyTarget::resolve("p", Some("axion/p/event/a/b"), None, None).unwrap();
        assert_eq!(
            (t.topic.as_str(), t.event_type.as_str()),
            ("axion/p/event/a/b", "a.b")
        );
        assert!(ReplyTarget::resolve("p", Some("a.#"), None, None).is_none());
        assert!(ReplyTarget::resolve("p", Some(""), None, None).is_none());
        let body: Value =
            serde_json::from_slice(&t.envelope("svc", serde_json::json!({"x": 1}))).unwrap();
        assert_eq!(body["payload"]["x"], 1);
        assert_eq!(body["source"], "svc");
    }

    #[test]
    fn envelopes_and_bare_payloads_both_parse() {
        let body =
            br#"{"type":"fs.change","payload":{"path":"/a"},"replyTo":"r.t","correlationId":"c1"}"#;
        let e = parse_event("p", "axion/p/event/fs/change", body, None, None, vitals());
        assert_eq!(e.event_type, "fs.change");
        assert_eq!(e.payload["path"], "/a");
        assert_eq!(
            (e.reply_to.as_deref(), e.correlation_id.as_deref()),
            (Some("r.t"), Some("c1"))
        );
        let corr = Bytes::from_static(b"k");
        let e = parse_event(
            "p",
            "axion/p/event/temp",
            b"21.5",
            Some("x/y".into()),
            Some(&corr),
            vitals(),
        );
        assert_eq!(e.event_type, "temp");
        assert_eq!(e.payload, serde_json::json!(21.5));
        assert_eq!(
            (e.reply_to.as_deref(), e.correlation_id.as_deref()),
            (Some("x/y"), Some("k"))
        );
    }
}
