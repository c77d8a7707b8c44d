//! `axion-bench --churn-secs N`: a healthy client's QoS 1 round trip while
//! other clients churn subscriptions, per broker, one broker after the
//! other.
//!
//! For N seconds, [`CHURNERS`] clients each connect, subscribe to
//! [`FILTERS`] filters nobody else uses in one SUBSCRIBE, publish a QoS 1
//! message to the last of them and wait for it (so the filters are in
//! use), and disconnect, over and over, each time with new filters. Meanwhile
//! a healthy client publishes QoS 1 to a topic it subscribes to and waits
//! for its own message back, again and again; each wait is one round trip.
//! Axion renews its router as the dead filters pile up (the count is read
//! off its heartbeat record); every renewal pauses publishing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rumqttc::{Packet, QoS, SubscribeFilter, SubscribeReasonCode};

use super::soak::Conn;
use super::{free_port, start, Args, Kind};

/// Clients churning at once.
const CHURNERS: u64 = 4;
/// Filters per churning connection.
const FILTERS: u64 = 100;

struct Outcome {
    trips: Vec<Duration>,
    filters: u64,
    /// Connections some of whose filters were refused (router full).
    refused: u64,
    renewals: Option<u64>,
}

/// One churning client, until `stop`.
async fn churner(
    port: u16,
    worker: u64,
    stop: Arc<AtomicBool>,
    filters: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
) {
    let mut visit = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let prefix = format!("churn/{worker}/{visit}");
        let once = async {
            let (mut conn, _) = Conn::open(port, &format!("bench-churn-{worker}-{visit}"), true)
                .await
                .context("CONNACK")?;
            let subscribe = (0..FILTERS)
                .map(|i| SubscribeFilter::new(format!("{prefix}/{i}/+"), QoS::AtLeastOnce));
            conn.client.subscribe_many(subscribe).await?;
            let Packet::SubAck(ack) = conn
                .next(|p| matches!(p, Packet::SubAck(_)))
                .await
                .context("SUBACK")?
            else {
                unreachable!("next returns what it was asked for");
            };
            if ack
                .return_codes
                .iter()
                .any(|c| matches!(c, SubscribeReasonCode::Failure))
            {
                // The router is full until a renewal frees room.
                refused.fetch_add(1, Ordering::Relaxed);
                conn.close().await;
                return anyhow::Ok(false);
            }
            let last = format!("{prefix}/{}/x", FILTERS - 1);
            conn.client
                .publish(last.as_str(), QoS::AtLeastOnce, false, vec![0u8; 16])
                .await?;
            conn.next(|p| matches!(p, Packet::Publish(p) if p.topic == last))
                .await
                .context("own message")?;
            conn.close().await;
            anyhow::Ok(true)
        };
        match once.await {
            Ok(true) => {
                filters.fetch_add(FILTERS, Ordering::Relaxed);
            }
            Ok(false) => {}
            Err(err) => eprintln!("  churner {worker}: {err:#}"),
        }
        visit += 1;
    }
}

/// Axion's router renewals so far, from its retained heartbeat record.
async fn renewals(port: u16) -> anyhow::Result<u64> {
    let (mut conn, _) = Conn::open(port, &format!("bench-renewals-{}", free_port()?), true).await?;
    conn.client
        .subscribe("axion/+/heartbeat/broker/#", QoS::AtMostOnce)
        .await?;
    let Packet::Publish(record) = conn.next(|p| matches!(p, Packet::Publish(_))).await? else {
        anyhow::bail!("no heartbeat record");
    };
    conn.close().await;
    let record = String::from_utf8_lossy(&record.payload);
    let count = record
        .split("\"router_renewals\":")
        .nth(1)
        .map(|rest| {
            rest.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
        })
        .unwrap_or_default();
    Ok(count.parse().unwrap_or(0))
}

async fn run_one(port: u16, secs: u64, axion: bool) -> anyhow::Result<Outcome> {
    let before = if axion {
        Some(renewals(port).await?)
    } else {
        None
    };
    let (mut healthy, _) = Conn::open(port, "bench-healthy", true).await?;
    healthy
        .client
        .subscribe("healthy/echo", QoS::AtLeastOnce)
        .await?;
    healthy.next(|p| matches!(p, Packet::SubAck(_))).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let filters = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let churners: Vec<_> = (0..CHURNERS)
        .map(|w| {
            tokio::spawn(churner(
                port,
                w,
                stop.clone(),
                filters.clone(),
                refused.clone(),
            ))
        })
        .collect();
    let started = Instant::now();
    let mut trips = Vec::new();
    let mut n = 0u64;
    while started.elapsed() < Duration::from_secs(secs) {
        let body = n.to_be_bytes().to_vec();
        let sent = Instant::now();
        healthy
            .client
            .publish("healthy/echo", QoS::AtLeastOnce, false, body.clone())
            .await?;
        healthy
            .next(|p| matches!(p, Packet::Publish(p) if p.payload[..] == body[..]))
            .await
            .context("the healthy client's own message")?;
        trips.push(sent.elapsed());
        n += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for c in churners {
        c.await?;
    }
    healthy.close().await;
    let renewals = match before {
        // The record is published every 2 s: the one after the churn.
        Some(before) => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            Some(renewals(port).await? - before)
        }
        None => None,
    };
    Ok(Outcome {
        trips,
        filters: filters.load(Ordering::Relaxed),
        refused: refused.load(Ordering::Relaxed),
        renewals,
    })
}

pub fn run(args: &Args, secs: u64) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    println!("| broker | round trips | p50 ms | p99 ms | max ms | trips ≥ 500 ms | churned filters | SUBSCRIBEs refused | router renewals |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut kinds = vec![Kind::Axion];
    if args.baseline.is_some() {
        kinds.push(Kind::Baseline);
    }
    kinds.push(Kind::Mosquitto);
    for kind in kinds {
        let broker = start(kind, args)?;
        // Axion publishes its first heartbeat record once it is up.
        std::thread::sleep(Duration::from_secs(1));
        let axion = matches!(kind, Kind::Axion | Kind::Baseline);
        let mut o = rt.block_on(run_one(broker.port, secs, axion))?;
        o.trips.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let pct = |p: f64| ms(o.trips[((o.trips.len() - 1) as f64 * p) as usize]);
        println!(
            "| {kind:?} | {} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {} |",
            o.trips.len(),
            pct(0.5),
            pct(0.99),
            ms(*o.trips.last().context("no round trip")?),
            o.trips
                .iter()
                .filter(|t| **t >= Duration::from_millis(500))
                .count(),
            o.filters,
            o.refused,
            o.renewals.map_or("–".to_string(), |r| r.to_string()),
        );
    }
    Ok(())
}
