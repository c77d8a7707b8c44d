//! The queue owner's outbound traffic, straight into its own session.
//!
//! Per task the owner publishes a confirmation and the task itself. As an
//! MQTT client each one is encoded by rumqttc, written to a socket, read
//! and decoded again by the owner's session, and acknowledged back the same
//! way. Inside `axion serve` the owner hands them, built, to that session
//! instead. The session treats them as its client's own publishes (ACL,
//! flow control, retained store, tap, router renewals), so subscribers see
//! no difference, and they still go to the router under the owner's id.
//!
//! The owner's MQTT connection stays: it is the session, with its
//! subscriptions and login. The receiving end follows that connection:
//! each session of the owner's client id takes it while it serves and gives
//! it back when it ends, so what the owner publishes while it reconnects
//! waits in the bounded channel, as it waited in rumqttc's request queue.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rumqttd::protocol::PublishProperties;
use tokio::sync::{mpsc, Notify};

/// Publishes waiting for the owner's session; past this the owner keeps
/// them in its outbox.
const CAPACITY: usize = 4096;

/// Most publishes a session takes from the outlet in one turn.
const BATCH: usize = 256;

/// One publish from the owner, at QoS 1, as its session must forward it.
pub struct Injected {
    pub topic: Bytes,
    pub payload: Bytes,
    pub retain: bool,
    pub properties: Option<Box<PublishProperties>>,
}

/// The owner's end.
pub struct OutletTx {
    client_id: String,
    tx: mpsc::Sender<Injected>,
}

/// Why [`OutletTx::try_send`] did not take a publish.
pub enum Refused {
    /// The channel is full: try again later.
    Full(Injected),
    /// The broker has stopped.
    Closed(Injected),
}

impl OutletTx {
    /// The client id whose session forwards these publishes: the owner
    /// must connect under it, or nothing it sends here goes out.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    pub fn try_send(&self, publish: Injected) -> Result<(), Refused> {
        self.tx.try_send(publish).map_err(|err| match err {
            mpsc::error::TrySendError::Full(p) => Refused::Full(p),
            mpsc::error::TrySendError::Closed(p) => Refused::Closed(p),
        })
    }
}

/// The broker's end: the receiver, lent to the session of one client id.
pub struct Outlet {
    client_id: String,
    rx: Mutex<Option<mpsc::Receiver<Injected>>>,
    /// Woken when a session gives the receiver back.
    returned: Notify,
}

/// An outlet for the session of `client_id`.
pub fn outlet(client_id: &str) -> (Arc<Outlet>, OutletTx) {
    let (tx, rx) = mpsc::channel(CAPACITY);
    let outlet = Outlet {
        client_id: client_id.to_string(),
        rx: Mutex::new(Some(rx)),
        returned: Notify::new(),
    };
    let tx = OutletTx {
        client_id: client_id.to_string(),
        tx,
    };
    (Arc::new(outlet), tx)
}

impl Outlet {
    /// The session's hold on this outlet, if `client_id` is the owner's.
    pub fn for_client(self: &Arc<Self>, client_id: &str) -> Option<OutletLink> {
        (client_id == self.client_id).then(|| OutletLink {
            outlet: self.clone(),
            rx: None,
        })
    }

    fn take(&self) -> Option<mpsc::Receiver<Injected>> {
        self.rx.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// A session's hold on the outlet. It takes the receiver on first use
/// (waiting while an older session of the same id still has it) and gives
/// it back when dropped.
pub struct OutletLink {
    outlet: Arc<Outlet>,
    rx: Option<mpsc::Receiver<Injected>>,
}

impl OutletLink {
    /// Moves up to [`BATCH`] publishes into `buf`; 0 once the owner has
    /// dropped its end. Cancel-safe: the receiver, once taken, is kept in
    /// `self` before anything is awaited.
    pub async fn recv_many(&mut self, buf: &mut Vec<Injected>) -> usize {
        loop {
            if let Some(rx) = self.rx.as_mut() {
                return rx.recv_many(buf, BATCH).await;
            }
            // Registered before the check, so a return in between wakes it.
            let returned = self.outlet.returned.notified();
            match self.outlet.take() {
                Some(rx) => self.rx = Some(rx),
                None => returned.await,
            }
        }
    }

    /// What is already waiting, without waiting (for a session's end).
    pub fn take_waiting(&mut self) -> Vec<Injected> {
        let mut buf = Vec::new();
        if self.rx.is_none() {
            self.rx = self.outlet.take();
        }
        if let Some(rx) = self.rx.as_mut() {
            while buf.len() < CAPACITY {
                match rx.try_recv() {
                    Ok(p) => buf.push(p),
                    Err(_) => break,
                }
            }
        }
        buf
    }
}

impl Drop for OutletLink {
    fn drop(&mut self) {
        if let Some(rx) = self.rx.take() {
            *self.outlet.rx.lock().unwrap_or_else(|p| p.into_inner()) = Some(rx);
            self.outlet.returned.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::time::timeout;

    fn publish(n: u8) -> Injected {
        Injected {
            topic: Bytes::from_static(b"t"),
            payload: Bytes::from(vec![n]),
            retain: false,
            properties: None,
        }
    }

    #[tokio::test]
    async fn the_receiver_follows_the_newest_session_of_the_owner() {
        let (outlet, tx) = outlet("owner");
        assert!(outlet.for_client("someone-else").is_none());
        let mut first = outlet.for_client("owner").expect("owner's session");
        let mut buf = Vec::new();
        assert!(tx.try_send(publish(1)).is_ok());
        assert_eq!(first.recv_many(&mut buf).await, 1);

        // A second session of the id waits while the first holds it …
        let mut second = outlet.for_client("owner").expect("owner's session");
        assert!(tx.try_send(publish(2)).is_ok());
        let mut buf = Vec::new();
        let wait = Duration::from_millis(100);
        assert!(
            timeout(wait, second.recv_many(&mut buf)).await.is_err(),
            "the second session took the receiver from the first"
        );
        // … and gets what is left once the first ends.
        drop(first);
        let got = timeout(Duration::from_secs(1), second.recv_many(&mut buf)).await;
        assert_eq!(got.ok(), Some(1));
        assert_eq!(buf[0].payload, Bytes::from(vec![2]));
    }
}
