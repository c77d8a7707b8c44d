//! Subscription churn never stalls a healthy client: while clients
//! subscribe to throwaway filters and drop, over and over, so that the
//! broker renews its router again and again, a healthy client's QoS 1
//! round trips all stay short, and every churning client's UNSUBSCRIBE is
//! answered.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::mqtt::{qos_v5, recv, V4, V5};
use common::Serve;

/// How long the churn lasts.
const CHURN: Duration = Duration::from_secs(60);
/// Clients churning at once.
const CHURNERS: u64 = 4;
/// Distinct filters each churning connection subscribes to.
const FILTERS: u64 = 100;
/// The promise: no healthy round trip takes this long, whatever the churn.
const PROMISE: Duration = Duration::from_millis(500);

/// One counter of the broker's heartbeat record.
fn counter(record: &common::mqtt::Msg, name: &str) -> u64 {
    let record: serde_json::Value = serde_json::from_slice(&record.payload).unwrap_or_default();
    record["broker"][name].as_u64().unwrap_or(0)
}

/// Connects, subscribes to `FILTERS` filters nobody else uses in one
/// SUBSCRIBE, unsubscribes one of them, and drops the connection, until
/// `stop`.
async fn churn(port: u16, worker: u64, stop: Arc<AtomicBool>, filters: Arc<AtomicU64>) {
    use rumqttc::v5::mqttbytes::v5::{Filter, Packet};
    let mut visit = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let mut client = V5::connect(port, &format!("churn-{worker}")).await;
        let subscribe: Vec<Filter> = (0..FILTERS)
            .map(|i| Filter::new(format!("churn/{worker}/{visit}/{i}/+"), qos_v5(1)))
            .collect();
        client
            .client
            .subscribe_many(subscribe)
            .await
            .expect("subscribe");
        // A message on the last filter proves the router holds them.
        let last = format!("churn/{worker}/{visit}/{}/x", FILTERS - 1);
        client.publish(&last, b"c", 1, false).await;
        while recv(&mut client.rx, 30).await.topic != last {}
        filters.fetch_add(FILTERS, Ordering::Relaxed);
        // Every UNSUBSCRIBE is answered, renewal or not.
        client
            .client
            .unsubscribe(format!("churn/{worker}/{visit}/0/+"))
            .await
            .expect("unsubscribe");
        loop {
            let packet = tokio::time::timeout(Duration::from_secs(30), client.packets.recv())
                .await
                .expect("an UNSUBACK within 30 s")
                .expect("connected");
            if matches!(packet, Packet::UnsubAck(_)) {
                break;
            }
        }
        if visit.is_multiple_of(2) {
            client.leave().await;
        } else {
            // Half of them vanish without a DISCONNECT.
            client.kill().await;
        }
        visit += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_round_trip_stays_short_through_subscription_churn() {
    let serve = Serve::start();
    let port = serve.mqtt_port;
    let mut watcher = V4::connect(port, "churn-watcher").await;
    watcher.subscribe("axion/+/heartbeat/broker/#", 0).await;
    let renewals_before = counter(&recv(&mut watcher.rx, 20).await, "router_renewals");

    let mut healthy = V4::connect(port, "churn-healthy").await;
    healthy.subscribe("healthy/echo", 1).await;

    let stop = Arc::new(AtomicBool::new(false));
    let filters = Arc::new(AtomicU64::new(0));
    let churners: Vec<_> = (0..CHURNERS)
        .map(|w| tokio::spawn(churn(port, w, stop.clone(), filters.clone())))
        .collect();

    let started = Instant::now();
    let mut trips: Vec<Duration> = Vec::new();
    let mut n = 0u64;
    while started.elapsed() < CHURN {
        let body = n.to_be_bytes();
        let sent = Instant::now();
        healthy.publish("healthy/echo", &body, 1, false).await;
        let back = recv(&mut healthy.rx, 10).await;
        assert_eq!(back.payload, body, "the healthy client's own message");
        trips.push(sent.elapsed());

        n += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for c in churners {
        c.await.expect("churner");
    }

    // The churn must have made the broker renew its router, or the test
    // proved nothing.
    // The first record published after the churn counts every renewal it
    // made; the churn must have made some, or the test proved nothing.
    while watcher.rx.try_recv().is_ok() {}
    let renewals = counter(&recv(&mut watcher.rx, 20).await, "router_renewals") - renewals_before;
    trips.sort();
    let worst = *trips.last().expect("round trips");
    let p99 = trips[(trips.len() - 1) * 99 / 100];
    let slow = trips.iter().filter(|t| **t >= PROMISE).count();
    eprintln!(
        "{} round trips through {renewals} renewals ({} churned filters): p99 {p99:?}, worst {worst:?}",
        trips.len(),
        filters.load(Ordering::Relaxed)
    );
    assert!(
        renewals >= 2,
        "the churn made only {renewals} renewal(s) ({} filters)",
        filters.load(Ordering::Relaxed)
    );
    assert_eq!(
        slow,
        0,
        "{slow} of {} round trips took {PROMISE:?} or more (worst {worst:?}, p99 {p99:?}) through {renewals} renewals; log:\n{}",
        trips.len(),
        common::serve_log(&serve)
    );
}
