//! No public type shows a secret in `Debug`, whatever state it is in. One place that lists them
//! all, so a new type that forgets to redact is caught here.

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
