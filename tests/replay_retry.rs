//! A retry layer *below* `AuthLayer` (`AuthLayer -> RetryLayer(RetryPolicy) -> client`) retries
//! through the auth layer's body wrapper: an empty body, a body the 401 replay is refused for,
//! and a request that brought its own credential must still be clonable. Real loopback servers.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use tower::retry::RetryLayer;
use tower::{ServiceBuilder, ServiceExt};
use tower_auth_refresh::retry::RetryPolicy;
use tower_auth_refresh::{predicate, AuthLayer, Origin};

use support::{
    body_string, client, http_provider, manual_clock, Api, IdentityProvider, TokenRegistry,
};

const HOUR: Duration = Duration::from_secs(3600);

/// An identity provider and an API whose next request gets a 429 with `Retry-After: 0`.
async fn world_throttling_once() -> (IdentityProvider, Api) {
    let registry = TokenRegistry::default();
    let idp = IdentityProvider::start(registry.clone(), Some(HOUR)).await;
    let api = Api::start(registry, 0).await;
    api.set_retry_after("0");
    api.throttle_next(1);
    (idp, api)
}

#[tokio::test(start_paused = true)]
async fn retry_inside_auth_retries_a_get_with_an_empty_body() {
    let _clock = manual_clock();
    let (idp, api) = world_throttling_once().await;
    let policy = RetryPolicy::new();
    let auth = AuthLayer::new(http_provider(&idp));
    let service = ServiceBuilder::new()
        .layer(auth.clone())
        .layer(RetryLayer::new(policy.clone()))
        .service(client::<Empty<Bytes>>());

    let request = Request::get(api.url("/whoami")).body(Empty::new()).unwrap();
    let response = service.oneshot(request).await.unwrap();

    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(body_string(response).await, "token-1");
    assert_eq!((api.throttled(), api.served()), (1, 1));
    assert_eq!((api.requests(), policy.retries()), (2, 1));
    assert_eq!(idp.token_requests(), 1);
    assert_eq!(auth.cache().stats().replays, 0);
}

#[tokio::test(start_paused = true)]
async fn retry_inside_auth_retries_a_get_with_an_empty_full_body() {
    let _clock = manual_clock();
    let (idp, api) = world_throttling_once().await;
    let policy = RetryPolicy::new();
    let service = ServiceBuilder::new()
        .layer(AuthLayer::new(http_provider(&idp)))
        .layer(RetryLayer::new(policy.clone()))
        .service(client::<Full<Bytes>>());

    let request = Request::get(api.url("/whoami"))
        .body(Full::default())
        .unwrap();
    let response = service.oneshot(request).await.unwrap();

    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!((api.throttled(), api.served()), (1, 1));
    assert_eq!((api.requests(), policy.retries()), (2, 1));
    assert_eq!(idp.token_requests(), 1);
}

#[tokio::test(start_paused = true)]
async fn retry_outside_auth_retries_a_get_with_an_empty_body() {
    let _clock = manual_clock();
    let (idp, api) = world_throttling_once().await;
    let policy = RetryPolicy::new();
    let service = ServiceBuilder::new()
        .layer(RetryLayer::new(policy.clone()))
        .layer(AuthLayer::new(http_provider(&idp)))
        .service(client::<Empty<Bytes>>());

    let request = Request::get(api.url("/whoami")).body(Empty::new()).unwrap();
    let response = service.oneshot(request).await.unwrap();

    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!((api.throttled(), api.served()), (1, 1));
    assert_eq!((api.requests(), policy.retries()), (2, 1));
    assert_eq!(idp.token_requests(), 1);
}

#[tokio::test(start_paused = true)]
async fn post_refused_by_replay_when_is_still_retried_below() {
    let _clock = manual_clock();
    let (idp, api) = world_throttling_once().await;
    let policy = RetryPolicy::builder().retry_any_method(true).build();
    let auth = AuthLayer::builder(http_provider(&idp))
        .replay_when(predicate::idempotent)
        .build();
    let service = ServiceBuilder::new()
        .layer(auth.clone())
        .layer(RetryLayer::new(policy.clone()))
        .service(client::<Full<Bytes>>());

    let body = Bytes::from(vec![42u8; 10 * 1024]);
    let request = Request::post(api.url("/echo"))
        .body(Full::new(body.clone()))
        .unwrap();
    let response = service.oneshot(request).await.unwrap();

    assert_eq!(response.status(), StatusCode::OK);
    let echoed = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(echoed, body, "the retry sent the same bytes");
    assert_eq!((api.throttled(), api.served()), (1, 1));
    assert_eq!((api.requests(), policy.retries()), (2, 1));
    assert_eq!(auth.cache().stats().replays, 0);
    assert_eq!(idp.token_requests(), 1);
}

/// The two requests the auth layer passes through untouched (their own `Authorization`, an
/// origin outside `allowed_origins`): an empty body is still clonable for the retry below.
#[tokio::test(start_paused = true)]
async fn passed_through_get_with_an_empty_body_is_retried_below() {
    let _clock = manual_clock();
    let (idp, api) = world_throttling_once().await;
    let own = AuthLayer::new(http_provider(&idp));
    let credential = format!("Bearer {}", own.cache().token().await.unwrap().secret());

    let elsewhere = Origin::parse("https://elsewhere.example").unwrap();
    let layers = [
        ("own Authorization", AuthLayer::new(http_provider(&idp))),
        (
            "origin not allowed",
            AuthLayer::builder(http_provider(&idp))
                .allowed_origins([elsewhere])
                .build(),
        ),
    ];
    for (i, (what, auth)) in layers.into_iter().enumerate() {
        api.throttle_next(1);
        let policy = RetryPolicy::new();
        let service = ServiceBuilder::new()
            .layer(auth.clone())
            .layer(RetryLayer::new(policy.clone()))
            .service(client::<Empty<Bytes>>());
        let request = Request::get(api.url("/whoami"))
            .header(header::AUTHORIZATION, &credential)
            .body(Empty::new())
            .unwrap();
        let response = service.oneshot(request).await.unwrap();

        assert_eq!(response.status(), StatusCode::OK, "{what}");
        assert_eq!(body_string(response).await, "token-1", "{what}");
        assert_eq!(api.throttled(), i + 1, "{what}");
        assert_eq!(
            api.requests(),
            2 * (i + 1),
            "{what}: one call and one retry"
        );
        assert_eq!(policy.retries(), 1, "{what}");
        assert_eq!(
            auth.cache().stats().token_requests,
            0,
            "{what}: passed through"
        );
    }
    assert_eq!(idp.token_requests(), 1, "only the test's own token");
}
