//! Soak: many requests from many tasks over short-lived tokens, on real loopback servers.
//!
//! Ignored by default; `.ci/run` runs it small (`SOAK_REQUESTS=4000`). The full size is
//! `SOAK_REQUESTS=100000 cargo test --release --test soak -- --ignored`.
//!
//! Tokens expire on the server after `TTL` without the client being told, so every expiry is
//! met through a 401. Whatever the timing, each expired token is replaced exactly once: the
//! identity provider issues one token more than the API saw expire.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Empty;
use tower::{ServiceBuilder, ServiceExt};
use tower_auth_refresh::AuthLayer;

use support::{client, http_provider, Api, IdentityProvider, TokenRegistry};

const TASKS: usize = 64;
const TTL: Duration = Duration::from_millis(100);

/// Resident memory in bytes, from /proc (Linux).
fn resident_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak test: run with --ignored (CI runs it with SOAK_REQUESTS=4000)"]
async fn many_tasks_over_short_lived_tokens_lose_nothing() {
    let total: usize = std::env::var("SOAK_REQUESTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100_000);
    let registry = TokenRegistry::default();
    let idp = IdentityProvider::start(registry.clone(), Some(TTL)).await;
    idp.announce_expiry(false);
    let api = Api::start(registry.clone(), 0).await;
    let auth = AuthLayer::new(http_provider(&idp));
    let service = ServiceBuilder::new()
        .layer(auth.clone())
        .service(client::<Empty<Bytes>>());

    let sent = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));
    let mut memory = Vec::new();
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let (service, api) = (service.clone(), api.clone());
            let (sent, failures) = (sent.clone(), failures.clone());
            tokio::spawn(async move {
                while sent.fetch_add(1, Ordering::Relaxed) < total {
                    let request = Request::get(api.url("/whoami")).body(Empty::new()).unwrap();
                    match service.clone().oneshot(request).await {
                        Ok(response) if response.status() == StatusCode::OK => {}
                        _ => {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    while !tasks.iter().all(|task| task.is_finished()) {
        memory.push(resident_bytes());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for task in tasks {
        task.await.unwrap();
    }

    let stats = auth.cache().stats();
    assert_eq!(failures.load(Ordering::Relaxed), 0);
    assert_eq!(api.served(), total);
    assert!(registry.rejected_tokens() >= 1, "the run crossed an expiry");
    assert_eq!(
        idp.token_requests(),
        registry.rejected_tokens() + 1,
        "one token per expiry, plus the first"
    );
    assert_eq!(stats.token_requests as usize, idp.token_requests());
    assert_eq!(stats.replays as usize, api.rejected());
    // Flat memory: the second half of the run holds no more than the first half's peak plus
    // a margin for allocator noise.
    if memory.len() >= 4 {
        let half = memory.len() / 2;
        let first_peak = memory[..half].iter().max().copied().unwrap_or(0);
        let second_peak = memory[half..].iter().max().copied().unwrap_or(0);
        assert!(
            second_peak <= first_peak + 16 * 1024 * 1024,
            "memory grew from {first_peak} to {second_peak} bytes"
        );
    }
}
