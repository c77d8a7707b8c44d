//! Optional `/health/live` and `/health/ready` (the liveness and readiness a supervisor of the legacy fleet lacked) for
//! supervisors and load balancers that probe over HTTP.
//!
//! Live answers 200 while neither watchdog rule is close to firing; ready
//! answers 200 only when the service is connected, subscribed, not draining
//! and below its admission limits. Both carry the numbers as JSON. The server
//! runs on the service's own runtime on purpose: a runtime too stuck to
//! answer a probe is not live.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::limits::Limits;
use super::vitals::Vitals;
use super::RuntimeError;

#[derive(Clone)]
struct Probe {
    vitals: Arc<Vitals>,
    disconnect_kill_ms: u64,
    max_stall_ms: u64,
}

impl Probe {
    fn body(&self) -> Value {
        let v = &self.vitals;
        json!({
            "connected": v.connected(),
            "draining": v.draining(),
            "inflight": v.running(),
            "queue_depth": v.waiting(),
            "disconnected_ms": v.disconnected_for_ms(),
            "stalled_ms": v.stalled_for_ms(),
        })
    }
}

/// Binds `addr` and serves the probes until the process ends; returns the
/// bound address (so port 0 works).
pub async fn serve(
    addr: SocketAddr,
    vitals: Arc<Vitals>,
    limits: &Limits,
) -> Result<SocketAddr, RuntimeError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|err| RuntimeError::HealthBind { addr, err })?;
    let bound = listener
        .local_addr()
        .map_err(|err| RuntimeError::HealthBind { addr, err })?;
    let probe = Probe {
        vitals,
        disconnect_kill_ms: limits.disconnect_kill.as_millis() as u64,
        max_stall_ms: limits.liveness_max_stall.as_millis() as u64,
    };
    let app = Router::new()
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .with_state(probe);
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            tracing::error!(addr = %bound, error = %err, "health endpoint stopped");
        }
    });
    tracing::info!(addr = %bound, "health endpoints listening");
    Ok(bound)
}

async fn live(State(p): State<Probe>) -> (StatusCode, Json<Value>) {
    let lost = p
        .vitals
        .disconnected_for_ms()
        .is_some_and(|ms| ms > p.disconnect_kill_ms);
    let stalled = p
        .vitals
        .stalled_for_ms()
        .is_some_and(|ms| ms > p.max_stall_ms);
    let code = if lost || stalled {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (code, Json(p.body()))
}

async fn ready(State(p): State<Probe>) -> (StatusCode, Json<Value>) {
    let code = if p.vitals.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(p.body()))
}
