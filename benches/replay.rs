//! The cost of the 401 path: a POST rejected once, a new token, the request sent again.
//!
//! Group `replay`, on a current-thread tokio runtime, in-process (no sockets), for POST bodies
//! (`Full<Bytes>`) of 0 B, 1 KiB and 64 KiB (64 KiB is `AuthLayer`'s default replay cap, still
//! replayed). The inner service reads the request body to its end, as hyper does when it sends
//! one, then answers `200` if the request carries the token the API currently accepts and `401`
//! otherwise. The token provider is in-process and instant: each call issues `token-<n>` and
//! makes the API accept it from then on.
//!
//! Every iteration first revokes the current token at the API (one atomic store), so each
//! request takes the whole 401 path:
//!
//! - `auth_layer/<size>`: through `tower_auth_refresh::AuthLayer`: the first attempt streams the
//!   body while keeping it (as `Bytes` references) and gets `401`; the layer invalidates the
//!   token, one refresh runs (on its own task, as always), and the request is replayed with the
//!   new token and gets `200`.
//! - `by_hand/<size>`: the baseline, the same done by hand around the bare inner service: build
//!   the request with the current header, call, get `401`, ask the same provider for a token,
//!   build the header (`format!`, sensitive), build the request again (the body is a `Bytes`
//!   clone, a reference count) and call again. This is the least work that resends a request;
//!   it keeps no cache, no single flight and no generation check.
//!
//! Both variants yield to the runtime every 32 requests and at the end of each sample, so that
//! the refresh tasks `AuthLayer` spawns (one per refresh) run inside the timed region rather than
//! after it.
//!
//! What limits it: nothing but CPU; the figures are the whole cost of each variant's 401 path,
//! small next to the network round trip a real 401 costs.
//!
//! ```text
//! cargo bench --bench replay
//! ```
//!
//! About a minute.

use std::convert::Infallible;
use std::fmt::Debug;
use std::future::Future;
use std::hint::black_box;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion};
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body::Body;
use http_body_util::{Empty, Full};
use tokio::runtime::Runtime;
use tower::{Layer, Service, ServiceExt};
use tower_auth_refresh::{provider_fn, AuthLayer, Token, TokenProvider};

const URI: &str = "http://api.example.com/v1/items";
const SIZES: [(&str, usize); 3] = [("0B", 0), ("1KiB", 1024), ("64KiB", 64 * 1024)];
const TOKEN_PREFIX: &[u8] = b"Bearer token-";
/// Both variants yield to the runtime every this many requests (and once at the end of each
/// sample), so that the refresh tasks `AuthLayer` spawns run inside the timed region (fewer than
/// the 61 tasks tokio runs between two polls of the main future). Not every
/// request: a yield on an idle current-thread runtime polls the I/O driver, a syscall that would
/// add the same ~1 µs to both variants.
const YIELD_EVERY: u64 = 32;

/// The API: accepts one token at a time, `token-<accepted>`; `0` accepts none.
#[derive(Clone, Default)]
struct Api {
    accepted: Arc<AtomicU64>,
}

impl Api {
    /// The identity provider issued `token-<n>`: accept it, and no other.
    fn accept(&self, n: u64) {
        self.accepted.store(n, Ordering::Relaxed);
    }

    /// Server-side expiry the client cannot foresee: accept no token until the next is issued.
    fn revoke(&self) {
        self.accepted.store(0, Ordering::Relaxed);
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let generation = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.as_bytes().strip_prefix(TOKEN_PREFIX))
            .and_then(|digits| std::str::from_utf8(digits).ok())
            .and_then(|digits| digits.parse::<u64>().ok());
        generation.is_some_and(|n| n != 0 && n == self.accepted.load(Ordering::Relaxed))
    }
}

impl<B: Body + Unpin> Service<Request<B>> for Api {
    type Response = Response<Empty<Bytes>>;
    type Error = Infallible;
    type Future = Answer<B>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let status = if self.authorized(request.headers()) {
            StatusCode::OK
        } else {
            StatusCode::UNAUTHORIZED
        };
        Answer {
            body: request.into_body(),
            status,
        }
    }
}

/// Reads the request body to its end, then answers `status`.
struct Answer<B> {
    body: B,
    status: StatusCode,
}

impl<B: Body + Unpin> Future for Answer<B> {
    type Output = Result<Response<Empty<Bytes>>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        while !self.body.is_end_stream() {
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Ready(Some(frame)) => drop(black_box(frame)),
                Poll::Ready(None) => break,
                Poll::Pending => return Poll::Pending,
            }
        }
        let mut response = Response::new(Empty::new());
        *response.status_mut() = self.status;
        Poll::Ready(Ok(response))
    }
}

/// An instant in-process identity provider: issues `token-<n>` and makes `api` accept it.
fn provider(api: &Api) -> impl TokenProvider {
    let api = api.clone();
    let issued = AtomicU64::new(0);
    provider_fn(move || {
        let n = issued.fetch_add(1, Ordering::Relaxed) + 1;
        api.accept(n);
        async move {
            Ok::<_, Infallible>(
                Token::new(format!("token-{n}")).with_expires_in(Duration::from_secs(3600)),
            )
        }
    })
}

/// A POST of `body`, as an API client sends it; cloning `body` is a reference count.
fn post_request(body: &Bytes) -> Request<Full<Bytes>> {
    let mut request = Request::new(Full::new(body.clone()));
    *request.method_mut() = Method::POST;
    *request.uri_mut() = Uri::from_static(URI);
    let headers = request.headers_mut();
    headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::USER_AGENT, HeaderValue::from_static("bench/1.0"));
    request
}

/// One request, for every variant: wait until ready, call, await the response.
async fn send<S, B>(service: &mut S, request: Request<B>) -> Response<Empty<Bytes>>
where
    S: Service<Request<B>, Response = Response<Empty<Bytes>>>,
    S::Error: Debug,
{
    service
        .ready()
        .await
        .expect("always ready")
        .call(request)
        .await
        .expect("the inner service never fails, and the replay gets a token")
}

/// The header the baseline builds from a new token, as the cache does: `Bearer <secret>`,
/// sensitive.
fn bearer(token: &Token) -> HeaderValue {
    let mut value =
        HeaderValue::from_str(&format!("Bearer {}", token.secret())).expect("a valid token");
    value.set_sensitive(true);
    value
}

/// `AuthLayer`: revoke, send once, the layer does the rest.
fn bench_auth_layer(
    group: &mut BenchmarkGroup<'_, WallTime>,
    runtime: &Runtime,
    size: &str,
    body: &Bytes,
) {
    let api = Api::default();
    let layer = AuthLayer::new(provider(&api));
    let service = layer.layer(api.clone());
    let sent = Arc::new(AtomicU64::new(0));

    // The first token: fetched before any 401, no replay.
    let mut first = service.clone();
    let response = runtime.block_on(send(&mut first, post_request(body)));
    assert_eq!(response.status(), StatusCode::OK);

    group.bench_with_input(BenchmarkId::new("auth_layer", size), body, |b, body| {
        b.to_async(runtime).iter_custom(|iters| {
            let mut service = service.clone();
            let api = api.clone();
            let sent = sent.clone();
            async move {
                let start = Instant::now();
                for i in 0..iters {
                    api.revoke();
                    let response = send(&mut service, post_request(body)).await;
                    assert_eq!(response.status(), StatusCode::OK);
                    black_box(response);
                    if i % YIELD_EVERY == YIELD_EVERY - 1 {
                        tokio::task::yield_now().await;
                    }
                }
                tokio::task::yield_now().await;
                let elapsed = start.elapsed();
                sent.fetch_add(iters, Ordering::Relaxed);
                elapsed
            }
        });
    });

    // Every measured request took the whole 401 path, once.
    let sent = sent.load(Ordering::Relaxed);
    let stats = layer.cache().stats();
    assert_eq!(
        (stats.token_requests, stats.invalidations, stats.replays),
        (1 + sent, sent, sent),
        "every measured request: one 401, one refresh, one replay"
    );
}

/// The baseline: revoke, send, see the 401, get a token, build the request again, send again.
fn bench_by_hand(
    group: &mut BenchmarkGroup<'_, WallTime>,
    runtime: &Runtime,
    size: &str,
    body: &Bytes,
) {
    let api = Api::default();
    let idp = Arc::new(provider(&api));
    let first = runtime.block_on(idp.fetch_token()).expect("first token");
    let header = bearer(&first);

    group.bench_with_input(BenchmarkId::new("by_hand", size), body, |b, body| {
        b.to_async(runtime).iter_custom(|iters| {
            let mut api = api.clone();
            let idp = idp.clone();
            let mut header = header.clone();
            async move {
                let start = Instant::now();
                for i in 0..iters {
                    api.revoke();
                    let mut request = post_request(body);
                    request
                        .headers_mut()
                        .insert(header::AUTHORIZATION, header.clone());
                    let mut response = send(&mut api, request).await;
                    if response.status() == StatusCode::UNAUTHORIZED {
                        drop(response);
                        let token = idp.fetch_token().await.expect("a token");
                        header = bearer(&token);
                        let mut request = post_request(body);
                        request
                            .headers_mut()
                            .insert(header::AUTHORIZATION, header.clone());
                        response = send(&mut api, request).await;
                    }
                    assert_eq!(response.status(), StatusCode::OK);
                    black_box(response);
                    if i % YIELD_EVERY == YIELD_EVERY - 1 {
                        tokio::task::yield_now().await;
                    }
                }
                tokio::task::yield_now().await;
                start.elapsed()
            }
        });
    });
}

fn replay(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");

    let mut group = c.benchmark_group("replay");
    for (label, len) in SIZES {
        let body = Bytes::from(vec![b'x'; len]);
        // The first clone of a `Vec`-backed `Bytes` makes it shared; every later one is a
        // reference count. Do it here so the first measured request is not the odd one out.
        drop(body.clone());
        bench_auth_layer(&mut group, &runtime, label, &body);
        bench_by_hand(&mut group, &runtime, label, &body);
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
}

criterion_group! {
    name = benches;
    config = config();
    targets = replay
}
criterion_main!(benches);
