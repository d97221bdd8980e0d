//! Where a cache gets its next token: from the provider, or from other processes first.
//!
//! A [`TokenCache`](crate::TokenCache) always serves requests from memory; a [`TokenStore`] is
//! only asked when that memory runs out (no token yet, the token is due for refresh, or the API
//! rejected it). The default, [`LocalStore`], simply calls the provider: one token per process.
//! A shared store (such as `redis_store::RedisStore` with the `redis`
//! feature) first looks for a token another process already fetched, so a fleet of workers makes
//! one token request per expiry instead of one per worker.
//!
//! The cache keeps its guarantees whatever the store does: one store call at a time per cache,
//! bounded by the refresh timeout, with backoff after failures.

use std::cmp;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::AuthError;
use crate::provider::{TokenProvider, TokenRequest};
use crate::Token;

/// The future a [`TokenStore`] returns.
pub type StoreFuture = Pin<Box<dyn Future<Output = Result<Token, tower::BoxError>> + Send>>;

/// Decides where a [`TokenCache`](crate::TokenCache) gets a new token.
///
/// The cache calls [`refresh`](TokenStore::refresh) from its single refresh task, never per
/// request. An implementation either returns a token it can vouch for (one another process
/// fetched) or calls [`FetchToken::fetch`] to ask the provider. Its errors reach the waiting
/// requests as [`AuthError`], so a store that can fall back to the provider
/// should do so rather than fail.
///
/// ```
/// use tower_auth_refresh::store::{FetchToken, RefreshRequest, StoreFuture, TokenStore};
///
/// /// Logs every refresh, then asks the provider.
/// struct Logged;
///
/// impl TokenStore for Logged {
///     fn refresh(&self, request: RefreshRequest, fetch: FetchToken) -> StoreFuture {
///         tracing::info!(rejected = request.rejected(), "token refresh");
///         Box::pin(fetch.fetch())
///     }
/// }
///
/// # use tower_auth_refresh::{StaticToken, Token, TokenCache};
/// let cache = TokenCache::builder(StaticToken::new(Token::new("secret")))
///     .store(Logged)
///     .build();
/// # drop(cache);
/// ```
pub trait TokenStore: Send + Sync + 'static {
    /// Produce the token that replaces `request.replacing()`.
    fn refresh(&self, request: RefreshRequest, fetch: FetchToken) -> StoreFuture;
}

/// Why the cache needs a new token.
#[derive(Clone, Debug)]
pub struct RefreshRequest {
    replacing: Option<Token>,
    rejected: bool,
    /// What the API's challenge asked the new token to have.
    token_request: TokenRequest,
    /// The cache's clock-skew buffer: a token closer to its expiry than this (or than a quarter
    /// of its life) would be stale on arrival.
    refresh_skew: Duration,
}

impl RefreshRequest {
    pub(crate) fn new(replacing: Option<Token>, rejected: bool, refresh_skew: Duration) -> Self {
        Self {
            replacing,
            rejected,
            token_request: TokenRequest::default(),
            refresh_skew,
        }
    }

    pub(crate) fn with_token_request(mut self, token_request: TokenRequest) -> Self {
        self.token_request = token_request;
        self
    }

    /// What the new token must satisfy: the scope or claims a challenge asked for (default for
    /// refreshes before expiry and after a plain 401). [`FetchToken::fetch`] passes it to the
    /// provider. A shared store should not hand out another process's token for a request
    /// that is not [default](TokenRequest::is_default): that token lacks what was asked for.
    pub fn token_request(&self) -> &TokenRequest {
        &self.token_request
    }

    /// The token the cache holds and wants replaced: one that is about to expire, or the one the
    /// API rejected. `None` for the first token.
    pub fn replacing(&self) -> Option<&Token> {
        self.replacing.as_ref()
    }

    /// Whether the API rejected [`replacing`](Self::replacing) (a 401), rather than it nearing
    /// its expiry. A shared store should then stop handing that token to others.
    pub fn rejected(&self) -> bool {
        self.rejected
    }

    /// Whether `candidate` may replace the token being replaced: a different token, not yet in
    /// the cache's clock-skew buffer at `now` (it would be stale on arrival), and newer. Newer
    /// means issued later when both issue times are known (a token older than one the API
    /// refused has most likely expired too), else expiring later when both expiries are known.
    pub fn accepts(&self, candidate: &Token, now: Instant) -> bool {
        if let Some(expires_at) = candidate.expires_at() {
            // The same buffer the cache applies: the skew, at most a quarter of the lifetime.
            let margin = candidate.issued_at().map_or(Duration::ZERO, |issued| {
                cmp::min(
                    self.refresh_skew,
                    expires_at.saturating_duration_since(issued) / 4,
                )
            });
            if expires_at.saturating_duration_since(now) <= margin {
                return false;
            }
        }
        let Some(old) = &self.replacing else {
            return true;
        };
        if old.secret() == candidate.secret() {
            return false;
        }
        match (old.issued_at(), candidate.issued_at()) {
            (Some(old), Some(new)) => new > old,
            _ => match (old.expires_at(), candidate.expires_at()) {
                (Some(old), Some(new)) => new > old,
                _ => true,
            },
        }
    }
}

/// Asks the cache's provider for a new token: what a [`TokenStore`] calls when nobody else has
/// one to share.
///
/// Every call is one token request, counted in
/// [`CacheStats::token_requests`](crate::CacheStats::token_requests).
#[derive(Clone)]
pub struct FetchToken {
    provider: Arc<dyn TokenProvider>,
    token_requests: Arc<AtomicU64>,
    /// Passed to [`TokenProvider::fetch_token_for`]: the refresh's
    /// [`RefreshRequest::token_request`].
    request: TokenRequest,
}

impl FetchToken {
    pub(crate) fn new(provider: Arc<dyn TokenProvider>, token_requests: Arc<AtomicU64>) -> Self {
        Self {
            provider,
            token_requests,
            request: TokenRequest::default(),
        }
    }

    /// The same provider, asked for `request`.
    pub(crate) fn for_request(&self, request: TokenRequest) -> Self {
        Self {
            provider: self.provider.clone(),
            token_requests: self.token_requests.clone(),
            request,
        }
    }

    /// Call the provider once, with the refresh's
    /// [`token_request`](RefreshRequest::token_request) ([`TokenProvider::fetch_token_for`]). A lifetime given as `expires_in` counts from the moment of this
    /// call, so the token can be handed to other processes with an absolute expiry.
    pub fn fetch(&self) -> impl Future<Output = Result<Token, tower::BoxError>> + Send + 'static {
        self.token_requests.fetch_add(1, Ordering::Relaxed);
        let sent_at = Instant::now();
        let provider = self.provider.clone();
        let fetch =
            std::panic::catch_unwind(AssertUnwindSafe(|| provider.fetch_token_for(&self.request)));
        async move {
            match fetch {
                Ok(fetch) => fetch.await.map(|token| token.anchored_at(sent_at)),
                Err(_panic) => Err(AuthError::ProviderPanicked.into()),
            }
        }
    }
}

impl fmt::Debug for FetchToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FetchToken").finish_non_exhaustive()
    }
}

/// The default store: every cache asks its own provider. Nothing leaves the process.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalStore;

impl TokenStore for LocalStore {
    fn refresh(&self, _request: RefreshRequest, fetch: FetchToken) -> StoreFuture {
        Box::pin(fetch.fetch())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SKEW: Duration = Duration::from_secs(60);

    #[test]
    fn accepts_only_a_different_living_newer_token() {
        let now = Instant::now();
        let issued = |secret: &str, at: Instant| Token::new(secret).with_issued_at(at);
        let old = issued("old", now);
        let rejected = RefreshRequest::new(Some(old.clone()), true, SKEW);
        let later = now + Duration::from_millis(5);

        assert!(RefreshRequest::new(None, false, SKEW).accepts(&old, now));
        assert!(!rejected.accepts(&old, now), "the same token");
        assert!(rejected.accepts(&issued("new", later), now));
        assert!(
            !rejected.accepts(&issued("older", now), now),
            "not issued later"
        );
        let expired = Token::new("gone").with_expires_at(now);
        assert!(!RefreshRequest::new(None, false, SKEW).accepts(&expired, now));

        // Without issue times, a later expiry decides; without either, any other token.
        let expiring = Token::new("a").with_expires_at(later);
        let request = RefreshRequest::new(Some(expiring), false, SKEW);
        assert!(request.accepts(
            &Token::new("b").with_expires_at(later + Duration::from_secs(1)),
            now
        ));
        assert!(!request.accepts(&Token::new("c").with_expires_at(later), now));
        assert!(request.accepts(&Token::new("d"), now));
    }

    #[test]
    fn refuses_a_token_that_would_be_stale_on_arrival() {
        let now = Instant::now();
        let request = RefreshRequest::new(None, false, SKEW);
        // A one-hour token: stale in its last 60 s (the skew).
        let hour = Duration::from_secs(3600);
        let at_age = |age: Duration| {
            Token::new("t")
                .with_issued_at(now - age)
                .with_expires_at(now - age + hour)
        };
        assert!(request.accepts(&at_age(hour - Duration::from_secs(61)), now));
        assert!(!request.accepts(&at_age(hour - Duration::from_secs(59)), now));
        // A one-second token: stale in its last quarter.
        let second = Duration::from_secs(1);
        let short = |age_ms: u64| {
            let issued = now - Duration::from_millis(age_ms);
            Token::new("s")
                .with_issued_at(issued)
                .with_expires_at(issued + second)
        };
        assert!(request.accepts(&short(700), now));
        assert!(!request.accepts(&short(800), now));
    }
}
