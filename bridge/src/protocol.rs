//! The legacy WebSocket JSON protocol (DESIGN.md, "The legacy WebSocket
//! protocol"): parsing one text frame into a [`Request`], and the event-type
//! rules that map legacy types onto MQTT topic levels.
//!
//! Kept free of I/O so the parser can be property-tested and fuzzed on its
//! own: whatever bytes a client sends, [`parse_frame`] returns a request or
//! a [`FrameError`] whose text goes back to the client as `{"error": …}`.
//! The two messages the legacy broker sent (`invalid json`, `unknown
//! action`) are kept word for word; every other error names the field.

use serde_json::{Map, Value};

/// Longest event type accepted, in bytes. Topics are length-prefixed with
/// 16 bits in MQTT, and no sane event type comes near this.
pub const MAX_TYPE_LEN: usize = 1024;

/// One client request, validated.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// `topic` is a legacy event pattern (`fs.change`, `fs.+`, `fs.#`).
    Subscribe {
        topic: String,
    },
    Unsubscribe {
        topic: String,
    },
    /// `message` is the client's envelope; its `type` is already validated.
    Publish {
        message: Map<String, Value>,
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

/// Parses one text frame.
pub fn parse_frame(text: &str) -> Result<Request, FrameError> {
    let value: Value = serde_json::from_str(text).map_err(|_| FrameError::InvalidJson)?;
    let Value::Object(mut obj) = value else {
        return Err(FrameError::NotAnObject);
    };
    let action = match obj.get("action") {
        None | Some(Value::Null) => return Err(FrameError::Missing("action")),
        Some(Value::String(a)) => a.clone(),
        Some(_) => {
            return Err(FrameError::WrongType {
                field: "action",
                expected: "a string",
            })
        }
    };
    match action.as_str() {
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
            let message = match obj.remove("message") {
                None | Some(Value::Null) => return Err(FrameError::Missing("message")),
                Some(Value::Object(m)) => m,
                Some(_) => {
                    return Err(FrameError::WrongType {
                        field: "message",
                        expected: "an object (the event envelope)",
                    })
                }
            };
            match message.get("type") {
                None | Some(Value::Null) => return Err(FrameError::Missing("message.type")),
                Some(Value::String(t)) => {
                    validate_type(t).map_err(|problem| FrameError::BadValue {
                        field: "message.type",
                        problem,
                    })?
                }
                Some(_) => {
                    return Err(FrameError::WrongType {
                        field: "message.type",
                        expected: "a string",
                    })
                }
            }
            Ok(Request::Publish { message })
        }
        "enqueue" => {
            let queue = queue_field(&obj)?;
            let task = obj.remove("task").unwrap_or(Value::Null);
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
            let reason = match obj.get("reason") {
                None | Some(Value::Null) => None,
                Some(Value::String(r)) => Some(r.clone()),
                Some(_) => {
                    return Err(FrameError::WrongType {
                        field: "reason",
                        expected: "a string",
                    })
                }
            };
            Ok(Request::Fail { task_id, reason })
        }
        "heartbeat" => Ok(Request::Heartbeat),
        _ => Err(FrameError::UnknownAction(action)),
    }
}

fn string_field(obj: &Map<String, Value>, field: &'static str) -> Result<String, FrameError> {
    match obj.get(field) {
        None | Some(Value::Null) => Err(FrameError::Missing(field)),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(FrameError::WrongType {
            field,
            expected: "a string",
        }),
    }
}

fn queue_field(obj: &Map<String, Value>) -> Result<String, FrameError> {
    let queue = string_field(obj, "queue")?;
    axion_heartbeat::topics::validate_level("queue", &queue).map_err(|e| FrameError::BadValue {
        field: "queue",
        problem: match e {
            axion_heartbeat::TopicError::Empty { .. } => "must not be empty".into(),
            axion_heartbeat::TopicError::Forbidden { .. } => {
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

fn task_id_field(obj: &Map<String, Value>) -> Result<String, FrameError> {
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
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// The legacy `normalize`: keeps `type`, `source`, `payload`, `timestamp`
/// and the truthy `correlationId`/`replyTo`; fills `source` with the
/// sender's id and `timestamp` with now when they are falsy.
pub fn normalize(mut message: Map<String, Value>, sender: &str) -> Map<String, Value> {
    let mut event = Map::new();
    if let Some(t) = message.remove("type") {
        event.insert("type".into(), t);
    }
    let source = message.remove("source");
    event.insert(
        "source".into(),
        if truthy(source.as_ref()) {
            source.unwrap_or(Value::Null)
        } else {
            Value::String(sender.to_string())
        },
    );
    if let Some(p) = message.remove("payload") {
        event.insert("payload".into(), p);
    }
    let ts = message.remove("timestamp");
    event.insert(
        "timestamp".into(),
        if truthy(ts.as_ref()) {
            ts.unwrap_or(Value::Null)
        } else {
            Value::String(now_iso())
        },
    );
    for key in ["correlationId", "replyTo"] {
        let v = message.remove(key);
        if truthy(v.as_ref()) {
            if let Some(v) = v {
                event.insert(key.into(), v);
            }
        }
    }
    event
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
        let msg = json!({"type": "a.b", "payload": {"x": 1}, "extra": 1, "correlationId": "", "replyTo": "r.t"});
        let Value::Object(m) = msg else {
            unreachable!()
        };
        let e = normalize(m, "client-1");
        assert_eq!(e["source"], "client-1");
        assert!(e["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')));
        assert_eq!(e["replyTo"], "r.t");
        assert!(!e.contains_key("correlationId"));
        assert!(!e.contains_key("extra"));
    }
}
