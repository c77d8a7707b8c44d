//! One MQTT connection that only publishes retained records.
//!
//! The legacy heartbeat service and the reaper publish records on behalf
//! of processes that cannot (a Node service that only speaks HTTP, a
//! process that was just killed). They need no subscriptions, only to know
//! when the connection (re)opens, because a restarted broker may have lost
//! what was retained and the caller republishes then.

use axion_client::connection::{options_v5, Failover, Reconnect};
use axion_wire::BrokerUrls;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A publishing connection with its own reconnect loop.
pub struct Link {
    client: AsyncClient,
    /// Bumped at every CONNACK.
    connects: watch::Receiver<u64>,
    task: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Link {
    /// Connects in the background; publishes made before the CONNACK wait
    /// in rumqttc's request queue. Must run inside tokio.
    /// Fails over between the broker's nodes like every client.
    pub fn start(urls: &BrokerUrls, client_id_prefix: &str) -> Self {
        let client_id = format!(
            "{client_id_prefix}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let mut failover = Failover::new(urls.clone(), Reconnect::default());
        let mut opts = options_v5(failover.current(), &client_id);
        opts.set_clean_start(true);
        opts.set_max_packet_size(Some(1 << 20));
        let (client, mut eventloop) = AsyncClient::new(opts, 1024);
        let (connects_tx, connects) = watch::channel(0u64);
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        failover.connected();
                        connects_tx.send_modify(|n| *n += 1);
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                    Ok(_) => {}
                    Err(error) => {
                        if connects_tx.is_closed() {
                            return;
                        }
                        let broker = failover.current().to_string();
                        let wait = failover.after_failure(&mut eventloop, &error);
                        tracing::warn!(broker, client_id, %error, retry_in = ?wait, "publishing connection lost");
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        });
        Self {
            client,
            connects,
            task: std::sync::Mutex::new(Some(task)),
        }
    }

    /// Ticks at every (re)connect.
    pub fn connects(&self) -> watch::Receiver<u64> {
        self.connects.clone()
    }

    /// Publishes a retained JSON record (QoS 1) that expires after
    /// `expiry_secs` on brokers that honour MQTT 5 message expiry; an empty
    /// payload clears the topic. Never waits for the network: a full
    /// request queue drops the record with a warning (the next one follows).
    pub fn publish_retained(&self, topic: &str, payload: Vec<u8>, expiry_secs: Option<u32>) {
        let props = PublishProperties {
            payload_format_indicator: (!payload.is_empty()).then_some(1),
            message_expiry_interval: expiry_secs,
            content_type: (!payload.is_empty()).then(|| "application/json".to_string()),
            ..Default::default()
        };
        if let Err(error) =
            self.client
                .try_publish_with_properties(topic, QoS::AtLeastOnce, true, payload, props)
        {
            tracing::warn!(topic, %error, "record not published: the MQTT request queue is full");
        }
    }

    /// Disconnects cleanly, waiting a moment for queued records to go out.
    pub async fn stop(&self) {
        if let Err(error) = self.client.disconnect().await {
            tracing::debug!(%error, "publishing connection already gone");
        }
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = task {
            if tokio::time::timeout(Duration::from_secs(2), task)
                .await
                .is_err()
            {
                tracing::debug!("publishing connection did not close in time");
            }
        }
    }
}
