//! The queues' figures for Prometheus, per queue (label `queue`).
//!
//! The core owns every queue's state and is the only writer here: it
//! copies each queue's figures (the ones its retained `…/stats` carry)
//! into atomics at most every [`SYNC_EVERY_MS`], and adds each acked
//! task's latency to its queue's histogram as it acks. A scrape reads the
//! atomics; the only lock is the map of queues, taken when a queue is
//! first seen and at each scrape, never per task.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

/// How stale a queue's figures may be at a scrape, in milliseconds.
pub(crate) const SYNC_EVERY_MS: u64 = 100;

/// Upper bounds of the latency histogram's buckets, in milliseconds: from
/// a task acked at once beside the owner to one that waited minutes for a
/// worker (beyond the last, only `+Inf`).
const BOUNDS_MS: [u64; 16] = [
    1, 2, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000, 300_000,
];

/// What one queue's retained stats carry, read in O(1) from its state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Figures {
    pub depth: u64,
    pub inflight: u64,
    pub dead: u64,
    pub bytes: u64,
    pub enqueued: u64,
    pub acked: u64,
    pub failed: u64,
    pub refused: u64,
    pub workers: u64,
}

/// One queue's figures and latency histogram.
#[derive(Debug, Default)]
pub(crate) struct QueueCells {
    depth: AtomicU64,
    inflight: AtomicU64,
    dead: AtomicU64,
    bytes: AtomicU64,
    enqueued: AtomicU64,
    acked: AtomicU64,
    failed: AtomicU64,
    refused: AtomicU64,
    workers: AtomicU64,
    /// Per bucket of [`BOUNDS_MS`], not cumulative.
    buckets: [AtomicU64; BOUNDS_MS.len()],
    latency_count: AtomicU64,
    latency_sum_ms: AtomicU64,
}

impl QueueCells {
    pub(crate) fn set(&self, f: Figures) {
        self.depth.store(f.depth, Relaxed);
        self.inflight.store(f.inflight, Relaxed);
        self.dead.store(f.dead, Relaxed);
        self.bytes.store(f.bytes, Relaxed);
        self.enqueued.store(f.enqueued, Relaxed);
        self.acked.store(f.acked, Relaxed);
        self.failed.store(f.failed, Relaxed);
        self.refused.store(f.refused, Relaxed);
        self.workers.store(f.workers, Relaxed);
    }

    /// One task acked `ms` after it was first enqueued.
    pub(crate) fn observe_latency(&self, ms: u64) {
        if let Some(i) = BOUNDS_MS.iter().position(|&b| ms <= b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.latency_sum_ms.fetch_add(ms, Relaxed);
        self.latency_count.fetch_add(1, Relaxed);
    }

    /// The histogram as the encoder takes it: (upper bound in seconds,
    /// count in that bucket alone), the total count and the sum in
    /// seconds. The count is never below what the buckets hold, however
    /// the reads interleave with an observation.
    fn latency(&self) -> (Vec<(f64, u64)>, u64, f64) {
        let buckets: Vec<(f64, u64)> = BOUNDS_MS
            .iter()
            .zip(&self.buckets)
            .map(|(&b, n)| (b as f64 / 1000.0, n.load(Relaxed)))
            .collect();
        let in_buckets: u64 = buckets.iter().map(|(_, n)| n).sum();
        let count = self.latency_count.load(Relaxed).max(in_buckets);
        let sum = self.latency_sum_ms.load(Relaxed) as f64 / 1000.0;
        (buckets, count, sum)
    }
}

/// Every queue's cells, shared by the owner's core (writer) and the
/// collector (reader); register it with a `prometheus_client` registry.
#[derive(Debug, Default)]
pub struct QueueMetrics {
    queues: Mutex<BTreeMap<String, Arc<QueueCells>>>,
}

impl QueueMetrics {
    /// The cells of `queue`, created on first use.
    pub(crate) fn cells(&self, queue: &str) -> Arc<QueueCells> {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        queues.entry(queue.to_string()).or_default().clone()
    }

    fn all(&self) -> Vec<(String, Arc<QueueCells>)> {
        let queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        queues.iter().map(|(q, c)| (q.clone(), c.clone())).collect()
    }
}

/// One family with a sample per queue.
fn per_queue(
    enc: &mut DescriptorEncoder,
    queues: &[(String, Arc<QueueCells>)],
    name: &str,
    help: &str,
    kind: MetricType,
    read: impl Fn(&QueueCells) -> &AtomicU64,
) -> fmt::Result {
    let mut family = enc.encode_descriptor(name, help, None, kind)?;
    for (queue, cells) in queues {
        let labels = [("queue", queue.as_str())];
        let mut sample = family.encode_family(&labels)?;
        let v = read(cells).load(Relaxed);
        match kind {
            MetricType::Counter => sample.encode_counter::<NoLabelSet, _, u64>(&v, None)?,
            _ => sample.encode_gauge(&v)?,
        }
    }
    Ok(())
}

impl Collector for QueueMetrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let queues = self.all();
        let e = &mut enc;
        let gauge = MetricType::Gauge;
        let counter = MetricType::Counter;
        per_queue(
            e,
            &queues,
            "axion_queue_depth",
            "Tasks waiting, delayed and backing off included",
            gauge,
            |c| &c.depth,
        )?;
        per_queue(
            e,
            &queues,
            "axion_queue_inflight",
            "Tasks delivered to a worker and not yet acked or failed",
            gauge,
            |c| &c.inflight,
        )?;
        per_queue(
            e,
            &queues,
            "axion_queue_dead",
            "Dead-lettered tasks",
            gauge,
            |c| &c.dead,
        )?;
        per_queue(
            e,
            &queues,
            "axion_queue_body_bytes",
            "Bytes of the bodies of waiting and in-flight tasks (what --max-queue-bytes bounds)",
            gauge,
            |c| &c.bytes,
        )?;
        per_queue(
            e,
            &queues,
            "axion_queue_workers",
            "Workers that announced credit",
            gauge,
            |c| &c.workers,
        )?;
        per_queue(
            e,
            &queues,
            "axion_queue_enqueued",
            "Tasks enqueued (a duplicate id counts once)",
            counter,
            |c| &c.enqueued,
        )?;
        per_queue(
            e,
            &queues,
            "axion_queue_acked",
            "Tasks acked by a worker",
            counter,
            |c| &c.acked,
        )?;
        per_queue(
            e,
            &queues,
            "axion_queue_failed",
            "Deliveries that failed: a worker's fail, or the ack wait expired",
            counter,
            |c| &c.failed,
        )?;
        per_queue(
            e,
            &queues,
            "axion_queue_refused",
            "Enqueues refused at the queue's depth or byte limit",
            counter,
            |c| &c.refused,
        )?;
        let mut family = e.encode_descriptor(
            "axion_queue_latency_seconds",
            "From a task's first enqueue to its ack, retries included (millisecond resolution)",
            None,
            MetricType::Histogram,
        )?;
        for (queue, cells) in &queues {
            let labels = [("queue", queue.as_str())];
            let (buckets, count, sum) = cells.latency();
            family
                .encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_lands_in_the_first_bucket_that_holds_it() {
        let cells = QueueCells::default();
        for ms in [0, 1, 2, 3, 400_000] {
            cells.observe_latency(ms);
        }
        let (buckets, count, sum) = cells.latency();
        assert_eq!(buckets[0], (0.001, 2));
        assert_eq!(buckets[1], (0.002, 1));
        assert_eq!(buckets[2], (0.005, 1));
        // Past the last bound: only in the count (+Inf).
        assert_eq!(buckets.iter().map(|(_, n)| n).sum::<u64>(), 4);
        assert_eq!(count, 5);
        assert!((sum - 400.006).abs() < 1e-9);
    }

    #[test]
    fn encodes_one_sample_per_queue() {
        let metrics = Arc::new(QueueMetrics::default());
        metrics.cells("jobs").set(Figures {
            depth: 3,
            acked: 7,
            ..Figures::default()
        });
        metrics.cells("jobs").observe_latency(4);
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(metrics));
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("axion_queue_depth{queue=\"jobs\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("axion_queue_acked_total{queue=\"jobs\"} 7\n"),
            "{text}"
        );
        assert!(
            text.contains("axion_queue_latency_seconds_bucket{queue=\"jobs\",le=\"0.005\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("axion_queue_latency_seconds_count{queue=\"jobs\"} 1\n"),
            "{text}"
        );
    }
}
