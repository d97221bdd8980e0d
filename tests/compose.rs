//! `AuthLayer` in a real stack: tower's retry, concurrency-limit, rate-limit and timeout layers
//! and tower-http's `TraceLayer`, over hyper-util's client and a real API on loopback.
//!
//! The order these tests use, outermost first, is the one DESIGN.md recommends:
//! `Trace -> Timeout -> Retry (429) -> AuthLayer (401 replay) -> limits -> client`. Retry sits
//! outside so every attempt takes the current token; the 401 replay stays inside the auth layer;
//! limits sit inside so replays count against them; the timeout bounds refresh plus replay.

mod support;

use std::future::{ready, Ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::join_all;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tower::retry::{Policy, RetryLayer};
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tower_auth_refresh::AuthLayer;
use tower_http::trace::{DefaultMakeSpan, TraceLayer};

use support::{body_string, client, http_provider, Api, IdentityProvider, IdpMode, TokenRegistry};

const HOUR: Duration = Duration::from_secs(3600);

/// Retries 429 up to `attempts` times, at once: enough to show where retry sits in the stack.
#[derive(Clone)]
struct RetryThrottled {
    attempts: usize,
}

impl<B: Clone, R> Policy<Request<B>, Response<R>, BoxError> for RetryThrottled {
    type Future = Ready<()>;

    fn retry(
        &mut self,
        _request: &mut Request<B>,
        result: &mut Result<Response<R>, BoxError>,
    ) -> Option<Self::Future> {
        match result {
            Ok(response)
                if response.status() == StatusCode::TOO_MANY_REQUESTS && self.attempts > 0 =>
            {
                self.attempts -= 1;
                Some(ready(()))
            }
            _ => None,
        }
    }

    fn clone_request(&mut self, request: &Request<B>) -> Option<Request<B>> {
        let mut clone = Request::new(request.body().clone());
        *clone.method_mut() = request.method().clone();
        *clone.uri_mut() = request.uri().clone();
        *clone.headers_mut() = request.headers().clone();
        Some(clone)
    }
}

async fn world() -> (IdentityProvider, Api, TokenRegistry) {
    let registry = TokenRegistry::default();
    let idp = IdentityProvider::start(registry.clone(), Some(HOUR)).await;
    let api = Api::start(registry.clone(), 0).await;
    (idp, api, registry)
}

fn get(api: &Api) -> Request<Full<Bytes>> {
    Request::get(api.url("/whoami"))
        .body(Full::default())
        .unwrap()
}

#[tokio::test]
async fn limits_hold_on_replays_retries_wrap_them_and_no_token_is_traced() {
    let (captured, _trace) = support::capture_traces();

    let (idp, api, registry) = world().await;
    let auth = AuthLayer::new(http_provider(&idp));
    let traced_headers = DefaultMakeSpan::new().include_headers(true);
    let service = ServiceBuilder::new()
        .layer(TraceLayer::new_for_http().make_span_with(traced_headers.clone()))
        .timeout(Duration::from_secs(60))
        .layer(RetryLayer::new(RetryThrottled { attempts: 3 }))
        .layer(auth.clone())
        // Below the auth layer the request carries the token: the trace must not show it.
        .layer(TraceLayer::new_for_http().make_span_with(traced_headers))
        .concurrency_limit(4)
        .service(client());

    // Warm up, then the server forgets the token and throttles five requests.
    let warm = service.clone().oneshot(get(&api)).await.unwrap();
    assert_eq!(body_string(warm).await, "token-1");
    registry.revoke_all();
    api.set_latency(Duration::from_millis(20));
    api.throttle_next(5);

    let results = join_all((0..40).map(|_| service.clone().oneshot(get(&api)))).await;
    for result in results {
        let response = result.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body_string(response).await, "token-2");
    }

    let stats = auth.cache().stats();
    assert_eq!(idp.token_requests(), 2);
    assert_eq!(api.throttled(), 5);
    assert_eq!(stats.replays as usize, api.rejected());
    assert_eq!(api.served(), 1 + 40);
    assert_eq!(
        api.requests(),
        1 + 40 + api.rejected() + 5,
        "first attempts, one replay per 401, one retry per 429"
    );
    // Replays and retries went through the concurrency limit like everything else.
    assert!(api.max_in_flight() <= 4, "{}", api.max_in_flight());
    assert!(
        api.max_in_flight() > 1,
        "the test did run requests concurrently"
    );

    let trace = captured.text();
    assert!(
        trace.contains("authorization"),
        "headers were traced:\n{trace}"
    );
    assert!(
        trace.contains("Sensitive"),
        "the value was redacted:\n{trace}"
    );
    for secret in ["token-1", "token-2", "s3cr3t"] {
        assert!(
            !trace.contains(secret),
            "{secret} leaked into the trace:\n{trace}"
        );
    }
}

#[tokio::test]
async fn rate_limit_below_the_auth_layer_holds_on_replays() {
    let (idp, api, registry) = world().await;
    let auth = AuthLayer::new(http_provider(&idp));
    // `RateLimit` is not `Clone`; `Buffer` makes it shareable, as tower recommends.
    let service = ServiceBuilder::new()
        .layer(auth.clone())
        .buffer(1024)
        .rate_limit(5, Duration::from_millis(100))
        .service(client());
    let warm = service.clone().oneshot(get(&api)).await.unwrap();
    assert_eq!(warm.status(), StatusCode::OK);
    registry.revoke_all();

    let started = Instant::now();
    let results = join_all((0..20).map(|_| service.clone().oneshot(get(&api)))).await;
    let elapsed = started.elapsed();
    assert!(results
        .into_iter()
        .all(|r| r.unwrap().status() == StatusCode::OK));

    // Every request the API saw after the warm-up, replays included, took a rate-limit slot.
    let sent = api.requests() - 1;
    assert_eq!(sent, 20 + api.rejected());
    assert!(api.rejected() >= 1);
    let windows = (sent - 1) / 5;
    assert!(
        elapsed >= Duration::from_millis(100) * windows as u32,
        "{sent} requests in {elapsed:?} break 5 per 100 ms"
    );
}

#[tokio::test]
async fn timeout_outside_the_auth_layer_bounds_a_hanging_refresh() {
    let (idp, api, _registry) = world().await;
    idp.set_mode(IdpMode::Hang);
    let service = ServiceBuilder::new()
        .timeout(Duration::from_millis(300))
        .layer(AuthLayer::new(http_provider(&idp)))
        .service(client());

    let error = service.oneshot(get(&api)).await.unwrap_err();
    assert!(
        error.is::<tower::timeout::error::Elapsed>(),
        "the caller gets the timeout, not a hang: {error}"
    );
    assert_eq!(idp.token_requests(), 1);
    assert_eq!(api.requests(), 0);
}
