//! Replaying after a 401, against a real API on loopback: bodies come back byte-identical, a body
//! over the cap or still streaming is not replayed, and a request is replayed at most once.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, StatusCode};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use tower::{ServiceBuilder, ServiceExt};
use tower_auth_refresh::{predicate, AuthLayer, AuthService, NotReplayedCounts};

use support::{
    body_string, client, client_h2, http_provider, until, Api, IdentityProvider, TokenRegistry,
};

type Body = BoxBody<Bytes, std::io::Error>;
type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    tower_auth_refresh::ReplayBody<Body>,
>;

const HOUR: Duration = Duration::from_secs(3600);

struct World {
    idp: IdentityProvider,
    api: Api,
    registry: TokenRegistry,
    layer: AuthLayer,
    service: AuthService<Client>,
}

/// A world whose first token was used once and then revoked on the server: the next request
/// meets a 401.
async fn world_with_revoked_token(layer: impl FnOnce(&IdentityProvider) -> AuthLayer) -> World {
    world_over(client(), layer).await
}

/// [`world_with_revoked_token`] over `client` (HTTP/1.1 or HTTP/2).
async fn world_over(client: Client, layer: impl FnOnce(&IdentityProvider) -> AuthLayer) -> World {
    let registry = TokenRegistry::default();
    let idp = IdentityProvider::start(registry.clone(), Some(HOUR)).await;
    let api = Api::start(registry.clone(), 0).await;
    let layer = layer(&idp);
    let service = ServiceBuilder::new().layer(layer.clone()).service(client);
    let warm = service
        .clone()
        .oneshot(Request::get(api.url("/whoami")).body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(body_string(warm).await, "token-1");
    registry.revoke_all();
    World {
        idp,
        api,
        registry,
        layer,
        service,
    }
}

fn default_layer(idp: &IdentityProvider) -> AuthLayer {
    AuthLayer::new(http_provider(idp))
}

/// These tests revoke each new token right after it was fetched because of a 401. A real API
/// that refuses fresh tokens is not expiring them (see `rejection_cooldown`); here every
/// revocation stands for an expiry, so the cooldown is off.
fn revocations_are_expiries(idp: &IdentityProvider) -> AuthLayer {
    AuthLayer::builder(http_provider(idp))
        .rejection_cooldown(Duration::ZERO)
        .build()
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// A body of `chunks` frames of `size` bytes with no size hint, as a streamed upload has.
fn chunked(chunks: usize, size: usize) -> Body {
    let frames = (0..chunks).map(move |i| Ok(Frame::data(Bytes::from(vec![i as u8; size]))));
    BodyExt::boxed(StreamBody::new(futures::stream::iter(frames)))
}

fn payload(len: usize) -> Bytes {
    (0..len)
        .map(|i| (i * 31 % 251) as u8)
        .collect::<Vec<_>>()
        .into()
}

#[tokio::test]
async fn post_of_10_kib_is_replayed_byte_identical() {
    let w = world_with_revoked_token(default_layer).await;
    let body = payload(10 * 1024);

    let request = Request::post(w.api.url("/echo"))
        .body(full(body.clone()))
        .unwrap();
    let response = w.service.clone().oneshot(request).await.unwrap();

    assert_eq!(response.status(), StatusCode::OK);
    let echoed = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        echoed, body,
        "the API received the same bytes on the replay"
    );
    assert_eq!(w.api.rejected(), 1);
    assert_eq!(w.api.requests(), 3, "warm-up, rejected attempt, replay");
    assert_eq!(w.idp.token_requests(), 2);
    assert_eq!(w.layer.cache().stats().replays, 1);
}

#[tokio::test]
async fn streamed_body_under_the_cap_is_replayed_byte_identical() {
    let w = world_with_revoked_token(default_layer).await;
    let request = Request::post(w.api.url("/echo"))
        .body(chunked(8, 4096))
        .unwrap();
    let response = w.service.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let echoed = response.into_body().collect().await.unwrap().to_bytes();
    let expected: Vec<u8> = (0..8u8).flat_map(|i| vec![i; 4096]).collect();
    assert_eq!(echoed, expected);
    assert_eq!(w.api.requests(), 3);
}

#[tokio::test]
async fn body_over_the_cap_is_not_replayed_and_its_401_comes_back_unchanged() {
    let w = world_with_revoked_token(revocations_are_expiries).await;

    for (body, what) in [
        (full(payload(1024 * 1024)), "1 MiB with a known length"),
        (chunked(16, 64 * 1024), "1 MiB streamed without a length"),
    ] {
        // Make sure the token the request leaves with is rejected.
        let _ = w.layer.cache().token().await.unwrap();
        w.registry.revoke_all();
        let before = w.api.requests();
        let request = Request::post(w.api.url("/echo")).body(body).unwrap();
        let response = w.service.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{what}");
        assert_eq!(
            response.headers()["www-authenticate"],
            r#"Bearer error="invalid_token""#
        );
        assert_eq!(body_string(response).await, "invalid or expired token");
        assert_eq!(w.api.requests(), before + 1, "{what}: sent once");
    }
    let stats = w.layer.cache().stats();
    assert_eq!(stats.replays, 0);
    assert_eq!(stats.not_replayed.too_large, 2, "the reason is counted");
    assert_eq!(
        w.idp.token_requests(),
        2,
        "the second request fetched token-2"
    );
    // The 401 invalidated the token, so the next request gets a new one up front.
    let before_rejected = w.api.rejected();
    let request = Request::get(w.api.url("/whoami")).body(empty()).unwrap();
    let response = w.service.clone().oneshot(request).await.unwrap();
    assert_eq!(body_string(response).await, "token-3");
    assert_eq!(w.api.rejected(), before_rejected);
    assert_eq!(w.idp.token_requests(), 3);
}

#[tokio::test]
async fn a_401_on_the_replay_comes_back_unchanged() {
    let w = world_with_revoked_token(default_layer).await;
    let before = w.api.requests();
    let request = Request::get(w.api.url("/always-401"))
        .body(empty())
        .unwrap();
    let response = w.service.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(body_string(response).await, "invalid or expired token");
    assert_eq!(
        w.api.requests(),
        before + 2,
        "the attempt and one replay, no loop"
    );
    assert_eq!(w.idp.token_requests(), 2);
    assert_eq!(w.layer.cache().stats().replays, 1);
}

#[tokio::test]
async fn replay_can_be_limited_to_idempotent_methods() {
    let w = world_with_revoked_token(|idp| {
        AuthLayer::builder(http_provider(idp))
            .replay_when(predicate::idempotent)
            .rejection_cooldown(Duration::ZERO)
            .build()
    })
    .await;

    let request = Request::post(w.api.url("/echo"))
        .body(full(payload(10)))
        .unwrap();
    let response = w.service.clone().oneshot(request).await.unwrap();
    assert_eq!(
        response.status(),
        StatusCode::UNAUTHORIZED,
        "POST is not replayed"
    );
    assert_eq!(w.api.requests(), 2);
    assert_eq!(w.layer.cache().stats().not_replayed.refused, 1);

    // The 401 invalidated token-1; take token-2, then have the server reject it too.
    assert_eq!(w.layer.cache().token().await.unwrap().secret(), "token-2");
    w.registry.revoke_all();
    let request = Request::put(w.api.url("/echo"))
        .body(full(payload(10)))
        .unwrap();
    let response = w.service.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "PUT is replayed");
    assert_eq!(w.layer.cache().stats().replays, 1);
    assert_eq!(w.idp.token_requests(), 3);
}

#[derive(Clone, Copy, Debug)]
enum Protocol {
    Http1,
    Http2,
}

async fn world_speaking(protocol: Protocol) -> World {
    let client = match protocol {
        Protocol::Http1 => client(),
        Protocol::Http2 => client_h2(),
    };
    world_over(client, default_layer).await
}

/// What a streamed file upload sends: 5 chunks of 1 KiB, and no size hint.
fn upload_bytes() -> Vec<u8> {
    (0..5u8).flat_map(|i| vec![i; 1024]).collect()
}

fn upload_trailers() -> HeaderMap {
    let mut trailers = HeaderMap::new();
    trailers.insert("x-checksum", HeaderValue::from_static("c0ffee"));
    trailers
}

/// The upload as 5 data frames, then the trailers if any.
fn upload_body(trailers: Option<HeaderMap>) -> Body {
    let data = (0..5u8).map(|i| Ok(Frame::data(Bytes::from(vec![i; 1024]))));
    let frames = data.chain(trailers.map(|t| Ok(Frame::trailers(t))));
    BodyExt::boxed(StreamBody::new(futures::stream::iter(frames)))
}

/// The server reads the whole upload before it answers 401 for the revoked token: the recording
/// is complete however the transport stopped polling the body, so the upload is replayed once.
async fn assert_upload_replayed(w: &World, request: Request<Body>, trailers: Option<HeaderMap>) {
    let before = w.api.requests();
    let response = w.service.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    if let Some(trailers) = trailers {
        for (name, value) in &trailers {
            assert_eq!(
                response.headers().get(name),
                Some(value),
                "trailers replayed"
            );
        }
    }
    let echoed = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(echoed, upload_bytes(), "the replay sent the same bytes");
    assert_eq!(
        w.api.requests(),
        before + 2,
        "the rejected upload and its replay"
    );
    assert_eq!(w.api.rejected(), 1);
    assert_eq!(w.layer.cache().stats().replays, 1);
    assert_eq!(
        w.idp.token_requests(),
        2,
        "one token request after the first"
    );
}

async fn upload_with_content_length(protocol: Protocol) {
    let w = world_speaking(protocol).await;
    let request = Request::post(w.api.url("/upload"))
        .header(header::CONTENT_LENGTH, 5 * 1024)
        .body(upload_body(None))
        .unwrap();
    assert_upload_replayed(&w, request, None).await;
}

// hyper's HTTP/1 client writes exactly `content-length` bytes and then drops the body without
// polling it for its end.
#[tokio::test]
async fn streamed_upload_with_content_length_is_replayed_over_http1() {
    upload_with_content_length(Protocol::Http1).await;
}

#[tokio::test]
async fn streamed_upload_with_content_length_is_replayed_over_http2() {
    upload_with_content_length(Protocol::Http2).await;
}

async fn upload_with_trailers(protocol: Protocol) {
    let w = world_speaking(protocol).await;
    // HTTP/1.1 carries request trailers only in chunked encoding, and hyper sends only the
    // fields a `Trailer` header announces (without it hyper drops them and polls on to the end).
    let request = Request::post(w.api.url("/upload"))
        .header(header::TRAILER, "x-checksum")
        .body(upload_body(Some(upload_trailers())))
        .unwrap();
    assert_upload_replayed(&w, request, Some(upload_trailers())).await;
}

// Trailers are the last frame: both hyper clients stop polling the body right after them.
#[tokio::test]
async fn streamed_upload_ending_in_trailers_is_replayed_over_http1() {
    upload_with_trailers(Protocol::Http1).await;
}

#[tokio::test]
async fn streamed_upload_ending_in_trailers_is_replayed_over_http2() {
    upload_with_trailers(Protocol::Http2).await;
}

/// A slow 5-chunk upload whose 401 arrives before the server read it (`/echo` checks the token
/// first, as authentication middleware does): only the first chunk was sent when the rejection
/// came. The replay sends what was recorded and then the rest of the caller's body, which the
/// first attempt never sent: the server receives the upload byte-identical.
async fn slow_upload_refused_early(protocol: Protocol, content_length: bool) {
    let w = world_speaking(protocol).await;
    let (sender, mut receiver) =
        tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
    let stream = futures::stream::poll_fn(move |cx| receiver.poll_recv(cx));
    let chunks: Vec<Bytes> = (0..5u8).map(|i| Bytes::from(vec![i; 1024])).collect();
    sender
        .send(Ok(Frame::data(chunks[0].clone())))
        .await
        .unwrap();

    let before = w.api.requests();
    let mut request = Request::post(w.api.url("/echo"));
    if content_length {
        request = request.header(header::CONTENT_LENGTH, 5 * 1024);
    }
    let request = request
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap();
    let call = tokio::spawn(w.service.clone().oneshot(request));
    // The rest of the upload trickles in only once the rejection has arrived.
    let api = w.api.clone();
    until(|| api.rejected() == 1).await;
    for chunk in &chunks[1..] {
        sender.send(Ok(Frame::data(chunk.clone()))).await.unwrap();
    }
    drop(sender);
    let response = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .expect("the replay finishes once the upload does")
        .unwrap()
        .unwrap();

    assert_eq!(response.status(), StatusCode::OK);
    let echoed = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(echoed, upload_bytes(), "byte-identical at the server");
    assert_eq!(w.api.requests(), before + 2, "the attempt and one replay");
    let stats = w.layer.cache().stats();
    assert_eq!(stats.replays, 1);
    assert_eq!(stats.not_replayed, NotReplayedCounts::default());
    assert_eq!(w.idp.token_requests(), 2);
}

#[tokio::test]
async fn slow_upload_refused_before_it_was_read_is_replayed_over_http1() {
    slow_upload_refused_early(Protocol::Http1, true).await;
    slow_upload_refused_early(Protocol::Http1, false).await;
}

#[tokio::test]
async fn slow_upload_refused_before_it_was_read_is_replayed_over_http2() {
    slow_upload_refused_early(Protocol::Http2, true).await;
    slow_upload_refused_early(Protocol::Http2, false).await;
}
