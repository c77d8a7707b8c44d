//! What a kept session is owed while it is away: queued on disk before the
//! publisher's PUBACK, bounded per session (what is dropped is counted),
//! never a reason for a publisher to wait, and not lost to `kill -9`.
//! Real processes: `axion serve` restarted on the same data directory,
//! rumqttc publishers and subscribers.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::mqtt::{burst, number, numbered, V4};
use common::Serve;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::time::timeout;

/// Connects a 3.1.1 client that keeps its session, subscribes `filter` at
/// QoS 1 and leaves (the broker has closed the connection on return).
async fn leave_kept(port: u16, id: &str, filter: &str) {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_clean_session(false);
    let mut c = V4::connect_with(opts).await.expect("connect");
    c.subscribe(filter, 1).await;
    c.leave().await;
}

/// Resumes `id`'s kept session: session_present, and every message that
/// arrives until nothing more comes for `quiet`.
async fn resume_and_drain(port: u16, id: &str, quiet: Duration) -> (bool, Vec<Vec<u8>>) {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_clean_session(false);
    let mut c = V4::connect_with(opts).await.expect("resume");
    let mut got = Vec::new();
    while let Ok(Some(m)) = timeout(quiet, c.rx.recv()).await {
        got.push(m.payload);
    }
    (c.session_present, got)
}

/// The broker's counters, off its retained heartbeat record, once `done`
/// holds for them (the record is refreshed every 2 s).
async fn broker_counters(
    port: u16,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut watcher = V4::connect(port, "offline-counters").await;
    watcher.subscribe("axion/+/heartbeat/broker/#", 0).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = common::mqtt::recv(&mut watcher.rx, 20).await;
        let record: serde_json::Value = serde_json::from_slice(&m.payload).unwrap_or_default();
        if done(&record["broker"]) {
            return record["broker"].clone();
        }
        assert!(
            Instant::now() < deadline,
            "the counters never got there: {}",
            record["broker"]
        );
    }
}

/// Past `--max-queued-messages`, an away session loses only what is
/// counted (on the broker's record, by client id), and the publisher's
/// burst takes no longer than the same burst to a topic nobody holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_away_session_over_its_bound_loses_only_what_is_counted_and_slows_nobody() {
    let serve = Serve::start_with(&["--max-queued-messages", "100"], &[]);
    let port = serve.mqtt_port;
    leave_kept(port, "bounded-away", "bound/#").await;

    let n = 3000;
    let alone = burst(port, "burst-free-1", "free/x", n).await;
    let beside = burst(port, "burst-bound", "bound/x", n).await;
    let alone_again = burst(port, "burst-free-2", "free/x", n).await;
    let baseline = alone.max(alone_again);
    let ratio = beside.as_secs_f64() / baseline.as_secs_f64();
    println!(
        "{n} × 1 KiB QoS 1: {:.0} ms beside a full away session, {:.0} ms without (ratio {ratio:.2})",
        beside.as_secs_f64() * 1e3,
        baseline.as_secs_f64() * 1e3
    );
    // Generous for a shared 2-core machine; a publisher held back by the
    // session (the old behaviour: 10 s) is far past it.
    assert!(
        beside <= baseline * 3 + Duration::from_millis(500),
        "the burst beside the away session took {beside:?}, {baseline:?} without"
    );

    let counters = broker_counters(port, |c| c["queued_dropped"].as_u64() == Some(n - 100)).await;
    assert_eq!(counters["queued_messages"], 100, "{counters}");
    assert_eq!(
        counters["queue_drops_by_client"]["bounded-away"],
        n - 100,
        "{counters}"
    );

    // `axion monitor` shows them on the broker's line, with the client.
    let wanted = format!("queue drops {} (bounded-away {})", n - 100, n - 100);
    common::wait_until(Duration::from_secs(10), &wanted, || {
        let out = std::process::Command::new(common::axion_bin())
            .args(["monitor", "--once", "--settle-ms", "300"])
            .args(["--mqtt", &serve.mqtt_url()])
            .output()
            .expect("run axion monitor");
        String::from_utf8_lossy(&out.stdout)
            .contains(&wanted)
            .then_some(())
    });

    let (present, got) = resume_and_drain(port, "bounded-away", Duration::from_millis(1000)).await;
    assert!(present);
    let numbers: Vec<u64> = got.iter().map(|p| number(p)).collect();
    assert_eq!(
        numbers,
        (0..100).collect::<Vec<_>>(),
        "the first 100, in order"
    );
}

/// A publisher sends numbered QoS 1 messages one at a time to an away
/// session's topic while the broker is killed (`kill -9`) and restarted,
/// twenty times: every message the broker acknowledged reaches the session
/// when it comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_message_is_lost_over_twenty_kill_9_cycles() {
    let mut serve = Serve::start();
    leave_kept(serve.mqtt_port, "cycled-away", "cycle/#").await;
    let acked = Acked::default();
    let mut next = 0u64;
    for cycle in 0..20 {
        let port = serve.mqtt_port;
        let (acked_now, start) = (acked.clone(), next);
        let publisher = tokio::spawn(async move {
            let mut opts = MqttOptions::new(format!("cycler-{cycle}"), "127.0.0.1", port);
            opts.set_inflight(1);
            let (client, mut events) = AsyncClient::new(opts, 10);
            let mut pending: HashMap<u16, u64> = HashMap::new();
            let mut i = start;
            client
                .publish("cycle/t", QoS::AtLeastOnce, false, numbered(i, 64))
                .await
                .expect("queue the first publish");
            // Until the broker is killed under it.
            while let Ok(Ok(event)) = timeout(Duration::from_secs(10), events.poll()).await {
                match event {
                    Event::Outgoing(Outgoing::Publish(pkid)) => {
                        pending.insert(pkid, i);
                    }
                    Event::Incoming(Packet::PubAck(ack)) => {
                        if let Some(n) = pending.remove(&ack.pkid) {
                            acked_now.push(n);
                        }
                        i += 1;
                        let _ =
                            client.try_publish("cycle/t", QoS::AtLeastOnce, false, numbered(i, 64));
                    }
                    _ => {}
                }
            }
            i + 1
        });
        // Killed at a different point of each cycle, mid-publish.
        let target = acked.len() + 5 + (cycle * 7) % 23;
        acked.kill_at(target, &mut serve, cycle).await;
        next = publisher.await.expect("publisher");
        serve.restart(&[], &[]);
    }
    let acked = acked.set();
    let (present, got) =
        resume_and_drain(serve.mqtt_port, "cycled-away", Duration::from_millis(1500)).await;
    assert!(present);
    let got: HashSet<u64> = got.iter().map(|p| number(p)).collect();
    assert_none_lost(&acked, &got);
}

/// The numbers of the messages the broker acknowledged, as a publisher
/// task hears of them.
#[derive(Clone, Default)]
struct Acked(Arc<(Mutex<Vec<u64>>, tokio::sync::Notify)>);

impl Acked {
    fn push(&self, n: u64) {
        self.0 .0.lock().unwrap().push(n);
        self.0 .1.notify_waiters();
    }

    fn len(&self) -> usize {
        self.0 .0.lock().unwrap().len()
    }

    fn set(&self) -> HashSet<u64> {
        self.0 .0.lock().unwrap().iter().copied().collect()
    }

    /// Waits until `target` messages are acknowledged, then kills the
    /// broker (`kill -9`): mid-publish, as the publisher goes on.
    async fn kill_at(&self, target: usize, serve: &mut Serve, cycle: usize) {
        let reached = async {
            loop {
                let more = self.0 .1.notified();
                tokio::pin!(more);
                more.as_mut().enable();
                if self.len() >= target {
                    return;
                }
                more.await;
            }
        };
        timeout(Duration::from_secs(20), reached)
            .await
            .unwrap_or_else(|_| panic!("cycle {cycle}: publishing stalled"));
        serve.proc.signal(9);
        serve.proc.wait_exit(Duration::from_secs(10));
    }
}

/// Every number in `acked` is in `got`.
fn assert_none_lost(acked: &HashSet<u64>, got: &HashSet<u64>) {
    let mut lost: Vec<u64> = acked.difference(got).copied().collect();
    lost.sort_unstable();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged messages lost: {lost:?}",
        lost.len(),
        acked.len()
    );
}

/// The same with the subscriber connected while the broker is killed:
/// what it had not acknowledged yet was journaled before the publisher's
/// PUBACK, and reaches it when it comes back (once at least).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connected_kept_subscriber_loses_nothing_to_kill_9() {
    let mut serve = Serve::start();
    let received: Arc<Mutex<HashSet<u64>>> = Arc::default();
    let acked = Acked::default();
    let mut next = 0u64;
    for cycle in 0..5 {
        let port = serve.mqtt_port;
        // The subscriber (re)connects, keeping its session, and takes a
        // millisecond per message, acknowledging each once it is done
        // with it: at the kill some are unread and some unacknowledged.
        let mut opts = MqttOptions::new("online-kept", "127.0.0.1", port);
        opts.set_clean_session(false);
        opts.set_manual_acks(true);
        let (client, mut events) = AsyncClient::new(opts, 1000);
        if cycle == 0 {
            client
                .subscribe("online/#", QoS::AtLeastOnce)
                .await
                .expect("subscribe");
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
        let mut subscribed_tx = Some(subscribed_tx);
        let first = cycle == 0;
        let events_task = tokio::spawn(async move {
            while let Ok(event) = events.poll().await {
                match event {
                    Event::Incoming(Packet::Publish(p)) => {
                        let _ = tx.send(p);
                    }
                    Event::Incoming(Packet::SubAck(_)) if first => {
                        if let Some(tx) = subscribed_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Event::Incoming(Packet::ConnAck(_)) if !first => {
                        if let Some(tx) = subscribed_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    _ => {}
                }
            }
        });
        timeout(Duration::from_secs(10), subscribed)
            .await
            .expect("subscriber ready")
            .expect("subscriber running");
        let got = received.clone();
        let reader = tokio::spawn(async move {
            while let Some(p) = rx.recv().await {
                tokio::time::sleep(Duration::from_millis(1)).await;
                got.lock().unwrap().insert(number(&p.payload));
                let _ = client.ack(&p).await;
            }
        });
        let (acked_now, start) = (acked.clone(), next);
        let publisher = tokio::spawn(async move {
            let mut opts = MqttOptions::new(format!("online-pub-{cycle}"), "127.0.0.1", port);
            opts.set_inflight(10);
            let (client, mut events) = AsyncClient::new(opts, 100);
            let mut order = std::collections::VecDeque::new();
            let mut pending: HashMap<u16, u64> = HashMap::new();
            let mut i = start;
            for _ in 0..10 {
                client
                    .publish("online/t", QoS::AtLeastOnce, false, numbered(i, 256))
                    .await
                    .expect("queue a publish");
                order.push_back(i);
                i += 1;
            }
            while let Ok(Ok(event)) = timeout(Duration::from_secs(10), events.poll()).await {
                match event {
                    Event::Outgoing(Outgoing::Publish(pkid)) => {
                        if let Some(n) = order.pop_front() {
                            pending.insert(pkid, n);
                        }
                    }
                    Event::Incoming(Packet::PubAck(ack)) => {
                        if let Some(n) = pending.remove(&ack.pkid) {
                            acked_now.push(n);
                        }
                        if client
                            .try_publish("online/t", QoS::AtLeastOnce, false, numbered(i, 256))
                            .is_ok()
                        {
                            order.push_back(i);
                            i += 1;
                        }
                    }
                    _ => {}
                }
            }
            i
        });
        let target = acked.len() + 200 + cycle * 37;
        acked.kill_at(target, &mut serve, cycle).await;
        next = publisher.await.expect("publisher") + 1;
        // The subscriber dies with the broker: what it had not finished is
        // gone from it.
        reader.abort();
        events_task.abort();
        serve.restart(&[], &[]);
    }
    let (present, got) =
        resume_and_drain(serve.mqtt_port, "online-kept", Duration::from_millis(1500)).await;
    assert!(present);
    let mut all = received.lock().unwrap().clone();
    all.extend(got.iter().map(|p| number(p)));
    assert_none_lost(&acked.set(), &all);
}

/// A long queue (20 000 × 1 KiB, more than the subscriber buffer allows at
/// once) is read from disk as the client takes it, and what is published
/// while it reads comes after it: the client gets all 21 000, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_queue_reaches_its_client_whole_and_in_order_with_live_traffic_behind_it() {
    let serve = Serve::start_with(&["--max-subscriber-buffer-bytes", "8388608"], &[]);
    let port = serve.mqtt_port;
    leave_kept(port, "long-away", "long/#").await;
    burst(port, "long-pub", "long/x", 20_000).await;

    let mut opts = MqttOptions::new("long-away", "127.0.0.1", port);
    opts.set_clean_session(false);
    let mut back = V4::connect_with(opts).await.expect("resume");
    assert!(back.session_present);
    let live = tokio::spawn(async move {
        let mut opts = MqttOptions::new("long-live", "127.0.0.1", port);
        opts.set_inflight(10);
        let (client, mut events) = AsyncClient::new(opts, 2000);
        for i in 20_000..21_000u64 {
            client
                .publish("long/x", QoS::AtLeastOnce, false, numbered(i, 1024))
                .await
                .expect("publish");
        }
        let mut acked = 0;
        while acked < 1000 {
            if let Ok(Ok(Event::Incoming(Packet::PubAck(_)))) =
                timeout(Duration::from_secs(30), events.poll()).await
            {
                acked += 1;
            }
        }
    });
    let mut expected = 0u64;
    while expected < 21_000 {
        let m = common::mqtt::recv(&mut back.rx, 20).await;
        let n = number(&m.payload);
        assert_eq!(n, expected, "in order, none lost");
        expected += 1;
    }
    live.await.expect("live publisher");
}
