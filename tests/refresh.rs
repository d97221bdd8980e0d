//! The refresh contract, against a real identity provider and API on loopback: single flight,
//! stale 401s, cancellation, failures with backoff and timeout, the advisory window.
//!
//! Tests run on tokio's paused clock with a [`support::manual_clock`]: time moves only when a
//! test says so, which makes every count below exact.

mod support;

use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use http::{Request, StatusCode};
use http_body_util::Empty;
use tokio::time::advance;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_auth_refresh::{AuthError, AuthLayer, AuthService, TokenCache};

use support::{
    body_string, client, http_provider, manual_clock, until, Api, IdentityProvider, IdpMode,
    TokenRegistry,
};

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    tower_auth_refresh::ReplayBody<Empty<Bytes>>,
>;

const HOUR: Duration = Duration::from_secs(3600);

struct World {
    idp: IdentityProvider,
    api: Api,
    registry: TokenRegistry,
}

async fn world(ttl: Option<Duration>) -> World {
    let registry = TokenRegistry::default();
    let idp = IdentityProvider::start(registry.clone(), ttl).await;
    let api = Api::start(registry.clone(), 0).await;
    World { idp, api, registry }
}

fn service(layer: &AuthLayer) -> AuthService<Client> {
    ServiceBuilder::new().layer(layer.clone()).service(client())
}

fn get(api: &Api, path: &str) -> Request<Empty<Bytes>> {
    Request::get(api.url(path)).body(Empty::new()).unwrap()
}

/// Send one GET; the body of a 200 is the token the API accepted.
async fn send(
    service: &AuthService<Client>,
    api: &Api,
) -> Result<(StatusCode, String), tower::BoxError> {
    let response = service.clone().oneshot(get(api, "/whoami")).await?;
    let status = response.status();
    Ok((status, body_string(response).await))
}

async fn burst(
    service: &AuthService<Client>,
    api: &Api,
    n: usize,
) -> Vec<Result<(StatusCode, String), tower::BoxError>> {
    join_all((0..n).map(|_| send(service, api))).await
}

fn auth_error(result: &Result<(StatusCode, String), tower::BoxError>) -> &AuthError {
    match result {
        Err(error) => error
            .downcast_ref::<AuthError>()
            .unwrap_or_else(|| panic!("not an AuthError: {error}")),
        Ok(answer) => panic!("expected an error, got {answer:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn thousand_requests_after_expiry_make_one_token_request() {
    let _clock = manual_clock();
    let w = world(Some(HOUR)).await;
    let layer = AuthLayer::new(http_provider(&w.idp));
    let service = service(&layer);

    assert_eq!(send(&service, &w.api).await.unwrap().1, "token-1");
    advance(HOUR).await;

    let results = burst(&service, &w.api, 1000).await;
    for result in &results {
        assert_eq!(
            result.as_ref().unwrap(),
            &(StatusCode::OK, "token-2".to_owned())
        );
    }
    assert_eq!(
        w.idp.token_requests(),
        2,
        "one for the first token, one for all 1,000"
    );
    assert_eq!(w.api.served(), 1001);
    assert_eq!(w.api.rejected(), 0, "an expired token is never sent");
}

#[tokio::test(start_paused = true)]
async fn thousand_requests_rejected_with_401_make_one_token_request() {
    let _clock = manual_clock();
    let w = world(Some(HOUR)).await;
    let layer = AuthLayer::new(http_provider(&w.idp));
    let service = service(&layer);
    send(&service, &w.api).await.unwrap();

    // The server forgets the token an hour early: the client cannot foresee it.
    w.registry.revoke_all();
    let results = burst(&service, &w.api, 1000).await;

    for result in &results {
        assert_eq!(
            result.as_ref().unwrap(),
            &(StatusCode::OK, "token-2".to_owned())
        );
    }
    assert_eq!(w.idp.token_requests(), 2);
    let stats = layer.cache().stats();
    let rejected = w.api.rejected() as u64;
    assert!((1..=1000).contains(&rejected), "{rejected}");
    // Every rejected request was replayed exactly once; nothing else was.
    assert_eq!(stats.replays, rejected);
    assert_eq!(w.api.requests(), 1 + 1000 + rejected as usize);
    // One 401 invalidated token-1; the others were stale and fetched nothing.
    assert_eq!(stats.invalidations, 1);
    assert_eq!(stats.stale_rejections, rejected - 1);
}

#[tokio::test(start_paused = true)]
async fn rejection_of_an_old_token_replays_with_the_current_one_without_fetching() {
    let _clock = manual_clock();
    let w = world(Some(HOUR)).await;
    let layer = AuthLayer::new(http_provider(&w.idp));
    let service = service(&layer);
    send(&service, &w.api).await.unwrap();

    // A slow request leaves with token-1; meanwhile token-1 is rejected and replaced.
    w.api.set_latency(Duration::from_secs(1));
    let slow = tokio::spawn({
        let service = service.clone();
        let request = get(&w.api, "/whoami");
        async move { service.oneshot(request).await }
    });
    until(|| w.api.requests() == 2).await;
    w.api.set_latency(Duration::ZERO);
    w.registry.revoke_all();
    assert_eq!(send(&service, &w.api).await.unwrap().1, "token-2");
    assert_eq!(w.idp.token_requests(), 2);

    // The slow request's 401 is for token-1, older than the current token-2.
    advance(Duration::from_secs(1)).await;
    let response = slow.await.unwrap().unwrap();
    assert_eq!(body_string(response).await, "token-2");
    assert_eq!(w.idp.token_requests(), 2, "a stale 401 fetches nothing");
    assert_eq!(layer.cache().stats().stale_rejections, 1);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_request_that_started_the_refresh_does_not_cancel_it() {
    let _clock = manual_clock();
    let w = world(Some(HOUR)).await;
    w.idp.set_latency(Duration::from_secs(5));
    let layer = AuthLayer::new(http_provider(&w.idp));
    let service = service(&layer);

    // The first request starts the refresh, and is dropped while it runs.
    let mut starter = Box::pin(send(&service, &w.api));
    assert!(futures::poll!(&mut starter).is_pending());
    let others: Vec<_> = (0..10)
        .map(|_| {
            let service = service.clone();
            let request = get(&w.api, "/whoami");
            tokio::spawn(async move { service.oneshot(request).await })
        })
        .collect();
    until(|| w.idp.token_requests() == 1).await;
    drop(starter);

    advance(Duration::from_secs(5)).await;
    for other in others {
        let response = other.await.unwrap().unwrap();
        assert_eq!(body_string(response).await, "token-1");
    }
    assert_eq!(w.idp.token_requests(), 1);
}

#[tokio::test(start_paused = true)]
async fn dropping_every_waiter_never_leaves_the_cache_stuck() {
    let _clock = manual_clock();
    let w = world(Some(HOUR)).await;
    w.idp.set_latency(Duration::from_secs(5));
    let layer = AuthLayer::new(http_provider(&w.idp));
    let service = service(&layer);

    let mut waiters: Vec<_> = (0..5).map(|_| Box::pin(send(&service, &w.api))).collect();
    for waiter in &mut waiters {
        assert!(futures::poll!(waiter).is_pending());
    }
    until(|| w.idp.token_requests() == 1).await;
    drop(waiters);

    // The refresh finishes on its own task; the next request uses its token.
    advance(Duration::from_secs(5)).await;
    assert_eq!(send(&service, &w.api).await.unwrap().1, "token-1");
    assert_eq!(w.idp.token_requests(), 1);
}

#[tokio::test(start_paused = true)]
async fn failing_provider_gives_typed_errors_backs_off_and_recovers() {
    let _clock = manual_clock();
    let w = world(Some(HOUR)).await;
    w.idp.set_mode(IdpMode::Fail);
    let layer = AuthLayer::new(http_provider(&w.idp));
    let service = service(&layer);

    // Everyone waiting on the failed refresh gets the provider's error.
    let results = burst(&service, &w.api, 20).await;
    for result in &results {
        let error = auth_error(result);
        assert!(matches!(error, AuthError::Refresh { .. }), "{error:?}");
        let source = std::error::Error::source(error).unwrap().to_string();
        assert!(source.contains("500"), "{source}");
    }
    assert_eq!(w.idp.token_requests(), 1);

    // During the backoff (1 s) nobody calls the provider.
    let result = send(&service, &w.api).await;
    assert!(matches!(auth_error(&result), AuthError::Backoff { .. }));
    assert_eq!(w.idp.token_requests(), 1);

    // After it, one more attempt; it fails too, and the backoff doubles to 2 s.
    advance(Duration::from_secs(1)).await;
    assert!(matches!(
        auth_error(&send(&service, &w.api).await),
        AuthError::Refresh { .. }
    ));
    assert_eq!(w.idp.token_requests(), 2);
    advance(Duration::from_secs(1)).await;
    assert!(matches!(
        auth_error(&send(&service, &w.api).await),
        AuthError::Backoff { .. }
    ));
    assert_eq!(w.idp.token_requests(), 2);

    // The identity provider is back: the next attempt recovers.
    w.idp.set_mode(IdpMode::Issue);
    advance(Duration::from_secs(1)).await;
    assert_eq!(send(&service, &w.api).await.unwrap().1, "token-3");
    assert_eq!(w.idp.token_requests(), 3);
    assert_eq!(w.api.requests(), 1, "no request was sent without a token");
}

#[tokio::test(start_paused = true)]
async fn hanging_provider_times_out_for_every_waiter() {
    let _clock = manual_clock();
    let w = world(Some(HOUR)).await;
    w.idp.set_mode(IdpMode::Hang);
    let layer = AuthLayer::builder(http_provider(&w.idp))
        .refresh_timeout(Duration::from_secs(10))
        .build();
    let service = service(&layer);

    let waiters: Vec<_> = (0..5)
        .map(|_| {
            let service = service.clone();
            let api = w.api.clone();
            tokio::spawn(async move { send(&service, &api).await })
        })
        .collect();
    until(|| w.idp.token_requests() == 1).await;
    advance(Duration::from_secs(10)).await;
    for waiter in waiters {
        let result = waiter.await.unwrap();
        assert!(
            matches!(auth_error(&result), AuthError::RefreshTimeout { timeout } if *timeout == Duration::from_secs(10))
        );
    }
    assert_eq!(w.idp.token_requests(), 1);
    assert_eq!(w.api.requests(), 0);

    // The hung call may run for one more timeout: no second call starts meanwhile (a
    // refresh-token grant must not race itself), and a request fails at once.
    w.idp.set_mode(IdpMode::Issue);
    advance(Duration::from_secs(1)).await;
    let result = send(&service, &w.api).await;
    assert!(matches!(
        auth_error(&result),
        AuthError::RefreshTimeout { .. }
    ));
    assert_eq!(w.idp.token_requests(), 1);

    // At 20 s it is cancelled; after the 1 s backoff the next request makes the second call.
    advance(Duration::from_secs(9)).await;
    until(|| layer.cache().stats().refresh_failures == 1).await;
    advance(Duration::from_secs(1)).await;
    assert_eq!(send(&service, &w.api).await.unwrap().1, "token-2");
    assert_eq!(w.idp.token_requests(), 2);
}

#[tokio::test(start_paused = true)]
async fn nonsense_from_the_provider_is_a_refresh_error() {
    let _clock = manual_clock();
    let w = world(Some(HOUR)).await;
    w.idp.set_mode(IdpMode::Garbage);
    let layer = AuthLayer::new(http_provider(&w.idp));
    let service = service(&layer);

    let result = send(&service, &w.api).await;
    let error = auth_error(&result);
    assert!(matches!(error, AuthError::Refresh { .. }));
    let source = std::error::Error::source(error).unwrap().to_string();
    assert!(source.contains("not JSON"), "{source}");
    assert_eq!(layer.cache().stats().refresh_failures, 1);

    w.idp.set_mode(IdpMode::Issue);
    advance(Duration::from_secs(1)).await;
    assert_eq!(send(&service, &w.api).await.unwrap().1, "token-2");
}

#[tokio::test(start_paused = true)]
async fn advisory_window_refreshes_once_in_the_background_and_nobody_waits() {
    let _clock = manual_clock();
    let w = world(Some(HOUR)).await;
    let layer = AuthLayer::new(http_provider(&w.idp));
    let service = service(&layer);
    send(&service, &w.api).await.unwrap();

    // Four minutes before expiry: inside the 5-minute advisory window, outside the 60 s skew.
    advance(HOUR - Duration::from_secs(240)).await;
    w.idp.set_latency(Duration::from_secs(10));
    // The clock does not move: a request that waited for the 10 s refresh could not finish.
    let results = burst(&service, &w.api, 200).await;
    for result in &results {
        assert_eq!(
            result.as_ref().unwrap(),
            &(StatusCode::OK, "token-1".to_owned())
        );
    }
    until(|| w.idp.token_requests() == 2).await;

    advance(Duration::from_secs(10)).await;
    background_token_lands(&layer, 2).await;
    assert_eq!(send(&service, &w.api).await.unwrap().1, "token-2");
    assert_eq!(w.idp.token_requests(), 2, "exactly one background refresh");
}

#[tokio::test(start_paused = true)]
async fn failed_background_refresh_keeps_the_valid_token_in_use() {
    let _clock = manual_clock();
    let w = world(Some(HOUR)).await;
    let layer = AuthLayer::new(http_provider(&w.idp));
    let service = service(&layer);
    send(&service, &w.api).await.unwrap();

    advance(HOUR - Duration::from_secs(240)).await;
    w.idp.set_mode(IdpMode::Fail);
    let results = burst(&service, &w.api, 100).await;
    assert!(results.iter().all(|r| r.as_ref().unwrap().1 == "token-1"));
    until(|| layer.cache().stats().refresh_failures == 1).await;

    // Still inside the backoff: the valid token is used and the provider is left alone.
    let results = burst(&service, &w.api, 100).await;
    assert!(results.iter().all(|r| r.as_ref().unwrap().1 == "token-1"));
    assert_eq!(w.idp.token_requests(), 2);
    assert_eq!(w.api.served(), 201);

    // After the backoff, the next background attempt succeeds.
    w.idp.set_mode(IdpMode::Issue);
    advance(Duration::from_secs(1)).await;
    assert_eq!(send(&service, &w.api).await.unwrap().1, "token-1");
    background_token_lands(&layer, 3).await;
    assert_eq!(send(&service, &w.api).await.unwrap().1, "token-3");
    assert_eq!(w.idp.token_requests(), 3);
}

/// Wait (without moving the clock) until the background refresh installed `token-{n}`.
async fn background_token_lands(layer: &AuthLayer, n: usize) {
    for _ in 0..100_000 {
        if let Ok(token) = layer.cache().token().await {
            if token.secret() == format!("token-{n}") {
                return;
            }
        }
        tokio::task::yield_now().await;
    }
    panic!("token-{n} never landed");
}

#[tokio::test(start_paused = true)]
async fn two_layers_over_one_cache_share_one_token() {
    let _clock = manual_clock();
    let w = world(Some(HOUR)).await;
    let cache = TokenCache::new(http_provider(&w.idp));
    let contacts = service(&AuthLayer::with_cache(cache.clone()));
    let reports = service(&AuthLayer::with_cache(cache.clone()));

    assert_eq!(send(&contacts, &w.api).await.unwrap().1, "token-1");
    assert_eq!(send(&reports, &w.api).await.unwrap().1, "token-1");
    w.registry.revoke_all();
    assert_eq!(send(&reports, &w.api).await.unwrap().1, "token-2");
    assert_eq!(send(&contacts, &w.api).await.unwrap().1, "token-2");
    assert_eq!(w.idp.token_requests(), 2);
    assert_eq!(cache.stats().replays, 1);
}

#[tokio::test(start_paused = true)]
async fn request_with_its_own_authorization_is_sent_as_it_is() {
    let _clock = manual_clock();
    let w = world(Some(HOUR)).await;
    let layer = AuthLayer::new(http_provider(&w.idp));
    let mut service = service(&layer);

    let mut request = get(&w.api, "/whoami");
    request
        .headers_mut()
        .insert("authorization", "Bearer chosen-by-caller".parse().unwrap());
    let response = service.ready().await.unwrap().call(request).await.unwrap();
    assert_eq!(
        response.status(),
        StatusCode::UNAUTHORIZED,
        "the caller's token is unknown"
    );
    assert_eq!(w.idp.token_requests(), 0, "no token fetched, no replay");
    assert_eq!(w.api.requests(), 1);
}

/// An endpoint that refuses every token (a wrong scope, a revoked grant, a misconfigured route)
/// is not an expiry. Once a token fetched because of a 401 is refused too, it is kept: a
/// rejection-driven refresh happens at most once per cooldown (5 s by default), and requests to
/// healthy endpoints never notice.
#[tokio::test(start_paused = true)]
async fn an_endpoint_that_refuses_every_token_costs_one_token_request_per_cooldown() {
    let _clock = manual_clock();
    let w = world(Some(HOUR)).await;
    let layer = AuthLayer::new(http_provider(&w.idp));
    let service = service(&layer);

    // 1,000 refused and 1,000 healthy requests, interleaved, over 100 s.
    for i in 0..1000 {
        let refused = service
            .clone()
            .oneshot(get(&w.api, "/always-401"))
            .await
            .unwrap();
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED, "request {i}");
        let (status, _) = send(&service, &w.api).await.unwrap();
        assert_eq!(status, StatusCode::OK, "healthy request {i}");
        advance(Duration::from_millis(100)).await;
    }

    // token-1, then one rejection-driven refresh at 0 s, 5 s, ..., 95 s: 20.
    assert_eq!(w.idp.token_requests(), 21);
    let stats = layer.cache().stats();
    assert_eq!(stats.invalidations, 20);
    assert_eq!(stats.replays, 20, "only a refresh earns a replay");
    assert_eq!(stats.repeated_rejections, 980);
    assert_eq!(w.api.served(), 1000, "every healthy request");
    assert_eq!(w.api.requests(), 2020);
}

/// A 1 h token at 55:00, the advisory window, whose background refresh was answered 429 with
/// `Retry-After: 600`: refreshing backs off until 65:00.
async fn throttled_in_the_advisory_window() -> (World, AuthLayer, AuthService<Client>) {
    let w = world(Some(HOUR)).await;
    let layer = AuthLayer::new(http_provider(&w.idp));
    let service = service(&layer);
    assert_eq!(send(&service, &w.api).await.unwrap().1, "token-1");
    advance(HOUR - Duration::from_secs(5 * 60)).await;
    w.idp.set_mode(IdpMode::Throttle(600));
    assert_eq!(send(&service, &w.api).await.unwrap().1, "token-1");
    until(|| layer.cache().stats().refresh_failures == 1).await;
    (w, layer, service)
}

/// Issue 11, item 7: a 1 h token whose background refresh is throttled for 10 minutes is still
/// sent until it expires, inside the skew buffer too; once expired it is never sent.
#[tokio::test(start_paused = true)]
async fn a_throttled_background_refresh_never_refuses_a_valid_token() {
    let _clock = manual_clock();
    let (w, layer, service) = throttled_in_the_advisory_window().await;

    // 59:30, inside the 60 s skew buffer, refreshing backs off until 65:00: token-1 is valid
    // for 30 s more, so it is sent.
    advance(Duration::from_secs(4 * 60 + 30)).await;
    for _ in 0..10 {
        assert_eq!(send(&service, &w.api).await.unwrap().1, "token-1");
    }
    assert_eq!(layer.cache().token().await.unwrap().secret(), "token-1");
    assert_eq!(w.idp.token_requests(), 2);

    // 60:00: token-1 has expired and the refresh still backs off: a typed error, nothing sent.
    advance(Duration::from_secs(30)).await;
    let reached = w.api.requests();
    let result = send(&service, &w.api).await;
    assert!(
        matches!(auth_error(&result), AuthError::Backoff { .. }),
        "{result:?}"
    );
    assert_eq!(w.api.requests(), reached, "an expired token is never sent");
    assert_eq!(w.registry.rejected_tokens(), 0);

    // 65:00: the backoff is over and the identity provider has recovered.
    advance(Duration::from_secs(5 * 60)).await;
    w.idp.set_mode(IdpMode::Issue);
    assert_eq!(send(&service, &w.api).await.unwrap().1, "token-3");
    assert_eq!(w.idp.token_requests(), 3);
}

/// Issue 11, item 7: a 401 while a failed background refresh backs off gets one immediate
/// refresh attempt, so a recovered identity provider is asked at once.
#[tokio::test(start_paused = true)]
async fn a_401_during_a_background_backoff_refreshes_at_once() {
    let _clock = manual_clock();
    let (w, layer, service) = throttled_in_the_advisory_window().await;

    // The identity provider recovers, and the API revokes token-1 (say an idle timeout).
    w.idp.set_mode(IdpMode::Issue);
    w.registry.revoke_all();
    assert_eq!(send(&service, &w.api).await.unwrap().1, "token-3");
    assert_eq!(w.idp.token_requests(), 3);
    assert_eq!(layer.cache().stats().replays, 1);
}

/// `error="insufficient_scope"` is not an expiry: a new token would lack the scope too, so
/// nothing is refreshed or replayed, and the 401 goes back unchanged (RFC 6750 section 3.1).
#[tokio::test(start_paused = true)]
async fn insufficient_scope_is_never_refreshed_nor_replayed() {
    let _clock = manual_clock();
    let w = world(Some(HOUR)).await;
    let layer = AuthLayer::new(http_provider(&w.idp));
    let service = service(&layer);
    for _ in 0..10 {
        let response = service
            .clone()
            .oneshot(get(&w.api, "/needs-scope"))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            response.headers()["www-authenticate"],
            r#"Bearer error="insufficient_scope", scope="admin""#
        );
    }
    assert_eq!(send(&service, &w.api).await.unwrap().1, "token-1");
    assert_eq!(w.idp.token_requests(), 1);
    let stats = layer.cache().stats();
    assert_eq!(
        (stats.insufficient_scope, stats.invalidations, stats.replays),
        (10, 0, 0)
    );
    assert_eq!(w.api.requests(), 11);
}
