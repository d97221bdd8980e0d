//! A paginated batch that outlives its tokens, the job this crate exists for.
//!
//! `cargo run --example batch` starts an identity provider and a paginated API on loopback
//! (the same real hyper servers the tests use), whose tokens live one second. It then fetches
//! every page through `AuthLayer` over a hyper-util client, with a few workers in parallel, while
//! tokens expire several times and the API once forgets its tokens early (a 401 the client could
//! not foresee). At the end it prints what it did: records, pages, time, token requests, 401
//! replays, failures.
//!
//! Options, as environment variables: `RECORDS` (default 40000), `PAGE_SIZE` (50), `WORKERS` (4),
//! `TOKEN_TTL_MS` (1000).

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tower_auth_refresh::AuthLayer;

use support::{client, http_provider, Api, IdentityProvider, TokenRegistry};

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let records = setting("RECORDS", 40_000);
    let page_size = setting("PAGE_SIZE", 50).max(1);
    let workers = setting("WORKERS", 4).max(1);
    let ttl = Duration::from_millis(setting("TOKEN_TTL_MS", 1000) as u64);

    let registry = TokenRegistry::default();
    let idp = IdentityProvider::start(registry.clone(), Some(ttl)).await;
    let api = Api::start(registry.clone(), records).await;
    // Each page takes a few milliseconds to serve, so the batch outlives several tokens.
    api.set_latency(Duration::from_millis(20));
    println!(
        "identity provider: {} (tokens live {ttl:?})",
        idp.token_url()
    );
    println!("api:               {}", api.url("/contacts"));

    let auth = AuthLayer::new(http_provider(&idp));
    let service = ServiceBuilder::new()
        .timeout(Duration::from_secs(30))
        .layer(auth.clone())
        .service(client::<Empty<Bytes>>());

    let pages = records.div_ceil(page_size);
    let next_page = Arc::new(AtomicUsize::new(0));
    let fetched = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();

    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (service, api, registry) = (service.clone(), api.clone(), registry.clone());
        let (next_page, fetched, failures) = (next_page.clone(), fetched.clone(), failures.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let page = next_page.fetch_add(1, Ordering::Relaxed);
                if page >= pages {
                    break;
                }
                if page == pages / 2 {
                    // Halfway through, the API forgets every token: the next requests meet 401s.
                    registry.revoke_all();
                }
                let url = api.url(&format!("/contacts?page={page}&size={page_size}"));
                let request = Request::get(url).body(Empty::new())?;
                match service.clone().oneshot(request).await {
                    Ok(response) if response.status() == StatusCode::OK => {
                        let body = response.into_body().collect().await?.to_bytes();
                        let lines = body.split(|b| *b == b'\n').filter(|l| !l.is_empty());
                        fetched.fetch_add(lines.count(), Ordering::Relaxed);
                    }
                    Ok(response) => {
                        eprintln!("page {page}: {}", response.status());
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(error) => {
                        eprintln!("page {page}: {error}");
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if page > 0 && page % (pages / 10).max(1) == 0 {
                    println!(
                        "  {:>3}% {page}/{pages} pages, {:.1}s",
                        page * 100 / pages,
                        started.elapsed().as_secs_f64()
                    );
                }
            }
            Ok::<_, BoxError>(())
        }));
    }
    for task in tasks {
        task.await??;
    }

    let elapsed = started.elapsed();
    let stats = auth.cache().stats();
    let failures = failures.load(Ordering::Relaxed);
    println!(
        "fetched {} of {records} records in {pages} pages in {:.2}s ({:.0} pages/s)",
        fetched.load(Ordering::Relaxed),
        elapsed.as_secs_f64(),
        pages as f64 / elapsed.as_secs_f64()
    );
    println!(
        "token requests: {} (identity provider saw {}), 401 replays: {}, stale 401s absorbed: {}, failures: {failures}",
        stats.token_requests,
        idp.token_requests(),
        stats.replays,
        stats.stale_rejections,
    );
    if failures > 0 {
        return Err(format!("{failures} pages failed").into());
    }
    Ok(())
}
