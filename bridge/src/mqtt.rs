//! The bridge's one MQTT 5 connection, shared by every WebSocket client:
//! rumqttc over a socket to any broker, or the in-process link to the
//! broker beside it in `axion serve` (`link.rs`). [`Client`] sends on
//! either; [`Inbox`] takes what either receives.
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
use crate::link::{LinkClient, LinkClosed};
use crate::tasks::Tasks;
use axion_client::connection::Failover;
use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{
    Disconnect, DisconnectReasonCode, Filter, Packet, Publish, PublishProperties, SubAck,
    Subscribe, SubscribeProperties, SubscribeReasonCode, Unsubscribe,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ClientError, Event, EventLoop};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, Notify};
use tokio_util::sync::CancellationToken;

pub(crate) const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Why a request could not be handed to the MQTT connection.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    /// Boxed: it carries the whole request back.
    #[error(transparent)]
    Socket(Box<ClientError>),
    #[error(transparent)]
    Link(#[from] LinkClosed),
}

impl From<ClientError> for MqttError {
    fn from(e: ClientError) -> Self {
        MqttError::Socket(Box::new(e))
    }
}

/// The sending side of the bridge's MQTT connection.
#[derive(Clone)]
pub enum Client {
    /// rumqttc, over a socket to any MQTT 5 broker.
    Socket(AsyncClient),
    /// The in-process link to the broker beside the bridge.
    Link(LinkClient),
}

impl Client {
    pub async fn publish(
        &self,
        topic: String,
        qos: QoS,
        payload: Bytes,
        properties: Option<PublishProperties>,
    ) -> Result<(), MqttError> {
        match self {
            Client::Socket(c) => match properties {
                Some(props) => {
                    c.publish_with_properties(topic, qos, false, payload, props)
                        .await?
                }
                None => c.publish(topic, qos, false, payload).await?,
            },
            Client::Link(l) => {
                let publish = Publish {
                    dup: false,
                    qos,
                    retain: false,
                    topic: Bytes::from(topic),
                    pkid: 0,
                    payload,
                    properties,
                };
                l.send(Packet::Publish(publish)).await?
            }
        }
        Ok(())
    }

    async fn subscribe(&self, filter: Filter, props: SubscribeProperties) -> Result<(), MqttError> {
        match self {
            Client::Socket(c) => c.subscribe_many_with_properties([filter], props).await?,
            Client::Link(l) => {
                l.send(Packet::Subscribe(Subscribe::new(filter, Some(props))))
                    .await?
            }
        }
        Ok(())
    }

    async fn unsubscribe(&self, filter: &str) -> Result<(), MqttError> {
        match self {
            Client::Socket(c) => c.unsubscribe(filter).await?,
            Client::Link(l) => {
                l.send(Packet::Unsubscribe(Unsubscribe::new(filter, None)))
                    .await?
            }
        }
        Ok(())
    }

    /// Sends DISCONNECT after whatever was queued before it.
    pub async fn disconnect(&self) -> Result<(), MqttError> {
        match self {
            Client::Socket(c) => c.disconnect().await?,
            Client::Link(l) => {
                let normal = Disconnect::new(DisconnectReasonCode::NormalDisconnection);
                l.send(Packet::Disconnect(normal)).await?
            }
        }
        Ok(())
    }
}

pub struct Mqtt {
    pub client: Client,
    pub client_id: String,
    hub: Arc<Hub>,
    /// What the broker holds for us now: filter → subscription identifier.
    /// An async mutex so that a WebSocket `subscribe` has handed its
    /// SUBSCRIBE to the connection before the client's next frame is read:
    /// the broker then sees it before any later publish from that client.
    subscribed: Mutex<HashMap<String, usize>>,
}

impl Mqtt {
    pub fn new(client: Client, client_id: String, hub: Arc<Hub>) -> Self {
        Self {
            client,
            client_id,
            hub,
            subscribed: Mutex::new(HashMap::new()),
        }
    }

    /// Brings the broker's subscription for `filter` in line with what the
    /// hub wants now. Idempotent, so callers need not agree on order.
    pub async fn reconcile(&self, filter: &str) -> Result<(), MqttError> {
        let mut subscribed = self.subscribed.lock().await;
        self.reconcile_locked(&mut subscribed, filter).await
    }

    async fn reconcile_locked(
        &self,
        subscribed: &mut HashMap<String, usize>,
        filter: &str,
    ) -> Result<(), MqttError> {
        match (self.hub.desired(filter), subscribed.get(filter).copied()) {
            (Some(wanted), Some(current)) if current == wanted.id => Ok(()),
            (Some(Wanted { id, qos, no_local }), _) => {
                let props = SubscribeProperties {
                    id: Some(id),
                    user_properties: Vec::new(),
                };
                let mut sub = Filter::new(filter, qos);
                sub.nolocal = no_local;
                self.client.subscribe(sub, props).await?;
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

/// What the bridge does with what its MQTT connection receives, whichever
/// carries it. Called from the connection's own task, so nothing here
/// waits for that connection (fan-out never blocks).
#[derive(Clone)]
pub struct Inbox {
    pub hub: Arc<Hub>,
    pub tasks: Arc<Tasks>,
    pub resync: Arc<Notify>,
    pub metrics: Arc<Metrics>,
}

impl Inbox {
    /// A CONNACK: the broker's Maximum Packet Size, if it gave one. The
    /// broker may hold nothing for us now: `resync` subscribes again.
    pub fn connected(&self, broker_max_packet: Option<u32>) {
        self.metrics
            .broker_max_packet
            .store(broker_max_packet.map_or(0, u64::from), Ordering::Relaxed);
        self.metrics.mqtt_connects.fetch_add(1, Ordering::Relaxed);
        self.metrics.mqtt_connected.store(true, Ordering::Relaxed);
        tracing::info!("connected to the MQTT broker");
        self.resync.notify_one();
    }

    pub fn disconnected(&self) {
        self.metrics.mqtt_connected.store(false, Ordering::Relaxed);
    }

    /// Routes an incoming publish: events to the hub, the rest to the
    /// task queues.
    pub fn publish(&self, publish: &Publish) {
        let Ok(topic) = std::str::from_utf8(&publish.topic) else {
            tracing::debug!("dropping a publish whose topic is not UTF-8");
            return;
        };
        if topic.starts_with(&self.hub.event_prefix) {
            self.hub
                .dispatch_event(topic, &publish.payload, publish.properties.as_ref());
        } else {
            self.tasks.on_publish(topic, publish);
        }
    }

    pub fn suback(&self, ack: &SubAck) {
        for code in &ack.return_codes {
            if !matches!(code, SubscribeReasonCode::Success(_)) {
                tracing::warn!(pkid = ack.pkid, ?code, "the broker refused a subscription");
            }
        }
    }

    pub fn broker_disconnect(&self, d: &Disconnect) {
        tracing::warn!(reason = ?d.reason_code, "the broker sent DISCONNECT");
    }
}

/// Polls a rumqttc connection until `cancel`, handing what arrives to
/// `inbox`, failing over between the broker's nodes.
pub async fn run_event_loop(
    mut eventloop: EventLoop,
    mut failover: Failover,
    inbox: Inbox,
    cancel: CancellationToken,
) {
    loop {
        let event = tokio::select! {
            _ = cancel.cancelled() => return,
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::Publish(publish))) => inbox.publish(&publish),
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                failover.connected();
                inbox.connected(ack.properties.as_ref().and_then(|p| p.max_packet_size));
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => inbox.suback(&ack),
            Ok(Event::Incoming(Packet::Disconnect(d))) => inbox.broker_disconnect(&d),
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                inbox.disconnected();
                return;
            }
            Ok(_) => {}
            Err(error) => {
                inbox.disconnected();
                let broker = failover.current().to_string();
                let wait = failover.after_failure(&mut eventloop, &error);
                tracing::warn!(broker, %error, retry_in = ?wait, "MQTT connection lost");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}
