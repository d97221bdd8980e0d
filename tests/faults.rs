//! Callers that give up at the worst moment: a request dropped after every possible number of
//! polls, and a runtime shut down while a refresh runs. Nothing hangs, nothing panics, and the
//! cache recovers on the next call with exactly the token requests it needs.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Empty;
use tower::{ServiceBuilder, ServiceExt};
use tower_auth_refresh::store::{FetchToken, RefreshRequest, StoreFuture};
use tower_auth_refresh::{
    provider_fn, AuthError, AuthLayer, StaticToken, Token, TokenCache, TokenStore,
};

use support::{body_string, client, http_provider, Api, IdentityProvider, IdpMode, TokenRegistry};

const HOUR: Duration = Duration::from_secs(3600);

fn get(api: &Api) -> Request<Empty<Bytes>> {
    Request::get(api.url("/whoami")).body(Empty::new()).unwrap()
}

/// Poll `future` `polls` times, yielding in between so loopback IO moves, then drop it.
async fn poll_then_drop<F: std::future::Future>(future: F, polls: usize) -> bool {
    let mut future = Box::pin(future);
    for _ in 0..polls {
        if futures::poll!(&mut future).is_ready() {
            return true;
        }
        tokio::task::yield_now().await;
    }
    false
}

#[tokio::test]
async fn dropping_a_request_after_any_number_of_polls_never_wedges_the_cache() {
    let registry = TokenRegistry::default();
    let idp = IdentityProvider::start(registry.clone(), Some(HOUR)).await;
    let api = Api::start(registry.clone(), 0).await;

    let mut completed_before_drop = 0;
    for polls in 0..40 {
        // A fresh cache: the dropped request is the one that starts its first refresh.
        let auth = AuthLayer::new(http_provider(&idp));
        let service = ServiceBuilder::new().layer(auth.clone()).service(client());
        if poll_then_drop(service.clone().oneshot(get(&api)), polls).await {
            completed_before_drop += 1;
        }
        let response = service.oneshot(get(&api)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "after {polls} polls");
        assert_eq!(
            auth.cache().stats().token_requests,
            1,
            "after {polls} polls: the follow-up joined or reused the refresh"
        );
    }
    assert!(
        completed_before_drop > 0,
        "the loop reached past the last await point"
    );
}

#[tokio::test]
async fn dropping_a_request_anywhere_on_the_401_path_never_wedges_the_cache() {
    let registry = TokenRegistry::default();
    let idp = IdentityProvider::start(registry.clone(), Some(HOUR)).await;
    let api = Api::start(registry.clone(), 0).await;

    for polls in 0..60 {
        let auth = AuthLayer::new(http_provider(&idp));
        let service = ServiceBuilder::new().layer(auth.clone()).service(client());
        service.clone().oneshot(get(&api)).await.unwrap();
        registry.revoke_all();

        poll_then_drop(service.clone().oneshot(get(&api)), polls).await;
        let response = service.oneshot(get(&api)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "after {polls} polls");
        // One token before the revocation, exactly one after, wherever the drop happened.
        assert_eq!(
            auth.cache().stats().token_requests,
            2,
            "after {polls} polls"
        );
        assert!(body_string(response).await.starts_with("token-"));
    }
}

#[test]
fn a_runtime_shut_down_mid_refresh_leaves_a_cache_that_recovers() {
    // The servers live on their own runtime, which outlives the client's.
    let servers = tokio::runtime::Runtime::new().unwrap();
    let (idp, api) = servers.block_on(async {
        let registry = TokenRegistry::default();
        let idp = IdentityProvider::start(registry.clone(), Some(HOUR)).await;
        let api = Api::start(registry, 0).await;
        (idp, api)
    });
    idp.set_mode(IdpMode::Hang);
    let cache = TokenCache::builder(http_provider(&idp))
        .backoff(Duration::ZERO, Duration::ZERO)
        .build();

    // A first runtime starts a refresh that hangs, then shuts down under it.
    let first = tokio::runtime::Runtime::new().unwrap();
    first.block_on(async {
        let waiting = tokio::time::timeout(Duration::from_millis(200), cache.token()).await;
        assert!(waiting.is_err(), "the refresh hangs");
    });
    drop(first);

    // A second runtime: the cache does not hang on the dead refresh, and recovers.
    idp.set_mode(IdpMode::Issue);
    let second = tokio::runtime::Runtime::new().unwrap();
    second.block_on(async {
        let outcome = tokio::time::timeout(Duration::from_secs(30), async {
            let mut attempts = Vec::new();
            for _ in 0..3 {
                match cache.token().await {
                    Ok(token) => return Ok((token, attempts)),
                    Err(error) => attempts.push(error),
                }
            }
            Err(attempts)
        })
        .await
        .expect("no hang after the runtime that started the refresh is gone");
        let (token, failed) =
            outcome.unwrap_or_else(|errors| panic!("never recovered: {errors:?}"));
        assert!(token.secret().starts_with("token-"));
        // The refresh that died with its runtime is reported once, as a typed error (hyper's
        // connection went with the runtime); the next call refreshes anew.
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert!(matches!(failed[0], AuthError::Refresh { .. }), "{failed:?}");
        assert_eq!(cache.stats().token_requests, 2);

        let service = ServiceBuilder::new()
            .layer(AuthLayer::with_cache(cache.clone()))
            .service(client());
        let response = service.oneshot(get(&api)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    });
}

mod identity_provider_faults {
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::Full;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tower_auth_refresh::oauth2::{transport, ClientCredentials};
    use tower_auth_refresh::{AuthError, TokenCache};

    fn cache_for(token_url: String) -> TokenCache {
        let http = transport(Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>());
        let provider = ClientCredentials::builder(token_url, "batch", "s3cr3t")
            .transport(http)
            .build()
            .unwrap();
        TokenCache::builder(provider)
            .backoff(Duration::ZERO, Duration::ZERO)
            .build()
    }

    #[tokio::test]
    async fn connection_refused_is_a_transport_error_every_time_it_happens() {
        // A port that was just free: nothing listens there.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let cache = cache_for(format!("http://{addr}/token"));

        for attempt in 1..=3u64 {
            let error = cache.token().await.unwrap_err();
            assert!(matches!(error, AuthError::Transport { .. }), "{error:?}");
            assert!(!format!("{error:?}").contains("s3cr3t"));
            assert_eq!(cache.stats().refresh_failures, attempt);
        }
    }

    #[tokio::test]
    async fn a_connection_cut_mid_response_is_a_transport_error_and_the_next_refresh_works() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for answer_fully in [false, true] {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut request = vec![0u8; 4096];
                let _ = socket.read(&mut request).await.unwrap();
                if answer_fully {
                    let body =
                        r#"{"access_token":"after-reset","token_type":"Bearer","expires_in":60}"#;
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    socket.write_all(response.as_bytes()).await.unwrap();
                } else {
                    // Half a response (500 bytes announced, a dozen sent), then the connection
                    // closes under it.
                    socket
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 500\r\n\r\n{\"access_tok")
                        .await
                        .unwrap();
                }
                drop(socket);
            }
        });
        let cache = cache_for(format!("http://{addr}/token"));

        let error = cache.token().await.unwrap_err();
        assert!(matches!(error, AuthError::Transport { .. }), "{error:?}");
        assert_eq!(cache.token().await.unwrap().secret(), "after-reset");
        assert_eq!(cache.stats().token_requests, 2);
    }
}

#[tokio::test]
async fn a_401_with_a_large_body_is_left_unread_and_the_replays_go_through() {
    let registry = TokenRegistry::default();
    let idp = IdentityProvider::start(registry.clone(), Some(HOUR)).await;
    let api = Api::start(registry.clone(), 0).await;
    let auth = AuthLayer::new(http_provider(&idp));
    let service = ServiceBuilder::new().layer(auth.clone()).service(client());
    service.clone().oneshot(get(&api)).await.unwrap();

    // 1 MiB error pages for 50 requests at once: the rejected responses are dropped unread
    // (HTTP/1 closes those connections), and every replay gets through on a new one.
    api.set_rejection_body(1024 * 1024);
    registry.revoke_all();
    let requests = (0..50).map(|_| service.clone().oneshot(get(&api)));
    let results =
        tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(requests))
            .await
            .expect("nothing hangs on an unread 401 body");
    for result in results {
        let response = result.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body_string(response).await, "token-2");
    }
    assert_eq!(idp.token_requests(), 2);
    assert_eq!(auth.cache().stats().replays as usize, api.rejected());
}

#[tokio::test]
async fn services_and_layers_dropped_while_a_refresh_runs_leave_nothing_behind() {
    let registry = TokenRegistry::default();
    let idp = IdentityProvider::start(registry.clone(), Some(HOUR)).await;
    let api = Api::start(registry.clone(), 0).await;
    idp.set_latency(Duration::from_millis(200));

    let cache = {
        let auth = AuthLayer::new(http_provider(&idp));
        let service = ServiceBuilder::new().layer(auth.clone()).service(client());
        let mut pending = Box::pin(service.clone().oneshot(get(&api)));
        assert!(futures::poll!(&mut pending).is_pending());
        support::until(|| idp.token_requests() == 1).await;
        // Everything but a cache handle goes away while the refresh is in flight.
        auth.cache().clone()
    };
    // The refresh finishes on its own task and lands in the cache that is still held.
    let token = tokio::time::timeout(Duration::from_secs(30), cache.token())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(token.secret(), "token-1");
    assert_eq!(cache.stats().token_requests, 1);

    // And with no handle left at all, the refresh task ends quietly: the next cache starts anew.
    {
        let auth = AuthLayer::new(http_provider(&idp));
        let service = ServiceBuilder::new().layer(auth).service(client());
        let mut pending = Box::pin(service.oneshot(get(&api)));
        assert!(futures::poll!(&mut pending).is_pending());
        support::until(|| idp.token_requests() == 2).await;
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let service = ServiceBuilder::new()
        .layer(AuthLayer::new(http_provider(&idp)))
        .service(client());
    let response = service.oneshot(get(&api)).await.unwrap();
    assert_eq!(body_string(response).await, "token-3");
}

/// Issue 11, item 6: a runtime built without its timer is a typed error, not a panic that
/// poisons the refresh; the same cache then works on a healthy runtime.
#[test]
fn a_runtime_without_timers_gets_a_typed_error_and_wedges_nothing() {
    let cache = TokenCache::new(provider_fn(|| async {
        Ok::<_, std::io::Error>(Token::new("fine").with_expires_in(HOUR))
    }));
    let no_timer = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    for _ in 0..2 {
        let error = no_timer.block_on(cache.token()).unwrap_err();
        assert!(matches!(error, AuthError::NoTimer), "{error:?}");
    }
    assert_eq!(cache.stats().token_requests, 0, "nothing was started");

    let healthy = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    assert_eq!(healthy.block_on(cache.token()).unwrap().secret(), "fine");
    assert_eq!(cache.stats().token_requests, 1);
}

/// A tracing layer that panics on the first warning it sees: a panic while the cache holds its
/// refresh state lock (the "refresh failed" event is written under it), poisoning the lock.
#[derive(Default)]
struct PanicOnFirstWarning(AtomicBool);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for PanicOnFirstWarning {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if *event.metadata().level() == tracing::Level::WARN && !self.0.swap(true, Ordering::SeqCst)
        {
            panic!("a subscriber bug");
        }
    }
}

/// Issue 11, item 6: whatever panics during a refresh (here a tracing subscriber, while the
/// state lock is held), the next request gets a token, and background refreshes still run.
#[tokio::test(start_paused = true)]
async fn a_panic_inside_the_refresh_wedges_neither_requests_nor_background_refreshes() {
    use tracing_subscriber::layer::SubscriberExt;
    let _subscriber = tracing::subscriber::set_default(
        tracing_subscriber::registry().with(PanicOnFirstWarning::default()),
    );
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let cache = TokenCache::builder(provider_fn(move || {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            if n == 1 {
                return Err(std::io::Error::other("the identity provider failed"));
            }
            Ok(Token::new(format!("token-{n}")).with_expires_in(HOUR))
        }
    }))
    .backoff(Duration::from_secs(1), Duration::from_secs(1))
    .build();

    // The provider fails, and reporting the failure panics with the state lock held.
    let first = cache.token().await;
    assert!(
        matches!(first, Err(AuthError::ProviderPanicked)),
        "{first:?}"
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(cache.token().await.unwrap().secret(), "token-2");

    // 56 minutes on: the advisory window, with the lock poisoned by the panic above.
    tokio::time::advance(Duration::from_secs(56 * 60)).await;
    assert_eq!(cache.token().await.unwrap().secret(), "token-2");
    support::until(|| calls.load(Ordering::SeqCst) == 3).await;
    support::until(|| cache.stats().generation == Some(3)).await;
    assert_eq!(cache.token().await.unwrap().secret(), "token-3");
    assert_eq!(cache.stats().token_requests, 3);
}

/// Issue 11, item 6: a token store whose future panics is a typed error for the waiters, and
/// the next refresh runs.
#[tokio::test]
async fn a_panicking_token_store_is_a_typed_error_and_the_next_refresh_runs() {
    #[derive(Default)]
    struct PanicsOnce(AtomicBool);
    impl TokenStore for PanicsOnce {
        fn refresh(&self, _: RefreshRequest, fetch: FetchToken) -> StoreFuture {
            let panic = !self.0.swap(true, Ordering::SeqCst);
            Box::pin(async move {
                if panic {
                    panic!("a store bug");
                }
                fetch.fetch().await
            })
        }
    }
    let cache = TokenCache::builder(StaticToken::new(Token::new("fine")))
        .store(PanicsOnce::default())
        .backoff(Duration::ZERO, Duration::ZERO)
        .build();
    let waiters = futures::future::join_all((0..10).map(|_| cache.token())).await;
    assert!(waiters
        .iter()
        .all(|w| matches!(w, Err(AuthError::ProviderPanicked))));
    assert_eq!(cache.token().await.unwrap().secret(), "fine");
    assert_eq!(cache.stats().token_requests, 1);
}

/// Issue 11, smaller item: a token request that outlives `refresh_timeout` is not dropped
/// mid-way (a rotated refresh token in its answer would be lost): it may finish for one more
/// timeout, and its token is used when it lands; past that it is cancelled, so a hanging provider
/// leaks nothing.
#[tokio::test(start_paused = true)]
async fn a_token_request_past_the_timeout_finishes_detached_and_is_bounded() {
    let finished = Arc::new(AtomicUsize::new(0));
    let cancelled = Arc::new(AtomicUsize::new(0));
    let calls = Arc::new(AtomicUsize::new(0));
    let (f, c, n) = (finished.clone(), cancelled.clone(), calls.clone());
    let cache = TokenCache::builder(provider_fn(move || {
        let n = n.fetch_add(1, Ordering::SeqCst) + 1;
        let (finished, cancelled) = (f.clone(), c.clone());
        async move {
            let in_flight = CountIfDropped(cancelled);
            let takes = match n {
                1 => Duration::from_millis(1500), // late, within the grace period
                2 => Duration::from_secs(10),     // hangs past it
                _ => Duration::ZERO,
            };
            tokio::time::sleep(takes).await;
            std::mem::forget(in_flight);
            finished.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(Token::new(format!("token-{n}")))
        }
    }))
    .refresh_timeout(Duration::from_secs(1))
    .backoff(Duration::ZERO, Duration::ZERO)
    .build();

    let late = cache.token().await;
    assert!(
        matches!(late, Err(AuthError::RefreshTimeout { .. })),
        "{late:?}"
    );
    assert_eq!(finished.load(Ordering::SeqCst), 0);
    tokio::time::advance(Duration::from_secs(1)).await;
    support::until(|| cache.stats().generation == Some(1)).await;
    assert_eq!(
        cancelled.load(Ordering::SeqCst),
        0,
        "the late answer was read"
    );
    let token_1 = cache.token().await.unwrap();
    assert_eq!(token_1.secret(), "token-1", "and its token is used");
    assert_eq!(cache.stats().token_requests, 1);

    // The API refuses it; the next call hangs past the grace period and is cancelled.
    cache.reject(&token_1);
    let hanging = cache.token().await;
    assert!(matches!(hanging, Err(AuthError::RefreshTimeout { .. })));
    tokio::time::advance(Duration::from_secs(2)).await;
    support::until(|| cancelled.load(Ordering::SeqCst) == 1).await;
    assert_eq!(finished.load(Ordering::SeqCst), 1);

    assert_eq!(cache.token().await.unwrap().secret(), "token-3");
    assert_eq!(cache.stats().token_requests, 3);
}

struct CountIfDropped(Arc<AtomicUsize>);

impl Drop for CountIfDropped {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}
