//! SIGHUP reloads the auth file of a running `axion serve` and never stops
//! it: a new user can log in, connected clients stay, a bad file changes
//! nothing, and a resumed session keeps only what its user may still
//! subscribe to. Real processes and real clients.

mod common;

use std::path::Path;
use std::time::Duration;

use common::mqtt::{recv, recv_none, V5};
use common::Serve;

const PASSWORD: &str = "reload-pw";

/// An auth file with the given users (all with the same password), each
/// with one role of the given rules.
fn write_auth(path: &Path, users: &[(&str, &[&str])], hash: &str) {
    let mut text = String::new();
    for (user, subscribe) in users {
        text.push_str(&format!(
            "[roles.{user}]\npublish = [\"t/#\"]\nsubscribe = {subscribe:?}\n\n[users.{user}]\n{hash}\nroles = [\"{user}\"]\n\n"
        ));
    }
    // Written whole, then renamed into place, as an operator's tooling
    // does: a reload never reads it half-written.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write the auth file");
    std::fs::rename(&tmp, path).expect("move the auth file into place");
}

fn opts(port: u16, id: &str, user: &str) -> rumqttc::v5::MqttOptions {
    let mut o = rumqttc::v5::MqttOptions::new(id, "127.0.0.1", port);
    o.set_credentials(user, PASSWORD);
    o
}

/// Connects, retrying while the reload may not have landed yet (the signal
/// is asynchronous); panics after a few seconds.
async fn connect_eventually(port: u16, id: &str, user: &str) -> V5 {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match V5::connect_with(opts(port, id, user)).await {
            Ok(c) => return c,
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{user} could not connect after the reload: {e:?}"),
        }
    }
}

#[tokio::test]
async fn sighup_adds_a_user_keeps_connections_and_refuses_a_bad_file() {
    let hash = common::auth::hash_line(PASSWORD);
    let dir = tempfile::tempdir().expect("tempdir");
    let auth = dir.path().join("auth.toml");
    write_auth(&auth, &[("alice", &["t/#"])], &hash);
    let serve = Serve::start_with(&["--auth-file", auth.to_str().expect("utf-8")], &[]);
    let port = serve.mqtt_port;

    let mut alice = V5::connect_with(opts(port, "alice-1", "alice"))
        .await
        .expect("alice connects");
    alice.subscribe("t/#", 1).await;
    assert!(
        V5::connect_with(opts(port, "bob-1", "bob")).await.is_err(),
        "bob is not in the file yet"
    );

    write_auth(&auth, &[("alice", &["t/#"]), ("bob", &["t/#"])], &hash);
    serve.proc.signal(1);
    let bob = connect_eventually(port, "bob-1", "bob").await;
    bob.publish("t/hello", b"from bob", 1, false).await;
    let got = recv(&mut alice.rx, 5).await;
    assert_eq!(
        got.payload, b"from bob",
        "alice's connection lived through the reload"
    );

    // A file that does not parse is refused; what was loaded stays.
    std::fs::write(&auth, "[users.bob\nthis is not toml").expect("write");
    serve.proc.signal(1);
    // Once the broker has said it refused the file, bob (from the file in
    // force) still logs in.
    let log = serve.data_dir.path().join("serve.log");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("auth file refused")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no refusal of the bad file in the log"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut probe = V5::connect_with(opts(port, "bob-2", "bob"))
        .await
        .expect("bob still logs in after a bad file");
    probe.subscribe("t/#", 1).await;
    bob.publish("t/again", b"still here", 1, false).await;
    assert_eq!(recv(&mut alice.rx, 5).await.payload, b"still here");
    assert_eq!(recv(&mut probe.rx, 5).await.payload, b"still here");
    let mut serve = serve;
    assert!(
        serve.proc.child.try_wait().expect("try_wait").is_none(),
        "axion serve must not stop on SIGHUP"
    );
}

#[tokio::test]
async fn a_resumed_session_loses_subscriptions_its_user_may_no_longer_hold() {
    let hash = common::auth::hash_line(PASSWORD);
    let dir = tempfile::tempdir().expect("tempdir");
    let auth = dir.path().join("auth.toml");
    write_auth(&auth, &[("carol", &["t/#"]), ("dave", &["t/#"])], &hash);
    let serve = Serve::start_with(&["--auth-file", auth.to_str().expect("utf-8")], &[]);
    let port = serve.mqtt_port;

    // carol keeps a session subscribed to t/secret/# and t/open/#.
    let mut o = opts(port, "carol-kept", "carol");
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(300));
    let mut carol = V5::connect_with(o.clone()).await.expect("carol");
    carol.subscribe("t/secret/#", 1).await;
    carol.subscribe("t/open/#", 1).await;
    carol.kill().await;

    // Her rights shrink while she is away; dave goes in the same change,
    // so the reload is in force once his login is refused.
    write_auth(&auth, &[("carol", &["t/open/#"])], &hash);
    serve.proc.signal(1);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while V5::connect_with(opts(port, "dave-probe", "dave"))
        .await
        .is_ok()
    {
        assert!(std::time::Instant::now() < deadline, "reload never landed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut carol = V5::connect_with(o).await.expect("carol resumes");
    assert!(carol.connack.session_present, "her session was kept");
    let writer = V5::connect_with(opts(port, "carol-writer", "carol"))
        .await
        .expect("writer");
    writer
        .publish("t/secret/x", b"no longer hers", 1, false)
        .await;
    writer.publish("t/open/x", b"still hers", 1, false).await;
    let got = recv(&mut carol.rx, 5).await;
    assert_eq!(got.topic, "t/open/x");
    recv_none(&mut carol.rx, 500).await;
}
