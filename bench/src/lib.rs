//! What `axion-bench` shares with the tests: a load that a test also runs
//! at a small scale, so that the benchmark's client and its checks keep
//! working between benchmark runs (`tests/queues.rs` runs [`queue_load`]
//! with a few hundred tasks), the ejabberd cluster both the cluster tests
//! and `--cluster` run on, and the process figures read from /proc.

pub mod batched;
pub mod ejabberd;
pub mod queue_load;

/// utime + stime of a process, in seconds (0 once it is gone).
pub fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the ")" that closes the command name; utime/stime are 14/15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// [`cpu_secs`] summed over the processes that make up one server.
pub fn cpu_secs_of(pids: &[u32]) -> f64 {
    pids.iter().copied().map(cpu_secs).sum()
}
