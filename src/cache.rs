//! The shared token state: one cache, any number of services.
//!
//! Reading the current token is the hot path of every request, so it takes no lock: the current
//! token lives in an atomically swapped `Arc` and a reader only loads it and checks the clock.
//! Everything else happens on the rare slow path, under a mutex that is never held across an
//! `.await`:
//!
//! - **Single flight.** However many requests find the token stale at once, one provider call
//!   runs; the others wait on the same shared future.
//! - **Two windows before expiry** (the lesson of aws-smithy-runtime). In the *advisory* window
//!   one background refresh starts while every request keeps using the still-valid token; in the
//!   *mandatory* window (the clock-skew buffer) requests wait for the new token.
//! - **Survives cancellation.** The refresh runs on its own task, so dropping the request that
//!   started it changes nothing for the others, and the cache can never be left "refreshing"
//!   forever.
//! - **Failure backoff and timeout.** A provider call is bounded by a timeout; after a failure the
//!   next call waits for a backoff that doubles up to a cap, so a struggling identity provider is
//!   not hammered by every request.
//! - **Generations.** Every token gets a generation number. A 401 invalidates the token only if
//!   it is still the current one, so a burst of 401s for an old token costs no extra refresh
//!   (the Azure SDK lesson).

use std::cmp;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError, Weak};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use futures::future::{FutureExt, Shared};
use http::HeaderValue;
use tokio::time::Instant;
use tracing::Instrument;

use crate::challenge::{Demand, StepUp};
use crate::error::AuthError;
use crate::provider::{TokenProvider, TokenRequest};
use crate::replay::NotReplayable;
use crate::store::{FetchToken, LocalStore, RefreshRequest, StoreFuture, TokenStore};
use crate::Token;

/// Default clock-skew buffer: a token counts as expired this long before its expiry.
pub const DEFAULT_REFRESH_SKEW: Duration = Duration::from_secs(60);
/// Default advisory window: one background refresh starts this long before expiry.
pub const DEFAULT_ADVISORY_WINDOW: Duration = Duration::from_secs(5 * 60);
/// Default bound on one call to the token provider.
pub const DEFAULT_REFRESH_TIMEOUT: Duration = Duration::from_secs(30);
/// Default cooldown after a refresh caused by a 401: a 401 for the token it produced, within this
/// long, is not an expiry (wrong scope, a revoked grant, a misconfigured route) and triggers no
/// further refresh.
pub const DEFAULT_REJECTION_COOLDOWN: Duration = Duration::from_secs(5);
/// Default wait after the first failed refresh.
pub const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_secs(1);
/// Default longest wait between failed refreshes.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// The longest `Retry-After` from an identity provider the cache waits for; longer requests
/// (or garbage dates years ahead) are cut to this.
const MAX_HONOURED_RETRY_AFTER: Duration = Duration::from_secs(15 * 60);
/// How far in the future another process may say a token was issued (clocks disagree); beyond
/// that, the issue time is not believed.
const MAX_ISSUE_CLOCK_DRIFT: Duration = Duration::from_secs(5);
/// Default authorization scheme.
pub const DEFAULT_SCHEME: &str = "Bearer";

/// A token cache shared by every service built from it.
///
/// Cloning is cheap and every clone shares the same token. Build one cache and hand it to as many
/// [`AuthLayer`](crate::AuthLayer)s as should share a token: two clients of the same API then
/// make one token request, not two.
///
/// ```
/// use std::time::Duration;
/// use tower_auth_refresh::{provider_fn, AuthLayer, Token, TokenCache};
///
/// let cache = TokenCache::builder(provider_fn(|| async {
///     Ok::<_, std::io::Error>(Token::new("secret").with_expires_in(Duration::from_secs(3600)))
/// }))
/// .refresh_skew(Duration::from_secs(30))
/// .build();
///
/// let for_contacts = AuthLayer::with_cache(cache.clone());
/// let for_reports = AuthLayer::with_cache(cache.clone());
/// # drop((for_contacts, for_reports));
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let token = cache.token().await?;
/// assert_eq!(token.secret(), "secret");
/// assert_eq!(cache.stats().token_requests, 1);
/// # Ok::<_, tower_auth_refresh::AuthError>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct TokenCache {
    shared: Arc<CacheShared>,
}

/// Options of a [`TokenCache`], with documented defaults.
#[derive(Clone, Debug)]
struct CacheConfig {
    refresh_skew: Duration,
    advisory_window: Duration,
    refresh_timeout: Duration,
    backoff_initial: Duration,
    backoff_max: Duration,
    rejection_cooldown: Duration,
    scheme: String,
}

struct CacheShared {
    /// The current token, or `None` before the first refresh and after a 401 invalidated it.
    current: ArcSwapOption<Entry>,
    /// The slow path. Never held across an `.await`.
    refresh: Mutex<RefreshState>,
    /// Set while a refresh runs, so requests in the advisory window skip the mutex.
    refreshing: AtomicBool,
    next_generation: AtomicU64,
    /// Calls the provider; shared with the store, which decides whether to.
    fetch: FetchToken,
    store: Box<dyn TokenStore>,
    config: CacheConfig,
    counters: Counters,
}

#[derive(Default)]
struct RefreshState {
    /// The running refresh, if any.
    in_flight: Option<InFlight>,
    /// After a failure: no provider call before this instant.
    retry_at: Option<Instant>,
    next_backoff: Duration,
    last_error: Option<AuthError>,
    /// The token a 401 invalidated, until the refresh that replaces it starts.
    rejected: Option<Token>,
    /// What that 401's challenge asked the next token to have (claims, a step-up scope),
    /// consumed by the refresh that starts next.
    demand: TokenRequest,
    /// The scope the last successful step-up asked for. Later refreshes ask for it too, so a
    /// proactive refresh does not fall back to the narrower token and meet the challenge
    /// again. Claims are not kept: a claims challenge is about one session event.
    stepped_up_scope: Option<String>,
}

impl RefreshState {
    /// Clear the in-flight slot if it still holds the refresh of `generation`; whether it did.
    fn end_in_flight(&mut self, generation: u64) -> bool {
        let ours = self
            .in_flight
            .as_ref()
            .is_some_and(|running| running.generation == generation);
        if ours {
            self.in_flight = None;
        }
        ours
    }
}

type RefreshOutcome = Result<Arc<Entry>, AuthError>;
type RefreshFuture = Shared<Pin<Box<dyn Future<Output = RefreshOutcome> + Send>>>;
/// One timer for all the requests waiting on a refresh.
type Deadline = Shared<Pin<Box<tokio::time::Sleep>>>;

/// The single running refresh.
struct InFlight {
    /// The generation its token will have.
    generation: u64,
    refresh: RefreshFuture,
    /// Requests wait until here at most; the provider call may run on for one more timeout.
    deadline: Deadline,
    deadline_at: Instant,
}

/// A token as the cache holds it: with the header value built once, and its refresh deadlines.
pub(crate) struct Entry {
    token: Token,
    header: HeaderValue,
    generation: u64,
    /// When the request that produced the token was sent.
    requested_at: Instant,
    /// When the token expires: it is never sent from then on.
    expires_at: Option<Instant>,
    /// Fetched because the API rejected the token before it.
    after_rejection: bool,
    /// A request rejected with the previous token went through when replayed with this one:
    /// refreshing on a 401 helps, so the rejection cooldown does not apply to it.
    replay_accepted: AtomicBool,
    /// From here on, one background refresh is due.
    advisory_at: Option<Instant>,
    /// From here on, the token is not sent any more: requests wait for a new one.
    stale_at: Option<Instant>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Freshness {
    Fresh,
    Advisory,
    Stale,
}

impl Entry {
    fn new(
        token: Token,
        requested_at: Instant,
        now: Instant,
        generation: u64,
        after_rejection: bool,
        config: &CacheConfig,
    ) -> Result<Self, AuthError> {
        let header = header_value(&config.scheme, token.secret())?;
        // A token taken from another process started its life when that process asked for it.
        let requested_at = token
            .issued_at()
            .filter(|issued| *issued <= requested_at + MAX_ISSUE_CLOCK_DRIFT)
            .unwrap_or(requested_at);
        let expires_at = token.expires_at_from(requested_at);
        let (advisory_at, stale_at) = match expires_at {
            None => (None, None),
            Some(expires_at) if expires_at <= now => {
                return Err(AuthError::refresh(
                    "the new token (from the provider or the token store) has already expired",
                ))
            }
            Some(expires_at) => {
                // A token that lives less than the skew is still used for most of its life:
                // the skew is at most a quarter of the lifetime, the advisory window half.
                let lifetime = expires_at.saturating_duration_since(requested_at);
                let skew = cmp::min(config.refresh_skew, lifetime / 4);
                let advisory = cmp::max(cmp::min(config.advisory_window, lifetime / 2), skew);
                (
                    expires_at.checked_sub(advisory),
                    expires_at.checked_sub(skew),
                )
            }
        };
        Ok(Self {
            token,
            header,
            generation,
            requested_at,
            expires_at,
            after_rejection,
            replay_accepted: AtomicBool::new(false),
            advisory_at,
            stale_at,
        })
    }

    /// Whether the token may still be sent at `now` at all: before its expiry. Inside the skew
    /// buffer it is sent only when no newer token can be had (the refresh failed or backs off).
    fn is_unexpired(&self, now: Instant) -> bool {
        self.expires_at.is_none_or(|expires_at| now < expires_at)
    }

    fn freshness(&self, now: Instant) -> Freshness {
        match (self.advisory_at, self.stale_at) {
            (_, Some(stale_at)) if now >= stale_at => Freshness::Stale,
            (Some(advisory_at), _) if now >= advisory_at => Freshness::Advisory,
            _ => Freshness::Fresh,
        }
    }

    fn credential(&self) -> Credential {
        Credential {
            header: self.header.clone(),
            generation: self.generation,
        }
    }
}

/// What a request needs from the cache: the header to send and which token it came from.
#[derive(Clone, Debug)]
pub(crate) struct Credential {
    pub(crate) header: HeaderValue,
    pub(crate) generation: u64,
}

/// The answer of [`TokenCache::acquire`]: a credential now, or a refresh to wait for.
pub(crate) enum Acquire {
    Ready(Credential),
    Wait(RefreshWait),
    Failed(AuthError),
}

/// One service's copy of the current token (arc-swap's `Cache`): a request checks that the
/// shared token did not change with one relaxed load, where an `ArcSwap` load costs a debt slot
/// taken and paid back. Any change (a refresh, an invalidation) is seen by the next request; the
/// copy keeps the token it last saw alive until then.
#[derive(Clone)]
pub(crate) struct TokenView(arc_swap::Cache<SharedCurrent, Option<Arc<Entry>>>);

/// The cache's current-token slot, owned, as `arc_swap::Cache` needs it.
#[derive(Clone)]
pub(crate) struct SharedCurrent(Arc<CacheShared>);

impl std::ops::Deref for SharedCurrent {
    type Target = ArcSwapOption<Entry>;

    fn deref(&self) -> &Self::Target {
        &self.0.current
    }
}

/// Waits for the in-flight refresh. Dropping it does not cancel the refresh.
pub(crate) struct RefreshWait {
    refresh: RefreshFuture,
    deadline: Deadline,
    cache: Arc<CacheShared>,
}

impl Future for RefreshWait {
    type Output = Result<Credential, AuthError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let error = match self.refresh.poll_unpin(cx) {
            Poll::Ready(Ok(entry)) => return Poll::Ready(Ok(entry.credential())),
            Poll::Ready(Err(error)) => error,
            Poll::Pending => {
                ready!(self.deadline.poll_unpin(cx));
                AuthError::RefreshTimeout {
                    timeout: self.cache.config.refresh_timeout,
                }
            }
        };
        // A failed or slow refresh never displaces a token that has not expired yet: it is
        // sent until it does, whatever the refresh did.
        Poll::Ready(
            self.cache
                .still_usable(Instant::now())
                .map(|entry| entry.credential())
                .ok_or(error),
        )
    }
}

/// What the cache made of a 401: see [`TokenCache::reject`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rejection {
    /// The rejected token was the current one and is gone: the next request refreshes.
    Invalidated,
    /// The rejected token had been replaced already: replay with the current one, no refresh.
    AlreadyReplaced,
    /// The rejected token was itself fetched because of a 401 less than the cooldown ago, and
    /// no replay with it has gone through: the API refuses fresh tokens too, so this is not an
    /// expiry. The token stays; nothing is refreshed or replayed.
    Repeated,
}

impl fmt::Debug for RefreshWait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshWait").finish_non_exhaustive()
    }
}

fn header_value(scheme: &str, secret: &str) -> Result<HeaderValue, AuthError> {
    let mut value = if scheme.is_empty() {
        HeaderValue::from_str(secret)
    } else {
        HeaderValue::from_str(&format!("{scheme} {secret}"))
    }
    .map_err(|_| AuthError::InvalidHeaderValue)?;
    // Control characters other than tab are refused by `from_str` already; a header value may
    // still not contain anything that would let a token span two headers.
    value.set_sensitive(true);
    Ok(value)
}

/// Counters behind [`CacheStats`].
#[derive(Default)]
struct Counters {
    /// Shared with [`FetchToken`], which counts the provider calls it makes.
    token_requests: Arc<AtomicU64>,
    refresh_failures: AtomicU64,
    invalidations: AtomicU64,
    stale_rejections: AtomicU64,
    repeated_rejections: AtomicU64,
    insufficient_scope: AtomicU64,
    claims_refreshes: AtomicU64,
    step_ups: AtomicU64,
    replays: AtomicU64,
    not_replayed: [AtomicU64; 4],
}

/// A snapshot of what a [`TokenCache`] has done, for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Calls to the token provider.
    pub token_requests: u64,
    /// Calls to the token provider that failed (error, timeout, unusable token).
    pub refresh_failures: u64,
    /// 401s that invalidated the current token.
    pub invalidations: u64,
    /// 401s for a token that had already been replaced: absorbed without a new token request.
    pub stale_rejections: u64,
    /// 401s for a token that was itself fetched because of a 401 less than the
    /// [rejection cooldown](TokenCacheBuilder::rejection_cooldown) before: the API refuses fresh
    /// tokens too, so the response went back unchanged, with no refresh and no replay.
    pub repeated_rejections: u64,
    /// Rejections whose `WWW-Authenticate` said `error="insufficient_scope"`: the token is valid
    /// but lacks a scope, so it was neither refreshed nor replayed (a new token would lack it
    /// too); the response went back unchanged.
    pub insufficient_scope: u64,
    /// Token refreshes started to satisfy an `error="insufficient_claims"` challenge: the
    /// provider was asked for a token with the challenge's claims
    /// ([`TokenRequest::claims`]). One per rejected token, however many requests met the
    /// challenge.
    pub claims_refreshes: u64,
    /// Token refreshes started for a step-up: a step-up hook
    /// ([`AuthLayerBuilder::step_up`](crate::AuthLayerBuilder::step_up)) turned an
    /// `insufficient_scope` challenge into a request for a scope ([`TokenRequest::scope`]).
    pub step_ups: u64,
    /// Requests replayed with a new token after a 401.
    pub replays: u64,
    /// Requests whose 401 went back unchanged because they could not be replayed, by reason.
    pub not_replayed: NotReplayedCounts,
    /// The generation of the current token (1 for the first); `None` when there is none.
    pub generation: Option<u64>,
    /// How long ago the current token was requested.
    pub token_age: Option<Duration>,
    /// How long until the current token expires; `None` if it has no known expiry.
    pub expires_in: Option<Duration>,
}

/// Rejected requests that were not replayed, by [`NotReplayable`] reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NotReplayedCounts {
    /// The body outgrew the replay cap.
    pub too_large: u64,
    /// The body failed while it was sent.
    pub body_failed: u64,
    /// The body was still being sent and its rest could not be taken over.
    pub still_streaming: u64,
    /// `replay_when` refused the request.
    pub refused: u64,
}

impl TokenCache {
    /// A cache with the default options over `provider`.
    pub fn new(provider: impl TokenProvider) -> Self {
        Self::builder(provider).build()
    }

    /// Options for a cache over `provider`.
    pub fn builder(provider: impl TokenProvider) -> TokenCacheBuilder {
        TokenCacheBuilder {
            provider: Arc::new(provider),
            store: Box::new(LocalStore),
            config: CacheConfig {
                refresh_skew: DEFAULT_REFRESH_SKEW,
                advisory_window: DEFAULT_ADVISORY_WINDOW,
                refresh_timeout: DEFAULT_REFRESH_TIMEOUT,
                backoff_initial: DEFAULT_BACKOFF_INITIAL,
                backoff_max: DEFAULT_BACKOFF_MAX,
                rejection_cooldown: DEFAULT_REJECTION_COOLDOWN,
                scheme: DEFAULT_SCHEME.to_owned(),
            },
        }
    }

    /// The current token, refreshing it first if needed.
    ///
    /// For code outside a tower stack; [`AuthService`](crate::AuthService) uses the same path.
    pub async fn token(&self) -> Result<Token, AuthError> {
        let generation = match self.acquire() {
            Acquire::Ready(credential) => credential.generation,
            Acquire::Wait(wait) => wait.await?.generation,
            Acquire::Failed(error) => return Err(error),
        };
        match self.shared.current.load_full() {
            Some(entry) if entry.generation >= generation => Ok(entry.token.clone()),
            // Invalidated between the refresh and this read: what the refresh produced is gone.
            _ => Err(AuthError::refresh(
                "the token was invalidated while it was being read",
            )),
        }
    }

    /// Report that the API refused `token` (a 401), for clients outside a tower stack (reqwest,
    /// a hand-written retry loop); [`AuthService`](crate::AuthService) does the same on its own.
    ///
    /// The rejection counts only if `token` is still the current token, so a burst of 401s for
    /// one token costs one refresh. Replay the request once if the answer is
    /// [`Rejection::Invalidated`] or [`Rejection::AlreadyReplaced`], with the token the next
    /// [`token`](Self::token) call gives; give the 401 back on [`Rejection::Repeated`].
    ///
    /// ```
    /// use std::sync::atomic::{AtomicUsize, Ordering};
    /// use tower_auth_refresh::{provider_fn, Rejection, Token, TokenCache};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let issued = AtomicUsize::new(0);
    /// let cache = TokenCache::new(provider_fn(move || {
    ///     let n = issued.fetch_add(1, Ordering::Relaxed);
    ///     async move { Ok::<_, std::io::Error>(Token::new(format!("token-{n}"))) }
    /// }));
    /// let refused = cache.token().await?;
    /// // ... the API answered 401 to `refused` ...
    /// assert_eq!(cache.reject(&refused), Rejection::Invalidated);
    /// assert_eq!(cache.reject(&refused), Rejection::AlreadyReplaced);
    /// let fresh = cache.token().await?;
    /// assert_ne!(fresh.secret(), refused.secret());
    /// assert_eq!(cache.stats().token_requests, 2);
    /// # Ok::<_, tower_auth_refresh::AuthError>(())
    /// # }).unwrap();
    /// ```
    pub fn reject(&self, token: &Token) -> Rejection {
        self.reject_current_if(|entry| entry.token.secret() == token.secret())
    }

    /// [`reject`](Self::reject) for the header value a request carried (the credential the
    /// layer wrote), for middleware below the layer that sees a refusal the layer cannot.
    #[cfg_attr(not(feature = "tonic"), allow(dead_code))]
    pub(crate) fn reject_credential(&self, credential: &HeaderValue) -> Rejection {
        self.reject_current_if(|entry| entry.header.as_bytes() == credential.as_bytes())
    }

    /// Invalidate the current token if `refused` says it is the one the API refused.
    fn reject_current_if(&self, refused: impl Fn(&Entry) -> bool) -> Rejection {
        let generation = match self.shared.current.load().as_deref() {
            Some(entry) if refused(entry) => entry.generation,
            _ => return self.absorb_stale_rejection(0),
        };
        self.invalidate(generation)
    }

    /// What to do with a refused response, decided once from its challenges: `None` to give it
    /// back unchanged, else the cache's answer to the rejection (replay unless
    /// [`Rejection::Repeated`]). Shared by every client (layer, reqwest middleware).
    ///
    /// `token_rejected`: the rejection predicate matched (a 401 by default). Otherwise the
    /// response is a 403 looked at only for a step-up (RFC 6750 puts `insufficient_scope` on
    /// 403), and anything but `insufficient_scope` leaves it alone.
    pub(crate) fn answer_refusal(
        &self,
        generation: u64,
        headers: &http::HeaderMap,
        token_rejected: bool,
        step_up: Option<&StepUp>,
    ) -> Option<Rejection> {
        let request = match Demand::of(headers) {
            Demand::Refresh | Demand::Claims(_) if !token_rejected => return None,
            Demand::Refresh => TokenRequest::default(),
            Demand::Claims(claims) => {
                tracing::debug!(
                    generation,
                    "token lacks the claims the API asks for (insufficient_claims); \
                     refreshing with them"
                );
                TokenRequest::new().with_claims(claims)
            }
            Demand::Scope(scope) => {
                self.shared
                    .counters
                    .insufficient_scope
                    .fetch_add(1, Ordering::Relaxed);
                let Some(step_up) = step_up else {
                    tracing::debug!(
                        "token lacks the scope the API asks for; not refreshed, not replayed"
                    );
                    return None;
                };
                match step_up(&scope) {
                    Some(request) => {
                        tracing::debug!(generation, scope = %scope, "token lacks the scope the API asks for; stepping up");
                        request
                    }
                    None => {
                        tracing::debug!(scope = %scope, "token lacks the scope the API asks for; the step-up hook declined, not replayed");
                        return None;
                    }
                }
            }
        };
        Some(self.invalidate_for(generation, request))
    }

    /// What the cache has done so far, and the state of its current token: cheap enough to
    /// print or export as metrics on every tick.
    pub fn stats(&self) -> CacheStats {
        let c = &self.shared.counters;
        let current = self.shared.current.load();
        let now = Instant::now();
        CacheStats {
            token_requests: c.token_requests.load(Ordering::Relaxed),
            refresh_failures: c.refresh_failures.load(Ordering::Relaxed),
            invalidations: c.invalidations.load(Ordering::Relaxed),
            stale_rejections: c.stale_rejections.load(Ordering::Relaxed),
            repeated_rejections: c.repeated_rejections.load(Ordering::Relaxed),
            insufficient_scope: c.insufficient_scope.load(Ordering::Relaxed),
            claims_refreshes: c.claims_refreshes.load(Ordering::Relaxed),
            step_ups: c.step_ups.load(Ordering::Relaxed),
            replays: c.replays.load(Ordering::Relaxed),
            not_replayed: NotReplayedCounts {
                too_large: c.not_replayed[0].load(Ordering::Relaxed),
                body_failed: c.not_replayed[1].load(Ordering::Relaxed),
                still_streaming: c.not_replayed[2].load(Ordering::Relaxed),
                refused: c.not_replayed[3].load(Ordering::Relaxed),
            },
            generation: current.as_deref().map(|entry| entry.generation),
            token_age: current
                .as_deref()
                .map(|entry| now.saturating_duration_since(entry.requested_at)),
            expires_in: current.as_deref().and_then(|entry| {
                entry
                    .token
                    .expires_at_from(entry.requested_at)
                    .map(|expires_at| expires_at.saturating_duration_since(now))
            }),
        }
    }

    /// The credential for the next request: the hot path.
    #[inline]
    pub(crate) fn acquire(&self) -> Acquire {
        if let Some(ready) = self.ready(self.shared.current.load().as_deref()) {
            return ready;
        }
        self.acquire_slow()
    }

    /// [`acquire`](Self::acquire) through a service's own [`TokenView`] of this cache.
    #[inline]
    pub(crate) fn acquire_with(&self, view: &mut TokenView) -> Acquire {
        if let Some(ready) = self.ready(view.0.load().as_deref()) {
            return ready;
        }
        self.acquire_slow()
    }

    /// A view of the current token for one service: see [`TokenView`].
    pub(crate) fn view(&self) -> TokenView {
        TokenView(arc_swap::Cache::new(SharedCurrent(self.shared.clone())))
    }

    /// The credential `current` gives without waiting, if it is fresh enough; `None` sends the
    /// caller to the slow path.
    #[inline]
    fn ready(&self, current: Option<&Entry>) -> Option<Acquire> {
        let entry = current?;
        let freshness = if entry.stale_at.is_none() {
            // No expiry, no clock read.
            Freshness::Fresh
        } else {
            let now = Instant::now();
            match entry.advisory_at {
                // Most requests come before the advisory window (which starts no later than
                // the stale point): one comparison.
                Some(advisory_at) if now < advisory_at => Freshness::Fresh,
                _ => entry.freshness(now),
            }
        };
        match freshness {
            Freshness::Fresh => {}
            Freshness::Advisory => {
                if !self.shared.refreshing.load(Ordering::Relaxed) {
                    self.refresh_in_background(entry.generation);
                }
            }
            Freshness::Stale => return None,
        }
        Some(Acquire::Ready(entry.credential()))
    }

    /// The current token is missing or stale: join the refresh, or start it.
    #[cold]
    #[inline(never)]
    fn acquire_slow(&self) -> Acquire {
        let mut state = self.lock_state();
        let now = Instant::now();
        // Re-check under the lock: a refresh may have finished while we waited for it.
        if let Some(entry) = self.shared.current.load().as_deref() {
            if entry.freshness(now) != Freshness::Stale {
                return Acquire::Ready(entry.credential());
            }
        }
        if let Some(in_flight) = &state.in_flight {
            if now < in_flight.deadline_at {
                return Acquire::Wait(self.wait(in_flight));
            }
            // The provider call runs past the timeout: nobody waits for it any more, and no
            // second call starts while it runs (a refresh-token grant must not race itself).
            if let Some(entry) = self.shared.still_usable(now) {
                return Acquire::Ready(entry.credential());
            }
            return Acquire::Failed(AuthError::RefreshTimeout {
                timeout: self.shared.config.refresh_timeout,
            });
        }
        if let Some(error) = backoff_error(&state, now) {
            // Backing off, but the token has not expired yet: it is still good to send.
            if let Some(entry) = self.shared.still_usable(now) {
                return Acquire::Ready(entry.credential());
            }
            tracing::debug!(retry_in = ?error.retry_after(), "no valid token; refresh backing off");
            return Acquire::Failed(error);
        }
        match self.start_refresh(&mut state) {
            Ok(in_flight) => Acquire::Wait(self.wait(in_flight)),
            Err(error) => Acquire::Failed(error),
        }
    }

    fn wait(&self, in_flight: &InFlight) -> RefreshWait {
        RefreshWait {
            refresh: in_flight.refresh.clone(),
            deadline: in_flight.deadline.clone(),
            cache: self.shared.clone(),
        }
    }

    /// Advisory window: start one refresh nobody waits for. Never blocks a request.
    fn refresh_in_background(&self, generation: u64) {
        let mut state = match self.shared.refresh.try_lock() {
            Ok(state) => state,
            // The state is consistent at every unlock (see `lock_state`).
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            // Someone else is on the slow path and will see to it.
            Err(TryLockError::WouldBlock) => return,
        };
        let still_current = self
            .shared
            .current
            .load()
            .as_deref()
            .is_some_and(|entry| entry.generation == generation);
        if !still_current
            || state.in_flight.is_some()
            || backoff_error(&state, Instant::now()).is_some()
        {
            return;
        }
        tracing::debug!(
            generation,
            "token enters its advisory window, refreshing in the background"
        );
        // A failure here keeps the still-valid token in use; the error is recorded for backoff.
        let _ = self.start_refresh(&mut state);
    }

    /// A 401 came back for the token of `generation`: forget it, unless it was replaced already
    /// or the API is refusing fresh tokens too (see [`Rejection`]).
    pub(crate) fn invalidate(&self, generation: u64) -> Rejection {
        self.invalidate_for(generation, TokenRequest::default())
    }

    /// [`invalidate`](Self::invalidate), and the refresh that replaces the token asks the
    /// provider for `request` (what the rejection's challenge asked for). Only the rejection that
    /// invalidates decides it: the others for the same token wait for that one refresh.
    pub(crate) fn invalidate_for(&self, generation: u64, request: TokenRequest) -> Rejection {
        let is_current = |current: &Option<Arc<Entry>>| {
            current
                .as_deref()
                .is_some_and(|entry| entry.generation == generation)
        };
        // Rejections of a replaced token (most of a 401 storm) stay off the lock.
        if is_current(&self.shared.current.load()) {
            // The state lock orders this against a refresh starting, so that refresh knows
            // which token was rejected (a shared store must not hand it out again).
            let mut state = self.lock_state();
            let current = self.shared.current.load();
            if !is_current(&current) {
                drop(state);
                return self.absorb_stale_rejection(generation);
            }
            let now = Instant::now();
            if current.as_deref().is_some_and(|entry| {
                entry.after_rejection
                    && !entry.replay_accepted.load(Ordering::Relaxed)
                    && now < entry.requested_at + self.shared.config.rejection_cooldown
            }) {
                drop(state);
                self.shared
                    .counters
                    .repeated_rejections
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    generation,
                    "token fetched after a 401 was rejected too; not an expiry, keeping it"
                );
                return Rejection::Repeated;
            }
            let previous = self.shared.current.compare_and_swap(&*current, None);
            let swapped = match (previous.as_ref(), current.as_ref()) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            };
            if swapped {
                state.rejected = current.as_deref().map(|entry| entry.token.clone());
                state.demand = request;
                // A 401 earns one immediate refresh attempt, even while an earlier failure
                // (say a throttled background refresh) is backing off: the identity provider
                // may have recovered, and without a token nothing can be sent. Further failures
                // back off as before.
                state.retry_at = None;
                self.shared
                    .counters
                    .invalidations
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(generation, "token rejected by the API, invalidated");
                return Rejection::Invalidated;
            }
        }
        self.absorb_stale_rejection(generation)
    }

    fn absorb_stale_rejection(&self, generation: u64) -> Rejection {
        self.shared
            .counters
            .stale_rejections
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            generation,
            "rejection of an already replaced token absorbed"
        );
        Rejection::AlreadyReplaced
    }

    /// The replay with the token of `generation` was accepted: refreshing after a 401 works
    /// for this API, so a later 401 for that token is taken as an expiry at once.
    pub(crate) fn replay_accepted(&self, generation: u64) {
        if let Some(entry) = self.shared.current.load().as_deref() {
            if entry.generation == generation {
                entry.replay_accepted.store(true, Ordering::Relaxed);
            }
        }
    }

    pub(crate) fn record_not_replayed(&self, reason: NotReplayable) {
        let slot = match reason {
            NotReplayable::TooLarge => 0,
            NotReplayable::BodyFailed => 1,
            NotReplayable::StillStreaming => 2,
            NotReplayable::Refused => 3,
        };
        self.shared.counters.not_replayed[slot].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn record_replay(&self) {
        self.shared.counters.replays.fetch_add(1, Ordering::Relaxed);
    }

    fn lock_state(&self) -> MutexGuard<'_, RefreshState> {
        self.shared.lock_state()
    }

    /// Start the single refresh. The caller holds the state lock and checked that none runs.
    fn start_refresh<'s>(&self, state: &'s mut RefreshState) -> Result<&'s InFlight, AuthError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| AuthError::NoRuntime)?;
        let shared = &self.shared;
        let timeout = shared.config.refresh_timeout;
        // Tokio panics when a timer is made on a runtime built without `enable_time`; find out
        // here, as a typed error, before anything is started.
        let deadline = std::panic::catch_unwind(|| Box::pin(tokio::time::sleep(timeout)))
            .map_err(|_| AuthError::NoTimer)?;
        shared.refreshing.store(true, Ordering::Relaxed);
        let requested_at = Instant::now();
        let deadline_at = deadline.deadline();
        let skew = shared.config.refresh_skew;
        let after_rejection = state.rejected.is_some();
        let demand = std::mem::take(&mut state.demand);
        let (with_claims, step_up) = (demand.claims().is_some(), demand.scope().is_some());
        let counters = &shared.counters;
        if with_claims {
            counters.claims_refreshes.fetch_add(1, Ordering::Relaxed);
        }
        if step_up {
            counters.step_ups.fetch_add(1, Ordering::Relaxed);
        }
        // What a successful step-up keeps for later refreshes; a refresh for nothing in
        // particular asks for the scope the last one won.
        let won_scope = demand.scope().map(str::to_owned);
        let demand = match (&state.stepped_up_scope, demand.scope()) {
            (Some(scope), None) => demand.with_scope(scope.clone()),
            _ => demand,
        };
        let fetch = shared.fetch.for_request(demand.clone());
        let request = match state.rejected.take() {
            Some(rejected) => RefreshRequest::new(Some(rejected), true, skew),
            None => RefreshRequest::new(
                shared
                    .current
                    .load()
                    .as_deref()
                    .map(|entry| entry.token.clone()),
                false,
                skew,
            ),
        };
        let request = request.with_token_request(demand);
        let fetch =
            std::panic::catch_unwind(AssertUnwindSafe(|| shared.store.refresh(request, fetch)));
        let weak = Arc::downgrade(shared);
        let cleanup = weak.clone();
        // The generation the new token will have; a failed attempt leaves a gap.
        let generation = shared.next_generation.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::debug!(generation, with_claims, step_up, "token refresh started");

        let spawner = runtime.clone();
        let fetch_and_install = async move {
            let outcome = match fetch {
                Err(_panic) => Err(AuthError::ProviderPanicked),
                Ok(fetch) => call_provider(&spawner, fetch, timeout).await,
            };
            finish_refresh(
                weak,
                outcome,
                requested_at,
                generation,
                after_rejection,
                won_scope,
            )
        };
        let refresh = AssertUnwindSafe(fetch_and_install)
            .catch_unwind()
            .map(move |outcome| match outcome {
                Ok(outcome) => outcome,
                // A panic in here (a store, a tracing subscriber) must not leave a poisoned
                // refresh behind for every later request to trip over.
                Err(_panic) => {
                    if let Some(shared) = cleanup.upgrade() {
                        shared.abandon_refresh(generation);
                    }
                    Err(AuthError::ProviderPanicked)
                }
            })
            .instrument(tracing::debug_span!("token_refresh", generation))
            .boxed()
            .shared();

        // The refresh runs on its own task: dropping the request that started it, or every
        // request that waits for it, does not cancel it.
        runtime.spawn(refresh.clone());
        Ok(state.in_flight.insert(InFlight {
            generation,
            refresh,
            deadline: deadline.shared(),
            deadline_at,
        }))
    }
}

/// One provider call (through the store).
///
/// Requests wait for it up to the refresh timeout (see [`RefreshWait`]); the call itself may run
/// for one more timeout, so that a token response already on its way is still read (a rotated
/// refresh token in it is kept by its grant) and its token used, and then it is cancelled. It
/// runs on a task of its own, so a provider that panics, even when dropped, is a typed error.
async fn call_provider(
    runtime: &tokio::runtime::Handle,
    fetch: StoreFuture,
    timeout: Duration,
) -> Result<Token, AuthError> {
    let bound = timeout.saturating_mul(2);
    match runtime
        .spawn(async move { tokio::time::timeout(bound, fetch).await })
        .await
    {
        Ok(Ok(Ok(token))) => Ok(token),
        Ok(Ok(Err(error))) => Err(AuthError::refresh(error)),
        Ok(Err(_elapsed)) => Err(AuthError::RefreshTimeout { timeout }),
        Err(join) if join.is_panic() => Err(AuthError::ProviderPanicked),
        Err(_cancelled) => Err(AuthError::refresh(
            "the token request was cancelled: the runtime is shutting down",
        )),
    }
}

impl CacheShared {
    fn lock_state(&self) -> MutexGuard<'_, RefreshState> {
        // The state stays consistent at every unlock, so a poisoned lock is safe to reuse.
        self.refresh.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The current token if it has not expired, whatever its refresh windows say.
    fn still_usable(&self, now: Instant) -> Option<Arc<Entry>> {
        self.current
            .load_full()
            .filter(|entry| entry.is_unexpired(now))
    }

    /// Clear a refresh that panicked before it could finish, so the next request starts anew.
    fn abandon_refresh(&self, generation: u64) {
        let mut state = self.lock_state();
        if state.end_in_flight(generation) {
            state.retry_at = Instant::now().checked_add(self.config.backoff_initial);
            state.last_error = Some(AuthError::ProviderPanicked);
            self.counters
                .refresh_failures
                .fetch_add(1, Ordering::Relaxed);
        }
        self.refreshing.store(false, Ordering::Relaxed);
    }
}

fn backoff_error(state: &RefreshState, now: Instant) -> Option<AuthError> {
    let retry_at = state.retry_at?;
    let last_error = state.last_error.clone()?;
    (now < retry_at).then(|| AuthError::Backoff {
        retry_in: retry_at - now,
        last_error: Box::new(last_error),
    })
}

/// Install the outcome of a refresh. Runs inside the shared refresh future, so exactly once.
fn finish_refresh(
    cache: Weak<CacheShared>,
    outcome: Result<Token, AuthError>,
    requested_at: Instant,
    generation: u64,
    after_rejection: bool,
    won_scope: Option<String>,
) -> RefreshOutcome {
    let Some(shared) = cache.upgrade() else {
        // Every handle to the cache is gone: nobody can use the result.
        return outcome.and_then(|_| Err(AuthError::refresh("the token cache was dropped")));
    };
    let now = Instant::now();
    let result = outcome
        .and_then(|token| {
            Entry::new(
                token,
                requested_at,
                now,
                generation,
                after_rejection,
                &shared.config,
            )
        })
        .map(Arc::new);

    let mut state = shared.lock_state();
    state.end_in_flight(generation);
    match &result {
        Ok(entry) => {
            shared.current.store(Some(entry.clone()));
            state.rejected = None;
            state.demand = TokenRequest::default();
            if won_scope.is_some() {
                state.stepped_up_scope = won_scope;
            }
            state.retry_at = None;
            state.last_error = None;
            state.next_backoff = shared.config.backoff_initial;
            tracing::debug!(
                generation,
                elapsed = ?now.saturating_duration_since(requested_at),
                "token refresh finished"
            );
        }
        Err(error) => {
            let backoff = if state.next_backoff.is_zero() {
                shared.config.backoff_initial
            } else {
                state.next_backoff
            };
            state.next_backoff = cmp::min(backoff.saturating_mul(2), shared.config.backoff_max);
            // An identity provider that said how long to wait (429/503 with Retry-After) is
            // believed, within reason.
            let asked = error.retry_after().map_or(Duration::ZERO, |wait| {
                cmp::min(wait, MAX_HONOURED_RETRY_AFTER)
            });
            let wait = cmp::max(backoff, asked);
            state.retry_at = now.checked_add(wait);
            state.last_error = Some(error.clone());
            shared
                .counters
                .refresh_failures
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                generation,
                elapsed = ?now.saturating_duration_since(requested_at),
                error = %error,
                cause = error_cause(error).as_deref().unwrap_or("-"),
                backoff = ?wait,
                "token refresh failed"
            );
        }
    }
    shared.refreshing.store(false, Ordering::Relaxed);
    result
}

fn error_cause(error: &AuthError) -> Option<String> {
    std::error::Error::source(error).map(ToString::to_string)
}

impl fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let current = self.shared.current.load();
        f.debug_struct("TokenCache")
            .field("generation", &current.as_deref().map(|e| e.generation))
            .field(
                "expires_at",
                &current.as_deref().and_then(|e| e.token.expires_at()),
            )
            .field("config", &self.shared.config)
            .field("stats", &self.stats())
            .finish()
    }
}

/// Options for a [`TokenCache`]. Every option has a documented default.
pub struct TokenCacheBuilder {
    provider: Arc<dyn TokenProvider>,
    store: Box<dyn TokenStore>,
    config: CacheConfig,
}

impl TokenCacheBuilder {
    /// Treat a token as expired this long before its expiry, to absorb clock skew and the time a
    /// request spends in flight. Requests wait for a new token from then on.
    ///
    /// Default: 60 seconds, but never more than a quarter of the token's lifetime, so a
    /// short-lived token is still used for most of its life.
    pub fn refresh_skew(mut self, skew: Duration) -> Self {
        self.config.refresh_skew = skew;
        self
    }

    /// Start one background refresh this long before expiry, while requests keep using the
    /// still-valid token. A failed background refresh keeps that token in use.
    ///
    /// Default: 5 minutes, but never more than half of the token's lifetime, and never less
    /// than the refresh skew.
    pub fn advisory_window(mut self, window: Duration) -> Self {
        self.config.advisory_window = window;
        self
    }

    /// Requests wait at most this long for a provider call; then they get
    /// [`AuthError::RefreshTimeout`] (or the current token, if it has not expired yet).
    /// Default: 30 seconds.
    ///
    /// The call itself is not dropped at that moment: it may run for one more timeout, so that
    /// an answer already on its way is read (a rotated refresh token in it is kept by its
    /// grant) and its token used; then it is cancelled. No second call starts while it runs:
    /// requests that arrive meanwhile get the error at once.
    pub fn refresh_timeout(mut self, timeout: Duration) -> Self {
        self.config.refresh_timeout = timeout;
        self
    }

    /// After a failed refresh, wait `initial` before the next provider call, doubling after each
    /// further failure up to `max`. Requests that need a token meanwhile get
    /// [`AuthError::Backoff`] at once. Default: 1 second doubling to 30 seconds.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.config.backoff_initial = initial;
        self.config.backoff_max = cmp::max(initial, max);
        self
    }

    /// After a refresh caused by a 401, a 401 for the new token within this long does not
    /// refresh again, unless a request replayed with the new token went through: the response
    /// goes back to the caller unchanged (counted in [`CacheStats::repeated_rejections`]).
    ///
    /// A fresh token that is refused at once was not expired: the API refuses this client for
    /// another reason (scope, a revoked grant, a misconfigured route), and refreshing on every
    /// such 401 would cost one token request per request and get the identity provider to
    /// throttle everyone. So while refreshing has not been seen to help, rejection-driven
    /// refreshes happen at most once per cooldown per cache. Refreshes before expiry are not
    /// limited by it. Default: 5 seconds.
    pub fn rejection_cooldown(mut self, cooldown: Duration) -> Self {
        self.config.rejection_cooldown = cooldown;
        self
    }

    /// The authorization scheme written before the token, as in `Bearer <token>`. An empty scheme
    /// sends the bare token (for APIs that expect a key in a custom header). Default: `Bearer`.
    pub fn scheme(mut self, scheme: impl Into<String>) -> Self {
        self.config.scheme = scheme.into();
        self
    }

    /// Where new tokens come from: [`LocalStore`] (the default) asks the provider; a shared
    /// store such as `redis_store::RedisStore` first takes the token
    /// another process fetched. Requests are still served from memory either way.
    pub fn store(mut self, store: impl TokenStore) -> Self {
        self.store = Box::new(store);
        self
    }

    /// Build the cache. No token is fetched until the first request needs one.
    pub fn build(self) -> TokenCache {
        let next_backoff = self.config.backoff_initial;
        let counters = Counters::default();
        let fetch = FetchToken::new(self.provider, counters.token_requests.clone());
        TokenCache {
            shared: Arc::new(CacheShared {
                current: ArcSwapOption::empty(),
                refresh: Mutex::new(RefreshState {
                    next_backoff,
                    ..RefreshState::default()
                }),
                refreshing: AtomicBool::new(false),
                next_generation: AtomicU64::new(0),
                fetch,
                store: self.store,
                config: self.config,
                counters,
            }),
        }
    }
}

impl fmt::Debug for TokenCacheBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenCacheBuilder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider_fn;
    use std::sync::atomic::AtomicUsize;

    fn counting(lifetime: Option<Duration>) -> (TokenCache, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let cache = TokenCache::new(provider_fn(move || {
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                let token = Token::new(format!("token-{n}"));
                Ok::<_, std::io::Error>(match lifetime {
                    Some(lifetime) => token.with_expires_in(lifetime),
                    None => token,
                })
            }
        }));
        (cache, calls)
    }

    #[tokio::test(start_paused = true)]
    async fn windows_follow_the_lifetime() {
        let (cache, calls) = counting(Some(Duration::from_secs(3600)));
        assert_eq!(cache.token().await.unwrap().secret(), "token-1");
        tokio::time::advance(Duration::from_secs(60)).await;
        let stats = cache.stats();
        assert_eq!(stats.generation, Some(1));
        assert_eq!(stats.token_age, Some(Duration::from_secs(60)));
        assert_eq!(stats.expires_in, Some(Duration::from_secs(3540)));
        // Fresh for 55 minutes: still fresh at 54.
        tokio::time::advance(Duration::from_secs(53 * 60)).await;
        assert!(matches!(cache.acquire(), Acquire::Ready(_)));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Advisory: served at once, one background refresh.
        tokio::time::advance(Duration::from_secs(2 * 60)).await;
        assert!(matches!(cache.acquire(), Acquire::Ready(_)));
        assert!(matches!(cache.acquire(), Acquire::Ready(_)));
        tokio::task::yield_now().await;
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(cache.token().await.unwrap().secret(), "token-2");
    }

    #[tokio::test(start_paused = true)]
    async fn short_lifetime_is_used_for_most_of_its_life() {
        let (cache, calls) = counting(Some(Duration::from_secs(20)));
        cache.token().await.unwrap();
        // Skew is capped at a quarter (5 s), advisory at half (10 s) of a 20 s lifetime.
        tokio::time::advance(Duration::from_millis(9_999)).await;
        assert!(matches!(cache.acquire(), Acquire::Ready(_)));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn stale_token_makes_requests_wait() {
        let (cache, calls) = counting(Some(Duration::from_secs(20)));
        cache.token().await.unwrap();
        tokio::time::advance(Duration::from_secs(16)).await;
        assert!(matches!(cache.acquire(), Acquire::Wait(_)));
        assert_eq!(cache.token().await.unwrap().secret(), "token-2");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn invalidation_compares_generations() {
        let (cache, calls) = counting(None);
        cache.token().await.unwrap();
        assert_eq!(cache.invalidate(1), Rejection::Invalidated);
        assert_eq!(
            cache.invalidate(1),
            Rejection::AlreadyReplaced,
            "second 401 for the same token"
        );
        cache.token().await.unwrap();
        assert_eq!(
            cache.invalidate(1),
            Rejection::AlreadyReplaced,
            "401 for an old token"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        let stats = cache.stats();
        assert_eq!((stats.invalidations, stats.stale_rejections), (1, 2));
        assert_eq!((stats.generation, stats.expires_in), (Some(2), None));
    }

    #[tokio::test]
    async fn header_injection_is_refused() {
        let cache = TokenCache::new(crate::StaticToken::new(Token::new("a\r\nX-Evil: 1")));
        assert!(matches!(
            cache.token().await,
            Err(AuthError::InvalidHeaderValue)
        ));
        // The same for a scheme that would smuggle a header.
        let cache = TokenCache::builder(crate::StaticToken::new(Token::new("fine")))
            .scheme("Bearer\r\nX-Evil: 1\r\n")
            .build();
        assert!(matches!(
            cache.token().await,
            Err(AuthError::InvalidHeaderValue)
        ));
    }

    #[tokio::test]
    async fn panicking_provider_is_an_error_not_a_wedge() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let cache = TokenCache::builder(provider_fn(move || {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    panic!("provider bug");
                }
                Ok::<_, std::io::Error>(Token::new("ok"))
            }
        }))
        .backoff(Duration::ZERO, Duration::ZERO)
        .build();
        assert!(matches!(
            cache.token().await,
            Err(AuthError::ProviderPanicked)
        ));
        assert_eq!(cache.token().await.unwrap().secret(), "ok");
    }

    /// A service's view of the token follows every change of the cache at its next request.
    #[tokio::test]
    async fn a_view_sees_each_new_token_at_its_next_request() {
        async fn generation(cache: &TokenCache, view: &mut TokenView) -> (bool, u64) {
            match cache.acquire_with(view) {
                Acquire::Ready(credential) => (true, credential.generation),
                Acquire::Wait(wait) => (false, wait.await.unwrap().generation),
                Acquire::Failed(error) => panic!("{error}"),
            }
        }
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let cache = TokenCache::builder(provider_fn(move || {
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            async move { Ok::<_, std::io::Error>(Token::new(format!("token-{n}"))) }
        }))
        // Every 401 here is an expiry.
        .rejection_cooldown(Duration::ZERO)
        .build();
        // Made before there is a token, as a layer's service is.
        let mut view = cache.view();
        assert_eq!(generation(&cache, &mut view).await, (false, 1));
        assert_eq!(generation(&cache, &mut view).await, (true, 1));
        assert_eq!(cache.invalidate(1), Rejection::Invalidated);
        assert_eq!(generation(&cache, &mut view).await, (false, 2));
        // A token installed by someone else (another view, the cache itself) is seen too.
        assert_eq!(cache.invalidate(2), Rejection::Invalidated);
        assert_eq!(cache.token().await.unwrap().secret(), "token-3");
        assert_eq!(generation(&cache, &mut view).await, (true, 3));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn no_runtime_is_a_typed_error() {
        let (cache, _) = counting(None);
        assert!(matches!(
            cache.acquire(),
            Acquire::Failed(AuthError::NoRuntime)
        ));
    }
}
