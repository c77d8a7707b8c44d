//! `axion`: one binary for the broker, the bridge, the queues, the heartbeat
//! mesh and the ops tools. This file only parses flags and hands each
//! subcommand to its module in `cmd/`; behaviour lives in the library crates.

mod alloc;
mod cmd;
mod config_file;
mod logging;
mod panics;

use clap::{CommandFactory, Parser, Subcommand};

// mimalloc unless `AXION_ALLOCATOR=system` (see `alloc`).
#[global_allocator]
static ALLOCATOR: alloc::Chosen = alloc::Chosen;

#[derive(Parser)]
#[command(
    name = "axion",
    version,
    about = "MQTT broker, durable work queues, heartbeat mesh and legacy WebSocket bridge",
    after_help = "Environment: AXION_ALLOCATOR=mimalloc (the default) or system chooses the memory allocator of every command: mimalloc for throughput, system (glibc) for a flat memory band under heavy subscription churn."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run everything a single machine needs: embedded broker, queues, bridge, heartbeat.
    Serve(Box<cmd::serve::Args>),
    /// Live dashboard of every instance's heartbeat and every queue (--once --json for scripts).
    Monitor(cmd::monitor::Args),
    /// Publish heartbeats for a non-Rust process; mark it offline when its pid exits.
    Heartbeat(cmd::heartbeat::Args),
    /// Run the durable queue owner alone against any MQTT 5 broker.
    Queues(cmd::queues::Args),
    /// Inspect and repair queues: ls, show, dead, retry, purge, enqueue.
    Queue(cmd::queue::Args),
    /// Run the legacy WebSocket bridge alone against any MQTT 5 broker.
    Bridge(cmd::bridge::Args),
    /// Stop this host's processes that hang (silent, cut off from the broker, stalled), and alarm on restart loops.
    Reap(cmd::reap::Args),
    /// Run a command per task of a queue, with the service runtime's fail-fast guarantees.
    Work(cmd::work::Args),
    /// Print the argon2 hash of a password (or a new bridge token) for the auth file.
    Passwd(cmd::passwd::Args),
}

fn main() -> std::process::ExitCode {
    if let Err(value) = alloc::in_use() {
        eprintln!(
            "axion: {}={value:?} names no allocator; use mimalloc or system",
            alloc::ENV
        );
        return std::process::ExitCode::from(78);
    }
    let argv = match config_file::apply(std::env::args_os().collect(), &Cli::command()) {
        Ok(argv) => argv,
        Err(err) => {
            // A configuration error (EX_CONFIG), as the runtime's.
            eprintln!("axion: {err:#}");
            return std::process::ExitCode::from(78);
        }
    };
    let cli = Cli::parse_from(argv);
    logging::init();
    panics::install();
    let result = match cli.command {
        Command::Serve(args) => cmd::serve::run(*args),
        Command::Monitor(args) => cmd::monitor::run(args),
        Command::Heartbeat(args) => cmd::heartbeat::run(args),
        Command::Queues(args) => cmd::queues::run(args),
        Command::Queue(args) => cmd::queue::run(args),
        Command::Bridge(args) => cmd::bridge::run(args),
        Command::Work(args) => cmd::work::run(args),
        Command::Reap(args) => cmd::reap::run(args),
        Command::Passwd(args) => cmd::passwd::run(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("axion: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
