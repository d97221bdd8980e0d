//! Against a complete, standard identity provider: the certified `oidc-provider` (Node.js) on
//! loopback, from `tests/oidc-provider/`, and the protected API the fixture serves next to it.
//! `.ci/run` installs it (`npm ci`); elsewhere these tests are skipped, with a note, when the
//! package is missing (launcher: `tests/support/oidc_provider.rs`).

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{ServiceBuilder, ServiceExt};
use tower_auth_refresh::dpop::{Dpop, DPOP};
use tower_auth_refresh::oauth2::{
    discover, transport, ClientAuth, ClientCredentials, HttpTransport,
};
use tower_auth_refresh::testkit::client;
use tower_auth_refresh::{AuthError, AuthLayer, ErrorCode, StaticToken, TokenCache, TokenRequest};

#[path = "support/oidc_provider.rs"]
mod oidc_provider;

use oidc_provider::{start, Options};

/// The fixture with tokens that live `ttl_seconds`, other options at their defaults.
fn with_ttl(ttl_seconds: u64) -> Options {
    Options {
        ttl_seconds,
        ..Options::default()
    }
}

fn http() -> HttpTransport {
    transport(Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>())
}

/// The longest any step may take against the fixture: a generous bound, so a hang fails the
/// test with the step's name instead of stalling CI.
const STEP: Duration = Duration::from_secs(60);

/// Run one step against the fixture, or fail naming it.
async fn step<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP, future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {STEP:?}"))
}

const BASIC_ID: &str = "batch-basic";
const BASIC_SECRET: &str = "b@tch s3cret/+&=";

#[tokio::test]
async fn discovery_and_both_client_authentication_methods() {
    let Some(idp) = start(with_ttl(120)) else {
        return;
    };
    let transport = http();

    let metadata = step("discovery", discover(&idp.issuer, &transport, false))
        .await
        .unwrap();
    assert_eq!(metadata.issuer, idp.issuer);
    assert_eq!(metadata.token_endpoint, format!("{}/token", idp.issuer));
    assert_eq!(metadata.preferred_client_auth(), ClientAuth::Basic);

    // client_secret_basic, with characters that must be form-encoded inside Basic.
    let basic = ClientCredentials::from_metadata(&metadata, BASIC_ID, BASIC_SECRET)
        .transport(transport.clone())
        .build()
        .unwrap();
    let token = step("basic token request", basic.request_token())
        .await
        .unwrap();
    assert!(!token.secret().is_empty());
    // No scope asked: the fixture's default for the API, `contacts:read`.
    assert_eq!(token.scope(), Some("contacts:read"));
    let lifetime = token.expires_at().unwrap() - tokio::time::Instant::now();
    assert!(
        lifetime <= Duration::from_secs(120) && lifetime > Duration::from_secs(60),
        "{lifetime:?}"
    );

    // client_secret_post; the fixture refuses a client that uses the other method.
    let post = ClientCredentials::from_metadata(&metadata, "batch-post", "p0st-secret")
        .auth_method(ClientAuth::Post)
        .scope("contacts:read")
        .transport(transport.clone())
        .build()
        .unwrap();
    let token = step("post token request", post.request_token())
        .await
        .unwrap();
    assert_eq!(token.scope(), Some("contacts:read"));
    let wrong_method = ClientCredentials::from_metadata(&metadata, "batch-post", "p0st-secret")
        .transport(transport.clone())
        .build()
        .unwrap();
    let refused = step("wrong-method token request", wrong_method.request_token()).await;
    assert_eq!(
        refused.unwrap_err().error_code(),
        Some(&ErrorCode::InvalidClient)
    );
}

#[tokio::test]
async fn wrong_secret_is_invalid_client_and_never_shown() {
    let Some(idp) = start(with_ttl(120)) else {
        return;
    };
    let transport = http();
    let metadata = step("discovery", discover(&idp.issuer, &transport, false))
        .await
        .unwrap();
    let provider = ClientCredentials::from_metadata(&metadata, BASIC_ID, "not-the-secret")
        .transport(transport)
        .build()
        .unwrap();

    let cache = TokenCache::new(provider);
    let error = step("token with a wrong secret", cache.token())
        .await
        .unwrap_err();
    let AuthError::TokenEndpoint(refused) = &error else {
        panic!("{error:?}")
    };
    assert_eq!(refused.code, ErrorCode::InvalidClient);
    assert_eq!(refused.status, http::StatusCode::UNAUTHORIZED);
    for shown in [
        error.to_string(),
        format!("{error:?}"),
        format!("{cache:?}"),
    ] {
        assert!(!shown.contains("not-the-secret"), "{shown}");
    }
    assert_eq!(cache.stats().refresh_failures, 1);
}

#[tokio::test]
async fn unknown_issuer_path_is_a_discovery_error() {
    let Some(idp) = start(with_ttl(120)) else {
        return;
    };
    let error = discover(
        &format!("{}/tenant-that-does-not-exist", idp.issuer),
        &http(),
        false,
    )
    .await
    .unwrap_err();
    assert!(matches!(error, AuthError::Discovery { .. }), "{error:?}");
}

/// The fixture's API counters that a Bearer client must leave at zero.
const REFUSALS: [&str; 6] = [
    "invalid_token",
    "stolen",
    "bad_proof",
    "replayed_jti",
    "use_dpop_nonce",
    "insufficient_scope",
];

#[tokio::test]
async fn bearer_client_walks_the_api_through_auth_layer_with_one_token_request() {
    const PAGES: u64 = 60;
    let Some(idp) = start(Options {
        api_pages: PAGES,
        ..Options::default()
    }) else {
        return;
    };
    let transport = http();
    let metadata = step("discovery", discover(&idp.issuer, &transport, false))
        .await
        .unwrap();
    let grant = ClientCredentials::from_metadata(&metadata, "batch-post", "p0st-secret")
        .auth_method(ClientAuth::Post)
        .transport(transport)
        .build()
        .unwrap();
    let layer = AuthLayer::new(grant);
    let service = ServiceBuilder::new()
        .layer(layer.clone())
        .service(client::<Empty<Bytes>>());

    // Follow `next` from page 0 to the end.
    let mut page = Some(0);
    let mut walked = 0;
    while let Some(n) = page {
        let request = Request::get(format!("{}/contacts?page={n}", idp.api))
            .body(Empty::new())
            .unwrap();
        let response = step("GET /contacts", service.clone().oneshot(request))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "page {n}");
        let body = step("page body", response.into_body().collect())
            .await
            .unwrap()
            .to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["page"], n);
        assert_eq!(json["items"][0], format!("contact-{}", n * 10));
        assert_eq!(json["items"].as_array().unwrap().len(), 10);
        page = json["next"].as_u64();
        walked += 1;
    }
    assert_eq!(walked, PAGES);

    let stats = step("stats", idp.stats()).await;
    assert_eq!(stats["requests"], PAGES, "{stats}");
    assert_eq!(stats["accepted"], PAGES, "{stats}");
    for refusal in REFUSALS {
        assert_eq!(stats[refusal], 0, "{refusal}: {stats}");
    }
    // Bearer requests count towards the nonce rotation too: one every 50 accepted.
    assert_eq!(stats["nonce_rotations"], 1, "{stats}");
    assert_eq!(
        (&stats["token_requests"], &stats["token_requests_ok"]),
        (&1.into(), &1.into()),
        "{stats}"
    );
    let cache = layer.cache().stats();
    assert_eq!((cache.token_requests, cache.replays), (1, 0));
}

#[tokio::test]
async fn insufficient_scope_goes_back_unchanged_and_a_write_token_is_accepted() {
    let Some(idp) = start(Options::default()) else {
        return;
    };
    let transport = http();
    let metadata = step("discovery", discover(&idp.issuer, &transport, false))
        .await
        .unwrap();
    let post = |layer: &AuthLayer| {
        let service = ServiceBuilder::new()
            .layer(layer.clone())
            .service(client::<Full<Bytes>>());
        let request = Request::post(format!("{}/contacts", idp.api))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(br#"{"name":"Ada"}"#)))
            .unwrap();
        service.oneshot(request)
    };

    // Default scope, contacts:read: POST /contacts needs contacts:write.
    let reader = AuthLayer::new(
        ClientCredentials::from_metadata(&metadata, BASIC_ID, BASIC_SECRET)
            .transport(transport.clone())
            .build()
            .unwrap(),
    );
    let refused = step("POST with contacts:read", post(&reader))
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        refused.headers()["www-authenticate"],
        r#"Bearer error="insufficient_scope", error_description="this route needs contacts:write", scope="contacts:write""#
    );
    let stats = step("stats", idp.stats()).await;
    assert_eq!(
        (
            &stats["requests"],
            &stats["insufficient_scope"],
            &stats["token_requests"]
        ),
        (&1.into(), &1.into(), &1.into()),
        "403 is neither refreshed nor replayed: {stats}"
    );
    let cache = reader.cache().stats();
    assert_eq!((cache.token_requests, cache.replays), (1, 0));

    // A token asked with both scopes is accepted.
    let writer = AuthLayer::new(
        ClientCredentials::from_metadata(&metadata, BASIC_ID, BASIC_SECRET)
            .scope("contacts:read contacts:write")
            .transport(transport)
            .build()
            .unwrap(),
    );
    let created = step("POST with contacts:write", post(&writer))
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let body = step("created body", created.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(&body[..], br#"{"received":14}"#);
    let stats = step("stats", idp.stats()).await;
    assert_eq!(
        (
            &stats["requests"],
            &stats["accepted"],
            &stats["token_requests"],
            &stats["token_requests_ok"]
        ),
        (&2.into(), &1.into(), &2.into(), &2.into()),
        "{stats}"
    );

    idp.reset_stats().await;
    let stats = step("stats", idp.stats()).await;
    assert!(
        stats.as_object().unwrap().values().all(|v| v == 0),
        "{stats}"
    );
}

const DPOP_ID: &str = "batch-dpop";
const DPOP_SECRET: &str = "dp0p-secret";

/// A DPoP client of the fixture: one key for the token requests and the API requests.
async fn dpop_client(idp: &oidc_provider::OidcProvider, dpop: &Dpop) -> ClientCredentials {
    let transport = http();
    let metadata = step("discovery", discover(&idp.issuer, &transport, false))
        .await
        .unwrap();
    ClientCredentials::from_metadata(&metadata, DPOP_ID, DPOP_SECRET)
        .auth_method(ClientAuth::Post)
        .dpop(dpop.clone())
        .transport(transport)
        .build()
        .unwrap()
}

/// The batch of the issue, sender-constrained: three phases of 150 pages, 8 at a time, each
/// phase after the last token expired; the API rotates its DPoP nonce every 40 requests and
/// the token endpoint wants its own nonce too. Not one request fails, every token is fetched
/// exactly once, and every proof passes the certified verifier.
#[tokio::test]
async fn a_dpop_batch_across_expiries_and_nonce_rotations_loses_nothing() {
    const TTL: u64 = 8;
    const PHASES: u64 = 3;
    const PER_PHASE: u64 = 150;
    let Some(idp) = start(Options {
        ttl_seconds: TTL,
        api_nonce_every: 40,
        ..Options::default()
    }) else {
        return;
    };
    let dpop = Dpop::generate().unwrap();
    let layer = AuthLayer::builder(dpop_client(&idp, &dpop).await)
        .dpop(dpop.clone())
        // No background refresh inside a phase (it takes well under the 6 s before the skew
        // buffer of an 8 s token): one token per phase, exactly.
        .advisory_window(Duration::ZERO)
        .build();
    let service = ServiceBuilder::new()
        .layer(layer.clone())
        .service(client::<Empty<Bytes>>());

    for phase in 0..PHASES {
        if phase > 0 {
            // Past the expiry of the phase's token (real time: the fixture is another process).
            tokio::time::sleep(Duration::from_secs(TTL) + Duration::from_millis(500)).await;
        }
        let pages = futures::stream::iter(0..PER_PHASE)
            .map(|n| {
                let request = Request::get(format!("{}/contacts?page={n}", idp.api))
                    .body(Empty::new())
                    .unwrap();
                let call = service.clone().oneshot(request);
                async move {
                    let response = step("GET /contacts", call).await.unwrap();
                    let status = response.status();
                    let body = step("page body", response.into_body().collect())
                        .await
                        .unwrap()
                        .to_bytes();
                    (status, body)
                }
            })
            .buffer_unordered(8)
            .collect::<Vec<_>>()
            .await;
        for (status, body) in pages {
            assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        }
    }

    let total = PHASES * PER_PHASE;
    let stats = step("stats", idp.stats()).await;
    assert_eq!(stats["accepted"], total, "{stats}");
    for refusal in [
        "invalid_token",
        "stolen",
        "bad_proof",
        "replayed_jti",
        "insufficient_scope",
    ] {
        assert_eq!(stats[refusal], 0, "{refusal}: {stats}");
    }
    // Every refusal for a nonce was replayed once with the new nonce, and went through.
    let nonce_refusals = stats["use_dpop_nonce"].as_u64().unwrap();
    assert!(
        nonce_refusals >= 1,
        "the first request has no nonce: {stats}"
    );
    assert_eq!(dpop.nonce_replays(), nonce_refusals, "{stats}");
    assert_eq!(stats["requests"], total + nonce_refusals, "{stats}");
    assert_eq!(stats["nonce_rotations"], total / 40, "{stats}");
    // One token per phase; each token request at most once refused for the endpoint's nonce.
    assert_eq!(stats["token_requests_ok"], PHASES, "{stats}");
    let token_requests = stats["token_requests"].as_u64().unwrap();
    assert!((PHASES..=2 * PHASES).contains(&token_requests), "{stats}");
    let cache = layer.cache().stats();
    assert_eq!(cache.token_requests, PHASES);
    assert_eq!(
        cache.invalidations, 0,
        "tokens are replaced before they expire"
    );
}

/// The point of DPoP: the bound token is worth nothing without the key. Sent as a bearer
/// token, as a DPoP token without a proof, or with a proof by another key, it is refused.
#[tokio::test]
async fn a_stolen_dpop_token_is_refused_by_the_api() {
    let Some(idp) = start(Options::default()) else {
        return;
    };
    let dpop = Dpop::generate().unwrap();
    let token = step("token", dpop_client(&idp, &dpop).await.request_token())
        .await
        .unwrap();
    let uri: http::Uri = format!("{}/contacts?page=0", idp.api).parse().unwrap();
    let thief = Dpop::generate().unwrap();
    let attempts = [
        (format!("Bearer {}", token.secret()), None),
        (format!("DPoP {}", token.secret()), None),
        (
            format!("DPoP {}", token.secret()),
            Some(
                thief
                    .proof(&http::Method::GET, &uri, Some(token.secret()))
                    .unwrap(),
            ),
        ),
    ];
    let http = client::<Empty<Bytes>>();
    for (authorization, proof) in attempts {
        let mut request = Request::get(uri.clone())
            .header(http::header::AUTHORIZATION, authorization)
            .body(tower_auth_refresh::ReplayBody::new(Empty::new()))
            .unwrap();
        if let Some(proof) = proof {
            request.headers_mut().insert(DPOP, proof);
        }
        let response = step("stolen", http.request(request)).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    let stats = step("stats", idp.stats()).await;
    assert_eq!(stats["stolen"], 3, "{stats}");
    assert_eq!(stats["accepted"], 0, "{stats}");

    // The rightful holder, through the layer, gets in.
    let layer = AuthLayer::builder(StaticToken::new(token))
        .dpop(dpop.clone())
        .build();
    let response = step(
        "holder",
        ServiceBuilder::new()
            .layer(layer)
            .service(client::<Empty<Bytes>>())
            .oneshot(Request::get(uri).body(Empty::new()).unwrap()),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let stats = step("stats", idp.stats()).await;
    assert_eq!(
        (&stats["accepted"], &stats["stolen"]),
        (&1.into(), &3.into()),
        "{stats}"
    );
}

/// Step-up against the certified server, sender-constrained: a POST that needs
/// `contacts:write` meets the API's nonce, then `insufficient_scope` (a DPoP challenge on a
/// 403); the hook asks for both scopes, the request is replayed with the new token, and later
/// requests keep it.
#[tokio::test]
async fn a_dpop_client_steps_up_to_the_scope_the_api_asks_for() {
    let Some(idp) = start(Options::default()) else {
        return;
    };
    let dpop = Dpop::generate().unwrap();
    let layer = AuthLayer::builder(dpop_client(&idp, &dpop).await)
        .dpop(dpop.clone())
        .step_up(|scope| Some(TokenRequest::new().with_scope(format!("contacts:read {scope}"))))
        .build();
    let service = ServiceBuilder::new()
        .layer(layer.clone())
        .service(client::<Full<Bytes>>());
    let post = || {
        Request::post(format!("{}/contacts", idp.api))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(br#"{"name":"Ada"}"#)))
            .unwrap()
    };
    let created = step("POST", service.clone().oneshot(post())).await.unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let body = step("body", created.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(
        &body[..],
        br#"{"received":14}"#,
        "the body survives both replays"
    );
    let page = Request::get(format!("{}/contacts?page=1", idp.api))
        .body(Full::default())
        .unwrap();
    let read = step("GET", service.clone().oneshot(page)).await.unwrap();
    assert_eq!(read.status(), StatusCode::OK);

    let stats = step("stats", idp.stats()).await;
    // POST: nonce refusal, insufficient_scope, accepted; GET: accepted.
    assert_eq!(stats["use_dpop_nonce"], 1, "{stats}");
    assert_eq!(stats["insufficient_scope"], 1, "{stats}");
    assert_eq!(stats["accepted"], 2, "{stats}");
    assert_eq!(stats["requests"], 4, "{stats}");
    assert_eq!(stats["token_requests_ok"], 2, "{stats}");
    let cache = layer.cache().stats();
    assert_eq!(
        (cache.token_requests, cache.step_ups, cache.replays),
        (2, 1, 2)
    );
    assert_eq!(dpop.nonce_replays(), 1);
}
