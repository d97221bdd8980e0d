//! Throughput under contention: `AuthLayer` against the hand-written fix most projects write, a
//! token behind a `tokio::sync::Mutex`.
//!
//! Group `contention_mutex`, the setup of `hot_path`'s `contention` group: a 2-worker
//! multi-thread tokio runtime; 1, 2, 8 or 64 tasks share 16,384 GET requests per iteration, each
//! task sending through its own clone of one service, to an in-process inner service (no I/O)
//! that answers `200` at once. Spawning and joining the tasks is timed too, the same for every
//! variant. Reported as requests/second (`Throughput::Elements`).
//!
//! - `add_authorization/<tasks>`: tower-http's `AddAuthorizationLayer::bearer`, a fixed
//!   header value cloned per request; the floor, it never refreshes anything.
//! - `mutex/<tasks>`: the baseline, `MutexAuthLayer` in `benches/common/mod.rs`: an
//!   `Arc<tokio::sync::Mutex<..>>` holding the token and its expiry, locked on every request
//!   (check the expiry, refresh under the lock if needed, `format!` the header), with a boxed
//!   response future.
//! - `auth_layer/<tasks>`: `tower_auth_refresh::AuthLayer` over a `StaticToken` that lives an
//!   hour, cache warmed before measuring: a lock-free read of the cached header per request. It
//!   also prepares a possible replay per request (a copy of the request's parts), which the
//!   mutex baseline does not offer.
//!
//! Both token-keeping variants hold a token that expires in an hour and is fetched once before
//! measuring; the bench asserts that neither refreshed inside the measured loop.
//!
//! What limits it: 2 cores for up to 64 tasks, so the figures measure per-request cost plus how
//! each variant behaves when tasks contend for the same cache line or lock, not parallel speedup.
//! The inner service does nothing, so the differences are the whole cost of each variant; next to
//! real I/O (see `end_to_end`) they shrink to a small fraction.
//!
//! ```text
//! cargo bench --bench contention
//! ```
//!
//! About 1.5 minutes on 2 cores; add `-- --quick` for rough figures in seconds.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use criterion::{SamplingMode, Throughput};
use tower::Layer;
use tower_auth_refresh::{AuthLayer, StaticToken, Token};
use tower_http::auth::AddAuthorizationLayer;

use common::{
    bench_contended, get_request, multi_thread_runtime, send, HandToken, MutexAuthLayer, Ok200,
    CONTENDED_REQUESTS, SECRET, TASK_COUNTS,
};

const LIFETIME: Duration = Duration::from_secs(3600);

fn contention_mutex(c: &mut Criterion) {
    let runtime = multi_thread_runtime();

    let floor = AddAuthorizationLayer::bearer(SECRET)
        .as_sensitive(true)
        .layer(Ok200);

    let layer = AuthLayer::new(StaticToken::new(
        Token::new(SECRET).with_expires_in(LIFETIME),
    ));
    let auth = layer.layer(Ok200);

    let hand_fetches = Arc::new(AtomicU64::new(0));
    let counter = hand_fetches.clone();
    let hand = MutexAuthLayer::new(move || {
        counter.fetch_add(1, Ordering::Relaxed);
        async move {
            Ok(HandToken {
                secret: SECRET.to_owned(),
                expires_at: Some(std::time::Instant::now() + LIFETIME),
            })
        }
    })
    .layer(Ok200);

    // Fetch both tokens before measuring: none of the measured requests may.
    runtime.block_on(async {
        send(&mut auth.clone(), get_request()).await;
        send(&mut hand.clone(), get_request()).await;
    });

    let mut group = c.benchmark_group("contention_mutex");
    // An iteration takes milliseconds: flat sampling keeps 30 samples within the time budget.
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(30);
    group.throughput(Throughput::Elements(CONTENDED_REQUESTS));
    for tasks in TASK_COUNTS {
        bench_contended(&mut group, &runtime, "add_authorization", tasks, &floor);
        bench_contended(&mut group, &runtime, "mutex", tasks, &hand);
        bench_contended(&mut group, &runtime, "auth_layer", tasks, &auth);
    }
    group.finish();

    let stats = layer.cache().stats();
    assert_eq!(
        (stats.token_requests, stats.replays),
        (1, 0),
        "AuthLayer refreshed or replayed inside the measured loop"
    );
    assert_eq!(
        hand_fetches.load(Ordering::Relaxed),
        1,
        "the mutex baseline refreshed inside the measured loop"
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
    targets = contention_mutex
}
criterion_main!(benches);
