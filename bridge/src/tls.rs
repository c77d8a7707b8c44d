//! The bridge over TLS (`wss://`, and `/health` over `https://`).
//!
//! `axum::serve` only takes plain listeners, so with a certificate the
//! bridge accepts TCP itself, runs the rustls handshake, and hands each
//! connection to hyper's HTTP/1 server with upgrades (WebSocket) enabled —
//! the same protocol support the plain listener has. Shutdown stops
//! accepting, asks every HTTP connection to finish its current request,
//! and waits for them; upgraded WebSocket connections are closed by the
//! bridge's client token, as on the plain listener.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// A peer that has not finished its TLS handshake by then is dropped, so
/// idle sockets cannot pile up.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client gets to send a request's headers (hyper's default, made
/// explicit because it only applies with a timer set).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after an accept error such as EMFILE, which would otherwise spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How long shutdown lets HTTP requests in progress finish (a client
/// trickling its headers would otherwise hold it for the header timeout).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves `router` over TLS on `listener` until `shutdown` completes, then
/// waits (at most [`DRAIN_TIMEOUT`]) for the HTTP connections to finish.
pub(crate) async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    router: Router,
    shutdown: impl Future<Output = ()>,
) {
    let mut connections = JoinSet::new();
    let stop = CancellationToken::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            Some(ended) = connections.join_next() => {
                log_panic(ended);
                continue;
            }
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) if is_per_connection(&error) => {
                    tracing::debug!(%error, "wss accept: connection gone before accept");
                    continue;
                }
                Err(error) => {
                    tracing::error!(%error, "wss accept failed; retrying");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        connections.spawn(connection(
            tcp,
            peer,
            acceptor.clone(),
            router.clone(),
            stop.clone(),
        ));
    }
    drop(listener);
    stop.cancel();
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while let Some(ended) = connections.join_next().await {
            log_panic(ended);
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            connections = connections.len(),
            "wss connections still open at shutdown; closing them"
        );
        connections.shutdown().await;
    }
}

fn log_panic(ended: Result<(), tokio::task::JoinError>) {
    if let Err(error) = ended {
        tracing::error!(%error, "wss connection task failed");
    }
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    router: Router,
    stop: CancellationToken,
) {
    if let Err(error) = tcp.set_nodelay(true) {
        tracing::debug!(%error, %peer, "TCP_NODELAY on a wss connection");
    }
    let handshake = tokio::select! {
        _ = stop.cancelled() => return,
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)) => r,
    };
    let tls = match handshake {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            tracing::debug!(%error, %peer, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    // Handlers that need the client's address (the legacy heartbeat
    // service) read it as they do behind `axum::serve`.
    let router = router.layer(axum::Extension(axum::extract::ConnectInfo(peer)));
    let conn = http
        .serve_connection(TokioIo::new(tls), TowerToHyperService::new(router))
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, %peer, "HTTPS connection ended with an error");
    }
}

/// Accept errors that concern one connection, not the listener.
fn is_per_connection(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(
        error.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    )
}
