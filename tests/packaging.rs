//! What `packaging/` ships, checked as far as this machine allows: the
//! example configuration starts `axion serve`, a configuration file's keys
//! take effect with flags and environment variables winning over them, a
//! wrong key is refused naming it, the systemd unit passes
//! `systemd-analyze verify`, and the container file copies what exists.
//! Real processes: `axion serve`, `systemd-analyze`.

mod common;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{axion_bin, free_port, listens_while_running, spawn_axion, Serve};

fn packaging(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("packaging")
        .join(file)
}

#[test]
fn the_example_configuration_starts_serve_and_a_clean_stop_exits_0() {
    // The listeners and the data directory from the command line win over
    // the file's (the tests' free ports and temp directory).
    let config = packaging("axion.toml");
    let mut serve = Serve::start_with(&["--config", config.to_str().unwrap()], &[]);
    serve.proc.signal(15);
    assert_eq!(serve.proc.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn a_configuration_files_keys_take_effect_and_the_environment_wins() {
    let dir = tempfile::tempdir().unwrap();
    let (from_file, from_env, ws) = (free_port(), free_port(), free_port());
    let config = dir.path().join("axion.toml");
    std::fs::write(
        &config,
        format!(
            "mqtt_listen = \"127.0.0.1:{from_file}\"\nws-listen = \"127.0.0.1:{ws}\"\ndata-dir = \"{}\"\nmqtt-unix = \"off\"\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(axion_bin());
    cmd.args(["serve", "--config"]).arg(&config);
    let mut serve = spawn_axion("axion serve (config)", &mut cmd);
    assert!(
        listens_while_running(&mut serve, from_file, Duration::from_secs(20)),
        "listening on the file's mqtt-listen"
    );
    assert!(
        dir.path().join("data").is_dir(),
        "the file's data-dir is used"
    );
    serve.signal(15);
    assert_eq!(serve.wait_exit(Duration::from_secs(10)), Some(0));

    let mut cmd = Command::new(axion_bin());
    cmd.args(["serve", "--config"])
        .arg(&config)
        .env("AXION_MQTT_LISTEN", format!("127.0.0.1:{from_env}"));
    let mut serve = spawn_axion("axion serve (config + env)", &mut cmd);
    assert!(
        listens_while_running(&mut serve, from_env, Duration::from_secs(20)),
        "AXION_MQTT_LISTEN wins over the file"
    );
    assert!(
        TcpStream::connect(("127.0.0.1", from_file)).is_err(),
        "nothing listens on the file's address once the environment overrides it"
    );
    serve.signal(15);
    assert_eq!(serve.wait_exit(Duration::from_secs(10)), Some(0));
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

#[test]
fn the_container_file_copies_what_exists_and_runs_the_example_configuration() {
    let file = std::fs::read_to_string(packaging("Containerfile")).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for line in file
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let source = line.split_whitespace().nth(1).unwrap();
        assert!(
            root.join(source).exists(),
            "{line}: {source} is not in the repository"
        );
    }
    assert!(file.contains("COPY packaging/axion.toml /etc/axion/axion.toml"));
    assert!(file.contains("\"--config\", \"/etc/axion/axion.toml\""));
    // The build stage builds the binary the run stage copies.
    assert!(file.contains("cargo build --release --locked --bin axion"));
    assert!(file.contains("COPY --from=build /src/target/release/axion /usr/local/bin/axion"));
    // Its ports are the example configuration's.
    let config = std::fs::read_to_string(packaging("axion.toml")).unwrap();
    for port in ["1883", "7000"] {
        assert!(
            config.contains(&format!(":{port}\"")),
            "axion.toml listens on {port}"
        );
        assert!(
            file.contains(&format!("0.0.0.0:{port}")),
            "the container listens on {port}"
        );
    }
}
