//! Stacks whose client body type is already fixed: the layer hands the inner service the body
//! type it accepts once the conversion is named (`inner_body`), with the 401 replay and the retry
//! policy working on either side. Real hyper-util clients against loopback servers.

mod support;

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::{Request, StatusCode};
use http_body::Frame;
use http_body_util::combinators::{BoxBody, UnsyncBoxBody};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::retry::RetryLayer;
use tower::{ServiceBuilder, ServiceExt};
use tower_auth_refresh::inner_body::{Boxed, InnerBodyLayer, UnsyncBoxed};
use tower_auth_refresh::retry::RetryPolicy;
use tower_auth_refresh::{AuthLayer, ReplayBody};

use support::{body_string, http_provider, manual_clock, Api, IdentityProvider, TokenRegistry};

const HOUR: Duration = Duration::from_secs(3600);

/// The application's client, its body type fixed.
fn boxed_client() -> Client<HttpConnector, BoxBody<Bytes, tower::BoxError>> {
    Client::builder(TokioExecutor::new()).build_http()
}

struct World {
    idp: IdentityProvider,
    api: Api,
    registry: TokenRegistry,
}

async fn world() -> World {
    let registry = TokenRegistry::default();
    let idp = IdentityProvider::start(registry.clone(), Some(HOUR)).await;
    let api = Api::start(registry.clone(), 0).await;
    World { idp, api, registry }
}

fn payload() -> Bytes {
    Bytes::from((0..10_240u32).map(|i| (i % 251) as u8).collect::<Vec<u8>>())
}

#[tokio::test(start_paused = true)]
async fn a_boxed_body_client_gets_its_401_replayed() {
    let _clock = manual_clock();
    let w = world().await;
    let auth = AuthLayer::builder(http_provider(&w.idp))
        .inner_body(Boxed)
        .build();
    let client = ServiceBuilder::new()
        .layer(auth.clone())
        .service(boxed_client());

    let warm = Request::get(w.api.url("/whoami"))
        .body(Full::<Bytes>::default())
        .unwrap();
    assert_eq!(
        body_string(client.clone().oneshot(warm).await.unwrap()).await,
        "token-1"
    );
    w.registry.revoke_all();
    let request = Request::post(w.api.url("/echo"))
        .body(Full::new(payload()))
        .unwrap();
    let response = client.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let echoed = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(echoed, payload(), "the replay sent the same bytes");
    assert_eq!(w.idp.token_requests(), 2);
    assert_eq!(w.api.requests(), 3);
    assert_eq!(auth.cache().stats().replays, 1);
}

#[tokio::test(start_paused = true)]
async fn a_stream_that_is_not_sync_goes_through_unsync_boxed() {
    let _clock = manual_clock();
    let w = world().await;
    let auth = AuthLayer::builder(http_provider(&w.idp))
        .inner_body(UnsyncBoxed)
        .build();
    let http: Client<HttpConnector, UnsyncBoxBody<Bytes, tower::BoxError>> =
        Client::builder(TokioExecutor::new()).build_http();
    let client = ServiceBuilder::new().layer(auth.clone()).service(http);

    let warm = Request::get(w.api.url("/whoami"))
        .body(Full::<Bytes>::default())
        .unwrap();
    client.clone().oneshot(warm).await.unwrap();
    w.registry.revoke_all();
    // A `Cell` makes the stream `!Sync`.
    let not_sync = std::cell::Cell::new(0u8);
    let chunks = payload()
        .chunks(2048)
        .map(|chunk| Ok::<_, std::io::Error>(Frame::data(Bytes::copy_from_slice(chunk))))
        .collect::<Vec<_>>();
    let stream = futures::stream::iter(chunks).inspect(move |_| not_sync.set(1));
    let request = Request::post(w.api.url("/echo"))
        .body(StreamBody::new(stream))
        .unwrap();
    let response = client.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let echoed = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(echoed, payload());
    assert_eq!(
        (w.idp.token_requests(), auth.cache().stats().replays),
        (2, 1)
    );
}

#[tokio::test(start_paused = true)]
async fn a_closure_names_a_conversion_of_ones_own() {
    let _clock = manual_clock();
    let w = world().await;
    let auth = AuthLayer::builder(http_provider(&w.idp))
        .inner_body(|body: ReplayBody<Full<Bytes>>| body.boxed())
        .build();
    let client = ServiceBuilder::new().layer(auth).service(boxed_client());
    let request = Request::get(w.api.url("/whoami"))
        .body(Full::default())
        .unwrap();
    let response = client.oneshot(request).await.unwrap();
    assert_eq!(body_string(response).await, "token-1");
}

/// A PUT the API throttles once: retried once, the body byte-identical, one token request.
async fn put_throttled_once<S>(client: S, w: &World, policy: &RetryPolicy)
where
    S: tower::Service<Request<Full<Bytes>>, Response = http::Response<hyper::body::Incoming>>,
    S::Error: std::fmt::Debug,
{
    let request = Request::put(w.api.url("/echo"))
        .body(Full::new(payload()))
        .unwrap();
    let response = client.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.into_body().collect().await.unwrap().to_bytes(),
        payload()
    );
    assert_eq!((w.api.requests(), policy.retries()), (2, 1));
    assert_eq!(w.idp.token_requests(), 1);
}

#[tokio::test(start_paused = true)]
async fn retry_outside_a_boxed_auth_layer_retries() {
    let _clock = manual_clock();
    let w = world().await;
    w.api.set_retry_after("0");
    w.api.throttle_next(1);
    let policy = RetryPolicy::new();
    let client = ServiceBuilder::new()
        .layer(RetryLayer::new(policy.clone()))
        .layer(
            AuthLayer::builder(http_provider(&w.idp))
                .inner_body(Boxed)
                .build(),
        )
        .service(boxed_client());
    put_throttled_once(client, &w, &policy).await;
}

#[tokio::test(start_paused = true)]
async fn retry_inside_the_auth_layer_converts_below_the_retry() {
    let _clock = manual_clock();
    let w = world().await;
    w.api.set_retry_after("0");
    w.api.throttle_next(1);
    let policy = RetryPolicy::new();
    let client = ServiceBuilder::new()
        .layer(AuthLayer::new(http_provider(&w.idp)))
        .layer(RetryLayer::new(policy.clone()))
        .layer(InnerBodyLayer::new(Boxed))
        .service(boxed_client());
    put_throttled_once(client, &w, &policy).await;
}
