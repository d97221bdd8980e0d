//! A `tower::retry::Policy` for HTTP: retry 429 and 503 as the server asks.
//!
//! Batch jobs die of two things mid-way: token expiry (the [`AuthLayer`](crate::AuthLayer)'s job)
//! and `429 Too Many Requests`. [`RetryPolicy`] answers the second: it honours `Retry-After`
//! (seconds or an HTTP-date), and without one backs off exponentially with full jitter. A
//! `Retry-After` longer than the caller accepts (a daily quota answering "come back in 6 hours")
//! is not slept on: the response goes back at once.
//!
//! A request is retried only if its body can be sent again, through the same mechanism the
//! auth layer replays with ([`ReplayableBody`]), and by default only for idempotent methods.
//!
//! Every request has its own attempt count, its own `max_elapsed` clock (started by its first
//! attempt) and its own jitter, however the service is shared (cloned, or behind a `Buffer`):
//! requests throttled together do not come back together. What all requests share is a retry
//! budget ([`RetryPolicyBuilder::retry_budget`]): an API that answers everything with `503`
//! sees a bounded fraction of extra requests, not every request times the attempt cap.
//!
//! # Where it goes
//! Either order works, with a different meaning:
//! - **outside** the auth layer (`Retry -> AuthLayer -> client`, recommended): every attempt
//!   passes through the auth layer and takes the current token; a 401 inside an attempt is
//!   replayed there, once.
//! - **inside** it (`AuthLayer -> Retry -> client`): attempts reuse the token the request left
//!   with; a streaming body is wrapped once by the auth layer and its recording serves both the
//!   retries and the 401 replay.
//!
//! ```
//! use std::time::Duration;
//! use tower::retry::RetryLayer;
//! use tower::ServiceBuilder;
//! use tower_auth_refresh::retry::RetryPolicy;
//! use tower_auth_refresh::{AuthLayer, StaticToken, Token};
//!
//! let policy = RetryPolicy::builder()
//!     .max_retries(5)
//!     .max_retry_after(Duration::from_secs(60))
//!     .build();
//! let stack = ServiceBuilder::new()
//!     .layer(RetryLayer::new(policy.clone()))
//!     .layer(AuthLayer::new(StaticToken::new(Token::new("secret"))));
//! # drop(stack);
//! // `policy.retries()` counts the retries made through every clone.
//! assert_eq!(policy.retries(), 0);
//! ```

use std::any::Any;
use std::collections::hash_map::RandomState;
use std::error::Error as StdError;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::RETRY_AFTER;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{Empty, Full};
use tokio::time::{Instant, Sleep};
use tower::retry::budget::{Budget, TpsBudget};
use tower::retry::Policy;
use tower::BoxError;

use crate::error::AuthError;
use crate::replay::ReplayBody;

/// A request body that can be sent again.
///
/// Implemented for [`ReplayBody`] (which keeps what it streamed, up to a cap) and for bodies
/// that are cheap to clone. Wrap any other streaming body with [`ReplayBody::recorded`].
pub trait ReplayableBody: Sized {
    /// A copy that sends the same bytes, or `None` if this body cannot be replayed.
    fn try_clone_body(&self) -> Option<Self>;

    /// Whether the copy can be sent now (its original may still be streaming).
    fn is_replayable(&self) -> bool {
        true
    }
}

impl<B> ReplayableBody for ReplayBody<B> {
    fn try_clone_body(&self) -> Option<Self> {
        self.try_clone()
    }

    fn is_replayable(&self) -> bool {
        ReplayBody::is_replayable(self)
    }
}

impl ReplayableBody for Full<Bytes> {
    fn try_clone_body(&self) -> Option<Self> {
        Some(self.clone())
    }
}

impl ReplayableBody for Empty<Bytes> {
    fn try_clone_body(&self) -> Option<Self> {
        Some(*self)
    }
}

/// Retries throttled requests, honouring `Retry-After`. See the [module docs](self).
///
/// Cheap to clone; clones share the settings, the retry budget and the counters
/// ([`retries`](Self::retries), ...). What belongs to one request (attempts made, when its first
/// attempt started, its jitter) is set afresh when tower hands the policy a new request.
#[derive(Clone)]
pub struct RetryPolicy {
    settings: Arc<Settings>,
    request: RequestState,
}

/// What belongs to one request.
#[derive(Clone, Copy)]
struct RequestState {
    retries_made: u32,
    first_attempt_at: Option<Instant>,
    /// The state of this request's jitter generator.
    jitter: u64,
}

/// The options, and what every clone shares.
struct Settings {
    options: RetryPolicyBuilder,
    budget: Option<Arc<dyn Budget + Send + Sync>>,
    /// Random per policy; mixed with `requests` into each request's jitter seed.
    seed: u64,
    requests: AtomicU64,
    retries: AtomicU64,
    given_back: AtomicU64,
    over_budget: AtomicU64,
}

impl Settings {
    /// A fresh, independent jitter seed for the next request.
    fn next_seed(&self) -> u64 {
        let n = self.requests.fetch_add(1, Ordering::Relaxed);
        let mut state = self.seed ^ n.wrapping_mul(0xd1b5_4a32_d192_ed03);
        // One SplitMix64 step scatters consecutive requests over the whole sequence, so no
        // request's delays are another's, shifted.
        splitmix64(&mut state)
    }
}

/// SplitMix64: advance `state` and return the next value; any state (zero too) is fine.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl RetryPolicy {
    /// The defaults: see [`RetryPolicyBuilder`].
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// Options, each with a documented default.
    pub fn builder() -> RetryPolicyBuilder {
        RetryPolicyBuilder {
            statuses: vec![
                StatusCode::TOO_MANY_REQUESTS,
                StatusCode::SERVICE_UNAVAILABLE,
            ],
            retry_errors: false,
            any_method: false,
            max_retries: 3,
            max_elapsed: None,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(3 * 60),
            budget: BudgetChoice::Default,
        }
    }

    /// Retries made so far, through every clone of this policy.
    pub fn retries(&self) -> u64 {
        self.settings.retries.load(Ordering::Relaxed)
    }

    /// Responses (or errors) handed back at once because the wait they asked for was longer
    /// than [`max_retry_after`](RetryPolicyBuilder::max_retry_after).
    pub fn given_back(&self) -> u64 {
        self.settings.given_back.load(Ordering::Relaxed)
    }

    /// Retries not made because the [retry budget](RetryPolicyBuilder::retry_budget) was spent.
    pub fn over_budget(&self) -> u64 {
        self.settings.over_budget.load(Ordering::Relaxed)
    }

    /// A new request starts: its own attempt count, `max_elapsed` clock and jitter, and a
    /// deposit in the retry budget.
    fn start_request(&mut self) {
        self.request = RequestState {
            retries_made: 0,
            first_attempt_at: Some(Instant::now()),
            jitter: self.settings.next_seed(),
        };
        if let Some(budget) = &self.settings.budget {
            budget.deposit();
        }
    }

    /// How long to wait before retry number `retries_made + 1` without a `Retry-After`:
    /// full jitter over an exponential ceiling, `random(0 ..= min(max_delay, base * 2^n))`.
    fn backoff(&mut self) -> Duration {
        let options = &self.settings.options;
        let ceiling = options
            .base_delay
            .saturating_mul(1u32 << self.request.retries_made.min(20))
            .min(options.max_delay);
        let random = splitmix64(&mut self.request.jitter);
        let fraction = (random >> 11) as f64 / (1u64 << 53) as f64;
        ceiling.mul_f64(fraction)
    }

    /// A wait the other side asked for, unless it is longer than the caller accepts.
    fn asked_wait(&self, wait: Duration) -> Option<Duration> {
        if wait > self.settings.options.max_retry_after {
            self.settings.given_back.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                retry_after = ?wait,
                "asked to wait longer than the longest accepted wait; giving up at once"
            );
            return None;
        }
        Some(wait)
    }

    /// The wait a response asks for, or `None` when it is not to be retried.
    fn wait_for<B>(&mut self, response: &Response<B>) -> Option<Duration> {
        if !self.settings.options.statuses.contains(&response.status()) {
            return None;
        }
        let asked = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|value| crate::retry_after::parse(value, SystemTime::now()));
        match asked {
            Some(wait) => self.asked_wait(wait),
            None => Some(self.backoff()),
        }
    }

    /// The wait before retrying after the inner service failed (`retry_errors` is on).
    ///
    /// This crate's own errors are not retried blindly: they either say when a token may be
    /// had again (a throttled token endpoint, a refresh backing off), which is honoured like a
    /// `Retry-After`, or they are permanent (wrong client credentials, a redirecting endpoint)
    /// and no wait would help.
    fn wait_after_error(&mut self, error: &(dyn Any + 'static)) -> Option<Duration> {
        let Some(auth) = auth_error_in(error) else {
            return Some(self.backoff());
        };
        if is_permanent(auth) {
            tracing::debug!(error = %auth, "not retrying: the token cannot be had by waiting");
            return None;
        }
        match auth.retry_after() {
            Some(wait) => self.asked_wait(wait),
            None => Some(self.backoff()),
        }
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::new()
    }
}

/// The [`AuthError`] an inner service failed with, if the error is one or wraps one.
fn auth_error_in<'a>(error: &'a (dyn Any + 'static)) -> Option<&'a AuthError> {
    if let Some(auth) = error.downcast_ref::<AuthError>() {
        return Some(auth);
    }
    let boxed: &(dyn StdError + 'static) = &**error.downcast_ref::<BoxError>()?;
    std::iter::successors(Some(boxed), |error| (*error).source())
        .find_map(|error| error.downcast_ref::<AuthError>())
}

/// Whether waiting cannot help: the identity provider refused this client, or the
/// configuration is wrong. Everything else is worth another attempt, because the token cache
/// itself paces its calls to the identity provider (backoff, `Retry-After`).
fn is_permanent(error: &AuthError) -> bool {
    match error {
        AuthError::Backoff { last_error, .. } => is_permanent(last_error),
        AuthError::Refresh { .. }
        | AuthError::RefreshTimeout { .. }
        | AuthError::Throttled { .. }
        | AuthError::Transport { .. } => false,
        AuthError::TokenEndpoint(refused) => {
            // RFC 6749 codes are the client's fault; some servers send the authorization
            // endpoint's `server_error` / `temporarily_unavailable`, or a 5xx, for an outage.
            !(refused.status.is_server_error()
                || matches!(
                    refused.code.as_str(),
                    "server_error" | "temporarily_unavailable"
                ))
        }
        // A proxy's error page is an outage; a 2xx that is not a token is a wrong endpoint.
        AuthError::MalformedResponse { status, .. } => !status.is_server_error(),
        AuthError::InvalidHeaderValue
        | AuthError::ProviderPanicked
        | AuthError::NoRuntime
        | AuthError::NoTimer
        | AuthError::UnsupportedTokenType { .. }
        | AuthError::Redirected { .. }
        | AuthError::InsecureUrl { .. }
        | AuthError::Discovery { .. }
        | AuthError::NoRefreshToken => true,
        #[cfg(feature = "dpop")]
        AuthError::Dpop(_) => true,
    }
}

impl<B, ResBody, E> Policy<Request<B>, Response<ResBody>, E> for RetryPolicy
where
    B: ReplayableBody,
    E: 'static,
{
    type Future = Sleep;

    fn retry(
        &mut self,
        request: &mut Request<B>,
        result: &mut Result<Response<ResBody>, E>,
    ) -> Option<Sleep> {
        if self.request.retries_made >= self.settings.options.max_retries
            || !request.body().is_replayable()
        {
            return None;
        }
        let wait = match result {
            Ok(response) => self.wait_for(response)?,
            Err(error) if self.settings.options.retry_errors => self.wait_after_error(error)?,
            Err(_) => return None,
        };
        if let (Some(limit), Some(first)) = (
            self.settings.options.max_elapsed,
            self.request.first_attempt_at,
        ) {
            if first.elapsed().saturating_add(wait) > limit {
                return None;
            }
        }
        // Last: a withdrawal is a retry made.
        if let Some(budget) = &self.settings.budget {
            if !budget.withdraw() {
                self.settings.over_budget.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("not retrying: the retry budget is spent");
                return None;
            }
        }
        self.request.retries_made += 1;
        self.settings.retries.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(retry = self.request.retries_made, wait = ?wait, "retrying throttled request");
        Some(tokio::time::sleep(wait))
    }

    fn clone_request(&mut self, request: &Request<B>) -> Option<Request<B>> {
        // tower calls this first on the service's own policy (for every request the service
        // takes), then clones that policy into the request's future, where later calls come
        // after a retry. So "no retry made yet" means a new request: whatever it inherited from
        // the previous one (its clock, its jitter) is reset here.
        if self.request.retries_made == 0 {
            self.start_request();
        }
        if !self.settings.options.any_method && !is_idempotent(request.method()) {
            return None;
        }
        let body = request.body().try_clone_body()?;
        let mut clone = Request::new(body);
        *clone.method_mut() = request.method().clone();
        *clone.uri_mut() = request.uri().clone();
        *clone.version_mut() = request.version();
        *clone.headers_mut() = request.headers().clone();
        *clone.extensions_mut() = request.extensions().clone();
        Some(clone)
    }
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

impl fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("options", &self.settings.options)
            .field("retries", &self.retries())
            .field("given_back", &self.given_back())
            .field("over_budget", &self.over_budget())
            .finish_non_exhaustive()
    }
}

/// Options for [`RetryPolicy`]. Every option has a documented default.
#[derive(Clone, Debug)]
pub struct RetryPolicyBuilder {
    statuses: Vec<StatusCode>,
    retry_errors: bool,
    any_method: bool,
    max_retries: u32,
    max_elapsed: Option<Duration>,
    base_delay: Duration,
    max_delay: Duration,
    max_retry_after: Duration,
    budget: BudgetChoice,
}

/// Which retry budget a built policy gets.
#[derive(Clone)]
enum BudgetChoice {
    /// A fresh `TpsBudget::default()` per built policy.
    Default,
    Custom(Arc<dyn Budget + Send + Sync>),
    Off,
}

impl fmt::Debug for BudgetChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BudgetChoice::Default => "TpsBudget::default()",
            BudgetChoice::Custom(_) => "custom",
            BudgetChoice::Off => "none",
        })
    }
}

impl RetryPolicyBuilder {
    /// Also retry this status, for example `502 Bad Gateway` or `504 Gateway Timeout`.
    /// Default: 429 and 503 only.
    pub fn retry_status(mut self, status: StatusCode) -> Self {
        if !self.statuses.contains(&status) {
            self.statuses.push(status);
        }
        self
    }

    /// Retry when the inner service fails (connection refused or reset, timeouts below the
    /// retry layer). Default: `false`.
    ///
    /// An [`AuthError`] from an [`AuthLayer`](crate::AuthLayer) below is retried only when
    /// waiting can help: after the wait it names (a throttled token endpoint's `Retry-After`,
    /// a refresh's backoff), within [`max_retry_after`](Self::max_retry_after); a permanent
    /// refusal such as RFC 6749 `invalid_client` goes back at once.
    pub fn retry_errors(mut self, retry: bool) -> Self {
        self.retry_errors = retry;
        self
    }

    /// Retry every method, not only the idempotent ones. Default: `false`; a POST that was
    /// throttled was not acted on, but only the API can promise that.
    pub fn retry_any_method(mut self, any: bool) -> Self {
        self.any_method = any;
        self
    }

    /// At most this many retries per request. Default: 3.
    pub fn max_retries(mut self, retries: u32) -> Self {
        self.max_retries = retries;
        self
    }

    /// Do not retry once this much time has passed since the request's first attempt
    /// (counting the coming wait). Default: no limit besides `max_retries`.
    pub fn max_elapsed(mut self, limit: Duration) -> Self {
        self.max_elapsed = Some(limit);
        self
    }

    /// Without `Retry-After`, wait up to `base * 2^n` (with full jitter) before retry `n + 1`,
    /// and never more than `max`. Default: 100 ms, capped at 30 s.
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.base_delay = base;
        self.max_delay = max;
        self
    }

    /// The longest `Retry-After` slept on; a response asking for more goes back to the caller at
    /// once. Default: 3 minutes.
    pub fn max_retry_after(mut self, limit: Duration) -> Self {
        self.max_retry_after = limit;
        self
    }

    /// Draw every retry from this budget, shared by all clones of the built policy: each
    /// request deposits, each retry withdraws, and a retry the budget cannot pay for is not
    /// made (the response goes back as it is). The attempt cap alone would let an API that
    /// fails everything receive every request `1 + max_retries` times.
    ///
    /// Default: tower's `TpsBudget::default()`, that is `TpsBudget::new(10 s, 10, 0.2)`: over
    /// any 10 s, retries of up to 20% of the requests made, plus a reserve of 10 per second
    /// (100 per 10 s) so that a client sending few requests can still retry. Each built policy
    /// gets its own default budget; a budget passed here (for example a [`TpsBudget`] with other
    /// numbers) is shared by every policy built from this builder.
    pub fn retry_budget(mut self, budget: impl Budget + Send + Sync + 'static) -> Self {
        self.budget = BudgetChoice::Custom(Arc::new(budget));
        self
    }

    /// No retry budget: every request may be retried up to [`max_retries`](Self::max_retries)
    /// times, whatever the others do.
    pub fn no_retry_budget(mut self) -> Self {
        self.budget = BudgetChoice::Off;
        self
    }

    /// Build the policy.
    pub fn build(self) -> RetryPolicy {
        let mut seed = RandomState::new().build_hasher();
        seed.write_u64(0x5eed);
        let budget: Option<Arc<dyn Budget + Send + Sync>> = match &self.budget {
            BudgetChoice::Default => Some(Arc::new(TpsBudget::default())),
            BudgetChoice::Custom(budget) => Some(budget.clone()),
            BudgetChoice::Off => None,
        };
        let settings = Settings {
            options: self,
            budget,
            seed: seed.finish(),
            requests: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            given_back: AtomicU64::new(0),
            over_budget: AtomicU64::new(0),
        };
        let jitter = settings.next_seed();
        RetryPolicy {
            settings: Arc::new(settings),
            request: RequestState {
                retries_made: 0,
                first_attempt_at: None,
                jitter,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{ErrorCode, TokenEndpointError};
    use http::HeaderValue;

    fn throttled(retry_after: Option<&str>) -> Result<Response<()>, BoxError> {
        let mut response = Response::new(());
        *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        if let Some(value) = retry_after {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_str(value).unwrap());
        }
        Ok(response)
    }

    fn clone<B: ReplayableBody>(
        policy: &mut RetryPolicy,
        request: &Request<B>,
    ) -> Option<Request<B>> {
        Policy::<Request<B>, Response<()>, BoxError>::clone_request(policy, request)
    }

    fn get() -> Request<Empty<Bytes>> {
        Request::get("/").body(Empty::new()).unwrap()
    }

    fn wait(sleep: Option<Sleep>) -> Option<Duration> {
        sleep.map(|sleep| sleep.deadline() - Instant::now())
    }

    #[tokio::test(start_paused = true)]
    async fn honours_retry_after_seconds_and_caps_attempts() {
        let mut policy = RetryPolicy::builder().max_retries(2).build();
        let mut request = clone(&mut policy, &get()).unwrap();
        for _ in 0..2 {
            let slept = wait(policy.retry(&mut request, &mut throttled(Some("7"))));
            assert_eq!(slept, Some(Duration::from_secs(7)));
        }
        assert!(policy
            .retry(&mut request, &mut throttled(Some("7")))
            .is_none());
        assert_eq!(policy.retries(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn long_retry_after_goes_back_at_once() {
        let mut policy = RetryPolicy::new();
        let mut request = clone(&mut policy, &get()).unwrap();
        assert!(policy
            .retry(&mut request, &mut throttled(Some("21600")))
            .is_none());
        assert_eq!((policy.retries(), policy.given_back()), (0, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn garbage_retry_after_falls_back_to_bounded_backoff() {
        let mut policy = RetryPolicy::builder()
            .max_retries(50)
            .backoff(Duration::from_millis(100), Duration::from_secs(2))
            .build();
        let mut request = clone(&mut policy, &get()).unwrap();
        for n in 0..50u32 {
            let slept = wait(policy.retry(&mut request, &mut throttled(Some("soon")))).unwrap();
            let ceiling = Duration::from_millis(100)
                .saturating_mul(1 << n.min(20))
                .min(Duration::from_secs(2));
            assert!(slept <= ceiling, "retry {n}: {slept:?} > {ceiling:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn other_statuses_and_errors_are_not_retried_by_default() {
        let mut policy = RetryPolicy::new();
        let mut request = clone(&mut policy, &get()).unwrap();
        let mut ok: Result<Response<()>, BoxError> = Ok(Response::new(()));
        assert!(policy.retry(&mut request, &mut ok).is_none());
        let mut failed: Result<Response<()>, BoxError> = Err("connection reset".into());
        assert!(policy.retry(&mut request, &mut failed).is_none());
        let mut policy = RetryPolicy::builder().retry_errors(true).build();
        assert!(policy.retry(&mut request, &mut failed).is_some());
    }

    #[test]
    fn non_idempotent_methods_need_an_opt_in() {
        let post = Request::post("/")
            .body(Full::new(Bytes::from("x")))
            .unwrap();
        assert!(clone(&mut RetryPolicy::new(), &post).is_none());
        let mut opted_in = RetryPolicy::builder().retry_any_method(true).build();
        assert!(clone(&mut opted_in, &post).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn elapsed_limit_stops_retries() {
        let mut policy = RetryPolicy::builder()
            .max_retries(10)
            .max_elapsed(Duration::from_secs(5))
            .build();
        let mut request = clone(&mut policy, &get()).unwrap();
        assert!(policy
            .retry(&mut request, &mut throttled(Some("3")))
            .is_some());
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(policy
            .retry(&mut request, &mut throttled(Some("3")))
            .is_none());
    }

    /// What tower does for each request: `clone_request` on the service's own policy, then
    /// the request's future gets a clone of it.
    fn take_request(service_policy: &mut RetryPolicy) -> (RetryPolicy, Request<Empty<Bytes>>) {
        let request = clone(service_policy, &get()).unwrap();
        (service_policy.clone(), request)
    }

    #[tokio::test(start_paused = true)]
    async fn each_request_starts_its_own_clock() {
        let mut service_policy = RetryPolicy::builder()
            .max_elapsed(Duration::from_secs(10))
            .build();
        let (_first, _) = take_request(&mut service_policy);
        tokio::time::advance(Duration::from_secs(60)).await;
        let (mut second, mut request) = take_request(&mut service_policy);
        let slept = wait(second.retry(&mut request, &mut throttled(Some("1"))));
        assert_eq!(slept, Some(Duration::from_secs(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn each_request_draws_its_own_jitter() {
        let ceiling = Duration::from_secs(60);
        let mut service_policy = RetryPolicy::builder().backoff(ceiling, ceiling).build();
        let mut waits: Vec<Duration> = (0..8)
            .map(|_| {
                let (mut policy, mut request) = take_request(&mut service_policy);
                wait(policy.retry(&mut request, &mut throttled(None))).unwrap()
            })
            .collect();
        assert!(waits.iter().all(|wait| *wait <= ceiling), "{waits:?}");
        waits.sort();
        waits.dedup();
        assert_eq!(waits.len(), 8, "{waits:?}");
    }

    /// Every request is throttled (no `Retry-After`) and tries `max_retries` times.
    fn retries_of_a_failing_batch(policy: RetryPolicy, requests: usize) -> u64 {
        let mut service_policy = policy.clone();
        let mut sessions: Vec<_> = (0..requests)
            .map(|_| take_request(&mut service_policy))
            .collect();
        for (policy, request) in &mut sessions {
            while policy.retry(request, &mut throttled(None)).is_some() {}
        }
        policy.retries()
    }

    #[tokio::test(start_paused = true)]
    async fn the_default_budget_retries_a_fifth_of_the_requests_plus_a_reserve() {
        // 10 s x 10/s = 100 retries of reserve, plus 200 / 5.
        let policy = RetryPolicy::new();
        assert_eq!(retries_of_a_failing_batch(policy.clone(), 200), 140);
        // 46 requests retried 3 times and one twice; the other 153 were refused their first.
        assert_eq!(policy.over_budget(), 1 + 153);

        let unbounded = RetryPolicy::builder().no_retry_budget().build();
        assert_eq!(retries_of_a_failing_batch(unbounded.clone(), 200), 600);
        assert_eq!(unbounded.over_budget(), 0);

        let strict = RetryPolicy::builder()
            .retry_budget(TpsBudget::new(Duration::from_secs(1), 0, 0.5))
            .build();
        assert_eq!(retries_of_a_failing_batch(strict, 10), 5);
    }

    fn failed(error: AuthError) -> Result<Response<()>, BoxError> {
        Err(Box::new(error))
    }

    fn invalid_client() -> AuthError {
        AuthError::TokenEndpoint(TokenEndpointError {
            status: StatusCode::UNAUTHORIZED,
            code: ErrorCode::InvalidClient,
            description: None,
            uri: None,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn auth_errors_are_retried_only_when_waiting_can_help() {
        let mut policy = RetryPolicy::builder()
            .retry_errors(true)
            .max_retries(10)
            .build();
        let mut request = clone(&mut policy, &get()).unwrap();

        // Permanent: no wait brings a token.
        assert!(policy
            .retry(&mut request, &mut failed(invalid_client()))
            .is_none());
        let backing_off_after_refusal = AuthError::Backoff {
            retry_in: Duration::from_secs(1),
            last_error: Box::new(invalid_client()),
        };
        assert!(policy
            .retry(&mut request, &mut failed(backing_off_after_refusal))
            .is_none());
        assert!(policy
            .retry(&mut request, &mut failed(AuthError::NoRefreshToken))
            .is_none());

        // The wait it names, exactly, as a Retry-After.
        let backoff = AuthError::Backoff {
            retry_in: Duration::from_millis(1500),
            last_error: Box::new(AuthError::RefreshTimeout {
                timeout: Duration::from_secs(30),
            }),
        };
        assert_eq!(
            wait(policy.retry(&mut request, &mut failed(backoff))),
            Some(Duration::from_millis(1500))
        );
        let throttled_endpoint = AuthError::Throttled {
            status: StatusCode::TOO_MANY_REQUESTS,
            retry_after: Some(Duration::from_secs(2)),
        };
        assert_eq!(
            wait(policy.retry(&mut request, &mut failed(throttled_endpoint))),
            Some(Duration::from_secs(2))
        );
        // Too long a wait goes back at once, as a response's would.
        let quota = AuthError::Throttled {
            status: StatusCode::TOO_MANY_REQUESTS,
            retry_after: Some(Duration::from_secs(6 * 3600)),
        };
        assert!(policy.retry(&mut request, &mut failed(quota)).is_none());
        assert_eq!((policy.retries(), policy.given_back()), (2, 1));

        // An AuthError wrapped by another layer is still recognised.
        #[derive(Debug)]
        struct Wrapped(AuthError);
        impl fmt::Display for Wrapped {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("wrapped")
            }
        }
        impl StdError for Wrapped {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                Some(&self.0)
            }
        }
        let mut wrapped: Result<Response<()>, BoxError> = Err(Box::new(Wrapped(invalid_client())));
        assert!(policy.retry(&mut request, &mut wrapped).is_none());
        // An error of the inner service, typed or boxed, backs off as before.
        let mut io: Result<Response<()>, std::io::Error> =
            Err(std::io::ErrorKind::ConnectionReset.into());
        assert!(policy.retry(&mut request, &mut io).is_some());
        assert_eq!(policy.retries(), 3);
    }
}
