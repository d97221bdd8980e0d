//! `AuthLayer` in DPoP mode against a resource server on loopback that checks every proof the
//! way RFC 9449 section 7 says (signature with the embedded key, `htm`, `htu`, `ath`, a fresh
//! `jti`, the key's thumbprint, and its own nonce), driven by a real hyper-util client.
//!
//! The end-to-end run against the certified oidc-provider is in `tests/oidc.rs`.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use futures::future::join_all;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_auth_refresh::dpop::{Dpop, DPOP, DPOP_NONCE};
use tower_auth_refresh::testkit::ProofVerifier;
use tower_auth_refresh::{AuthError, AuthLayer, StaticToken, Token};

const TOKEN: &str = "bound-token-1";

/// What the server saw.
#[derive(Default)]
struct Seen {
    requests: AtomicUsize,
    accepted: AtomicUsize,
    nonce_refusals: AtomicUsize,
    bad_proofs: AtomicUsize,
    verifier: ProofVerifier,
    /// The nonce every proof must carry; rotated by the test.
    nonce: Mutex<String>,
    /// The thumbprint the token is bound to.
    jkt: Mutex<String>,
    /// Keep the nonce to itself (no `DPoP-Nonce` header).
    silent: AtomicBool,
    /// Name the nonce only when refusing a proof for it.
    announce_on_nonce_refusal_only: AtomicBool,
    /// Check the nonce before the token (else the token first).
    nonce_first: AtomicBool,
    /// The token it accepts (`TOKEN` until a test changes it).
    token: Mutex<Option<String>>,
    invalid_tokens: AtomicUsize,
}

impl Seen {
    /// A server that wants `nonce` in proofs by `dpop`'s key.
    fn for_key(dpop: &Dpop, nonce: &str) -> Arc<Self> {
        let seen = Self::default();
        *seen.nonce.lock().unwrap() = nonce.to_owned();
        *seen.jkt.lock().unwrap() = dpop.key().thumbprint().to_owned();
        Arc::new(seen)
    }
}

fn decode(segment: &str) -> Option<serde_json::Value> {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(segment).ok()?).ok()
}

/// RFC 9449 section 4.3 by the test kit's verifier (signature, `typ`, `alg`, `htm`, `htu`,
/// `iat`, `ath`, a fresh `jti`), then the key binding; the nonce is the server's next check.
/// `Err` says what is wrong.
fn check_proof(seen: &Seen, request: &Request<Bytes>, origin: &str) -> Result<(), String> {
    let header = |name| {
        request
            .headers()
            .get(name)
            .and_then(|value: &HeaderValue| value.to_str().ok())
    };
    let token = header(header::AUTHORIZATION)
        .ok_or("no authorization")?
        .strip_prefix("DPoP ")
        .ok_or("not the DPoP scheme")?;
    let proof = header(DPOP).ok_or("no proof")?;
    let htu = format!("{origin}{}", request.uri().path());
    let verified = seen
        .verifier
        .verify(proof, request.method(), &htu, Some(token), None)
        .map_err(|error| format!("{error:?}"))?;
    if verified.jkt != *seen.jkt.lock().unwrap() {
        return Err("proof from another key".to_owned());
    }
    Ok(())
}

/// A resource server: every proof checked, then its nonce.
async fn resource_server(seen: Arc<Seen>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", listener.local_addr().unwrap());
    let base = origin.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let seen = seen.clone();
            let origin = base.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        let origin = origin.clone();
                        async move {
                            let (parts, body) = request.into_parts();
                            let body = body.collect().await.unwrap().to_bytes();
                            let request = Request::from_parts(parts, body);
                            seen.requests.fetch_add(1, Ordering::SeqCst);
                            let nonce = seen.nonce.lock().unwrap().clone();
                            let mut response = Response::new(Full::new(request.body().clone()));
                            let announce = !seen.silent.load(Ordering::SeqCst)
                                && !seen.announce_on_nonce_refusal_only.load(Ordering::SeqCst);
                            if announce {
                                response
                                    .headers_mut()
                                    .insert(DPOP_NONCE, HeaderValue::from_str(&nonce).unwrap());
                            }
                            if let Err(why) = check_proof(&seen, &request, &origin) {
                                seen.bad_proofs.fetch_add(1, Ordering::SeqCst);
                                *response.status_mut() = StatusCode::UNAUTHORIZED;
                                *response.body_mut() = Full::new(Bytes::from(why));
                                response.headers_mut().insert(
                                    header::WWW_AUTHENTICATE,
                                    HeaderValue::from_static(r#"DPoP error="invalid_dpop_proof""#),
                                );
                                return Ok::<_, Infallible>(response);
                            }
                            let proof = request.headers()[DPOP].to_str().unwrap().to_owned();
                            let claims = decode(proof.split('.').nth(1).unwrap()).unwrap();
                            let credential =
                                request.headers()[header::AUTHORIZATION].to_str().unwrap();
                            let valid = seen.token.lock().unwrap().clone();
                            let token_ok =
                                credential == format!("DPoP {}", valid.as_deref().unwrap_or(TOKEN));
                            let nonce_ok = claims["nonce"] == nonce.as_str();
                            let nonce_first = seen.nonce_first.load(Ordering::SeqCst);
                            if !nonce_ok && (nonce_first || token_ok) {
                                seen.nonce_refusals.fetch_add(1, Ordering::SeqCst);
                                *response.status_mut() = StatusCode::UNAUTHORIZED;
                                response.headers_mut().insert(
                                    header::WWW_AUTHENTICATE,
                                    HeaderValue::from_static(
                                        r#"DPoP error="use_dpop_nonce", error_description="nonce""#,
                                    ),
                                );
                                if !seen.silent.load(Ordering::SeqCst) {
                                    response
                                        .headers_mut()
                                        .insert(DPOP_NONCE, HeaderValue::from_str(&nonce).unwrap());
                                }
                                return Ok(response);
                            }
                            if !token_ok {
                                seen.invalid_tokens.fetch_add(1, Ordering::SeqCst);
                                *response.status_mut() = StatusCode::UNAUTHORIZED;
                                response.headers_mut().insert(
                                    header::WWW_AUTHENTICATE,
                                    HeaderValue::from_static(r#"DPoP error="invalid_token""#),
                                );
                                return Ok(response);
                            }
                            seen.accepted.fetch_add(1, Ordering::SeqCst);
                            Ok(response)
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    origin
}

type HttpClient = Client<
    hyper_util::client::legacy::connect::HttpConnector,
    tower_auth_refresh::ReplayBody<Full<Bytes>>,
>;

fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn world() -> (Arc<Seen>, String, Dpop, AuthLayer) {
    let dpop = Dpop::generate().unwrap();
    let seen = Seen::for_key(&dpop, "nonce-1");
    let origin = resource_server(seen.clone()).await;
    let layer = AuthLayer::builder(StaticToken::new(Token::new(TOKEN)))
        .dpop(dpop.clone())
        .build();
    (seen, origin, dpop, layer)
}

#[tokio::test]
async fn the_first_request_learns_the_nonce_with_one_replay_and_the_rest_carry_it() {
    let (seen, origin, dpop, layer) = world().await;
    let service = ServiceBuilder::new()
        .layer(layer.clone())
        .service(http_client());

    // 20 at once: none knows the nonce yet, so each is refused once and replayed once.
    let calls = (0..20).map(|i| {
        let request = Request::post(format!("{origin}/contacts?page={i}"))
            .body(Full::new(Bytes::from(format!("body-{i}"))))
            .unwrap();
        service.clone().oneshot(request)
    });
    for (i, response) in join_all(calls).await.into_iter().enumerate() {
        let response = response.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, format!("body-{i}"), "the replayed body is intact");
    }
    assert_eq!(seen.requests.load(Ordering::SeqCst), 40);
    assert_eq!(seen.nonce_refusals.load(Ordering::SeqCst), 20);
    assert_eq!(seen.bad_proofs.load(Ordering::SeqCst), 0);
    assert_eq!(dpop.nonce_replays(), 20);
    let stats = layer.cache().stats();
    assert_eq!(stats.token_requests, 1, "a nonce costs no token");
    assert_eq!(stats.invalidations, 0);

    // Now the nonce is known: 30 more go through at the first attempt.
    for i in 0..30 {
        let request = Request::get(format!("{origin}/contacts?page={i}"))
            .body(Full::default())
            .unwrap();
        let response = service.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
    assert_eq!(seen.requests.load(Ordering::SeqCst), 70);
    assert_eq!(seen.accepted.load(Ordering::SeqCst), 50);
    assert_eq!(dpop.nonce_replays(), 20);

    // The server rotates its nonce and says so on a 200: the next request uses the new one.
    *seen.nonce.lock().unwrap() = "nonce-2".to_owned();
    let get = || {
        Request::get(format!("{origin}/contacts"))
            .body(Full::default())
            .unwrap()
    };
    let response = service.clone().oneshot(get()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "refused, then replayed");
    assert_eq!(dpop.nonce_replays(), 21);
    let response = service.clone().oneshot(get()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(dpop.nonce_replays(), 21, "learned from the last response");
    assert_eq!(seen.bad_proofs.load(Ordering::SeqCst), 0);
    assert_eq!(layer.cache().stats().token_requests, 1);
}

#[tokio::test]
async fn a_nonce_refusal_without_a_new_nonce_is_not_replayed() {
    let (seen, origin, dpop, layer) = world().await;
    let mut service = ServiceBuilder::new()
        .layer(layer.clone())
        .service(http_client());
    let get = || {
        Request::get(format!("{origin}/contacts"))
            .body(Full::default())
            .unwrap()
    };
    // Learn nonce-1.
    let response = service.ready().await.unwrap().call(get()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // The server wants another nonce but does not say which: nothing new to replay with, so
    // the 401 is taken as a token rejection (one refresh, one replay) and then returned.
    seen.silent.store(true, Ordering::SeqCst);
    *seen.nonce.lock().unwrap() = "nonce-2".to_owned();
    let before = seen.requests.load(Ordering::SeqCst);
    let response = service.ready().await.unwrap().call(get()).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(seen.requests.load(Ordering::SeqCst) - before, 2);
    assert_eq!(dpop.nonce_replays(), 1, "only the first request's");
    assert_eq!(layer.cache().stats().invalidations, 1);
}

#[tokio::test]
async fn a_relative_uri_is_a_typed_error_and_nothing_is_sent() {
    let (seen, _origin, _dpop, layer) = world().await;
    let service = ServiceBuilder::new().layer(layer).service(http_client());
    let request = Request::get("/contacts").body(Full::default()).unwrap();
    let error = service.oneshot(request).await.unwrap_err();
    assert!(
        matches!(error.downcast_ref::<AuthError>(), Some(AuthError::Dpop(_))),
        "{error:?}"
    );
    assert_eq!(seen.requests.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_request_that_waits_for_its_token_is_signed_too() {
    let dpop = Dpop::generate().unwrap();
    let seen = Seen::for_key(&dpop, "n");
    let origin = resource_server(seen.clone()).await;
    // A provider that takes a moment, so the first requests wait for the token.
    let layer = AuthLayer::builder(tower_auth_refresh::provider_fn(|| async {
        tokio::task::yield_now().await;
        Ok::<_, Infallible>(Token::new(TOKEN))
    }))
    .dpop(dpop.clone())
    .build();
    let service = ServiceBuilder::new()
        .layer(layer.clone())
        .service(http_client());
    let calls = (0..5).map(|_| {
        service.clone().oneshot(
            Request::get(format!("{origin}/contacts"))
                .body(Full::default())
                .unwrap(),
        )
    });
    for response in join_all(calls).await {
        assert_eq!(response.unwrap().status(), StatusCode::OK);
    }
    assert_eq!(seen.bad_proofs.load(Ordering::SeqCst), 0);
    assert_eq!(seen.accepted.load(Ordering::SeqCst), 5);
    assert_eq!(layer.cache().stats().token_requests, 1);
}

/// A provider that hands out `token-1`, `token-2`, ...
fn numbered_tokens() -> impl tower_auth_refresh::TokenProvider {
    let issued = Arc::new(AtomicUsize::new(0));
    tower_auth_refresh::provider_fn(move || {
        let n = issued.fetch_add(1, Ordering::SeqCst) + 1;
        async move { Ok::<_, Infallible>(Token::new(format!("token-{n}"))) }
    })
}

/// One request that meets both a new nonce and a revoked token gets one replay for each, in
/// either order, and no more.
async fn nonce_and_token_in_one_request(nonce_first: bool) {
    let dpop = Dpop::generate().unwrap();
    let seen = Seen::for_key(&dpop, "n1");
    *seen.token.lock().unwrap() = Some("token-1".to_owned());
    seen.nonce_first.store(nonce_first, Ordering::SeqCst);
    let origin = resource_server(seen.clone()).await;
    let layer = AuthLayer::builder(numbered_tokens())
        .dpop(dpop.clone())
        .build();
    let service = ServiceBuilder::new()
        .layer(layer.clone())
        .service(http_client());
    let post = || {
        Request::post(format!("{origin}/contacts"))
            .body(Full::new(Bytes::from_static(b"payload")))
            .unwrap()
    };
    // Learn n1: one nonce replay.
    let response = service.clone().oneshot(post()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(seen.requests.load(Ordering::SeqCst), 2);

    // The server revokes token-1 and moves to n2, naming it only when it refuses a proof for it.
    seen.announce_on_nonce_refusal_only
        .store(true, Ordering::SeqCst);
    *seen.token.lock().unwrap() = Some("token-2".to_owned());
    *seen.nonce.lock().unwrap() = "n2".to_owned();
    let response = service.clone().oneshot(post()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"payload", "the body survives both replays");
    assert_eq!(
        seen.requests.load(Ordering::SeqCst),
        5,
        "the attempt and two replays"
    );
    assert_eq!(seen.nonce_refusals.load(Ordering::SeqCst), 2);
    assert_eq!(seen.invalid_tokens.load(Ordering::SeqCst), 1);
    assert_eq!(seen.bad_proofs.load(Ordering::SeqCst), 0);
    assert_eq!(dpop.nonce_replays(), 2);
    let stats = layer.cache().stats();
    assert_eq!(
        (stats.token_requests, stats.invalidations, stats.replays),
        (2, 1, 3)
    );

    // Both again on a later request: every request has its own two replays.
    *seen.token.lock().unwrap() = Some("token-3".to_owned());
    *seen.nonce.lock().unwrap() = "n3".to_owned();
    seen.silent.store(false, Ordering::SeqCst);
    let before = seen.requests.load(Ordering::SeqCst);
    let response = service.clone().oneshot(post()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(seen.requests.load(Ordering::SeqCst) - before, 3);
}

#[tokio::test]
async fn a_new_nonce_then_a_revoked_token_cost_one_replay_each() {
    nonce_and_token_in_one_request(true).await;
}

#[tokio::test]
async fn a_revoked_token_then_a_new_nonce_cost_one_replay_each() {
    nonce_and_token_in_one_request(false).await;
}

#[tokio::test]
async fn a_third_refusal_is_returned() {
    let dpop = Dpop::generate().unwrap();
    let seen = Seen::for_key(&dpop, "n1");
    // A token nobody is ever given: every token is refused.
    *seen.token.lock().unwrap() = Some("never".to_owned());
    seen.nonce_first.store(true, Ordering::SeqCst);
    let origin = resource_server(seen.clone()).await;
    let layer = AuthLayer::builder(numbered_tokens())
        .dpop(dpop.clone())
        .build();
    let service = ServiceBuilder::new()
        .layer(layer.clone())
        .service(http_client());
    let response = service
        .oneshot(
            Request::get(format!("{origin}/contacts"))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    // Nonce refusal, nonce replay refused for the token, token replay refused: three.
    assert_eq!(seen.requests.load(Ordering::SeqCst), 3);
    assert_eq!(dpop.nonce_replays(), 1);
    assert_eq!(layer.cache().stats().replays, 2);
}

/// One key behind a keyed layer that talks to two APIs: each origin's nonce is learned once and
/// kept apart, each key's cache sends its own token as `DPoP`.
#[tokio::test]
async fn a_keyed_layer_signs_for_each_origin_with_its_own_nonce() {
    let dpop = Dpop::generate().unwrap();
    let mut servers = Vec::new();
    for nonce in ["nonce-of-a", "nonce-of-b"] {
        let seen = Seen::for_key(&dpop, nonce);
        let origin = resource_server(seen.clone()).await;
        servers.push((seen, origin));
    }
    let layer = AuthLayer::keyed(
        |parts| parts.uri.authority().map(|authority| authority.to_string()),
        |_key: &String| StaticToken::new(Token::new(TOKEN)),
    )
    .dpop(dpop.clone())
    .build();
    let service = ServiceBuilder::new()
        .layer(layer.clone())
        .service(http_client());
    for round in 0..3 {
        for (_, origin) in &servers {
            let request = Request::get(format!("{origin}/contacts?round={round}"))
                .body(Full::default())
                .unwrap();
            let response = service.clone().oneshot(request).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
        }
    }
    for (seen, origin) in &servers {
        // The first request to each origin learns its nonce; the other two carry it.
        assert_eq!(seen.requests.load(Ordering::SeqCst), 4, "{origin}");
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 3, "{origin}");
        assert_eq!(seen.bad_proofs.load(Ordering::SeqCst), 0, "{origin}");
        let uri: http::Uri = origin.parse().unwrap();
        assert_eq!(
            dpop.nonce(&uri).as_deref(),
            Some(seen.nonce.lock().unwrap().as_str())
        );
    }
    assert_eq!(dpop.nonce_replays(), 2);
    assert_eq!(layer.stats().keys, 2);
}
