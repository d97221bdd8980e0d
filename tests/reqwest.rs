//! The reqwest middleware (feature `reqwest`) against the same loopback identity provider and
//! API as the tower layer: single flight, one replay per 401, the rejection cooldown, streaming
//! bodies, sensitive headers, typed errors.
//!
//! reqwest keeps timers of its own (connection pool, timeouts), so these tests run on the real
//! clock. Every count below is exact: a burst is started in one poll of `join_all`, so every
//! request of it takes its token before any response is read, and waits only ever wait for a
//! lower bound (a token that must have expired), never for something to finish in time.

mod support;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use http::{Extensions, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Empty, StreamBody};
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware, Middleware, Next};
use tower::{ServiceBuilder, ServiceExt};
use tower_auth_refresh::reqwest_auth::{AuthMiddleware, ReqwestService};
use tower_auth_refresh::{AuthError, AuthLayer, Origin, TokenCache};

use support::{capture_traces, http_provider, Api, IdentityProvider, IdpMode, TokenRegistry};

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

fn client(middleware: AuthMiddleware) -> ClientWithMiddleware {
    ClientBuilder::new(reqwest::Client::new())
        .with(middleware)
        .build()
}

/// GET `path`; the body of a 200 is the token the API accepted.
async fn get(
    client: &ClientWithMiddleware,
    api: &Api,
    path: &str,
) -> Result<(StatusCode, String), reqwest_middleware::Error> {
    let response = client.get(api.url(path)).send().await?;
    let status = response.status();
    Ok((status, response.text().await?))
}

fn auth_error(error: &reqwest_middleware::Error) -> &AuthError {
    match error {
        reqwest_middleware::Error::Middleware(error) => error
            .downcast_ref::<AuthError>()
            .unwrap_or_else(|| panic!("not an AuthError: {error}")),
        reqwest_middleware::Error::Reqwest(error) => panic!("a reqwest error: {error}"),
    }
}

/// Behaviour 1: 1,000 concurrent requests that find the token expired make one token request.
#[tokio::test]
async fn thousand_requests_after_expiry_make_one_token_request() {
    // Long enough for the first request to reach the API with token-1 on a loaded machine.
    let w = world(Some(Duration::from_secs(1))).await;
    let middleware = AuthMiddleware::new(http_provider(&w.idp));
    let cache = middleware.cache().clone();
    let client = client(middleware);
    assert_eq!(
        get(&client, &w.api, "/whoami").await.unwrap(),
        (StatusCode::OK, "token-1".to_owned())
    );
    // The next token lives long enough for the whole burst.
    w.idp.set_ttl(Some(HOUR));
    // A lower bound only: token-1 has expired on the client's clock after its second.
    tokio::time::sleep(Duration::from_millis(1050)).await;
    assert_eq!(cache.stats().expires_in, Some(Duration::ZERO));

    let answers = join_all((0..1000).map(|_| get(&client, &w.api, "/whoami"))).await;
    for answer in answers {
        assert_eq!(answer.unwrap(), (StatusCode::OK, "token-2".to_owned()));
    }
    assert_eq!(w.idp.token_requests(), 2);
    assert_eq!(w.api.requests(), 1001, "an expired token is never sent");
    assert_eq!(w.api.rejected(), 0);
    let stats = cache.stats();
    assert_eq!((stats.invalidations, stats.replays), (0, 0));
}

/// Issue 12: with an unknown expiry, the API's 401 is the only sign; every rejected request is
/// replayed once (its body too), and all of them share one token request.
#[tokio::test]
async fn revoked_tokens_are_replayed_once_after_one_token_request() {
    let w = world(Some(HOUR)).await;
    w.idp.announce_expiry(false);
    let middleware = AuthMiddleware::new(http_provider(&w.idp));
    let cache = middleware.cache().clone();
    let client = client(middleware);
    assert_eq!(get(&client, &w.api, "/whoami").await.unwrap().1, "token-1");

    w.registry.revoke_all();
    let answers = join_all((0..100).map(|i| {
        let client = &client;
        let url = w.api.url("/echo");
        async move {
            let response = client
                .post(url)
                .body(format!("page-{i}"))
                .send()
                .await
                .unwrap();
            (i, response.status(), response.text().await.unwrap())
        }
    }))
    .await;
    for (i, status, body) in answers {
        assert_eq!((status, body), (StatusCode::OK, format!("page-{i}")));
    }
    assert_eq!(w.idp.token_requests(), 2, "one token request for 100 401s");
    assert_eq!(w.api.rejected(), 100);
    assert_eq!(w.api.served(), 1 + 100);
    assert_eq!(w.api.requests(), 1 + 100 + 100, "one replay each");
    let stats = cache.stats();
    assert_eq!(stats.replays, 100);
    assert_eq!(stats.invalidations, 1);
    assert_eq!(stats.stale_rejections, 99);
    assert_eq!(w.registry.rejected_tokens(), 1, "only token-1 was refused");
}

/// Behaviour 3: a 401 on the replay goes back unchanged, and a token refused as soon as it was
/// fetched is not refreshed again within the cooldown.
#[tokio::test]
async fn a_401_on_the_replay_is_returned_unchanged() {
    let w = world(Some(HOUR)).await;
    let middleware = AuthMiddleware::new(http_provider(&w.idp));
    let cache = middleware.cache().clone();
    let client = client(middleware);

    let (status, body) = get(&client, &w.api, "/always-401").await.unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body, "invalid or expired token");
    assert_eq!(w.api.requests(), 2, "the request and one replay");
    assert_eq!(w.idp.token_requests(), 2);
    assert_eq!(cache.stats().replays, 1);

    let (status, _) = get(&client, &w.api, "/always-401").await.unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        w.api.requests(),
        3,
        "token-2 was refused at once: no replay"
    );
    assert_eq!(w.idp.token_requests(), 2);
    let stats = cache.stats();
    assert_eq!((stats.replays, stats.repeated_rejections), (1, 1));
}

/// `insufficient_scope` is not an expiry, for reqwest too: no refresh, no replay.
#[tokio::test]
async fn insufficient_scope_is_never_refreshed_nor_replayed() {
    let w = world(Some(HOUR)).await;
    let middleware = AuthMiddleware::new(http_provider(&w.idp));
    let cache = middleware.cache().clone();
    let client = client(middleware);
    for _ in 0..5 {
        let (status, body) = get(&client, &w.api, "/needs-scope").await.unwrap();
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::UNAUTHORIZED, "insufficient scope")
        );
    }
    assert_eq!(w.api.requests(), 5);
    assert_eq!(w.idp.token_requests(), 1);
    let stats = cache.stats();
    assert_eq!(
        (stats.insufficient_scope, stats.invalidations, stats.replays),
        (5, 0, 0)
    );
}

/// tests/challenges.rs for reqwest: a claims challenge met by a burst costs one token request
/// with the claims, and each request is replayed once with its token.
#[tokio::test]
async fn claims_challenges_refresh_once_with_the_claims_and_replay() {
    let w = world(Some(HOUR)).await;
    let middleware = AuthMiddleware::new(http_provider(&w.idp));
    let cache = middleware.cache().clone();
    let client = client(middleware);
    let answers = join_all((0..20).map(|_| get(&client, &w.api, "/needs-claims"))).await;
    for answer in answers {
        assert_eq!(answer.unwrap(), (StatusCode::OK, "token-2".to_owned()));
    }
    assert_eq!((w.idp.token_requests(), w.idp.claims_requests()), (2, 1));
    assert!(w.registry.issued_with_claims("token-2"));
    let stats = cache.stats();
    assert_eq!((stats.claims_refreshes, stats.replays), (1, 20));
    assert_eq!(w.api.requests(), 40);
}

/// Step-up for reqwest: on the 401 and on the 403 of `insufficient_scope`.
#[tokio::test]
async fn step_up_to_the_challenged_scope() {
    for path in ["/needs-scope", "/needs-scope-403"] {
        let w = world(Some(HOUR)).await;
        let middleware = AuthMiddleware::builder(TokenCache::new(http_provider(&w.idp)))
            .step_up_to_challenged_scope()
            .build();
        let cache = middleware.cache().clone();
        let client = client(middleware);
        let answers = join_all((0..10).map(|_| get(&client, &w.api, path))).await;
        for answer in answers {
            assert_eq!(
                answer.unwrap(),
                (StatusCode::OK, "token-2".to_owned()),
                "{path}"
            );
        }
        assert_eq!(w.idp.token_requests(), 2);
        assert_eq!(w.registry.scope_of("token-2").as_deref(), Some("admin"));
        let stats = cache.stats();
        assert_eq!((stats.step_ups, stats.replays), (1, 10));
    }
}

/// tests/refresh.rs `an_endpoint_that_refuses_every_token_costs_one_token_request_per_cooldown`
/// for reqwest: an endpoint that refuses every token costs one token request per cooldown, and
/// every other endpoint keeps working. The cooldown is long enough that the whole run fits in
/// one on any machine, which makes the counts exact.
#[tokio::test]
async fn an_endpoint_that_refuses_every_token_costs_one_token_request_per_cooldown() {
    let w = world(Some(HOUR)).await;
    let cache = TokenCache::builder(http_provider(&w.idp))
        .rejection_cooldown(Duration::from_secs(600))
        .build();
    let client = client(AuthMiddleware::with_cache(cache.clone()));

    for i in 0..200 {
        let (status, _) = get(&client, &w.api, "/always-401").await.unwrap();
        assert_eq!(status, StatusCode::UNAUTHORIZED, "request {i}");
        let (status, token) = get(&client, &w.api, "/whoami").await.unwrap();
        assert_eq!((status, token.as_str()), (StatusCode::OK, "token-2"), "{i}");
    }

    // token-1, then one rejection-driven refresh.
    assert_eq!(w.idp.token_requests(), 2);
    let stats = cache.stats();
    assert_eq!(stats.invalidations, 1);
    assert_eq!(stats.replays, 1, "only a refresh earns a replay");
    assert_eq!(stats.repeated_rejections, 199);
    assert_eq!(w.api.served(), 200, "every healthy request");
    assert_eq!(w.api.requests(), 401);
}

/// A replay that goes through shows that refreshing on a 401 works for this API: the next
/// revocation, well within the cooldown, is an expiry again and is replayed.
#[tokio::test]
async fn an_accepted_replay_lifts_the_cooldown() {
    let w = world(Some(HOUR)).await;
    w.idp.announce_expiry(false);
    let cache = TokenCache::builder(http_provider(&w.idp))
        .rejection_cooldown(Duration::from_secs(600))
        .build();
    let client = client(AuthMiddleware::with_cache(cache.clone()));
    assert_eq!(get(&client, &w.api, "/whoami").await.unwrap().1, "token-1");

    w.registry.revoke_all();
    assert_eq!(get(&client, &w.api, "/whoami").await.unwrap().1, "token-2");
    w.registry.revoke_all();
    assert_eq!(get(&client, &w.api, "/whoami").await.unwrap().1, "token-3");

    assert_eq!(w.idp.token_requests(), 3);
    let stats = cache.stats();
    assert_eq!((stats.replays, stats.invalidations), (2, 2));
    assert_eq!(stats.repeated_rejections, 0);
    assert_eq!(w.api.requests(), 5);
}

/// Behaviour 4: a streaming body cannot be cloned, so its 401 goes back unchanged (and a debug
/// event says why); the rejection still invalidates the token for the next request.
#[tokio::test]
async fn a_streaming_body_is_not_replayed() {
    let (traces, _guard) = capture_traces();
    let w = world(Some(HOUR)).await;
    w.idp.announce_expiry(false);
    let middleware = AuthMiddleware::new(http_provider(&w.idp));
    let cache = middleware.cache().clone();
    let client = client(middleware);
    assert_eq!(get(&client, &w.api, "/whoami").await.unwrap().1, "token-1");

    w.registry.revoke_all();
    let chunks = ["first ", "second"]
        .map(|chunk| Ok::<_, Infallible>(Frame::data(Bytes::from_static(chunk.as_bytes()))));
    let body = reqwest::Body::wrap(StreamBody::new(futures::stream::iter(chunks)));
    let response = client
        .post(w.api.url("/echo"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(w.api.requests(), 2, "not replayed");
    let stats = cache.stats();
    assert_eq!((stats.replays, stats.invalidations), (0, 1));
    assert!(
        traces.text().contains("the request body is a stream"),
        "{}",
        traces.text()
    );

    assert_eq!(get(&client, &w.api, "/whoami").await.unwrap().1, "token-2");
    assert_eq!(w.idp.token_requests(), 2);
}

/// What the request looks like below the middleware: its `Debug` and whether the header is
/// marked sensitive.
#[derive(Clone, Default)]
struct Inspect(Arc<Mutex<Vec<(String, bool)>>>);

#[async_trait::async_trait]
impl Middleware for Inspect {
    async fn handle(
        &self,
        request: reqwest::Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        let sensitive = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .is_some_and(|value| value.is_sensitive());
        self.0
            .lock()
            .unwrap()
            .push((format!("{request:?}"), sensitive));
        next.run(request, extensions).await
    }
}

/// Behaviour 9: the header is marked sensitive, so reqwest's `Debug` of the request, tracing,
/// and our own `Debug` never show the token.
#[tokio::test]
async fn the_header_is_sensitive() {
    let (traces, _guard) = capture_traces();
    let w = world(Some(HOUR)).await;
    w.idp.announce_expiry(false);
    let middleware = AuthMiddleware::new(http_provider(&w.idp));
    let cache = middleware.cache().clone();
    let inspect = Inspect::default();
    let client = ClientBuilder::new(reqwest::Client::new())
        .with(middleware.clone())
        .with(inspect.clone())
        .build();
    assert_eq!(get(&client, &w.api, "/whoami").await.unwrap().1, "token-1");
    // A replay, so that the second header is seen too.
    w.registry.revoke_all();
    assert_eq!(get(&client, &w.api, "/whoami").await.unwrap().1, "token-2");
    assert_eq!(cache.stats().replays, 1);

    let seen = inspect.0.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "the requests and the replay");
    for (debug, sensitive) in seen {
        assert!(sensitive, "{debug}");
        assert!(debug.contains("Sensitive"), "{debug}");
        assert!(!debug.contains("token-"), "{debug}");
    }
    for text in [
        traces.text(),
        format!("{middleware:?}"),
        format!("{cache:?}"),
    ] {
        assert!(!text.contains("token-1"), "{text}");
        assert!(!text.contains("token-2"), "{text}");
    }
}

/// Behaviour 11: a request that brings its own credential is sent as it is: no token request,
/// no replay of its 401.
#[tokio::test]
async fn a_request_with_its_own_authorization_is_sent_as_it_is() {
    let w = world(Some(HOUR)).await;
    let middleware = AuthMiddleware::new(http_provider(&w.idp));
    let cache = middleware.cache().clone();
    let client = client(middleware);
    let response = client
        .get(w.api.url("/whoami"))
        .bearer_auth("mine")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(w.api.requests(), 1);
    assert_eq!(w.idp.token_requests(), 0);
    assert_eq!(
        w.registry.rejected_tokens(),
        1,
        "the caller's token was sent"
    );
    assert_eq!(cache.stats().invalidations, 0);
}

/// Tokens go only to the allowed origins; another origin's 401 is not replayed.
#[tokio::test]
async fn tokens_go_only_to_allowed_origins() {
    let w = world(Some(HOUR)).await;
    let elsewhere = Api::start(w.registry.clone(), 0).await;
    let api_origin = Origin::parse(&w.api.url("/")).unwrap();
    let cache = TokenCache::new(http_provider(&w.idp));
    let client = client(
        AuthMiddleware::builder(cache.clone())
            .allowed_origins([api_origin])
            .build(),
    );

    assert_eq!(get(&client, &w.api, "/whoami").await.unwrap().1, "token-1");
    let (status, _) = get(&client, &elsewhere, "/whoami").await.unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(elsewhere.requests(), 1, "not replayed");
    assert_eq!(elsewhere.with_authorization(), 0, "no token sent");
    assert_eq!(w.idp.token_requests(), 1);
    assert_eq!(cache.stats().invalidations, 0);
}

/// Behaviour 6: a failed refresh is an `AuthError` inside `Error::Middleware`; nothing is sent.
#[tokio::test]
async fn a_failed_refresh_is_a_typed_middleware_error() {
    let w = world(Some(HOUR)).await;
    w.idp.set_mode(IdpMode::Fail);
    let client = client(AuthMiddleware::new(http_provider(&w.idp)));

    let error = get(&client, &w.api, "/whoami").await.unwrap_err();
    assert!(error.is_middleware());
    assert!(
        matches!(auth_error(&error), AuthError::Refresh { .. }),
        "{error:?}"
    );
    // The next request within the backoff gets the backoff, without a token request.
    let error = get(&client, &w.api, "/whoami").await.unwrap_err();
    assert!(
        matches!(auth_error(&error), AuthError::Backoff { .. }),
        "{error:?}"
    );
    assert_eq!(w.idp.token_requests(), 1);
    assert_eq!(w.api.requests(), 0, "nothing sent without a token");
}

/// The tower layer over `ReqwestService`: reqwest gets what hyper gets, a streamed body
/// recorded while it is sent and replayed once after a 401.
#[tokio::test]
async fn the_tower_layer_over_reqwest_replays_a_streamed_body() {
    let w = world(Some(HOUR)).await;
    w.idp.announce_expiry(false);
    let layer = AuthLayer::new(http_provider(&w.idp));
    let service = ServiceBuilder::new()
        .layer(layer.clone())
        .service(ReqwestService::new(reqwest::Client::new()));
    let request = http::Request::get(w.api.url("/whoami"))
        .body(Empty::<Bytes>::new().boxed())
        .unwrap();
    let response = service.clone().oneshot(request).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "token-1");

    w.registry.revoke_all();
    // `/upload` reads the whole body before it checks the token, so the body has been
    // recorded completely when the 401 arrives.
    let chunks = ["first ", "second"]
        .map(|chunk| Ok::<_, Infallible>(Frame::data(Bytes::from_static(chunk.as_bytes()))));
    let request = http::Request::post(w.api.url("/upload"))
        .body(StreamBody::new(futures::stream::iter(chunks)).boxed())
        .unwrap();
    let response = service.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "first second", "the replay sent the whole body again");

    assert_eq!(w.idp.token_requests(), 2);
    assert_eq!(
        w.api.requests(),
        3,
        "the GET, the upload and its one replay"
    );
    let stats = layer.cache().stats();
    assert_eq!((stats.replays, stats.invalidations), (1, 1));
}
