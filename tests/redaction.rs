//! No public type shows a secret in `Debug`, whatever state it is in. One place that lists them
//! all, so a new type that forgets to redact is caught here.
//!
//! Errors too: what a server controls (an `error_description`, a redirect's `Location`, an
//! issuer) reaches `Display` and `Debug` filtered and bounded, and no URL is shown with its
//! user name, password, query or fragment.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use tower::{service_fn, Layer, ServiceExt};
use tower_auth_refresh::oauth2::{ClientCredentials, RefreshTokenGrant, Secret};
use tower_auth_refresh::retry::RetryPolicy;
use tower_auth_refresh::{provider_fn, AuthLayer, ReplayBody, StaticToken, Token, TokenCache};

const ACCESS: &str = "access-53cr3t";
const REFRESH: &str = "refresh-53cr3t";
const CLIENT_SECRET: &str = "client-53cr3t";

fn token() -> Token {
    Token::new(ACCESS)
        .with_refresh_token(REFRESH)
        .with_expires_in(Duration::from_secs(3600))
        .with_scope("contacts:read")
}

fn assert_redacted(what: &str, shown: String) {
    for secret in ["53cr3t", ACCESS, REFRESH, CLIENT_SECRET] {
        assert!(!shown.contains(secret), "{what} shows a secret: {shown}");
    }
}

#[tokio::test]
async fn every_public_type_redacts_its_secrets() {
    assert_redacted("Token", format!("{:?}", token()));
    assert_redacted("StaticToken", format!("{:?}", StaticToken::new(token())));
    assert_redacted("Secret", format!("{:?}", Secret::new(CLIENT_SECRET)));
    assert_redacted(
        "ProviderFn",
        format!(
            "{:?}",
            provider_fn(|| async { Ok::<_, std::io::Error>(token()) })
        ),
    );

    let builder = TokenCache::builder(StaticToken::new(token()));
    assert_redacted("TokenCacheBuilder", format!("{builder:?}"));
    let cache = builder.build();
    cache.token().await.unwrap();
    assert_redacted("TokenCache holding a token", format!("{cache:?}"));
    assert_redacted("CacheStats", format!("{:?}", cache.stats()));

    let layer_builder = AuthLayer::builder(StaticToken::new(token()));
    assert_redacted("AuthLayerBuilder", format!("{layer_builder:?}"));
    let layer = AuthLayer::with_cache(cache.clone());
    assert_redacted("AuthLayer", format!("{layer:?}"));

    // The request the inner service sees: the header is there, and marked sensitive.
    let inner = service_fn(
        |request: http::Request<ReplayBody<Full<Bytes>>>| async move {
            assert_redacted("the request's headers", format!("{:?}", request.headers()));
            assert_redacted("the request", format!("{request:?}"));
            assert!(request.headers()["authorization"].is_sensitive());
            Ok::<_, std::convert::Infallible>(http::Response::new(()))
        },
    );
    let service = layer.layer(inner);
    assert_redacted(
        "AuthService",
        format!("{service:?}").replace("ServiceFn", ""),
    );
    service
        .oneshot(http::Request::new(Full::new(Bytes::from_static(b"body"))))
        .await
        .unwrap();

    let url = "https://idp.example/oauth/token";
    let client_credentials = ClientCredentials::builder(url, "id", CLIENT_SECRET).scope("s");
    assert_redacted(
        "ClientCredentialsBuilder",
        format!("{client_credentials:?}"),
    );
    let client_credentials = client_credentials.build().unwrap();
    assert_redacted("ClientCredentials", format!("{client_credentials:?}"));
    let grant = RefreshTokenGrant::builder(url, "id", REFRESH)
        .client_secret(CLIENT_SECRET)
        .fallback(client_credentials);
    assert_redacted("RefreshTokenGrantBuilder", format!("{grant:?}"));
    let grant = grant.build().unwrap();
    assert_redacted("RefreshTokenGrant", format!("{grant:?}"));
    assert_redacted(
        "RefreshTokenGrant::refresh_token",
        format!("{:?}", grant.refresh_token().await),
    );

    assert_redacted("RetryPolicy", format!("{:?}", RetryPolicy::new()));
}

/// What a `TokenStore` is handed (the token being replaced, the provider handle) and the Redis
/// store's own types.
#[tokio::test]
async fn store_types_redact_their_secrets() {
    use std::sync::{Arc, Mutex};
    use tower_auth_refresh::store::{FetchToken, RefreshRequest, StoreFuture, TokenStore};

    #[derive(Clone, Default)]
    struct Recording(Arc<Mutex<Vec<String>>>);
    impl TokenStore for Recording {
        fn refresh(&self, request: RefreshRequest, fetch: FetchToken) -> StoreFuture {
            self.0
                .lock()
                .unwrap()
                .push(format!("{request:?} {:?} {fetch:?}", request.replacing()));
            Box::pin(fetch.fetch())
        }
    }
    let recording = Recording::default();
    let cache = TokenCache::builder(StaticToken::new(
        token().with_expires_in(Duration::from_millis(1)),
    ))
    .refresh_skew(Duration::ZERO)
    .store(recording.clone())
    .build();
    let _ = cache.token().await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let _ = cache.token().await;
    let seen = recording.0.lock().unwrap().clone();
    assert!(seen.len() >= 2 && seen[1].contains("Token {"), "{seen:?}");
    for shown in seen {
        assert_redacted("RefreshRequest and FetchToken", shown);
    }

    #[cfg(feature = "redis")]
    {
        use tower_auth_refresh::redis_store::{EncryptionKey, RedisStore};
        let key = EncryptionKey::from_hex(&"5e".repeat(32)).unwrap();
        assert_redacted("EncryptionKey", format!("{key:?}"));
        let builder = RedisStore::builder("redis://:pass-53cr3t@127.0.0.1:1/", "ns")
            .unwrap()
            .encryption_key(key);
        assert_redacted("RedisStoreBuilder", format!("{builder:?}"));
        let shown = format!("{:?}", builder.build());
        assert!(!shown.contains("5e5e"), "RedisStore shows its key: {shown}");
        assert_redacted("RedisStore", shown);
    }
}

// --- server-controlled text and URLs in errors ------------------------------------------------

#[allow(dead_code)]
mod token_server;

use http::StatusCode;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use token_server::{Fault, Metadata, TokenServer, BASIC_ID, BASIC_SECRET};
use tower_auth_refresh::oauth2::{self, discover, HttpTransport};
use tower_auth_refresh::{AuthError, ErrorCode};

/// What a hostile or broken server may put in its text: a forged log line (CR/LF), terminal
/// escapes (clear screen, colour), a bell, a right-to-left override and a zero-width space
/// that make text read differently than it is, and 10 KiB of padding.
fn hostile_text() -> String {
    format!(
        "refresh token revoked\r\nINFO forged log line\u{1b}[2J\u{1b}[31mred\u{1b}[0m\u{7}\u{202e}gnp.exe\u{200b}{}",
        "A".repeat(10 * 1024)
    )
}

/// Credentials in the userinfo and in the query, and a fragment.
const HOSTILE_URL: &str =
    "https://user:pa55w0rd@evil.example:8443/collect/path?client_secret=53cr3t&x=1#frag-53cr3t";
/// What may be shown of it.
const SHOWN_URL: &str = "https://evil.example:8443/collect/path";

fn http_transport() -> HttpTransport {
    oauth2::transport(Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>())
}

/// The start of a long text, for a failure message.
fn start(shown: &str) -> String {
    shown.chars().take(300).collect()
}

/// No character that moves the cursor, rings, recolours, reorders or hides text.
#[track_caller]
fn assert_printable(what: &str, shown: &str) {
    let bad = |c: char| {
        c.is_control()
            || matches!(c, '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
    };
    assert!(
        !shown.contains(bad),
        "{what} carries raw control characters: {shown:?}"
    );
}

/// Display and Debug, each printable, each of bounded length, neither with a credential.
#[track_caller]
fn assert_safe(what: &str, error: &AuthError, max_len: usize) {
    for shown in [error.to_string(), format!("{error:?}")] {
        assert_printable(what, &shown);
        assert!(
            shown.chars().count() <= max_len,
            "{what} is {} characters long: {}",
            shown.chars().count(),
            start(&shown)
        );
        for secret in ["pa55w0rd", "user:", "53cr3t", "client_secret", "frag"] {
            assert!(
                !shown.contains(secret),
                "{what} shows {secret:?}: {}",
                start(&shown)
            );
        }
    }
}

#[tokio::test]
async fn a_hostile_error_description_is_filtered_and_capped() {
    let server = TokenServer::start().await;
    let provider = oauth2::ClientCredentials::builder(server.token_url(), BASIC_ID, BASIC_SECRET)
        .transport(http_transport())
        .build()
        .unwrap();
    server.push_fault(Fault::Error {
        status: StatusCode::BAD_REQUEST,
        code: format!("invalid_grant\u{1b}[31m{}", "B".repeat(10 * 1024)),
        description: Some(hostile_text()),
        uri: Some(HOSTILE_URL.to_owned()),
    });
    let error = provider.request_token().await.unwrap_err();
    assert_eq!(server.token_requests(), 1);
    assert!(
        matches!(&error, AuthError::TokenEndpoint(e) if e.status == StatusCode::BAD_REQUEST),
        "{error:?}"
    );
    assert_safe("a hostile error response", &error, 800);
    let shown = error.to_string();
    // What the server said is still readable, its control characters visibly escaped.
    assert!(
        shown.contains(r"refresh token revoked\r\nINFO forged log line\u{1b}[2J"),
        "{shown}"
    );
    assert!(shown.ends_with("..."), "{shown}");

    // An RFC 6749 description passes unchanged.
    server.push_fault(Fault::error(
        400,
        "invalid_grant",
        "The refresh token expired (after 30 days); sign in again.",
        "https://idp.example/errors/invalid_grant",
    ));
    let error = provider.request_token().await.unwrap_err();
    assert_eq!(error.error_code(), Some(&ErrorCode::InvalidGrant));
    assert_eq!(
        error.to_string(),
        "the token endpoint refused the request (400 Bad Request, invalid_grant): The refresh token expired (after 30 days); sign in again."
    );
}

#[tokio::test]
async fn redirect_locations_never_show_credentials_or_queries() {
    let server = TokenServer::start().await;
    let provider = oauth2::ClientCredentials::builder(server.token_url(), BASIC_ID, BASIC_SECRET)
        .transport(http_transport())
        .build()
        .unwrap();
    for (location, shown) in [
        (HOSTILE_URL, SHOWN_URL),
        ("/login?token=53cr3t", "/login"),
        ("//user:pa55w0rd@evil.example/p", "//evil.example/p"),
        (
            "https://u:pa55w0rd?x@evil.example/p",
            "https://evil.example/p",
        ),
    ] {
        server.push_fault(Fault::Redirect {
            location: location.to_owned(),
        });
        let error = provider.request_token().await.unwrap_err();
        assert!(
            matches!(&error, AuthError::Redirected { location: Some(l), .. } if l == shown),
            "{location}: {error:?}"
        );
        assert!(error.to_string().contains(shown), "{error}");
        assert_safe(location, &error, 400);
    }
}

#[tokio::test]
async fn insecure_urls_never_show_credentials_or_queries() {
    let insecure = "http://user:pa55w0rd@idp.example/token?client_secret=53cr3t#frag";
    let builder = oauth2::ClientCredentials::builder(insecure, BASIC_ID, BASIC_SECRET)
        .transport(http_transport());
    assert_redacted(
        "a builder for a URL with credentials",
        format!("{builder:?}"),
    );
    let error = builder.build().unwrap_err();
    assert!(
        matches!(&error, AuthError::InsecureUrl { url } if url == "http://idp.example/token"),
        "{error:?}"
    );
    assert_safe("InsecureUrl", &error, 400);
    let error = RefreshTokenGrant::builder(insecure, BASIC_ID, "rt")
        .transport(http_transport())
        .build()
        .unwrap_err();
    assert_safe("InsecureUrl from the refresh grant", &error, 400);

    // Allowed (loopback), the providers' Debug still hides them.
    let loopback = "http://user:pa55w0rd@127.0.0.1:9/token?client_secret=53cr3t";
    let provider = oauth2::ClientCredentials::builder(loopback, BASIC_ID, BASIC_SECRET)
        .transport(http_transport())
        .build()
        .unwrap();
    assert_redacted("ClientCredentials", format!("{provider:?}"));
    let grant = RefreshTokenGrant::builder(loopback, BASIC_ID, "rt")
        .transport(http_transport())
        .build()
        .unwrap();
    assert_redacted("RefreshTokenGrant", format!("{grant:?}"));
    for shown in [format!("{provider:?}"), format!("{grant:?}")] {
        assert!(!shown.contains("pa55w0rd"), "{shown}");
        assert!(shown.contains("http://127.0.0.1:9/token"), "{shown}");
    }

    // A token endpoint named by the identity provider's metadata.
    let server = TokenServer::start().await;
    server.set_discovery(
        Some(Metadata {
            token_endpoint: insecure.to_owned(),
            ..server.metadata()
        }),
        None,
    );
    let error = discover(&server.issuer(), &http_transport(), false)
        .await
        .unwrap_err();
    assert!(matches!(error, AuthError::InsecureUrl { .. }), "{error:?}");
    assert_safe("InsecureUrl from discovery", &error, 400);
}

#[tokio::test]
async fn discovery_errors_never_show_credentials_nor_raw_server_text() {
    let server = TokenServer::start().await;
    // An issuer given with credentials in it (loopback, so it is allowed).
    let issuer = server.issuer().replace("http://", "http://user:pa55w0rd@");
    server.set_discovery(None, None);
    let error = discover(&issuer, &http_transport(), false)
        .await
        .unwrap_err();
    assert_safe("an issuer with credentials", &error, 1000);

    // A document naming a hostile issuer.
    server.set_discovery(
        Some(Metadata {
            issuer: format!("https://other.example/{}", hostile_text()),
            ..server.metadata()
        }),
        None,
    );
    let error = discover(&server.issuer(), &http_transport(), false)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, AuthError::Discovery { reason, .. } if reason.contains("other.example")),
        "{error:?}"
    );
    assert_safe("a lying, hostile document", &error, 1000);
}

/// The variants a program may build itself are shown the same way.
#[test]
fn errors_built_by_hand_are_shown_safely_too() {
    for error in [
        AuthError::Redirected {
            status: StatusCode::FOUND,
            location: Some(format!("{HOSTILE_URL}\r\n{}", hostile_text())),
        },
        AuthError::InsecureUrl {
            url: HOSTILE_URL.to_owned(),
        },
        AuthError::InsecureUrl {
            url: format!("http://a.example/{}", hostile_text()),
        },
        AuthError::MalformedResponse {
            status: StatusCode::OK,
            excerpt: hostile_text(),
        },
        AuthError::UnsupportedTokenType {
            token_type: hostile_text(),
        },
        AuthError::Discovery {
            issuer: HOSTILE_URL.to_owned(),
            reason: hostile_text(),
        },
    ] {
        assert_safe("an error built by hand", &error, 1000);
    }
    let shown = AuthError::InsecureUrl {
        url: HOSTILE_URL.to_owned(),
    }
    .to_string();
    assert!(shown.contains(SHOWN_URL), "{shown}");
}
