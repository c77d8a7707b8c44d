//! No file descriptor outlives its connection: after hundreds of broken,
//! hostile and abandoned connections, `axion serve` holds as many open
//! descriptors as before them. Real processes: `axion serve`, raw sockets.

mod common;

use std::time::{Duration, Instant};

use common::raw::{raw_connect, raw_subscribe};
use common::Serve;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// What one hostile or careless client does before it goes away.
async fn misbehave(port: u16, kind: usize, i: usize) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)).await else {
        return;
    };
    // A small deterministic generator: each client's bytes differ.
    let mut state = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut noise = |n: u64| -> Vec<u8> { (0..1 + next() % n).map(|_| next() as u8).collect() };
    let bytes: Vec<u8> = match kind {
        // Garbage from the first byte.
        0 => noise(200),
        // A CONNECT, then garbage.
        1 => {
            let mut b = raw_connect(
                if i.is_multiple_of(2) { 4 } else { 5 },
                &format!("fd-{i}"),
                30,
            );
            b.extend(noise(100));
            b
        }
        // A CONNECT cut short.
        2 => {
            let b = raw_connect(5, &format!("fd-{i}"), 30);
            let cut = 1 + (i % (b.len() - 1));
            b[..cut].to_vec()
        }
        // A CONNECT and a server-only packet (CONNACK).
        3 => {
            let mut b = raw_connect(5, &format!("fd-{i}"), 30);
            b.extend_from_slice(&[0x20, 0x03, 0x00, 0x00, 0x00]);
            b
        }
        // A CONNECT, a subscription, then a length far past the maximum.
        4 => {
            let mut b = raw_connect(4, &format!("fd-{i}"), 30);
            b.extend(raw_subscribe(4, "fd/#", 1));
            b.extend_from_slice(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F]);
            b
        }
        // Nothing at all: connect and leave.
        _ => Vec::new(),
    };
    let _ = s.write_all(&bytes).await;
    // Some leave at once, some linger a moment.
    if i.is_multiple_of(3) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_descriptor_outlives_its_connection() {
    let serve = Serve::start();
    let (port, pid) = (serve.mqtt_port, serve.proc.pid());
    // Settled: the embedded components are connected.
    let mut baseline = open_fds(pid);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = open_fds(pid);
        if now == baseline || Instant::now() > deadline {
            baseline = now;
            break;
        }
        baseline = now;
    }
    assert!(baseline > 0, "the broker's descriptors are readable");
    for round in 0..5 {
        let clients: Vec<_> = (0..60)
            .map(|j| {
                let i = round * 60 + j;
                tokio::spawn(misbehave(port, i % 6, i))
            })
            .collect();
        for c in clients {
            let _ = c.await;
        }
    }
    // Every connection is gone from the broker within its connect timeout
    // (10 s for one that never finished its CONNECT).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = open_fds(pid);
        if now <= baseline {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{now} descriptors open after 300 broken connections, {baseline} before"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
