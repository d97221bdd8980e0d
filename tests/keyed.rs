//! `KeyedAuthLayer`: one token cache per key behind one layer, against real identity providers
//! and APIs on loopback, one per audience, all behind one hyper-util client.
//!
//! Tests run on tokio's paused clock with a [`support::manual_clock`]: time moves only when a
//! test says so, which makes every count below exact.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use http::{Request, StatusCode};
use http_body_util::Empty;
use tokio::time::advance;
use tower::{ServiceBuilder, ServiceExt};
use tower_auth_refresh::{provider_fn, KeyedAuthLayer, KeyedAuthService, KeyedStats, Token};

use support::{
    body_string, client, http_provider_at, manual_clock, Api, IdentityProvider, TokenRegistry,
};

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    tower_auth_refresh::ReplayBody<Empty<Bytes>>,
>;

const HOUR: Duration = Duration::from_secs(3600);
const MINUTE: Duration = Duration::from_secs(60);

/// An API with its own identity provider: a token of one audience is refused by the others.
struct Audience {
    name: &'static str,
    idp: IdentityProvider,
    api: Api,
    registry: TokenRegistry,
}

impl Audience {
    /// The layer's key for this audience: the API's authority.
    fn key(&self) -> String {
        authority(&self.api.url("/"))
    }
}

fn authority(url: &str) -> String {
    let uri: http::Uri = url.parse().unwrap();
    uri.authority().unwrap().to_string()
}

async fn audiences() -> Vec<Audience> {
    let mut audiences = Vec::new();
    for name in ["contacts", "reports", "billing"] {
        let registry = TokenRegistry::default();
        let idp = IdentityProvider::start(registry.clone(), Some(HOUR)).await;
        idp.set_token_prefix(name);
        let api = Api::start(registry.clone(), 0).await;
        audiences.push(Audience {
            name,
            idp,
            api,
            registry,
        });
    }
    audiences
}

/// One layer keyed by the API's authority; each key's provider asks that API's identity
/// provider. Keys are dropped after `idle_after` without a request.
fn layer_for(audiences: &[Audience], idle_after: Duration) -> KeyedAuthLayer<String> {
    let token_urls: Arc<HashMap<String, String>> = Arc::new(
        audiences
            .iter()
            .map(|audience| (audience.key(), audience.idp.token_url()))
            .collect(),
    );
    KeyedAuthLayer::builder(
        |request: &http::request::Parts| request.uri.authority().map(ToString::to_string),
        move |key: &String| http_provider_at(token_urls[key].clone()),
    )
    .idle_after(idle_after)
    .build()
}

fn service(layer: &KeyedAuthLayer<String>) -> KeyedAuthService<Client, String> {
    ServiceBuilder::new().layer(layer.clone()).service(client())
}

/// Send one GET to `audience`'s API; the body of a 200 is the token the API accepted.
async fn send(
    service: &KeyedAuthService<Client, String>,
    audience: &Audience,
) -> (StatusCode, String) {
    let request = Request::get(audience.api.url("/whoami"))
        .body(Empty::new())
        .unwrap();
    let response = service.clone().oneshot(request).await.unwrap();
    let status = response.status();
    (status, body_string(response).await)
}

/// `n` concurrent requests to every audience, interleaved; the answers, per audience.
async fn storm(
    service: &KeyedAuthService<Client, String>,
    audiences: &[Audience],
    n: usize,
) -> Vec<Vec<(StatusCode, String)>> {
    let sends = (0..n).flat_map(|_| audiences.iter().map(|audience| send(service, audience)));
    let answers = join_all(sends).await;
    (0..audiences.len())
        .map(|a| {
            answers
                .iter()
                .skip(a)
                .step_by(audiences.len())
                .cloned()
                .collect()
        })
        .collect()
}

fn stats(keys: usize, created: u64, evicted_idle: u64, evicted_least_recent: u64) -> KeyedStats {
    let mut stats = KeyedStats::default();
    stats.keys = keys;
    stats.created = created;
    stats.evicted_idle = evicted_idle;
    stats.evicted_least_recent = evicted_least_recent;
    stats
}

#[tokio::test(start_paused = true)]
async fn three_audiences_each_storm_costs_one_token_request() {
    let _clock = manual_clock();
    let audiences = audiences().await;
    let layer = layer_for(&audiences, 2 * HOUR);
    let service = service(&layer);

    // Cold start: 1,000 concurrent requests per audience race to create the key's cache.
    let answers = storm(&service, &audiences, 1000).await;
    for (audience, answers) in audiences.iter().zip(&answers) {
        let expected = (StatusCode::OK, format!("{}-1", audience.name));
        assert!(
            answers.iter().all(|answer| *answer == expected),
            "{}",
            audience.name
        );
        assert_eq!(audience.idp.token_requests(), 1, "{}", audience.name);
    }
    assert_eq!(
        layer.stats(),
        stats(3, 3, 0, 0),
        "one cache per key, built once"
    );

    // Every token expires: 1,000 more requests per audience.
    advance(HOUR).await;
    let answers = storm(&service, &audiences, 1000).await;
    for (audience, answers) in audiences.iter().zip(&answers) {
        let expected = (StatusCode::OK, format!("{}-2", audience.name));
        assert!(
            answers.iter().all(|answer| *answer == expected),
            "{}",
            audience.name
        );
        assert_eq!(
            audience.idp.token_requests(),
            2,
            "{}: one for the first token, one for all 1,000 after expiry",
            audience.name
        );
        assert_eq!(audience.api.served(), 2000, "{}", audience.name);
        assert_eq!(audience.api.rejected(), 0, "{}", audience.name);
        let cache_stats = layer.cache(&audience.key()).unwrap().stats();
        assert_eq!(cache_stats.token_requests, 2, "{}", audience.name);
        assert_eq!(cache_stats.replays, 0, "{}", audience.name);
    }
    assert_eq!(layer.stats(), stats(3, 3, 0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_401_on_one_audience_leaves_the_others_alone() {
    let _clock = manual_clock();
    let audiences = audiences().await;
    let layer = layer_for(&audiences, 2 * HOUR);
    let service = service(&layer);
    storm(&service, &audiences, 1).await;

    // The first API forgets its tokens an hour early.
    audiences[0].registry.revoke_all();
    let answers = storm(&service, &audiences, 1000).await;

    let revoked = &audiences[0];
    assert!(answers[0]
        .iter()
        .all(|answer| *answer == (StatusCode::OK, "contacts-2".to_owned())));
    assert_eq!(
        revoked.idp.token_requests(),
        2,
        "one new token for all 1,000"
    );
    let rejected = revoked.api.rejected();
    assert!((1..=1000).contains(&rejected), "{rejected}");
    let revoked_stats = layer.cache(&revoked.key()).unwrap().stats();
    assert_eq!(
        revoked_stats.replays, rejected as u64,
        "each 401 replayed once"
    );
    assert_eq!(revoked_stats.invalidations, 1);
    assert_eq!(revoked.api.requests(), 1 + 1000 + rejected);
    assert_eq!(revoked.api.served(), 1 + 1000);

    for (audience, answers) in audiences.iter().zip(&answers).skip(1) {
        let expected = (StatusCode::OK, format!("{}-1", audience.name));
        assert!(
            answers.iter().all(|answer| *answer == expected),
            "{}",
            audience.name
        );
        assert_eq!(audience.idp.token_requests(), 1, "{}", audience.name);
        assert_eq!(audience.api.rejected(), 0, "{}", audience.name);
        assert_eq!(audience.api.requests(), 1 + 1000, "{}", audience.name);
        let cache_stats = layer.cache(&audience.key()).unwrap().stats();
        assert_eq!(
            (
                cache_stats.token_requests,
                cache_stats.replays,
                cache_stats.invalidations
            ),
            (1, 0, 0),
            "{}",
            audience.name
        );
    }
    assert_eq!(layer.stats(), stats(3, 3, 0, 0));
}

#[tokio::test(start_paused = true)]
async fn idle_keys_are_dropped_after_idle_after() {
    let _clock = manual_clock();
    let audiences = audiences().await;
    let layer = layer_for(&audiences, 10 * MINUTE);
    let service = service(&layer);
    let [contacts, reports, billing] = &audiences[..] else {
        unreachable!()
    };
    storm(&service, &audiences, 1).await;
    assert_eq!(layer.stats(), stats(3, 3, 0, 0));

    advance(5 * MINUTE).await;
    send(&service, contacts).await;
    assert_eq!(layer.stats().keys, 3, "nobody is idle for 10 minutes yet");

    // `reports` and `billing` have been idle for 11 minutes, `contacts` for 6.
    advance(6 * MINUTE).await;
    assert_eq!(send(&service, contacts).await.1, "contacts-1");
    assert_eq!(layer.stats(), stats(1, 3, 2, 0));
    assert!(layer.cache(&reports.key()).is_none());
    assert!(layer.cache(&billing.key()).is_none());

    // A dropped key comes back with a new cache, which fetches a new token.
    assert_eq!(send(&service, reports).await.1, "reports-2");
    assert_eq!(reports.idp.token_requests(), 2);
    assert_eq!(contacts.idp.token_requests(), 1);
    assert_eq!(layer.stats(), stats(2, 4, 2, 0));
}

#[tokio::test(start_paused = true)]
async fn ten_thousand_distinct_keys_stay_within_max_keys() {
    const MAX_KEYS: usize = 100;
    const TENANTS: u32 = 10_000;
    let _clock = manual_clock();
    let registry = TokenRegistry::default();
    let api = Api::start(registry.clone(), 0).await;
    let token_requests = Arc::new(AtomicUsize::new(0));

    let counter = token_requests.clone();
    let layer = KeyedAuthLayer::builder(
        |request: &http::request::Parts| {
            request
                .headers
                .get("x-tenant")?
                .to_str()
                .ok()?
                .parse::<u32>()
                .ok()
        },
        move |tenant: &u32| {
            let tenant = *tenant;
            let registry = registry.clone();
            let counter = counter.clone();
            provider_fn(move || {
                counter.fetch_add(1, Ordering::SeqCst);
                let secret = format!("tenant-{tenant}");
                registry.issue(secret.clone(), None);
                async move { Ok::<_, tower::BoxError>(Token::new(secret)) }
            })
        },
    )
    .max_keys(MAX_KEYS)
    .build();
    let service = ServiceBuilder::new().layer(layer.clone()).service(client());
    let send = |tenant: u32| {
        let request = Request::get(api.url("/whoami"))
            .header("x-tenant", tenant)
            .body(Empty::<Bytes>::new())
            .unwrap();
        let service = service.clone();
        async move {
            let response = service.oneshot(request).await.unwrap();
            assert_eq!(body_string(response).await, format!("tenant-{tenant}"));
        }
    };

    for tenant in 0..TENANTS {
        advance(Duration::from_millis(1)).await;
        send(tenant).await;
        // Tenant 0 stays in use throughout: recently used keys are kept.
        if tenant % 10 == 0 {
            send(0).await;
        }
        assert!(
            layer.stats().keys <= MAX_KEYS,
            "{tenant}: {:?}",
            layer.stats()
        );
    }

    let evicted = u64::from(TENANTS) - MAX_KEYS as u64;
    assert_eq!(
        layer.stats(),
        stats(MAX_KEYS, TENANTS.into(), 0, evicted),
        "tenant 0 was never dropped, so never built again"
    );
    assert!(layer.cache(&0).is_some());
    let last = TENANTS - (MAX_KEYS as u32 - 1);
    for tenant in last..TENANTS {
        assert!(
            layer.cache(&tenant).is_some(),
            "{tenant}, among the last used"
        );
    }
    assert!(layer.cache(&(last - 1)).is_none());
    assert_eq!(token_requests.load(Ordering::SeqCst), TENANTS as usize);
    assert_eq!(api.served(), TENANTS as usize + 1000);
    assert_eq!(api.rejected(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_request_without_a_key_goes_out_without_a_token() {
    let _clock = manual_clock();
    let audiences = audiences().await;
    let audience = &audiences[0];
    let layer = KeyedAuthLayer::builder(
        |request: &http::request::Parts| {
            (request.uri.path() != "/public").then(|| "contacts".to_owned())
        },
        {
            let url = audience.idp.token_url();
            move |_: &String| http_provider_at(url.clone())
        },
    )
    .build();
    let service = service(&layer);

    let request = Request::get(audience.api.url("/public"))
        .body(Empty::new())
        .unwrap();
    let response = service.clone().oneshot(request).await.unwrap();
    assert_eq!(
        response.status(),
        StatusCode::UNAUTHORIZED,
        "sent without a token"
    );
    assert_eq!(audience.api.with_authorization(), 0);
    assert_eq!(audience.idp.token_requests(), 0);
    assert_eq!(layer.stats(), stats(0, 0, 0, 0), "no key, no cache");

    assert_eq!(send(&service, audience).await.1, "contacts-1");
    assert_eq!(audience.api.with_authorization(), 1);
    assert_eq!(layer.stats(), stats(1, 1, 0, 0));
}

/// Threads racing to create the same new keys build one cache per key: a request that waited
/// for the writer's lock uses the cache the winner built.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_first_requests_build_one_cache_per_key() {
    const TASKS: usize = 8;
    const KEYS: u32 = 200;
    let registry = TokenRegistry::default();
    let api = Api::start(registry.clone(), 0).await;
    let token_requests = Arc::new(AtomicUsize::new(0));
    let counter = token_requests.clone();
    let layer = KeyedAuthLayer::builder(
        |request: &http::request::Parts| request.uri.query()?.parse::<u32>().ok(),
        move |key: &u32| {
            let secret = format!("key-{key}");
            let registry = registry.clone();
            let counter = counter.clone();
            provider_fn(move || {
                counter.fetch_add(1, Ordering::SeqCst);
                registry.issue(secret.clone(), None);
                let token = Token::new(secret.clone());
                async move { Ok::<_, tower::BoxError>(token) }
            })
        },
    )
    .build();
    let service = ServiceBuilder::new().layer(layer.clone()).service(client());
    let start = Arc::new(tokio::sync::Barrier::new(TASKS));
    let tasks = (0..TASKS).map(|_| {
        let service = service.clone();
        let start = start.clone();
        let api = api.clone();
        tokio::spawn(async move {
            start.wait().await;
            for key in 0..KEYS {
                let request = Request::get(api.url(&format!("/whoami?{key}")))
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let response = service.clone().oneshot(request).await.unwrap();
                assert_eq!(body_string(response).await, format!("key-{key}"));
            }
        })
    });
    for task in join_all(tasks).await {
        task.unwrap();
    }
    assert_eq!(layer.stats(), stats(KEYS as usize, KEYS.into(), 0, 0));
    assert_eq!(token_requests.load(Ordering::SeqCst), KEYS as usize);
    assert_eq!(api.served(), TASKS * KEYS as usize);
}
