//! A client id reconnecting while its old connection is still there takes
//! the session over, whatever the timing: ten connects with one id at the
//! same moment are all accepted, and one connection is left holding it.
//! Real processes: `axion serve`, raw MQTT 5 sockets.

mod common;

use std::time::Duration;

use common::raw::{raw_connect_flags, raw_subscribe, read_packet};
use common::Serve;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the broker closes the connection, or `wait` passes (false).
async fn closed_within(s: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_simultaneous_connects_with_one_client_id_are_all_accepted() {
    let serve = Serve::start();
    let port = serve.mqtt_port;
    for round in 0..10 {
        let id = format!("twin-{round}");
        // Half keep their session, half start clean: both kinds take over.
        let connects = (0..10).map(|i| {
            let connect = raw_connect_flags(5, &id, 60, if i % 2 == 0 { 0x00 } else { 0x02 });
            async move {
                let mut s = TcpStream::connect(("127.0.0.1", port))
                    .await
                    .expect("connect");
                s.write_all(&connect).await.expect("CONNECT");
                let (byte1, body) = read_packet(&mut s, 10_000).await.expect("CONNACK");
                (s, byte1, body)
            }
        });
        let mut conns = Vec::new();
        for (s, byte1, body) in futures_join(connects).await {
            assert_eq!(byte1, 0x20, "round {round}: a CONNACK");
            assert_eq!(
                body.get(1),
                Some(&0),
                "round {round}: accepted, not {body:02X?}"
            );
            conns.push(s);
        }
        // Every connection but one is taken over and closed; the one left
        // is a working session.
        let checks = conns.into_iter().map(|mut s| async move {
            let closed = closed_within(&mut s, Duration::from_millis(1000)).await;
            (!closed).then_some(s)
        });
        let mut open: Vec<TcpStream> = futures_join(checks).await.into_iter().flatten().collect();
        assert_eq!(
            open.len(),
            1,
            "round {round}: one connection holds the session"
        );
        let s = &mut open[0];
        s.write_all(&raw_subscribe(5, "twin/t", 1))
            .await
            .expect("SUBSCRIBE");
        assert_eq!(read_packet(s, 5_000).await.expect("SUBACK").0, 0x90);
    }
}

/// Runs the futures at once and returns their outputs in order.
async fn futures_join<F: std::future::Future + Send + 'static>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}
