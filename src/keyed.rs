//! One layer, one token per key: per audience, scope set, tenant or origin.
//!
//! A client that calls several APIs needs a different token for each. A [`KeyedAuthLayer`]
//! computes a key from each request's head with a function of yours and sends the request with
//! the token of that key's own [`TokenCache`], built on first use from one provider factory.
//! Each key's cache is an ordinary `TokenCache`, and each request goes through the same
//! [`AuthService`] code as with an [`AuthLayer`]: single flight, the two
//! refresh windows, the rejection cooldown and the one 401 replay hold per key, and a 401 for
//! one key refreshes nothing for the others.
//!
//! Finding a key's cache takes no lock: the caches live in a map behind an atomically swapped
//! `Arc`. A new key copies the map under a mutex (rare: once per key). The number of keys is
//! bounded: keys without a request for a while are dropped, then the least recently used ones.
//!
//! ```
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_auth_refresh::{provider_fn, AuthLayer, ReplayBody, Token};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! // The audience is the host the request goes to; requests without a host get no token.
//! let auth = AuthLayer::keyed(
//!     |request: &http::request::Parts| request.uri.host().map(str::to_owned),
//!     |audience: &String| {
//!         let audience = audience.clone();
//!         provider_fn(move || {
//!             // Ask the identity provider for a token for `audience` here.
//!             let token = Token::new(format!("token-for-{audience}"));
//!             async move { Ok::<_, tower::BoxError>(token.with_expires_in(Duration::from_secs(3600))) }
//!         })
//!     },
//! )
//! .max_keys(100)
//! .idle_after(Duration::from_secs(600))
//! .build();
//!
//! let api = service_fn(|request: http::Request<ReplayBody<Full<Bytes>>>| async move {
//!     let authorization = request.headers()["authorization"].clone();
//!     Ok::<_, std::convert::Infallible>(http::Response::new(authorization))
//! });
//! let client = ServiceBuilder::new().layer(auth.clone()).service(api);
//!
//! for host in ["contacts.example.com", "reports.example.com"] {
//!     let request = http::Request::get(format!("https://{host}/v1"))
//!         .body(Full::new(Bytes::new()))?;
//!     let response = client.clone().oneshot(request).await?;
//!     assert_eq!(response.body(), &format!("Bearer token-for-{host}"));
//! }
//! assert_eq!(auth.stats().keys, 2);
//! let reports = auth.cache(&"reports.example.com".to_owned()).expect("a cache per key");
//! assert_eq!(reports.stats().token_requests, 1);
//! # Ok::<_, tower::BoxError>(())
//! # }).unwrap();
//! ```

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::mem;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{request, Request, Response};
use http_body::Body;
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

use crate::cache::{TokenCache, TokenCacheBuilder};
use crate::future::ResponseFuture;
use crate::inner_body::{IntoInnerBody, Unchanged};
use crate::layer::{AuthLayer, AuthLayerBuilder, AuthSettings, LayerOptions};
use crate::provider::TokenProvider;
use crate::service::AuthService;

/// Default bound on the number of keys, and so of token caches, a [`KeyedAuthLayer`] holds.
pub const DEFAULT_MAX_KEYS: usize = 1_000;
/// Default time without a request after which a key's cache is dropped.
pub const DEFAULT_IDLE_AFTER: Duration = Duration::from_secs(60 * 60);

/// Computes the key of a request from its head; `None`: the request goes out without a token.
pub type KeyFn<K> = dyn Fn(&request::Parts) -> Option<K> + Send + Sync;

type NewCache<K> = dyn Fn(&K) -> TokenCacheBuilder + Send + Sync;
type CacheOptions<K> = dyn Fn(&K, TokenCacheBuilder) -> TokenCacheBuilder + Send + Sync;

/// The caches of a [`KeyedAuthLayer`] before it is built: how a request's key is computed,
/// where each key's tokens come from, and the bounds on the keys.
///
/// It is the cache part of the [`AuthLayerBuilder`] that [`AuthLayer::keyed`] returns, so the
/// layer options (`header_name`, `max_replay_body`, `token_rejected_when`, `replay_when`,
/// `allowed_origins`, `inner_body`, ...) are the same as for an [`AuthLayer`] and apply to
/// every key.
pub struct KeyedCaches<K> {
    key: Arc<KeyFn<K>>,
    new_cache: Arc<NewCache<K>>,
    cache_options: Option<Arc<CacheOptions<K>>>,
    max_keys: usize,
    idle_after: Duration,
}

impl<K> fmt::Debug for KeyedCaches<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedCaches")
            .field("max_keys", &self.max_keys)
            .field("idle_after", &self.idle_after)
            .field("cache_options", &self.cache_options.is_some())
            .finish_non_exhaustive()
    }
}

impl AuthLayer<Unchanged> {
    /// Options for a [`KeyedAuthLayer`]: one token cache per key that `key` computes from a
    /// request's head, each over a provider that `provider` makes for its key. See the
    /// [`keyed`](crate::keyed) module.
    pub fn keyed<K, F, P>(
        key: impl Fn(&request::Parts) -> Option<K> + Send + Sync + 'static,
        provider: F,
    ) -> AuthLayerBuilder<KeyedCaches<K>>
    where
        K: Hash + Eq + Clone + Send + Sync + 'static,
        F: Fn(&K) -> P + Send + Sync + 'static,
        P: TokenProvider,
    {
        KeyedAuthLayer::builder(key, provider)
    }
}

impl<K, I> AuthLayerBuilder<KeyedCaches<K>, I>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    /// Hold at most this many keys (at least one). A new key beyond the bound first drops the
    /// keys idle for [`idle_after`](Self::idle_after), then the least recently used one.
    /// A dropped key's cache lives on for the requests still using it; its next request
    /// builds a new cache, which fetches a new token. Default: [`DEFAULT_MAX_KEYS`] (1,000).
    pub fn max_keys(mut self, max_keys: usize) -> Self {
        self.cache_mut().max_keys = max_keys.max(1);
        self
    }

    /// Drop a key's cache after this long without a request, so keys that come and go (tenants,
    /// short-lived scopes) do not keep their tokens forever. Default: [`DEFAULT_IDLE_AFTER`]
    /// (1 hour).
    pub fn idle_after(mut self, idle_after: Duration) -> Self {
        self.cache_mut().idle_after = idle_after;
        self
    }

    /// Set the options of each key's new cache, as on [`TokenCacheBuilder`]: skew, advisory
    /// window, refresh timeout, backoff, rejection cooldown, scheme, a store per key. Default:
    /// the cache defaults.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_auth_refresh::{AuthLayer, StaticToken, Token};
    ///
    /// let layer = AuthLayer::keyed(
    ///     |request: &http::request::Parts| request.headers.get("x-tenant").cloned(),
    ///     |_tenant: &http::HeaderValue| StaticToken::new(Token::new("secret")),
    /// )
    /// .cache_options(|_tenant, cache| {
    ///     cache
    ///         .refresh_skew(Duration::from_secs(30))
    ///         .rejection_cooldown(Duration::from_secs(10))
    /// })
    /// .build();
    /// # drop(layer);
    /// ```
    pub fn cache_options<F>(mut self, options: F) -> Self
    where
        F: Fn(&K, TokenCacheBuilder) -> TokenCacheBuilder + Send + Sync + 'static,
    {
        self.cache_mut().cache_options = Some(Arc::new(options));
        self
    }

    /// Build the layer. No cache exists until the first request for its key.
    pub fn build(self) -> KeyedAuthLayer<K, I> {
        let (caches, inner_body, options) = self.into_parts();
        let idle_after = millis(caches.idle_after);
        KeyedAuthLayer {
            shared: Arc::new(KeyedShared {
                key: caches.key,
                new_cache: caches.new_cache,
                cache_options: caches.cache_options,
                options,
                caches: ArcSwap::from_pointee(HashMap::new()),
                writer: Mutex::new(0),
                max_keys: caches.max_keys,
                idle_after,
                epoch: Instant::now(),
                next_sweep: AtomicU64::new(sweep_interval(idle_after)),
                created: AtomicU64::new(0),
                evicted_idle: AtomicU64::new(0),
                evicted_least_recent: AtomicU64::new(0),
            }),
            inner_body,
        }
    }
}

/// One token cache per key, behind one layer. See the [module docs](self).
///
/// Clones of the layer, and every service it builds, share the same caches.
pub struct KeyedAuthLayer<K, I = Unchanged> {
    shared: Arc<KeyedShared<K>>,
    inner_body: I,
}

impl<K> KeyedAuthLayer<K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    /// A layer with every option at its default. See [`AuthLayer::keyed`].
    pub fn new<F, P>(
        key: impl Fn(&request::Parts) -> Option<K> + Send + Sync + 'static,
        provider: F,
    ) -> Self
    where
        F: Fn(&K) -> P + Send + Sync + 'static,
        P: TokenProvider,
    {
        Self::builder(key, provider).build()
    }

    /// Options for a layer: the same as [`AuthLayer::keyed`].
    pub fn builder<F, P>(
        key: impl Fn(&request::Parts) -> Option<K> + Send + Sync + 'static,
        provider: F,
    ) -> AuthLayerBuilder<KeyedCaches<K>>
    where
        F: Fn(&K) -> P + Send + Sync + 'static,
        P: TokenProvider,
    {
        AuthLayerBuilder::new(KeyedCaches {
            key: Arc::new(key),
            new_cache: Arc::new(move |key: &K| TokenCache::builder(provider(key))),
            cache_options: None,
            max_keys: DEFAULT_MAX_KEYS,
            idle_after: DEFAULT_IDLE_AFTER,
        })
    }
}

impl<K, I> KeyedAuthLayer<K, I>
where
    K: Hash + Eq,
{
    /// The cache of `key`, if the layer holds one.
    pub fn cache(&self, key: &K) -> Option<TokenCache> {
        let caches = self.shared.caches.load();
        caches.get(key).map(|entry| entry.settings.cache.clone())
    }

    /// Every key the layer holds, with its cache (for [`TokenCache::stats`]).
    pub fn caches(&self) -> Vec<(K, TokenCache)>
    where
        K: Clone,
    {
        let caches = self.shared.caches.load();
        caches
            .iter()
            .map(|(key, entry)| (key.clone(), entry.settings.cache.clone()))
            .collect()
    }

    /// The number of keys and what happened to them.
    pub fn stats(&self) -> KeyedStats {
        let shared = &self.shared;
        KeyedStats {
            keys: shared.caches.load().len(),
            created: shared.created.load(Ordering::Relaxed),
            evicted_idle: shared.evicted_idle.load(Ordering::Relaxed),
            evicted_least_recent: shared.evicted_least_recent.load(Ordering::Relaxed),
        }
    }
}

/// What a [`KeyedAuthLayer`] holds and has done. The token counts are per key:
/// [`KeyedAuthLayer::cache`] and [`TokenCache::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyedStats {
    /// Keys, and so token caches, held now.
    pub keys: usize,
    /// Caches built: one per key's first request, and again after the key was dropped.
    pub created: u64,
    /// Keys dropped after [`idle_after`](AuthLayerBuilder::idle_after) without a request.
    pub evicted_idle: u64,
    /// Keys dropped as the least recently used, to make room under
    /// [`max_keys`](AuthLayerBuilder::max_keys).
    pub evicted_least_recent: u64,
}

impl<K, I: Clone> Clone for KeyedAuthLayer<K, I> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            inner_body: self.inner_body.clone(),
        }
    }
}

impl<K, I> fmt::Debug for KeyedAuthLayer<K, I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedAuthLayer")
            .field("shared", &self.shared)
            .finish()
    }
}

impl<S, K, I: Clone> Layer<S> for KeyedAuthLayer<K, I> {
    type Service = KeyedAuthService<S, K, I>;

    fn layer(&self, inner: S) -> Self::Service {
        KeyedAuthService {
            inner,
            shared: self.shared.clone(),
            inner_body: self.inner_body.clone(),
        }
    }
}

/// The service a [`KeyedAuthLayer`] builds: each request goes through an
/// [`AuthService`] over its key's cache.
///
/// `poll_ready` is the inner service's, as for `AuthService`.
pub struct KeyedAuthService<S, K, I = Unchanged> {
    inner: S,
    shared: Arc<KeyedShared<K>>,
    inner_body: I,
}

impl<S, K, I> KeyedAuthService<S, K, I> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The wrapped service, consuming this one.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, K, I: Clone> Clone for KeyedAuthService<S, K, I> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            inner_body: self.inner_body.clone(),
        }
    }
}

impl<S: fmt::Debug, K, I> fmt::Debug for KeyedAuthService<S, K, I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedAuthService")
            .field("inner", &self.inner)
            .field("shared", &self.shared)
            .finish()
    }
}

impl<S, K, I, B, ResBody> Service<Request<B>> for KeyedAuthService<S, K, I>
where
    K: Hash + Eq + Clone,
    I: IntoInnerBody<B>,
    S: Service<Request<I::Body>, Response = Response<ResBody>> + Clone,
    S::Error: Into<tower::BoxError>,
    B: Body<Data = Bytes>,
{
    type Response = Response<ResBody>;
    type Error = tower::BoxError;
    type Future = ResponseFuture<S, B, I>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let (parts, body) = request.into_parts();
        let Some(key) = (self.shared.key)(&parts) else {
            return ResponseFuture::passthrough(&mut self.inner, &self.inner_body, parts, body);
        };
        let settings = self.shared.settings(key);
        // The ready service goes to this request's `AuthService`, so the one response future
        // (and its one replay path) serves every key; a fresh clone stays for the next call
        // (tower's `mem::replace` idiom).
        let clone = self.inner.clone();
        let ready = mem::replace(&mut self.inner, clone);
        AuthService::for_one_call(ready, settings, self.inner_body.clone())
            .call(Request::from_parts(parts, body))
    }
}

/// What every clone of a [`KeyedAuthLayer`] and its services share.
struct KeyedShared<K> {
    key: Arc<KeyFn<K>>,
    new_cache: Arc<NewCache<K>>,
    cache_options: Option<Arc<CacheOptions<K>>>,
    options: LayerOptions,
    /// Read without a lock on every request; replaced whole (copy on write) under `writer`.
    caches: ArcSwap<HashMap<K, Arc<KeyEntry>>>,
    /// Serializes the writers of `caches`; holds the sequence number of the next new key.
    writer: Mutex<u64>,
    max_keys: usize,
    /// Milliseconds.
    idle_after: u64,
    /// The origin of the millisecond clock in `KeyEntry::last_used`.
    epoch: Instant,
    /// When (milliseconds since `epoch`) a request next looks for idle keys.
    next_sweep: AtomicU64,
    created: AtomicU64,
    evicted_idle: AtomicU64,
    evicted_least_recent: AtomicU64,
}

/// One key's cache and options, as an `AuthService` reads them.
struct KeyEntry {
    settings: Arc<AuthSettings>,
    /// Milliseconds since `KeyedShared::epoch` at the key's last request.
    last_used: AtomicU64,
    /// Order of creation: among keys last used in the same millisecond, the older goes first.
    sequence: u64,
}

impl KeyEntry {
    /// Written only when the millisecond changed, so concurrent requests for a key mostly read
    /// the cache line and do not bounce it between cores.
    fn touch(&self, now: u64) {
        if self.last_used.load(Ordering::Relaxed) < now {
            self.last_used.fetch_max(now, Ordering::Relaxed);
        }
    }

    fn recency(&self) -> (u64, u64) {
        (self.last_used.load(Ordering::Relaxed), self.sequence)
    }
}

impl<K: Hash + Eq + Clone> KeyedShared<K> {
    /// The settings of `key`'s cache, built on its first request.
    fn settings(&self, key: K) -> Arc<AuthSettings> {
        let now = self.now();
        let found = self.caches.load().get(&key).map(|entry| {
            entry.touch(now);
            entry.settings.clone()
        });
        match found {
            Some(settings) => {
                if now >= self.next_sweep.load(Ordering::Relaxed) {
                    self.sweep(now);
                }
                settings
            }
            None => self.insert(key, now),
        }
    }

    /// The slow path: a key without a cache. Copies the map once, dropping idle keys and, past
    /// the bound, the least recently used ones.
    fn insert(&self, key: K, now: u64) -> Arc<AuthSettings> {
        let mut next_sequence = lock(&self.writer);
        let current = self.caches.load_full();
        // Another request may have added the key while this one waited for the lock.
        if let Some(entry) = current.get(&key) {
            entry.touch(now);
            return entry.settings.clone();
        }
        let mut caches = HashMap::clone(&current);
        self.drop_idle(&mut caches, now);
        while caches.len() >= self.max_keys {
            let least_recent = caches
                .iter()
                .min_by_key(|(_, entry)| entry.recency())
                .map(|(_, entry)| entry.sequence);
            let Some(sequence) = least_recent else { break };
            caches.retain(|_, entry| entry.sequence != sequence);
            self.evicted_least_recent.fetch_add(1, Ordering::Relaxed);
        }

        let mut builder = (self.new_cache)(&key);
        if let Some(options) = &self.cache_options {
            builder = options(&key, builder);
        }
        let builder = self.options.configure_cache(builder);
        let settings = Arc::new(self.options.clone().into_settings(builder.build()));
        let sequence = *next_sequence;
        *next_sequence += 1;
        caches.insert(
            key,
            Arc::new(KeyEntry {
                settings: settings.clone(),
                last_used: AtomicU64::new(now),
                sequence,
            }),
        );
        self.caches.store(Arc::new(caches));
        self.created.fetch_add(1, Ordering::Relaxed);
        settings
    }

    /// Drop idle keys, at most once per half `idle_after`; skipped if a writer is busy, whose
    /// copy of the map drops them anyway.
    fn sweep(&self, now: u64) {
        let _writer = match self.writer.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return,
        };
        self.next_sweep.store(
            now.saturating_add(sweep_interval(self.idle_after)),
            Ordering::Relaxed,
        );
        let current = self.caches.load_full();
        if !current.values().any(|entry| self.is_idle(entry, now)) {
            return;
        }
        let mut caches = HashMap::clone(&current);
        self.drop_idle(&mut caches, now);
        self.caches.store(Arc::new(caches));
    }

    fn drop_idle(&self, caches: &mut HashMap<K, Arc<KeyEntry>>, now: u64) {
        let before = caches.len();
        caches.retain(|_, entry| !self.is_idle(entry, now));
        let dropped = before - caches.len();
        self.evicted_idle
            .fetch_add(dropped as u64, Ordering::Relaxed);
    }

    fn is_idle(&self, entry: &KeyEntry, now: u64) -> bool {
        now.saturating_sub(entry.last_used.load(Ordering::Relaxed)) >= self.idle_after
    }

    /// Milliseconds since `epoch`, on tokio's clock (so a paused test clock drives idleness).
    fn now(&self) -> u64 {
        millis(Instant::now().saturating_duration_since(self.epoch))
    }
}

impl<K> fmt::Debug for KeyedShared<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedShared")
            .field("keys", &self.caches.load().len())
            .field("max_keys", &self.max_keys)
            .field("idle_after", &Duration::from_millis(self.idle_after))
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking provider factory leaves the map as it was: nothing to repair.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Idle keys are looked for twice per `idle_after`: a key is gone at most 1.5 `idle_after`
/// after its last request, if any request comes.
fn sweep_interval(idle_after: u64) -> u64 {
    (idle_after / 2).max(1)
}
