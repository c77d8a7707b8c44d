//! The broker's figures for Prometheus (`GET /metrics`, served by the
//! bridge's listener in `axion serve`).
//!
//! Nothing here counts: [`BrokerMetrics`] reads, at each scrape, the
//! counters the broker keeps anyway ([`crate::server::Counters`], the
//! heartbeat record's; [`crate::traffic`]; the auth audit) and writes them
//! in the Prometheus text format through `prometheus-client`.

use std::fmt;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

use crate::server::Shared;

/// The broker as a Prometheus collector (register it with a
/// `prometheus_client` registry).
#[derive(Clone)]
pub struct BrokerMetrics {
    shared: Arc<Shared>,
}

impl fmt::Debug for BrokerMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerMetrics").finish_non_exhaustive()
    }
}

impl BrokerMetrics {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

/// A counter: `name` without `_total`, which the encoder appends.
pub(crate) fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    enc.encode_descriptor(name, help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, _, u64>(&v, None)
}

pub(crate) fn gauge<V>(enc: &mut DescriptorEncoder, name: &str, help: &str, v: V) -> fmt::Result
where
    V: prometheus_client::encoding::EncodeGaugeValue,
{
    enc.encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&v)
}

/// A counter with one label, one sample per value of it.
fn counter_by(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    samples: &[(&str, u64)],
) -> fmt::Result {
    let mut family = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value, v) in samples {
        let labels = [(label, *value)];
        family
            .encode_family(&labels)?
            .encode_counter::<NoLabelSet, _, u64>(v, None)?;
    }
    Ok(())
}

impl Collector for BrokerMetrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.shared;
        let c = crate::server::counters(s);
        let t = s.traffic.snapshot();
        let audit = s.config.auth.as_ref().map(|a| &a.audit);
        let get = |f: fn(&axion_access::auth::Audit) -> &std::sync::atomic::AtomicU64| {
            audit.map_or(0, |a| f(a).load(Relaxed))
        };
        let (kept, away) = s.lifetimes.kept_sessions();
        let e = &mut enc;

        let info = [("version", env!("CARGO_PKG_VERSION"))];
        e.encode_descriptor(
            "axion_broker",
            "The embedded broker's version",
            None,
            MetricType::Info,
        )?
        .encode_info(&info)?;
        gauge(
            e,
            "axion_broker_uptime_seconds",
            "Seconds since the broker started",
            s.started.elapsed().as_secs_f64(),
        )?;

        // Connections and sessions.
        counter(
            e,
            "axion_broker_connections",
            "MQTT connections accepted, on every listener (TCP, TLS, Unix socket)",
            t.connections,
        )?;
        counter_by(
            e,
            "axion_broker_connections_refused",
            "MQTT connections refused: at --max-connections, bad or missing credentials, a client id the user may not take, logins refused unchecked while their address is in backoff",
            "reason",
            &[
                ("max_connections", c.refused_at_limit),
                ("auth", c.auth_refused_connects),
                ("client_id", get(|a| &a.refused_client_ids)),
                ("login_throttled", c.auth_throttled_logins),
            ],
        )?;
        gauge(
            e,
            "axion_broker_sessions_connected",
            "MQTT connections open now (Axion's own queue owner, bridge and heartbeat included)",
            c.sessions as u64,
        )?;
        gauge(
            e,
            "axion_broker_sessions_kept",
            "Sessions kept beyond their connection (MQTT 3.1.1 clean session off, MQTT 5 session expiry), connected or not",
            kept as u64,
        )?;
        gauge(
            e,
            "axion_broker_sessions_away",
            "Kept sessions whose client is not connected",
            away as u64,
        )?;
        counter(
            e,
            "axion_broker_sessions_expired",
            "Kept sessions erased when their expiry passed with no new connection",
            c.sessions_expired,
        )?;
        counter(
            e,
            "axion_broker_slow_consumers_disconnected",
            "Subscribers disconnected for holding publishers back past the slow-consumer timeout or filling their buffer",
            c.slow_consumers_cut_off,
        )?;

        // Traffic.
        counter(
            e,
            "axion_broker_messages_received",
            "PUBLISH packets received from clients",
            t.publishes_received,
        )?;
        counter(
            e,
            "axion_broker_messages_sent",
            "PUBLISH packets sent to clients",
            t.publishes_sent,
        )?;
        counter(
            e,
            "axion_broker_packets_received",
            "MQTT control packets of any type received from clients",
            t.packets_received,
        )?;
        counter(
            e,
            "axion_broker_packets_sent",
            "MQTT control packets of any type sent to clients",
            t.packets_sent,
        )?;
        counter(
            e,
            "axion_broker_received_bytes",
            "Bytes read from client connections",
            t.bytes_received,
        )?;
        counter(
            e,
            "axion_broker_sent_bytes",
            "Bytes written to client connections",
            t.bytes_sent,
        )?;

        // Refusals.
        counter(
            e,
            "axion_broker_publishes_denied",
            "Publishes (and wills) denied by the ACL",
            c.acl_denied_publishes,
        )?;
        counter_by(
            e,
            "axion_broker_subscriptions_refused",
            "Subscription filters refused: denied by the ACL, past --max-filters-per-client, or past --max-filters in the router",
            "reason",
            &[
                ("acl", c.acl_denied_subscribes),
                ("filters_per_client", c.filters_refused_per_client),
                ("max_filters", s.filters_refused_at_limit.load(Relaxed)),
            ],
        )?;
        counter(
            e,
            "axion_broker_messages_withheld",
            "Deliveries withheld by the deny list from a subscriber whose wider filter matched",
            get(|a| &a.withheld_deliveries),
        )?;

        // Dropped messages and kept state.
        counter_by(
            e,
            "axion_broker_messages_dropped",
            "Messages not delivered: new QoS 1/2 messages for an away session whose queue was full, second copies of a $share delivery from the router",
            "reason",
            &[
                ("queue_full", c.queued_dropped),
                ("share_repeat", c.share_repeats_dropped),
            ],
        )?;
        gauge(
            e,
            "axion_broker_queued_messages",
            "QoS 1/2 messages waiting in the queues of away kept sessions",
            c.queued_messages,
        )?;
        gauge(
            e,
            "axion_broker_retained_messages",
            "Retained messages kept ($SYS topics not included)",
            s.retained_count() as u64,
        )?;
        counter(
            e,
            "axion_broker_retained_refused",
            "Retained messages delivered but not retained because the store was at --max-retained",
            s.retained_refused(),
        )?;

        // Router renewals.
        counter(
            e,
            "axion_broker_router_renewals",
            "Times every session moved to a fresh router to free filter and topic memory",
            c.router_renewals,
        )?;
        counter(
            e,
            "axion_broker_router_renewals_put_off",
            "Router renewals put off (a kept session was still owed messages)",
            c.router_renewals_put_off,
        )?;
        gauge(
            e,
            "axion_broker_router_renewal_pause_seconds",
            "How long the last router renewal paused publishing",
            c.router_renewal_pause_ms as f64 / 1000.0,
        )?;
        Ok(())
    }
}
