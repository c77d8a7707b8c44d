//! The client side of queue operations, for `axion queue …` and tests: ask
//! the owner for every queue's stats or read the retained ones, send an ops command to the owner and wait for its
//! reply, enqueue a task and wait for its confirmation. Everything goes over
//! MQTT, so it works against a remote owner as well as a local one.

use std::time::Duration;

use axion_client::connection::{options_v5, Failover, Reconnect};
use axion_wire::{topics, BrokerUrls, TopicError};
use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event};
use tokio::sync::mpsc;
use tokio::time::Instant;

use axion_wire::queue::{
    Command, CommandReply, CommandRequest, Enqueued, ListRequest, Stats, TaskRequest,
};

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(transparent)]
    Topic(#[from] TopicError),
    #[error("cannot reach the broker at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("lost the broker connection: {0}")]
    Disconnected(String),
    #[error("MQTT client: {0}")]
    Client(#[from] rumqttc::v5::ClientError),
    #[error("no answer from the queue owner within {0:?} (is `axion serve` or `axion queues` running for this package?)")]
    Timeout(Duration),
    #[error("the queue owner answered: {0}")]
    Refused(String),
    #[error("unreadable reply: {0}")]
    Reply(#[from] serde_json::Error),
}

enum Incoming {
    SubAck,
    Publish {
        topic: String,
        payload: Bytes,
        correlation: Option<Bytes>,
    },
    Lost(String),
}

/// One MQTT connection for ops requests.
pub struct OpsClient {
    client: AsyncClient,
    rx: mpsc::Receiver<Incoming>,
    package: String,
    client_id: String,
    timeout: Duration,
}

impl OpsClient {
    /// Connects to the first node of `urls` that answers, trying each
    /// once.
    pub async fn connect(
        urls: &BrokerUrls,
        package: &str,
        timeout: Duration,
    ) -> Result<Self, OpsError> {
        topics::validate_level("package", package)?;
        // Not an `axion-` id: those are reserved to Axion's components, and
        // an operator with read rights must be able to inspect queues.
        let client_id = format!("queue-cli-{}", uuid::Uuid::new_v4().simple());
        let mut failover = Failover::new(urls.clone(), Reconnect::default());
        let mut opts = options_v5(failover.current(), &client_id);
        opts.set_max_packet_size(Some(16 * 1024 * 1024));
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        let nodes = urls.len();
        let (tx, mut rx) = mpsc::channel(1024);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
        tokio::spawn(async move {
            let mut ready_tx = Some(ready_tx);
            // Why each node tried so far refused or failed.
            let mut failures = Vec::new();
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(Ok(()));
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if tx.send(Incoming::SubAck).await.is_err() {
                            return;
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let msg = Incoming::Publish {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: p.payload,
                            correlation: p.properties.and_then(|pr| pr.correlation_data),
                        };
                        if tx.send(msg).await.is_err() {
                            return;
                        }
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                    Ok(_) => {}
                    Err(err) => {
                        match ready_tx.take() {
                            // A one-shot command tries each node once.
                            Some(ready) if failures.len() + 1 < nodes => {
                                failures.push(format!("{}: {err}", failover.current()));
                                ready_tx = Some(ready);
                                let wait = failover.after_failure(&mut eventloop, &err);
                                tokio::time::sleep(wait).await;
                                continue;
                            }
                            Some(ready) => {
                                failures.push(if nodes > 1 {
                                    format!("{}: {err}", failover.current())
                                } else {
                                    err.to_string()
                                });
                                let _ = ready.send(Err(failures.join("; ")));
                            }
                            None => {
                                let _ = tx.send(Incoming::Lost(err.to_string())).await;
                            }
                        }
                        return;
                    }
                }
            }
        });
        let connect_err = |reason: String| OpsError::Connect {
            url: urls.to_string(),
            reason,
        };
        match tokio::time::timeout(timeout, ready_rx).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(reason))) => return Err(connect_err(reason)),
            Ok(Err(_)) => return Err(connect_err("connection task ended".into())),
            Err(_) => return Err(connect_err(format!("no CONNACK within {timeout:?}"))),
        }
        // Drop anything queued before we start.
        while rx.try_recv().is_ok() {}
        Ok(Self {
            client,
            rx,
            package: package.to_string(),
            client_id,
            timeout,
        })
    }

    async fn next(&mut self, deadline: Instant) -> Result<Option<Incoming>, OpsError> {
        match tokio::time::timeout_at(deadline, self.rx.recv()).await {
            Ok(Some(Incoming::Lost(reason))) => Err(OpsError::Disconnected(reason)),
            Ok(Some(msg)) => Ok(Some(msg)),
            Ok(None) => Err(OpsError::Disconnected("connection task ended".into())),
            Err(_) => Ok(None),
        }
    }

    async fn subscribe(&mut self, filter: String) -> Result<(), OpsError> {
        self.client.subscribe(filter, QoS::AtLeastOnce).await?;
        let deadline = Instant::now() + self.timeout;
        loop {
            match self.next(deadline).await? {
                Some(Incoming::SubAck) => return Ok(()),
                Some(_) => continue,
                None => return Err(OpsError::Timeout(self.timeout)),
            }
        }
    }

    /// Retained stats of every queue of the package: what arrives after
    /// subscribing until `quiet` passes with nothing new.
    pub async fn all_stats(&mut self, quiet: Duration) -> Result<Vec<Stats>, OpsError> {
        self.subscribe(topics::queue(&self.package, "+", "stats"))
            .await?;
        let mut out: Vec<Stats> = Vec::new();
        let end = Instant::now() + self.timeout;
        loop {
            let deadline = (Instant::now() + quiet).min(end);
            match self.next(deadline).await? {
                Some(Incoming::Publish { payload, .. }) => {
                    if payload.is_empty() {
                        continue;
                    }
                    match serde_json::from_slice::<Stats>(&payload) {
                        Ok(stats) => {
                            out.retain(|s| s.queue != stats.queue);
                            out.push(stats);
                        }
                        Err(err) => tracing::warn!(error = %err, "ignoring unreadable queue stats"),
                    }
                }
                Some(_) => {}
                None => break,
            }
        }
        out.sort_by(|a, b| a.queue.cmp(&b.queue));
        Ok(out)
    }

    /// Publishes `body` to `topic` with a Response Topic and waits for the
    /// reply that carries our correlation data.
    async fn request(
        &mut self,
        topic: String,
        body: Vec<u8>,
        wait: Duration,
    ) -> Result<Bytes, OpsError> {
        let reply_topic = format!("axion/{}/reply/{}", self.package, self.client_id);
        self.subscribe(reply_topic.clone()).await?;
        let correlation = Bytes::from(uuid::Uuid::new_v4().to_string());
        let props = PublishProperties {
            response_topic: Some(reply_topic.clone()),
            correlation_data: Some(correlation.clone()),
            ..PublishProperties::default()
        };
        self.client
            .publish_with_properties(topic, QoS::AtLeastOnce, false, body, props)
            .await?;
        let deadline = Instant::now() + wait;
        loop {
            match self.next(deadline).await? {
                Some(Incoming::Publish {
                    topic,
                    payload,
                    correlation: corr,
                }) if topic == reply_topic && corr.as_ref() == Some(&correlation) => {
                    return Ok(payload)
                }
                Some(_) => {}
                None => return Err(OpsError::Timeout(wait)),
            }
        }
    }

    /// Every queue's stats as the owner holds them now, asked on
    /// `topics::queues_list`; [`OpsError::Timeout`] when no owner answers
    /// within `wait`. Unlike [`OpsClient::all_stats`] this needs no
    /// retained message, which a clustered broker may keep on the node
    /// the owner publishes to only.
    pub async fn list(&mut self, wait: Duration) -> Result<Vec<Stats>, OpsError> {
        let body = serde_json::to_vec(&ListRequest::default())?;
        let reply = self
            .request(topics::queues_list(&self.package), body, wait)
            .await?;
        let reply: CommandReply = serde_json::from_slice(&reply)?;
        if !reply.ok {
            return Err(OpsError::Refused(
                reply.error.unwrap_or_else(|| "refused".into()),
            ));
        }
        Ok(reply.queues)
    }

    /// Sends an ops command to the owner of `queue`.
    pub async fn command(
        &mut self,
        queue: &str,
        command: Command,
    ) -> Result<CommandReply, OpsError> {
        topics::validate_level("queue", queue)?;
        let body = serde_json::to_vec(&CommandRequest {
            command,
            reply_to: None,
        })?;
        let reply = self
            .request(
                topics::queue(&self.package, queue, "cmd"),
                body,
                self.timeout,
            )
            .await?;
        let reply: CommandReply = serde_json::from_slice(&reply)?;
        if !reply.ok {
            return Err(OpsError::Refused(
                reply.error.unwrap_or_else(|| "refused".into()),
            ));
        }
        Ok(reply)
    }

    /// Enqueues a task and returns once the owner confirms it is on disk.
    pub async fn enqueue(
        &mut self,
        queue: &str,
        request: &TaskRequest,
    ) -> Result<Enqueued, OpsError> {
        topics::validate_level("queue", queue)?;
        let body = serde_json::to_vec(request)?;
        let reply = self
            .request(
                topics::queue(&self.package, queue, "enqueue"),
                body,
                self.timeout,
            )
            .await?;
        if let Ok(serde_json::Value::Object(map)) =
            serde_json::from_slice::<serde_json::Value>(&reply)
        {
            if let Some(err) = map.get("error").and_then(|e| e.as_str()) {
                return Err(OpsError::Refused(err.to_string()));
            }
        }
        Ok(serde_json::from_slice(&reply)?)
    }

    pub async fn disconnect(self) {
        let _ = self.client.disconnect().await;
    }
}
