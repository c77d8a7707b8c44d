//! MQTT 3.1.1 and 5 over WebSocket at `/mqtt`, on the bridge's port.
//!
//! The bridge does not speak MQTT to these clients: it upgrades the
//! connection (echoing the `mqtt` subprotocol), turns the WebSocket into a
//! byte stream ([`crate::ws_io`]) and hands it to an [`MqttEndpoint`], the
//! embedded broker's front end, which serves it as it serves a TCP client:
//! same handshake, auth, ACLs, limits and client-id rules. `axion bridge`
//! has no broker of its own, so there `/mqtt` answers 404 with the reason.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, State};
use axum::http::{Extensions, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;

use crate::ws_io::{self, WsReader, WsWriter};

/// The path MQTT over WebSocket is served on, as peer brokers serve it.
pub const PATH: &str = "/mqtt";

/// The WebSocket subprotocol MQTT clients ask for (MQTT 3.1.1 6.0, MQTT 5 6.0).
const SUBPROTOCOL: &str = "mqtt";

/// Smallest limit on one incoming WebSocket message, whatever the broker's
/// packet limit.
const MIN_MESSAGE_LIMIT: usize = 128 * 1024;

/// Who serves the MQTT connections that arrive at `/mqtt`: in `axion
/// serve`, the embedded broker.
pub trait MqttEndpoint: std::fmt::Debug + Send + Sync + 'static {
    /// Largest MQTT packet accepted: incoming WebSocket messages are
    /// bounded by it.
    fn max_packet_size(&self) -> usize;

    /// Serves one connection until it ends. `peer` is the client's address.
    fn serve(
        &self,
        reader: WsReader,
        writer: WsWriter,
        peer: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>>;
}

type Endpoint = Option<Arc<dyn MqttEndpoint>>;

/// The MQTT over WebSocket connections being served. They are broker
/// sessions, which the broker's own shutdown ends after the bridge has
/// stopped; their sockets belong to the bridge's runtime, which must run
/// until the last has ended (see [`crate::Bridge::serve`]).
#[derive(Debug, Default)]
pub(crate) struct Sessions {
    live: AtomicUsize,
    ended: tokio::sync::Notify,
}

impl Sessions {
    fn enter(self: &Arc<Self>) -> SessionGuard {
        self.live.fetch_add(1, Ordering::SeqCst);
        SessionGuard(self.clone())
    }

    /// Returns once no connection is being served.
    pub(crate) async fn all_ended(&self) {
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if self.live.load(Ordering::SeqCst) == 0 {
                return;
            }
            ended.await;
        }
    }
}

struct SessionGuard(Arc<Sessions>);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.ended.notify_waiters();
        }
    }
}

/// The `/mqtt` route, to merge into the bridge's router.
pub(crate) fn routes(endpoint: Endpoint, sessions: Arc<Sessions>) -> Router {
    Router::new()
        .route(PATH, any(upgrade))
        .with_state((endpoint, sessions))
}

/// Largest WebSocket message (and frame) taken from a client: room for
/// two packets of the broker's largest size, since a frame may carry more
/// than one packet.
fn message_limit(max_packet: usize) -> usize {
    max_packet.saturating_mul(2).max(MIN_MESSAGE_LIMIT)
}

async fn upgrade(
    State((endpoint, sessions)): State<(Endpoint, Arc<Sessions>)>,
    extensions: Extensions,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let Some(endpoint) = endpoint else {
        return (
            StatusCode::NOT_FOUND,
            "no MQTT broker here: MQTT over WebSocket is served by `axion serve` (embedded broker); `axion bridge` speaks only the legacy JSON protocol\n",
        )
            .into_response();
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => return rejection.into_response(),
    };
    // Both listeners put the client's address on every request; without
    // one, the client counts as remote (no loopback privileges).
    let peer = extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)), |info| info.0);
    let limit = message_limit(endpoint.max_packet_size());
    // A client that asks for no subprotocol is served too, as Mosquitto
    // does; one that offers `mqtt` gets it echoed, as browsers require.
    ws.protocols([SUBPROTOCOL])
        .max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| async move {
            let _live = sessions.enter();
            tracing::debug!(%peer, "MQTT over WebSocket connection");
            let (reader, writer) = ws_io::split(socket, peer);
            endpoint.serve(reader, writer, peer).await;
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_may_carry_two_largest_packets_and_never_less_than_the_floor() {
        assert_eq!(message_limit(1024 * 1024), 2 * 1024 * 1024);
        assert_eq!(message_limit(100), MIN_MESSAGE_LIMIT);
        assert_eq!(message_limit(usize::MAX), usize::MAX);
    }
}
