//! The broker state that changes with traffic, on disk as an append-only
//! log: what kept sessions are owed, and retained messages.
//!
//! A kept session's queue is written once and read once, in order: a
//! message is appended when it is captured and deleted when the client
//! acknowledges it. A retained message is written on every retained
//! publish and read only at start (memory is the read path). In a B-tree
//! every group commit rewrote a page per message (a retained topic lands
//! at a random key; a `pwrite` and a disk request each); here a commit is
//! one sequential `write` and one `fdatasync`, whatever it holds.
//!
//! The log is a directory of segments (`<n>.log`, [`SEGMENT_BYTES`] each
//! at most), each a run of records `[crc32 of body][body length][body]`,
//! body `[kind][id length][id][sequence][value]`; the id is a router
//! client id for a queue's records and a router-form topic for a retained
//! message's (sequence 0). Memory holds an index: for each queue, sequence
//! → where its value is; for each retained topic, where its message is. A
//! deletion is a small record of its own.
//!
//! Segments go oldest first, once nothing in them is live: a deletion
//! record may only go once what it deleted is gone, or a restart would
//! bring the message back. A live message that pins an old segment while
//! newer ones pile up is copied to the head (same queue, same sequence)
//! so that segment can go too; the disk used stays within about twice
//! what is live plus two segments.
//!
//! At start every segment is read in order to rebuild the index. A record
//! cut short or failing its checksum ends the log (a write torn by a
//! crash, which nobody was acknowledged for): the last segment is
//! truncated there.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::disk::QueueSummary;

/// A segment is closed and a new one begun past this size.
pub const SEGMENT_BYTES: u64 = 32 * 1024 * 1024;

/// The head segment's file is zero-filled this far ahead of its records.
/// Writing over bytes the file already has needs no change to its size or
/// extents, so the `fdatasync` of a commit is a data flush alone, not also
/// a filesystem journal commit: about half the time of an append here.
/// Zeros past the last record read as the end of the log.
const PREALLOCATE: u64 = 4 * 1024 * 1024;

/// No record is larger (a message is at most 256 MiB in MQTT; anything
/// larger is garbage from a torn write).
const MAX_BODY: u32 = 300 * 1024 * 1024;

const PUT: u8 = 1;
const DELETE: u8 = 2;
const DELETE_QUEUE: u8 = 3;
const RETAIN: u8 = 4;
const UNRETAIN: u8 = 5;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("broker state log {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One change to the log.
#[derive(Debug)]
pub enum Change<'a> {
    /// Message `seq` of a queue, its value.
    Put(&'a str, u64, &'a [u8]),
    /// Message `seq` of a queue is delivered.
    Delete(&'a str, u64),
    /// A whole queue goes (its session ended).
    DeleteQueue(&'a str),
    /// The retained message of a topic (replacing the one before).
    Retain(&'a str, &'a [u8]),
    /// The retained message of a topic is cleared.
    Unretain(&'a str),
}

/// Where a message's value is.
#[derive(Debug, Clone, Copy)]
struct Loc {
    segment: u64,
    at: u64,
    len: u32,
}

#[derive(Debug, Default)]
struct Segment {
    /// Bytes in the file.
    len: u64,
    /// Messages in it not deleted yet, and their value bytes.
    live: u64,
    live_bytes: u64,
}

/// Where every live message is, and what each segment holds.
#[derive(Default)]
struct Index {
    queues: HashMap<String, BTreeMap<u64, Loc>>,
    retained: HashMap<String, Loc>,
    segments: BTreeMap<u64, Segment>,
}

struct State {
    index: Index,
    /// The segment appended to, and its file.
    head: u64,
    file: File,
    /// The head file's length: its records, then zeros (see
    /// [`PREALLOCATE`]).
    allocated: u64,
}

/// The log of every kept session's queue and every retained message.
pub struct StateLog {
    dir: PathBuf,
    state: Mutex<State>,
}

impl std::fmt::Debug for StateLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StateLog({})", self.dir.display())
    }
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:010}.log"))
}

/// Appends the record of `change` to `out`; the offset of its value in
/// `out`, for a put.
fn encode(out: &mut Vec<u8>, change: &Change<'_>) -> Option<usize> {
    let (kind, id, seq, value) = match *change {
        Change::Put(id, seq, value) => (PUT, id, seq, value),
        Change::Delete(id, seq) => (DELETE, id, seq, &[][..]),
        Change::DeleteQueue(id) => (DELETE_QUEUE, id, 0, &[][..]),
        Change::Retain(topic, value) => (RETAIN, topic, 0, value),
        Change::Unretain(topic) => (UNRETAIN, topic, 0, &[][..]),
    };
    let id = &id.as_bytes()[..id.len().min(usize::from(u16::MAX))];
    let start = out.len();
    out.extend_from_slice(&[0; 8]);
    out.push(kind);
    out.extend_from_slice(&(id.len() as u16).to_le_bytes());
    out.extend_from_slice(id);
    out.extend_from_slice(&seq.to_le_bytes());
    let value_at = out.len();
    out.extend_from_slice(value);
    let body = &out[start + 8..];
    let crc = crc32fast::hash(body);
    let len = body.len() as u32;
    out[start..start + 4].copy_from_slice(&crc.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&len.to_le_bytes());
    matches!(kind, PUT | RETAIN).then_some(value_at)
}

/// A record read back: kind, id, sequence, and where its value is in the
/// buffer.
struct Record<'a> {
    kind: u8,
    id: &'a str,
    seq: u64,
    value_at: usize,
    value_len: usize,
    /// Offset just past it.
    end: usize,
}

fn decode(buf: &[u8], at: usize) -> Option<Record<'_>> {
    let head = buf.get(at..at + 8)?;
    let crc = u32::from_le_bytes(head[..4].try_into().ok()?);
    let len = u32::from_le_bytes(head[4..].try_into().ok()?);
    if len > MAX_BODY {
        return None;
    }
    let body = buf.get(at + 8..at + 8 + len as usize)?;
    if crc32fast::hash(body) != crc {
        return None;
    }
    let kind = *body.first()?;
    let id_len = usize::from(u16::from_le_bytes(body.get(1..3)?.try_into().ok()?));
    let id = std::str::from_utf8(body.get(3..3 + id_len)?).ok()?;
    let seq = u64::from_le_bytes(body.get(3 + id_len..11 + id_len)?.try_into().ok()?);
    if !matches!(kind, PUT | DELETE | DELETE_QUEUE | RETAIN | UNRETAIN) {
        return None;
    }
    Some(Record {
        kind,
        id,
        seq,
        value_at: at + 8 + 11 + id_len,
        value_len: len as usize - 11 - id_len,
        end: at + 8 + len as usize,
    })
}

impl Index {
    fn put(&mut self, id: &str, seq: u64, loc: Loc) {
        let queue = match self.queues.get_mut(id) {
            Some(q) => q,
            None => self.queues.entry(id.to_string()).or_default(),
        };
        if let Some(old) = queue.insert(seq, loc) {
            forget(&mut self.segments, old);
        }
        let segment = self.segments.entry(loc.segment).or_default();
        segment.live += 1;
        segment.live_bytes += u64::from(loc.len);
    }

    fn delete(&mut self, id: &str, seq: u64) {
        let Some(queue) = self.queues.get_mut(id) else {
            return;
        };
        if let Some(old) = queue.remove(&seq) {
            forget(&mut self.segments, old);
        }
        if queue.is_empty() {
            self.queues.remove(id);
        }
    }

    fn delete_queue(&mut self, id: &str) {
        for (_, old) in self.queues.remove(id).unwrap_or_default() {
            forget(&mut self.segments, old);
        }
    }

    fn retain(&mut self, topic: &str, loc: Loc) {
        let old = match self.retained.get_mut(topic) {
            Some(slot) => Some(std::mem::replace(slot, loc)),
            None => self.retained.insert(topic.to_string(), loc),
        };
        if let Some(old) = old {
            forget(&mut self.segments, old);
        }
        let segment = self.segments.entry(loc.segment).or_default();
        segment.live += 1;
        segment.live_bytes += u64::from(loc.len);
    }

    fn unretain(&mut self, topic: &str) {
        if let Some(old) = self.retained.remove(topic) {
            forget(&mut self.segments, old);
        }
    }

    fn apply(&mut self, kind: u8, id: &str, seq: u64, loc: Loc) {
        match kind {
            PUT => self.put(id, seq, loc),
            DELETE => self.delete(id, seq),
            DELETE_QUEUE => self.delete_queue(id),
            RETAIN => self.retain(id, loc),
            _ => self.unretain(id),
        }
    }
}

fn forget(segments: &mut BTreeMap<u64, Segment>, loc: Loc) {
    if let Some(s) = segments.get_mut(&loc.segment) {
        s.live = s.live.saturating_sub(1);
        s.live_bytes = s.live_bytes.saturating_sub(u64::from(loc.len));
    }
}

impl StateLog {
    /// Opens (or creates) the log in `dir` and rebuilds its index: what
    /// each queue holds.
    pub fn open(dir: &Path) -> Result<(Self, HashMap<String, QueueSummary>), LogError> {
        let io = |source| LogError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut numbers: Vec<u64> = std::fs::read_dir(dir)
            .map_err(io)?
            .filter_map(|e| {
                let name = e.ok()?.file_name();
                name.to_str()?.strip_suffix(".log")?.parse().ok()
            })
            .collect();
        numbers.sort_unstable();
        let mut index = Index::default();
        for (i, &n) in numbers.iter().enumerate() {
            let path = segment_path(dir, n);
            let at_path = |source| LogError::Io {
                path: path.clone(),
                source,
            };
            let buf = std::fs::read(&path).map_err(at_path)?;
            index.segments.entry(n).or_default();
            let mut at = 0;
            while at < buf.len() {
                let Some(r) = decode(&buf, at) else { break };
                let loc = Loc {
                    segment: n,
                    at: r.value_at as u64,
                    len: r.value_len as u32,
                };
                index.apply(r.kind, r.id, r.seq, loc);
                at = r.end;
            }
            let zeros = buf[at..].iter().all(|b| *b == 0);
            if at < buf.len() && !zeros {
                tracing::warn!(
                    file = %path.display(),
                    valid = at,
                    len = buf.len(),
                    last = i + 1 == numbers.len(),
                    "state log ends in a torn or damaged record; what follows it is dropped"
                );
                let file = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(at_path)?;
                file.set_len(at as u64)
                    .and_then(|()| file.sync_all())
                    .map_err(at_path)?;
            }
            if let Some(s) = index.segments.get_mut(&n) {
                s.len = at as u64;
            }
        }
        let head = numbers.last().copied().unwrap_or(1);
        index.segments.entry(head).or_default();
        let path = segment_path(dir, head);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|source| LogError::Io {
                path: path.clone(),
                source,
            })?;
        let allocated = file
            .metadata()
            .map_err(|source| LogError::Io { path, source })?
            .len();
        sync_dir(dir).map_err(io)?;
        let log = Self {
            dir: dir.to_path_buf(),
            state: Mutex::new(State {
                index,
                head,
                file,
                allocated,
            }),
        };
        let summaries = log.summaries();
        Ok((log, summaries))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn err(&self, source: std::io::Error) -> LogError {
        LogError::Io {
            path: self.dir.clone(),
            source,
        }
    }

    /// Writes `changes` as one write and one `fdatasync`; then drops what
    /// nothing needs any more. On error nothing of the batch is in the
    /// index.
    pub fn append(&self, changes: &[Change<'_>]) -> Result<(), LogError> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut state = self.lock();
        let base = state.index.segments.get(&state.head).map_or(0, |s| s.len);
        let mut out = Vec::new();
        let mut puts = Vec::new();
        for change in changes {
            let value_at = encode(&mut out, change);
            puts.push(value_at);
        }
        if let Err(e) = write_head(&mut state, base, &out) {
            // Part of the batch may be in the file: what follows goes to
            // a new segment, so a restart cuts this one there and still
            // reads everything after it.
            if let Err(roll) = self.start_segment(&mut state) {
                tracing::error!(error = %roll, "state log: no new segment after a failed write");
            }
            return Err(self.err(e));
        }
        let head = state.head;
        if let Some(s) = state.index.segments.get_mut(&head) {
            s.len += out.len() as u64;
        }
        for (change, value_at) in changes.iter().zip(puts) {
            let loc = |value: &[u8]| Loc {
                segment: head,
                at: base + value_at.unwrap_or(0) as u64,
                len: value.len() as u32,
            };
            match *change {
                Change::Put(id, seq, value) => state.index.put(id, seq, loc(value)),
                Change::Delete(id, seq) => state.index.delete(id, seq),
                Change::DeleteQueue(id) => state.index.delete_queue(id),
                Change::Retain(topic, value) => state.index.retain(topic, loc(value)),
                Change::Unretain(topic) => state.index.unretain(topic),
            }
        }
        self.tidy(&mut state)
    }

    /// Starts a new segment once the head is full, removes the oldest
    /// segments once nothing in them is live, and copies what pins the
    /// oldest one forward when the disk holds much more than is live.
    fn tidy(&self, state: &mut State) -> Result<(), LogError> {
        if state.index.segments.get(&state.head).map_or(0, |s| s.len) >= SEGMENT_BYTES {
            self.start_segment(state)?;
        }
        loop {
            let Some((&oldest, segment)) = state.index.segments.first_key_value() else {
                return Ok(());
            };
            if oldest == state.head {
                return Ok(());
            }
            if segment.live > 0 {
                let on_disk: u64 = state.index.segments.values().map(|s| s.len).sum();
                let live: u64 = state.index.segments.values().map(|s| s.live_bytes).sum();
                if on_disk <= 2 * live + 2 * SEGMENT_BYTES {
                    return Ok(());
                }
                self.move_forward(state, oldest)?;
            }
            let path = segment_path(&self.dir, oldest);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(LogError::Io { path, source }),
            }
            state.index.segments.remove(&oldest);
        }
    }

    /// Closes the head segment and begins the next.
    fn start_segment(&self, state: &mut State) -> Result<(), LogError> {
        let next = state.head + 1;
        let path = segment_path(&self.dir, next);
        state.file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| LogError::Io { path, source })?;
        sync_dir(&self.dir).map_err(|e| self.err(e))?;
        state.allocated = 0;
        state.head = next;
        state.index.segments.insert(next, Segment::default());
        Ok(())
    }

    /// Copies the live messages of segment `n` to the head, so it can go.
    fn move_forward(&self, state: &mut State, n: u64) -> Result<(), LogError> {
        let path = segment_path(&self.dir, n);
        let file = File::open(&path).map_err(|source| LogError::Io {
            path: path.clone(),
            source,
        })?;
        let read = |loc: &Loc| {
            let mut value = vec![0; loc.len as usize];
            file.read_exact_at(&mut value, loc.at)
                .map(|()| value)
                .map_err(|source| LogError::Io {
                    path: path.clone(),
                    source,
                })
        };
        // (id, sequence or None for a retained message, value)
        let mut pinned = Vec::new();
        for (id, queue) in &state.index.queues {
            for (&seq, loc) in queue {
                if loc.segment == n {
                    pinned.push((id.clone(), Some(seq), read(loc)?));
                }
            }
        }
        for (topic, loc) in &state.index.retained {
            if loc.segment == n {
                pinned.push((topic.clone(), None, read(loc)?));
            }
        }
        tracing::debug!(
            segment = n,
            messages = pinned.len(),
            "state log: live messages copied forward"
        );
        let changes: Vec<Change<'_>> = pinned
            .iter()
            .map(|(id, seq, value)| match seq {
                Some(seq) => Change::Put(id, *seq, value),
                None => Change::Retain(id, value),
            })
            .collect();
        let base = state.index.segments.get(&state.head).map_or(0, |s| s.len);
        let mut out = Vec::new();
        let mut at = Vec::new();
        for change in &changes {
            at.push(encode(&mut out, change).unwrap_or(0));
        }
        write_head(state, base, &out).map_err(|e| self.err(e))?;
        let head = state.head;
        if let Some(s) = state.index.segments.get_mut(&head) {
            s.len += out.len() as u64;
        }
        for ((id, seq, value), value_at) in pinned.iter().zip(at) {
            let loc = Loc {
                segment: head,
                at: base + value_at as u64,
                len: value.len() as u32,
            };
            match seq {
                Some(seq) => state.index.put(id, *seq, loc),
                None => state.index.retain(id, loc),
            }
        }
        Ok(())
    }

    /// Up to `limit` messages of the queue `id` with sequence numbers in
    /// `from..=to`, oldest first: (sequence, value).
    pub fn read(
        &self,
        id: &str,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, LogError> {
        // Under the lock: no segment goes while it is read.
        let state = self.lock();
        let Some(queue) = state.index.queues.get(id) else {
            return Ok(Vec::new());
        };
        let mut files: HashMap<u64, File> = HashMap::new();
        let mut out = Vec::new();
        for (&seq, loc) in queue.range(from..=to).take(limit) {
            let file = match files.entry(loc.segment) {
                std::collections::hash_map::Entry::Occupied(f) => f.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    let path = segment_path(&self.dir, loc.segment);
                    v.insert(File::open(&path).map_err(|source| LogError::Io { path, source })?)
                }
            };
            let mut value = vec![0; loc.len as usize];
            file.read_exact_at(&mut value, loc.at)
                .map_err(|e| self.err(e))?;
            out.push((seq, value));
        }
        Ok(out)
    }

    /// Every retained message: (router-form topic, value). Read once, at
    /// start; each segment holding one is read whole, once.
    pub fn retained(&self) -> Result<Vec<(String, Vec<u8>)>, LogError> {
        let state = self.lock();
        let mut by_segment: BTreeMap<u64, Vec<(&String, &Loc)>> = BTreeMap::new();
        for (topic, loc) in &state.index.retained {
            by_segment
                .entry(loc.segment)
                .or_default()
                .push((topic, loc));
        }
        let mut out = Vec::with_capacity(state.index.retained.len());
        for (n, entries) in by_segment {
            let path = segment_path(&self.dir, n);
            let buf = std::fs::read(&path).map_err(|source| LogError::Io { path, source })?;
            for (topic, loc) in entries {
                let at = loc.at as usize;
                if let Some(value) = buf.get(at..at + loc.len as usize) {
                    out.push((topic.clone(), value.to_vec()));
                }
            }
        }
        Ok(out)
    }

    /// What each queue holds.
    pub fn summaries(&self) -> HashMap<String, QueueSummary> {
        self.lock()
            .index
            .queues
            .iter()
            .map(|(id, q)| {
                let summary = QueueSummary {
                    messages: q.len() as u64,
                    bytes: q.values().map(|l| u64::from(l.len)).sum(),
                    last_seq: q.keys().next_back().copied().unwrap_or(0),
                };
                (id.clone(), summary)
            })
            .collect()
    }

    /// Bytes the log takes on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.lock().index.segments.values().map(|s| s.len).sum()
    }
}

/// Writes `out` at `at` in the head segment and makes it durable,
/// zero-filling the file further ahead first when `out` would pass its end
/// (that one `fdatasync` also carries the new length).
fn write_head(state: &mut State, at: u64, out: &[u8]) -> std::io::Result<()> {
    let end = at + out.len() as u64;
    if end > state.allocated {
        let to = end + PREALLOCATE;
        let zeros = vec![0u8; 64 * 1024];
        let mut from = state.allocated.max(end);
        while from < to {
            let n = (to - from).min(zeros.len() as u64) as usize;
            state.file.write_all_at(&zeros[..n], from)?;
            from += n as u64;
        }
        state.allocated = to;
    }
    state.file.write_all_at(out, at)?;
    state.file.sync_data()
}

/// Makes a new segment's directory entry durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> (StateLog, HashMap<String, QueueSummary>) {
        StateLog::open(dir).unwrap()
    }

    #[test]
    fn what_is_appended_comes_back_after_a_reopen_without_what_was_deleted() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (log, found) = open(dir.path());
            assert!(found.is_empty());
            log.append(&[
                Change::Put("a", 1, b"one"),
                Change::Put("a", 2, b"two"),
                Change::Put("b", 7, b"seven"),
            ])
            .unwrap();
            log.append(&[Change::Delete("a", 1), Change::Put("a", 3, b"three")])
                .unwrap();
            log.append(&[Change::DeleteQueue("b")]).unwrap();
            assert_eq!(
                log.read("a", 0, u64::MAX, 10).unwrap(),
                vec![(2, b"two".to_vec()), (3, b"three".to_vec())]
            );
        }
        let (log, found) = open(dir.path());
        assert_eq!(found.len(), 1);
        assert_eq!(
            found["a"],
            QueueSummary {
                messages: 2,
                bytes: 8,
                last_seq: 3
            }
        );
        assert_eq!(
            log.read("a", 3, 3, 10).unwrap(),
            vec![(3, b"three".to_vec())]
        );
        assert!(log.read("b", 0, u64::MAX, 10).unwrap().is_empty());
    }

    #[test]
    fn a_torn_tail_is_cut_and_what_came_before_it_stays() {
        let dir = tempfile::tempdir().unwrap();
        let len = {
            let (log, _) = open(dir.path());
            log.append(&[Change::Put("a", 1, b"one")]).unwrap();
            log.append(&[Change::Put("a", 2, b"two")]).unwrap();
            log.disk_bytes()
        };
        let path = segment_path(dir.path(), 1);
        // Zeros are written ahead of the records.
        assert!(std::fs::metadata(&path).unwrap().len() >= PREALLOCATE);
        // The last record loses its final bytes, as a crash mid-write would:
        // the zeros written ahead of it are still there.
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(&[0, 0], len - 2)
            .unwrap();
        let (log, found) = open(dir.path());
        assert_eq!(found["a"].messages, 1);
        assert_eq!(log.read("a", 0, 9, 9).unwrap(), vec![(1, b"one".to_vec())]);
        // And the log goes on from there.
        log.append(&[Change::Put("a", 5, b"five")]).unwrap();
        drop(log);
        let (_, found) = open(dir.path());
        assert_eq!(found["a"].messages, 2);
    }

    #[test]
    fn a_retained_message_is_replaced_cleared_and_kept_through_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let big = vec![7u8; 1024 * 1024];
        {
            let (log, _) = open(dir.path());
            log.append(&[Change::Retain("a", b"1"), Change::Retain("b", b"2")])
                .unwrap();
            log.append(&[
                Change::Retain("a", b"one"),
                Change::Unretain("b"),
                Change::Retain("c", b"3"),
            ])
            .unwrap();
            log.append(&[Change::Unretain("c")]).unwrap();
            // Queue traffic over many segments: "a" pins the first one
            // and must be copied forward, "b" and "c" must stay cleared.
            for seq in 1..=200u64 {
                log.append(&[Change::Put("busy", seq, &big)]).unwrap();
                log.append(&[Change::Delete("busy", seq)]).unwrap();
            }
            assert!(log.disk_bytes() <= 3 * SEGMENT_BYTES);
        }
        let (log, found) = open(dir.path());
        assert!(found.is_empty(), "{found:?}");
        assert_eq!(
            log.retained().unwrap(),
            vec![("a".to_string(), b"one".to_vec())]
        );
    }

    #[test]
    fn segments_go_once_dead_and_a_pinning_message_moves_forward_without_coming_back_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let big = vec![7u8; 1024 * 1024];
        {
            let (log, _) = open(dir.path());
            // An old message that stays, then much traffic that is
            // delivered at once, over many segments.
            log.append(&[Change::Put("old", 1, b"keep me")]).unwrap();
            for seq in 1..=200u64 {
                log.append(&[Change::Put("busy", seq, &big)]).unwrap();
                log.append(&[Change::Delete("busy", seq)]).unwrap();
            }
            assert!(
                log.disk_bytes() <= 3 * SEGMENT_BYTES,
                "{} bytes on disk for 7 live bytes",
                log.disk_bytes()
            );
        }
        let segments = std::fs::read_dir(dir.path()).unwrap().count();
        assert!(segments <= 3, "{segments} segments left");
        let (log, found) = open(dir.path());
        assert_eq!(found.len(), 1, "{:?}", found.keys().collect::<Vec<_>>());
        assert_eq!(
            log.read("old", 0, 9, 9).unwrap(),
            vec![(1, b"keep me".to_vec())]
        );
    }
}
