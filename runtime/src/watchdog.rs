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
            if let Some(ms) = vitals.disconnected_for_ms().filter(|ms| *ms > disconnect_kill) {
                tracing::error!(
                    disconnected_ms = ms,
                    limit_ms = disconnect_kill,
                    reason = "broker-lost",
                    code = EXIT_BROKER_LOST,
                    "broker unreachable for too long; exiting so the supervisor restarts this service"
                );
                die(&beacon, "broker-lost", EXIT_BROKER_LOST);
            }
            if let Some(ms) = vitals.stalled_for_ms().filter(|ms| *ms > max_stall) {
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
        })
        .map_err(super::RuntimeError::Thread)?;
    Ok(())
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
