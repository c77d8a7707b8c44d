//! Retiring a router gives its memory back. Alone in its own test binary:
//! it reads the process's RSS, which other tests running beside it would
//! disturb.

use std::sync::Arc;

use axion_broker::router::{is_retired_router_end, RouterHandle};
use axion_broker::BrokerConfig;

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Starts a router, gives it `n` filters and retires it; RSS at its peak.
async fn fill_and_retire(n: usize) -> u64 {
    let router = Arc::new(RouterHandle::spawn(&BrokerConfig::default()));
    let (mut tx, rx, _) = router.clone().link("filters".into(), true).await.unwrap();
    for i in 0..n {
        tx.subscribe(format!("f/{i}")).unwrap();
    }
    // The router has them all once a later connect is answered.
    let probe = router.clone().link("probe".into(), true).await.unwrap();
    let peak = rss_kb();
    drop((tx, rx, probe));
    router.retire().await.unwrap();
    peak
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_router_gives_its_filters_memory_back() {
    // What the binary's panic hook does: the retired router's panic is
    // expected, and anything else still reaches the default hook.
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !is_retired_router_end(info) {
            previous(info);
        }
    }));
    let before = rss_kb();
    let mut peaks = Vec::new();
    for _ in 0..3 {
        peaks.push(fill_and_retire(5_000).await);
    }
    let after = rss_kb();
    eprintln!("RSS kB: before {before}, peaks with 5 000 filters {peaks:?}, after {after}");
    let grown = peaks[0] - before;
    assert!(grown > 20_000, "5 000 filters cost memory");
    assert!(
        after < before + grown / 2,
        "retired routers' memory was not returned"
    );
}
