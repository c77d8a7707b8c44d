//! ejabberd nodes on loopback, clustered: a real clustered MQTT broker
//! that is not Axion. Its MQTT (`mod_mqtt`) needs a login and offers no
//! shared subscriptions (CONNACK `SharedSubscriptionAvailable = 0`). The
//! cluster tests (`tests/cluster.rs`) and `axion-bench --cluster` start
//! their nodes here.
//!
//! Each node is `erl … -s ejabberd` run directly (not `ejabberdctl start`,
//! which switches to the `ejabberd` system user and its fixed
//! directories), with its config, log and Mnesia spool in a temp dir of its
//! own, a node name no other user of this module takes, and a cookie the
//! nodes of one cluster share. Commands (`register`, `join_cluster`) go
//! through `ejabberd_ctl` on a hidden node, as `ejabberdctl` does. The MQTT
//! port is chosen in advance (ejabberd cannot report one it picked).

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Where Debian's ejabberd keeps its Erlang applications.
const ERL_LIBS: &str = "/usr/lib/x86_64-linux-gnu";
pub const USER: &str = "axion";
pub const PASSWORD: &str = "axion-test";
const HOST: &str = "localhost";
/// How long a node may take to listen: a 2-core machine busy with others.
const START_WAIT: Duration = Duration::from_secs(30);

/// One running node, killed (SIGKILL) on drop.
pub struct Node {
    pub child: Child,
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

    /// The node's process (the Erlang VM: `erl` execs it), for its CPU.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by number (9 = SIGKILL, 15 = SIGTERM).
    pub fn signal(&self, sig: i32) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .context("run kill")?;
        if !status.success() {
            bail!("kill -{sig} of ejabberd node {} failed", self.name);
        }
        Ok(())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Nodes clustered together, with [`USER`] registered.
pub struct Cluster {
    pub nodes: Vec<Node>,
    cookie: String,
    dir: tempfile::TempDir,
}

/// A name no other call in this process gets (node names, cookies).
fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A port nobody listens on right now (ejabberd cannot report one it
/// picked); another process can take it before the node binds it, so a
/// node that does not come up is started again on another.
fn port_known_in_advance() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// An error (never a skip) when ejabberd is not installed.
fn require_ejabberd() -> anyhow::Result<()> {
    let found = Path::new(ERL_LIBS)
        .read_dir()
        .map(|mut d| {
            d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("ejabberd-")))
        })
        .unwrap_or(false);
    let erl = Command::new("sh")
        .args(["-c", "command -v erl"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !(found && erl) {
        bail!(
            "ejabberd is not installed (no {ERL_LIBS}/ejabberd-* or no erl): run scripts/setup.sh"
        );
    }
    Ok(())
}

/// True once `port` accepts TCP; false if `child` exits first or nothing
/// listens within [`START_WAIT`].
fn listens_while_running(child: &mut Child, port: u16) -> bool {
    let deadline = Instant::now() + START_WAIT;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        if !matches!(child.try_wait(), Ok(None)) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

impl Cluster {
    /// `n` nodes, the second and later joined to the first.
    pub fn start(n: usize) -> anyhow::Result<Self> {
        require_ejabberd()?;
        let mut cluster = Cluster {
            nodes: Vec::new(),
            cookie: unique_name("axion-"),
            dir: tempfile::tempdir()?,
        };
        for i in 0..n {
            let node = cluster.start_node(i)?;
            if i > 0 {
                let first = cluster.nodes[0].name.clone();
                cluster.ctl(&node.name, &["join_cluster", &first])?;
            }
            cluster.nodes.push(node);
        }
        let first = cluster.nodes[0].name.clone();
        cluster.ctl(&first, &["register", USER, HOST, PASSWORD])?;
        Ok(cluster)
    }

    fn start_node(&self, i: usize) -> anyhow::Result<Node> {
        let dir = self.dir.path().join(format!("node{i}"));
        std::fs::create_dir_all(&dir)?;
        let name = format!("{}@localhost", unique_name("axion-ej"));
        for _ in 0..3 {
            let port = port_known_in_advance()?;
            std::fs::write(
                dir.join("ejabberd.yml"),
                format!(
                    "hosts: [\"{HOST}\"]\nloglevel: warning\nauth_method: internal\n\
                     listen:\n  -\n    port: {port}\n    ip: \"127.0.0.1\"\n    module: mod_mqtt\n\
                     modules:\n  mod_mqtt: {{}}\n"
                ),
            )?;
            let mut child = Command::new("erl")
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
                .context("spawn erl (scripts/setup.sh installs ejabberd)")?;
            if listens_while_running(&mut child, port) {
                return Ok(Node {
                    child,
                    name,
                    port,
                    dir,
                });
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        bail!(
            "ejabberd node {name} did not listen, three times: {}",
            std::fs::read_to_string(dir.join("ejabberd.log")).unwrap_or_default()
        )
    }

    /// Runs an `ejabberdctl` command on `node`.
    fn ctl(&self, node: &str, args: &[&str]) -> anyhow::Result<()> {
        let out = Command::new("erl")
            .args([
                "-sname",
                &unique_name("axion-ctl"),
                "-setcookie",
                &self.cookie,
            ])
            .args(["-hidden", "-noinput", "-s", "ejabberd_ctl", "-extra", node])
            .args(args)
            .env("HOME", self.dir.path())
            .env("ERL_LIBS", ERL_LIBS)
            .output()
            .context("run ejabberd_ctl")?;
        if !out.status.success() {
            bail!(
                "ejabberdctl {args:?} on {node} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Every node's URL, in order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Node::mqtt_url).collect()
    }
}
