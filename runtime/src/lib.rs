//! The service runtime: the legacy template's `run_service`, made to fail fast.
//!
//! What this answers: in the legacy fleet a service lost its broker,
//! hung while looking alive, and blocked everything that needed it. A
//! service built on this crate connects (MQTT 5), serves its queues through
//! the credit protocol of `bridge/QUEUE-CONTRACT.md` and its event topics,
//! publishes the retained heartbeat with live load, refuses work beyond its
//! limits at once, drains on SIGTERM, and exits with a distinct code when the
//! broker is gone (70) or its work stopped moving (71), so the supervisor
//! restarts it:
//!
//! ```no_run
//! use axion_runtime::{Service, Task};
//! use serde_json::json;
//!
//! #[tokio::main]
//! async fn main() {
//!     let code = Service::new("embedding")
//!         .package("homechoice")
//!         .queue("embedding.generate", |task: Task| async move {
//!             Ok(json!({"items": task.payload["items"]}))
//!         })
//!         .run()
//!         .await;
//!     std::process::exit(code);
//! }
//! ```

mod beacon;
mod engine;
pub mod health;
pub mod limits;
pub mod message;
mod vitals;
pub mod watchdog;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::Value;

pub use limits::Limits;
pub use message::{Event, Task};
pub use watchdog::{EXIT_BROKER_LOST, EXIT_STALLED};

use axion_client::publisher::{local_hostname, HeartbeatConfig};
use axion_client::HeartbeatError;
use axion_wire::{ids, topics, BrokerUrls, TopicError, UrlError, DEFAULT_MQTT_URL};

/// Exit code of a clean stop (after draining).
pub const EXIT_OK: i32 = 0;
/// Exit code when the service cannot start as configured (sysexits EX_CONFIG).
pub const EXIT_CONFIG: i32 = 78;
/// Exit code for any other start-up failure.
pub const EXIT_FAILURE: i32 = 1;

/// What a handler returns: `Ok` is the result (acked, and published to
/// `replyTo`), `Err` the reason the attempt failed.
pub type HandlerResult = Result<Value, String>;
type BoxFuture = Pin<Box<dyn Future<Output = HandlerResult> + Send>>;
pub(crate) type TaskHandler = Arc<dyn Fn(Task) -> BoxFuture + Send + Sync>;
pub(crate) type EventHandler = Arc<dyn Fn(Event) -> BoxFuture + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Topic(#[from] TopicError),
    #[error(transparent)]
    Url(#[from] UrlError),
    #[error(transparent)]
    Heartbeat(#[from] HeartbeatError),
    #[error("environment variable {name}={value:?} is not a whole number")]
    Env { name: &'static str, value: String },
    #[error("{what} {why}")]
    Limit {
        what: &'static str,
        why: &'static str,
    },
    #[error("HEALTH_LISTEN={value:?} is not an address like 127.0.0.1:9400")]
    HealthAddr { value: String },
    #[error("event type {0:?} must be dot-separated non-empty segments without '/' ('+' and '#' only as whole segments)")]
    EventType(String),
    #[error("a service needs at least one queue or event handler")]
    NothingToDo,
    #[error("queue {0:?} has two handlers")]
    DuplicateQueue(String),
    #[error("cannot listen for health probes on {addr}: {err}")]
    HealthBind {
        addr: SocketAddr,
        err: std::io::Error,
    },
    #[error("cannot write the ports file {path}: {err}")]
    PortsFile { path: PathBuf, err: std::io::Error },
    #[error("cannot start a runtime thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot install the signal handlers: {0}")]
    Signal(std::io::Error),
    #[error("the heartbeat thread ended before it started")]
    BeaconGone,
    #[error("the MQTT connection task ended unexpectedly")]
    PollerGone,
    #[error("{0}; giving up (exit 78: restarting will not help until the broker or this service's configuration changes)")]
    Refused(String),
}

impl RuntimeError {
    /// The process exit code for this failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Topic(_)
            | Self::Url(_)
            | Self::Env { .. }
            | Self::Limit { .. }
            | Self::HealthAddr { .. }
            | Self::EventType(_)
            | Self::NothingToDo
            | Self::DuplicateQueue(_)
            | Self::HealthBind { .. }
            | Self::PortsFile { .. }
            | Self::Refused(_) => EXIT_CONFIG,
            Self::Heartbeat(HeartbeatError::Topic(_) | HeartbeatError::Env { .. }) => EXIT_CONFIG,
            _ => EXIT_FAILURE,
        }
    }
}

/// A service definition; `run().await` runs it and returns the exit code.
///
/// Unset values come from the environment: `AXION_MQTT_URL` (and
/// `AXION_MQTT_USER`/`AXION_MQTT_PASSWORD`), `AXION_PACKAGE`, `HEALTH_LISTEN`,
/// `AXION_PORTS_FILE`, `AXION_DIRECTED_DELIVERY` and the [`Limits`]
/// variables.
pub struct Service {
    name: String,
    package: Option<String>,
    mqtt: Option<BrokerUrls>,
    queues: Vec<(String, TaskHandler)>,
    events: Vec<(String, EventHandler)>,
    limits: Option<Limits>,
    health: Option<SocketAddr>,
    ports_file: Option<PathBuf>,
    directed: Option<bool>,
}

impl Service {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            package: None,
            mqtt: None,
            queues: Vec::new(),
            events: Vec::new(),
            limits: None,
            health: None,
            ports_file: None,
            directed: None,
        }
    }

    pub fn package(mut self, package: impl Into<String>) -> Self {
        self.package = Some(package.into());
        self
    }

    /// The broker, or the nodes of a clustered one: the service fails over
    /// between them.
    pub fn mqtt(mut self, urls: impl Into<BrokerUrls>) -> Self {
        self.mqtt = Some(urls.into());
        self
    }

    /// Serves queue `name`: each task goes to `handler`; `Ok` acks it and
    /// publishes the value to the task's `replyTo`, `Err` fails the attempt.
    pub fn queue<F, Fut>(mut self, name: impl Into<String>, handler: F) -> Self
    where
        F: Fn(Task) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        let handler: TaskHandler = Arc::new(move |t| Box::pin(handler(t)));
        self.queues.push((name.into(), handler));
        self
    }

    /// Handles events of `event_type` (`fs.change`, or with `+`/`#`
    /// segments). When an event carries `replyTo`, the result (or
    /// `{"error"}`) is published there.
    pub fn event<F, Fut>(mut self, event_type: impl Into<String>, handler: F) -> Self
    where
        F: Fn(Event) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        let handler: EventHandler = Arc::new(move |e| Box::pin(handler(e)));
        self.events.push((event_type.into(), handler));
        self
    }

    /// Overrides the limits read from the environment.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = Some(limits);
        self
    }

    /// Serves `/health/live` and `/health/ready` on `addr`; its port also
    /// names the instance in the heartbeat topic.
    pub fn health_listen(mut self, addr: SocketAddr) -> Self {
        self.health = Some(addr);
        self
    }

    /// Writes the address the health endpoints are bound to (port 0 in
    /// [`Service::health_listen`] picks a free one) to `path`, as a
    /// `health=address` line (`axion_wire::ports`), once bound; an empty
    /// file without health endpoints. Removed at a clean stop.
    pub fn ports_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ports_file = Some(path.into());
        self
    }

    /// Takes tasks on this instance's own topic (`…/tasks/<worker>`)
    /// instead of the queue's shared subscription, for a broker without
    /// shared subscriptions. The runtime switches by itself when the
    /// broker's CONNACK says it has none; this forces it everywhere.
    pub fn directed_delivery(mut self, directed: bool) -> Self {
        self.directed = Some(directed);
        self
    }

    /// Runs until SIGTERM/SIGINT (returns 0 after draining) or a failure:
    /// the watchdog exits the process itself with 70 or 71; a configuration
    /// error returns 78.
    pub async fn run(self) -> i32 {
        let name = self.name.clone();
        match self.try_run().await {
            Ok(code) => code,
            Err(err) => {
                tracing::error!(service = %name, error = %err, "service cannot run");
                err.exit_code()
            }
        }
    }

    async fn try_run(self) -> Result<i32, RuntimeError> {
        let ports_file = self.ports_file.or_else(|| {
            std::env::var_os("AXION_PORTS_FILE")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        });
        let ports_error = |path: &PathBuf| {
            let path = path.clone();
            move |err| RuntimeError::PortsFile { path, err }
        };
        // First, so a reader waiting for the file never finds the last
        // run's, even when this one stops on a bad setting.
        if let Some(path) = &ports_file {
            axion_client::ports_file::clear(path).map_err(ports_error(path))?;
        }
        let package = match self.package {
            Some(p) => p,
            None => env_or("AXION_PACKAGE", "default"),
        };
        let mqtt = match self.mqtt {
            Some(u) => u,
            None => BrokerUrls::parse(&env_or("AXION_MQTT_URL", DEFAULT_MQTT_URL))?,
        }
        .with_env_credentials();
        let limits = match self.limits {
            Some(l) => l,
            None => Limits::from_env()?,
        };
        let directed = match self.directed {
            Some(d) => d,
            None => env_flag("AXION_DIRECTED_DELIVERY")?,
        };
        limits.validate()?;
        let health = match self.health {
            Some(a) => Some(a),
            None => match std::env::var("HEALTH_LISTEN") {
                Ok(v) if !v.trim().is_empty() => Some(
                    v.trim()
                        .parse()
                        .map_err(|_| RuntimeError::HealthAddr { value: v })?,
                ),
                _ => None,
            },
        };
        topics::validate_level("package", &package)?;
        topics::validate_level("service", &self.name)?;
        if self.queues.is_empty() && self.events.is_empty() {
            return Err(RuntimeError::NothingToDo);
        }
        for (i, (q, _)) in self.queues.iter().enumerate() {
            topics::validate_level("queue", q)?;
            if self.queues[..i].iter().any(|(other, _)| other == q) {
                return Err(RuntimeError::DuplicateQueue(q.clone()));
            }
        }
        let mut events = Vec::with_capacity(self.events.len());
        for (t, h) in self.events {
            validate_event_type(&t)?;
            events.push((t.clone(), topics::event(&package, &t), h));
        }

        let vitals = Arc::new(vitals::Vitals::new(limits.max_inflight, limits.max_queue));
        let mut ports = axion_wire::ports::Ports::new();
        let health_port = match health {
            Some(addr) => {
                let bound = health::serve(addr, vitals.clone(), &limits).await?;
                ports.insert(axion_wire::ports::HEALTH, bound);
                Some(bound.port())
            }
            None => None,
        };
        // Held until the drain ends: dropping it removes the file.
        let _ports_file = match &ports_file {
            Some(path) => Some(
                axion_client::ports_file::PortsFile::write(path, &ports)
                    .map_err(ports_error(path))?,
            ),
            None => None,
        };
        let host = local_hostname()?;
        let slot = health_port.map(u32::from).unwrap_or_else(std::process::id);
        let client_id = ids::service_client(&self.name, &host, slot);
        let mut hb = HeartbeatConfig::new(mqtt.clone(), package.clone(), self.name.clone())?;
        hb.port = health_port;
        hb.host = Some(host);
        // The queue owner hands this worker's tasks to others when the
        // heartbeat turns offline (QUEUE-CONTRACT "Worker liveness").
        hb.extras
            .insert("worker".into(), Value::String(client_id.clone()));
        let beacon = beacon::Beacon::start(hb, vitals.clone())?;
        watchdog::spawn(&limits, vitals.clone(), beacon.clone())?;
        let plan = engine::Plan {
            service: self.name,
            package,
            client_id,
            mqtt,
            queues: self.queues,
            events,
            limits,
            directed,
        };
        engine::run(plan, vitals, beacon).await
    }
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| default.to_string())
}

/// A switch from the environment: unset, empty, `0` or `false` is off;
/// `1` or `true` on; anything else a configuration error.
fn env_flag(name: &'static str) -> Result<bool, RuntimeError> {
    match std::env::var(name) {
        Ok(value) => match value.trim().to_ascii_lowercase().as_str() {
            "" | "0" | "false" => Ok(false),
            "1" | "true" => Ok(true),
            _ => Err(RuntimeError::Env { name, value }),
        },
        Err(_) => Ok(false),
    }
}

fn validate_event_type(t: &str) -> Result<(), RuntimeError> {
    let ok = !t.is_empty()
        && !t.contains(['/', '\0'])
        && t.split('.').enumerate().all(|(i, seg)| {
            !seg.is_empty()
                && (!seg.contains(['+', '#']) || seg == "+" || seg == "#")
                && (seg != "#" || i == t.split('.').count() - 1)
        });
    if ok {
        Ok(())
    } else {
        Err(RuntimeError::EventType(t.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_types_are_checked() {
        for good in ["fs.change", "fs.+", "fs.#", "a"] {
            assert!(validate_event_type(good).is_ok(), "{good}");
        }
        for bad in ["", "a..b", "a/b", "fs.#.x", "a+.b", "."] {
            assert!(validate_event_type(bad).is_err(), "{bad}");
        }
    }
}
