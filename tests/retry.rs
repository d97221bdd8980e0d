//! `RetryPolicy` with `AuthLayer` on real loopback servers: in either order, honouring
//! `Retry-After`, replaying bodies through the auth layer's recording, and keeping a job under an
//! API's published limits so it never sees a 429.

mod support;

use std::time::{Duration, Instant as StdInstant};

use bytes::Bytes;
use futures::future::join_all;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use tokio::time::advance;
use tower::retry::RetryLayer;
use tower::{ServiceBuilder, ServiceExt};
use tower_auth_refresh::retry::RetryPolicy;
use tower_auth_refresh::AuthLayer;

use support::{
    body_string, client, http_provider, manual_clock, until, Api, IdentityProvider, TokenRegistry,
};

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
