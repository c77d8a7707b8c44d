//! `axion queue …`: look at and repair durable queues. Everything goes over
//! MQTT (request/reply on `…/queues/cmd/list` and `…/queue/<q>/cmd` to the
//! owner, retained stats when no owner answers),
//! so it works from any machine that reaches the broker while the owner holds
//! its store open.

use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use axion_queues::ops::{OpsClient, OpsError};
use axion_wire::queue::{Command, Stats, TaskRequest, TaskView};
use axion_wire::BrokerUrls;
use comfy_table::{presets::NOTHING, Table};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Broker to connect to (user/password in each URL or AXION_MQTT_USER/AXION_MQTT_PASSWORD; a clustered broker's nodes comma-separated, failed over in turn).
    #[arg(long, global = true, env = "AXION_MQTT_URL", default_value = axion_wire::DEFAULT_MQTT_URL)]
    pub mqtt: BrokerUrls,
    /// Package whose queues to inspect.
    #[arg(long, global = true, env = "AXION_PACKAGE", default_value = "default")]
    pub package: String,
    /// Print JSON instead of tables, for scripts.
    #[arg(long, global = true, env = "AXION_JSON")]
    pub json: bool,
    /// How long to wait for the broker and the queue owner, in ms.
    #[arg(
        long,
        global = true,
        env = "AXION_QUEUE_TIMEOUT_MS",
        default_value_t = 5_000
    )]
    pub timeout_ms: u64,
    #[command(subcommand)]
    pub command: Sub,
}

#[derive(clap::Subcommand, Debug)]
pub enum Sub {
    /// Every queue: depth, bytes, in flight, dead, rates, oldest waiting task, enqueues refused at its limits, stray acks (a task acked twice or by a worker it was not handed to: it ran more than once). Asks the queue owner; with no answer, reads the retained stats.
    Ls {
        /// How long to wait for the owner's answer before reading the retained stats instead, in ms.
        #[arg(long, env = "AXION_QUEUE_LS_OWNER_WAIT_MS", default_value_t = 1_000)]
        owner_wait_ms: u64,
    },
    /// One queue: stats, workers and their credit, the first tasks in flight and waiting.
    Show {
        /// Queue name.
        queue: String,
        /// How many tasks to list.
        #[arg(long, env = "AXION_QUEUE_LIMIT", default_value_t = 20)]
        limit: usize,
    },
    /// Dead-lettered tasks of a queue, with their last failure reason.
    Dead {
        /// Queue name.
        queue: String,
        /// How many tasks to list.
        #[arg(long, env = "AXION_QUEUE_LIMIT", default_value_t = 50)]
        limit: usize,
    },
    /// Put dead-lettered tasks back on the queue with a fresh attempt count.
    Retry {
        /// Queue name.
        queue: String,
        /// The dead task to retry.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Retry every dead task of the queue.
        #[arg(long)]
        all: bool,
    },
    /// Delete every waiting task and dead letter of a queue (in-flight tasks finish).
    Purge {
        /// Queue name.
        queue: String,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y', env = "AXION_YES")]
        yes: bool,
    },
    /// Enqueue one task and wait until the owner has it on disk.
    Enqueue {
        /// Queue name.
        queue: String,
        /// Task payload, as JSON.
        #[arg(long)]
        payload: String,
        /// Task id (enqueueing an id that is still queued or in flight does nothing).
        #[arg(long)]
        id: Option<String>,
        /// Deliver no sooner than this many ms from now.
        #[arg(long)]
        delay_ms: Option<u64>,
        /// Deliveries before the task is dead-lettered.
        #[arg(long)]
        max_attempts: Option<u32>,
        /// Topic where the worker should send its result.
        #[arg(long)]
        reply_to: Option<String>,
        /// Correlation id passed to the worker with the task.
        #[arg(long)]
        correlation_id: Option<String>,
    },
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: Args) -> anyhow::Result<ExitCode> {
    let timeout = Duration::from_millis(args.timeout_ms);
    let url = args.mqtt.clone().with_env_credentials();
    if let Sub::Purge { queue, yes: false } = &args.command {
        if !confirm(&format!(
            "Delete every waiting task and dead letter of queue {queue:?}?"
        ))? {
            eprintln!("nothing purged");
            return Ok(ExitCode::FAILURE);
        }
    }
    let mut client = OpsClient::connect(&url, &args.package, timeout).await?;
    let result = execute(&mut client, &args).await;
    client.disconnect().await;
    result
}

async fn execute(client: &mut OpsClient, args: &Args) -> anyhow::Result<ExitCode> {
    let json = args.json;
    match &args.command {
        Sub::Ls { owner_wait_ms } => {
            let wait = Duration::from_millis(*owner_wait_ms);
            // The owner's answer holds every queue wherever its retained
            // stats went; they are the fallback for an owner that is down
            // (or older than the list request).
            let (stats, retained) = match client.list(wait).await {
                Ok(stats) => (stats, false),
                Err(OpsError::Timeout(_)) => {
                    eprintln!(
                        "no queue owner answered within {wait:?}: showing the retained stats, which may be stale or miss queues"
                    );
                    (client.all_stats(Duration::from_millis(300)).await?, true)
                }
                Err(err) => return Err(err.into()),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else if stats.is_empty() && retained {
                println!(
                    "no queues (no retained stats under axion/{}/queue/+/stats)",
                    args.package
                );
            } else if stats.is_empty() {
                println!("no queues (the queue owner holds none)");
            } else {
                println!("{}", stats_table(&stats));
            }
        }
        Sub::Show { queue, limit } => {
            let reply = client
                .command(queue, Command::Show { limit: *limit })
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&reply)?);
            } else {
                if let Some(stats) = &reply.stats {
                    println!("{}", stats_table(std::slice::from_ref(stats)));
                }
                if let Some(ms) = reply.ack_wait_ms {
                    println!("\nack wait: {ms} ms");
                }
                if reply.workers.is_empty() {
                    println!("\nworkers: none has announced credit");
                } else {
                    let mut table = table(&["WORKER", "CREDITS", "HOLDING"]);
                    for w in &reply.workers {
                        table.add_row(vec![
                            w.worker.clone(),
                            w.credits.to_string(),
                            w.holding.to_string(),
                        ]);
                    }
                    println!("\nworkers:\n{table}");
                }
                if !reply.tasks.is_empty() {
                    println!("\ntasks:\n{}", tasks_table(&reply.tasks));
                }
            }
        }
        Sub::Dead { queue, limit } => {
            let reply = client
                .command(queue, Command::Dead { limit: *limit })
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&reply.tasks)?);
            } else if reply.tasks.is_empty() {
                println!("no dead letters in {queue}");
            } else {
                println!("{}", tasks_table(&reply.tasks));
            }
        }
        Sub::Retry { queue, id, all } => {
            let reply = client
                .command(
                    queue,
                    Command::Retry {
                        id: id.clone(),
                        all: *all,
                    },
                )
                .await?;
            let count = reply.count.unwrap_or(0);
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "queue": queue, "retried": count })
                );
            } else {
                println!("{count} task(s) of {queue} back on the queue");
            }
            if count == 0 && id.is_some() {
                bail!("no dead task with that id in {queue}");
            }
        }
        Sub::Purge { queue, .. } => {
            let reply = client.command(queue, Command::Purge).await?;
            let count = reply.count.unwrap_or(0);
            if json {
                println!("{}", serde_json::json!({ "queue": queue, "purged": count }));
            } else {
                println!("{count} task(s) removed from {queue}");
            }
        }
        Sub::Enqueue {
            queue,
            payload,
            id,
            delay_ms,
            max_attempts,
            reply_to,
            correlation_id,
        } => {
            let payload = serde_json::value::RawValue::from_string(payload.clone())
                .context("--payload must be valid JSON (quote strings: '\"text\"')")?;
            let request = TaskRequest {
                payload,
                id: id.clone(),
                reply_to: reply_to.clone(),
                correlation_id: correlation_id.clone(),
                max_attempts: *max_attempts,
                delay_ms: *delay_ms,
            };
            let done = client.enqueue(queue, &request).await?;
            if json {
                println!("{}", serde_json::to_string(&done)?);
            } else if done.duplicate {
                println!(
                    "{} already queued in {} (not added again)",
                    done.id, done.queue
                );
            } else {
                println!("{} enqueued in {}", done.id, done.queue);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn confirm(question: &str) -> anyhow::Result<bool> {
    eprint!("{question} [y/N] ");
    std::io::stderr().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(matches!(line.trim(), "y" | "Y" | "yes" | "YES"))
}

fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table.load_preset(NOTHING).set_header(header.to_vec());
    table
}

fn age(ms: u64) -> String {
    match ms {
        0 => "-".into(),
        ms if ms < 10_000 => format!("{:.1}s", ms as f64 / 1000.0),
        ms if ms < 3_600_000 => format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60),
        ms => format!("{}h{:02}m", ms / 3_600_000, (ms / 60_000) % 60),
    }
}

/// Bytes in binary units, one decimal past KiB.
fn size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes}B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1}{}", UNITS[unit])
}

fn stats_table(stats: &[Stats]) -> Table {
    let mut t = table(&[
        "QUEUE", "DEPTH", "BYTES", "INFLIGHT", "DEAD", "ENQ/S", "ACK/S", "OLDEST", "WORKERS",
        "ENQUEUED", "ACKED", "FAILED", "REFUSED", "STRAY",
    ]);
    for s in stats {
        t.add_row(vec![
            s.queue.clone(),
            s.depth.to_string(),
            size(s.bytes),
            s.inflight.to_string(),
            s.dead.to_string(),
            format!("{:.1}", s.enqueue_rate),
            format!("{:.1}", s.ack_rate),
            age(s.oldest_age_ms),
            s.workers.to_string(),
            s.enqueued_total.to_string(),
            s.acked_total.to_string(),
            s.failed_total.to_string(),
            s.refused_total.to_string(),
            s.stray_acks_total.to_string(),
        ]);
    }
    t
}

fn tasks_table(tasks: &[TaskView]) -> Table {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut t = table(&[
        "ID", "STATE", "ATTEMPTS", "AGE", "WORKER", "REASON", "PAYLOAD",
    ]);
    for task in tasks {
        let mut payload = task.payload.get().to_string();
        if payload.len() > 60 {
            let cut = (0..=57)
                .rev()
                .find(|i| payload.is_char_boundary(*i))
                .unwrap_or(0);
            payload.truncate(cut);
            payload.push_str("...");
        }
        t.add_row(vec![
            task.id.clone(),
            task.state.clone(),
            format!("{}/{}", task.attempts, task.max_attempts),
            age(now.saturating_sub(task.created_at)),
            task.worker.clone().unwrap_or_else(|| "-".into()),
            task.reason.clone().unwrap_or_else(|| "-".into()),
            payload,
        ]);
    }
    t
}
