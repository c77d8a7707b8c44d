//! A fake embedding service on the Axion service runtime: the
//! legacy `embedding_service` rewritten in Rust, used by the
//! end-to-end tests (`tests/runtime.rs`) and the README.
//!
//! It serves the `embedding.generate` queue and answers `embedding.request`
//! events that carry `replyTo`. The "model" is a hash, so it needs no
//! download; the payload can ask for misbehaviour, so the fail-fast
//! guarantees can be shown on a real process:
//!
//! - `{"items": ["a", "b"]}` → `{"embeddings": [[…8 floats…], …], "model": "fake-hash-8"}`
//!   (plus `"attempts"` and `"pid"` for queue tasks, so tests see
//!   redeliveries and which instance did the work)
//! - `"delay_ms": N` → takes N ms (also `EMBED_DELAY_MS` for every job)
//! - `"fail": "why"` → the attempt fails with that reason
//! - `"hang": true` → never returns (an await that never completes)
//! - `"spin": true` → never returns and never yields (a CPU busy loop)
//!
//! Run: `AXION_MQTT_URL=mqtt://127.0.0.1:1883 cargo run -p axion-runtime --example embedding_worker`

use std::time::Duration;

use axion_runtime::{Event, HandlerResult, Service};
use serde_json::{json, Value};

const DIMENSIONS: usize = 8;

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let code = Service::new("embedding")
        .queue("embedding.generate", |task| async move {
            let mut result = embed(&task.payload).await?;
            result["attempts"] = json!(task.attempts);
            result["pid"] = json!(std::process::id());
            Ok(result)
        })
        .event("embedding.request", |event: Event| async move {
            embed(&event.payload).await
        })
        .run()
        .await;
    std::process::exit(code);
}

async fn embed(payload: &Value) -> HandlerResult {
    let delay = payload
        .get("delay_ms")
        .and_then(Value::as_u64)
        .or_else(|| std::env::var("EMBED_DELAY_MS").ok()?.parse().ok())
        .unwrap_or(0);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if let Some(reason) = payload.get("fail").and_then(Value::as_str) {
        return Err(reason.to_string());
    }
    if payload.get("hang").and_then(Value::as_bool) == Some(true) {
        std::future::pending::<()>().await;
    }
    if payload.get("spin").and_then(Value::as_bool) == Some(true) {
        let mut x: u64 = 0;
        loop {
            x = std::hint::black_box(x.wrapping_add(1));
        }
    }
    let items = payload
        .get("items")
        .and_then(Value::as_array)
        .ok_or_else(|| "payload.items must be an array of strings".to_string())?;
    let embeddings: Vec<Vec<f64>> = items
        .iter()
        .map(|item| fake_embedding(&item.to_string()))
        .collect();
    Ok(json!({"embeddings": embeddings, "model": format!("fake-hash-{DIMENSIONS}")}))
}

/// A deterministic unit vector from the text's FNV-1a hash.
fn fake_embedding(text: &str) -> Vec<f64> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut v = Vec::with_capacity(DIMENSIONS);
    for i in 0..DIMENSIONS {
        for b in text.bytes().chain([i as u8]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        v.push((h % 2000) as f64 / 1000.0 - 1.0);
    }
    let norm = v
        .iter()
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt()
        .max(f64::EPSILON);
    v.into_iter().map(|x| x / norm).collect()
}
