//! One client cannot use up the router's filters for everyone: each holds at
//! most `--max-filters-per-client` distinct filters, the rest of a SUBSCRIBE
//! is still granted, and refusals are counted and logged once per episode.

mod common;

use std::time::Duration;

use common::mqtt::{recv, V5};
use common::Serve;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, SubscribeReasonCode};
use tokio::sync::mpsc;
use tokio::time::timeout;

const QUOTA_EXCEEDED: u8 = 0x97;
const FAILURE: u8 = 0x80;

/// A SUBACK's codes as bytes on the wire.
fn codes5(codes: &[SubscribeReasonCode]) -> Vec<u8> {
    codes
        .iter()
        .map(|c| match c {
            SubscribeReasonCode::Success(q) => *q as u8,
            SubscribeReasonCode::QuotaExceeded => QUOTA_EXCEEDED,
            SubscribeReasonCode::NotAuthorized => 0x87,
            other => panic!("unexpected reason code {other:?}"),
        })
        .collect()
}

/// Subscribes `filters` at QoS 1 in one SUBSCRIBE; the SUBACK's codes.
async fn subscribe5(c: &mut V5, filters: &[String]) -> Vec<u8> {
    let filters: Vec<Filter> = filters
        .iter()
        .map(|f| Filter::new(f, rumqttc::v5::mqttbytes::QoS::AtLeastOnce))
        .collect();
    c.client.subscribe_many(filters).await.expect("subscribe");
    loop {
        let packet = timeout(Duration::from_secs(10), c.packets.recv())
            .await
            .expect("SUBACK within 10 s")
            .expect("client running");
        if let Packet::SubAck(ack) = packet {
            return codes5(&ack.return_codes);
        }
    }
}

/// An MQTT 3.1.1 client that hands back SUBACK codes and messages.
struct Client3 {
    client: rumqttc::AsyncClient,
    session_present: bool,
    subacks: mpsc::UnboundedReceiver<Vec<u8>>,
    rx: mpsc::UnboundedReceiver<rumqttc::Publish>,
    task: tokio::task::JoinHandle<()>,
}

impl Client3 {
    async fn connect(port: u16, id: &str, clean: bool) -> Client3 {
        let mut opts = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_clean_session(clean);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 1000);
        let session_present = loop {
            let event = timeout(Duration::from_secs(10), eventloop.poll())
                .await
                .expect("CONNACK within 10 s")
                .expect("connect");
            if let rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack)) = event {
                break ack.session_present;
            }
        };
        let (sub_tx, subacks) = mpsc::unbounded_channel();
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok(event) = eventloop.poll().await {
                match event {
                    rumqttc::Event::Incoming(rumqttc::Packet::SubAck(ack)) => {
                        let codes = ack
                            .return_codes
                            .iter()
                            .map(|c| match c {
                                rumqttc::SubscribeReasonCode::Success(q) => *q as u8,
                                rumqttc::SubscribeReasonCode::Failure => FAILURE,
                            })
                            .collect();
                        let _ = sub_tx.send(codes);
                    }
                    rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => {
                        let _ = tx.send(p);
                    }
                    _ => {}
                }
            }
        });
        Client3 {
            client,
            session_present,
            subacks,
            rx,
            task,
        }
    }

    /// Subscribes `filters` at QoS 1 in one SUBSCRIBE; the SUBACK's codes.
    async fn subscribe(&mut self, filters: &[String]) -> Vec<u8> {
        let filters = filters
            .iter()
            .map(|f| rumqttc::SubscribeFilter::new(f.clone(), rumqttc::QoS::AtLeastOnce));
        self.client
            .subscribe_many(filters)
            .await
            .expect("subscribe");
        timeout(Duration::from_secs(10), self.subacks.recv())
            .await
            .expect("SUBACK within 10 s")
            .expect("client running")
    }

    /// Drops the connection without DISCONNECT; returns once it is closed.
    async fn kill(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

fn names(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}/{i}")).collect()
}

fn granted(codes: &[u8]) -> usize {
    codes.iter().filter(|c| **c <= 2).count()
}

/// Reads the broker's counters off its heartbeat record until `done` holds.
async fn wait_counter(watcher: &mut V5, name: &str, done: impl Fn(u64) -> bool) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let record = recv(&mut watcher.rx, 20).await;
        let record: serde_json::Value = serde_json::from_slice(&record.payload).unwrap_or_default();
        let value = record["broker"][name].as_u64().unwrap_or(0);
        if done(value) {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} never reached the expected value (last {value})"
        );
    }
}

async fn counter_watcher(port: u16, id: &str) -> V5 {
    let mut watcher = V5::connect(port, id).await;
    watcher.subscribe("axion/+/heartbeat/broker/#", 0).await;
    watcher
}

/// The `refused=` counts of the warnings `message` in `serve`'s log (that
/// name `client`, if given); waits until they add up to `total` (an
/// episode's line is written a few seconds after its first refusal).
async fn logged_refusals(
    serve: &Serve,
    message: &str,
    client: Option<&str>,
    total: u64,
) -> Vec<u64> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let log = common::serve_log(serve);
        let counts: Vec<u64> = log
            .lines()
            .filter(|l| l.contains(message))
            .filter(|l| client.is_none_or(|c| l.contains(&format!("client_id=\"{c}\""))))
            .map(|l| {
                let n = l.split("refused=").nth(1).expect("a refused= field");
                n.split(|c: char| !c.is_ascii_digit())
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect();
        if counts.iter().sum::<u64>() >= total {
            return counts;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "log lines for {client:?} add up to {counts:?}, not {total}; log:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The log is only read when the tests' log goes to the file (not to the
/// terminal with `AXION_TEST_LOG`).
fn log_in_file() -> bool {
    std::env::var_os("AXION_TEST_LOG").is_none()
}

const PER_CLIENT: &str = "per-client filter bound reached";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gets_at_most_its_bound_of_filters() {
    let serve = Serve::start_with(&["--max-filters-per-client", "50"], &[]);
    let port = serve.mqtt_port;
    let mut watcher = counter_watcher(port, "fb-watcher").await;

    // 60 filters in one SUBSCRIBE, a `$share` one in every ten: they count
    // too, so the first 50 are granted and the last 10 refused.
    let mut one = V5::connect(port, "fb-one").await;
    let filters: Vec<String> = (0..60)
        .map(|i| match i % 10 {
            0 => format!("$share/g/fb/one/{i}"),
            _ => format!("fb/one/{i}"),
        })
        .collect();
    let codes = subscribe5(&mut one, &filters).await;
    assert_eq!(codes[..50], [1; 50], "the first 50 are granted");
    assert_eq!(
        codes[50..],
        [QUOTA_EXCEEDED; 10],
        "the rest: quota exceeded"
    );

    // 60 across four SUBSCRIBEs: the fourth gets 5 granted and 10 refused.
    let mut many = V5::connect(port, "fb-many").await;
    for batch in 0..3 {
        let codes = subscribe5(&mut many, &names("fb/many", batch * 15..batch * 15 + 15)).await;
        assert_eq!(codes, [1; 15]);
    }
    let codes = subscribe5(&mut many, &names("fb/many", 45..60)).await;
    assert_eq!(codes[..5], [1; 5]);
    assert_eq!(codes[5..], [QUOTA_EXCEEDED; 10]);
    // At the bound, a filter it holds is subscribed again; a new one is not.
    let codes = subscribe5(&mut many, &["fb/many/0".into(), "fb/many/new".into()]).await;
    assert_eq!(codes, [1, QUOTA_EXCEEDED]);
    // What it was granted works.
    let publisher = V5::connect(port, "fb-pub").await;
    publisher.publish("fb/many/7", b"granted", 1, false).await;
    assert_eq!(recv(&mut many.rx, 5).await.payload, b"granted");

    // Ten UNSUBSCRIBEs free ten slots: ten new filters are granted, an
    // eleventh is not.
    for f in names("fb/many", 0..10) {
        many.client.unsubscribe(f).await.expect("unsubscribe");
    }
    let codes = subscribe5(&mut many, &names("fb/many/again", 0..11)).await;
    assert_eq!(codes[..10], [1; 10]);
    assert_eq!(codes[10], QUOTA_EXCEEDED);

    // MQTT 3.1.1 has one failure code; a kept session's filters still
    // count when it resumes.
    let mut old = Client3::connect(port, "fb-311", false).await;
    let codes = old.subscribe(&names("fb/311", 0..60)).await;
    assert_eq!(codes[..50], [1; 50]);
    assert_eq!(codes[50..], [FAILURE; 10]);
    old.kill().await;
    let mut old = Client3::connect(port, "fb-311", false).await;
    assert!(old.session_present);
    assert_eq!(old.subscribe(&["fb/311/new".into()]).await, [FAILURE]);
    old.client
        .unsubscribe("fb/311/0")
        .await
        .expect("unsubscribe");
    assert_eq!(old.subscribe(&["fb/311/new".into()]).await, [1]);
    publisher.publish("fb/311/49", b"resumed", 1, false).await;
    let m = timeout(Duration::from_secs(5), old.rx.recv())
        .await
        .expect("a message within 5 s")
        .expect("client running");
    assert_eq!(&m.payload[..], b"resumed");

    // Axion's own components are not held to it: the bridge subscribes
    // for all its WebSocket clients in one session.
    let mut component = V5::connect(port, "axion-fb-component").await;
    assert_eq!(
        subscribe5(&mut component, &names("fb/component", 0..60)).await,
        [1; 60]
    );

    // 10 + 10 + 1 + 1 + 10 + 1 refused, counted where an operator looks.
    wait_counter(&mut watcher, "filters_refused_per_client", |n| n == 33).await;

    // One warning per episode with its count, not one per filter.
    if log_in_file() {
        assert_eq!(
            logged_refusals(&serve, PER_CLIENT, Some("fb-one"), 10).await,
            [10]
        );
        let many = logged_refusals(&serve, PER_CLIENT, Some("fb-many"), 12).await;
        assert_eq!(many.iter().sum::<u64>(), 12, "{many:?}");
        assert!(
            many.len() <= 3,
            "a line per episode, not per filter: {many:?}"
        );
        let old = logged_refusals(&serve, PER_CLIENT, Some("fb-311"), 11).await;
        assert_eq!(old, [10, 1], "one line per connection's episode");
    }
}

/// An away kept session is owed a message while a greedy client
/// subscribes every throwaway filter it can and leaves: the router is
/// renewed all the same, everyone else still gets new filters, and the
/// away session still gets its message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_greedy_client_cannot_stop_everyone_subscribing() {
    let serve = Serve::start_with(
        &["--max-filters", "300", "--max-filters-per-client", "100"],
        &[],
    );
    let port = serve.mqtt_port;
    let mut watcher = counter_watcher(port, "fb-watcher").await;

    let mut owed = Client3::connect(port, "fb-owed", false).await;
    assert_eq!(owed.subscribe(&["owed/#".into()]).await, [1]);
    owed.kill().await;
    let publisher = V5::connect(port, "fb-pub").await;
    publisher.publish("owed/x", b"owed", 1, false).await;

    let mut greedy = V5::connect(port, "fb-greedy").await;
    let mut got = 0;
    for batch in 0..6 {
        got += granted(&subscribe5(&mut greedy, &names("junk", batch * 50..batch * 50 + 50)).await);
    }
    assert_eq!(got, 100, "the greedy client gets its bound");
    greedy.kill().await;
    // The router's dead filters call for a renewal, and the away session
    // owed a message does not put it off: what it is owed waits in its
    // queue, not in the router.
    wait_counter(&mut watcher, "router_renewals", |n| n >= 1).await;

    for name in ["fb-late-1", "fb-late-2"] {
        let mut late = V5::connect(port, name).await;
        let codes = subscribe5(&mut late, &names(&format!("fresh/{name}"), 0..50)).await;
        assert_eq!(codes, [1; 50], "{name}: every fresh filter granted");
        publisher
            .publish(&format!("fresh/{name}/49"), b"hello", 1, false)
            .await;
        assert_eq!(recv(&mut late.rx, 5).await.payload, b"hello");
    }

    let mut owed = Client3::connect(port, "fb-owed", false).await;
    assert!(owed.session_present);
    let m = timeout(Duration::from_secs(5), owed.rx.recv())
        .await
        .expect("the owed message within 5 s")
        .expect("client running");
    assert_eq!((m.topic.as_str(), &m.payload[..]), ("owed/x", &b"owed"[..]));
}

/// The router's own bound refuses everyone alike: one warning for the
/// episode, with the number refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_bound_is_logged_once_per_episode() {
    let serve = Serve::start_with(
        &["--max-filters", "60", "--max-filters-per-client", "50"],
        &[],
    );
    let port = serve.mqtt_port;
    // The broker's record shows `serve`'s own components are up: their
    // filters are in before the test's use up the rest.
    let mut watcher = counter_watcher(port, "fb-watcher").await;
    wait_counter(&mut watcher, "sessions", |n| n > 0).await;
    let mut refused = 0;
    let mut clients = Vec::new();
    for name in ["fb-full-1", "fb-full-2"] {
        let mut c = V5::connect(port, name).await;
        let codes = subscribe5(&mut c, &names(&format!("full/{name}"), 0..50)).await;
        refused += codes.iter().filter(|c| **c == QUOTA_EXCEEDED).count() as u64;
        clients.push(c);
    }
    assert!(refused > 1, "the router's bound was reached ({refused})");
    if log_in_file() {
        // Axion's own components may have been refused some too.
        let lines = logged_refusals(&serve, "filter limit reached", None, refused).await;
        assert!(
            lines.len() == 1 && lines[0] >= refused,
            "one line for the episode with its {refused} refusals: {lines:?}"
        );
    }
}

/// A per-client bound not below the router's would let one client take
/// every filter again: `axion serve` does not start with one.
#[test]
fn a_per_client_bound_not_below_the_routers_stops_start_up() {
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)]);
    let cases: [Case; 2] = [
        (
            &["--max-filters", "300", "--max-filters-per-client", "300"],
            &[],
        ),
        (
            &["--max-filters", "300"],
            &[("AXION_MAX_FILTERS_PER_CLIENT", "1000")],
        ),
    ];
    for (args, envs) in cases {
        let data = tempfile::tempdir().expect("tempdir");
        let child = std::process::Command::new(common::axion_bin())
            .arg("serve")
            .args(["--mqtt-listen", "127.0.0.1:0", "--ws-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(data.path())
            .args(args)
            .envs(envs.iter().copied())
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn axion serve");
        let mut proc = common::Proc {
            child,
            name: "axion serve".into(),
        };
        let code = proc.wait_exit(Duration::from_secs(20));
        let mut stderr = String::new();
        std::io::Read::read_to_string(proc.child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        assert!(
            code.is_some_and(|c| c != 0),
            "{args:?} {envs:?}: exit {code:?}"
        );
        assert!(
            stderr.contains("--max-filters-per-client") && stderr.contains("--max-filters ("),
            "{args:?} {envs:?}: the error names both flags: {stderr}"
        );
    }
}
