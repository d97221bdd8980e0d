//! Challenges that ask for something (issue 14): `insufficient_claims` refreshes with the claims
//! and replays once; `insufficient_scope` goes back unchanged unless a step-up hook asks for the
//! scope. Against the loopback identity provider and API, through hyper-util clients.
//!
//! A burst is started in one poll of `join_all`, so every request of it waits for the first
//! token and is sent with it before any response is read: every count below is exact.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use http::{Request, StatusCode};
use http_body_util::{Empty, Full};
use tokio::time::advance;
use tower::{ServiceBuilder, ServiceExt};
use tower_auth_refresh::oauth2::ClientCredentials;
use tower_auth_refresh::testkit::CLAIMS_CHALLENGE;
use tower_auth_refresh::{
    provider_fn, AuthLayer, AuthService, ProviderFuture, TokenProvider, TokenRequest,
};

use support::{
    body_string, client, http_provider, manual_clock, Api, IdentityProvider, TokenRegistry,
};

type Client<B> = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    tower_auth_refresh::ReplayBody<B>,
>;

const HOUR: Duration = Duration::from_secs(3600);

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

fn service(layer: &AuthLayer) -> AuthService<Client<Empty<Bytes>>> {
    ServiceBuilder::new().layer(layer.clone()).service(client())
}

/// `n` concurrent GETs of `path`: each one's status and body.
async fn burst(
    service: &AuthService<Client<Empty<Bytes>>>,
    api: &Api,
    path: &str,
    n: usize,
) -> Vec<(StatusCode, String)> {
    join_all((0..n).map(|_| async {
        let request = Request::get(api.url(path)).body(Empty::new()).unwrap();
        let response = service.clone().oneshot(request).await.unwrap();
        (response.status(), body_string(response).await)
    }))
    .await
}

/// Every answer is `status` with `body`.
fn all(answers: &[(StatusCode, String)], status: StatusCode, body: &str) -> bool {
    answers
        .iter()
        .all(|(got, text)| *got == status && text == body)
}

/// Records what each token request asked for, and asks the identity provider through the
/// test kit's provider (which sends scope and claims as form parameters).
struct Recording {
    inner: Box<dyn TokenProvider>,
    asked: Arc<Mutex<Vec<TokenRequest>>>,
}

impl TokenProvider for Recording {
    fn fetch_token(&self) -> ProviderFuture {
        self.fetch_token_for(&TokenRequest::default())
    }

    fn fetch_token_for(&self, request: &TokenRequest) -> ProviderFuture {
        self.asked.lock().unwrap().push(request.clone());
        self.inner.fetch_token_for(request)
    }
}

/// 50 requests meet one claims challenge for the same token: one token request carries the
/// claims (decoded from the challenge), and every request is replayed once with its token.
#[tokio::test]
async fn fifty_claims_challenges_cost_one_token_request_with_the_claims() {
    let w = world().await;
    let asked = Arc::new(Mutex::new(Vec::new()));
    let layer = AuthLayer::new(Recording {
        inner: Box::new(http_provider(&w.idp)),
        asked: asked.clone(),
    });
    let answers = burst(&service(&layer), &w.api, "/needs-claims", 50).await;

    assert!(all(&answers, StatusCode::OK, "token-2"), "{answers:?}");
    assert_eq!((w.idp.token_requests(), w.idp.claims_requests()), (2, 1));
    assert!(w.registry.issued_with_claims("token-2"));
    assert_eq!(
        *asked.lock().unwrap(),
        [
            TokenRequest::new(),
            TokenRequest::new().with_claims(CLAIMS_CHALLENGE)
        ]
    );
    let stats = layer.cache().stats();
    assert_eq!(
        (stats.claims_refreshes, stats.replays, stats.invalidations),
        (1, 50, 1)
    );
    assert_eq!((stats.stale_rejections, stats.step_ups), (49, 0));
    assert_eq!(w.api.requests(), 100);
}

/// A provider that cannot honour claims (a `provider_fn` closure, which never sees the request)
/// is still asked for the claims refresh; an API that keeps refusing its tokens gets each
/// request back after one replay, and costs one token request per rejection cooldown.
#[tokio::test(start_paused = true)]
async fn claims_an_api_never_accepts_cost_one_token_request_per_cooldown() {
    let _clock = manual_clock();
    let w = world().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let idp = Arc::new(http_provider(&w.idp));
    let layer = AuthLayer::new(provider_fn(move || {
        counter.fetch_add(1, Ordering::SeqCst);
        idp.fetch_token()
    }));
    let service = service(&layer);
    let claims = |status: StatusCode, body: String| {
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::UNAUTHORIZED, "insufficient claims")
        );
    };

    for _ in 0..3 {
        for (status, body) in burst(&service, &w.api, "/needs-claims", 1).await {
            claims(status, body);
        }
    }
    // The first request was replayed with token-2 (fetched for the claims, without them);
    // token-2's refusals within the cooldown go back without a refresh or a replay.
    assert_eq!(
        (calls.load(Ordering::SeqCst), w.idp.token_requests()),
        (2, 2)
    );
    let stats = layer.cache().stats();
    assert_eq!(
        (
            stats.claims_refreshes,
            stats.replays,
            stats.repeated_rejections
        ),
        (1, 1, 2)
    );

    advance(Duration::from_secs(5)).await;
    for _ in 0..3 {
        for (status, body) in burst(&service, &w.api, "/needs-claims", 1).await {
            claims(status, body);
        }
    }
    assert_eq!(
        (calls.load(Ordering::SeqCst), w.idp.token_requests()),
        (3, 3)
    );
    assert_eq!(w.idp.claims_requests(), 0);
    let stats = layer.cache().stats();
    assert_eq!(
        (
            stats.claims_refreshes,
            stats.replays,
            stats.repeated_rejections
        ),
        (2, 2, 4)
    );
    // 6 requests, 2 of them replayed.
    assert_eq!(w.api.requests(), 8);
}

/// Without a step-up hook `insufficient_scope` goes back unchanged, on a 401 as on a 403 (which
/// the default predicate does not even look at).
#[tokio::test]
async fn insufficient_scope_without_a_hook_goes_back_unchanged() {
    let w = world().await;
    let layer = AuthLayer::new(http_provider(&w.idp));
    let service = service(&layer);
    let answers = burst(&service, &w.api, "/needs-scope", 1).await;
    assert!(all(
        &answers,
        StatusCode::UNAUTHORIZED,
        "insufficient scope"
    ));
    let answers = burst(&service, &w.api, "/needs-scope-403", 1).await;
    assert!(all(&answers, StatusCode::FORBIDDEN, "insufficient scope"));
    assert_eq!(w.idp.token_requests(), 1);
    let stats = layer.cache().stats();
    assert_eq!(
        (stats.insufficient_scope, stats.step_ups, stats.replays),
        (1, 0, 0)
    );
    assert_eq!(w.api.requests(), 2);
}

async fn step_up_to_the_challenged_scope(path: &str) {
    let w = world().await;
    let layer = AuthLayer::builder(http_provider(&w.idp))
        .step_up_to_challenged_scope()
        .build();
    let answers = burst(&service(&layer), &w.api, path, 20).await;

    assert!(all(&answers, StatusCode::OK, "token-2"), "{answers:?}");
    assert_eq!(w.idp.token_requests(), 2);
    assert_eq!(w.registry.scope_of("token-1"), None);
    assert_eq!(w.registry.scope_of("token-2").as_deref(), Some("admin"));
    let stats = layer.cache().stats();
    assert_eq!(
        (stats.insufficient_scope, stats.step_ups, stats.replays),
        (20, 1, 20)
    );
    assert_eq!(w.api.requests(), 40);
}

/// With `step_up_to_challenged_scope`, 20 requests refused for a scope (401) cost one token
/// request for that scope, and each is replayed once with it.
#[tokio::test]
async fn step_up_on_401() {
    step_up_to_the_challenged_scope("/needs-scope").await;
}

/// The same on a 403, where RFC 6750 puts `insufficient_scope`.
#[tokio::test]
async fn step_up_on_403() {
    step_up_to_the_challenged_scope("/needs-scope-403").await;
}

/// A hook that declines (`None`) leaves the response unchanged: no refresh, no replay.
#[tokio::test]
async fn a_declining_step_up_hook_changes_nothing() {
    let w = world().await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let layer = AuthLayer::builder(http_provider(&w.idp))
        .step_up(move |scope| {
            record.lock().unwrap().push(scope.to_owned());
            None
        })
        .build();
    let service = service(&layer);
    let answers = burst(&service, &w.api, "/needs-scope", 3).await;
    assert!(all(
        &answers,
        StatusCode::UNAUTHORIZED,
        "insufficient scope"
    ));
    let answers = burst(&service, &w.api, "/needs-scope-403", 2).await;
    assert!(all(&answers, StatusCode::FORBIDDEN, "insufficient scope"));
    assert_eq!(*seen.lock().unwrap(), ["admin"; 5]);
    assert_eq!(w.idp.token_requests(), 1);
    let stats = layer.cache().stats();
    assert_eq!(
        (
            stats.insufficient_scope,
            stats.step_ups,
            stats.replays,
            stats.invalidations
        ),
        (5, 0, 0, 0)
    );
    assert_eq!(w.api.requests(), 5);
}

/// A POST refused for a scope is replayed through the one replay path, its body intact.
#[tokio::test]
async fn a_post_is_replayed_with_its_body_after_a_step_up() {
    let w = world().await;
    let layer = AuthLayer::builder(http_provider(&w.idp))
        .step_up_to_challenged_scope()
        .build();
    let service = ServiceBuilder::new()
        .layer(layer.clone())
        .service(client::<Full<Bytes>>());
    let payload: Bytes = (0..20_000u32)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<_>>()
        .into();
    let request = Request::post(w.api.url("/needs-scope-403"))
        .body(Full::new(payload.clone()))
        .unwrap();
    let response = service.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(body, payload);
    assert_eq!((w.idp.token_requests(), w.api.requests()), (2, 2));
    let stats = layer.cache().stats();
    assert_eq!((stats.step_ups, stats.replays), (1, 1));
}

/// The keyed layer goes through the same response future: claims and step-up work per key.
#[tokio::test]
async fn the_keyed_layer_acts_on_challenges_too() {
    let w = world().await;
    let idp = w.idp.clone();
    let layer = AuthLayer::keyed(
        |request: &http::request::Parts| Some(request.uri.path().to_owned()),
        move |_path: &String| http_provider(&idp),
    )
    .step_up_to_challenged_scope()
    .build();
    let service = ServiceBuilder::new()
        .layer(layer.clone())
        .service(client::<Empty<Bytes>>());
    for path in ["/needs-claims", "/needs-scope"] {
        let request = Request::get(w.api.url(path)).body(Empty::new()).unwrap();
        let response = service.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
    let claims = layer.cache(&"/needs-claims".to_owned()).unwrap().stats();
    let scope = layer.cache(&"/needs-scope".to_owned()).unwrap().stats();
    assert_eq!(
        (
            claims.claims_refreshes,
            claims.replays,
            claims.token_requests
        ),
        (1, 1, 2)
    );
    assert_eq!(
        (scope.step_ups, scope.replays, scope.token_requests),
        (1, 1, 2)
    );
    assert_eq!((w.idp.token_requests(), w.idp.claims_requests()), (4, 1));
}

/// The oauth2 grants send what a challenge asks for: a step-up scope replaces the configured
/// scope, and the claims go as the `claims` form parameter.
#[tokio::test]
async fn client_credentials_sends_the_challenged_scope_and_claims() {
    let w = world().await;
    let grant = ClientCredentials::builder(w.idp.token_url(), "batch", "s3cr3t")
        .scope("read")
        .build()
        .unwrap();
    let layer = AuthLayer::builder(grant)
        .step_up_to_challenged_scope()
        .build();
    let service = service(&layer);
    let answers = burst(&service, &w.api, "/needs-scope", 1).await;
    assert!(all(&answers, StatusCode::OK, "token-2"), "{answers:?}");
    assert_eq!(w.registry.scope_of("token-1").as_deref(), Some("read"));
    assert_eq!(w.registry.scope_of("token-2").as_deref(), Some("admin"));

    let answers = burst(&service, &w.api, "/needs-claims", 1).await;
    assert!(all(&answers, StatusCode::OK, "token-3"), "{answers:?}");
    assert!(w.registry.issued_with_claims("token-3"));
    // A claims refresh keeps the scope the step-up won (else the next write would have to
    // step up again).
    assert_eq!(w.registry.scope_of("token-3").as_deref(), Some("admin"));
    assert_eq!((w.idp.token_requests(), w.idp.claims_requests()), (3, 1));
}

/// A stepped-up token the API refuses too (the hook asks for a scope the API does not want):
/// the replay's 403 goes back, and it counts as a refusal, so the next 403s within the
/// rejection cooldown fetch nothing.
#[tokio::test(start_paused = true)]
async fn a_refused_step_up_costs_one_token_request_per_cooldown() {
    let _clock = manual_clock();
    let w = world().await;
    let layer = AuthLayer::builder(http_provider(&w.idp))
        .step_up(|_scope| Some(TokenRequest::new().with_scope("other")))
        .build();
    let service = service(&layer);
    for _ in 0..3 {
        let answers = burst(&service, &w.api, "/needs-scope-403", 1).await;
        assert!(all(&answers, StatusCode::FORBIDDEN, "insufficient scope"));
    }
    assert_eq!(w.idp.token_requests(), 2);
    assert_eq!(w.registry.scope_of("token-2").as_deref(), Some("other"));
    let stats = layer.cache().stats();
    assert_eq!(
        (stats.step_ups, stats.replays, stats.repeated_rejections),
        (1, 1, 2)
    );
    assert_eq!(w.api.requests(), 4);
}

/// Every decision is in the debug events; the claims and the tokens never are.
#[tokio::test]
async fn decisions_are_traced_without_the_claims() {
    let (captured, _guard) = support::capture_traces();
    let w = world().await;
    let layer = AuthLayer::builder(http_provider(&w.idp))
        .step_up_to_challenged_scope()
        .build();
    let service = service(&layer);
    for path in ["/needs-claims", "/needs-scope"] {
        let answers = burst(&service, &w.api, path, 1).await;
        assert_eq!(answers[0].0, StatusCode::OK, "{path}");
    }
    let text = captured.text();
    assert!(text.contains("insufficient_claims"), "{text}");
    assert!(text.contains("stepping up"), "{text}");
    assert!(text.contains("with_claims=true"), "{text}");
    assert!(!text.contains("1700000000"), "the claims leaked: {text}");
    assert!(!text.contains("eyJ"), "the encoded claims leaked: {text}");
    assert!(!text.contains("token-"), "a token leaked: {text}");
}

/// A step-up sticks: the refresh that replaces the stepped-up token before it expires asks for
/// the same scope, so the next requests do not meet the challenge (and pay a replay) again.
#[tokio::test(start_paused = true)]
async fn a_stepped_up_scope_is_asked_for_again_at_the_next_refresh() {
    let _clock = manual_clock();
    let w = world().await;
    let layer = AuthLayer::builder(http_provider(&w.idp))
        .step_up_to_challenged_scope()
        .build();
    let service = service(&layer);
    let answers = burst(&service, &w.api, "/needs-scope", 5).await;
    assert!(all(&answers, StatusCode::OK, "token-2"), "{answers:?}");

    // Inside the last minute of the hour: the token is replaced before it is sent again.
    advance(HOUR - Duration::from_secs(30)).await;
    let answers = burst(&service, &w.api, "/needs-scope", 5).await;
    assert!(all(&answers, StatusCode::OK, "token-3"), "{answers:?}");
    assert_eq!(w.registry.scope_of("token-3").as_deref(), Some("admin"));
    assert_eq!(w.idp.token_requests(), 3);
    let stats = layer.cache().stats();
    assert_eq!(
        (stats.step_ups, stats.replays),
        (1, 5),
        "one step-up, no second round"
    );
    assert_eq!(w.api.requests(), 15);
}
