//! The service's heartbeat, run on its own OS thread with its own
//! single-threaded tokio runtime.
//!
//! A handler that spins or blocks can freeze the service's runtime; the
//! heartbeat must still go out (its `last_progress_ts` is how an operator
//! sees the stall) and the watchdog must still be able to publish the final
//! `offline` record with the reason. So the publisher lives apart, copies the
//! live numbers from [`Vitals`] on a short tick, and takes its few commands
//! over channels that work from any thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::vitals::Vitals;
use super::RuntimeError;
use axion_client::publisher::{HeartbeatConfig, HeartbeatHandle, HeartbeatPublisher};

/// How often live numbers are copied into the record.
const SYNC_EVERY: Duration = Duration::from_millis(200);
/// Job durations waiting to be folded into `avg_job_ms`; beyond this they
/// are dropped (an average loses nothing from a few missing samples).
const JOB_SAMPLES: usize = 1024;

enum Cmd {
    Job(Duration),
    Draining,
    Stop {
        reason: String,
        done: std_mpsc::SyncSender<()>,
    },
}

/// Handle to the heartbeat thread; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct Beacon {
    tx: mpsc::Sender<Cmd>,
    topic: Arc<str>,
    /// Whether the heartbeat's own connection is up (as of the last tick).
    publishing: Arc<AtomicBool>,
}

impl Beacon {
    /// Starts the heartbeat thread and returns once the publisher runs.
    pub fn start(config: HeartbeatConfig, vitals: Arc<Vitals>) -> Result<Self, RuntimeError> {
        let (tx, rx) = mpsc::channel(JOB_SAMPLES);
        let (started_tx, started_rx) = std_mpsc::sync_channel(1);
        let publishing = Arc::new(AtomicBool::new(false));
        let publishing_seen = publishing.clone();
        std::thread::Builder::new()
            .name("axion-heartbeat".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(err) => {
                        let _ = started_tx.send(Err(RuntimeError::Thread(err)));
                        return;
                    }
                };
                rt.block_on(async move {
                    let handle = match HeartbeatPublisher::start(config) {
                        Ok(h) => h,
                        Err(err) => {
                            let _ = started_tx.send(Err(err.into()));
                            return;
                        }
                    };
                    let _ = started_tx.send(Ok(Arc::<str>::from(handle.topic())));
                    serve(handle, vitals, rx, publishing_seen).await;
                });
            })
            .map_err(RuntimeError::Thread)?;
        let topic = started_rx.recv().map_err(|_| RuntimeError::BeaconGone)??;
        Ok(Self {
            tx,
            topic,
            publishing,
        })
    }

    /// Whether a final record can reach the broker at all; when the broker
    /// is gone there is no point waiting for it.
    pub fn publishing(&self) -> bool {
        self.publishing.load(Ordering::Acquire)
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// A job ended after `took` (feeds `avg_job_ms`).
    pub fn job(&self, took: Duration) {
        if self.tx.try_send(Cmd::Job(took)).is_err() {
            tracing::debug!(topic = %self.topic, "job sample dropped: heartbeat thread busy");
        }
    }

    /// Publishes `draining` at once.
    pub fn draining(&self) {
        if self.tx.try_send(Cmd::Draining).is_err() {
            tracing::warn!(topic = %self.topic, "could not announce draining: heartbeat thread busy or gone");
        }
    }

    /// Publishes `offline` with `reason` and waits at most `wait` for the
    /// broker to take it. Blocking, callable from any thread that is not
    /// inside a tokio runtime (the watchdog), or through `spawn_blocking`.
    pub fn stop_blocking(&self, reason: &str, wait: Duration) -> bool {
        let (done, finished) = std_mpsc::sync_channel(1);
        let cmd = Cmd::Stop {
            reason: reason.to_string(),
            done,
        };
        if self.tx.try_send(cmd).is_err() {
            tracing::warn!(topic = %self.topic, reason, "final heartbeat not sent: heartbeat thread busy or gone");
            return false;
        }
        finished.recv_timeout(wait).is_ok()
    }
}

async fn serve(
    handle: HeartbeatHandle,
    vitals: Arc<Vitals>,
    mut rx: mpsc::Receiver<Cmd>,
    publishing: Arc<AtomicBool>,
) {
    let mut tick = tokio::time::interval(SYNC_EVERY);
    let mut seen_progress = vitals.progress_seq();
    let mut was_connected = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let connected = vitals.connected();
                handle.set_connected(connected);
                publishing.store(handle.is_publishing(), Ordering::Release);
                handle.set_inflight(vitals.running() as u64);
                handle.set_queue_depth(vitals.waiting() as u64);
                let seq = vitals.progress_seq();
                if seq != seen_progress {
                    seen_progress = seq;
                    handle.record_progress();
                }
                // A change of the service's own connection is news now,
                // not at the next interval.
                if was_connected.replace(connected).is_some_and(|was| was != connected) {
                    handle.publish_now();
                }
            }
            cmd = rx.recv() => match cmd {
                Some(Cmd::Job(took)) => {
                    handle.record_job(took);
                    seen_progress = vitals.progress_seq();
                }
                Some(Cmd::Draining) => {
                    handle.set_inflight(vitals.running() as u64);
                    handle.set_queue_depth(vitals.waiting() as u64);
                    if let Err(err) = handle.set_draining().await {
                        tracing::warn!(topic = %handle.topic(), error = %err, "draining heartbeat not published");
                    }
                }
                Some(Cmd::Stop { reason, done }) => {
                    handle.set_connected(vitals.connected());
                    handle.set_inflight(vitals.running() as u64);
                    handle.set_queue_depth(vitals.waiting() as u64);
                    let topic = handle.topic().to_string();
                    match handle.stop(&reason).await {
                        Ok(()) => {
                            let _ = done.send(());
                        }
                        Err(err) => tracing::warn!(topic = %topic, reason = %reason, error = %err, "final heartbeat not acknowledged"),
                    }
                    return;
                }
                None => return,
            },
        }
    }
}
