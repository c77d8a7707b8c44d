//! The durable side of the queues: one redb file in the data directory.
//!
//! A task lives in two rows. Its record (`tasks`, or `dead` once
//! dead-lettered) is what dispatch needs: order, attempts, timing, holder,
//! size; the owner keeps every record in memory and rewrites it on each
//! change. Its body (`bodies`: the payload and the producer's reply fields)
//! is written once, read back when the task is delivered and not cached,
//! and deleted with the task; a delivery never rewrites it.
//!
//! This module loads the records at start, reads bodies in batches, and
//! applies one batch of changes as one fsynced transaction (the group
//! commit). It is blocking: the owner calls it from a thread of its own and
//! from the blocking pool.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Builder, Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// (queue, task id) → [`StoredTask`] JSON. Live tasks: waiting or in flight.
const TASKS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("tasks");
/// (queue, task id) → [`StoredTask`] JSON of dead-lettered tasks.
const DEAD: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("dead");
/// Task seq → [`Body`] JSON, for live and dead tasks alike. The seq, not
/// the id, is the key: a dead letter and a live task may share an id.
const BODIES: TableDefinition<u64, &[u8]> = TableDefinition::new("bodies");
/// queue → [`Counters`] JSON, so totals survive restarts.
const COUNTERS: TableDefinition<&str, &[u8]> = TableDefinition::new("counters");

/// redb's own page cache. Its default (1 GiB) would fill with every body
/// written or read and make the owner's memory follow the backlog; the
/// owner caches the bodies it needs itself, so redb only needs room for the
/// B-tree pages it walks and the pages of the commit under way.
const PAGE_CACHE_BYTES: usize = 16 * 1024 * 1024;

/// Records of the earlier layout (body inside the record) rewritten per
/// transaction when a store is opened by this version.
const MIGRATE_CHUNK: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create data directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("queue store {path}: {source}")]
    Open {
        path: PathBuf,
        source: redb::DatabaseError,
    },
    #[error("queue store transaction: {0}")]
    Transaction(#[from] redb::TransactionError),
    #[error("queue store table: {0}")]
    Table(#[from] redb::TableError),
    #[error("queue store I/O: {0}")]
    Storage(#[from] redb::StorageError),
    #[error("queue store commit: {0}")]
    Commit(#[from] redb::CommitError),
    #[error("queue store durability setting: {0}")]
    Durability(#[from] redb::SetDurabilityError),
    #[error("queue store record {key:?} is corrupt: {source}")]
    Corrupt {
        key: String,
        source: serde_json::Error,
    },
    #[error("cannot encode a task body for the queue store: {0}")]
    Encode(serde_json::Error),
}

/// A task's record as it sits on disk and in the owner's memory: all that
/// dispatch needs, and not the body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredTask {
    pub seq: u64,
    /// Bytes of its [`Body`] (see [`Body::size`]): what it counts against
    /// its queue's byte limit and the body cache.
    pub size: u64,
    pub created_at: u64,
    pub attempts: u32,
    pub max_attempts: u32,
    /// Unix ms before which the task is not delivered.
    #[serde(default)]
    pub not_before: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The worker holding it, when in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
}

/// What the producer sent with a task; never changes.
#[derive(Debug, Serialize, Deserialize)]
pub struct Body {
    pub payload: Box<RawValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
}

impl Body {
    /// Its weight in bytes: payload JSON and the reply fields.
    pub fn size(&self) -> u64 {
        let text = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        (self.payload.get().len() + text(&self.reply_to) + text(&self.correlation_id)) as u64
    }
}

/// A record of the earlier layout, which held the body.
#[derive(Deserialize)]
struct LegacyTask {
    seq: u64,
    payload: Box<RawValue>,
    created_at: u64,
    attempts: u32,
    max_attempts: u32,
    #[serde(default)]
    reply_to: Option<String>,
    #[serde(default)]
    correlation_id: Option<String>,
    #[serde(default)]
    not_before: u64,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    worker: Option<String>,
}

impl LegacyTask {
    fn split(self) -> (StoredTask, Body) {
        let body = Body {
            payload: self.payload,
            reply_to: self.reply_to,
            correlation_id: self.correlation_id,
        };
        let task = StoredTask {
            seq: self.seq,
            size: body.size(),
            created_at: self.created_at,
            attempts: self.attempts,
            max_attempts: self.max_attempts,
            not_before: self.not_before,
            reason: self.reason,
            worker: self.worker,
        };
        (task, body)
    }
}

/// Per-queue totals.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counters {
    pub enqueued: u64,
    pub acked: u64,
    pub failed: u64,
    /// Enqueues refused at the queue's depth or byte limit.
    #[serde(default)]
    pub refused: u64,
    /// Acks for a task already acked or handed to another worker
    /// (`Stats::stray_acks_total`).
    #[serde(default)]
    pub stray_acks: u64,
}

/// One change to the store.
#[derive(Debug)]
pub enum Op {
    Put {
        queue: String,
        id: String,
        bytes: Vec<u8>,
    },
    Delete {
        queue: String,
        id: String,
    },
    PutDead {
        queue: String,
        id: String,
        bytes: Vec<u8>,
    },
    DeleteDead {
        queue: String,
        id: String,
    },
    /// Encoded by the store thread, off the owner's task.
    PutBody {
        seq: u64,
        body: Arc<Body>,
    },
    DeleteBody {
        seq: u64,
    },
    Counters {
        queue: String,
        counters: Counters,
    },
}

/// Which table an op writes, and the key it sets there.
#[derive(Debug, PartialEq, Eq, Hash)]
enum Key<'a> {
    Task(&'a str, &'a str),
    Dead(&'a str, &'a str),
    Body(u64),
    Counters(&'a str),
}

impl Op {
    fn key(&self) -> Key<'_> {
        match self {
            Op::Put { queue, id, .. } | Op::Delete { queue, id } => Key::Task(queue, id),
            Op::PutDead { queue, id, .. } | Op::DeleteDead { queue, id } => Key::Dead(queue, id),
            Op::PutBody { seq, .. } | Op::DeleteBody { seq } => Key::Body(*seq),
            Op::Counters { queue, .. } => Key::Counters(queue),
        }
    }
}

/// Everything found on disk at start: records, not bodies.
#[derive(Debug, Default)]
pub struct Loaded {
    pub tasks: Vec<(String, String, StoredTask)>,
    pub dead: Vec<(String, String, StoredTask)>,
    pub counters: HashMap<String, Counters>,
}

pub struct Store {
    db: Database,
}

/// Bytes at the start of a redb file that hold its magic number.
const MAGIC_LEN: usize = 9;

/// True if the store file starts with zeros where redb's magic number
/// goes. redb writes the magic number last when it creates a database, so
/// a start killed while creating the file leaves it without one; nothing
/// was ever committed to it, and `Database::create` refuses it for good.
fn never_initialised(path: &Path) -> bool {
    use std::io::Read;
    let mut head = Vec::with_capacity(MAGIC_LEN);
    let read = std::fs::File::open(path)
        .and_then(|file| file.take(MAGIC_LEN as u64).read_to_end(&mut head));
    matches!(read, Ok(n) if n > 0) && head.iter().all(|b| *b == 0)
}

fn corrupt(queue: &str, id: &str) -> impl FnOnce(serde_json::Error) -> StoreError {
    let key = format!("{queue}/{id}");
    move |source| StoreError::Corrupt { key, source }
}

/// A record, and its body when it is of the earlier layout.
fn decode(queue: &str, id: &str, bytes: &[u8]) -> Result<(StoredTask, Option<Body>), StoreError> {
    match serde_json::from_slice::<StoredTask>(bytes) {
        Ok(task) => Ok((task, None)),
        Err(err) => match serde_json::from_slice::<LegacyTask>(bytes) {
            Ok(legacy) => {
                let (task, body) = legacy.split();
                Ok((task, Some(body)))
            }
            Err(_) => Err(corrupt(queue, id)(err)),
        },
    }
}

impl Store {
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::Dir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let path = data_dir.join("queues.redb");
        let open_err = |source| StoreError::Open {
            path: path.clone(),
            source,
        };
        let create = || {
            Builder::new()
                .set_cache_size(PAGE_CACHE_BYTES)
                .create(&path)
        };
        let db = match create() {
            Ok(db) => db,
            Err(err) if never_initialised(&path) => {
                tracing::warn!(path = %path.display(), %err, "the queue store was never fully created (a start was killed while creating it); creating it again");
                std::fs::remove_file(&path).map_err(|e| open_err(e.into()))?;
                create().map_err(open_err)?
            }
            Err(err) => return Err(open_err(err)),
        };
        // Create the tables so that a fresh store can be read at once.
        let txn = db.begin_write()?;
        txn.open_table(TASKS)?;
        txn.open_table(DEAD)?;
        txn.open_table(BODIES)?;
        txn.open_table(COUNTERS)?;
        txn.commit()?;
        let store = Self { db };
        store.migrate()?;
        Ok(store)
    }

    /// Moves the bodies of records written by earlier versions (which kept
    /// the body inside the record) to `bodies`, a few hundred per
    /// transaction so that memory stays small whatever the backlog. A crash
    /// in between leaves whole records of either layout; the next start
    /// finishes the job.
    fn migrate(&self) -> Result<(), StoreError> {
        let mut legacy: Vec<(bool, String, String)> = Vec::new();
        {
            let txn = self.db.begin_read()?;
            for (dead, def) in [(false, TASKS), (true, DEAD)] {
                let table = txn.open_table(def)?;
                for row in table.iter()? {
                    let (key, value) = row?;
                    let (queue, id) = key.value();
                    if serde_json::from_slice::<StoredTask>(value.value()).is_err() {
                        legacy.push((dead, queue.to_string(), id.to_string()));
                    }
                }
            }
        }
        if legacy.is_empty() {
            return Ok(());
        }
        tracing::info!(
            records = legacy.len(),
            "moving task bodies out of the records of an earlier queue store layout"
        );
        for chunk in legacy.chunks(MIGRATE_CHUNK) {
            let mut txn = self.db.begin_write()?;
            txn.set_durability(Durability::Immediate)?;
            {
                let mut tasks = txn.open_table(TASKS)?;
                let mut dead = txn.open_table(DEAD)?;
                let mut bodies = txn.open_table(BODIES)?;
                for (is_dead, queue, id) in chunk {
                    let table = if *is_dead { &mut dead } else { &mut tasks };
                    let key = (queue.as_str(), id.as_str());
                    let Some(bytes) = table.get(key)?.map(|v| v.value().to_vec()) else {
                        continue;
                    };
                    let (task, Some(body)) = decode(queue, id, &bytes)? else {
                        continue;
                    };
                    let body = serde_json::to_vec(&body).map_err(StoreError::Encode)?;
                    let record = serde_json::to_vec(&task).map_err(StoreError::Encode)?;
                    bodies.insert(task.seq, body.as_slice())?;
                    table.insert(key, record.as_slice())?;
                }
            }
            txn.commit()?;
        }
        Ok(())
    }

    pub fn load(&self) -> Result<Loaded, StoreError> {
        let txn = self.db.begin_read()?;
        let mut loaded = Loaded::default();
        for (def, out) in [(TASKS, &mut loaded.tasks), (DEAD, &mut loaded.dead)] {
            let table = txn.open_table(def)?;
            for row in table.iter()? {
                let (key, value) = row?;
                let (queue, id) = key.value();
                let task: StoredTask =
                    serde_json::from_slice(value.value()).map_err(corrupt(queue, id))?;
                out.push((queue.to_string(), id.to_string(), task));
            }
        }
        let table = txn.open_table(COUNTERS)?;
        for row in table.iter()? {
            let (key, value) = row?;
            let counters: Counters =
                serde_json::from_slice(value.value()).map_err(|source| StoreError::Corrupt {
                    key: key.value().to_string(),
                    source,
                })?;
            loaded.counters.insert(key.value().to_string(), counters);
        }
        Ok(loaded)
    }

    /// The bodies of `seqs` (ascending seqs read fastest), `None` for one
    /// that is not on disk (its task ended). Sees the last commit only.
    pub fn read_bodies(&self, seqs: &[u64]) -> Result<Vec<Option<Body>>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(BODIES)?;
        seqs.iter()
            .map(|seq| match table.get(*seq)? {
                Some(value) => serde_json::from_slice(value.value())
                    .map(Some)
                    .map_err(|source| StoreError::Corrupt {
                        key: format!("body {seq}"),
                        source,
                    }),
                None => Ok(None),
            })
            .collect()
    }

    /// Applies `ops` in one transaction and returns once it is on disk.
    /// Each op sets the whole state of its key, so only the last op on a
    /// key in the batch is written.
    pub fn commit(&self, ops: &[Op]) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        {
            let mut tasks = txn.open_table(TASKS)?;
            let mut dead = txn.open_table(DEAD)?;
            let mut bodies = txn.open_table(BODIES)?;
            let mut counters = txn.open_table(COUNTERS)?;
            let mut later = std::collections::HashSet::with_capacity(ops.len());
            for op in ops.iter().rev() {
                if !later.insert(op.key()) {
                    continue;
                }
                match op {
                    Op::Put { queue, id, bytes } => {
                        tasks.insert((queue.as_str(), id.as_str()), bytes.as_slice())?;
                    }
                    Op::Delete { queue, id } => {
                        tasks.remove((queue.as_str(), id.as_str()))?;
                    }
                    Op::PutDead { queue, id, bytes } => {
                        dead.insert((queue.as_str(), id.as_str()), bytes.as_slice())?;
                    }
                    Op::DeleteDead { queue, id } => {
                        dead.remove((queue.as_str(), id.as_str()))?;
                    }
                    Op::PutBody { seq, body } => {
                        let bytes = serde_json::to_vec(&**body).map_err(StoreError::Encode)?;
                        bodies.insert(*seq, bytes.as_slice())?;
                    }
                    Op::DeleteBody { seq } => {
                        bodies.remove(*seq)?;
                    }
                    Op::Counters { queue, counters: c } => {
                        // Counters serialize infallibly (four integers).
                        let bytes = serde_json::to_vec(c).unwrap_or_default();
                        counters.insert(queue.as_str(), bytes.as_slice())?;
                    }
                }
            }
        }
        txn.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(seq: u64) -> StoredTask {
        StoredTask {
            seq,
            size: 7,
            created_at: 1,
            attempts: 0,
            max_attempts: 5,
            not_before: 0,
            reason: None,
            worker: None,
        }
    }

    fn body(text: &str) -> Arc<Body> {
        Arc::new(Body {
            payload: RawValue::from_string(text.into()).unwrap(),
            reply_to: None,
            correlation_id: None,
        })
    }

    fn put(id: &str, seq: u64) -> Op {
        Op::Put {
            queue: "q".into(),
            id: id.into(),
            bytes: serde_json::to_vec(&task(seq)).unwrap(),
        }
    }

    fn temp_dir() -> PathBuf {
        std::env::temp_dir().join(format!("axion-store-{}", uuid::Uuid::new_v4()))
    }

    #[test]
    fn batches_survive_reopen() {
        let dir = temp_dir();
        {
            let store = Store::open(&dir).unwrap();
            store
                .commit(&[
                    put("a", 1),
                    Op::PutBody {
                        seq: 1,
                        body: body("{\"n\":1}"),
                    },
                    put("b", 2),
                    Op::PutBody {
                        seq: 2,
                        body: body("{\"n\":2}"),
                    },
                ])
                .unwrap();
            store
                .commit(&[
                    Op::Delete {
                        queue: "q".into(),
                        id: "a".into(),
                    },
                    Op::DeleteBody { seq: 1 },
                    Op::PutDead {
                        queue: "q".into(),
                        id: "c".into(),
                        bytes: serde_json::to_vec(&task(3)).unwrap(),
                    },
                    Op::Counters {
                        queue: "q".into(),
                        counters: Counters {
                            enqueued: 3,
                            acked: 1,
                            failed: 0,
                            refused: 2,
                            stray_acks: 4,
                        },
                    },
                ])
                .unwrap();
        }
        let store = Store::open(&dir).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.tasks.len(), 1);
        assert_eq!(loaded.tasks[0].1, "b");
        assert_eq!(loaded.dead[0].1, "c");
        assert_eq!(loaded.counters["q"].enqueued, 3);
        assert_eq!(loaded.counters["q"].refused, 2);
        let bodies = store.read_bodies(&[1, 2]).unwrap();
        assert!(bodies[0].is_none(), "deleted with its task");
        assert_eq!(bodies[1].as_ref().unwrap().payload.get(), "{\"n\":2}");
        drop(store);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_store_whose_creation_was_killed_is_created_again_but_nothing_else_is_replaced() {
        let dir = temp_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("queues.redb");
        // What redb leaves when killed before it writes the magic number.
        std::fs::write(&path, vec![0u8; 64 * 1024]).unwrap();
        let store = Store::open(&dir).unwrap();
        store.commit(&[put("a", 1)]).unwrap();
        drop(store);
        assert_eq!(Store::open(&dir).unwrap().load().unwrap().tasks.len(), 1);
        // A file that is something else is an error, and stays as it was.
        std::fs::write(&path, b"not a queue store").unwrap();
        assert!(matches!(Store::open(&dir), Err(StoreError::Open { .. })));
        assert_eq!(std::fs::read(&path).unwrap(), b"not a queue store");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_last_op_on_a_key_in_a_batch_wins() {
        let dir = temp_dir();
        let store = Store::open(&dir).unwrap();
        let delete = |id: &str| Op::Delete {
            queue: "q".into(),
            id: id.into(),
        };
        let counters = |acked| Op::Counters {
            queue: "q".into(),
            counters: Counters {
                enqueued: 3,
                acked,
                ..Counters::default()
            },
        };
        store
            .commit(&[
                put("gone", 1),
                put("kept", 2),
                counters(1),
                put("gone", 1),
                delete("gone"),
                delete("kept"),
                put("kept", 7),
                counters(2),
            ])
            .unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.tasks.len(), 1);
        assert_eq!(loaded.tasks[0].1, "kept");
        assert_eq!(loaded.tasks[0].2.seq, 7);
        assert_eq!(loaded.counters["q"].acked, 2);
        drop(store);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A store written by a version that kept bodies inside the records
    /// opens with every task, its body moved to `bodies`.
    #[test]
    fn records_of_the_earlier_layout_have_their_bodies_moved_out() {
        let dir = temp_dir();
        std::fs::create_dir_all(&dir).unwrap();
        {
            let db = Database::create(dir.join("queues.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut tasks = txn.open_table(TASKS).unwrap();
                let mut dead = txn.open_table(DEAD).unwrap();
                let old = |seq: u64, worker: &str| {
                    serde_json::json!({
                        "seq": seq, "payload": {"n": seq}, "created_at": 5,
                        "attempts": 1, "max_attempts": 5, "reply_to": "r/t",
                        "worker": worker,
                    })
                    .to_string()
                };
                for seq in 1..=600u64 {
                    let id = format!("t{seq:04}");
                    tasks
                        .insert(("q", id.as_str()), old(seq, "w").as_bytes())
                        .unwrap();
                }
                dead.insert(("q", "d"), old(900, "").as_bytes()).unwrap();
            }
            txn.commit().unwrap();
        }
        let store = Store::open(&dir).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!((loaded.tasks.len(), loaded.dead.len()), (600, 1));
        let (_, id, first) = &loaded.tasks[0];
        assert_eq!((id.as_str(), first.seq, first.attempts), ("t0001", 1, 1));
        assert_eq!(first.worker.as_deref(), Some("w"));
        assert_eq!(first.size, "{\"n\":1}".len() as u64 + "r/t".len() as u64);
        let bodies = store.read_bodies(&[1, 600, 900]).unwrap();
        let text = |i: usize| bodies[i].as_ref().unwrap().payload.get().to_string();
        assert_eq!(
            (text(0), text(1), text(2)),
            (
                "{\"n\":1}".into(),
                "{\"n\":600}".into(),
                "{\"n\":900}".into()
            )
        );
        assert_eq!(bodies[0].as_ref().unwrap().reply_to.as_deref(), Some("r/t"));
        drop(store);
        let _ = std::fs::remove_dir_all(dir);
    }
}
