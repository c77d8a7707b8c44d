//! The few numbers that say whether a service is healthy, in atomics.
//!
//! The async side (connection poller, dispatcher) writes them; the watchdog
//! thread, the heartbeat thread and the health endpoints read them. Atomics
//! and a monotonic clock, not locks or channels, so a reader never waits on
//! a runtime that may be the very thing that is stuck.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

/// Monotonic milliseconds since the vitals were created; 0 means "never".
type Ms = u64;

#[derive(Debug)]
pub struct Vitals {
    epoch: Instant,
    connected: AtomicBool,
    /// When the broker connection was lost (or the start, before the first
    /// CONNACK); meaningful only while `connected` is false.
    disconnected_at: AtomicU64,
    subscribed: AtomicBool,
    running: AtomicUsize,
    waiting: AtomicUsize,
    /// Last forward progress: a job finished, a handler reported progress,
    /// or work arrived at an idle service (idle is not stalled).
    progress_at: AtomicU64,
    /// Bumped on every job end and progress report, so the heartbeat thread
    /// can tell that `last_progress_ts` must move.
    progress_seq: AtomicU64,
    draining: AtomicBool,
    max_inflight: usize,
    max_queue: usize,
}

impl Vitals {
    pub fn new(max_inflight: usize, max_queue: usize) -> Self {
        let v = Self {
            epoch: Instant::now(),
            connected: AtomicBool::new(false),
            disconnected_at: AtomicU64::new(0),
            subscribed: AtomicBool::new(false),
            running: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            progress_at: AtomicU64::new(0),
            progress_seq: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            max_inflight,
            max_queue,
        };
        v.disconnected_at.store(v.now(), Ordering::Relaxed);
        v.progress_at.store(v.now(), Ordering::Relaxed);
        v
    }

    pub fn now(&self) -> Ms {
        self.epoch.elapsed().as_millis() as u64
    }

    pub fn set_connected(&self, connected: bool) {
        let was = self.connected.swap(connected, Ordering::AcqRel);
        if was && !connected {
            self.disconnected_at.store(self.now(), Ordering::Release);
            self.subscribed.store(false, Ordering::Release);
        }
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// How long the broker has been unreachable; `None` while connected.
    pub fn disconnected_for_ms(&self) -> Option<u64> {
        if self.connected() {
            return None;
        }
        Some(
            self.now()
                .saturating_sub(self.disconnected_at.load(Ordering::Acquire)),
        )
    }

    pub fn set_subscribed(&self) {
        self.subscribed.store(true, Ordering::Release);
    }

    /// Publishes the dispatcher's counts. Work arriving at an idle service
    /// starts the stall clock now, not at the last job of long ago.
    pub fn set_load(&self, running: usize, waiting: usize) {
        let before = self.running.load(Ordering::Acquire) + self.waiting.load(Ordering::Acquire);
        if before == 0 && running + waiting > 0 {
            self.progress_at.store(self.now(), Ordering::Release);
        }
        self.running.store(running, Ordering::Release);
        self.waiting.store(waiting, Ordering::Release);
    }

    pub fn running(&self) -> usize {
        self.running.load(Ordering::Acquire)
    }

    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Forward progress (a job ended, or a handler said it is still going).
    pub fn progress(&self) {
        self.progress_at.store(self.now(), Ordering::Release);
        self.progress_seq.fetch_add(1, Ordering::AcqRel);
    }

    pub fn progress_seq(&self) -> u64 {
        self.progress_seq.load(Ordering::Acquire)
    }

    /// How long work has been pending without progress; `None` when idle.
    pub fn stalled_for_ms(&self) -> Option<u64> {
        if self.running() + self.waiting() == 0 {
            return None;
        }
        Some(
            self.now()
                .saturating_sub(self.progress_at.load(Ordering::Acquire)),
        )
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Ready for more work: connected, subscribed, not draining, and below
    /// the admission limits.
    pub fn ready(&self) -> bool {
        self.connected()
            && self.subscribed.load(Ordering::Acquire)
            && !self.draining()
            && self.running() + self.waiting() < self.max_inflight + self.max_queue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_is_not_stalled_and_busy_starts_the_clock() {
        let v = Vitals::new(2, 2);
        assert_eq!(v.stalled_for_ms(), None);
        assert!(v.disconnected_for_ms().is_some());
        v.set_connected(true);
        assert_eq!(v.disconnected_for_ms(), None);
        v.set_load(1, 0);
        assert!(v.stalled_for_ms().is_some_and(|ms| ms < 1000));
        v.set_load(0, 0);
        assert_eq!(v.stalled_for_ms(), None);
        assert!(!v.ready(), "not subscribed yet");
        v.set_subscribed();
        assert!(v.ready());
        v.set_load(2, 2);
        assert!(!v.ready(), "full");
    }
}
