//! A refresh storm: 10,000 concurrent requests arrive just after the token expired.
//!
//! Group `refresh_storm`, on a 2-worker multi-thread tokio runtime, in-process (no sockets): the
//! inner service reads the body to its end and answers `200` at once; the token provider counts
//! its calls and answers after `tokio::time::sleep(1 ms)` (real time; tokio's timer rounds it up
//! to 1-2 ms).
//!
//! Each iteration builds a fresh layer, sends one request to fetch a first token that lives
//! 10 ms, sleeps past its expiry, and spawns 10,000 tasks that each hold a request and a clone
//! of the service and wait at a gate. Only what follows is timed, from a task on a worker
//! thread: opening the gate until the last of the 10,000 responses is joined. So one iteration
//! is one storm: a refresh, and 10,000 requests served with the new token.
//!
//! - `add_authorization`: the floor, tower-http's fixed header: no token to refresh, no
//!   provider. What a storm costs without any authentication logic: waking, serving and joining
//!   10,000 tasks.
//! - `auth_layer`: `tower_auth_refresh::AuthLayer` over `provider_fn`. The first request to
//!   find the token stale starts the one refresh; the others wait on the same shared future.
//! - `mutex`: the baseline, the hand-written fix of the `contention` bench
//!   (`MutexAuthLayer` in `benches/common/mod.rs`): the first request to find the token expired
//!   refreshes it while holding the `tokio::sync::Mutex`; the others queue on the lock, and then
//!   go through it one at a time.
//!
//! Provider calls are counted per storm, outside the timed region: the bench asserts that
//! `AuthLayer` called the provider exactly once in every storm, and prints the minimum and
//! maximum per storm for every variant (the baseline's are reported, not asserted).
//!
//! What limits it: the provider's 1-2 ms is part of every storm of `auth_layer` and `mutex`;
//! the rest is waking 10,000 tasks on 2 cores (the floor) and what each variant does per request
//! around the refresh. Setup (spawning the tasks, the 10 ms wait) is not timed but takes real
//! time, so a run takes longer than criterion's measurement time suggests.
//!
//! ```text
//! cargo bench --bench refresh_storm
//! ```
//!
//! About 30 seconds on 2 cores.

mod common;

use std::convert::Infallible;
use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion};
use criterion::{SamplingMode, Throughput};
use http::{Request, Response};
use http_body_util::Empty;
use tokio::runtime::Runtime;
use tokio::sync::{watch, Notify};
use tower::{Layer, Service};
use tower_auth_refresh::{provider_fn, AuthLayer, AuthService, Token};
use tower_http::auth::{AddAuthorization, AddAuthorizationLayer};

use common::{
    get_request, multi_thread_runtime, send, HandToken, MutexAuth, MutexAuthLayer, Ok200, SECRET,
};

/// Requests in one storm.
const STORM: usize = 10_000;
/// How long the provider takes to answer.
const PROVIDER_LATENCY: Duration = Duration::from_millis(1);
/// The lifetime of the first token of each iteration: long enough to outlive the provider's
/// answer (the cache refuses a token that arrives expired), short enough to wait out.
const FIRST_LIFETIME: Duration = Duration::from_millis(10);
/// The lifetime of every later token: the storm's refresh is the last one.
const LIFETIME: Duration = Duration::from_secs(3600);

/// A fresh service whose provider counts its calls into the returned counter.
type Setup<S> = fn() -> (S, Arc<AtomicU64>);

fn auth_layer_setup() -> (AuthService<Ok200>, Arc<AtomicU64>) {
    let calls = Arc::new(AtomicU64::new(0));
    let counter = calls.clone();
    let layer = AuthLayer::new(provider_fn(move || {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            tokio::time::sleep(PROVIDER_LATENCY).await;
            let lifetime = if n == 1 { FIRST_LIFETIME } else { LIFETIME };
            Ok::<_, Infallible>(Token::new(format!("{SECRET}-{n}")).with_expires_in(lifetime))
        }
    }));
    (layer.layer(Ok200), calls)
}

/// The floor: a fixed header, no token to refresh and no provider; what the storm costs
/// without any authentication logic (waking 10,000 tasks and serving them).
fn floor_setup() -> (AddAuthorization<Ok200>, Arc<AtomicU64>) {
    let layer = AddAuthorizationLayer::bearer(SECRET).as_sensitive(true);
    (layer.layer(Ok200), Arc::new(AtomicU64::new(0)))
}

fn mutex_setup() -> (MutexAuth<Ok200>, Arc<AtomicU64>) {
    let calls = Arc::new(AtomicU64::new(0));
    let counter = calls.clone();
    let layer = MutexAuthLayer::new(move || {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            tokio::time::sleep(PROVIDER_LATENCY).await;
            let lifetime = if n == 1 { FIRST_LIFETIME } else { LIFETIME };
            Ok(HandToken {
                secret: format!("{SECRET}-{n}"),
                expires_at: Some(Instant::now() + lifetime),
            })
        }
    });
    (layer.layer(Ok200), calls)
}

/// One storm on a fresh service; returns its duration and the provider calls it caused.
async fn storm<S>(setup: Setup<S>) -> (Duration, u64)
where
    S: Service<Request<Empty<Bytes>>, Response = Response<Empty<Bytes>>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Debug,
{
    let (service, calls) = setup();

    // The first token, then wait until it has expired.
    send(&mut service.clone(), get_request()).await;
    let primed = calls.load(Ordering::SeqCst);
    tokio::time::sleep(FIRST_LIFETIME + Duration::from_millis(2)).await;

    // Every request is built, and every task waits at the gate, before the clock starts.
    let (open, gate) = watch::channel(false);
    let arrived = Arc::new(AtomicUsize::new(0));
    let all_arrived = Arc::new(Notify::new());
    let handles: Vec<_> = (0..STORM)
        .map(|_| {
            let mut service = service.clone();
            let request = get_request();
            let mut gate = gate.clone();
            let arrived = arrived.clone();
            let all_arrived = all_arrived.clone();
            tokio::spawn(async move {
                if arrived.fetch_add(1, Ordering::SeqCst) + 1 == STORM {
                    all_arrived.notify_one();
                }
                gate.wait_for(|open| *open).await.expect("the gate stays");
                send(&mut service, request).await;
            })
        })
        .collect();
    all_arrived.notified().await;

    let start = Instant::now();
    open.send(true).expect("tasks hold the gate");
    for handle in handles {
        handle.await.expect("a request task panicked");
    }
    let elapsed = start.elapsed();

    (elapsed, calls.load(Ordering::SeqCst) - primed)
}

/// Measures storms of one variant; returns the provider calls of each storm.
fn bench_storm<S>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    runtime: &Runtime,
    name: &str,
    setup: Setup<S>,
) -> Vec<u64>
where
    S: Service<Request<Empty<Bytes>>, Response = Response<Empty<Bytes>>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Debug,
{
    let calls_per_storm = Arc::new(Mutex::new(Vec::new()));
    group.bench_function(name, |b| {
        b.to_async(runtime).iter_custom(|iters| {
            let calls_per_storm = calls_per_storm.clone();
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    // Driven from a task, as requests arriving at a server are: the gate opens
                    // and the responses are joined on a worker thread.
                    let (elapsed, calls) = tokio::spawn(storm(setup))
                        .await
                        .expect("the storm completes");
                    total += elapsed;
                    calls_per_storm.lock().expect("not poisoned").push(calls);
                }
                total
            }
        });
    });
    let calls = calls_per_storm.lock().expect("not poisoned").clone();
    let (min, max) = (calls.iter().min(), calls.iter().max());
    println!(
        "refresh_storm/{name}: {} storms of {STORM} requests; provider calls per storm: \
         min {}, max {} (not counting the first token each iteration fetches before its storm)",
        calls.len(),
        min.copied().unwrap_or_default(),
        max.copied().unwrap_or_default(),
    );
    calls
}

fn refresh_storm(c: &mut Criterion) {
    let runtime = multi_thread_runtime();

    let mut group = c.benchmark_group("refresh_storm");
    // An iteration takes milliseconds, and more than that in untimed setup.
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(20);
    group.throughput(Throughput::Elements(STORM as u64));

    bench_storm(&mut group, &runtime, "add_authorization", floor_setup);
    let auth_calls = bench_storm(&mut group, &runtime, "auth_layer", auth_layer_setup);
    // The baseline's calls are reported, not asserted.
    bench_storm(&mut group, &runtime, "mutex", mutex_setup);
    group.finish();

    assert!(
        auth_calls.iter().all(|&calls| calls == 1),
        "AuthLayer called the provider other than once in a storm: {auth_calls:?}"
    );
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = refresh_storm
}
criterion_main!(benches);
