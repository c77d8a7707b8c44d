//! The JSON bodies of the queue topics (docs/DESIGN.md "Bodies" plus the
//! additions in `bridge/QUEUE-CONTRACT.md`), in one place so the queue
//! owner, the ops CLI, the bridge and the service runtime agree byte for
//! byte.
//!
//! Field order is wire order. Workers and the bridge wrote several of these
//! bodies with `json!`, whose objects list keys alphabetically; the structs
//! keep that order (and leave out a `false` flag) so the bytes on the wire
//! did not change when they switched to these types.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// A producer's task request on `…/enqueue`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Any JSON value; kept verbatim.
    pub payload: Box<RawValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
}

impl TaskRequest {
    /// A request for `payload` with every option left to the owner.
    pub fn new(payload: Box<RawValue>) -> Self {
        Self {
            id: None,
            payload,
            reply_to: None,
            correlation_id: None,
            max_attempts: None,
            delay_ms: None,
        }
    }
}

/// What a worker receives on `…/tasks`. The owner writes every field but
/// the optional ones; readers (workers, the bridge) need only `id`, so the
/// rest defaults when absent. It borrows from the buffer it was read from,
/// so a reader that wants only the id and the worker copies no payload.
#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskRecord<'a> {
    #[serde(borrow)]
    pub id: Cow<'a, str>,
    /// The owner always names it; a reader falls back to the queue whose
    /// topic the record came on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<Cow<'a, str>>,
    #[serde(borrow, default = "null_payload")]
    pub payload: &'a RawValue,
    /// Unix milliseconds.
    #[serde(default)]
    pub created_at: u64,
    /// Deliveries including this one.
    #[serde(default)]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<Cow<'a, str>>,
    /// The worker whose credit this delivery used (see the contract: a
    /// different shared-group member claims or releases it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<Cow<'a, str>>,
    /// Only on `…/dead`: why the last attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Cow<'a, str>>,
}

fn null_payload() -> &'static RawValue {
    RawValue::NULL
}

/// `…/ready`: `worker` can take `credits` more tasks (or exactly
/// `credits` in total when `reset` is true).
#[derive(Debug, Deserialize, Serialize)]
pub struct Ready {
    #[serde(default = "one")]
    pub credits: u32,
    /// Deliver this worker's tasks on its own topic,
    /// `…/tasks/<worker>` (`topics::queue_tasks_directed`), instead of the
    /// shared one: it is on a broker without shared subscriptions. Absent
    /// (the older message) means the shared topic.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub directed: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reset: bool,
    pub worker: String,
}

fn one() -> u32 {
    1
}

impl Ready {
    /// `credits` more tasks for `worker`.
    pub fn more(worker: impl Into<String>, credits: u32) -> Self {
        Self {
            credits,
            directed: false,
            reset: false,
            worker: worker.into(),
        }
    }

    /// Exactly `credits` tasks for `worker` in total, whatever it announced
    /// before (after a reconnect, or to withdraw credit).
    pub fn exactly(worker: impl Into<String>, credits: u32) -> Self {
        Self {
            credits,
            directed: false,
            reset: true,
            worker: worker.into(),
        }
    }

    /// Asks for directed delivery (see [`Ready::directed`]) when `directed`.
    pub fn directed(mut self, directed: bool) -> Self {
        self.directed = directed;
        self
    }
}

/// `…/ack`, `…/fail`, `…/progress`, `…/release`: all name a task by id
/// (release may name a worker instead, for all its tasks).
#[derive(Debug, Default, Deserialize, Serialize)]
pub struct TaskRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// On `fail`: hand the task back without counting an attempt (same as
    /// `…/release`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub release: bool,
    /// On `fail`: retry no sooner than this (overrides the backoff).
    #[serde(
        default,
        rename = "retryAfterMs",
        skip_serializing_if = "Option::is_none"
    )]
    pub retry_after_ms: Option<u64>,
}

impl TaskRef {
    /// Names task `id`: an ack, a progress or a release.
    pub fn task(id: impl Into<String>) -> Self {
        Self {
            id: Some(id.into()),
            ..Self::default()
        }
    }

    /// In `worker`'s name: a claim (on `progress`) or a hand-back (on
    /// `release`) of a delivery made against another member's credit.
    pub fn with_worker(mut self, worker: impl Into<String>) -> Self {
        self.worker = Some(worker.into());
        self
    }

    /// Why a `fail` failed.
    pub fn with_reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }
}

/// Confirmation of an enqueue, sent to the producer's Response Topic once
/// the task is on disk.
#[derive(Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct Enqueued {
    pub id: String,
    pub queue: String,
    /// True when the id was already queued or in flight, so nothing new
    /// was added.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
}

/// Retained `…/stats`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
pub struct Stats {
    pub queue: String,
    /// Waiting tasks, delayed and backing off included.
    pub depth: u64,
    pub inflight: u64,
    pub dead: u64,
    pub enqueued_total: u64,
    pub acked_total: u64,
    pub failed_total: u64,
    /// Enqueues refused because the queue was at its depth or byte limit.
    #[serde(default)]
    pub refused_total: u64,
    /// Bytes of the bodies of its waiting and in-flight tasks (what its
    /// byte limit counts).
    #[serde(default)]
    pub bytes: u64,
    pub oldest_age_ms: u64,
    /// Unix milliseconds.
    pub timestamp: u64,
    /// Tasks enqueued / acked per second over the last stats interval.
    #[serde(default)]
    pub enqueue_rate: f64,
    #[serde(default)]
    pub ack_rate: f64,
    /// Free credit announced by workers and not used yet.
    #[serde(default)]
    pub credits: u64,
    #[serde(default)]
    pub workers: u64,
    /// Acks for a task already acked, or from a worker other than the one
    /// it was handed to: each one means a task ran more than once (a
    /// bridged or clustered broker delivered a copy, or an ack wait ran
    /// out on a slow worker).
    #[serde(default)]
    pub stray_acks_total: u64,
}

/// An ops command on `…/cmd`; the reply goes to the MQTT 5 Response Topic
/// (or `replyTo` for MQTT 3.1.1 clients).
#[derive(Debug, Deserialize, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Command {
    /// Stats, workers, and the first `limit` waiting and in-flight tasks.
    Show {
        #[serde(default = "default_limit")]
        limit: usize,
    },
    /// Dead-lettered tasks, oldest first.
    Dead {
        #[serde(default = "default_limit")]
        limit: usize,
    },
    /// Dead letters back to the queue with a fresh attempt count.
    Retry {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        #[serde(default)]
        all: bool,
    },
    /// Drops every waiting task and dead letter; in-flight tasks finish.
    Purge,
}

fn default_limit() -> usize {
    50
}

/// Envelope around a command so MQTT 3.1.1 clients can name a reply topic.
#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CommandRequest {
    #[serde(flatten)]
    pub command: Command,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
}

/// A request on `axion/<pkg>/queues/cmd/list` (`topics::queues_list`)
/// for every queue's stats. Its body may be empty: the reply goes to the
/// MQTT 5 Response Topic, or `replyTo` for MQTT 3.1.1 clients, and is a
/// [`CommandReply`] whose `queues` holds one [`Stats`] per queue, sorted
/// by name.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
}

/// One task as ops tools see it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskView {
    pub id: String,
    pub state: String,
    pub attempts: u32,
    pub max_attempts: u32,
    pub created_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Unix ms before which it is not delivered (delay or backoff).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<u64>,
    pub payload: Box<RawValue>,
}

/// A worker as the owner sees it.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct WorkerView {
    pub worker: String,
    pub credits: u32,
    pub holding: u64,
}

/// Reply to a [`Command`].
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CommandReply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<Stats>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack_wait_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workers: Vec<WorkerView>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<TaskView>,
    /// Tasks moved or removed by retry/purge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// Every queue's stats, in the reply to a [`ListRequest`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queues: Vec<Stats>,
}

impl CommandReply {
    pub fn error(message: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(message.into()),
            ..Self::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn text(message: &impl Serialize) -> String {
        serde_json::to_string(message).unwrap()
    }

    #[test]
    fn worker_messages_keep_the_bytes_json_macros_wrote() {
        assert_eq!(text(&TaskRef::task("t1")), json!({"id": "t1"}).to_string());
        assert_eq!(
            text(&TaskRef::task("t1").with_reason("boom")),
            r#"{"id":"t1","reason":"boom"}"#
        );
        assert_eq!(
            text(&TaskRef::task("t1").with_worker("w")),
            json!({"id": "t1", "worker": "w"}).to_string()
        );
        assert_eq!(
            text(&Ready::more("w", 2)),
            json!({"worker": "w", "credits": 2}).to_string()
        );
        assert_eq!(
            text(&Ready::exactly("w", 0)),
            r#"{"credits":0,"reset":true,"worker":"w"}"#
        );
        assert_eq!(
            text(&Ready::exactly("w", 3).directed(true)),
            r#"{"credits":3,"directed":true,"reset":true,"worker":"w"}"#
        );
        let old: Ready = serde_json::from_str(r#"{"worker":"w","credits":2}"#).unwrap();
        assert!(!old.directed && !old.reset);
        let payload = serde_json::value::to_raw_value(&json!({"b": 1, "a": [true]})).unwrap();
        let request = TaskRequest {
            id: Some("n-000000000001".into()),
            ..TaskRequest::new(payload)
        };
        assert_eq!(
            text(&request),
            json!({"id": "n-000000000001", "payload": {"a": [true], "b": 1}}).to_string()
        );
    }

    #[test]
    fn a_task_record_reads_back_with_only_an_id_required() {
        let payload = serde_json::value::to_raw_value(&json!({"x": 1})).unwrap();
        let record = TaskRecord {
            id: "a\"b".into(),
            queue: Some("q".into()),
            payload: &payload,
            created_at: 7,
            attempts: 1,
            reply_to: None,
            correlation_id: None,
            worker: Some("w".into()),
            reason: None,
        };
        let bytes = serde_json::to_vec(&record).unwrap();
        assert_eq!(
            std::str::from_utf8(&bytes).unwrap(),
            r#"{"id":"a\"b","queue":"q","payload":{"x":1},"createdAt":7,"attempts":1,"worker":"w"}"#
        );
        let back: TaskRecord = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            (back.id.as_ref(), back.worker.as_deref()),
            ("a\"b", Some("w"))
        );
        let bare: TaskRecord = serde_json::from_slice(br#"{"id":"t"}"#).unwrap();
        assert_eq!(
            (bare.queue, bare.payload.get(), bare.attempts),
            (None, "null", 0)
        );
    }
}
