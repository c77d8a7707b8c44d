//! `GET /metrics`: the bridge's counters (the ones `/stats` shows) in the
//! Prometheus text format, and beside them whatever the process running
//! the bridge adds ([`crate::BridgeConfig::metrics`]: `axion serve` adds
//! its broker's and its queues').

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{prometheus_text, DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::client::Metrics;
use crate::hub::Hub;

/// The bridge's own figures, read at each scrape.
pub(crate) struct BridgeCollector {
    pub metrics: Arc<Metrics>,
    pub hub: Arc<Hub>,
}

impl fmt::Debug for BridgeCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BridgeCollector").finish_non_exhaustive()
    }
}

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: &AtomicU64) -> fmt::Result {
    enc.encode_descriptor(name, help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, _, u64>(&v.load(Relaxed), None)
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    enc.encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&v)
}

impl Collector for BridgeCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let m = &self.metrics;
        let e = &mut enc;
        gauge(
            e,
            "axion_bridge_clients",
            "WebSocket clients connected now",
            m.clients.load(Relaxed),
        )?;
        counter(
            e,
            "axion_bridge_connections",
            "WebSocket clients accepted",
            &m.connections_total,
        )?;
        counter(
            e,
            "axion_bridge_frames_received",
            "Frames received from WebSocket clients",
            &m.frames_in,
        )?;
        counter(
            e,
            "axion_bridge_frames_sent",
            "Frames written to WebSocket clients (events, replies, errors)",
            &m.frames_out,
        )?;
        counter(
            e,
            "axion_bridge_bad_frames",
            "Frames answered with an error (malformed, refused, not authorized, too large)",
            &m.bad_frames,
        )?;
        counter(
            e,
            "axion_bridge_oversize_refused",
            "Frames refused because the MQTT packet they would make is over the broker's maximum",
            &m.oversize_refused,
        )?;
        counter(
            e,
            "axion_bridge_slow_consumers_disconnected",
            "WebSocket clients disconnected because their outgoing queue stayed full",
            &m.slow_consumers,
        )?;
        counter(
            e,
            "axion_bridge_dead_peers_disconnected",
            "WebSocket clients disconnected because they answered no ping",
            &m.dead_peers,
        )?;
        counter(
            e,
            "axion_bridge_events_published",
            "Events published to MQTT for WebSocket clients",
            &m.events_published,
        )?;
        counter(
            e,
            "axion_bridge_events_kept_local",
            "Events of WebSocket clients no MQTT client subscribed to: delivered by the bridge alone, not published",
            &m.events_kept_local,
        )?;
        counter(
            e,
            "axion_bridge_events_delivered",
            "Event frames queued to WebSocket clients",
            &m.events_delivered,
        )?;
        counter(
            e,
            "axion_bridge_enqueue_retries",
            "Enqueues published again because the queue owner had not confirmed them",
            &m.enqueue_retries,
        )?;
        counter(
            e,
            "axion_bridge_mqtt_connects",
            "CONNACKs the bridge's MQTT connection received (more than one: it reconnected)",
            &m.mqtt_connects,
        )?;
        gauge(
            e,
            "axion_bridge_mqtt_connected",
            "1 while the bridge's MQTT connection is up",
            u64::from(m.mqtt_connected.load(Relaxed)),
        )?;
        gauge(
            e,
            "axion_bridge_mqtt_filters",
            "Distinct MQTT filters the bridge holds for its clients",
            self.hub.filter_count() as u64,
        )?;
        Ok(())
    }
}

/// A collector handed in by the process running the bridge.
#[derive(Debug)]
struct Added(Arc<dyn Collector>);

impl Collector for Added {
    fn encode(&self, enc: DescriptorEncoder) -> fmt::Result {
        self.0.encode(enc)
    }
}

/// The registry `/metrics` encodes: what the process added, then the
/// bridge's own.
pub(crate) fn registry(added: &[Arc<dyn Collector>], own: BridgeCollector) -> Registry {
    let mut registry = Registry::default();
    for collector in added {
        registry.register_collector(Box::new(Added(collector.clone())));
    }
    registry.register_collector(Box::new(own));
    registry
}

pub(crate) async fn serve(State(s): State<Arc<crate::server::Shared>>) -> Response {
    let mut body = String::with_capacity(16 * 1024);
    match prometheus_text::encode(&mut body, &s.registry) {
        Ok(()) => (
            [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
            body,
        )
            .into_response(),
        Err(error) => {
            tracing::error!(%error, "could not encode the metrics");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}
