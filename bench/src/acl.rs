//! `axion-bench --acl`: what authentication and ACL checks cost.
//!
//! First the check alone: ns per `may_publish` against a role of 50 rules
//! that matches on the last (a `%c` template), in this process through
//! `axion-access`, as the broker calls it on every PUBLISH. Then QoS 1
//! throughput through `axion serve` without an auth file beside `axion
//! serve --auth-file` with a logged-in user whose role has 2 rules (the
//! topic matching the last), rounds alternating: the same one publisher →
//! one subscriber case as the throughput benchmark. Logins cost one
//! argon2 verification per CONNECT, before the measured span.

use std::time::Instant;

use anyhow::{bail, Context};
use axion_access::auth::{Auth, Principal};
use rumqttc::{MqttOptions, QoS};

use super::{axion_serve, free_port, median, run_case, wait_listening, Args, Outcome};

/// The user of the secured broker, and its password.
const USER: &str = "bench";
const PASSWORD: &str = "bench password";

pub fn run(args: &Args) -> anyhow::Result<()> {
    let per_check = check_cost()?;
    println!("| measure | figure |");
    println!("|---|---|");
    println!(
        "| `may_publish`, role of 50 rules, match on the last (a `%c` template) | {per_check:.0} ns/check |"
    );
    println!();

    let auth_file = tempfile::NamedTempFile::new()?;
    std::fs::write(auth_file.path(), auth_file_text(args)?)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let cases = [
        ("axion serve, no auth", false),
        ("axion serve, auth file + ACL", true),
    ];
    let name = format!("QoS1 1→1 {} B", args.payload);
    let mut results: Vec<Vec<Outcome>> = vec![Vec::new(), Vec::new()];
    for round in 0..args.rounds {
        // A different one first each round, so drift hits both alike.
        for k in 0..cases.len() {
            let i = (k + round) % cases.len();
            let (label, secured) = cases[i];
            let dir = tempfile::tempdir()?;
            let port = free_port()?;
            let mut cmd = axion_serve(&args.axion, port, dir.path())?;
            if secured {
                cmd.arg("--auth-file").arg(auth_file.path());
            }
            let mut child = cmd.spawn().with_context(|| {
                format!("spawn {} (cargo build --release)", args.axion.display())
            })?;
            let outcome = wait_listening(port, "axion serve").and_then(|()| {
                let options = |id: &str| {
                    let mut o = MqttOptions::new(id, "127.0.0.1", port);
                    if secured {
                        o.set_credentials(USER, PASSWORD);
                    }
                    o
                };
                rt.block_on(run_case(
                    options,
                    QoS::AtLeastOnce,
                    args.messages,
                    None,
                    args.payload,
                    1,
                    child.id(),
                ))
            });
            let _ = child.kill();
            let _ = child.wait();
            let outcome = outcome?;
            eprintln!(
                "  {name} round {} {label}: {}",
                round + 1,
                outcome.summary()
            );
            results[i].push(outcome);
        }
    }
    println!("| case | broker | delivered | msg/s | p50 ms | p99 ms | broker CPU s | msg per broker CPU-s |");
    println!("|---|---|---|---|---|---|---|---|");
    let picked: Vec<Outcome> = results
        .into_iter()
        .map(|v| median(v, |o| o.rate()))
        .collect();
    for ((label, _), o) in cases.iter().zip(&picked) {
        println!("| {name} | {label} | {} |", o.cells());
    }
    println!();
    println!("| case | auth file + ACL ÷ no auth |");
    println!("|---|---|");
    let (open, secured) = (picked[0], picked[1]);
    println!(
        "| {name} | throughput {:.2}×, messages per broker CPU-second {:.2}× |",
        secured.rate() / open.rate(),
        secured.per_cpu_sec() / open.per_cpu_sec()
    );
    Ok(())
}

/// ns per `may_publish` on a role whose 50th rule matches.
fn check_cost() -> anyhow::Result<f64> {
    let mut publish: Vec<String> = (0..49).map(|i| format!("axion/p{i}/event/#")).collect();
    publish.push("axion/p/event/%c/#".into());
    let file = format!("[roles.r]\npublish = {publish:?}\n[anonymous]\nroles = [\"r\"]\n");
    let auth = Auth::parse(&file)?;
    // `%c` stands only for an id the user claims: the user `bench` as `bench`.
    let principal = Principal {
        user: Some("bench".into()),
        ..auth
            .login(None, None)
            .map_err(|e| anyhow::anyhow!("anonymous login: {e:?}"))?
    };
    let n = 1_000_000u32;
    let start = Instant::now();
    for _ in 0..n {
        if auth
            .may_publish(&principal, "bench", "axion/p/event/bench/x")
            .is_err()
        {
            bail!("the templated rule did not match");
        }
    }
    Ok(start.elapsed().as_nanos() as f64 / f64::from(n))
}

/// An auth file whose user [`USER`] may publish and subscribe with two
/// rules, the benchmark's topics matching the last; its hash comes from
/// `axion passwd`, as an operator makes it.
fn auth_file_text(args: &Args) -> anyhow::Result<String> {
    let out = std::process::Command::new(&args.axion)
        .args(["passwd", "--password", PASSWORD])
        .output()
        .with_context(|| format!("run {} passwd", args.axion.display()))?;
    if !out.status.success() {
        bail!("axion passwd failed: {out:?}");
    }
    let hash_line = String::from_utf8(out.stdout)?;
    Ok(format!(
        "[roles.bench]\npublish = [\"axion/p/#\", \"bench/#\"]\nsubscribe = [\"axion/p/#\", \"bench/#\"]\n\n\
         [users.{USER}]\n{}\nroles = [\"bench\"]\n",
        hash_line.trim()
    ))
}
