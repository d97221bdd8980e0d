//! `RetryPolicy` with `AuthLayer` on real loopback servers: in either order, honouring
//! `Retry-After`, replaying bodies through the auth layer's recording, and keeping a job under an
//! API's published limits so it never sees a 429. Each request has its own `max_elapsed` clock
//! and its own jitter, even behind a `Buffer`; a retry budget bounds the load on an API that
//! fails everything; the auth layer's own errors are retried only when waiting can help.

mod support;
#[allow(dead_code)]
mod token_server;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use bytes::Bytes;
use futures::future::join_all;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::task::{yield_now, JoinHandle};
use tokio::time::{advance, Instant};
use tower::buffer::Buffer;
use tower::retry::budget::TpsBudget;
use tower::retry::RetryLayer;
use tower::util::BoxCloneService;
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tower_auth_refresh::oauth2::{self, ClientCredentials};
use tower_auth_refresh::retry::RetryPolicy;
use tower_auth_refresh::{AuthError, AuthLayer, ErrorCode};

use support::{
    body_string, client, http_provider, manual_clock, until, Api, IdentityProvider, TokenRegistry,
};
use token_server::{Fault, TokenServer, BASIC_ID, BASIC_SECRET};

const HOUR: Duration = Duration::from_secs(3600);

async fn world() -> (IdentityProvider, Api, TokenRegistry) {
    let registry = TokenRegistry::default();
    let idp = IdentityProvider::start(registry.clone(), Some(HOUR)).await;
    let api = Api::start(registry.clone(), 0).await;
    (idp, api, registry)
}

fn payload(len: usize) -> Bytes {
    (0..len)
        .map(|i| (i * 7 % 253) as u8)
        .collect::<Vec<_>>()
        .into()
}

#[tokio::test(start_paused = true)]
async fn retry_outside_auth_waits_what_retry_after_says() {
    let _clock = manual_clock();
    let (idp, api, _) = world().await;
    let policy = RetryPolicy::new();
    let service = ServiceBuilder::new()
        .layer(RetryLayer::new(policy.clone()))
        .layer(AuthLayer::new(http_provider(&idp)))
        .service(client::<Empty<Bytes>>());

    api.set_retry_after("2");
    api.throttle_next(2);
    let request = Request::get(api.url("/whoami")).body(Empty::new()).unwrap();
    let pending = tokio::spawn(service.oneshot(request));

    // The policy decided to wait once it read the 429.
    until(|| policy.retries() == 1).await;
    advance(Duration::from_millis(1999)).await;
    for _ in 0..1000 {
        tokio::task::yield_now().await;
    }
    assert_eq!(api.requests(), 1, "no retry before Retry-After elapsed");
    advance(Duration::from_millis(1)).await;
    until(|| policy.retries() == 2).await;
    assert_eq!(api.throttled(), 2);
    advance(Duration::from_secs(2)).await;

    let response = pending.await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(body_string(response).await, "token-1");
    assert_eq!((api.requests(), policy.retries()), (3, 2));
    assert_eq!(idp.token_requests(), 1);
}

#[tokio::test(start_paused = true)]
async fn retry_inside_auth_shares_the_recorded_body_with_the_401_replay() {
    let _clock = manual_clock();
    let (idp, api, registry) = world().await;
    let policy = RetryPolicy::builder().retry_any_method(true).build();
    let auth = AuthLayer::new(http_provider(&idp));
    let service = ServiceBuilder::new()
        .layer(auth.clone())
        .layer(RetryLayer::new(policy.clone()))
        .service(client::<Full<Bytes>>());
    let warm = Request::get(api.url("/whoami"))
        .body(Full::default())
        .unwrap();
    service.clone().oneshot(warm).await.unwrap();

    // The POST meets a 401 (its token was revoked) and then a 429 on the replay.
    registry.revoke_all();
    api.set_retry_after("0");
    let body = payload(10 * 1024);
    let request = Request::post(api.url("/echo"))
        .body(Full::new(body.clone()))
        .unwrap();
    let pending = tokio::spawn(service.clone().oneshot(request));
    until(|| api.rejected() == 1).await;
    api.throttle_next(1);
    let response = pending.await.unwrap().unwrap();

    assert_eq!(response.status(), StatusCode::OK);
    let echoed = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(echoed, body, "the third attempt sent the same bytes");
    assert_eq!((api.rejected(), api.throttled(), api.served()), (1, 1, 2));
    assert_eq!(api.requests(), 1 + 3);
    assert_eq!((auth.cache().stats().replays, policy.retries()), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_longer_than_accepted_is_handed_back_at_once() {
    let _clock = manual_clock();
    let (idp, api, _) = world().await;
    let policy = RetryPolicy::new();
    let service = ServiceBuilder::new()
        .layer(RetryLayer::new(policy.clone()))
        .layer(AuthLayer::new(http_provider(&idp)))
        .service(client::<Empty<Bytes>>());

    // A daily quota: come back in six hours.
    api.set_retry_after("21600");
    api.throttle_next(1);
    let request = Request::get(api.url("/whoami")).body(Empty::new()).unwrap();
    let response = service.oneshot(request).await.unwrap();

    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "21600");
    assert_eq!(api.requests(), 1);
    assert_eq!((policy.retries(), policy.given_back()), (0, 1));
}

#[tokio::test(start_paused = true)]
async fn non_idempotent_requests_are_not_retried_unless_allowed() {
    let _clock = manual_clock();
    let (idp, api, _) = world().await;
    let policy = RetryPolicy::new();
    let service = ServiceBuilder::new()
        .layer(RetryLayer::new(policy.clone()))
        .layer(AuthLayer::new(http_provider(&idp)))
        .service(client::<Full<Bytes>>());
    api.set_retry_after("0");
    api.throttle_next(1);
    let request = Request::post(api.url("/echo"))
        .body(Full::new(payload(100)))
        .unwrap();
    let response = service.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!((api.requests(), policy.retries()), (1, 0));
}

#[tokio::test]
async fn rate_and_concurrency_limits_keep_a_job_under_published_limits() {
    let (idp, api, _) = world().await;
    // The API publishes "10 requests per 100 ms, 4 at a time" and enforces it with 429s.
    api.enforce_rate(10, Duration::from_millis(100));
    api.enforce_concurrency(4);
    api.set_latency(Duration::from_millis(5));
    let policy = RetryPolicy::new();
    let service = ServiceBuilder::new()
        .layer(RetryLayer::new(policy.clone()))
        .layer(AuthLayer::new(http_provider(&idp)))
        .buffer(256)
        // A margin on the window absorbs loopback jitter between client and server clocks.
        .rate_limit(10, Duration::from_millis(150))
        .concurrency_limit(4)
        .service(client::<Empty<Bytes>>());

    let started = StdInstant::now();
    let requests = (0..60).map(|_| {
        let request = Request::get(api.url("/whoami")).body(Empty::new()).unwrap();
        service.clone().oneshot(request)
    });
    let results = join_all(requests).await;
    let elapsed = started.elapsed();

    assert!(results
        .iter()
        .all(|r| r.as_ref().unwrap().status() == StatusCode::OK));
    assert_eq!(api.throttled(), 0, "the job never saw a 429");
    assert_eq!(policy.retries(), 0);
    assert_eq!(api.requests(), 60);
    assert!(api.max_in_flight() <= 4);
    assert!(elapsed >= Duration::from_millis(5 * 150), "{elapsed:?}");
}

/// Where the retry layer sits relative to the auth layer.
#[derive(Clone, Copy, Debug)]
enum Order {
    RetryOutsideAuth,
    RetryInsideAuth,
}

type Stack = BoxCloneService<Request<Full<Bytes>>, Response<Incoming>, BoxError>;

/// `policy` and `auth` in `order` over a real client, and the number of requests that client
/// was asked to send (counted as they go in, below both layers).
fn stack(order: Order, policy: &RetryPolicy, auth: &AuthLayer) -> (Stack, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let http = ServiceBuilder::new()
        .map_request(move |request| {
            counted.fetch_add(1, Ordering::SeqCst);
            request
        })
        .service(client::<Full<Bytes>>());
    let retry = RetryLayer::new(policy.clone());
    let service = match order {
        Order::RetryOutsideAuth => BoxCloneService::new(
            ServiceBuilder::new()
                .layer(retry)
                .layer(auth.clone())
                .service(http),
        ),
        Order::RetryInsideAuth => BoxCloneService::new(
            ServiceBuilder::new()
                .layer(auth.clone())
                .layer(retry)
                .service(http),
        ),
    };
    (service, calls)
}

/// An idempotent request with a body, so that either order can send it again.
fn put(api: &Api, body: &'static str) -> Request<Full<Bytes>> {
    Request::put(api.url("/echo"))
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

async fn max_elapsed_counts_from_each_requests_first_attempt(order: Order) {
    let _clock = manual_clock();
    let (idp, api, _) = world().await;
    let policy = RetryPolicy::builder()
        .max_elapsed(Duration::from_secs(10))
        .build();
    let auth = AuthLayer::new(http_provider(&idp));
    // tower's usual way to share a service: one retry service behind a buffer takes every
    // request.
    let service = Buffer::new(stack(order, &policy, &auth).0, 16);
    let first = service.clone().oneshot(put(&api, "first")).await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);

    // A minute later (six times max_elapsed after the first request), a throttled request.
    advance(Duration::from_secs(60)).await;
    api.set_retry_after("1");
    api.throttle_next(1);
    let pending = tokio::spawn(service.clone().oneshot(put(&api, "second")));
    until(|| policy.retries() == 1 || pending.is_finished()).await;
    assert_eq!(
        policy.retries(),
        1,
        "{order:?}: the throttled request was not retried"
    );
    advance(Duration::from_secs(1)).await;

    let response = pending.await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(body_string(response).await, "second");
    assert_eq!((api.requests(), api.throttled(), api.served()), (3, 1, 2));
    assert_eq!(idp.token_requests(), 1);
}

#[tokio::test(start_paused = true)]
async fn max_elapsed_is_per_request_behind_a_buffer_with_retry_outside_auth() {
    max_elapsed_counts_from_each_requests_first_attempt(Order::RetryOutsideAuth).await;
}

#[tokio::test(start_paused = true)]
async fn max_elapsed_is_per_request_behind_a_buffer_with_retry_inside_auth() {
    max_elapsed_counts_from_each_requests_first_attempt(Order::RetryInsideAuth).await;
}

async fn throttled_together_come_back_apart(order: Order) {
    let _clock = manual_clock();
    let (idp, api, _) = world().await;
    // Full jitter over the first retry's ceiling: each request waits random(0 ..= 60 s).
    let ceiling = Duration::from_secs(60);
    let policy = RetryPolicy::builder()
        .max_retries(1)
        .backoff(ceiling, ceiling)
        .build();
    let auth = AuthLayer::new(http_provider(&idp));
    let (service, calls) = stack(order, &policy, &auth);
    let warm = service.clone().oneshot(put(&api, "warm")).await.unwrap();
    assert_eq!(warm.status(), StatusCode::OK);

    // 8 requests at once, all throttled without Retry-After.
    api.set_retry_after("");
    api.throttle_next(8);
    let pending: Vec<_> = (0..8)
        .map(|_| tokio::spawn(service.clone().oneshot(put(&api, "page"))))
        .collect();
    until(|| policy.retries() == 8).await;
    let throttled_at = Instant::now();
    assert_eq!((api.requests(), api.throttled()), (1 + 8, 8));

    // Move the clock 10 ms at a time; before the next step, every retry that came due has
    // reached the server, so the server's clock reads the step it was sent in.
    let step = Duration::from_millis(10);
    while Instant::now() < throttled_at + ceiling {
        advance(step).await;
        for _ in 0..3 {
            yield_now().await;
        }
        until(|| api.requests() == calls.load(Ordering::SeqCst)).await;
    }
    for pending in pending {
        assert_eq!(pending.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    assert_eq!((api.requests(), policy.retries()), (1 + 8 + 8, 8));

    let retried_at = api.arrivals()[1 + 8..].to_vec();
    for at in &retried_at {
        assert!(
            *at >= throttled_at && *at <= throttled_at + ceiling,
            "{order:?}: a retry {:?} after the 429, beyond the ceiling {ceiling:?}",
            at.saturating_duration_since(throttled_at)
        );
    }
    let mut instants = retried_at.clone();
    instants.sort();
    instants.dedup();
    // Independent draws over 6000 steps: two of the eight share one about once in 200 runs,
    // three or more practically never. Shared jitter sent all eight in the same step.
    assert!(
        instants.len() >= 7,
        "{order:?}: the 8 retries arrived at only {} distinct instants: {:?}",
        instants.len(),
        retried_at
            .iter()
            .map(|at| at.saturating_duration_since(throttled_at))
            .collect::<Vec<_>>()
    );
}

#[tokio::test(start_paused = true)]
async fn full_jitter_differs_per_request_with_retry_outside_auth() {
    throttled_together_come_back_apart(Order::RetryOutsideAuth).await;
}

#[tokio::test(start_paused = true)]
async fn full_jitter_differs_per_request_with_retry_inside_auth() {
    throttled_together_come_back_apart(Order::RetryInsideAuth).await;
}

#[tokio::test(start_paused = true)]
async fn a_retry_budget_bounds_the_load_of_an_api_that_fails_everything() {
    let _clock = manual_clock();
    let (idp, api, _) = world().await;
    // A reserve of 10 retries (1 per second over 10 s) and one retry per 5 requests.
    let policy = RetryPolicy::builder()
        .backoff(Duration::ZERO, Duration::ZERO)
        .retry_budget(TpsBudget::new(Duration::from_secs(10), 1, 0.2))
        .build();
    let auth = AuthLayer::new(http_provider(&idp));
    let (service, calls) = stack(Order::RetryOutsideAuth, &policy, &auth);
    api.set_throttle_status(StatusCode::SERVICE_UNAVAILABLE);
    api.set_retry_after("");
    api.throttle_every(1);

    let requests = (0..20).map(|_| service.clone().oneshot(put(&api, "page")));
    let responses = join_all(requests).await;

    assert!(responses
        .iter()
        .all(|r| r.as_ref().unwrap().status() == StatusCode::SERVICE_UNAVAILABLE));
    // 10 + 20 / 5 retries; the attempt cap alone would have allowed 20 * 3.
    assert_eq!(policy.retries(), 14);
    assert_eq!((api.requests(), api.throttled()), (20 + 14, 20 + 14));
    assert_eq!(calls.load(Ordering::SeqCst), 34);
    assert_eq!(idp.token_requests(), 1);
}

fn http_transport() -> oauth2::HttpTransport {
    oauth2::transport(Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>())
}

/// Await `pending`, moving the clock `step` at a time whenever it waits on a timer.
async fn finish<T: Send + 'static>(pending: JoinHandle<T>, step: Duration) -> T {
    for _ in 0..10_000 {
        for _ in 0..100 {
            if pending.is_finished() {
                return pending.await.unwrap();
            }
            yield_now().await;
        }
        advance(step).await;
    }
    panic!("the request never finished");
}

#[tokio::test(start_paused = true)]
async fn a_client_the_token_endpoint_refuses_is_not_retried() {
    let _clock = manual_clock();
    let server = TokenServer::start().await;
    let provider = ClientCredentials::builder(server.token_url(), BASIC_ID, "wrong-secret")
        .transport(http_transport())
        .build()
        .unwrap();
    let policy = RetryPolicy::builder().retry_errors(true).build();
    let service = ServiceBuilder::new()
        .layer(RetryLayer::new(policy.clone()))
        .layer(AuthLayer::new(provider))
        .service(client::<Empty<Bytes>>());

    let request = Request::get(server.url("/api")).body(Empty::new()).unwrap();
    let pending = tokio::spawn(service.oneshot(request));
    let error = finish(pending, Duration::from_millis(50))
        .await
        .unwrap_err();

    assert!(
        matches!(error.downcast_ref::<AuthError>(),
            Some(AuthError::TokenEndpoint(refused)) if refused.code == ErrorCode::InvalidClient),
        "{error:?}"
    );
    assert_eq!(
        policy.retries(),
        0,
        "invalid_client is not worth waiting for"
    );
    assert_eq!(server.token_requests(), 1);
    assert_eq!(server.api_requests(), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_throttled_token_endpoint_is_waited_for_as_long_as_it_asks() {
    let _clock = manual_clock();
    let server = TokenServer::start().await;
    server.push_fault(Fault::TooManyRequests {
        retry_after_secs: 2,
    });
    let provider = ClientCredentials::builder(server.token_url(), BASIC_ID, BASIC_SECRET)
        .transport(http_transport())
        .build()
        .unwrap();
    let policy = RetryPolicy::builder().retry_errors(true).build();
    let service = ServiceBuilder::new()
        .layer(RetryLayer::new(policy.clone()))
        .layer(AuthLayer::new(provider))
        .service(client::<Empty<Bytes>>());

    let request = Request::get(server.url("/api")).body(Empty::new()).unwrap();
    let pending = tokio::spawn(service.oneshot(request));
    until(|| policy.retries() == 1 || pending.is_finished()).await;
    assert_eq!((policy.retries(), server.token_requests()), (1, 1));

    // Nothing more before the 2 s the token endpoint asked for...
    advance(Duration::from_millis(1999)).await;
    for _ in 0..1000 {
        yield_now().await;
    }
    assert_eq!((policy.retries(), server.token_requests()), (1, 1));
    assert!(!pending.is_finished());
    // ... and then one retry, one token request, one API request.
    advance(Duration::from_millis(1)).await;
    until(|| pending.is_finished()).await;
    let response = pending.await.unwrap().unwrap();

    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!((policy.retries(), server.token_requests()), (1, 2));
    assert_eq!(server.api_requests(), (1, 0));
}
