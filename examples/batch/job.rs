//! The batch job itself, without a terminal: what `main.rs` runs and `tests/batch_job.rs` drives.
//!
//! Every page goes through the stack the crate recommends, outermost first:
//! `Timeout` -> `Retry` ([`RetryPolicy`]: 429 and 503, honouring `Retry-After`) -> [`AuthLayer`]
//! (bearer token, one replay after a 401) -> rate limit (`buffer` + `rate_limit`) ->
//! `concurrency_limit` -> hyper-util client (HTTPS or HTTP, rustls).
//!
//! Two ways to run it:
//! - [`run_embedded`] starts an identity provider and a paginated API on loopback (the crate's
//!   `testkit`, feature `testkit`), with short-lived tokens, periodic 429s and server-side
//!   revocations, and fetches every page in the pagination style of [`JobConfig::preset`]. [`Servers::start`] and [`run_on`] do the same in two steps, so a caller
//!   can look at the servers afterwards.
//! - [`run_platform`] asks a real token endpoint (client credentials, or NICE CXone's access
//!   key through discovery) and walks a real API's pages as its [`Paging`] says, until the
//!   answers mark the last one. [`run_platform_shard`] fetches one [`Shard`] of them, with the
//!   token cache over a given [`TokenStore`]: what each process of the fleet mode (`main.rs`,
//!   `fleet.rs`) runs. `tests/batch_platforms.rs` runs it against the crate's CXone and Genesys
//!   emulators.
//!
//! Pages are walked as `paging.rs` says (page number, offset or cursor; the records at a JSON
//! pointer; the end where a page is empty, past the page count, or without a next cursor).
//!
//! Nothing here prints: progress goes to the `on_page` callback, the outcome to the [`Report`].

#[path = "paging.rs"]
pub mod paging;

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::join_all;
use http::header::RETRY_AFTER;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::RwLock;
use tower::retry::RetryLayer;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_auth_refresh::cache::DEFAULT_ADVISORY_WINDOW;
use tower_auth_refresh::oauth2::{
    self, genesys, nice_cxone, ClientAuth, ClientCredentials, Secret,
};
use tower_auth_refresh::retry::RetryPolicy;
use tower_auth_refresh::testkit::{Api, IdentityProvider, TokenRegistry};
use tower_auth_refresh::{AuthLayer, LocalStore, ReplayBody, TokenCache, TokenStore};

use paging::{Paging, Position, Preset, Style};

/// How the job runs. The embedded servers' settings are ignored by [`run_platform`].
#[derive(Clone, Debug)]
pub struct JobConfig {
    /// Records the embedded API serves.
    pub records: usize,
    /// Records per page (embedded API).
    pub page_size: usize,
    /// How long the embedded identity provider's tokens live, announced in `expires_in`.
    pub token_lifetime: Duration,
    /// How long the embedded API takes to answer each request.
    pub latency: Duration,
    /// The embedded API answers every n-th request with 429 (0: never).
    pub throttle_every: usize,
    /// The `Retry-After` (seconds) of the embedded API's 429s.
    pub retry_after: u64,
    /// Pages (from 0) at which the embedded API forgets every token it issued. Each revocation
    /// waits until no request is in flight and no token refresh is running, so each one costs
    /// exactly one token request and fails no page.
    pub revoke_at: Vec<usize>,
    /// Worker tasks, each fetching one page at a time; also the concurrency limit.
    pub concurrency: usize,
    /// Requests per second, through `buffer` + `rate_limit` (`None`: no rate limit).
    pub rate: Option<u64>,
    /// The outermost timeout of one page: retries, refresh and replay included.
    pub timeout: Duration,
    /// Retries per page after 429 or 503.
    pub max_retries: u32,
    /// The longest `Retry-After` slept on; a 429 asking for more is handed back (a failure).
    pub max_retry_after: Duration,
    /// The job run against the embedded API: its pagination style and end marker.
    pub preset: Preset,
    /// Requests a minute made with one token, at most, through `buffer` +
    /// `genesys::rate_limit` below the auth layer, so replays count too (`None`: no such
    /// limit). Genesys Cloud refuses more with 429s; [`genesys_per_token_limit`] is its default
    /// share for a process of a fleet.
    pub per_token_limit: Option<u64>,
}

/// The share of Genesys Cloud's per-token limit
/// ([`genesys::PER_TOKEN_REQUESTS_PER_MINUTE`]) of one of `workers` processes sharing a token:
/// they share one limit, so each keeps to its part of it.
pub fn genesys_per_token_limit(workers: usize) -> u64 {
    let workers = u64::try_from(workers.max(1)).unwrap_or(u64::MAX);
    (genesys::PER_TOKEN_REQUESTS_PER_MINUTE / workers).max(1)
}

impl Default for JobConfig {
    /// 20,000 records in pages of 100, tokens living 3 s, every 50th request throttled with
    /// `Retry-After: 1`, 250 ms per page, the tokens revoked once at the middle page, 4 workers
    /// under 200 requests per second: about 15 seconds.
    fn default() -> Self {
        let records = 20_000;
        let page_size = 100;
        Self {
            records,
            page_size,
            token_lifetime: Duration::from_secs(3),
            latency: Duration::from_millis(250),
            throttle_every: 50,
            retry_after: 1,
            revoke_at: vec![records.div_ceil(page_size) / 2],
            concurrency: 4,
            rate: Some(200),
            timeout: Duration::from_secs(30),
            max_retries: 3,
            max_retry_after: Duration::from_secs(60),
            preset: Preset::GenesysUsers,
            per_token_limit: None,
        }
    }
}

impl JobConfig {
    /// Pages of the embedded API that hold records: `records / page_size`, rounded up.
    pub fn pages(&self) -> usize {
        self.records.div_ceil(self.page_size.max(1))
    }
}

/// One page done, handed to `on_page` as soon as it is.
#[derive(Debug)]
pub struct Page {
    /// The page's index, from 0 (the n-th page asked for, in the cursor style).
    pub number: usize,
    /// The page's records (the array at the records pointer), or why the page failed (a
    /// status that is not a success, an error, an answer that is not JSON).
    pub result: Result<Vec<serde_json::Value>, String>,
    /// Records fetched so far, this page's included.
    pub records_so_far: usize,
    /// Pages there are in all, once an answer said (a page count) or a page came back empty.
    pub pages_known: Option<usize>,
    /// Token requests the cache has made so far.
    pub token_requests: u64,
    /// 401 replays so far.
    pub replays: u64,
    /// 429/503 retries so far.
    pub retries: u64,
}

impl Page {
    #[allow(dead_code)] // the fleet and tests/batch_job.rs read the records
    /// The page's records (none for a failed page).
    pub fn records(&self) -> impl Iterator<Item = &serde_json::Value> {
        self.result.as_deref().unwrap_or_default().iter()
    }
}

/// What the job did.
#[derive(Clone, Debug)]
pub struct Report {
    /// Where the pages came from (embedded: the first page's URL; platform: the URL pattern).
    pub api: String,
    /// The token endpoint asked.
    pub token_endpoint: String,
    /// Records fetched: the lengths of the pages' record arrays.
    pub records: usize,
    /// Records expected (embedded mode only).
    pub records_expected: Option<usize>,
    /// Pages asked for (with an end found from the answers, concurrent workers may ask for a
    /// few empty pages past it).
    pub pages: usize,
    /// Pages that did not come back with a success: must be 0.
    pub failures: usize,
    /// Wall time of the fetching (servers' start and token discovery excluded).
    pub elapsed: Duration,
    /// Worker tasks.
    pub concurrency: usize,
    /// Token requests the cache made (`auth.cache().stats()`).
    pub token_requests: u64,
    /// Token requests that failed.
    pub refresh_failures: u64,
    /// Requests replayed with a new token after a 401.
    pub replays: u64,
    /// 401s for an already replaced token, absorbed without a token request.
    pub stale_rejections: u64,
    /// 429/503 retries ([`RetryPolicy::retries`]).
    pub retries: u64,
    /// 429/503s handed back at once, their `Retry-After` being over the longest accepted wait
    /// ([`RetryPolicy::given_back`]).
    pub given_back: u64,
    /// What the embedded servers saw (embedded mode only).
    pub servers: Option<ServerCounts>,
}

impl Report {
    /// No page failed.
    pub fn succeeded(&self) -> bool {
        self.failures == 0
    }
}

/// What the embedded servers counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerCounts {
    /// Token requests that reached the identity provider.
    pub token_requests: usize,
    /// Requests that reached the API.
    pub api_requests: usize,
    /// 401s the API sent.
    pub unauthorized: usize,
    /// 429s the API sent.
    pub throttled: usize,
    /// Times the API forgot every token.
    pub revocations: usize,
}

/// The embedded identity provider and API, on loopback, sharing one token registry.
#[derive(Clone)]
pub struct Servers {
    /// The tokens the identity provider issued; the API checks them.
    pub registry: TokenRegistry,
    /// The identity provider: `POST /token`, client credentials.
    pub idp: IdentityProvider,
    /// The paginated API (`/users`, `/conversations/query`, `/agents`, `/items`).
    pub api: Api,
}

impl Servers {
    /// Start both with `config`'s token lifetime, records, latency and throttling.
    pub async fn start(config: &JobConfig) -> Self {
        let registry = TokenRegistry::default();
        let idp = IdentityProvider::start(registry.clone(), Some(config.token_lifetime)).await;
        let api = Api::start(registry.clone(), config.records).await;
        api.set_latency(config.latency);
        api.throttle_every(config.throttle_every);
        api.set_retry_after(&config.retry_after.to_string());
        Self { registry, idp, api }
    }

    /// How `preset`'s job walks the embedded API, `page_size` records a page.
    pub fn paging(&self, preset: Preset, page_size: usize) -> Paging {
        preset.paging(&self.api.url(preset.embedded_path()), page_size)
    }
}

/// Start the embedded servers and fetch every page from them.
pub async fn run_embedded(config: &JobConfig, on_page: impl Fn(&Page)) -> Result<Report, BoxError> {
    let servers = Servers::start(config).await;
    run_on(&servers, config, on_page).await
}

/// Fetch every page from servers started with [`Servers::start`], with client credentials over
/// HTTP on loopback (the crate's `oauth2::ClientCredentials`, as against a real platform).
pub async fn run_on(
    servers: &Servers,
    config: &JobConfig,
    on_page: impl Fn(&Page),
) -> Result<Report, BoxError> {
    let provider =
        ClientCredentials::builder(servers.idp.token_url(), "batch", "s3cr3t").build()?;
    let paging = servers.paging(config.preset, config.page_size.max(1));
    let registry = servers.registry.clone();
    let revocations = AtomicUsize::new(0);
    let revoke = || {
        registry.revoke_all();
        revocations.fetch_add(1, Ordering::SeqCst);
    };
    let disruption = Disruption {
        at_pages: &config.revoke_at,
        revoke: &revoke,
        token_lifetime: config.token_lifetime,
    };
    let mut report = run_pages(
        config,
        AuthLayer::new(provider),
        &paging,
        Shard::ALL,
        Some(disruption),
        &on_page,
    )
    .await?;
    report.api = paging.url.clone();
    report.token_endpoint = servers.idp.token_url();
    report.records_expected = Some(config.records);
    report.servers = Some(ServerCounts {
        token_requests: servers.idp.token_requests(),
        api_requests: servers.api.requests(),
        unauthorized: servers.api.rejected(),
        throttled: servers.api.throttled(),
        revocations: revocations.load(Ordering::SeqCst),
    });
    Ok(report)
}

/// A real platform: its API and its token endpoint, with client credentials.
#[derive(Clone, Debug)]
pub struct Platform {
    /// How its pages are walked: URL, method, body, style, records, end.
    pub paging: Paging,
    /// Where tokens come from.
    pub token_endpoint: TokenEndpoint,
    /// The OAuth client id.
    pub client_id: String,
    /// The OAuth client secret (redacted by `Debug`).
    pub client_secret: Secret,
    /// The `scope` to ask for.
    pub scope: Option<String>,
    /// How the client authenticates (default: HTTP Basic, or what discovery prefers).
    pub client_auth: Option<ClientAuth>,
}

/// Where a platform's tokens come from.
#[derive(Clone, Debug)]
pub enum TokenEndpoint {
    /// This token endpoint.
    Url(String),
    /// Genesys Cloud's, for a domain such as `mypurecloud.ie`.
    GenesysRegion(String),
    /// The one an OpenID provider's metadata names (NICE CXone: `https://cxone.niceincontact.com`).
    Issuer(String),
    /// NICE CXone's back-end flow: the token endpoint an issuer's metadata names (CXone's is
    /// [`nice_cxone::ISSUER`]), the password grant with an API user's access key and the
    /// client's id and secret, refresh tokens after that. An API URL that is only a path (such
    /// as `/inContactAPI/services/v31.0/agents`) is on the tenant's API, which the first token
    /// names ([`nice_cxone::tenant_api`]): the user need not know their cluster.
    CxoneAccessKey {
        /// The issuer, where discovery starts.
        issuer: String,
        /// The access key id (the username of the grant).
        key_id: String,
        /// The access key secret (the password of the grant; redacted by `Debug`).
        key_secret: Secret,
    },
}

/// Which pages one process of a fleet fetches: the page numbers (from 0) `index`,
/// `index + count`, `index + 2 * count`, ... Written and parsed as `index/count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    /// This process's place in the fleet, from 0.
    pub index: usize,
    /// Processes in the fleet, at least 1.
    pub count: usize,
}

impl Shard {
    /// Every page: a process on its own.
    pub const ALL: Self = Self { index: 0, count: 1 };

    /// This shard's page numbers among `pages` pages.
    pub fn pages(self, pages: usize) -> impl Iterator<Item = usize> {
        (self.index..pages).step_by(self.count.max(1))
    }
}

impl FromStr for Shard {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        let shard = value
            .split_once('/')
            .and_then(|(index, count)| Some((index.parse().ok()?, count.parse().ok()?)))
            .map(|(index, count)| Self { index, count })
            .filter(|shard| shard.index < shard.count);
        shard.ok_or_else(|| format!("`{value}` is not a shard such as 0/4 (index/count)"))
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// Ask `platform`'s token endpoint (found through discovery for an issuer) and fetch its pages.
pub async fn run_platform(
    config: &JobConfig,
    platform: &Platform,
    on_page: impl Fn(&Page),
) -> Result<Report, BoxError> {
    run_platform_shard(config, platform, Shard::ALL, LocalStore, on_page).await
}

/// [`run_platform`] for the pages of `shard` only, with the token cache getting its tokens
/// through `store` (a `RedisStore` in the fleet mode). The report counts this shard's pages.
pub async fn run_platform_shard(
    config: &JobConfig,
    platform: &Platform,
    shard: Shard,
    store: impl TokenStore,
    on_page: impl Fn(&Page),
) -> Result<Report, BoxError> {
    let (id, secret) = (platform.client_id.clone(), platform.client_secret.clone());
    if platform.paging.url.starts_with('/')
        && !matches!(
            platform.token_endpoint,
            TokenEndpoint::CxoneAccessKey { .. }
        )
    {
        return Err(format!(
            "the API URL {} is a path: only NICE CXone's access key (CXONE_ACCESS_KEY_ID) and \
             GENESYS_REGION say which host it is on",
            platform.paging.url
        )
        .into());
    }
    let (mut builder, token_endpoint) = match &platform.token_endpoint {
        TokenEndpoint::CxoneAccessKey {
            issuer,
            key_id,
            key_secret,
        } => {
            let access_key = nice_cxone::AccessKey::new(key_id.clone(), key_secret.clone());
            return run_cxone_shard(config, platform, issuer, access_key, shard, store, on_page)
                .await;
        }
        TokenEndpoint::Url(url) => (
            ClientCredentials::builder(url.clone(), id, secret),
            url.clone(),
        ),
        TokenEndpoint::GenesysRegion(domain) => {
            let region = genesys::Region::Domain(domain.clone());
            let url = region.token_url();
            (genesys::client_credentials(region, id, secret), url)
        }
        TokenEndpoint::Issuer(issuer) => {
            let metadata = oauth2::discover(issuer, &oauth2::default_transport(), false).await?;
            let url = metadata.token_endpoint.clone();
            (ClientCredentials::from_metadata(&metadata, id, secret), url)
        }
    };
    if let Some(scope) = &platform.scope {
        builder = builder.scope(scope.clone());
    }
    if let Some(auth) = platform.client_auth {
        builder = builder.auth_method(auth);
    }
    let auth = AuthLayer::builder(builder.build()?).store(store).build();
    let mut report = run_pages(config, auth, &platform.paging, shard, None, &on_page).await?;
    report.api = platform.paging.url.clone();
    report.token_endpoint = token_endpoint;
    Ok(report)
}

/// [`run_platform_shard`] for NICE CXone's access key: discovery at `issuer`, the password grant,
/// and an API URL that is a path resolved against the tenant's API after the first token.
async fn run_cxone_shard(
    config: &JobConfig,
    platform: &Platform,
    issuer: &str,
    access_key: nice_cxone::AccessKey,
    shard: Shard,
    store: impl TokenStore,
    on_page: impl Fn(&Page),
) -> Result<Report, BoxError> {
    let transport = oauth2::default_transport();
    let metadata = oauth2::discover(issuer, &transport, false).await?;
    let (id, secret) = (platform.client_id.clone(), platform.client_secret.clone());
    let mut builder = nice_cxone::access_key_grant(&metadata, id, secret, access_key)
        .transport(transport.clone());
    if let Some(scope) = &platform.scope {
        builder = builder.scope(scope.clone());
    }
    if let Some(auth) = platform.client_auth {
        builder = builder.auth_method(auth);
    }
    let auth = AuthLayer::builder(builder.build()?).store(store).build();
    let mut paging = platform.paging.clone();
    if paging.url.starts_with('/') {
        // The first token names the tenant, its configuration the API; the cache keeps the
        // token for the first pages.
        let token = auth.cache().token().await?;
        let api = nice_cxone::tenant_api(&transport, &metadata, &token).await?;
        paging.url = api.url(&paging.url);
    }
    let mut report = run_pages(config, auth, &paging, shard, None, &on_page).await?;
    report.api = paging.url;
    report.token_endpoint = metadata.token_endpoint;
    Ok(report)
}

/// Server-side revocations at known pages.
struct Disruption<'a> {
    at_pages: &'a [usize],
    revoke: &'a (dyn Fn() + Sync),
    /// The lifetime the identity provider gives its tokens.
    token_lifetime: Duration,
}

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// While the end is unknown, a worker stops asking for pages after this many failed in a row:
/// an API that fails every page (a wrong URL, a revoked client) must not be walked forever.
const FAILURES_IN_A_ROW: usize = 10;

/// Walk `paging`'s pages (those of `shard`) with `config.concurrency` workers through the whole
/// stack, `auth` adding the tokens, until the answers mark the end.
///
/// Page numbers and offsets are handed out to the workers in order; a page that comes back
/// without records, or an announced page count, sets the end, and no page past it is asked for
/// (pages already in flight come back empty). Cursors are followed one answer after the other.
async fn run_pages(
    config: &JobConfig,
    auth: AuthLayer,
    paging: &Paging,
    shard: Shard,
    disruption: Option<Disruption<'_>>,
    on_page: &dyn Fn(&Page),
) -> Result<Report, BoxError> {
    let cursor = paging.style == Style::Cursor;
    if cursor && shard.count > 1 {
        return Err(
            "cursor pages follow one another and cannot be shared out among workers".into(),
        );
    }
    let concurrency = if cursor { 1 } else { config.concurrency.max(1) };
    let https: Https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .build();
    let http = Client::builder(TokioExecutor::new()).build::<_, ReplayBody<Full<Bytes>>>(https);
    let policy = RetryPolicy::builder()
        // Every request of the job reads a page, a POST query included (the analytics details
        // query): a 429 or 503 says it was not acted on, so any method may be sent again.
        .retry_any_method(true)
        .max_retries(config.max_retries)
        .max_retry_after(config.max_retry_after)
        .build();
    // Below the auth layer, so that a replay after a 401 counts against the limit as well.
    let per_token_limit = match config.per_token_limit {
        Some(0) => return Err("the per-token limit must be at least 1 request a minute".into()),
        Some(per_minute) => Some(
            ServiceBuilder::new()
                .buffer(concurrency * 2)
                .layer(genesys::rate_limit(per_minute))
                .into_inner(),
        ),
        None => None,
    };
    let rate_limit = match config.rate {
        Some(0) => return Err("the rate limit must be at least 1 request per second".into()),
        Some(rate) => Some(
            ServiceBuilder::new()
                .buffer(concurrency * 2)
                .rate_limit(rate, Duration::from_secs(1))
                .into_inner(),
        ),
        None => None,
    };
    let service = ServiceBuilder::new()
        .timeout(config.timeout)
        .layer(RetryLayer::new(policy.clone()))
        .layer(auth.clone())
        .option_layer(rate_limit)
        .option_layer(per_token_limit)
        // The two sides of `option_layer` must fail alike; `Buffer` fails with a `BoxError`.
        .map_err(BoxError::from)
        .concurrency_limit(concurrency)
        .service(http);

    // Held for reading by every page in flight, for writing by a revocation.
    let gate = RwLock::new(());
    // Pages of this shard handed out so far.
    let handed_out = AtomicUsize::new(0);
    // No page index at or past this one is asked for.
    let end = AtomicUsize::new(paging.max_pages.unwrap_or(usize::MAX));
    let end_known = AtomicUsize::new(usize::MAX);
    let failed_in_a_row = AtomicUsize::new(0);
    let pages_asked = AtomicUsize::new(0);
    let records = AtomicUsize::new(0);
    let failures = AtomicUsize::new(0);
    let next_cursor = std::sync::Mutex::new(Some(Position::Cursor(None)));
    let started = Instant::now();

    // The next page to ask for, if any: an index for the page and skip styles, the cursor of
    // the last answer for the cursor style.
    let next_position = || -> Option<(usize, Position)> {
        if failed_in_a_row.load(Ordering::SeqCst) >= FAILURES_IN_A_ROW
            && end_known.load(Ordering::SeqCst) == usize::MAX
        {
            return None;
        }
        let k = handed_out.fetch_add(1, Ordering::SeqCst);
        let index = shard.index + k * shard.count.max(1);
        if index >= end.load(Ordering::SeqCst) {
            return None;
        }
        if cursor {
            let position = next_cursor.lock().ok()?.take()?;
            return Some((index, position));
        }
        Some((index, Position::Index(index)))
    };

    let worker = || async {
        while let Some((index, position)) = next_position() {
            let revoke = disruption
                .as_ref()
                .filter(|disruption| disruption.at_pages.contains(&index));
            let in_flight = match revoke {
                // With no request in flight, every request after the revocation carries the
                // current token; with no refresh running, the next token is issued after the
                // revocation. So it costs exactly one token request, and every request that
                // meets its 401 succeeds on the replay. The guard is downgraded, not dropped:
                // the next revocation waits until this page, which meets this one, is done.
                Some(disruption) => {
                    let quiet = gate.write().await;
                    young_token(auth.cache(), disruption.token_lifetime).await;
                    (disruption.revoke)();
                    quiet.downgrade()
                }
                None => gate.read().await,
            };
            pages_asked.fetch_add(1, Ordering::SeqCst);
            let result = match paging.request(&position) {
                Ok(request) => fetch(service.clone(), request).await,
                Err(error) => Err(error),
            };
            drop(in_flight);
            let result = result.and_then(|body| paging.parse(&body));
            let result = match result {
                Ok(parsed) => {
                    failed_in_a_row.store(0, Ordering::SeqCst);
                    let mut last = usize::MAX;
                    if parsed.records.is_empty() {
                        last = index;
                    }
                    if let Some(count) = parsed.page_count {
                        last = last.min(count);
                    }
                    if cursor {
                        match parsed.next {
                            Some(next) => {
                                if let Ok(mut slot) = next_cursor.lock() {
                                    *slot = Some(Position::Cursor(Some(next)));
                                }
                            }
                            None => last = last.min(index + 1),
                        }
                    }
                    if last != usize::MAX {
                        end.fetch_min(last, Ordering::SeqCst);
                        end_known.fetch_min(last, Ordering::SeqCst);
                    }
                    records.fetch_add(parsed.records.len(), Ordering::SeqCst);
                    Ok(parsed.records)
                }
                Err(error) => {
                    failures.fetch_add(1, Ordering::SeqCst);
                    failed_in_a_row.fetch_add(1, Ordering::SeqCst);
                    // Without the answer there is no next cursor: the walk ends here.
                    if cursor {
                        end.fetch_min(index, Ordering::SeqCst);
                    }
                    Err(error)
                }
            };
            let stats = auth.cache().stats();
            let known = end_known.load(Ordering::SeqCst);
            let page = Page {
                number: index,
                result,
                records_so_far: records.load(Ordering::SeqCst),
                pages_known: (known != usize::MAX).then(|| shard.pages(known).count()),
                token_requests: stats.token_requests,
                replays: stats.replays,
                retries: policy.retries(),
            };
            on_page(&page);
        }
    };
    join_all((0..concurrency).map(|_| worker())).await;

    let elapsed = started.elapsed();
    let stats = auth.cache().stats();
    Ok(Report {
        api: String::new(),
        token_endpoint: String::new(),
        records: records.into_inner(),
        records_expected: None,
        pages: pages_asked.into_inner(),
        failures: failures.into_inner(),
        elapsed,
        concurrency,
        token_requests: stats.token_requests,
        refresh_failures: stats.refresh_failures,
        replays: stats.replays,
        stale_rejections: stats.stale_rejections,
        retries: policy.retries(),
        given_back: policy.given_back(),
        servers: None,
    })
}

/// Wait (a bounded while) until the cache holds a token young enough that no background refresh
/// is due or running.
///
/// A revocation while a refresh is on its way back would revoke the token being issued as well:
/// the requests that met a 401 would be replayed with it, meet a second 401 and fail, since the
/// auth layer replays a request once. A real API revoking at a random moment can do that too; the
/// embedded one revokes when it cannot.
async fn young_token(cache: &TokenCache, lifetime: Duration) {
    // The advisory window of the cache's default options, for a token of this lifetime, and a
    // margin for the time between the token request and its answer.
    let advisory = DEFAULT_ADVISORY_WINDOW.min(lifetime / 2) + lifetime / 10;
    let give_up = tokio::time::Instant::now() + lifetime + Duration::from_secs(5);
    while tokio::time::Instant::now() < give_up {
        let expires_at = match cache.token().await {
            Ok(token) => token.expires_at(),
            Err(_) => Some(tokio::time::Instant::now()),
        };
        let Some(expires_at) = expires_at else {
            return;
        };
        if expires_at.saturating_duration_since(tokio::time::Instant::now()) > advisory {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One request through the stack: the body of a success (empty for a 204), or why there is none.
async fn fetch<S>(
    service: S,
    (method, url, body): (http::Method, String, Option<serde_json::Value>),
) -> Result<Bytes, String>
where
    S: Service<Request<Full<Bytes>>, Response = Response<Incoming>, Error = BoxError>,
{
    let mut request = Request::builder().method(method).uri(&url);
    let body = match body {
        Some(json) => {
            request = request.header(http::header::CONTENT_TYPE, "application/json");
            Full::from(json.to_string())
        }
        None => Full::default(),
    };
    let request = request
        .body(body)
        .map_err(|error| format!("{url}: {error}"))?;
    let response = service.oneshot(request).await.map_err(|error| {
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            message = format!("{message}: {cause}");
            source = cause.source();
        }
        message
    })?;
    let status = response.status();
    if !status.is_success() {
        return Err(match response.headers().get(RETRY_AFTER) {
            Some(wait) => format!("{status} (Retry-After: {})", wait.to_str().unwrap_or("?")),
            None => status.to_string(),
        });
    }
    if status == StatusCode::NO_CONTENT {
        return Ok(Bytes::new());
    }
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|error| format!("{status}, then reading the body failed: {error}"))?;
    Ok(body.to_bytes())
}
