//! What `packaging/` ships, checked as far as this machine allows: the
//! example configuration starts `axion serve`, a configuration file's keys
//! take effect with flags and environment variables winning over them, a
//! wrong key is refused naming it, the systemd unit passes
//! `systemd-analyze verify`, and the container file's steps are carried
//! out without an engine (`containerfile.rs` says what stands for what):
//! its image refuses to start open to the network, and starts, takes a
//! login and stops on its stop signal with an auth file. And the ports
//! file a supervisor reads never shows a dead run's ports.
//! Real processes: `axion serve`, `systemd-analyze`, `cargo metadata`.

mod common;
#[path = "packaging/containerfile.rs"]
mod containerfile;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::auth::hash_line;
use common::mqtt::V4;
use common::{axion_bin, spawn_axion, wait_ports, Proc, Serve};

fn packaging(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("packaging")
        .join(file)
}

#[test]
fn the_example_configuration_starts_serve_and_a_clean_stop_exits_0() {
    // The listeners and the data directory from the command line win over
    // the file's (the tests' port 0 and temp directory).
    let config = packaging("axion.toml");
    let mut serve = Serve::start_with(&["--config", config.to_str().unwrap()], &[]);
    serve.proc.signal(15);
    assert_eq!(serve.proc.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn a_configuration_files_keys_take_effect_and_the_environment_wins() {
    // Port 0 everywhere, so which listen address won shows in its address:
    // the file's is on 127.0.0.2, the environment's on 127.0.0.3 (both
    // loopback). The ports file is named by the file too.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("axion.toml");
    let ports_file = dir.path().join("ports");
    std::fs::write(
        &config,
        format!(
            "mqtt_listen = \"127.0.0.2:0\"\nws-listen = \"127.0.0.1:0\"\ndata-dir = \"{}\"\nmqtt-unix = \"off\"\nports-file = \"{}\"\n",
            dir.path().join("data").display(),
            ports_file.display(),
        ),
    )
    .unwrap();
    let mut cmd = Command::new(axion_bin());
    cmd.args(["serve", "--config"]).arg(&config);
    let mut serve = serve_mqtt_on(
        cmd,
        &ports_file,
        "127.0.0.2",
        "listening on the file's mqtt-listen",
    );
    assert!(
        dir.path().join("data").is_dir(),
        "the file's data-dir is used"
    );
    serve.signal(15);
    assert_eq!(serve.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(!ports_file.exists(), "a clean stop removes the ports file");

    let mut cmd = Command::new(axion_bin());
    cmd.args(["serve", "--config"])
        .arg(&config)
        .env("AXION_MQTT_LISTEN", "127.0.0.3:0");
    let mut serve = serve_mqtt_on(
        cmd,
        &ports_file,
        "127.0.0.3",
        "AXION_MQTT_LISTEN wins over the file",
    );
    serve.signal(15);
    assert_eq!(serve.wait_exit(Duration::from_secs(10)), Some(0));
}

/// Starts `axion serve` by `cmd` and checks, from its ports file, that
/// its MQTT listener is bound on `ip` (`why` says whose setting that is)
/// and accepts a connection.
fn serve_mqtt_on(mut cmd: Command, ports_file: &Path, ip: &str, why: &str) -> Proc {
    let mut serve = spawn_axion("axion serve", &mut cmd);
    let ports = wait_ports(&mut serve, ports_file, None);
    let mqtt = ports
        .get(axion_wire::ports::MQTT)
        .expect("an mqtt listener");
    assert_eq!(mqtt.ip().to_string(), ip, "{why}");
    assert!(TcpStream::connect(mqtt).is_ok(), "{mqtt} accepts");
    serve
}

/// A ports file left by an earlier run (killed, so it could not remove
/// it) is gone as soon as the next run starts, even one that stops at once
/// on a bad setting: a supervisor waiting for the file never reads a dead
/// run's ports.
#[test]
fn a_ports_file_from_an_earlier_run_is_gone_even_when_start_up_fails() {
    let dir = tempfile::tempdir().unwrap();
    let ports_file = dir.path().join("ports");
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let runs: [&[&str]; 3] = [
        &[
            "serve",
            "--data-dir",
            data,
            "--max-filters",
            "300",
            "--max-filters-per-client",
            "300",
        ],
        &["bridge", "--auth-file", "/nonexistent/auth.toml"],
        &["work", "--queue", "not/one/level", "--", "true"],
    ];
    for args in runs {
        std::fs::write(&ports_file, "mqtt=127.0.0.1:1\n").unwrap();
        let out = Command::new(axion_bin())
            .args(args)
            .env("AXION_PORTS_FILE", &ports_file)
            .stdin(Stdio::null())
            .output()
            .expect("run axion");
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(
            !ports_file.exists(),
            "{args:?} left the earlier run's ports file: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_wrong_key_or_value_is_refused_with_exit_78_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    for (text, expect) in [
        ("mqtt_lisen = \"127.0.0.1:1\"\n", "unknown key `mqtt_lisen`"),
        (
            "max-packet-size = true\n",
            "`max-packet-size` is not a switch",
        ),
        (
            "allow-anonymous-remote = 1\n",
            "`allow-anonymous-remote` is a switch",
        ),
        ("mqtt-listen = \n", "not valid TOML"),
    ] {
        let config = dir.path().join("bad.toml");
        std::fs::write(&config, text).unwrap();
        let out = Command::new(axion_bin())
            .args(["serve", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .output()
            .expect("run axion");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{text:?}: {stderr}");
        assert!(stderr.contains(expect), "{text:?}: {stderr}");
    }
    // A value a flag would refuse is refused the same way (clap's usage
    // error), and a missing file says which.
    let config = dir.path().join("value.toml");
    std::fs::write(&config, "max-connections = \"many\"\n").unwrap();
    let out = Command::new(axion_bin())
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .expect("run axion");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("many"));
    let out = Command::new(axion_bin())
        .args(["serve", "--config", "/nonexistent/axion.toml"])
        .output()
        .expect("run axion");
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/axion.toml"));
}

#[test]
fn the_systemd_unit_verifies() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze is not on this machine; the unit is not verified");
        return;
    }
    // The unit runs /usr/local/bin/axion; here it points at this build.
    let unit = std::fs::read_to_string(packaging("axion.service")).unwrap();
    assert!(unit.contains("ExecReload=/bin/kill -HUP $MAINPID"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("axion.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/axion", axion_bin().to_str().unwrap()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze");
    assert!(
        out.status.success(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The Containerfile's steps, carried out with this build's `axion`
/// standing for the release build.
fn container() -> containerfile::Image {
    let file = std::fs::read_to_string(packaging("Containerfile")).unwrap();
    let context = Path::new(env!("CARGO_MANIFEST_DIR"));
    containerfile::carry_out(&file, context, &HashMap::from([("axion", axion_bin())]))
        .unwrap_or_else(|why| panic!("packaging/Containerfile: {why}"))
}

/// The settings of the configuration file the image's ENTRYPOINT names.
fn image_config(image: &containerfile::Stage) -> toml::Table {
    let entry = image.entrypoint.as_ref().expect("an ENTRYPOINT");
    let path = entry
        .windows(2)
        .find(|w| w[0] == "--config")
        .map(|w| w[1].clone())
        .expect("the ENTRYPOINT runs with --config");
    let text =
        std::fs::read_to_string(image.resolve(&path)).expect("the configuration is in the image");
    text.parse().expect("TOML")
}

/// The configuration's absolute paths restated as environment variables
/// (each key's `AXION_…`), so they land under the stand-in root: the
/// program reads them from the file, which is not rewritten.
fn config_paths(config: &toml::Table) -> Vec<(String, String)> {
    config
        .iter()
        .filter_map(|(key, value)| {
            let path = value.as_str().filter(|v| v.starts_with('/'))?;
            let env = format!("AXION_{}", key.to_ascii_uppercase().replace('-', "_"));
            Some((env, path.to_string()))
        })
        .collect()
}

fn envs(pairs: &[(String, String)]) -> Vec<(&str, &str)> {
    pairs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

#[test]
fn the_container_image_listens_off_loopback_on_its_configurations_ports_with_its_data_in_a_volume()
{
    let image = container();
    let image = image.image();
    let config = image_config(image);
    for (key, env) in [
        ("mqtt-listen", "AXION_MQTT_LISTEN"),
        ("ws-listen", "AXION_WS_LISTEN"),
    ] {
        let in_file = config[key].as_str().expect("a listen address");
        let in_image = image.env_var(env).unwrap_or_else(|| panic!("ENV {env}"));
        let (host, port) = in_image.rsplit_once(':').expect("host:port");
        assert_eq!(host, "0.0.0.0", "{env}: a container listens off loopback");
        assert_eq!(
            Some(port),
            in_file.rsplit_once(':').map(|(_, p)| p),
            "{env} keeps the port of the configuration's {key}"
        );
        assert!(
            image.exposed.contains(&port.parse().unwrap()),
            "EXPOSE {port}"
        );
    }
    let data_dir = config["data-dir"].as_str().expect("data-dir");
    assert!(
        image.volumes.iter().any(|v| v == data_dir),
        "the data directory {data_dir} is a VOLUME: {:?}",
        image.volumes
    );
    let user = image.user.as_deref().expect("a USER");
    assert_ne!(user, "root");
    assert_eq!(
        image.users.get(user).map(String::as_str),
        Some(data_dir),
        "the data directory is {user}'s home, created with it: {user} may write there"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_container_image_refuses_to_run_open_and_with_an_auth_file_serves_and_stops_cleanly() {
    let mut image = container();
    let config = image_config(image.image());
    let paths = config_paths(&config);

    // `docker run` with nothing more: the listeners are off loopback and
    // there is no auth file, so serve refuses before binding anything.
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut open = image
        .image()
        .command(&envs(&paths))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .expect("run the ENTRYPOINT");
    // Bounded: an image that did start would serve until stopped.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = open.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = open.kill();
            let _ = open.wait();
            panic!("the image started without an auth file, open to the network");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = std::fs::read_to_string(log.path()).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("refusing to listen on 0.0.0.0:") && stderr.contains("--auth-file"),
        "{stderr}"
    );

    // With an auth file mounted and named (`-v …:/etc/axion/auth.toml -e
    // AXION_AUTH_FILE=…`), still on 0.0.0.0 but on ports the kernel picks
    // (tests run side by side), read back from the ports file in the
    // volume.
    let secrets = tempfile::tempdir().unwrap();
    let auth = secrets.path().join("auth.toml");
    std::fs::write(
        &auth,
        format!(
            "[roles.all]\npublish = [\"t/#\"]\nsubscribe = [\"t/#\"]\n[users.operator]\n{}\nroles = [\"all\"]\n",
            hash_line("container secret")
        ),
    )
    .unwrap();
    image.image_mut().mount("/etc/axion/auth.toml", &auth);
    let image = image.image();
    let signal = image.stop_signal.expect("a STOPSIGNAL");
    let data_dir = config["data-dir"].as_str().unwrap();
    let ports_file = format!("{data_dir}/axion.ports");
    let mut env = paths.clone();
    env.extend([
        ("AXION_AUTH_FILE".into(), "/etc/axion/auth.toml".into()),
        ("AXION_MQTT_LISTEN".into(), "0.0.0.0:0".into()),
        ("AXION_WS_LISTEN".into(), "0.0.0.0:0".into()),
        ("AXION_PORTS_FILE".into(), ports_file.clone()),
    ]);
    let mut serve = spawn_axion("the image's ENTRYPOINT", &mut image.command(&envs(&env)));
    let ports = wait_ports(&mut serve, &image.resolve(&ports_file), None);
    let [mqtt, ws] = [axion_wire::ports::MQTT, axion_wire::ports::WS].map(|name| {
        let addr = ports.get(name).expect("both listeners reported");
        assert!(addr.ip().is_unspecified(), "{name}: {addr} is off loopback");
        addr.port()
    });

    let login = |password: Option<&str>| {
        let mut opts = rumqttc::MqttOptions::new("container-client", "127.0.0.1", mqtt);
        opts.set_keep_alive(Duration::from_secs(30));
        if let Some(password) = password {
            opts.set_credentials("operator", password);
        }
        V4::connect_with(opts)
    };
    assert!(login(None).await.is_err(), "auth is on: no login, no entry");
    let mut client = login(Some("container secret"))
        .await
        .expect("the operator logs in");
    client.subscribe("t/#", 1).await;
    client.publish("t/x", b"through the image", 1, false).await;
    let m = common::mqtt::recv(&mut client.rx, 5).await;
    assert_eq!(m.payload, b"through the image");

    let mut http = TcpStream::connect(("127.0.0.1", ws)).unwrap();
    http.write_all(b"GET /health/live HTTP/1.1\r\nHost: axion\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    http.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    let data_dir = image.resolve(config["data-dir"].as_str().unwrap());
    assert!(
        data_dir.join("broker.redb").is_file(),
        "the broker's state is in the image's data directory ({})",
        data_dir.display()
    );
    serve.signal(signal);
    assert_eq!(
        serve.wait_exit(Duration::from_secs(10)),
        Some(0),
        "STOPSIGNAL {signal} stops serve cleanly"
    );
}

/// The check knows each step of the file and nothing else: a step added
/// to the file fails it until the check carries that step out too.
#[test]
fn a_step_the_container_check_does_not_know_fails_it() {
    let file = std::fs::read_to_string(packaging("Containerfile")).unwrap();
    let context = Path::new(env!("CARGO_MANIFEST_DIR"));
    let binaries = HashMap::from([("axion", axion_bin())]);
    assert!(containerfile::carry_out(&file, context, &binaries).is_ok());
    for step in [
        "LABEL org.opencontainers.image.title=axion",
        "ADD https://example.com/x /x",
        "CMD [\"--help\"]",
        "RUN apt-get install -y curl",
        "RUN useradd --system other && curl -o /x https://example.com/x",
        "RUN useradd --uid 7 other",
        "COPY --chown=axion packaging/axion.toml /etc/axion/other.toml",
        "COPY --from=build /src/target/release/other /usr/local/bin/other",
        "COPY packaging/missing.toml /etc/axion/missing.toml",
        "USER nobody",
        "ENTRYPOINT /usr/local/bin/axion serve",
        "ENV AXION_PACKAGE \"default\"",
    ] {
        let text = format!("{file}\n{step}\n");
        match containerfile::carry_out(&text, context, &binaries) {
            Ok(_) => panic!("{step:?} went unchecked"),
            Err(why) => assert!(why.contains(step), "{step:?}: {why}"),
        }
    }
    // In the build stage too, before its product exists.
    let text = file.replacen(
        "RUN cargo build",
        "RUN cargo build --features x --release --locked --bin axion\nRUN cargo build",
        1,
    );
    assert!(containerfile::carry_out(&text, context, &binaries).is_err());
}

/// `AXION_ALLOCATOR=system` runs the broker on the system's allocator (the
/// start-up line says which), and it serves as with the default; a value
/// that names no allocator is refused before anything starts.
#[test]
fn the_allocator_is_chosen_by_environment_and_a_bad_choice_is_refused() {
    let data = tempfile::tempdir().expect("tempdir");
    let started = |allocator: Option<&str>| {
        let mut cmd = Command::new(common::axion_bin());
        cmd.args([
            "serve",
            "--mqtt-listen",
            "127.0.0.1:0",
            "--ws-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(data.path())
        .args(["--mqtt-unix", "off"])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env_remove("AXION_ALLOCATOR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        if let Some(a) = allocator {
            cmd.env("AXION_ALLOCATOR", a);
        }
        let mut child = cmd.spawn().expect("spawn axion serve");
        let mut stderr = std::io::BufReader::new(child.stderr.take().expect("stderr"));
        let mut up = String::new();
        let mut line = String::new();
        while std::io::BufRead::read_line(&mut stderr, &mut line).expect("read stderr") > 0 {
            if line.contains("axion serve is up") {
                up = line.clone();
                break;
            }
            line.clear();
        }
        let _ = child.kill();
        let _ = child.wait();
        up
    };
    assert!(started(None).contains("allocator=\"mimalloc\""), "default");
    assert!(started(Some("system")).contains("allocator=\"system\""));

    let serve = Serve::start_with(&[], &[("AXION_ALLOCATOR", "system")]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut client = V4::connect(serve.mqtt_port, "alloc-system").await;
        client.subscribe("alloc/t", 1).await;
        client.publish("alloc/t", b"on glibc", 1, false).await;
        assert_eq!(
            common::mqtt::recv(&mut client.rx, 5).await.payload,
            b"on glibc"
        );
    });

    let out = Command::new(common::axion_bin())
        .args(["serve", "--mqtt-listen", "127.0.0.1:0"])
        .env("AXION_ALLOCATOR", "jemalloc")
        .output()
        .expect("run axion serve");
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("AXION_ALLOCATOR=\"jemalloc\" names no allocator"),
        "{err}"
    );
}
