//! What `AuthLayer` costs on the hot path: a request while the cached token is fresh.
//!
//! Group `hot_path`, on a current-thread tokio runtime, one request per iteration through an
//! in-process inner service (no I/O) that reads the request body to its end, as a real client
//! does, and answers `200` at once:
//!
//! - `{get,post_1k}/bare`: the inner service alone; the floor.
//! - `{get,post_1k}/add_authorization`: tower-http's `AddAuthorizationLayer::bearer`, marked
//!   sensitive: the baseline, a fixed header value and nothing else.
//! - `{get,post_1k}/floor`: the least any layer that can replay a request must do
//!   (`FloorLayer<ClonedParts>` in `benches/common/mod.rs`): insert a prebuilt sensitive
//!   `Authorization` value and keep `http::request::Parts` clones of the head (method, URI,
//!   version, headers, extensions) until the response future completes. No token cache, no
//!   body wrapper, no replay.
//! - `{get,post_1k}/floor_head`: the same floor keeping the head as the crate's one-allocation
//!   `RequestHead` (`src/head.rs`) instead of `Parts` clones.
//! - `{get,post_1k}/auth_layer`: `tower_auth_refresh::AuthLayer` over a `StaticToken` that
//!   lives an hour, cache warmed before measuring, so every request reads the cached token and
//!   prepares a possible replay (for `post_1k`, the 1 KiB body is kept as it streams: a
//!   reference count, not a copy).
//! - `{get,post_1k}/auth_layer_no_replay`: the same with `replay_when(|_| false)`: no copy of
//!   the head, to compare with `add_authorization`.
//! - `{get,post_1k}/keyed_3`: `tower_auth_refresh::KeyedAuthLayer` holding three keys (one per
//!   API host, keyed by a `&'static str` so the key costs no allocation), every request for one
//!   of them: `auth_layer` plus the key function, the lock-free lookup and the clock read that
//!   marks the key used.
//!
//! The ratios to compare, within one run: `auth_layer / floor` (what the layer costs beyond
//! what replaying requires), `auth_layer_no_replay / add_authorization`, and
//! `keyed_3 / auth_layer` (what choosing the token per request adds).
//!
//! Group `contention`, on a 2-worker multi-thread runtime: 1, 2, 8 or 64 tasks share 16,384 GET
//! requests per iteration, each task sending through its own clone of one service, so they all
//! read the same token cache; `add_authorization` is the baseline. Reported as requests/second.
//!
//! Run it with:
//!
//! ```text
//! cargo bench --bench hot_path
//! ```
//!
//! About two minutes on 2 cores; `cargo bench --bench hot_path -- --quick` gives rough figures in
//! a few seconds.

use std::fmt::Debug;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion};
use criterion::{SamplingMode, Throughput};
use http::{header, HeaderValue, Method, Request, Response};
use http_body::Body;
use http_body_util::{Empty, Full};
use tokio::runtime::Runtime;
use tower::{Layer, Service};
use tower_auth_refresh::{AuthLayer, KeyedAuthLayer, StaticToken, Token};
use tower_http::auth::AddAuthorizationLayer;

mod common;

use common::head::RequestHead;
use common::{
    bench_contended, get_request, multi_thread_runtime, request, send, ClonedParts, FloorLayer,
    Ok200, CONTENDED_REQUESTS, SECRET, TASK_COUNTS,
};

const POST_BODY_LEN: usize = 1024;
/// A POST of `body` (1 KiB). Cloning `body` is a reference count, as for a caller that hands
/// the same buffer to the client.
fn post_request(body: &Bytes) -> Request<Full<Bytes>> {
    let mut request = request(Method::POST, Full::new(body.clone()));
    request.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    request
}

fn auth_layer() -> AuthLayer {
    AuthLayer::new(StaticToken::new(
        Token::new(SECRET).with_expires_in(Duration::from_secs(3600)),
    ))
}

/// The hosts of [`keyed_layer`]'s three keys; `URI`'s host is the first.
const KEYED_HOSTS: [&str; 3] = [
    "api.example.com",
    "reports.example.com",
    "billing.example.com",
];

/// A layer with one cache per API host, each over a `StaticToken` that lives an hour.
fn keyed_layer() -> KeyedAuthLayer<&'static str> {
    KeyedAuthLayer::new(
        |parts: &http::request::Parts| {
            let host = parts.uri.host()?;
            KEYED_HOSTS.into_iter().find(|known| *known == host)
        },
        |_: &&'static str| {
            StaticToken::new(Token::new(SECRET).with_expires_in(Duration::from_secs(3600)))
        },
    )
}

fn add_authorization() -> AddAuthorizationLayer {
    AddAuthorizationLayer::bearer(SECRET).as_sensitive(true)
}

fn current_thread_runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Measures one variant. The service is built once by the caller; each sample clones it once,
/// outside the timed region, then drives every request through `&mut` to that clone. That is
/// how a task holding a client uses it, and it is identical for every variant: a clone
/// per request would add a different constant to each (an `Arc` increment for `AuthService`,
/// a `HeaderValue` clone for `AddAuthorization`, nothing for `Ok200`) that is not the cost of
/// adding a token. Clones per task are what the `contention` group measures.
fn bench_variant<S, B>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    runtime: &Runtime,
    id: &str,
    service: &S,
    make_request: &dyn Fn() -> Request<B>,
) where
    S: Service<Request<B>, Response = Response<Empty<Bytes>>> + Clone,
    S::Error: Debug,
{
    group.bench_function(id, |b| {
        b.to_async(runtime).iter_custom(|iters| {
            let mut service = service.clone();
            async move {
                let start = Instant::now();
                for _ in 0..iters {
                    send(&mut service, make_request()).await;
                }
                start.elapsed()
            }
        });
    });
}

/// The variants for one kind of request, in one group so the ratios compare runs made under
/// the same conditions.
fn bench_kind<B>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    runtime: &Runtime,
    kind: &str,
    make_request: &dyn Fn() -> Request<B>,
) where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<tower::BoxError>,
{
    let bare = Ok200;
    let baseline = add_authorization().layer(Ok200);
    let floor = FloorLayer::<ClonedParts>::bearer(SECRET).layer(Ok200);
    let floor_head = FloorLayer::<RequestHead>::bearer(SECRET).layer(Ok200);
    let layer = auth_layer();
    let auth = layer.layer(Ok200);
    let no_replay_layer = AuthLayer::builder(StaticToken::new(
        Token::new(SECRET).with_expires_in(Duration::from_secs(3600)),
    ))
    .replay_when(|_| false)
    .build();
    let no_replay = no_replay_layer.layer(Ok200);
    let keyed_layer = keyed_layer();
    let keyed = keyed_layer.layer(Ok200);

    // Warm the caches: the first request fetches the token; none of the measured ones may.
    runtime.block_on(send(&mut auth.clone(), make_request()));
    runtime.block_on(send(&mut no_replay.clone(), make_request()));
    assert_eq!(layer.cache().stats().token_requests, 1);
    assert_eq!(no_replay_layer.cache().stats().token_requests, 1);
    for host in KEYED_HOSTS {
        let mut request = make_request();
        *request.uri_mut() = format!("http://{host}/v1/items").parse().expect("a URI");
        runtime.block_on(send(&mut keyed.clone(), request));
    }
    assert_eq!(keyed_layer.stats().keys, 3);

    bench_variant(group, runtime, &format!("{kind}/bare"), &bare, make_request);
    bench_variant(
        group,
        runtime,
        &format!("{kind}/add_authorization"),
        &baseline,
        make_request,
    );
    bench_variant(
        group,
        runtime,
        &format!("{kind}/floor"),
        &floor,
        make_request,
    );
    bench_variant(
        group,
        runtime,
        &format!("{kind}/floor_head"),
        &floor_head,
        make_request,
    );
    bench_variant(
        group,
        runtime,
        &format!("{kind}/auth_layer"),
        &auth,
        make_request,
    );
    bench_variant(
        group,
        runtime,
        &format!("{kind}/auth_layer_no_replay"),
        &no_replay,
        make_request,
    );

    bench_variant(
        group,
        runtime,
        &format!("{kind}/keyed_3"),
        &keyed,
        make_request,
    );

    assert_eq!(
        keyed_layer.stats().created,
        3,
        "a key was dropped and built again"
    );
    let keyed_caches = keyed_layer.caches().into_iter().map(|(_, cache)| cache);
    for cache in [layer.cache().clone(), no_replay_layer.cache().clone()]
        .into_iter()
        .chain(keyed_caches)
    {
        let stats = cache.stats();
        assert_eq!(
            (stats.token_requests, stats.replays),
            (1, 0),
            "a refresh or a replay happened inside the measured loop"
        );
    }
}

fn hot_path(c: &mut Criterion) {
    let runtime = current_thread_runtime();
    let mut group = c.benchmark_group("hot_path");

    bench_kind(&mut group, &runtime, "get", &get_request);

    let body = Bytes::from(vec![b'x'; POST_BODY_LEN]);
    // The first clone of a `Vec`-backed `Bytes` makes it shared; every later one is a reference
    // count. Do it here so the first measured request is not the odd one out.
    drop(body.clone());
    bench_kind(&mut group, &runtime, "post_1k", &|| post_request(&body));

    group.finish();
}

fn contention(c: &mut Criterion) {
    let runtime = multi_thread_runtime();

    let baseline = add_authorization().layer(Ok200);
    let layer = auth_layer();
    let auth = layer.layer(Ok200);
    runtime.block_on(send(&mut auth.clone(), get_request()));

    let mut group = c.benchmark_group("contention");
    // An iteration takes milliseconds: flat sampling keeps 30 samples within the time budget.
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(30);
    group.throughput(Throughput::Elements(CONTENDED_REQUESTS));
    for tasks in TASK_COUNTS {
        bench_contended(&mut group, &runtime, "add_authorization", tasks, &baseline);
        bench_contended(&mut group, &runtime, "auth_layer", tasks, &auth);
    }
    group.finish();

    let stats = layer.cache().stats();
    assert_eq!(
        (stats.token_requests, stats.replays),
        (1, 0),
        "a refresh or a replay happened inside the measured loop"
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
    targets = hot_path, contention
}
criterion_main!(benches);
