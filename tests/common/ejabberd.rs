//! ejabberd nodes on loopback, clustered: a real clustered MQTT broker
//! that is not Axion. Its MQTT (`mod_mqtt`) needs a login and offers no
//! shared subscriptions (CONNACK `SharedSubscriptionAvailable = 0`).
//!
//! Each node is `erl … -s ejabberd` run directly (not `ejabberdctl start`,
//! which switches to the `ejabberd` system user and its fixed
//! directories), with its config, log and Mnesia spool in a temp dir of its
//! own, a node name no other test takes, and a cookie the nodes of one
//! cluster share. Commands (`register`, `join_cluster`) go through
//! `ejabberd_ctl` on a hidden node, as `ejabberdctl` does. The MQTT port is
//! chosen in advance (ejabberd cannot report one it picked).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{listens_while_running, port_known_in_advance, unique_name, Proc};

/// Where Debian's ejabberd keeps its Erlang applications.
const ERL_LIBS: &str = "/usr/lib/x86_64-linux-gnu";
pub const USER: &str = "axion";
pub const PASSWORD: &str = "axion-test";
const HOST: &str = "localhost";

/// One running node.
pub struct Node {
    pub proc: Proc,
    pub name: String,
    pub port: u16,
    dir: PathBuf,
}

impl Node {
    /// `mqtt://user:password@127.0.0.1:<port>`.
    pub fn mqtt_url(&self) -> String {
        format!("mqtt://{USER}:{PASSWORD}@127.0.0.1:{}", self.port)
    }

    /// The node's own log, for a failure message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("ejabberd.log")).unwrap_or_default()
    }
}

/// Nodes clustered together, with [`USER`] registered.
pub struct Cluster {
    pub nodes: Vec<Node>,
    cookie: String,
    _dir: tempfile::TempDir,
}

/// Fails (never skips) when ejabberd is not installed.
fn require_ejabberd() {
    let found = Path::new(ERL_LIBS)
        .read_dir()
        .map(|mut d| {
            d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("ejabberd-")))
        })
        .unwrap_or(false);
    assert!(
        found && which("erl"),
        "ejabberd is not installed (no {ERL_LIBS}/ejabberd-* or no erl): run scripts/setup.sh"
    );
}

fn which(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Cluster {
    /// `n` nodes, the second and later joined to the first.
    pub fn start(n: usize) -> Self {
        require_ejabberd();
        let dir = tempfile::tempdir().expect("tempdir");
        let cookie = unique_name(&format!("axion-{}-", std::process::id()));
        let mut cluster = Cluster {
            nodes: Vec::new(),
            cookie,
            _dir: dir,
        };
        for i in 0..n {
            let node = cluster.start_node(i);
            if i > 0 {
                let first = cluster.nodes[0].name.clone();
                cluster.ctl(&node.name, &["join_cluster", &first]);
            }
            cluster.nodes.push(node);
        }
        let first = cluster.nodes[0].name.clone();
        cluster.ctl(&first, &["register", USER, HOST, PASSWORD]);
        cluster
    }

    fn start_node(&self, i: usize) -> Node {
        let dir = self._dir.path().join(format!("node{i}"));
        std::fs::create_dir_all(&dir).expect("node dir");
        let name = format!(
            "{}@localhost",
            unique_name(&format!("axion-ej{}-", std::process::id()))
        );
        for _ in 0..3 {
            let port = port_known_in_advance();
            std::fs::write(
                dir.join("ejabberd.yml"),
                format!(
                    "hosts: [\"{HOST}\"]\nloglevel: warning\nauth_method: internal\n\
                     listen:\n  -\n    port: {port}\n    ip: \"127.0.0.1\"\n    module: mod_mqtt\n\
                     modules:\n  mod_mqtt: {{}}\n"
                ),
            )
            .expect("write ejabberd.yml");
            let child = Command::new("erl")
                .args(["-sname", &name, "-setcookie", &self.cookie, "-noinput"])
                .args(["-mnesia", "dir"])
                .arg(format!("\"{}\"", dir.join("spool").display()))
                .args(["-s", "ejabberd"])
                .env("HOME", &dir)
                .env("ERL_LIBS", ERL_LIBS)
                .env("EJABBERD_CONFIG_PATH", dir.join("ejabberd.yml"))
                .env("EJABBERD_LOG_PATH", dir.join("ejabberd.log"))
                .current_dir(&dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn erl (scripts/setup.sh installs ejabberd)");
            let mut proc = Proc {
                child,
                name: format!("ejabberd {name}"),
            };
            if listens_while_running(&mut proc, port, Duration::from_secs(30)) {
                return Node {
                    proc,
                    name,
                    port,
                    dir,
                };
            }
        }
        panic!(
            "ejabberd node {name} did not listen, three times: {}",
            std::fs::read_to_string(dir.join("ejabberd.log")).unwrap_or_default()
        );
    }

    /// Runs an `ejabberdctl` command on `node`; panics with its output if
    /// it fails.
    fn ctl(&self, node: &str, args: &[&str]) {
        let out = Command::new("erl")
            .args([
                "-sname",
                &unique_name(&format!("axion-ctl{}-", std::process::id())),
                "-setcookie",
                &self.cookie,
            ])
            .args(["-hidden", "-noinput", "-s", "ejabberd_ctl", "-extra", node])
            .args(args)
            .env("HOME", self._dir.path())
            .env("ERL_LIBS", ERL_LIBS)
            .output()
            .expect("run ejabberd_ctl");
        assert!(
            out.status.success(),
            "ejabberdctl {args:?} on {node} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Every node's URL, in order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Node::mqtt_url).collect()
    }
}
