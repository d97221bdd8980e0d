//! Where tokens come from.
//!
//! A [`TokenProvider`] asks an identity provider for a new token. It is called only by the
//! [`TokenCache`](crate::TokenCache), never once per request, and at most one call runs at a time
//! per cache; the cache adds timeout, backoff and single flight, so a provider can stay a plain
//! "fetch one token" function.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use crate::Token;

/// The future a [`TokenProvider`] returns.
///
/// `'static` and `Send` because the cache runs the refresh on its own task, so that dropping the
/// request that started it does not cancel it for everyone else.
pub type ProviderFuture = Pin<Box<dyn Future<Output = Result<Token, tower::BoxError>> + Send>>;

/// Fetches a new access token.
///
/// Implement it for your own token source, or use [`provider_fn`] for a closure and
/// [`StaticToken`] for a fixed token.
///
/// ```
/// use tower_auth_refresh::{ProviderFuture, Token, TokenProvider};
///
/// struct FromEnvironment;
///
/// impl TokenProvider for FromEnvironment {
///     fn fetch_token(&self) -> ProviderFuture {
///         Box::pin(async {
///             let secret = std::env::var("API_TOKEN")?;
///             Ok(Token::new(secret))
///         })
///     }
/// }
/// ```
pub trait TokenProvider: Send + Sync + 'static {
    /// Ask the identity provider for a new token.
    fn fetch_token(&self) -> ProviderFuture;

    /// Ask for a new token that satisfies `request`: what the API's challenge asked for (a
    /// scope for a step-up, the claims of an `insufficient_claims` challenge). Called instead of
    /// [`fetch_token`](Self::fetch_token) for every refresh, with a default `request` for
    /// refreshes before expiry and after a plain 401.
    ///
    /// The default ignores `request` and calls `fetch_token`, so providers written before this
    /// method (and every [`provider_fn`] closure) keep working. A provider that cannot honour a
    /// scope or claims may do the same: the replay is then refused again, and that response goes
    /// back to the caller (a request is replayed at most once).
    fn fetch_token_for(&self, request: &TokenRequest) -> ProviderFuture {
        let _ = request;
        self.fetch_token()
    }
}

/// What a token refresh is asked to obtain beyond a plain new token: why the provider is called.
///
/// Default (both `None`) for refreshes before expiry and after a 401 that asked for nothing. A
/// challenge fills it in: `error="insufficient_claims"` sets the [`claims`](Self::claims) it
/// carried (Microsoft Entra's continuous access evaluation), a step-up hook
/// ([`AuthLayerBuilder::step_up`](crate::AuthLayerBuilder::step_up)) sets a
/// [`scope`](Self::scope). The token obtained for it becomes the cache's token for every request.
///
/// ```
/// use tower_auth_refresh::TokenRequest;
///
/// let request = TokenRequest::new().with_scope("admin");
/// assert_eq!(request.scope(), Some("admin"));
/// assert_eq!(request.claims(), None);
/// assert!(TokenRequest::new().is_default());
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TokenRequest {
    scope: Option<String>,
    claims: Option<String>,
}

impl TokenRequest {
    /// A request for a plain new token.
    pub fn new() -> Self {
        Self::default()
    }

    /// Ask for this scope (space-separated) instead of the provider's configured one.
    pub fn with_scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = Some(scope.into());
        self
    }

    /// Ask for a token that satisfies these claims: the JSON text of a challenge's `claims`
    /// parameter, base64-decoded (OpenID Connect's `claims` request parameter, as MSAL sends it).
    pub fn with_claims(mut self, claims: impl Into<String>) -> Self {
        self.claims = Some(claims.into());
        self
    }

    /// The scope asked for, if any.
    pub fn scope(&self) -> Option<&str> {
        self.scope.as_deref()
    }

    /// The claims asked for (JSON text), if any.
    pub fn claims(&self) -> Option<&str> {
        self.claims.as_deref()
    }

    /// Whether nothing beyond a plain new token is asked for.
    pub fn is_default(&self) -> bool {
        self.scope.is_none() && self.claims.is_none()
    }
}

/// A [`TokenProvider`] from a closure that returns a future. See [`provider_fn`].
#[derive(Clone)]
pub struct ProviderFn<F> {
    fetch: F,
}

/// Make a [`TokenProvider`] from a closure.
///
/// ```
/// use std::time::Duration;
/// use tower_auth_refresh::{provider_fn, Token, TokenCache};
///
/// let cache = TokenCache::new(provider_fn(|| async {
///     // Call your identity provider here.
///     Ok::<_, std::io::Error>(Token::new("secret").with_expires_in(Duration::from_secs(3600)))
/// }));
/// # drop(cache);
/// ```
pub fn provider_fn<F, Fut, E>(fetch: F) -> ProviderFn<F>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Token, E>> + Send + 'static,
    E: Into<tower::BoxError>,
{
    ProviderFn { fetch }
}

impl<F, Fut, E> TokenProvider for ProviderFn<F>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Token, E>> + Send + 'static,
    E: Into<tower::BoxError>,
{
    fn fetch_token(&self) -> ProviderFuture {
        let fetch = (self.fetch)();
        Box::pin(async move { fetch.await.map_err(Into::into) })
    }
}

impl<F> fmt::Debug for ProviderFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderFn").finish_non_exhaustive()
    }
}

/// A provider that always returns the same token: an API key, or a token obtained elsewhere.
///
/// With no expiry it is used until the API rejects it; a replay after a 401 then gets the same
/// token again, which the API rejects again, and that second 401 goes back to the caller.
///
/// ```
/// use tower_auth_refresh::{AuthLayer, StaticToken, Token};
///
/// let layer = AuthLayer::new(StaticToken::new(Token::new("api-key")));
/// # drop(layer);
/// ```
#[derive(Clone, Debug)]
pub struct StaticToken {
    token: Token,
}

impl StaticToken {
    /// Always hand out `token`.
    pub fn new(token: Token) -> Self {
        Self { token }
    }
}

impl TokenProvider for StaticToken {
    fn fetch_token(&self) -> ProviderFuture {
        let token = self.token.clone();
        Box::pin(async move { Ok(token) })
    }
}
