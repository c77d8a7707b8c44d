//! `axion work --queue Q -- CMD ARGS…`: a generic queue worker on the
//! service runtime that runs a command per task.
//!
//! Shell and Python scripts get the same guarantees as a Rust service —
//! credit-based delivery, automatic `progress`, the heartbeat, exit 70/71
//! from the watchdog, drain on SIGTERM — without linking anything. The task
//! payload is the command's stdin (JSON); its stdout (JSON, or text) is the
//! result, acked and published to the task's `replyTo`; a non-zero exit
//! fails the attempt with the tail of stderr as the reason.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axion_runtime::{HandlerResult, Limits, Service, Task};
use axion_wire::{BrokerUrls, DEFAULT_MQTT_URL};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// Bytes of stderr quoted in a failure reason.
const STDERR_TAIL: usize = 2048;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Queue to take tasks from (one topic level); repeat or comma-separate for several.
    #[arg(
        long = "queue",
        env = "AXION_WORK_QUEUE",
        required = true,
        value_delimiter = ','
    )]
    pub queues: Vec<String>,
    /// Commands run at once (MAX_INFLIGHT); also the credit announced to each queue.
    #[arg(long, env = "MAX_INFLIGHT", default_value_t = 8)]
    pub concurrency: usize,
    /// Service name in the heartbeat topic (default: work-<first queue>).
    #[arg(long, env = "AXION_SERVICE")]
    pub service: Option<String>,
    /// Package the queues belong to (one topic level).
    #[arg(long, env = "AXION_PACKAGE", default_value = "default")]
    pub package: String,
    /// Broker URL, mqtt://[user[:password]@]host[:port]; the nodes of a clustered broker comma-separated (mqtt://a:1883,mqtt://b:1883), failed over in turn.
    #[arg(long, env = "AXION_MQTT_URL", default_value = DEFAULT_MQTT_URL)]
    pub mqtt: BrokerUrls,
    /// Serve /health/live and /health/ready on this address (its port names the instance); port 0 picks a free port (see --ports-file).
    #[arg(long, env = "HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,
    /// Once the health endpoints are bound, write their address to this file as a `health=address` line (empty without --health-listen); how a supervisor or script learns the port picked for port 0. Written whole (a temporary file renamed over it); removed at start and at a clean stop.
    #[arg(long, env = "AXION_PORTS_FILE", value_name = "PATH")]
    pub ports_file: Option<PathBuf>,
    /// Exit 70 when no node of the broker has been reachable this long (ms).
    #[arg(long, env = "DISCONNECT_KILL_MS", default_value_t = 10_000)]
    pub disconnect_kill_ms: u64,
    /// Exit 71 when tasks are pending and none finished for this long (ms).
    #[arg(long, env = "LIVENESS_MAX_STALL_MS", default_value_t = 30_000)]
    pub liveness_max_stall_ms: u64,
    /// On SIGTERM, how long running commands may finish before their tasks are handed back (ms).
    #[arg(long, env = "DRAIN_MS", default_value_t = 5_000)]
    pub drain_ms: u64,
    /// How often the watchdog checks (ms).
    #[arg(long, env = "WATCHDOG_INTERVAL_MS", default_value_t = 250)]
    pub watchdog_interval_ms: u64,
    /// The queue owner's ack wait (ms); `progress` goes out every third of it.
    #[arg(long, env = "AXION_QUEUE_ACK_WAIT_MS", default_value_t = 30_000)]
    pub ack_wait_ms: u64,
    /// Take tasks on this worker's own topic (axion/<pkg>/queue/<q>/tasks/<worker>) instead of the queue's shared subscription, on every node; for brokers without shared subscriptions (the worker also switches by itself on a node whose CONNACK says it has none).
    #[arg(long, env = "AXION_DIRECTED_DELIVERY")]
    pub directed_delivery: bool,
    /// Most bytes of a command's stdout taken as its result; more fails the attempt.
    #[arg(long, env = "AXION_WORK_MAX_OUTPUT", default_value_t = 8 << 20)]
    pub max_output: usize,
    /// The command to run per task, with its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let code = runtime.block_on(work(args));
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

async fn work(args: Args) -> i32 {
    let limits = Limits {
        max_inflight: args.concurrency,
        disconnect_kill: Duration::from_millis(args.disconnect_kill_ms),
        liveness_max_stall: Duration::from_millis(args.liveness_max_stall_ms),
        drain: Duration::from_millis(args.drain_ms),
        watchdog_interval: Duration::from_millis(args.watchdog_interval_ms),
        ack_wait: Duration::from_millis(args.ack_wait_ms),
        ..Limits::default()
    };
    let name = args
        .service
        .clone()
        .unwrap_or_else(|| format!("work-{}", args.queues.first().map_or("", String::as_str)));
    let command = Arc::new(args.command);
    let max_output = args.max_output;
    let mut service = Service::new(name)
        .package(args.package)
        .mqtt(args.mqtt)
        .limits(limits)
        .directed_delivery(args.directed_delivery);
    if let Some(addr) = args.health_listen {
        service = service.health_listen(addr);
    }
    if let Some(path) = args.ports_file {
        service = service.ports_file(path);
    }
    for queue in args.queues {
        let command = command.clone();
        service = service.queue(queue, move |task| {
            let command = command.clone();
            async move { run_command(&command, max_output, task).await }
        });
    }
    service.run().await
}

/// One task, one process: payload on stdin, result from stdout.
async fn run_command(command: &[String], max_output: usize, task: Task) -> HandlerResult {
    let Some((program, rest)) = command.split_first() else {
        return Err("no command given".into());
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(rest)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .env("AXION_TASK_ID", &task.id)
        .env("AXION_TASK_QUEUE", &task.queue)
        .env("AXION_TASK_ATTEMPTS", task.attempts.to_string());
    if let Some(corr) = &task.correlation_id {
        cmd.env("AXION_CORRELATION_ID", corr);
    }
    // When the watchdog ends this process (70/71) nothing unwinds, so the
    // kernel must take the command down with it: no orphan keeps running a
    // task that is already being redelivered elsewhere.
    //
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
                .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|err| format!("cannot start {program:?}: {err}"))?;
    let input = serde_json::to_vec(&task.payload).map_err(|err| err.to_string())?;
    let stdin = child.stdin.take();
    let feed = async move {
        if let Some(mut stdin) = stdin {
            // A command that does not read its stdin closes the pipe: fine.
            if let Err(err) = stdin.write_all(&input).await {
                tracing::debug!(error = %err, "command did not take its whole stdin");
            }
        }
    };
    let stdout = read_head(child.stdout.take(), max_output);
    let stderr = read_tail(child.stderr.take(), STDERR_TAIL);
    let ((), (out, truncated), err, status) = tokio::join!(feed, stdout, stderr, child.wait());
    let status = status.map_err(|e| format!("waiting for {program:?} failed: {e}"))?;
    if !status.success() {
        let how = match status.code() {
            Some(code) => format!("exit code {code}"),
            None => "killed by a signal".to_string(),
        };
        let err = String::from_utf8_lossy(&err);
        let err = err.trim();
        return Err(if err.is_empty() {
            how
        } else {
            format!("{how}: {err}")
        });
    }
    if truncated {
        return Err(format!("result larger than {max_output} bytes"));
    }
    let text = String::from_utf8_lossy(&out);
    let text = text.trim();
    Ok(if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
    })
}

/// The first `max` bytes; the rest is read and dropped so the command never
/// blocks on a full pipe. The flag says whether anything was dropped.
async fn read_head(pipe: Option<impl AsyncRead + Unpin>, max: usize) -> (Vec<u8>, bool) {
    let Some(mut pipe) = pipe else {
        return (Vec::new(), false);
    };
    let mut kept = Vec::new();
    let mut truncated = false;
    let mut buf = [0u8; 8192];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return (kept, truncated),
            Ok(n) => {
                let room = max.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
                truncated |= n > room;
            }
        }
    }
}

/// The last `max` bytes.
async fn read_tail(pipe: Option<impl AsyncRead + Unpin>, max: usize) -> Vec<u8> {
    let Some(mut pipe) = pipe else {
        return Vec::new();
    };
    let mut tail = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return tail,
            Ok(n) => {
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > max {
                    tail.drain(..tail.len() - max);
                }
            }
        }
    }
}
