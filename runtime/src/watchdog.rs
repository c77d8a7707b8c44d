//! The fail-fast watchdog (the step the legacy fleet's failure called for), on a plain OS thread.
//!
//! A legacy service lost its broker and hung while looking alive.
//! This thread reads [`Vitals`] on a short interval and ends the process with
//! a distinct code when either rule fires, so the supervisor (PM2) restarts
//! it: 70 when the broker has been unreachable longer than
//! `DISCONNECT_KILL_MS`, 71 when work is pending and nothing progressed for
//! `LIVENESS_MAX_STALL_MS`. It is a `std::thread`, not a tokio task, because
//! the failure it exists for includes a runtime that no longer polls anything.

use std::sync::Arc;
use std::time::Duration;

use super::beacon::Beacon;
use super::limits::Limits;
use super::vitals::Vitals;

/// Exit code when the broker stayed unreachable too long.
pub const EXIT_BROKER_LOST: i32 = 70;
/// Exit code when pending work made no progress for too long.
pub const EXIT_STALLED: i32 = 71;

/// How long the final `offline` record may take: the exit must still land
/// within threshold + 1 s.
const FINAL_HEARTBEAT_WAIT: Duration = Duration::from_millis(600);

/// Starts the watchdog thread; it runs until it ends the process.
pub fn spawn(
    limits: &Limits,
    vitals: Arc<Vitals>,
    beacon: Beacon,
) -> Result<(), super::RuntimeError> {
    let disconnect_kill = limits.disconnect_kill.as_millis() as u64;
    let max_stall = limits.liveness_max_stall.as_millis() as u64;
    let every = limits.watchdog_interval;
    std::thread::Builder::new()
        .name("axion-watchdog".into())
        .spawn(move || loop {
            std::thread::sleep(every);
            let disconnected = vitals.disconnected_for_ms();
            let stalled = vitals.stalled_for_ms();
            match verdict(disconnected, stalled, disconnect_kill, max_stall) {
                Some(Verdict::BrokerLost(ms)) => {
                    tracing::error!(
                        disconnected_ms = ms,
                        limit_ms = disconnect_kill,
                        reason = "broker-lost",
                        code = EXIT_BROKER_LOST,
                        "broker unreachable for too long; exiting so the supervisor restarts this service"
                    );
                    die(&beacon, "broker-lost", EXIT_BROKER_LOST);
                }
                Some(Verdict::Stalled(ms)) => {
                    tracing::error!(
                        stalled_ms = ms,
                        limit_ms = max_stall,
                        running = vitals.running(),
                        waiting = vitals.waiting(),
                        reason = "stalled",
                        code = EXIT_STALLED,
                        "work pending with no progress; exiting so the supervisor restarts this service"
                    );
                    die(&beacon, "stalled", EXIT_STALLED);
                }
                None => {}
            }
        })
        .map_err(super::RuntimeError::Thread)?;
    Ok(())
}

/// Which rule fired, with how long its condition has held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    BrokerLost(u64),
    Stalled(u64),
}

/// The watchdog's two rules as a pure function of what [`Vitals`] reports
/// (`None`: connected, or idle), so their deadlines are tested without
/// waiting for them. A limit is a grace period: only time past it counts.
/// A lost broker is named first, since it is also why work stops moving.
fn verdict(
    disconnected_ms: Option<u64>,
    stalled_ms: Option<u64>,
    disconnect_kill_ms: u64,
    max_stall_ms: u64,
) -> Option<Verdict> {
    if let Some(ms) = disconnected_ms.filter(|ms| *ms > disconnect_kill_ms) {
        return Some(Verdict::BrokerLost(ms));
    }
    stalled_ms
        .filter(|ms| *ms > max_stall_ms)
        .map(Verdict::Stalled)
}

/// Publishes the reason where the heartbeat connection still works, then
/// exits without unwinding: nothing in a stuck process is trusted to finish.
fn die(beacon: &Beacon, reason: &str, code: i32) -> ! {
    // With the broker gone the record cannot land; its will says `lost`.
    let published = beacon.publishing() && beacon.stop_blocking(reason, FINAL_HEARTBEAT_WAIT);
    tracing::error!(
        reason,
        code,
        final_heartbeat = published,
        topic = beacon.topic(),
        "exiting"
    );
    std::process::exit(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KILL: u64 = 10_000;
    const STALL: u64 = 30_000;

    #[test]
    fn a_connected_idle_service_lives_forever() {
        assert_eq!(verdict(None, None, KILL, STALL), None);
    }

    #[test]
    fn the_broker_is_lost_only_past_its_limit() {
        assert_eq!(verdict(Some(KILL), None, KILL, STALL), None);
        assert_eq!(
            verdict(Some(KILL + 1), None, KILL, STALL),
            Some(Verdict::BrokerLost(KILL + 1))
        );
    }

    #[test]
    fn pending_work_stalls_only_past_its_limit() {
        assert_eq!(verdict(None, Some(STALL), KILL, STALL), None);
        assert_eq!(
            verdict(None, Some(STALL + 1), KILL, STALL),
            Some(Verdict::Stalled(STALL + 1))
        );
    }

    #[test]
    fn a_lost_broker_is_named_before_the_stall_it_causes() {
        assert_eq!(
            verdict(Some(KILL + 5), Some(STALL + 5), KILL, STALL),
            Some(Verdict::BrokerLost(KILL + 5))
        );
        assert_eq!(
            verdict(Some(KILL), Some(STALL + 5), KILL, STALL),
            Some(Verdict::Stalled(STALL + 5))
        );
    }
}
