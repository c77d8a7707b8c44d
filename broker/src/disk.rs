//! Broker state on disk, so it survives a restart of `axion serve`, clean
//! or `kill -9`: retained messages, the sessions clients asked to keep, and
//! what those sessions are owed while they are away (see
//! [`crate::offline`]).
//!
//! Memory stays the read path ([`crate::retained::RetainedStore`],
//! [`crate::expiry::Lifetimes`]); every change is also written here by one
//! thread that commits whatever has queued up at once (group commit: a
//! burst of retained publishes from many clients costs one fsync).
//! Retained messages and kept sessions' queues, which change with traffic,
//! go to the data directory's append-only [`StateLog`] (`state-log/`);
//! kept sessions' records, which change when a client connects or
//! subscribes, to `broker.redb`. A session sends its client
//! the PUBACK (or PUBREC) of a QoS 1 or 2 retained publish only once its
//! commit is done, so a retained message the broker has acknowledged is
//! on disk. At start the file is read back into memory, message expiry
//! counted down by the time that passed.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use rumqttd::protocol::PublishProperties;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::state_log::{Change, LogError, StateLog};

/// The state log's directory, beside `broker.redb`.
const STATE_LOG_DIR: &str = "state-log";
/// Where an earlier version kept the log (then of queues only); renamed
/// at start.
const EARLIER_LOG_DIR: &str = "kept-queues";

/// Where an earlier version kept retained messages: router-form topic →
/// [`encode`]d message. Moved to the state log at start.
const RETAINED: TableDefinition<&[u8], &[u8]> = TableDefinition::new("retained");
/// Router client id → a kept session (see [`crate::expiry::KeptRecord`]).
const SESSIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("sessions");

/// Where an earlier version kept what kept sessions are owed:
/// `<router client id>` 0xFF `<sequence, u64 BE>` → [`encode_queued`]
/// message. Moved to the queue log at start.
const QUEUED: TableDefinition<&[u8], &[u8]> = TableDefinition::new("queued");

/// redb's page cache for `broker.redb`. Its default (1 GiB) would let
/// the broker's memory follow what kept sessions' queues hold on disk;
/// retained messages live in memory anyway, and queues are read once, in
/// order, when their session returns.
const PAGE_CACHE_BYTES: usize = 32 * 1024 * 1024;

/// Changes taken into one commit at most.
const BATCH: usize = 4096;
/// How long a commit that finds only a few changes waits for more, when
/// the one before it carried many: publishers with many messages in flight
/// send their next ones as their acknowledgements arrive, and without the
/// wait the first of them takes an `fdatasync` of its own that all the
/// others then wait behind. Postgres's `commit_delay` is the same idea.
const LINGER: std::time::Duration = std::time::Duration::from_micros(200);
/// The commit before must have carried at least this many changes for the
/// next to wait ([`LINGER`]); a lone publisher never waits.
const LINGER_AFTER: usize = 8;
/// Format of a stored value; bumped if it ever changes.
const VERSION: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot create the data directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot move {from} to {to}: {source}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the broker store's writer: {source}")]
    Thread { source: std::io::Error },
    #[error("broker store {path}: {source}")]
    Open {
        path: PathBuf,
        source: redb::DatabaseError,
    },
    #[error("broker store: {0}")]
    Transaction(#[from] redb::TransactionError),
    #[error("broker store: {0}")]
    Table(#[from] redb::TableError),
    #[error("broker store: {0}")]
    Storage(#[from] redb::StorageError),
    #[error("broker store: {0}")]
    Commit(#[from] redb::CommitError),
    #[error("broker store: {0}")]
    Durability(#[from] redb::SetDurabilityError),
    #[error(transparent)]
    Log(#[from] LogError),
}

/// The properties a retained message keeps (what MQTT 5 forwards).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Meta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    format: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expiry: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    content_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    response_topic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    correlation: Option<Vec<u8>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    user: Vec<(String, String)>,
}

/// A retained message read back at start.
#[derive(Debug)]
pub struct Loaded {
    pub topic: Bytes,
    pub payload: Bytes,
    pub qos: u8,
    pub properties: Option<PublishProperties>,
    /// How long ago it was stored.
    pub age: Duration,
}

/// A message a kept session is owed, read back from disk.
#[derive(Debug)]
pub struct QueuedMessage {
    pub seq: u64,
    /// Router form.
    pub topic: Bytes,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// The client was sent it before (and did not acknowledge it).
    pub dup: bool,
    pub properties: Option<PublishProperties>,
    /// How long ago it was queued.
    pub age: Duration,
    /// Bytes it takes on disk (what the queue's bound counts).
    pub size: u64,
}

/// What one kept session's queue holds, found when the file is opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueSummary {
    pub messages: u64,
    pub bytes: u64,
    /// Highest sequence number in use.
    pub last_seq: u64,
}

/// The id and sequence of a [`QUEUED`] key.
fn split_queue_key(key: &[u8]) -> Option<(&str, u64)> {
    let (id, seq) = key.split_at_checked(key.len().checked_sub(9)?)?;
    let (&sep, seq) = seq.split_first()?;
    (sep == 0xFF).then_some(())?;
    Some((
        std::str::from_utf8(id).ok()?,
        u64::from_be_bytes(seq.try_into().ok()?),
    ))
}

/// How a queued message was published and whether it was sent before.
#[derive(Debug, Clone, Copy)]
pub struct QueuedFlags {
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
}

/// `[topic length, u16 LE][topic]` then [`encode`] with RETAIN and DUP in
/// the QoS byte's high bits.
pub fn encode_queued(
    topic: &[u8],
    payload: &[u8],
    flags: QueuedFlags,
    props: Option<&PublishProperties>,
) -> Vec<u8> {
    let byte = flags.qos | (u8::from(flags.retain) << 7) | (u8::from(flags.dup) << 6);
    let mut out = Vec::with_capacity(2 + topic.len() + 14 + payload.len());
    out.extend_from_slice(&(topic.len() as u16).to_le_bytes());
    out.extend_from_slice(topic);
    encode_into(&mut out, payload, byte, props);
    out
}

fn decode_queued(seq: u64, raw: &[u8], now: u64) -> Option<QueuedMessage> {
    let len = usize::from(u16::from_le_bytes(raw.get(..2)?.try_into().ok()?));
    let topic = raw.get(2..2 + len)?;
    let m = decode(topic, raw.get(2 + len..)?, now)?;
    Some(QueuedMessage {
        seq,
        topic: m.topic,
        payload: m.payload,
        qos: m.qos & 0x03,
        retain: m.qos & 0x80 != 0,
        dup: m.qos & 0x40 != 0,
        properties: m.properties,
        age: m.age,
        size: raw.len() as u64,
    })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `[version][qos][stored ms, u64 LE][meta length, u32 LE][meta JSON][payload]`.
fn encode(payload: &[u8], qos: u8, props: Option<&PublishProperties>) -> Vec<u8> {
    let mut out = Vec::with_capacity(14 + payload.len());
    encode_into(&mut out, payload, qos, props);
    out
}

/// [`encode`], appended to `out`.
fn encode_into(out: &mut Vec<u8>, payload: &[u8], qos: u8, props: Option<&PublishProperties>) {
    let meta = props.map(|p| Meta {
        format: p.payload_format_indicator,
        expiry: p.message_expiry_interval,
        content_type: p.content_type.clone(),
        response_topic: p.response_topic.clone(),
        correlation: p.correlation_data.as_ref().map(|c| c.to_vec()),
        user: p.user_properties.clone(),
    });
    // A struct of options and strings always serializes.
    let meta = meta
        .map(|m| serde_json::to_vec(&m).unwrap_or_default())
        .unwrap_or_default();
    out.reserve(14 + meta.len() + payload.len());
    out.push(VERSION);
    out.push(qos);
    out.extend_from_slice(&now_ms().to_le_bytes());
    out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    out.extend_from_slice(&meta);
    out.extend_from_slice(payload);
}

fn decode(topic: &[u8], raw: &[u8], now: u64) -> Option<Loaded> {
    let (&version, rest) = raw.split_first()?;
    if version != VERSION {
        return None;
    }
    let (&qos, rest) = rest.split_first()?;
    let stored = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?);
    let meta_len = u32::from_le_bytes(rest.get(8..12)?.try_into().ok()?) as usize;
    let meta = rest.get(12..12 + meta_len)?;
    let payload = rest.get(12 + meta_len..)?;
    let properties = if meta.is_empty() {
        None
    } else {
        let m: Meta = serde_json::from_slice(meta).ok()?;
        Some(PublishProperties {
            payload_format_indicator: m.format,
            message_expiry_interval: m.expiry,
            topic_alias: None,
            response_topic: m.response_topic,
            correlation_data: m.correlation.map(Bytes::from),
            user_properties: m.user,
            subscription_identifiers: Vec::new(),
            content_type: m.content_type,
        })
    };
    Some(Loaded {
        topic: Bytes::copy_from_slice(topic),
        payload: Bytes::copy_from_slice(payload),
        qos,
        properties,
        age: Duration::from_millis(now.saturating_sub(stored)),
    })
}

enum Op {
    /// A retained message (router-form topic, [`encode`]d value).
    Retain(Bytes, Vec<u8>),
    Unretain(Bytes),
    /// A kept session's record, by router client id.
    PutSession(String, Vec<u8>),
    DeleteSession(String),
    Queued(Queued),
    /// Nothing to write: done once everything queued before it is.
    Sync,
}

/// A change to the queue log.
enum Queued {
    Put(String, u64, Vec<u8>),
    Delete(String, u64),
    /// Every queued message of one router client id.
    DeleteQueue(String),
}

/// Resolves once the change it was handed out for is on disk (or the
/// writer is gone, which the writer logs).
pub type Commit = oneshot::Receiver<()>;

/// What [`BrokerDisk::open`] found, and the writer.
pub struct Opened {
    pub disk: BrokerDisk,
    pub retained: Vec<Loaded>,
    /// Kept-session records (see [`crate::expiry::KeptRecord`]).
    pub sessions: Vec<Vec<u8>>,
    /// What each kept session's queue holds, by router client id.
    pub queues: std::collections::HashMap<String, QueueSummary>,
}

/// The writing end; cheap to call from any thread.
pub struct BrokerDisk {
    /// Kept sessions' queues and retained messages; shared with the
    /// writer, read (at resume) without it.
    log: Arc<StateLog>,
    tx: Option<mpsc::Sender<(Op, Option<oneshot::Sender<()>>)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for BrokerDisk {
    /// Lets the writer commit what is queued, then waits for it to close
    /// the file.
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for BrokerDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BrokerDisk")
    }
}

impl BrokerDisk {
    /// Opens (or creates) `path`, reads every message back, and starts the
    /// writer thread. Expired and unreadable records are dropped from the
    /// file as they are found.
    pub fn open(path: &Path) -> Result<Opened, DiskError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| DiskError::Dir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let db = redb::Builder::new()
            .set_cache_size(PAGE_CACHE_BYTES)
            .create(path)
            .map_err(|source| DiskError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let mut sessions = Vec::new();
        let mut earlier_retained = Vec::new();
        let mut earlier = Vec::new();
        {
            let read = db.begin_read()?;
            match read.open_table(RETAINED) {
                Ok(table) => {
                    for entry in table.iter()? {
                        let (k, v) = entry?;
                        match std::str::from_utf8(k.value()) {
                            Ok(topic) => {
                                earlier_retained.push((topic.to_string(), v.value().to_vec()))
                            }
                            Err(_) => tracing::warn!(
                                "a retained message with a topic that is not UTF-8 dropped"
                            ),
                        }
                    }
                }
                Err(redb::TableError::TableDoesNotExist(_)) => {}
                Err(e) => return Err(e.into()),
            }
            match read.open_table(SESSIONS) {
                Ok(table) => {
                    for entry in table.iter()? {
                        let (_, v) = entry?;
                        sessions.push(v.value().to_vec());
                    }
                }
                Err(redb::TableError::TableDoesNotExist(_)) => {}
                Err(e) => return Err(e.into()),
            }
            match read.open_table(QUEUED) {
                Ok(table) => {
                    for entry in table.iter()? {
                        let (k, v) = entry?;
                        if let Some((id, seq)) = split_queue_key(k.value()) {
                            earlier.push((id.to_string(), seq, v.value().to_vec()));
                        }
                    }
                }
                Err(redb::TableError::TableDoesNotExist(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let log_dir = path.with_file_name(STATE_LOG_DIR);
        let earlier_dir = path.with_file_name(EARLIER_LOG_DIR);
        if earlier_dir.is_dir() && !log_dir.exists() {
            std::fs::rename(&earlier_dir, &log_dir).map_err(|source| DiskError::Rename {
                from: earlier_dir.clone(),
                to: log_dir.clone(),
                source,
            })?;
        }
        let (log, _) = StateLog::open(&log_dir)?;
        if !earlier.is_empty() || !earlier_retained.is_empty() {
            // Into the log first, then out of the tables: a crash in
            // between writes them to the log again, which only replaces
            // them there.
            for chunk in earlier.chunks(BATCH) {
                let changes: Vec<Change<'_>> = chunk
                    .iter()
                    .map(|(id, seq, v)| Change::Put(id, *seq, v))
                    .collect();
                log.append(&changes)?;
            }
            for chunk in earlier_retained.chunks(BATCH) {
                let changes: Vec<Change<'_>> =
                    chunk.iter().map(|(t, v)| Change::Retain(t, v)).collect();
                log.append(&changes)?;
            }
            let write = db.begin_write()?;
            write.delete_table(QUEUED)?;
            write.delete_table(RETAINED)?;
            write.commit()?;
            tracing::info!(
                queued = earlier.len(),
                retained = earlier_retained.len(),
                "queued and retained messages moved from broker.redb to the state log"
            );
        }
        let now = now_ms();
        let mut loaded = Vec::new();
        let mut stale = Vec::new();
        for (topic, value) in log.retained()? {
            match decode(topic.as_bytes(), &value, now) {
                Some(m) if !expired(&m) => loaded.push(m),
                _ => stale.push(topic),
            }
        }
        if !stale.is_empty() {
            let changes: Vec<Change<'_>> = stale.iter().map(|t| Change::Unretain(t)).collect();
            log.append(&changes)?;
            tracing::info!(
                dropped = stale.len(),
                "expired retained messages dropped at start"
            );
        }
        let queues = log.summaries();
        let log = Arc::new(log);
        let (tx, rx) = mpsc::channel();
        let file = path.to_path_buf();
        let writer_log = log.clone();
        let thread = std::thread::Builder::new()
            .name("axion-broker-disk".into())
            .spawn(move || writer(&db, &writer_log, rx, file))
            .map_err(|source| DiskError::Thread { source })?;
        Ok(Opened {
            disk: Self {
                log,
                tx: Some(tx),
                thread: Some(thread),
            },
            retained: loaded,
            sessions,
            queues,
        })
    }

    /// Writes (replaces) the retained message of router-form `topic`.
    pub fn put(
        &self,
        topic: Bytes,
        payload: &[u8],
        qos: u8,
        props: Option<&PublishProperties>,
    ) -> Commit {
        self.send(Op::Retain(topic, encode(payload, qos, props)))
    }

    /// Removes the retained message of router-form `topic`.
    pub fn delete(&self, topic: Bytes) -> Commit {
        self.send(Op::Unretain(topic))
    }

    /// Writes (replaces) the record of the kept session `router_id`.
    pub fn put_session(&self, router_id: &str, record: Vec<u8>) -> Commit {
        self.send(Op::PutSession(router_id.to_string(), record))
    }

    /// Forgets the kept session `router_id`.
    pub fn delete_session(&self, router_id: &str) -> Commit {
        self.send(Op::DeleteSession(router_id.to_string()))
    }

    /// Appends message `seq` (an [`encode_queued`] value) to the queue of
    /// the kept session `router_id`.
    pub fn put_queued(&self, router_id: &str, seq: u64, value: Vec<u8>) -> Commit {
        self.send(Op::Queued(Queued::Put(router_id.to_string(), seq, value)))
    }

    /// [`BrokerDisk::put_queued`], telling `done` once it is on disk.
    pub fn put_queued_then(
        &self,
        router_id: &str,
        seq: u64,
        value: Vec<u8>,
        done: oneshot::Sender<()>,
    ) {
        self.send_then(
            Op::Queued(Queued::Put(router_id.to_string(), seq, value)),
            done,
        );
    }

    /// Removes message `seq` from the queue of `router_id` (delivered).
    pub fn delete_queued(&self, router_id: &str, seq: u64) -> Commit {
        self.send(Op::Queued(Queued::Delete(router_id.to_string(), seq)))
    }

    /// Removes the whole queue of `router_id` (its session ended).
    pub fn delete_queue(&self, router_id: &str) -> Commit {
        self.send(Op::Queued(Queued::DeleteQueue(router_id.to_string())))
    }

    /// Reads up to `limit` messages of the queue of `router_id` with
    /// sequence numbers in `from..=to`, oldest first. Blocking: call it
    /// after a [`BrokerDisk::sync`], from a blocking context.
    pub fn load_queue(
        &self,
        router_id: &str,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<Vec<QueuedMessage>, DiskError> {
        let now = now_ms();
        let mut out = Vec::new();
        for (seq, value) in self.log.read(router_id, from, to, limit)? {
            match decode_queued(seq, &value, now) {
                Some(m) => out.push(m),
                None => {
                    tracing::warn!(client = router_id, seq, "unreadable queued message skipped")
                }
            }
        }
        Ok(out)
    }

    /// Resolves once every change handed in before is on disk (a clean
    /// stop waits for it).
    pub fn sync(&self) -> Commit {
        self.send(Op::Sync)
    }

    fn send(&self, op: Op) -> Commit {
        let (done, commit) = oneshot::channel();
        self.send_then(op, done);
        commit
    }

    fn send_then(&self, op: Op, done: oneshot::Sender<()>) {
        let sent = self
            .tx
            .as_ref()
            .is_some_and(|tx| tx.send((op, Some(done))).is_ok());
        if !sent {
            tracing::error!("broker store writer is gone; a change is not on disk");
        }
    }
}

fn expired(m: &Loaded) -> bool {
    m.properties
        .as_ref()
        .and_then(|p| p.message_expiry_interval)
        .is_some_and(|secs| m.age >= Duration::from_secs(u64::from(secs)))
}

/// A router-form topic as the log's id. Topics are UTF-8 (the codec
/// refuses any other), so this only fails on a broken invariant.
fn topic_id(topic: &Bytes) -> Option<&str> {
    let id = std::str::from_utf8(topic).ok();
    if id.is_none() {
        tracing::error!("a retained topic that is not UTF-8 is not written to disk");
    }
    id
}

/// Commits what queued up, one append to the state log and one
/// transaction (if any session changed) per batch, until every sender is
/// gone.
fn writer(
    db: &Database,
    log: &StateLog,
    rx: mpsc::Receiver<(Op, Option<oneshot::Sender<()>>)>,
    file: PathBuf,
) {
    let mut last_batch = 0;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        if last_batch >= LINGER_AFTER && batch.len() < last_batch / 2 {
            let until = std::time::Instant::now() + LINGER;
            while batch.len() < last_batch {
                let left = until.saturating_duration_since(std::time::Instant::now());
                match rx.recv_timeout(left) {
                    Ok(more) => batch.push(more),
                    Err(_) => break,
                }
            }
        }
        last_batch = batch.len();
        let started = std::time::Instant::now();
        let changes: Vec<Change<'_>> = batch
            .iter()
            .filter_map(|(op, _)| match op {
                Op::Retain(topic, v) => Some(Change::Retain(topic_id(topic)?, v)),
                Op::Unretain(topic) => Some(Change::Unretain(topic_id(topic)?)),
                Op::Queued(Queued::Put(id, seq, v)) => Some(Change::Put(id, *seq, v)),
                Op::Queued(Queued::Delete(id, seq)) => Some(Change::Delete(id, *seq)),
                Op::Queued(Queued::DeleteQueue(id)) => Some(Change::DeleteQueue(id)),
                Op::PutSession(..) | Op::DeleteSession(_) | Op::Sync => None,
            })
            .collect();
        if let Err(error) = log.append(&changes) {
            // Said loudly, once per batch: retained messages are still in
            // memory and delivered; queued messages in it are lost.
            tracing::error!(%error, changes = changes.len(), "retained and queued messages not written to disk");
        }
        let sessions = batch
            .iter()
            .filter(|(op, _)| matches!(op, Op::PutSession(..) | Op::DeleteSession(_)))
            .count();
        let result = (|| -> Result<(), DiskError> {
            if sessions == 0 {
                return Ok(());
            }
            let mut write = db.begin_write()?;
            write.set_durability(Durability::Immediate)?;
            {
                let mut table = write.open_table(SESSIONS)?;
                for (op, _) in &batch {
                    match op {
                        Op::PutSession(id, record) => {
                            table.insert(id.as_bytes(), record.as_slice())?;
                        }
                        Op::DeleteSession(id) => {
                            table.remove(id.as_bytes())?;
                        }
                        _ => {}
                    }
                }
            }
            write.commit()?;
            Ok(())
        })();
        tracing::trace!(
            changes = batch.len(),
            logged = changes.len(),
            took_us = started.elapsed().as_micros() as u64,
            "broker store commit"
        );
        drop(changes);
        if let Err(error) = result {
            // The sessions live on in memory. Said loudly, once per batch.
            tracing::error!(file = %file.display(), %error, changes = sessions, "kept sessions' records not written to disk");
        }
        for (_, done) in batch {
            if let Some(done) = done {
                let _ = done.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_their_properties_come_back_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.redb");
        {
            let crate::disk::Opened {
                disk,
                retained: loaded,
                ..
            } = BrokerDisk::open(&path).unwrap();
            assert!(loaded.is_empty());
            let props = PublishProperties {
                content_type: Some("application/json".into()),
                message_expiry_interval: Some(3600),
                user_properties: vec![("k".into(), "v".into())],
                ..Default::default()
            };
            let a = disk.put(Bytes::from("a/b"), b"1", 1, Some(&props));
            let gone = disk.put(Bytes::from("a/c"), b"2", 0, None);
            let del = disk.delete(Bytes::from("a/c"));
            let short = PublishProperties {
                message_expiry_interval: Some(0),
                ..Default::default()
            };
            let e = disk.put(Bytes::from("a/e"), b"3", 0, Some(&short));
            for c in [a, gone, del, e] {
                c.blocking_recv().unwrap();
            }
        }
        let loaded = BrokerDisk::open(&path).unwrap().retained;
        assert_eq!(loaded.len(), 1, "{loaded:?}");
        let m = &loaded[0];
        assert_eq!(m.topic, Bytes::from("a/b"));
        assert_eq!(m.payload, Bytes::from("1"));
        assert_eq!(m.qos, 1);
        let p = m.properties.as_ref().unwrap();
        assert_eq!(p.content_type.as_deref(), Some("application/json"));
        assert_eq!(p.user_properties, vec![("k".to_string(), "v".to_string())]);
    }

    #[test]
    fn what_an_earlier_version_kept_in_broker_redb_and_kept_queues_moves_to_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.redb");
        let flags = QueuedFlags {
            qos: 1,
            retain: false,
            dup: false,
        };
        {
            let db = Database::create(&path).unwrap();
            let write = db.begin_write().unwrap();
            {
                let mut table = write.open_table(QUEUED).unwrap();
                for seq in 1..=3u64 {
                    let mut key = b"kept".to_vec();
                    key.push(0xFF);
                    key.extend_from_slice(&seq.to_be_bytes());
                    let value = encode_queued(b"t/1", format!("m{seq}").as_bytes(), flags, None);
                    table.insert(key.as_slice(), value.as_slice()).unwrap();
                }
                let mut retained = write.open_table(RETAINED).unwrap();
                retained
                    .insert(b"r/1".as_slice(), encode(b"state", 1, None).as_slice())
                    .unwrap();
            }
            write.commit().unwrap();
            // The log under the directory name an earlier version used.
            let (earlier, _) = StateLog::open(&dir.path().join(EARLIER_LOG_DIR)).unwrap();
            earlier
                .append(&[Change::Put(
                    "other",
                    1,
                    &encode_queued(b"t/2", b"o", flags, None),
                )])
                .unwrap();
        }
        for _ in 0..2 {
            let opened = BrokerDisk::open(&path).unwrap();
            assert_eq!(opened.queues["kept"].messages, 3);
            assert_eq!(opened.queues["other"].messages, 1);
            let back = opened.disk.load_queue("kept", 0, u64::MAX, 10).unwrap();
            let payloads: Vec<_> = back.iter().map(|m| m.payload.clone()).collect();
            assert_eq!(payloads, ["m1", "m2", "m3"]);
            assert_eq!(opened.retained.len(), 1);
            assert_eq!(opened.retained[0].topic, Bytes::from("r/1"));
            assert_eq!(opened.retained[0].payload, Bytes::from("state"));
        }
        assert!(!dir.path().join(EARLIER_LOG_DIR).exists());
    }
}
