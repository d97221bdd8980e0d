//! Against a complete, standard identity provider: the certified `oidc-provider` (Node.js) on
//! loopback, from `tests/oidc-provider/`, and the protected API the fixture serves next to it.
//! `.ci/run` installs it (`npm ci`); elsewhere these tests are skipped, with a note, when the
//! package is missing (launcher: `tests/support/oidc_provider.rs`).

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{ServiceBuilder, ServiceExt};
use tower_auth_refresh::oauth2::{
    discover, transport, ClientAuth, ClientCredentials, HttpTransport,
};
use tower_auth_refresh::testkit::client;
use tower_auth_refresh::{AuthError, AuthLayer, ErrorCode, TokenCache};

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
