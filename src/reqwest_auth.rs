//! The same guarantees for [reqwest](https://docs.rs/reqwest) users (feature `reqwest`): an
//! [`AuthMiddleware`] for a [`reqwest_middleware`] client chain, over the same [`TokenCache`] as
//! [`AuthLayer`](crate::AuthLayer).
//!
//! Every request takes its token from the shared cache (one token request for any number of
//! concurrent requests that need a new one, a background refresh before expiry), the header is
//! marked sensitive, and a rejected request (a `401` by default) is replayed once with the next
//! token: a 401 for a token that was already replaced fetches nothing, a 401 on the replay goes
//! back to the caller, and a token that is refused as soon as it was fetched is not refreshed
//! again within the [rejection cooldown](crate::TokenCacheBuilder::rejection_cooldown).
//! Challenges are read as the layer reads them (see [`challenge`](crate::challenge)):
//! `insufficient_claims` refreshes with the claims and replays once, `insufficient_scope` goes
//! back unchanged unless [`step_up`](AuthMiddlewareBuilder::step_up) is set.
//!
//! ```no_run
//! use std::time::Duration;
//! use reqwest_middleware::ClientBuilder;
//! use tower_auth_refresh::reqwest_auth::AuthMiddleware;
//! use tower_auth_refresh::{provider_fn, AuthError, Origin, Token, TokenCache};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//!     let cache = TokenCache::new(provider_fn(|| async {
//!         // Ask your identity provider here (client credentials, refresh token, ...).
//!         Ok::<_, tower::BoxError>(Token::new("secret").with_expires_in(Duration::from_secs(3600)))
//!     }));
//!     let auth = AuthMiddleware::builder(cache.clone()) // clones of the cache share one token
//!         .allowed_origins([Origin::parse("https://api.example")?])
//!         .build();
//!     let client = ClientBuilder::new(reqwest::Client::new()).with(auth).build();
//!
//!     match client.get("https://api.example/contacts").send().await {
//!         Ok(response) => println!("{}", response.status()),
//!         // Errors of this crate come wrapped in `Error::Middleware`.
//!         Err(reqwest_middleware::Error::Middleware(error)) => {
//!             if let Some(auth_error) = error.downcast_ref::<AuthError>() {
//!                 eprintln!("no token: {auth_error}");
//!             }
//!         }
//!         Err(error) => return Err(error.into()),
//!     }
//!     println!("{} token request(s)", cache.stats().token_requests);
//!     Ok(())
//! }
//! ```
//!
//! What differs from the tower layer, and why:
//! - **Replays need a cloneable request.** reqwest keeps a body given as bytes or a string and
//!   can clone it ([`reqwest::Request::try_clone`]); a streaming body cannot be cloned, so its
//!   rejection goes back to the caller unchanged (with a `debug` event saying so). No byte cap
//!   applies: a cloneable body is already in memory.
//! - **Redirects** are followed by reqwest itself, below the middleware, so
//!   [`allowed_origins`](AuthMiddlewareBuilder::allowed_origins) sees only the first URL.
//!   reqwest drops the `Authorization` header when a redirect leaves the origin, but not a token
//!   in another header (see [`header_name`](AuthMiddlewareBuilder::header_name)): with one, turn
//!   redirects off (`reqwest::redirect::Policy::none()`).
//! - **Errors** are [`reqwest_middleware::Error::Middleware`] wrapping an [`AuthError`]; reqwest's
//!   own errors pass through as `Error::Reqwest`.
//!
//! To put the tower [`AuthLayer`](crate::AuthLayer) itself over reqwest instead (with tower's
//! retry, timeout and limit layers around it, and replays of streamed bodies up to a cap), use
//! [`ReqwestService`] as the inner service.
//!
//! Clients outside both (a hand-written loop over any HTTP client) can build the same thing on
//! [`TokenCache::token`] and [`TokenCache::reject`].

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::{Extensions, HeaderMap, HeaderName, StatusCode};
use reqwest::{Request, Response, Url};
use reqwest_middleware::{Middleware, Next};

use crate::cache::{Acquire, Credential, Rejection, TokenCache};
use crate::challenge::StepUp;
use crate::error::AuthError;
use crate::layer::{refusal, ExistingAuthorization, Refusal};
use crate::origin::Origin;
use crate::predicate::{self, RejectionPredicate};
use crate::provider::{TokenProvider, TokenRequest};
use crate::replay::ReplayBody;

/// Decides from a reqwest request whether it may be replayed after a rejection.
pub type ReplayPredicate = dyn Fn(&Request) -> bool + Send + Sync;

/// A [`reqwest_middleware::Middleware`] that adds the token from a shared [`TokenCache`] and
/// replays a rejected request once with a new one. See the [module docs](self).
///
/// Cloning is cheap; clones share the options and the cache.
#[derive(Clone)]
pub struct AuthMiddleware {
    settings: Arc<Settings>,
}

struct Settings {
    cache: TokenCache,
    header_name: HeaderName,
    rejected: Box<RejectionPredicate>,
    replay_if: Option<Box<ReplayPredicate>>,
    existing: ExistingAuthorization,
    origins: Option<Vec<Origin>>,
    step_up: Option<Box<StepUp>>,
}

impl AuthMiddleware {
    /// A middleware with a new cache over `provider` and every option at its default.
    pub fn new(provider: impl TokenProvider) -> Self {
        Self::with_cache(TokenCache::new(provider))
    }

    /// A middleware over an existing cache, for instance an [`AuthLayer`](crate::AuthLayer)'s
    /// (`layer.cache().clone()`), so that a reqwest client and a tower stack share one token.
    pub fn with_cache(cache: TokenCache) -> Self {
        Self::builder(cache).build()
    }

    /// Options for a middleware over `cache`. The cache keeps its own options (skew, timeout,
    /// backoff, rejection cooldown, scheme): set them with [`TokenCache::builder`].
    pub fn builder(cache: TokenCache) -> AuthMiddlewareBuilder {
        AuthMiddlewareBuilder {
            settings: Settings {
                cache,
                header_name: AUTHORIZATION,
                rejected: Box::new(predicate::unauthorized),
                replay_if: None,
                existing: ExistingAuthorization::Keep,
                origins: None,
                step_up: None,
            },
        }
    }

    /// The cache this middleware reads tokens from.
    pub fn cache(&self) -> &TokenCache {
        &self.settings.cache
    }
}

/// Options for an [`AuthMiddleware`]. Every option has a documented default.
///
/// ```
/// use tower_auth_refresh::reqwest_auth::AuthMiddleware;
/// use tower_auth_refresh::{predicate, StaticToken, Token, TokenCache};
///
/// let cache = TokenCache::new(StaticToken::new(Token::new("secret")));
/// let middleware = AuthMiddleware::builder(cache)
///     .token_rejected_when(predicate::unauthorized_or_invalid_token)
///     .replay_when(|request| request.method().is_idempotent())
///     .build();
/// # drop(middleware);
/// ```
pub struct AuthMiddlewareBuilder {
    settings: Settings,
}

impl AuthMiddlewareBuilder {
    /// Send the token only to these origins; requests to any other origin pass through without
    /// it and are never replayed. Default: every origin, which is only safe when the client
    /// talks to nothing but the API the token is for.
    pub fn allowed_origins(mut self, origins: impl IntoIterator<Item = Origin>) -> Self {
        self.settings.origins = Some(origins.into_iter().collect());
        self
    }

    /// The header that carries the token. Default: `Authorization`.
    pub fn header_name(mut self, name: HeaderName) -> Self {
        self.settings.header_name = name;
        self
    }

    /// Which responses mean the token was rejected. Default: [`predicate::unauthorized`] (401).
    pub fn token_rejected_when<F>(mut self, rejected: F) -> Self
    where
        F: Fn(StatusCode, &HeaderMap) -> bool + Send + Sync + 'static,
    {
        self.settings.rejected = Box::new(rejected);
        self
    }

    /// Which requests may be replayed after a rejection. Default: every request whose body can
    /// be cloned, since a 401 means the request was refused before it was acted on;
    /// `|request| request.method().is_idempotent()` is the conservative choice.
    pub fn replay_when<F>(mut self, replay_if: F) -> Self
    where
        F: Fn(&Request) -> bool + Send + Sync + 'static,
    {
        self.settings.replay_if = Some(Box::new(replay_if));
        self
    }

    /// What to do with requests that already carry the header. Default:
    /// [`ExistingAuthorization::Keep`]: sent as they are, without a token from the cache and
    /// without a replay.
    pub fn existing_authorization(mut self, existing: ExistingAuthorization) -> Self {
        self.settings.existing = existing;
        self
    }

    /// Step up on `insufficient_scope` (on a 401 or a 403): `step_up` turns the challenged
    /// scope into the [`TokenRequest`] for one new token, and the request is replayed once with
    /// it; `None` gives the response back unchanged. The same as
    /// [`AuthLayerBuilder::step_up`](crate::AuthLayerBuilder::step_up). Default: no hook.
    pub fn step_up<F>(mut self, step_up: F) -> Self
    where
        F: Fn(&str) -> Option<TokenRequest> + Send + Sync + 'static,
    {
        self.settings.step_up = Some(Box::new(step_up));
        self
    }

    /// [`step_up`](Self::step_up) to exactly the scope the challenge names.
    pub fn step_up_to_challenged_scope(self) -> Self {
        self.step_up(|scope| (!scope.is_empty()).then(|| TokenRequest::new().with_scope(scope)))
    }

    /// Build the middleware.
    pub fn build(self) -> AuthMiddleware {
        AuthMiddleware {
            settings: Arc::new(self.settings),
        }
    }
}

impl Settings {
    fn origin_allowed(&self, url: &Url) -> bool {
        let Some(origins) = &self.origins else {
            return true;
        };
        // `Origin` reads an `http::Uri`; a `Url` always serializes to one.
        url.as_str()
            .parse::<http::Uri>()
            .ok()
            .and_then(|uri| Origin::of(&uri))
            .is_some_and(|origin| origins.contains(&origin))
    }

    fn refusal(&self, response: &Response) -> Option<Refusal> {
        refusal(
            &*self.rejected,
            self.step_up.is_some(),
            response.status(),
            response.headers(),
        )
    }

    fn replay_allowed(&self, request: &Request) -> bool {
        self.replay_if.as_ref().is_none_or(|allow| allow(request))
    }

    /// The credential for the next attempt: the cache's hot path, or the single refresh.
    async fn credential(&self) -> Result<Credential, AuthError> {
        match self.cache.acquire() {
            Acquire::Ready(credential) => Ok(credential),
            Acquire::Wait(wait) => wait.await,
            Acquire::Failed(error) => Err(error),
        }
    }
}

fn middleware_error(error: AuthError) -> reqwest_middleware::Error {
    reqwest_middleware::Error::middleware(error)
}

#[async_trait::async_trait]
impl Middleware for AuthMiddleware {
    async fn handle(
        &self,
        mut request: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<Response> {
        let settings = &*self.settings;
        // A token goes only to the origins it is meant for; a credential the caller chose is
        // sent as it is.
        let keep_existing = settings.existing == ExistingAuthorization::Keep
            && request.headers().contains_key(&settings.header_name);
        if keep_existing || !settings.origin_allowed(request.url()) {
            return next.run(request, extensions).await;
        }

        let credential = settings.credential().await.map_err(middleware_error)?;
        request
            .headers_mut()
            .insert(settings.header_name.clone(), credential.header);
        // Cloned before it is sent: afterwards the body is gone. A bytes body is reference
        // counted, so this copies the head only.
        let replay_allowed = settings.replay_allowed(&request);
        let replay = if replay_allowed {
            request.try_clone()
        } else {
            None
        };

        let response = next.clone().run(request, extensions).await?;
        let Some(refusal) = settings.refusal(&response) else {
            return Ok(response);
        };
        // Even a request that cannot be replayed reports the rejection, so the next request
        // gets a new token. The same decision from the challenges as the tower layer's.
        let rejection = settings.cache.answer_refusal(
            credential.generation,
            response.headers(),
            refusal == Refusal::Token,
            settings.step_up.as_deref(),
        );
        match rejection {
            // Not worth a new token (`insufficient_scope` without a step-up).
            None => return Ok(response),
            // Not an expiry: a new token would be refused too.
            Some(Rejection::Repeated) => return Ok(response),
            Some(_) => {}
        }
        let Some(mut replay) = replay else {
            if replay_allowed {
                tracing::debug!(
                    status = %response.status(),
                    "token rejected; the request body is a stream and cannot be cloned, \
                     returning the response"
                );
            } else {
                tracing::debug!(
                    status = %response.status(),
                    "token rejected; `replay_when` refused the replay, returning the response"
                );
            }
            return Ok(response);
        };
        // Free the connection of the rejected attempt before the replay.
        drop(response);

        let credential = settings.credential().await.map_err(middleware_error)?;
        replay
            .headers_mut()
            .insert(settings.header_name.clone(), credential.header);
        settings.cache.record_replay();
        tracing::debug!("token rejected; replaying the request with a new token");
        let response = next.run(replay, extensions).await?;
        if settings.refusal(&response).is_none() {
            settings.cache.replay_accepted(credential.generation);
        }
        Ok(response)
    }
}

impl fmt::Debug for AuthMiddleware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let settings = &*self.settings;
        f.debug_struct("AuthMiddleware")
            .field("cache", &settings.cache)
            .field("header_name", &settings.header_name)
            .field("replay_filtered", &settings.replay_if.is_some())
            .field("existing", &settings.existing)
            .field("origins", &settings.origins)
            .field("step_up", &settings.step_up.is_some())
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for AuthMiddlewareBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthMiddlewareBuilder")
            .field("header_name", &self.settings.header_name)
            .field("existing", &self.settings.existing)
            .field("origins", &self.settings.origins)
            .finish_non_exhaustive()
    }
}

/// A `reqwest::Client` as a tower service of `http` requests, to run below an
/// [`AuthLayer`](crate::AuthLayer): the layer then gives reqwest exactly what it gives hyper,
/// streamed bodies recorded for the replay included.
///
/// ```
/// use std::time::Duration;
/// use tower::ServiceBuilder;
/// use tower_auth_refresh::reqwest_auth::ReqwestService;
/// use tower_auth_refresh::{AuthLayer, StaticToken, Token};
///
/// let auth = AuthLayer::new(StaticToken::new(Token::new("secret")));
/// let client = ServiceBuilder::new()
///     .timeout(Duration::from_secs(60)) // bounds refresh + replay
///     .layer(auth) // clones share one token cache
///     .service(ReqwestService::new(reqwest::Client::new()));
/// # drop(client);
/// ```
#[derive(Clone, Debug, Default)]
pub struct ReqwestService {
    client: reqwest::Client,
}

impl ReqwestService {
    /// A service that sends every request with `client` (and its pool, TLS and proxy options).
    pub fn new(client: reqwest::Client) -> Self {
        Self { client }
    }

    /// The reqwest client.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }
}

impl From<reqwest::Client> for ReqwestService {
    fn from(client: reqwest::Client) -> Self {
        Self::new(client)
    }
}

/// The response future of [`ReqwestService`]: boxed, because reqwest does not name its own.
pub type ReqwestFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<reqwest::Body>, reqwest::Error>> + Send>>;

impl<B> tower_service::Service<http::Request<ReplayBody<B>>> for ReqwestService
where
    B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<tower::BoxError>,
{
    type Response = http::Response<reqwest::Body>;
    type Error = reqwest::Error;
    type Future = ReqwestFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // reqwest queues requests in its own pool; it is always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<ReplayBody<B>>) -> Self::Future {
        // The body is streamed as the layer hands it down, so the layer records it for a replay.
        let request = reqwest::Request::try_from(request.map(reqwest::Body::wrap));
        let client = self.client.clone();
        Box::pin(async move {
            let response = client.execute(request?).await?;
            Ok(http::Response::from(response))
        })
    }
}
