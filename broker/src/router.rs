//! Owns rumqttd's router thread and hands out links to it.
//!
//! `rumqttd::Broker` hides its router channel, and the router's `Event`
//! type cannot be named outside rumqttd, so the channel is captured in
//! closures here: the rest of the front end sees only "connect a client"
//! and "is the router still alive". A router that no session uses any more
//! is retired here too (see [`RouterHandle::retire`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::protocol::{
    Disconnect, DisconnectReasonCode, Filter, Packet, PubAck, PubAckReason, PubComp, PubCompReason,
    PubRec, PubRecReason, QoS, RetainForwardRule, Subscribe,
};
use rumqttd::{Notification, Router, RouterConfig, Strategy};

use crate::BrokerConfig;

/// Both ends of a link and the router's CONNACK.
pub type Link = (LinkTx, LinkRx, Notification);

type Connect = dyn Fn(&str, bool) -> Result<Link, LinkFailed> + Send + Sync;

/// The router would not register a link (it died, or refused the client).
#[derive(Debug, thiserror::Error)]
#[error("router refused the link: {0}")]
pub struct LinkFailed(String);
type Alive = dyn Fn() -> bool + Send + Sync;

/// A running router. Cloning the inner closures is not needed: share it in an `Arc`.
pub struct RouterHandle {
    connect: Box<Connect>,
    alive: Box<Alive>,
}

impl RouterHandle {
    /// Starts the router thread with settings derived from `config`.
    pub fn spawn(config: &BrokerConfig) -> Self {
        let router_config = RouterConfig {
            // The front end enforces the public limit with a CONNACK; the
            // router's own limit (which just drops the link) must never bite.
            max_connections: config.max_connections + 1024,
            // Also caps the retained messages sent after a SUBACK to a QoS 0
            // subscriber (rumqttd truncates them to one read): a dashboard
            // must see a whole fleet, not the first 200 instances.
            max_outgoing_packet_count: 10_000,
            max_segment_size: config.segment_size.max(1024),
            max_segment_count: config.segment_count.max(1),
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Strategy::RoundRobin,
        };
        let tx = Router::new(0, router_config).spawn();
        let alive_tx = tx.clone();
        RouterHandle {
            connect: Box::new(move |client_id, clean| {
                LinkBuilder::new(client_id, tx.clone())
                    .clean_session(clean)
                    .dynamic_filters(true)
                    .build()
                    .map_err(|e: LinkError| LinkFailed(e.to_string()))
            }),
            alive: Box::new(move || !alive_tx.is_disconnected()),
        }
    }

    /// Registers a client with the router. Blocks until the router answers,
    /// so call it from a blocking context (or use [`RouterHandle::link`]).
    pub fn connect(&self, client_id: &str, clean_session: bool) -> Result<Link, LinkFailed> {
        (self.connect)(client_id, clean_session)
    }

    /// [`RouterHandle::connect`] from async code.
    pub async fn link(self: Arc<Self>, client_id: String, clean: bool) -> Result<Link, LinkFailed> {
        tokio::task::spawn_blocking(move || self.connect(&client_id, clean))
            .await
            .map_err(|e| LinkFailed(e.to_string()))?
    }

    /// Links `client_id`, sends `packets` and leaves with a DISCONNECT: how
    /// the front end erases, creates or probes a session in the router.
    pub async fn visit(
        self: Arc<Self>,
        client_id: String,
        clean: bool,
        packets: Vec<Packet>,
    ) -> Result<(), LinkFailed> {
        // The receiving end stays open until the DISCONNECT is sent.
        let (mut tx, _rx, _) = self.link(client_id, clean).await?;
        tx.buffer().extend(packets);
        tx.send(disconnect())
            .await
            .map(|_| ())
            .map_err(|e| LinkFailed(e.to_string()))
    }

    /// False once the router thread has died.
    pub fn is_alive(&self) -> bool {
        (self.alive)()
    }

    /// Ends the router thread so that everything it holds (every filter's
    /// log, the topic cache) is freed, and gives that memory back to the
    /// system. Call it only once no session uses this router any more.
    ///
    /// rumqttd's router keeps a sender of its own channel, so it never
    /// stops by itself, and it has no stop event. The one way through its
    /// public links is a known defect: when the last member of a shared
    /// group leaves a persistent session with a QoS 1 delivery in flight,
    /// the router thread panics ("group must exists") and unwinds, dropping
    /// all its state. So this needs `panic = "unwind"`, and the process's
    /// panic hook (the binary's) keeps that expected panic out of stderr by
    /// asking [`is_retired_router_end`].
    pub async fn retire(self: Arc<Self>) -> Result<(), LinkFailed> {
        RETIRING.fetch_add(1, Ordering::SeqCst);
        let result = self.provoke_end().await;
        RETIRING.fetch_sub(1, Ordering::SeqCst);
        release_freed_memory();
        result
    }

    async fn provoke_end(self: Arc<Self>) -> Result<(), LinkFailed> {
        let failed = |e: LinkError| LinkFailed(e.to_string());
        let member = "axion-retire-member".to_string();
        let (mut sub_tx, mut sub_rx, _) = self.clone().link(member, false).await?;
        let group = "$share/axion-retire/axion-retire".to_string();
        sub_tx
            .send(subscribe(1, [(group, QoS::AtLeastOnce)]))
            .await
            .map_err(failed)?;
        let publisher = "axion-retire-publisher".to_string();
        let (mut pub_tx, mut pub_rx, _) = self.clone().link(publisher, true).await?;
        let deadline = Instant::now() + Duration::from_secs(5);
        let timed_out = || LinkFailed("the retiring router did not answer in time".into());
        // The SUBACK first, then the delivery the member never acknowledges.
        let mut published = false;
        loop {
            let wait = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(wait, sub_rx.next()).await {
                Err(_) => return Err(timed_out()),
                Ok(Err(e)) => return Err(failed(e)),
                Ok(Ok(Some(Notification::Forward(_)))) => break,
                Ok(Ok(Some(Notification::DeviceAck(_)))) if !published => {
                    pub_tx.publish("axion-retire", "retire").map_err(failed)?;
                    published = true;
                }
                Ok(Ok(Some(Notification::Unschedule))) => {
                    sub_rx.wake().await.map_err(failed)?;
                }
                Ok(_) => {}
            }
        }
        sub_tx.send(disconnect()).await.map_err(failed)?;
        drop((sub_tx, sub_rx, pub_tx));
        // The unwinding router drops the publisher's notification channel.
        loop {
            let wait = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(wait, pub_rx.next()).await {
                Err(_) => return Err(timed_out()),
                Ok(Err(_)) => break,
                Ok(Ok(_)) => {}
            }
        }
        // The rest of its state goes in the same unwind.
        while self.is_alive() {
            if Instant::now() > deadline {
                return Err(timed_out());
            }
            tokio::task::yield_now().await;
        }
        Ok(())
    }
}

/// A normal DISCONNECT for a link.
pub fn disconnect() -> Packet {
    Packet::Disconnect(
        Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
        },
        None,
    )
}

/// Acknowledgements a link gives the router for its deliveries.
pub fn puback(pkid: u16) -> Packet {
    Packet::PubAck(
        PubAck {
            pkid,
            reason: PubAckReason::Success,
        },
        None,
    )
}

pub fn pubrec(pkid: u16) -> Packet {
    Packet::PubRec(
        PubRec {
            pkid,
            reason: PubRecReason::Success,
        },
        None,
    )
}

pub fn pubcomp(pkid: u16) -> Packet {
    Packet::PubComp(
        PubComp {
            pkid,
            reason: PubCompReason::Success,
        },
        None,
    )
}

/// A SUBSCRIBE of router-form `filters` at their QoS, with no retained
/// messages (the front end sends those itself).
pub fn subscribe(pkid: u16, filters: impl IntoIterator<Item = (String, QoS)>) -> Packet {
    let filters = filters
        .into_iter()
        .map(|(path, qos)| Filter {
            path,
            qos,
            nolocal: false,
            preserve_retain: false,
            retain_forward_rule: RetainForwardRule::Never,
        })
        .collect();
    Packet::Subscribe(Subscribe { pkid, filters }, None)
}

/// Gives memory the allocator holds free back to the system. A retired
/// router frees its memory inside the allocator, but glibc keeps a dead
/// thread's arena mapped unless asked to trim it. (The `axion` binary
/// allocates with mimalloc, which purges freed pages by itself after a
/// short delay; the trim then only concerns glibc's few own allocations.)
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: malloc_trim only releases free pages of glibc's own heaps;
        // it takes no pointers and is safe to call from any thread.
        unsafe {
            malloc_trim(0);
        }
    }
}

/// Routers being retired right now (see [`RouterHandle::retire`]).
static RETIRING: AtomicUsize = AtomicUsize::new(0);

/// True for the one expected panic: that of a router thread being retired
/// (see [`RouterHandle::retire`]). A panic hook is process-wide, so this
/// crate installs none; the program that embeds the broker asks this from
/// its own hook and stays silent only when it is true.
pub fn is_retired_router_end(info: &std::panic::PanicHookInfo<'_>) -> bool {
    let router_thread = std::thread::current()
        .name()
        .is_some_and(|n| n.starts_with("router-"));
    let expected = info.payload_as_str() == Some("group must exists");
    router_thread && expected && RETIRING.load(Ordering::SeqCst) > 0
}

/// QoS and packet id of a publish. `Publish`'s qos and pkid are
/// crate-private in rumqttd; its own serialization (header byte, then the
/// packet id) is the public way to read them, done on a copy without topic
/// and payload so it costs five bytes, not the message.
pub fn qos_pkid(publish: &rumqttd::protocol::Publish) -> (u8, u16) {
    let mut header = publish.clone();
    header.topic = bytes::Bytes::new();
    header.payload = bytes::Bytes::new();
    let raw = header.serialize();
    ((raw[0] >> 1) & 0x03, u16::from_be_bytes([raw[1], raw[2]]))
}
