//! [`AuthLayer`]: configuration only. It holds the shared token cache and the options, and
//! builds an [`AuthService`] around any inner service.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::header::AUTHORIZATION;
use http::{request, HeaderMap, HeaderName, StatusCode};
use tower_layer::Layer;

use crate::cache::{TokenCache, TokenCacheBuilder};
use crate::challenge::StepUp;
use crate::inner_body::Unchanged;
use crate::origin::Origin;
use crate::predicate::{self, RejectionPredicate, ReplayPredicate};
use crate::provider::{TokenProvider, TokenRequest};
use crate::replay::DEFAULT_MAX_REPLAY_BODY;
use crate::service::AuthService;

/// Adds `Authorization: Bearer <token>` to every request, from a shared cache that refreshes
/// before expiry, and replays a request once with a new token when the API rejects the old one.
///
/// Clones of the layer, and every service it builds, share one [`TokenCache`].
///
/// ```
/// use std::time::Duration;
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
/// use tower_auth_refresh::{provider_fn, AuthLayer, ReplayBody, Token};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let auth = AuthLayer::new(provider_fn(|| async {
///     Ok::<_, tower::BoxError>(Token::new("secret").with_expires_in(Duration::from_secs(3600)))
/// }));
///
/// // Any `Service<Request<ReplayBody<B>>>` works below the layer, a hyper-util client included.
/// let api = service_fn(|request: http::Request<ReplayBody<Full<Bytes>>>| async move {
///     let authorization = request.headers()["authorization"].clone();
///     assert!(authorization.is_sensitive());
///     Ok::<_, std::convert::Infallible>(http::Response::new(authorization))
/// });
///
/// let client = ServiceBuilder::new().layer(auth.clone()).service(api);
/// let response = client
///     .oneshot(http::Request::new(Full::new(Bytes::from_static(b"hello"))))
///     .await?;
/// assert_eq!(response.body(), "Bearer secret");
/// # Ok::<_, tower::BoxError>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct AuthLayer<I = Unchanged> {
    settings: Arc<AuthSettings>,
    inner_body: I,
}

/// What to do with a request that already carries the authorization header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExistingAuthorization {
    /// Send it as it is, without a token from the cache and without a replay (default): the
    /// caller chose that credential.
    #[default]
    Keep,
    /// Replace it with the cache's token.
    Replace,
}

/// The options an [`AuthService`] reads on every request.
pub(crate) struct AuthSettings {
    pub(crate) cache: TokenCache,
    pub(crate) header_name: HeaderName,
    pub(crate) max_replay_body: usize,
    pub(crate) rejected: Arc<RejectionPredicate>,
    pub(crate) replay_if: Option<Arc<ReplayPredicate>>,
    pub(crate) existing: ExistingAuthorization,
    pub(crate) origins: Option<Vec<Origin>>,
    pub(crate) step_up: Option<Arc<StepUp>>,
    /// Sender-constrained tokens: a proof per request, and the server nonces learned so far.
    #[cfg(feature = "dpop")]
    pub(crate) dpop: Option<crate::dpop::Dpop>,
}

/// How a response refused the request's token, as far as the layer acts on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The rejection predicate matched (a 401 by default).
    Token,
    /// A 403, looked at only because a step-up hook is set: RFC 6750 answers
    /// `insufficient_scope` with 403, which the default predicate does not match.
    Forbidden,
}

impl AuthSettings {
    /// Whether `status` refuses the token: a status check (and the predicate), nothing parsed.
    pub(crate) fn refusal(&self, status: StatusCode, headers: &HeaderMap) -> Option<Refusal> {
        refusal(&*self.rejected, self.step_up.is_some(), status, headers)
    }
}

/// [`AuthSettings::refusal`], for every client of the cache (the reqwest middleware too).
pub(crate) fn refusal(
    rejected: &RejectionPredicate,
    step_up: bool,
    status: StatusCode,
    headers: &HeaderMap,
) -> Option<Refusal> {
    if rejected(status, headers) {
        Some(Refusal::Token)
    } else if step_up && status == StatusCode::FORBIDDEN {
        Some(Refusal::Forbidden)
    } else {
        None
    }
}

impl AuthLayer<Unchanged> {
    /// A layer with a new cache over `provider` and every option at its default.
    pub fn new(provider: impl TokenProvider) -> Self {
        Self::builder(provider).build()
    }

    /// Options for a layer with a new cache over `provider`.
    pub fn builder(provider: impl TokenProvider) -> AuthLayerBuilder<TokenCacheBuilder> {
        AuthLayerBuilder::new(TokenCache::builder(provider))
    }

    /// A layer over an existing cache, so that several clients share one token.
    pub fn with_cache(cache: TokenCache) -> Self {
        Self::builder_with_cache(cache).build()
    }

    /// Options for a layer over an existing cache. The cache keeps its own options.
    pub fn builder_with_cache(cache: TokenCache) -> AuthLayerBuilder<TokenCache> {
        AuthLayerBuilder::new(cache)
    }
}

impl<I> AuthLayer<I> {
    /// The cache this layer reads tokens from.
    pub fn cache(&self) -> &TokenCache {
        &self.settings.cache
    }
}

impl<S, I: Clone> Layer<S> for AuthLayer<I> {
    type Service = AuthService<S, I>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService::new(inner, self.settings.clone(), self.inner_body.clone())
    }
}

impl<I> fmt::Debug for AuthLayer<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthLayer")
            .field("settings", &self.settings)
            .finish()
    }
}

impl fmt::Debug for AuthSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut f = f.debug_struct("AuthSettings");
        f.field("cache", &self.cache)
            .field("header_name", &self.header_name)
            .field("max_replay_body", &self.max_replay_body)
            .field("replay_filtered", &self.replay_if.is_some())
            .field("existing", &self.existing)
            .field("origins", &self.origins)
            .field("step_up", &self.step_up.is_some());
        #[cfg(feature = "dpop")]
        f.field("dpop", &self.dpop);
        f.finish_non_exhaustive()
    }
}

/// Options for an [`AuthLayer`]. Every option has a documented default.
///
/// Built from a provider (`AuthLayer::builder`), it also sets the options of the new cache;
/// built from an existing cache (`AuthLayer::builder_with_cache`), only the service's.
///
/// ```
/// use std::time::Duration;
/// use tower_auth_refresh::{predicate, AuthLayer, StaticToken, Token};
///
/// let layer = AuthLayer::builder(StaticToken::new(Token::new("secret")))
///     .refresh_skew(Duration::from_secs(120))
///     .refresh_timeout(Duration::from_secs(10))
///     .max_replay_body(1024 * 1024)
///     .token_rejected_when(predicate::unauthorized_or_invalid_token)
///     .replay_when(predicate::idempotent)
///     .build();
/// # drop(layer);
/// ```
pub struct AuthLayerBuilder<C, I = Unchanged> {
    cache: C,
    inner_body: I,
    options: LayerOptions,
}

/// The layer's own options, which become its [`AuthSettings`] next to the cache.
///
/// Cloned once per cache by a [`KeyedAuthLayer`](crate::keyed::KeyedAuthLayer), so the
/// predicates are shared, not boxed per cache.
#[derive(Clone)]
pub(crate) struct LayerOptions {
    header_name: HeaderName,
    max_replay_body: usize,
    rejected: Arc<RejectionPredicate>,
    replay_if: Option<Arc<ReplayPredicate>>,
    existing: ExistingAuthorization,
    origins: Option<Vec<Origin>>,
    step_up: Option<Arc<StepUp>>,
    #[cfg(feature = "dpop")]
    dpop: Option<crate::dpop::Dpop>,
}

impl LayerOptions {
    /// What these options require of a cache the layer builds: the `DPoP` scheme with DPoP.
    pub(crate) fn configure_cache(&self, cache: TokenCacheBuilder) -> TokenCacheBuilder {
        #[cfg(feature = "dpop")]
        if self.dpop.is_some() {
            return cache.scheme("DPoP");
        }
        cache
    }

    pub(crate) fn into_settings(self, cache: TokenCache) -> AuthSettings {
        AuthSettings {
            cache,
            header_name: self.header_name,
            max_replay_body: self.max_replay_body,
            rejected: self.rejected,
            replay_if: self.replay_if,
            existing: self.existing,
            origins: self.origins,
            step_up: self.step_up,
            #[cfg(feature = "dpop")]
            dpop: self.dpop,
        }
    }
}

impl<C> AuthLayerBuilder<C> {
    pub(crate) fn new(cache: C) -> Self {
        Self {
            cache,
            inner_body: Unchanged,
            options: LayerOptions {
                header_name: AUTHORIZATION,
                max_replay_body: DEFAULT_MAX_REPLAY_BODY,
                rejected: Arc::new(predicate::unauthorized),
                replay_if: None,
                existing: ExistingAuthorization::Keep,
                origins: None,
                step_up: None,
                #[cfg(feature = "dpop")]
                dpop: None,
            },
        }
    }
}

impl<C, I> AuthLayerBuilder<C, I> {
    /// Hand the inner service the body type it accepts, by naming the conversion once:
    /// [`inner_body::Boxed`](crate::inner_body::Boxed) for a client of `BoxBody<Bytes, BoxError>`,
    /// [`inner_body::UnsyncBoxed`](crate::inner_body::UnsyncBoxed), or a closure `|body: ReplayBody<B>| ...`. See the
    /// [`inner_body`](crate::inner_body) module. Default: [`Unchanged`], the inner service
    /// receives [`ReplayBody<B>`](crate::ReplayBody).
    pub fn inner_body<I2>(self, conversion: I2) -> AuthLayerBuilder<C, I2> {
        AuthLayerBuilder {
            cache: self.cache,
            inner_body: conversion,
            options: self.options,
        }
    }

    /// Send the token only to these origins; requests to any other origin (or with a relative
    /// URI) pass through without it and are never replayed. Default: every origin, which is
    /// only safe when the client talks to nothing but the API the token is for.
    ///
    /// ```
    /// use tower_auth_refresh::{AuthLayer, Origin, StaticToken, Token};
    ///
    /// let layer = AuthLayer::builder(StaticToken::new(Token::new("secret")))
    ///     .allowed_origins([Origin::parse("https://api.mypurecloud.ie").unwrap()])
    ///     .build();
    /// # drop(layer);
    /// ```
    pub fn allowed_origins(mut self, origins: impl IntoIterator<Item = Origin>) -> Self {
        self.options.origins = Some(origins.into_iter().collect());
        self
    }

    /// The header that carries the token. Default: `Authorization`.
    pub fn header_name(mut self, name: HeaderName) -> Self {
        self.options.header_name = name;
        self
    }

    /// Keep request bodies up to this many bytes so the request can be replayed after a
    /// rejection. Larger bodies are streamed as usual and their rejection goes back to the
    /// caller. Default: 64 KiB.
    pub fn max_replay_body(mut self, bytes: usize) -> Self {
        self.options.max_replay_body = bytes;
        self
    }

    /// Which responses mean the token was rejected. Default: [`predicate::unauthorized`] (401).
    pub fn token_rejected_when<F>(mut self, rejected: F) -> Self
    where
        F: Fn(StatusCode, &HeaderMap) -> bool + Send + Sync + 'static,
    {
        self.options.rejected = Arc::new(rejected);
        self
    }

    /// Which requests may be replayed after a rejection. Default: every request, since a 401
    /// means the request was refused before it was acted on. [`predicate::idempotent`] is the
    /// conservative choice.
    pub fn replay_when<F>(mut self, replay_if: F) -> Self
    where
        F: Fn(&request::Parts) -> bool + Send + Sync + 'static,
    {
        self.options.replay_if = Some(Arc::new(replay_if));
        self
    }

    /// What to do with requests that already carry the header. Default:
    /// [`ExistingAuthorization::Keep`].
    pub fn existing_authorization(mut self, existing: ExistingAuthorization) -> Self {
        self.options.existing = existing;
        self
    }

    /// Send DPoP-bound tokens (RFC 9449): `Authorization: DPoP <token>` and a `DPoP` proof
    /// signed by `dpop`'s key on every request, the replay included. A `401` with
    /// `WWW-Authenticate: DPoP error="use_dpop_nonce"` and a `DPoP-Nonce` the request's proof did
    /// not carry is replayed once with that nonce and the same token; every response's
    /// `DPoP-Nonce` is remembered for its origin. Share `dpop` with the token source (its `dpop`
    /// option), so that one key signs the token requests and the API requests.
    ///
    /// A cache this builder creates uses the `DPoP` scheme; an existing cache
    /// ([`AuthLayer::builder_with_cache`]) must be built with
    /// [`scheme("DPoP")`](TokenCacheBuilder::scheme). Requests need an absolute URI (the proof
    /// names it); one without is refused with [`AuthError::Dpop`](crate::AuthError::Dpop).
    /// Default: off, bearer tokens.
    ///
    /// ```
    /// use tower_auth_refresh::dpop::Dpop;
    /// use tower_auth_refresh::{AuthLayer, StaticToken, Token};
    ///
    /// let dpop = Dpop::generate().unwrap();
    /// let layer = AuthLayer::builder(StaticToken::new(Token::new("bound-token")))
    ///     .dpop(dpop.clone())
    ///     .build();
    /// # drop(layer);
    /// ```
    #[cfg(feature = "dpop")]
    pub fn dpop(mut self, dpop: crate::dpop::Dpop) -> Self {
        self.options.dpop = Some(dpop);
        self
    }

    /// Step up on `insufficient_scope`: when a rejection's challenge says
    /// `error="insufficient_scope"`, call `step_up` with the scope it names (empty if none); a
    /// [`TokenRequest`] it returns is passed to the provider
    /// ([`TokenProvider::fetch_token_for`]) for one new token, and the request is replayed once
    /// with it. `None` gives the response back unchanged. Default: no hook, every
    /// `insufficient_scope` response goes back unchanged (a new token with the same scope would
    /// be refused too).
    ///
    /// Looked for on 401s (the rejection predicate) and on 403s, where RFC 6750 puts
    /// `insufficient_scope`. The stepped-up token becomes the cache's token for every request;
    /// one is fetched however many requests met the challenge, and the
    /// [rejection cooldown](TokenCacheBuilder::rejection_cooldown) bounds the token requests of
    /// an API that refuses it too. Counted in [`CacheStats::step_ups`](crate::CacheStats::step_ups).
    ///
    /// ```
    /// use tower_auth_refresh::{AuthLayer, StaticToken, Token, TokenRequest};
    ///
    /// // Step up to the scopes this client may hold, never to anything else.
    /// let layer = AuthLayer::builder(StaticToken::new(Token::new("secret")))
    ///     .step_up(|scope| {
    ///         let allowed = ["admin", "reports:write"];
    ///         allowed.contains(&scope).then(|| TokenRequest::new().with_scope(scope))
    ///     })
    ///     .build();
    /// # drop(layer);
    /// ```
    pub fn step_up<F>(mut self, step_up: F) -> Self
    where
        F: Fn(&str) -> Option<TokenRequest> + Send + Sync + 'static,
    {
        self.options.step_up = Some(Arc::new(step_up));
        self
    }

    /// [`step_up`](Self::step_up) to exactly the scope the challenge names (none if it names
    /// none). Only for an API the client trusts to ask for what it needs: the identity provider
    /// decides what the client may have.
    pub fn step_up_to_challenged_scope(self) -> Self {
        self.step_up(|scope| (!scope.is_empty()).then(|| TokenRequest::new().with_scope(scope)))
    }

    /// What the builder holds, for builders of other layers over the same options.
    pub(crate) fn into_parts(self) -> (C, I, LayerOptions) {
        (self.cache, self.inner_body, self.options)
    }

    /// The cache part, mutably, for builders of other layers over the same options.
    pub(crate) fn cache_mut(&mut self) -> &mut C {
        &mut self.cache
    }

    fn finish(self, into_cache: impl FnOnce(C) -> TokenCache) -> AuthLayer<I> {
        AuthLayer {
            inner_body: self.inner_body,
            settings: Arc::new(self.options.into_settings(into_cache(self.cache))),
        }
    }
}

impl<I> AuthLayerBuilder<TokenCacheBuilder, I> {
    /// See [`TokenCacheBuilder::refresh_skew`]. Default: 60 seconds.
    pub fn refresh_skew(mut self, skew: Duration) -> Self {
        self.cache = self.cache.refresh_skew(skew);
        self
    }

    /// See [`TokenCacheBuilder::advisory_window`]. Default: 5 minutes.
    pub fn advisory_window(mut self, window: Duration) -> Self {
        self.cache = self.cache.advisory_window(window);
        self
    }

    /// See [`TokenCacheBuilder::refresh_timeout`]. Default: 30 seconds.
    pub fn refresh_timeout(mut self, timeout: Duration) -> Self {
        self.cache = self.cache.refresh_timeout(timeout);
        self
    }

    /// See [`TokenCacheBuilder::backoff`]. Default: 1 second doubling to 30 seconds.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.cache = self.cache.backoff(initial, max);
        self
    }

    /// After a refresh caused by a 401, do not refresh again for a 401 within this long: see
    /// [`TokenCacheBuilder::rejection_cooldown`]. Default: 5 seconds.
    pub fn rejection_cooldown(mut self, cooldown: Duration) -> Self {
        self.cache = self.cache.rejection_cooldown(cooldown);
        self
    }

    /// See [`TokenCacheBuilder::scheme`]. Default: `Bearer`.
    pub fn scheme(mut self, scheme: impl Into<String>) -> Self {
        self.cache = self.cache.scheme(scheme);
        self
    }

    /// See [`TokenCacheBuilder::store`]. Default: [`LocalStore`](crate::LocalStore).
    pub fn store(mut self, store: impl crate::TokenStore) -> Self {
        self.cache = self.cache.store(store);
        self
    }

    /// Build the layer and its new cache.
    pub fn build(self) -> AuthLayer<I> {
        let cache = self.options.configure_cache(self.cache);
        AuthLayerBuilder { cache, ..self }.finish(TokenCacheBuilder::build)
    }
}

impl<I> AuthLayerBuilder<TokenCache, I> {
    /// Build the layer over the existing cache.
    pub fn build(self) -> AuthLayer<I> {
        self.finish(|cache| cache)
    }
}

impl<C: fmt::Debug, I> fmt::Debug for AuthLayerBuilder<C, I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthLayerBuilder")
            .field("cache", &self.cache)
            .field("header_name", &self.options.header_name)
            .field("max_replay_body", &self.options.max_replay_body)
            .field("existing", &self.options.existing)
            .finish_non_exhaustive()
    }
}
