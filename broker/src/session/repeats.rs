//! Drops the second copy rumqttd 0.20 sometimes forwards to a `$share`
//! member.
//!
//! When a read for a shared group fills the connection's channel
//! (`BufferFull`), the router's `forward_device_data` returns before it
//! moves the group's cursor, so the group's next read forwards the same
//! log entries again. A queue worker would run such a task twice.
//!
//! A repeat is recognisable: the same entry of the same filter log comes
//! back with the same cursor and the very same payload buffer (the log
//! hands out clones of what it holds). Only forwards that one `$share`
//! subscription of the session alone matches are remembered: two filters
//! of one session that match a topic each deliver their own copy, and
//! those copies may share a cursor by coincidence. Cursors restart with
//! every router, so a renewal forgets them all.

use std::collections::{HashSet, VecDeque};

use bytes::Bytes;

/// Forwards remembered; the router's channel to a session holds 200
/// notifications, and a repeat follows within one channel's worth.
const REMEMBERED: usize = 1024;

/// (filter log cursor, payload address, payload length).
type Key = ((u64, u64), usize, usize);

#[derive(Default)]
pub(super) struct Repeats {
    order: VecDeque<Key>,
    seen: HashSet<Key>,
}

impl Repeats {
    /// True if this log entry was already forwarded on this router link;
    /// remembers it otherwise.
    pub(super) fn is_repeat(&mut self, cursor: Option<(u64, u64)>, payload: &Bytes) -> bool {
        let Some(cursor) = cursor else {
            return false;
        };
        let key = (cursor, payload.as_ptr() as usize, payload.len());
        if !self.seen.insert(key) {
            return true;
        }
        self.order.push_back(key);
        if self.order.len() > REMEMBERED {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        false
    }

    /// Forgets everything: the next router numbers its logs afresh.
    pub(super) fn clear(&mut self) {
        self.order.clear();
        self.seen.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_entry_twice_is_a_repeat_until_forgotten() {
        let mut r = Repeats::default();
        let a = Bytes::from_static(b"task a");
        let b = Bytes::from(b"task a".to_vec());
        assert!(!r.is_repeat(Some((0, 1)), &a));
        assert!(r.is_repeat(Some((0, 1)), &a.clone()));
        // Same bytes elsewhere, or another cursor: another message.
        assert!(!r.is_repeat(Some((0, 1)), &b));
        assert!(!r.is_repeat(Some((0, 2)), &a));
        assert!(!r.is_repeat(None, &a));
        assert!(!r.is_repeat(None, &a));
        r.clear();
        assert!(!r.is_repeat(Some((0, 1)), &a));
    }

    #[test]
    fn only_the_latest_entries_are_kept() {
        let mut r = Repeats::default();
        let p = Bytes::from_static(b"x");
        for i in 0..=REMEMBERED as u64 {
            assert!(!r.is_repeat(Some((0, i)), &p));
        }
        assert!(!r.is_repeat(Some((0, 0)), &p), "the oldest was forgotten");
        assert!(r.is_repeat(Some((0, REMEMBERED as u64)), &p));
        assert_eq!(r.order.len(), r.seen.len());
    }
}
