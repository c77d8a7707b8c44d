//! The JSON bodies of the queue topics (docs/DESIGN.md "Bodies" plus the
//! additions in `bridge/QUEUE-CONTRACT.md`), in one place so the owner, the
//! ops CLI and the bridge agree byte for byte.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// A producer's task request on `…/enqueue`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskRequest {
    /// Any JSON value; kept verbatim.
    pub payload: Box<RawValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
}

/// What a worker receives on `…/tasks`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskRecord<'a> {
    pub id: &'a str,
    pub queue: &'a str,
    pub payload: &'a RawValue,
    /// Unix milliseconds.
    pub created_at: u64,
    /// Deliveries including this one.
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<&'a str>,
    /// The worker whose credit this delivery used (see the contract: a
    /// different shared-group member claims or releases it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker: Option<&'a str>,
    /// Only on `…/dead`: why the last attempt failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
}

/// `…/ready`: `worker` can take `credits` more tasks (or exactly
/// `credits` in total when `reset` is true).
#[derive(Debug, Deserialize, Serialize)]
pub struct Ready {
    pub worker: String,
    #[serde(default = "one")]
    pub credits: u32,
    #[serde(default)]
    pub reset: bool,
}

fn one() -> u32 {
    1
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
    #[serde(default)]
    pub release: bool,
    /// On `fail`: retry no sooner than this (overrides the backoff).
    #[serde(
        default,
        rename = "retryAfterMs",
        skip_serializing_if = "Option::is_none"
    )]
    pub retry_after_ms: Option<u64>,
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
