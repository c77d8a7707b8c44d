//! The durable side of the queues: one redb file in the data directory.
//!
//! The owner keeps every live task in memory for dispatch and mirrors each
//! change here; this module only knows how to load that mirror at start and
//! how to apply one batch of changes as one fsynced transaction (the group
//! commit). It runs on a plain thread of its own because redb is blocking.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// (queue, task id) → [`StoredTask`] JSON. Live tasks: waiting or in flight.
const TASKS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("tasks");
/// (queue, task id) → [`StoredTask`] JSON of dead-lettered tasks.
const DEAD: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("dead");
/// queue → [`Counters`] JSON, so totals survive restarts.
const COUNTERS: TableDefinition<&str, &[u8]> = TableDefinition::new("counters");

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
}

/// A task as it sits on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredTask {
    pub seq: u64,
    pub payload: Box<RawValue>,
    pub created_at: u64,
    pub attempts: u32,
    pub max_attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// Unix ms before which the task is not delivered.
    #[serde(default)]
    pub not_before: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The worker holding it, when in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
}

/// Per-queue totals.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counters {
    pub enqueued: u64,
    pub acked: u64,
    pub failed: u64,
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
    Counters(&'a str),
}

impl Op {
    fn key(&self) -> Key<'_> {
        match self {
            Op::Put { queue, id, .. } | Op::Delete { queue, id } => Key::Task(queue, id),
            Op::PutDead { queue, id, .. } | Op::DeleteDead { queue, id } => Key::Dead(queue, id),
            Op::Counters { queue, .. } => Key::Counters(queue),
        }
    }
}

/// Everything found on disk at start.
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
        let db = match Database::create(&path) {
            Ok(db) => db,
            Err(err) if never_initialised(&path) => {
                tracing::warn!(path = %path.display(), %err, "the queue store was never fully created (a start was killed while creating it); creating it again");
                std::fs::remove_file(&path).map_err(|e| open_err(e.into()))?;
                Database::create(&path).map_err(open_err)?
            }
            Err(err) => return Err(open_err(err)),
        };
        // Create the tables so that a fresh store can be read at once.
        let txn = db.begin_write()?;
        txn.open_table(TASKS)?;
        txn.open_table(DEAD)?;
        txn.open_table(COUNTERS)?;
        txn.commit()?;
        Ok(Self { db })
    }

    pub fn load(&self) -> Result<Loaded, StoreError> {
        let txn = self.db.begin_read()?;
        let mut loaded = Loaded::default();
        for (def, out) in [(TASKS, &mut loaded.tasks), (DEAD, &mut loaded.dead)] {
            let table = txn.open_table(def)?;
            for row in table.iter()? {
                let (key, value) = row?;
                let (queue, id) = key.value();
                let task: StoredTask = serde_json::from_slice(value.value()).map_err(|source| {
                    StoreError::Corrupt {
                        key: format!("{queue}/{id}"),
                        source,
                    }
                })?;
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

    /// Applies `ops` in one transaction and returns once it is on disk.
    /// Each op sets the whole state of its key, so only the last op on a
    /// key in the batch is written.
    pub fn commit(&self, ops: &[Op]) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        {
            let mut tasks = txn.open_table(TASKS)?;
            let mut dead = txn.open_table(DEAD)?;
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
                    Op::Counters { queue, counters: c } => {
                        // Counters serialize infallibly (three integers).
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
            payload: RawValue::from_string("{\"n\":1}".into()).unwrap(),
            created_at: 1,
            attempts: 0,
            max_attempts: 5,
            reply_to: None,
            correlation_id: None,
            not_before: 0,
            reason: None,
            worker: None,
        }
    }

    fn put(id: &str, seq: u64) -> Op {
        Op::Put {
            queue: "q".into(),
            id: id.into(),
            bytes: serde_json::to_vec(&task(seq)).unwrap(),
        }
    }

    #[test]
    fn batches_survive_reopen() {
        let dir = std::env::temp_dir().join(format!("axion-store-{}", uuid::Uuid::new_v4()));
        {
            let store = Store::open(&dir).unwrap();
            store.commit(&[put("a", 1), put("b", 2)]).unwrap();
            store
                .commit(&[
                    Op::Delete {
                        queue: "q".into(),
                        id: "a".into(),
                    },
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
        drop(store);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_store_whose_creation_was_killed_is_created_again_but_nothing_else_is_replaced() {
        let dir = std::env::temp_dir().join(format!("axion-store-{}", uuid::Uuid::new_v4()));
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
        let dir = std::env::temp_dir().join(format!("axion-store-{}", uuid::Uuid::new_v4()));
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
                failed: 0,
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
}
