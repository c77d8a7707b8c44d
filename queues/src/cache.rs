//! Task bodies in memory: a bounded cache in front of the store's
//! `bodies` table, keyed by task seq.
//!
//! A body the store does not hold yet (its task was accepted and its first
//! commit has not finished) is the only copy there is, so it stays until
//! that commit is on disk; the commit takes it from here. Every other body
//! may be dropped at any time and read again, and the cache keeps at most
//! its byte limit of them, least recently used going first. A delivered
//! task's body goes to the far end of that line: it is only needed again
//! if the delivery fails, while the bodies read for the head of a queue are
//! about to be delivered.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::store::{Body, Op};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// Not on disk and not in a commit yet.
    Unwritten,
    /// In the commit under way.
    Committing,
    /// On disk; may be dropped. The tick orders the least recently used.
    Kept(i64),
}

#[derive(Debug)]
struct Entry {
    body: Arc<Body>,
    size: u64,
    held: Held,
    /// Delivered while it could not be dropped: it goes to the far end of
    /// the line once it can.
    delivered: bool,
}

#[derive(Debug)]
pub struct Cache {
    limit: u64,
    bytes: u64,
    entries: HashMap<u64, Entry>,
    /// Droppable entries, least recently used first: tick → seq.
    order: BTreeMap<i64, u64>,
    /// Ticks handed out above and below every tick in use.
    newest: i64,
    oldest: i64,
    /// Seqs inserted as [`Held::Unwritten`], for the next commit to take
    /// (an entry dropped with its task since is skipped).
    unwritten: Vec<u64>,
    /// Seqs in the commit under way.
    committing: Vec<u64>,
}

impl Cache {
    /// A cache that keeps at most `limit` bytes of bodies that are on disk.
    pub fn new(limit: u64) -> Self {
        Self {
            limit,
            bytes: 0,
            entries: HashMap::new(),
            order: BTreeMap::new(),
            newest: 0,
            oldest: 0,
            unwritten: Vec::new(),
            committing: Vec::new(),
        }
    }

    /// Bytes of bodies held, those not on disk yet included.
    #[cfg(test)]
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn get(&self, seq: u64) -> Option<Arc<Body>> {
        self.entries.get(&seq).map(|e| e.body.clone())
    }

    pub fn contains(&self, seq: u64) -> bool {
        self.entries.contains_key(&seq)
    }

    fn unlink(&mut self, held: Held) {
        if let Held::Kept(tick) = held {
            self.order.remove(&tick);
        }
    }

    fn keep(&mut self, seq: u64, oldest: bool) {
        let tick = if oldest {
            self.oldest -= 1;
            self.oldest
        } else {
            self.newest += 1;
            self.newest
        };
        if let Some(entry) = self.entries.get_mut(&seq) {
            entry.held = Held::Kept(tick);
            self.order.insert(tick, seq);
        }
    }

    /// The body of a task just accepted: held until it is on disk.
    pub fn insert_new(&mut self, seq: u64, body: Arc<Body>) {
        let size = body.size();
        if let Some(old) = self.entries.insert(
            seq,
            Entry {
                body,
                size,
                held: Held::Unwritten,
                delivered: false,
            },
        ) {
            self.bytes -= old.size;
            self.unlink(old.held);
        }
        self.bytes += size;
        self.unwritten.push(seq);
    }

    /// A body read from the store. It may push the cache over its limit
    /// until the next [`Cache::trim`], so that what was read for a delivery
    /// is still there when the delivery is made.
    pub fn insert_read(&mut self, seq: u64, body: Body) {
        if self.entries.contains_key(&seq) {
            return;
        }
        let size = body.size();
        self.entries.insert(
            seq,
            Entry {
                body: Arc::new(body),
                size,
                held: Held::Kept(0),
                delivered: false,
            },
        );
        self.bytes += size;
        self.keep(seq, false);
    }

    /// The task was delivered: its body is the first to go.
    pub fn delivered(&mut self, seq: u64) {
        let Some(entry) = self.entries.get_mut(&seq) else {
            return;
        };
        match entry.held {
            Held::Kept(tick) => {
                self.order.remove(&tick);
                self.keep(seq, true);
            }
            Held::Unwritten | Held::Committing => entry.delivered = true,
        }
    }

    /// The task ended: its body leaves the cache. True if the store holds
    /// it (or will, once the commit under way is done), so that it must be
    /// deleted there.
    pub fn forget(&mut self, seq: u64) -> bool {
        match self.entries.remove(&seq) {
            Some(entry) => {
                self.bytes -= entry.size;
                self.unlink(entry.held);
                entry.held != Held::Unwritten
            }
            // Only bodies on disk are ever dropped.
            None => true,
        }
    }

    /// The task was dead-lettered: its body is not needed for dispatch
    /// any more, but one not on disk yet must still be written.
    pub fn retire(&mut self, seq: u64) {
        match self.entries.get(&seq).map(|e| e.held) {
            Some(Held::Kept(_)) => {
                self.forget(seq);
            }
            Some(Held::Unwritten | Held::Committing) => self.delivered(seq),
            None => {}
        }
    }

    /// Store ops for the bodies not on disk yet, for the commit about to
    /// start.
    pub fn take_writes(&mut self, ops: &mut Vec<Op>) {
        for seq in std::mem::take(&mut self.unwritten) {
            let Some(entry) = self.entries.get_mut(&seq) else {
                continue;
            };
            if entry.held != Held::Unwritten {
                continue;
            }
            entry.held = Held::Committing;
            ops.push(Op::PutBody {
                seq,
                body: entry.body.clone(),
            });
            self.committing.push(seq);
        }
    }

    /// The commit under way is on disk: what it wrote may be dropped.
    pub fn committed(&mut self) {
        for seq in std::mem::take(&mut self.committing) {
            let delivered = match self.entries.get(&seq) {
                Some(entry) if entry.held == Held::Committing => entry.delivered,
                _ => continue,
            };
            self.keep(seq, delivered);
        }
    }

    /// Drops the least recently used bodies that are on disk until the
    /// cache is within its limit (bodies not on disk yet cannot go).
    pub fn trim(&mut self) {
        while self.bytes > self.limit {
            let Some((_, seq)) = self.order.pop_first() else {
                break;
            };
            if let Some(entry) = self.entries.remove(&seq) {
                self.bytes -= entry.size;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    fn body(len: usize) -> Body {
        Body {
            payload: RawValue::from_string(format!("\"{}\"", "x".repeat(len - 2))).unwrap(),
            reply_to: None,
            correlation_id: None,
        }
    }

    fn written(ops: &[Op]) -> Vec<u64> {
        ops.iter()
            .filter_map(|op| match op {
                Op::PutBody { seq, .. } => Some(*seq),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn bodies_not_on_disk_stay_until_their_commit_is_done() {
        let mut cache = Cache::new(100);
        for seq in 1..=3 {
            cache.insert_new(seq, Arc::new(body(60)));
        }
        cache.trim();
        assert_eq!(cache.bytes(), 180, "none is on disk yet");
        let mut ops = Vec::new();
        cache.take_writes(&mut ops);
        assert_eq!(written(&ops), [1, 2, 3]);
        cache.trim();
        assert_eq!(cache.bytes(), 180, "the commit is not done");
        cache.committed();
        cache.trim();
        assert_eq!(cache.bytes(), 60);
        assert!(
            cache.contains(3) && !cache.contains(1),
            "least recent first"
        );
    }

    #[test]
    fn a_task_that_ends_before_its_commit_is_never_written_nor_deleted() {
        let mut cache = Cache::new(1000);
        cache.insert_new(1, Arc::new(body(10)));
        cache.insert_new(2, Arc::new(body(10)));
        assert!(!cache.forget(1), "nothing to delete on disk");
        let mut ops = Vec::new();
        cache.take_writes(&mut ops);
        assert_eq!(written(&ops), [2]);
        assert!(cache.forget(2), "written by the commit under way");
        assert!(cache.forget(3), "a body not cached is on disk");
    }

    #[test]
    fn delivered_bodies_go_first() {
        let mut cache = Cache::new(100);
        for seq in 1..=2 {
            cache.insert_read(seq, body(40));
        }
        cache.delivered(2);
        cache.insert_read(3, body(40));
        cache.trim();
        assert!(cache.contains(1) && cache.contains(3) && !cache.contains(2));
        // Delivered before its commit: first to go once it is on disk.
        cache.insert_new(4, Arc::new(body(40)));
        cache.delivered(4);
        let mut ops = Vec::new();
        cache.take_writes(&mut ops);
        cache.committed();
        cache.trim();
        assert!(cache.contains(1) && cache.contains(3) && !cache.contains(4));
    }

    #[test]
    fn a_dead_letter_not_on_disk_is_still_written() {
        let mut cache = Cache::new(0);
        cache.insert_new(1, Arc::new(body(10)));
        cache.retire(1);
        let mut ops = Vec::new();
        cache.take_writes(&mut ops);
        assert_eq!(written(&ops), [1]);
        cache.committed();
        cache.trim();
        assert!(!cache.contains(1));
    }
}
