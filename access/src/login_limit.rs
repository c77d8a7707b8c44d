//! Failed logins per source address, and the backoff after too many.
//!
//! argon2 makes each password check cost ~20 ms, but without a limit an
//! attacker still guesses 50 passwords a second per core, forever. So each
//! address may fail [`LoginLimits::max_failures`] times; the next failure
//! starts a backoff ([`LoginLimits::backoff`], doubled by every further
//! failure up to [`LoginLimits::max_backoff`]) during which its logins are
//! refused before any password is checked, so a flood costs no argon2 CPU.
//! A success resets the address; so does a quiet [`LoginLimits::window`]
//! after its last failure and after its backoff ended.
//!
//! Attempts still being checked count against the limit too: otherwise a
//! burst of parallel CONNECTs would all reach argon2 before the first
//! failure was recorded. An address has at most `max_failures - failures`
//! checks running at once (one after a backoff); more are refused as busy.
//!
//! IPv6 addresses count per /64, the block one host usually gets (it could
//! otherwise try from 2^64 addresses). The table is bounded: past
//! [`LoginLimits::max_addresses`] entries the oldest is forgotten.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How failed logins from one address are limited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginLimits {
    /// Failed logins an address may make before its backoff starts.
    pub max_failures: u32,
    /// An address with no failure and no backoff for this long starts over.
    pub window: Duration,
    /// The first backoff; each further failure doubles it.
    pub backoff: Duration,
    /// The longest backoff.
    pub max_backoff: Duration,
    /// Addresses remembered at once (under 200 bytes each); past this the
    /// oldest entry is forgotten.
    pub max_addresses: usize,
}

impl Default for LoginLimits {
    fn default() -> Self {
        Self {
            max_failures: 10,
            window: Duration::from_secs(60),
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            max_addresses: 16_384,
        }
    }
}

/// A login refused before its credentials were checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Throttled {
    /// The address failed too often and its backoff is running.
    #[error("too many failed logins from this address; retry in {} s", secs_rounded_up(.retry_in))]
    Backoff { retry_in: Duration, failures: u32 },
    /// As many logins from the address are being checked as it may still fail.
    #[error("too many logins from this address at once; retry shortly")]
    Busy { in_flight: u32 },
}

fn secs_rounded_up(d: &Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// What a failed login did to its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    /// Failures counted for the address, this one included.
    pub failures: u32,
    /// The backoff this failure started, if it started one.
    pub backoff: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Succeeded,
    Failed,
    /// The check never finished (its task failed): it only stops running.
    Abandoned,
}

struct Entry {
    failures: u32,
    in_flight: u32,
    /// The last backoff given (zero: none yet); the next one doubles it.
    backoff: Duration,
    /// Logins are refused until then.
    blocked_until: Option<Instant>,
    /// The later of the last failure and the end of the backoff: the
    /// entry is forgotten a window after.
    quiet_since: Instant,
    /// Tells this entry from an earlier one of the same address in `order`.
    seq: u64,
}

#[derive(Default)]
struct Table {
    entries: HashMap<IpAddr, Entry>,
    /// Keys in insertion order, for evicting the oldest; entries removed
    /// since leave stale pairs, skipped by `seq` and swept when they pile up.
    order: VecDeque<(IpAddr, u64)>,
    next_seq: u64,
}

/// Failed logins per address (see the module docs).
pub struct LoginLimiter {
    limits: LoginLimits,
    table: Mutex<Table>,
}

impl std::fmt::Debug for LoginLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginLimiter")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// The key an address is counted under: IPv4 (IPv4-mapped IPv6 included)
/// as is, other IPv6 by its /64.
fn key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

impl LoginLimiter {
    pub fn new(limits: LoginLimits) -> Self {
        Self {
            limits: LoginLimits {
                max_failures: limits.max_failures.max(1),
                max_addresses: limits.max_addresses.max(1),
                ..limits
            },
            table: Mutex::new(Table::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // The table stays consistent between statements: a panic elsewhere
        // while it was held leaves nothing half-done.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called before checking credentials from `peer`: refuses at once if
    /// the address is in backoff or has as many checks running as it may
    /// still fail. Cheap (no argon2, one short lock), so it runs on the
    /// async threads. The [`Attempt`] must be settled with the outcome.
    pub fn begin(&self, peer: IpAddr) -> Result<Attempt<'_>, Throttled> {
        self.begin_at(peer, Instant::now())
    }

    fn begin_at(&self, peer: IpAddr, now: Instant) -> Result<Attempt<'_>, Throttled> {
        let key = key(peer);
        let max = self.limits.max_failures;
        let mut table = self.lock();
        let entry = table.entry(key, now, &self.limits);
        if let Some(until) = entry.blocked_until.filter(|&u| u > now) {
            return Err(Throttled::Backoff {
                retry_in: until - now,
                failures: entry.failures,
            });
        }
        // After a backoff one check at a time: its failure starts the next.
        let may_run = max.saturating_sub(entry.failures).max(1);
        if entry.in_flight >= may_run {
            return Err(Throttled::Busy {
                in_flight: entry.in_flight,
            });
        }
        entry.in_flight += 1;
        let seq = entry.seq;
        Ok(Attempt {
            limiter: self,
            key,
            seq,
            settled: false,
        })
    }

    fn settle(&self, key: IpAddr, seq: u64, outcome: Outcome, now: Instant) -> Option<Failure> {
        let mut table = self.lock();
        let Some(entry) = table.entries.get_mut(&key) else {
            // Evicted while the check ran: a failure starts a new entry.
            return (outcome == Outcome::Failed)
                .then(|| self.fail(table.entry(key, now, &self.limits), now));
        };
        if entry.seq == seq {
            entry.in_flight = entry.in_flight.saturating_sub(1);
        }
        let failure = match outcome {
            Outcome::Failed => Some(self.fail(entry, now)),
            Outcome::Succeeded => {
                // Whoever is at this address knows a password: start over.
                entry.failures = 0;
                entry.backoff = Duration::ZERO;
                entry.blocked_until = None;
                None
            }
            Outcome::Abandoned => None,
        };
        if entry.failures == 0 && entry.in_flight == 0 {
            table.entries.remove(&key);
        }
        failure
    }

    fn fail(&self, entry: &mut Entry, now: Instant) -> Failure {
        entry.failures = entry.failures.saturating_add(1);
        entry.quiet_since = now;
        let backoff = (entry.failures >= self.limits.max_failures).then(|| {
            let next = if entry.backoff.is_zero() {
                self.limits.backoff
            } else {
                entry.backoff.saturating_mul(2)
            };
            let next = next.min(self.limits.max_backoff);
            entry.backoff = next;
            entry.blocked_until = Some(now + next);
            entry.quiet_since = now + next;
            next
        });
        Failure {
            failures: entry.failures,
            backoff,
        }
    }
}

impl Table {
    /// The address's entry, made if missing; a stale one starts over.
    fn entry(&mut self, key: IpAddr, now: Instant, limits: &LoginLimits) -> &mut Entry {
        let stale = self
            .entries
            .get(&key)
            .is_some_and(|e| e.in_flight == 0 && now >= e.quiet_since + limits.window);
        if stale {
            self.entries.remove(&key);
        }
        if !self.entries.contains_key(&key) {
            while self.entries.len() >= limits.max_addresses {
                let Some((old, seq)) = self.order.pop_front() else {
                    break;
                };
                if self.entries.get(&old).is_some_and(|e| e.seq == seq) {
                    self.entries.remove(&old);
                }
            }
            if self.order.len() >= limits.max_addresses.saturating_mul(2) {
                let entries = &self.entries;
                self.order
                    .retain(|(k, s)| entries.get(k).is_some_and(|e| e.seq == *s));
            }
            self.next_seq += 1;
            self.order.push_back((key, self.next_seq));
            self.entries.insert(
                key,
                Entry {
                    failures: 0,
                    in_flight: 0,
                    backoff: Duration::ZERO,
                    blocked_until: None,
                    quiet_since: now,
                    seq: self.next_seq,
                },
            );
        }
        self.entries.get_mut(&key).expect("inserted above")
    }
}

/// A login being checked. Settle it with [`Attempt::succeeded`] or
/// [`Attempt::failed`]; dropped unsettled (the check never finished) it
/// only stops counting as running.
#[must_use = "settle the attempt with its outcome"]
pub struct Attempt<'a> {
    limiter: &'a LoginLimiter,
    key: IpAddr,
    seq: u64,
    settled: bool,
}

impl Attempt<'_> {
    pub fn succeeded(self) {
        self.settle(Outcome::Succeeded);
    }

    pub fn failed(self) -> Failure {
        self.settle(Outcome::Failed)
            .expect("a failed attempt is always counted")
    }

    fn settle(mut self, outcome: Outcome) -> Option<Failure> {
        self.settle_at(outcome, Instant::now())
    }

    fn settle_at(&mut self, outcome: Outcome, now: Instant) -> Option<Failure> {
        self.settled = true;
        self.limiter.settle(self.key, self.seq, outcome, now)
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.settle_at(Outcome::Abandoned, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_failures: u32) -> LoginLimits {
        LoginLimits {
            max_failures,
            window: Duration::from_secs(60),
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(4),
            max_addresses: 100,
        }
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    fn fail_at(l: &LoginLimiter, ip: IpAddr, now: Instant) -> Failure {
        let mut a = l.begin_at(ip, now).expect("admitted");
        a.settle_at(Outcome::Failed, now).expect("failure")
    }

    #[test]
    fn backoff_after_the_limit_doubles_up_to_the_cap() {
        let l = LoginLimiter::new(limits(3));
        let t0 = Instant::now();
        assert_eq!(fail_at(&l, A, t0).backoff, None);
        assert_eq!(fail_at(&l, A, t0).backoff, None);
        let third = fail_at(&l, A, t0);
        assert_eq!(third.failures, 3);
        assert_eq!(third.backoff, Some(Duration::from_secs(1)));
        assert!(matches!(
            l.begin_at(A, t0 + Duration::from_millis(500)),
            Err(Throttled::Backoff { failures: 3, .. })
        ));
        // Another address is not affected.
        assert!(l.begin_at(B, t0).is_ok());
        let mut now = t0 + Duration::from_secs(1);
        for want in [2, 4, 4] {
            let f = fail_at(&l, A, now);
            assert_eq!(f.backoff, Some(Duration::from_secs(want)));
            now += Duration::from_secs(want);
        }
        // A success resets the address.
        let mut ok = l.begin_at(A, now).expect("admitted after the backoff");
        assert_eq!(ok.settle_at(Outcome::Succeeded, now), None);
        assert_eq!(fail_at(&l, A, now).failures, 1);
    }

    #[test]
    fn checks_in_flight_count_against_the_limit() {
        let l = LoginLimiter::new(limits(2));
        let t0 = Instant::now();
        let first = l.begin_at(A, t0).expect("first");
        let mut second = l.begin_at(A, t0).expect("second");
        assert_eq!(
            l.begin_at(A, t0).err(),
            Some(Throttled::Busy { in_flight: 2 })
        );
        drop(first);
        let mut third = l.begin_at(A, t0).expect("room again");
        let failed = second.settle_at(Outcome::Failed, t0);
        assert_eq!(failed.map(|f| f.failures), Some(1));
        let failed = third.settle_at(Outcome::Failed, t0);
        assert_eq!(failed.and_then(|f| f.backoff), Some(Duration::from_secs(1)));
    }

    #[test]
    fn a_quiet_window_forgets_the_failures() {
        let l = LoginLimiter::new(limits(3));
        let t0 = Instant::now();
        fail_at(&l, A, t0);
        fail_at(&l, A, t0);
        let later = t0 + Duration::from_secs(61);
        assert_eq!(fail_at(&l, A, later).failures, 1);
    }

    #[test]
    fn the_table_is_bounded_and_evicts_the_oldest() {
        let l = LoginLimiter::new(LoginLimits {
            max_addresses: 4,
            ..limits(3)
        });
        let t0 = Instant::now();
        for i in 0..1000u32 {
            fail_at(&l, IpAddr::V4(i.into()), t0);
            let table = l.lock();
            assert!(table.entries.len() <= 4);
            assert!(table.order.len() <= 8);
        }
        let table = l.lock();
        assert!(table.entries.contains_key(&IpAddr::V4(999u32.into())));
        assert!(!table.entries.contains_key(&IpAddr::V4(0u32.into())));
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(key(a), key(b));
        assert_ne!(key(a), key(c));
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(key(mapped), A);
    }
}
