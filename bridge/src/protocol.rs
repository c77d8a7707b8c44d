//! The legacy WebSocket JSON protocol (docs/DESIGN.md, "The legacy WebSocket
//! protocol"): parsing one text frame into a [`Request`], and the event-type
//! rules that map legacy types onto MQTT topic levels.
//!
//! Kept free of I/O so the parser can be property-tested and fuzzed on its
//! own: whatever bytes a client sends, [`parse_frame`] returns a request or
//! a [`FrameError`] whose text goes back to the client as `{"error": …}`.
//! The two messages the legacy broker sent (`invalid json`, `unknown
//! action`) are kept word for word; every other error names the field.

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::fmt;

/// Longest event type accepted, in bytes. Topics are length-prefixed with
/// 16 bits in MQTT, and no sane event type comes near this.
pub const MAX_TYPE_LEN: usize = 1024;

/// One client request, validated. It borrows from the frame's text: an
/// event's payload is carried as the client wrote it, never parsed into a
/// tree and written out again.
#[derive(Debug, Clone, PartialEq)]
pub enum Request<'a> {
    /// `topic` is a legacy event pattern (`fs.change`, `fs.+`, `fs.#`).
    Subscribe {
        topic: String,
    },
    Unsubscribe {
        topic: String,
    },
    /// The client's envelope; its `type` is already validated.
    Publish {
        message: Message<'a>,
    },
    /// `task` is the payload (JSON `null` when the client sent none, as the
    /// legacy `JSON.stringify` drops an `undefined` task).
    Enqueue {
        queue: String,
        task: Value,
    },
    /// Both `pull` and `ready`: take one task from `queue`.
    Pull {
        queue: String,
    },
    Ack {
        task_id: String,
    },
    Fail {
        task_id: String,
        reason: Option<String>,
    },
    /// The client says it is alive; nothing to do beyond reading it.
    Heartbeat,
}

/// Why a frame was refused; `Display` is the text of the `error` reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("invalid json")]
    InvalidJson,
    #[error("frame must be a JSON object")]
    NotAnObject,
    #[error("unknown action")]
    UnknownAction(String),
    #[error("missing field \"{0}\"")]
    Missing(&'static str),
    #[error("field \"{field}\" must be {expected}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
    },
    #[error("field \"{field}\" {problem}")]
    BadValue {
        field: &'static str,
        problem: String,
    },
}

impl FrameError {
    /// The `{"error": …}` reply, with the offending action name beside the
    /// legacy text so the legacy string stays exact.
    pub fn reply(&self) -> Value {
        let mut obj = Map::new();
        obj.insert("error".into(), Value::String(self.to_string()));
        if let FrameError::UnknownAction(action) = self {
            obj.insert("action".into(), Value::String(action.clone()));
        }
        Value::Object(obj)
    }
}

/// A JSON object's members as written: keys decoded, values left as raw
/// text. A key given twice keeps its last value, as `JSON.parse` does.
struct Object<'a> {
    members: Vec<(Cow<'a, str>, &'a RawValue)>,
    /// A frame's `message`, parsed in the same pass as the frame so that an
    /// event's payload is scanned once (top level only).
    message: Option<Box<Document<'a>>>,
}

impl<'a> Object<'a> {
    fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.members
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| *v)
    }

    /// Like `get`, with JSON `null` read as absent.
    fn present(&self, key: &str) -> Option<&'a RawValue> {
        self.get(key).filter(|v| v.get() != "null")
    }
}

/// Any JSON value, reduced to whether it is an object (or null).
enum Document<'a> {
    Object(Object<'a>),
    Null,
    Other,
}

impl<'de> Deserialize<'de> for Document<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DocumentVisitor { frame: false })
    }
}

/// A whole frame: a [`Document`] whose `message` member is parsed too.
struct Frame<'a>(Document<'a>);

impl<'de> Deserialize<'de> for Frame<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DocumentVisitor { frame: true })
            .map(Frame)
    }
}

struct DocumentVisitor {
    frame: bool,
}

impl<'de> Visitor<'de> for DocumentVisitor {
    type Value = Document<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut members = Vec::new();
        let mut message = None;
        while let Some(Key(k)) = map.next_key()? {
            if self.frame && k == "message" {
                message = Some(Box::new(map.next_value::<Document<'de>>()?));
            } else {
                members.push((k, map.next_value::<&'de RawValue>()?));
            }
        }
        Ok(Document::Object(Object { members, message }))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Document::Other)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Document::Other)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Document::Other)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Document::Other)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Document::Other)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Document::Other)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Document::Null)
    }
}

/// A JSON string, borrowed when it has no escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(s.to_owned())))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(s)))
            }
        }
        d.deserialize_str(V)
    }
}

/// How deeply arrays and objects may nest in a frame: serde_json's own
/// limit, which the raw values (scanned, not parsed) would not enforce.
const MAX_DEPTH: usize = 128;

/// Whether `text` nests arrays and objects deeper than [`MAX_DEPTH`]
/// (brackets inside strings do not count).
fn too_deep(text: &str) -> bool {
    // Fast path for nearly every frame: too few brackets to nest that deep.
    let opening = text.bytes().filter(|&b| b == b'[' || b == b'{').count();
    if opening <= MAX_DEPTH {
        return false;
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for b in text.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

fn frame_object(text: &str) -> Result<Object<'_>, FrameError> {
    match serde_json::from_str::<Frame>(text) {
        Ok(Frame(Document::Object(o))) => Ok(o),
        Ok(_) => Err(FrameError::NotAnObject),
        Err(_) => Err(FrameError::InvalidJson),
    }
}

/// The text of a raw JSON string, or `None` when it is not a string.
fn raw_str(raw: &RawValue) -> Option<Cow<'_, str>> {
    if !raw.get().starts_with('"') {
        return None;
    }
    serde_json::from_str::<Key>(raw.get()).ok().map(|k| k.0)
}

/// JavaScript truthiness of a raw JSON value (see [`truthy`]).
fn raw_truthy(raw: &RawValue) -> bool {
    match raw.get() {
        "null" | "false" | "\"\"" => false,
        t if t.starts_with(|c: char| c == '-' || c.is_ascii_digit()) => {
            t.parse::<f64>().is_ok_and(|f| f != 0.0)
        }
        _ => true,
    }
}

/// A published envelope, as the client wrote it. Only the fields the
/// legacy broker kept are looked at; the payload is never parsed.
#[derive(Debug, Clone)]
pub struct Message<'a> {
    /// The validated event type, decoded.
    pub event_type: Cow<'a, str>,
    raw_type: &'a RawValue,
    source: Option<&'a RawValue>,
    payload: Option<&'a RawValue>,
    timestamp: Option<&'a RawValue>,
    correlation_id: Option<&'a RawValue>,
    reply_to: Option<&'a RawValue>,
}

/// Equal when written alike (raw values compare as text).
impl PartialEq for Message<'_> {
    fn eq(&self, other: &Self) -> bool {
        let text = |m: &Self| {
            [
                Some(m.raw_type),
                m.source,
                m.payload,
                m.timestamp,
                m.correlation_id,
                m.reply_to,
            ]
            .map(|r| r.map(RawValue::get))
        };
        self.event_type == other.event_type && text(self) == text(other)
    }
}

/// What the bridge sends for a published event: the `{"event": …}` frame
/// for WebSocket subscribers, whose inner envelope is also the MQTT payload.
#[derive(Debug)]
pub struct Event {
    /// `{"event":<envelope>}`
    pub frame: String,
    /// The Correlation Data property: `correlationId`'s text when it is a
    /// string, its JSON otherwise.
    pub correlation: Option<Vec<u8>>,
    /// `replyTo` when it is a string (for the Response Topic property).
    pub reply_to: Option<String>,
}

/// Where the envelope sits inside [`Event::frame`].
pub const FRAME_PREFIX: &str = "{\"event\":";

impl Event {
    /// The envelope alone: the frame without `{"event":` and `}`.
    pub fn envelope_range(&self) -> std::ops::Range<usize> {
        FRAME_PREFIX.len()..self.frame.len() - 1
    }
}

impl Message<'_> {
    /// The event's `payload` as sent, if any.
    pub fn payload(&self) -> Option<&RawValue> {
        self.payload
    }

    /// The legacy `normalize`: keeps `type`, `source`, `payload`,
    /// `timestamp` and the truthy `correlationId`/`replyTo`, in that order;
    /// fills `source` with the sender's id and `timestamp` with now when
    /// they are falsy.
    pub fn normalize(&self, sender: &str) -> Event {
        let mut quoted = String::with_capacity(sender.len() + 2);
        push_json_str(&mut quoted, sender);
        self.normalize_quoted(&quoted)
    }

    /// [`Message::normalize`] with the sender's id already a JSON string
    /// (quoted and escaped), as a connection keeps it for all its events.
    pub fn normalize_quoted(&self, sender_json: &str) -> Event {
        let extra = self.payload.map_or(0, |p| p.get().len());
        let mut f = String::with_capacity(160 + extra);
        f.push_str(FRAME_PREFIX);
        f.push_str("{\"type\":");
        f.push_str(self.raw_type.get());
        f.push_str(",\"source\":");
        match self.source.filter(|s| raw_truthy(s)) {
            Some(s) => f.push_str(s.get()),
            None => f.push_str(sender_json),
        }
        if let Some(p) = self.payload {
            f.push_str(",\"payload\":");
            f.push_str(p.get());
        }
        f.push_str(",\"timestamp\":");
        match self.timestamp.filter(|t| raw_truthy(t)) {
            Some(t) => f.push_str(t.get()),
            // Written in place: no escaping needed, no String of its own.
            None => {
                use std::fmt::Write;
                f.push('"');
                let _ = write!(f, "{}", now_rfc3339());
                f.push('"');
            }
        }
        let correlation = self.correlation_id.filter(|c| raw_truthy(c));
        if let Some(c) = correlation {
            f.push_str(",\"correlationId\":");
            f.push_str(c.get());
        }
        let reply = self.reply_to.filter(|r| raw_truthy(r));
        if let Some(r) = reply {
            f.push_str(",\"replyTo\":");
            f.push_str(r.get());
        }
        f.push_str("}}");
        Event {
            frame: f,
            correlation: correlation.map(|c| match raw_str(c) {
                Some(text) => text.into_owned().into_bytes(),
                None => c.get().as_bytes().to_vec(),
            }),
            reply_to: reply.and_then(raw_str).map(Cow::into_owned),
        }
    }
}

fn push_json_str(out: &mut String, s: &str) {
    // Client ids (UUIDs) and timestamps need no escaping: no allocation.
    if !s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
        out.push('"');
        out.push_str(s);
        out.push('"');
        return;
    }
    match serde_json::to_string(s) {
        Ok(quoted) => out.push_str(&quoted),
        // Serializing a &str cannot fail; an empty string keeps the JSON valid.
        Err(_) => out.push_str("\"\""),
    }
}

/// Parses one text frame.
pub fn parse_frame(text: &str) -> Result<Request<'_>, FrameError> {
    // The message and every other value are inside the frame: one check.
    if too_deep(text) {
        return Err(FrameError::InvalidJson);
    }
    let mut obj = frame_object(text)?;
    let action = match obj.present("action") {
        None => return Err(FrameError::Missing("action")),
        Some(raw) => raw_str(raw).ok_or(FrameError::WrongType {
            field: "action",
            expected: "a string",
        })?,
    };
    match &*action {
        "subscribe" | "unsubscribe" => {
            let topic = string_field(&obj, "topic")?;
            validate_pattern(&topic).map_err(|problem| FrameError::BadValue {
                field: "topic",
                problem,
            })?;
            Ok(if action == "subscribe" {
                Request::Subscribe { topic }
            } else {
                Request::Unsubscribe { topic }
            })
        }
        "publish" => {
            let message = match obj.message.take().map(|m| *m) {
                None | Some(Document::Null) => return Err(FrameError::Missing("message")),
                Some(Document::Other) => {
                    return Err(FrameError::WrongType {
                        field: "message",
                        expected: "an object (the event envelope)",
                    })
                }
                Some(Document::Object(message)) => message,
            };
            let raw_type = message
                .present("type")
                .ok_or(FrameError::Missing("message.type"))?;
            let event_type = raw_str(raw_type).ok_or(FrameError::WrongType {
                field: "message.type",
                expected: "a string",
            })?;
            validate_type(&event_type).map_err(|problem| FrameError::BadValue {
                field: "message.type",
                problem,
            })?;
            Ok(Request::Publish {
                message: Message {
                    event_type,
                    raw_type,
                    source: message.get("source"),
                    payload: message.get("payload"),
                    timestamp: message.get("timestamp"),
                    correlation_id: message.get("correlationId"),
                    reply_to: message.get("replyTo"),
                },
            })
        }
        "enqueue" => {
            let queue = queue_field(&obj)?;
            let task = match obj.get("task") {
                Some(raw) => {
                    serde_json::from_str(raw.get()).map_err(|_| FrameError::InvalidJson)?
                }
                None => Value::Null,
            };
            Ok(Request::Enqueue { queue, task })
        }
        "pull" | "ready" => Ok(Request::Pull {
            queue: queue_field(&obj)?,
        }),
        "ack" => Ok(Request::Ack {
            task_id: task_id_field(&obj)?,
        }),
        "fail" => {
            let task_id = task_id_field(&obj)?;
            let reason = match obj.present("reason") {
                None => None,
                Some(raw) => Some(
                    raw_str(raw)
                        .ok_or(FrameError::WrongType {
                            field: "reason",
                            expected: "a string",
                        })?
                        .into_owned(),
                ),
            };
            Ok(Request::Fail { task_id, reason })
        }
        "heartbeat" => Ok(Request::Heartbeat),
        _ => Err(FrameError::UnknownAction(action.into_owned())),
    }
}

fn string_field(obj: &Object, field: &'static str) -> Result<String, FrameError> {
    let raw = obj.present(field).ok_or(FrameError::Missing(field))?;
    raw_str(raw)
        .map(Cow::into_owned)
        .ok_or(FrameError::WrongType {
            field,
            expected: "a string",
        })
}

fn queue_field(obj: &Object) -> Result<String, FrameError> {
    let queue = string_field(obj, "queue")?;
    axion_wire::topics::validate_level("queue", &queue).map_err(|e| FrameError::BadValue {
        field: "queue",
        problem: match e {
            axion_wire::TopicError::Empty { .. } => "must not be empty".into(),
            axion_wire::TopicError::Forbidden { .. } => {
                "must not contain '/', '+', '#' or NUL".into()
            }
        },
    })?;
    if queue.len() > MAX_TYPE_LEN {
        return Err(FrameError::BadValue {
            field: "queue",
            problem: format!("is longer than {MAX_TYPE_LEN} bytes"),
        });
    }
    Ok(queue)
}

fn task_id_field(obj: &Object) -> Result<String, FrameError> {
    let id = string_field(obj, "taskId")?;
    if id.is_empty() {
        return Err(FrameError::BadValue {
            field: "taskId",
            problem: "must not be empty".into(),
        });
    }
    Ok(id)
}

/// A concrete event type (`fs.change`): non-empty dot-separated segments,
/// none containing `/`, `+`, `#` or NUL.
pub fn validate_type(t: &str) -> Result<(), String> {
    check_common(t)?;
    if t.contains(['+', '#']) {
        return Err("must not contain '+' or '#' (wildcards are for subscribe only)".into());
    }
    Ok(())
}

/// A subscription pattern: like a type, but a whole segment may be `+`
/// (one segment) or, as the last segment, `#` (any number, even none).
pub fn validate_pattern(p: &str) -> Result<(), String> {
    check_common(p)?;
    let segments: Vec<&str> = p.split('.').collect();
    for (i, seg) in segments.iter().enumerate() {
        if seg.contains(['+', '#']) && seg.len() > 1 {
            return Err(format!(
                "segment {seg:?} mixes a wildcard with text; '+' and '#' must be whole segments"
            ));
        }
        if *seg == "#" && i + 1 != segments.len() {
            return Err("'#' must be the last segment".into());
        }
    }
    Ok(())
}

fn check_common(t: &str) -> Result<(), String> {
    if t.is_empty() {
        return Err("must not be empty".into());
    }
    if t.len() > MAX_TYPE_LEN {
        return Err(format!("is longer than {MAX_TYPE_LEN} bytes"));
    }
    if t.contains(['/', '\0']) {
        return Err("must not contain '/' or NUL (use '.' between segments)".into());
    }
    if t.split('.').any(str::is_empty) {
        return Err("must not have an empty segment (leading, trailing or double '.')".into());
    }
    Ok(())
}

/// `fs.change` under `prefix` (`axion/<pkg>/event/`) → `axion/<pkg>/event/fs/change`.
pub fn type_to_topic(prefix: &str, t: &str) -> String {
    let mut topic = String::with_capacity(prefix.len() + t.len());
    topic.push_str(prefix);
    topic.extend(t.chars().map(|c| if c == '.' { '/' } else { c }));
    topic
}

/// The event type of a topic under `prefix`, or `None` for other topics.
pub fn topic_to_type(prefix: &str, topic: &str) -> Option<String> {
    let rest = topic.strip_prefix(prefix)?;
    if rest.is_empty() {
        return None;
    }
    Some(rest.replace('/', "."))
}

/// JavaScript truthiness, because the legacy broker filled `source` and
/// `timestamp` with `x || default` and kept `correlationId`/`replyTo` only
/// when truthy.
pub fn truthy(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64().is_some_and(|f| f != 0.0 && !f.is_nan()),
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(_)) | Some(Value::Object(_)) => true,
    }
}

/// Now, as ISO-8601 UTC with milliseconds (`2025-08-06T01:23:45.123Z`), the
/// legacy broker's `new Date().toISOString()`.
pub fn now_iso() -> String {
    now_rfc3339().to_string()
}

fn now_rfc3339() -> humantime::Rfc3339Timestamp {
    humantime::format_rfc3339_millis(std::time::SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(text: &str) -> String {
        parse_frame(text).unwrap_err().to_string()
    }

    #[test]
    fn legacy_error_texts_are_kept() {
        assert_eq!(err("{not json"), "invalid json");
        assert_eq!(err(r#"{"action":"dance"}"#), "unknown action");
        assert_eq!(
            parse_frame(r#"{"action":"dance"}"#).unwrap_err().reply(),
            json!({"error": "unknown action", "action": "dance"})
        );
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(err("[1]"), "frame must be a JSON object");
        assert_eq!(err("{}"), "missing field \"action\"");
        assert_eq!(err(r#"{"action":5}"#), "field \"action\" must be a string");
        assert_eq!(err(r#"{"action":"subscribe"}"#), "missing field \"topic\"");
        assert!(err(r#"{"action":"subscribe","topic":"a/b"}"#).contains("\"topic\""));
        assert!(err(r#"{"action":"publish","message":{"type":"a+"}}"#).contains("message.type"));
        assert!(err(r#"{"action":"publish","message":{}}"#).contains("message.type"));
        assert!(err(r#"{"action":"publish","message":3}"#).contains("\"message\""));
        assert!(err(r#"{"action":"enqueue","queue":"a/b"}"#).contains("\"queue\""));
        assert!(err(r#"{"action":"ack"}"#).contains("taskId"));
        assert!(err(r#"{"action":"fail","taskId":"x","reason":1}"#).contains("reason"));
    }

    #[test]
    fn requests_parse() {
        assert_eq!(
            parse_frame(r#"{"action":"subscribe","topic":"fs.+"}"#),
            Ok(Request::Subscribe {
                topic: "fs.+".into()
            })
        );
        assert_eq!(
            parse_frame(r#"{"action":"ready","queue":"embedding.generate"}"#),
            Ok(Request::Pull {
                queue: "embedding.generate".into()
            })
        );
        assert_eq!(
            parse_frame(r#"{"action":"enqueue","queue":"q"}"#),
            Ok(Request::Enqueue {
                queue: "q".into(),
                task: Value::Null
            })
        );
        assert_eq!(
            parse_frame(r#"{"action":"heartbeat","anything":[1]}"#),
            Ok(Request::Heartbeat)
        );
    }

    #[test]
    fn patterns_and_types() {
        for ok in ["fs", "fs.change", "fs.+", "fs.#", "#", "+.change", "a.+.c"] {
            assert!(validate_pattern(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "fs.", ".fs", "fs..x", "fs.#.x", "fs+", "f#", "a/b", "a\0",
        ] {
            assert!(validate_pattern(bad).is_err(), "{bad:?}");
        }
        assert!(validate_type("fs.+").is_err());
        assert_eq!(
            type_to_topic("axion/p/event/", "fs.change"),
            "axion/p/event/fs/change"
        );
        assert_eq!(
            topic_to_type("axion/p/event/", "axion/p/event/fs/change").as_deref(),
            Some("fs.change")
        );
        assert_eq!(topic_to_type("axion/p/event/", "axion/p/queue/x"), None);
    }

    #[test]
    fn normalize_matches_the_legacy_broker() {
        let frame = r#"{"action":"publish","message":{"type":"a.b","payload":{"x": [1, 2]},"extra":1,"correlationId":"","replyTo":"r.t","source":0}}"#;
        let Ok(Request::Publish { message }) = parse_frame(frame) else {
            panic!("not a publish")
        };
        let event = message.normalize("client-1");
        let v: Value = serde_json::from_str(&event.frame).unwrap();
        let e = &v["event"];
        assert_eq!(e["type"], "a.b");
        assert_eq!(e["source"], "client-1");
        assert_eq!(e["payload"], json!({"x": [1, 2]}));
        assert!(e["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')));
        assert_eq!(e["replyTo"], "r.t");
        assert!(e.get("correlationId").is_none());
        assert!(e.get("extra").is_none());
        assert_eq!(event.reply_to.as_deref(), Some("r.t"));
        assert_eq!(event.correlation, None);
        let envelope: Value = serde_json::from_str(&event.frame[event.envelope_range()]).unwrap();
        assert_eq!(&envelope, e);
    }

    #[test]
    fn envelopes_keep_what_the_client_wrote() {
        let frame = r#"{"action":"publish","message":{"type":"a\u002eb","source":"s","timestamp":"t","correlationId":7,"payload":null},"message":{"type":"c.d","source":"s2","timestamp":"t2","correlationId":{"k":1}}}"#;
        let Ok(Request::Publish { message }) = parse_frame(frame) else {
            panic!("not a publish")
        };
        // The last of a repeated key wins, as with JSON.parse.
        assert_eq!(message.event_type, "c.d");
        let event = message.normalize("x");
        assert_eq!(
            event.frame,
            r#"{"event":{"type":"c.d","source":"s2","timestamp":"t2","correlationId":{"k":1}}}"#
        );
        assert_eq!(event.correlation.as_deref(), Some(&br#"{"k":1}"#[..]));
        let Ok(Request::Publish { message }) = parse_frame(
            r#"{"action":"publish","message":{"type":"a\u002eb","correlationId":"c\n1","payload":null}}"#,
        ) else {
            panic!("not a publish")
        };
        assert_eq!(message.event_type, "a.b");
        let event = message.normalize("x");
        assert_eq!(event.correlation.as_deref(), Some(&b"c\n1"[..]));
        let v: Value = serde_json::from_str(&event.frame).unwrap();
        assert_eq!(v["event"]["payload"], Value::Null);
        assert_eq!(v["event"]["correlationId"], "c\n1");
    }

    #[test]
    fn nesting_is_bounded_as_serde_json_bounds_it() {
        for depth in [1, 100, MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, 5000] {
            let payload = "[".repeat(depth) + &"]".repeat(depth);
            let frame = format!(
                r#"{{"action":"publish","message":{{"type":"t","payload":{payload},"s":"[[[["}}}}"#
            );
            let old_parser_accepts = serde_json::from_str::<Value>(&frame).is_ok();
            assert_eq!(parse_frame(&frame).is_ok(), old_parser_accepts, "{depth}");
        }
        assert_eq!(err(&("[".repeat(5000) + &"]".repeat(5000))), "invalid json");
    }

    #[test]
    fn strings_are_quoted_as_serde_json_quotes_them() {
        for text in [
            "plain",
            "",
            "q\"uote",
            "back\\slash",
            "tab\t",
            "\u{1}",
            "é ✓",
        ] {
            let mut out = String::new();
            push_json_str(&mut out, text);
            assert_eq!(out, serde_json::to_string(text).unwrap());
        }
    }

    #[test]
    fn raw_truthiness_is_javascripts() {
        for (text, expected) in [
            ("null", false),
            ("false", false),
            ("0", false),
            ("-0", false),
            ("0.0e3", false),
            ("\"\"", false),
            ("true", true),
            ("1e-9", true),
            ("\"0\"", true),
            ("[]", true),
            ("{}", true),
        ] {
            let raw: &RawValue = serde_json::from_str(text).unwrap();
            assert_eq!(raw_truthy(raw), expected, "{text}");
            let v: Value = serde_json::from_str(text).unwrap();
            assert_eq!(truthy(Some(&v)), expected, "{text}");
        }
    }
}
