//! A subscriber that stops reading never holds publishers back: a clean
//! session gets a bounded buffer of its own and is disconnected (0x97) once
//! it is full; a kept session is moved to its queue on disk after a moment
//! and gets everything when it comes back. A subscriber that reads, however
//! much slower than the publisher, gets a whole burst. Real processes:
//! `axion serve`, raw sockets that never read, rumqttc, `mosquitto_sub`.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::mqtt::{burst, number, V4};
use common::raw::{raw_connect, raw_connect_flags, raw_subscribe, read_packet};
use common::Serve;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Connects, subscribes `filter` at QoS 1 and from then on reads nothing.
/// `kept`: a 3.1.1 persistent session; otherwise MQTT 5, clean.
async fn non_reader(port: u16, id: &str, filter: &str, kept: bool) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let level = if kept { 4 } else { 5 };
    let connect = if kept {
        raw_connect_flags(4, id, 60, 0x00)
    } else {
        raw_connect(5, id, 60)
    };
    s.write_all(&connect).await.expect("CONNECT");
    assert_eq!(read_packet(&mut s, 5_000).await.expect("CONNACK").0, 0x20);
    s.write_all(&raw_subscribe(level, filter, 1))
        .await
        .expect("SUBSCRIBE");
    assert_eq!(read_packet(&mut s, 5_000).await.expect("SUBACK").0, 0x90);
    s
}

/// The extra time a burst takes beside a subscriber that never reads,
/// against the same burst to a topic nobody holds, in one run.
async fn delay_beside(port: u16, topic: &str, n: u64) -> (Duration, Duration) {
    let alone = burst(port, "slow-alone-1", "nobody/x", n).await;
    let beside = burst(port, "slow-beside", topic, n).await;
    let again = burst(port, "slow-alone-2", "nobody/x", n).await;
    let baseline = alone.max(again);
    println!(
        "{n} × 1 KiB QoS 1 beside a subscriber that never reads: {:.0} ms, {:.0} ms without",
        beside.as_secs_f64() * 1e3,
        baseline.as_secs_f64() * 1e3
    );
    (beside, baseline)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_subscriber_that_never_reads_costs_publishers_nothing_and_is_cut_off_when_full() {
    let serve = Serve::start_with(&["--max-subscriber-buffer-bytes", "4194304"], &[]);
    let port = serve.mqtt_port;
    let mut stuck = non_reader(port, "never-reads", "stuck/#", false).await;

    // 3 000 KiB fits in its 4 MiB buffer: it is kept, and nobody waits.
    let (beside, baseline) = delay_beside(port, "stuck/x", 3000).await;
    // About 100 ms is the promise; the rest is slack for a shared
    // two-core machine running debug builds.
    assert!(
        beside <= baseline + Duration::from_millis(500),
        "{beside:?} beside it, {baseline:?} without"
    );

    // Past the buffer it is disconnected at once (0x97), and the
    // publisher still does not wait.
    let (beside, baseline) = delay_beside(port, "stuck/x", 3000).await;
    assert!(
        beside <= baseline + Duration::from_millis(500),
        "{beside:?} beside it, {baseline:?} without"
    );
    let mut last = None;
    let mut buf = vec![0u8; 1 << 16];
    // It reads what was buffered for it, then the DISCONNECT, then EOF.
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stuck.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => last = Some(buf[..n].to_vec()),
            Err(_) => panic!("the stuck subscriber was never disconnected"),
        }
    }
    let tail = last.expect("it got something");
    let disconnect: &[u8] = &[0xE0, 0x12, 0x97, 0x10, 0x1F, 0x00, 0x0D];
    let at = tail
        .windows(disconnect.len())
        .rposition(|w| w == disconnect)
        .unwrap_or_else(|| {
            panic!(
                "no DISCONNECT 0x97 at the end: {:02X?}",
                &tail[tail.len().saturating_sub(24)..]
            )
        });
    assert_eq!(
        &tail[at + disconnect.len()..],
        b"QuotaExceeded",
        "and nothing after it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_subscriber_that_never_reads_is_moved_to_its_queue_and_loses_nothing() {
    let serve = Serve::start();
    let port = serve.mqtt_port;
    let stuck = non_reader(port, "kept-never-reads", "kstuck/#", true).await;
    // What a burst costs once the session is away: each message goes to
    // its queue on disk before the publisher's PUBACK.
    let away = non_reader(port, "kept-away", "kaway/#", true).await;
    drop(away);
    let away_before = burst(port, "kept-away-pub", "kaway/x", 3000).await;
    let beside = burst(port, "kept-stuck-pub", "kstuck/x", 3000).await;
    // Measured on both sides of it: the rest of the suite shares the cores.
    let away_after = burst(port, "kept-away-pub-2", "kaway/y", 3000).await;
    let away_cost = away_before.max(away_after);
    println!(
        "3000 × 1 KiB QoS 1 beside a kept subscriber that never reads: {:.0} ms; to an away kept session: {:.0} ms",
        beside.as_secs_f64() * 1e3,
        away_cost.as_secs_f64() * 1e3
    );
    // About 100 ms before it is moved to its queue; slack for a shared
    // two-core machine running debug builds.
    assert!(
        beside <= away_cost + Duration::from_millis(400),
        "{beside:?} beside it, {away_cost:?} to an away session"
    );
    drop(stuck);

    let mut opts = rumqttc::MqttOptions::new("kept-never-reads", "127.0.0.1", port);
    opts.set_clean_session(false);
    let mut back = V4::connect_with(opts).await.expect("resume");
    assert!(back.session_present);
    let mut got = std::collections::BTreeSet::new();
    while got.len() < 3000 {
        let m = common::mqtt::recv(&mut back.rx, 10).await;
        got.insert(number(&m.payload));
    }
    assert_eq!(got.len(), 3000, "every message of the burst, once it reads");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_mosquitto_sub_gets_a_whole_20000_message_burst() {
    let serve = Serve::start();
    let port = serve.mqtt_port;
    let n: u64 = 20_000;
    // A retained message tells when mosquitto_sub has subscribed: it is
    // the first line it prints.
    let status = Command::new("mosquitto_pub")
        .args([
            "-p",
            &port.to_string(),
            "-t",
            "whole/ready",
            "-r",
            "-q",
            "1",
            "-m",
            "ready",
        ])
        .status()
        .expect("mosquitto_pub");
    assert!(status.success());
    let mut sub = Command::new("mosquitto_sub")
        .args(["-p", &port.to_string(), "-t", "whole/#", "-q", "1"])
        // One line per message: its topic (payloads are binary).
        .args(["-C", &(n + 1).to_string(), "-F", "%t"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto_sub (scripts/setup.sh installs it)");
    let stdout = sub.stdout.take().expect("stdout");
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let lines = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(stdout).lines();
        let first = lines.next();
        let _ = ready_tx.send(first.is_some());
        lines.map_while(Result::ok).count()
    });
    assert!(
        tokio::time::timeout(Duration::from_secs(10), ready)
            .await
            .expect("mosquitto_sub subscribed within 10 s")
            .expect("reader"),
        "mosquitto_sub printed the retained message"
    );
    burst(port, "whole-pub", "whole/x", n).await;
    let got = tokio::time::timeout(Duration::from_secs(60), lines)
        .await
        .expect("mosquitto_sub got the burst within 60 s")
        .expect("join");
    let status = sub.wait().expect("wait");
    assert!(status.success(), "mosquitto_sub: {status}");
    assert_eq!(got as u64, n, "one line per message of the burst");
}

/// A message past flow control's high-water mark (half a filter's log)
/// but within the maximum packet size reaches subscribers that keep up at
/// once, and its publisher is acknowledged at once; before, it waited
/// until every subscriber had been cut off as slow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_near_the_maximum_packet_size_reaches_subscribers_that_keep_up() {
    let serve = Serve::start();
    let port = serve.mqtt_port;
    let payload = "a".repeat(1_000_000);
    let publish = |topic: &str, message: &str, retain: bool| {
        let mut cmd = Command::new("mosquitto_pub");
        cmd.args(["-p", &port.to_string(), "-t", topic, "-q", "1", "-s"]);
        if retain {
            cmd.arg("-r");
        }
        let mut child = cmd.stdin(Stdio::piped()).spawn().expect("mosquitto_pub");
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(message.as_bytes())
            .expect("write");
        child
    };
    // The retained marker is in place before anyone subscribes, so each
    // subscriber gets it exactly once, and has subscribed once it has.
    let status = publish("large/ready", "ready", true).wait().expect("wait");
    assert!(status.success());
    let mut subs = Vec::new();
    for qos in ["0", "1"] {
        // Killed when the test ends, passed or not.
        let mut sub = tokio::process::Command::new("mosquitto_sub")
            .args(["-p", &port.to_string(), "-t", "large/#", "-q", qos])
            .args(["-C", "4", "-F", "%t %l"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("mosquitto_sub (scripts/setup.sh installs it)");
        let stdout = sub.stdout.take().expect("stdout");
        let (subscribed, first) = tokio::sync::oneshot::channel();
        let lines = tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt;
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            let mut got = Vec::new();
            let mut subscribed = Some(subscribed);
            while let Ok(Some(line)) = lines.next_line().await {
                got.push(line);
                if let Some(subscribed) = subscribed.take() {
                    let _ = subscribed.send(());
                }
            }
            got
        });
        tokio::time::timeout(Duration::from_secs(10), first)
            .await
            .expect("the retained marker within 10 s")
            .expect("mosquitto_sub printed the retained marker");
        subs.push((sub, lines));
    }
    let started = std::time::Instant::now();
    for i in 0..3 {
        let status = publish(&format!("large/{i}"), &payload, false)
            .wait()
            .expect("wait");
        assert!(status.success(), "mosquitto_pub large/{i}");
    }
    let took = started.elapsed();
    for (mut sub, lines) in subs {
        let lines = tokio::time::timeout(Duration::from_secs(20), lines)
            .await
            .expect("each subscriber got all three within 20 s")
            .expect("join");
        let _ = sub.wait().await;
        assert_eq!(
            lines,
            [
                "large/ready 5",
                "large/0 1000000",
                "large/1 1000000",
                "large/2 1000000"
            ]
        );
    }
    // Acknowledged without waiting out the slow-consumer timeout (10 s).
    assert!(
        took < Duration::from_secs(5),
        "three large publishes took {took:?}"
    );
}
