//! What each topic matched, remembered: flow control and the capture of
//! kept sessions' messages both need, per publish, the subscriptions its
//! topic matches, and matching a topic against every filter each time
//! costs a scan. The answer is kept per topic until the filters change
//! (the owner clears it), and the whole cache is dropped when it grows
//! past its bound, so a stream of distinct topics costs bounded memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// Most topics remembered.
const BOUND: usize = 100_000;

pub struct TopicCache<T> {
    map: Mutex<HashMap<Bytes, Arc<[T]>>>,
}

impl<T> Default for TopicCache<T> {
    fn default() -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<T> TopicCache<T> {
    /// What `topic` matches: remembered, or `find` with the topic as text
    /// (a topic that is not UTF-8 matches nothing). A topic remembered is
    /// copied: a slice of a connection's read buffer would pin all of it.
    pub fn get_or_find(&self, topic: &[u8], find: impl FnOnce(&str) -> Vec<T>) -> Arc<[T]> {
        if let Some(hit) = self.lock().get(topic) {
            return hit.clone();
        }
        let Ok(text) = std::str::from_utf8(topic) else {
            return Arc::from(Vec::new());
        };
        let found: Arc<[T]> = find(text).into();
        let mut map = self.lock();
        if map.len() >= BOUND {
            map.clear();
        }
        map.insert(Bytes::copy_from_slice(topic), found.clone());
        found
    }

    /// Forgets every answer (the filters changed).
    pub fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Bytes, Arc<[T]>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_kept_until_cleared() {
        let cache: TopicCache<u8> = TopicCache::default();
        let topic = Bytes::from("a/b");
        assert_eq!(&*cache.get_or_find(&topic, |_| vec![1]), &[1]);
        assert_eq!(&*cache.get_or_find(&topic, |_| vec![2]), &[1]);
        cache.clear();
        assert_eq!(&*cache.get_or_find(&topic, |_| vec![2]), &[2]);
        assert!(cache
            .get_or_find(&Bytes::from_static(&[0xFF]), |_| vec![3])
            .is_empty());
    }

    #[test]
    fn a_remembered_topic_does_not_hold_the_buffer_it_arrived_in() {
        let cache: TopicCache<u8> = TopicCache::default();
        // A topic read with its payload, as a session's packet is.
        let mut read = vec![b'x'; 64 * 1024];
        read[..3].copy_from_slice(b"a/b");
        let read = Bytes::from(read);
        let topic = read.slice(..3);
        drop(read);
        cache.get_or_find(&topic, |_| vec![1]);
        assert!(
            topic.is_unique(),
            "the cache holds on to the 64 KiB buffer the topic came in"
        );
    }
}
