//! The bridge's one MQTT 5 connection, shared by every WebSocket client.
//!
//! Two rumqttc rules shape this module:
//! the event loop must keep being polled, so it lives in its own task and
//! never awaits a client call (fan-out there is non-blocking), and rumqttc
//! neither backs off nor restores subscriptions, so the loop sleeps between
//! attempts and every CONNACK wakes [`Mqtt::resync`], which subscribes
//! everything the [`Hub`] wants again and lets the task queues re-announce
//! their credit.

use crate::client::Metrics;
use crate::hub::{Hub, Wanted};
use crate::tasks::Tasks;
use axion_client::connection::Reconnect;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, SubscribeProperties, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, ClientError, Event, EventLoop};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, Notify};
use tokio_util::sync::CancellationToken;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

pub struct Mqtt {
    pub client: AsyncClient,
    pub client_id: String,
    hub: Arc<Hub>,
    /// What the broker holds for us now: filter → subscription identifier.
    /// An async mutex so that a WebSocket `subscribe` has handed its
    /// SUBSCRIBE to the connection before the client's next frame is read:
    /// the broker then sees it before any later publish from that client.
    subscribed: Mutex<HashMap<String, usize>>,
}

impl Mqtt {
    pub fn new(client: AsyncClient, client_id: String, hub: Arc<Hub>) -> Self {
        Self {
            client,
            client_id,
            hub,
            subscribed: Mutex::new(HashMap::new()),
        }
    }

    /// Brings the broker's subscription for `filter` in line with what the
    /// hub wants now. Idempotent, so callers need not agree on order.
    pub async fn reconcile(&self, filter: &str) -> Result<(), ClientError> {
        let mut subscribed = self.subscribed.lock().await;
        self.reconcile_locked(&mut subscribed, filter).await
    }

    async fn reconcile_locked(
        &self,
        subscribed: &mut HashMap<String, usize>,
        filter: &str,
    ) -> Result<(), ClientError> {
        match (self.hub.desired(filter), subscribed.get(filter).copied()) {
            (Some(wanted), Some(current)) if current == wanted.id => Ok(()),
            (Some(Wanted { id, qos, no_local }), _) => {
                let props = SubscribeProperties {
                    id: Some(id),
                    user_properties: Vec::new(),
                };
                let mut sub = Filter::new(filter, qos);
                sub.nolocal = no_local;
                self.client
                    .subscribe_many_with_properties([sub], props)
                    .await?;
                subscribed.insert(filter.to_string(), id);
                tracing::debug!(filter, id, no_local, "subscribed");
                Ok(())
            }
            (None, Some(_)) => {
                subscribed.remove(filter);
                self.client.unsubscribe(filter).await?;
                tracing::debug!(filter, "unsubscribed");
                Ok(())
            }
            (None, None) => Ok(()),
        }
    }

    /// After a CONNACK: the broker may hold nothing for us, so subscribe
    /// every wanted filter again.
    pub async fn resync(&self) {
        let mut subscribed = self.subscribed.lock().await;
        subscribed.clear();
        let filters = self.hub.all_filters();
        let count = filters.len();
        for filter in filters {
            if let Err(error) = self.reconcile_locked(&mut subscribed, &filter).await {
                tracing::error!(%error, filter, "re-subscribe after reconnect failed");
            }
        }
        tracing::info!(filters = count, "subscriptions restored after CONNACK");
    }
}

/// Polls the connection until `cancel`: routes incoming publishes, tracks
/// readiness, and wakes `resync` on every CONNACK.
pub async fn run_event_loop(
    mut eventloop: EventLoop,
    hub: Arc<Hub>,
    tasks: Arc<Tasks>,
    resync: Arc<Notify>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let mut reconnect = Reconnect::new(BACKOFF_MIN, BACKOFF_MAX);
    loop {
        let event = tokio::select! {
            _ = cancel.cancelled() => return,
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let Ok(topic) = std::str::from_utf8(&publish.topic) else {
                    tracing::debug!("dropping a publish whose topic is not UTF-8");
                    continue;
                };
                if topic.starts_with(&hub.event_prefix) {
                    hub.dispatch_event(topic, &publish.payload, publish.properties.as_ref());
                } else {
                    tasks.on_publish(topic, &publish);
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                reconnect.connected();
                let max = ack.properties.as_ref().and_then(|p| p.max_packet_size);
                metrics
                    .broker_max_packet
                    .store(max.map_or(0, u64::from), Ordering::Relaxed);
                metrics.mqtt_connects.fetch_add(1, Ordering::Relaxed);
                metrics.mqtt_connected.store(true, Ordering::Relaxed);
                tracing::info!("connected to the MQTT broker");
                resync.notify_one();
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                for code in &ack.return_codes {
                    if !matches!(code, SubscribeReasonCode::Success(_)) {
                        tracing::warn!(pkid = ack.pkid, ?code, "the broker refused a subscription");
                    }
                }
            }
            Ok(Event::Incoming(Packet::Disconnect(d))) => {
                tracing::warn!(reason = ?d.reason_code, "the broker sent DISCONNECT");
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                metrics.mqtt_connected.store(false, Ordering::Relaxed);
                return;
            }
            Ok(_) => {}
            Err(error) => {
                metrics.mqtt_connected.store(false, Ordering::Relaxed);
                let wait = reconnect.after_failure();
                tracing::warn!(%error, retry_in = ?wait, "MQTT connection lost");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}
