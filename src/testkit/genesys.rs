//! A Genesys Cloud emulator: the client credentials token endpoint (HTTP Basic only, no refresh
//! token, lower-case `token_type`), the per-token request limit, the HIPAA idle timeout, and the
//! Platform API's two paging styles.
//!
//! - `POST /oauth/token`: `grant_type=client_credentials` with HTTP Basic client
//!   authentication answers `{"access_token": ..., "token_type": "bearer", "expires_in": ...}`;
//!   credentials as form fields get 401 `invalid_client`.
//! - Every `/api/v2/...` request needs a token that was issued, has not expired, and (with an
//!   idle timeout set) was used within the idle timeout; otherwise 401, and an idle token stays
//!   refused. Then the per-token limit: more than `per_token_limit` requests with one token in
//!   any 60 s get 429 with `Retry-After`.
//! - `GET /api/v2/users?pageSize=<n>&pageNumber=<k>` (from 1): `entities`, `pageCount`, `total`.
//! - `POST /api/v2/analytics/conversations/details/query` with `{"paging": {"pageSize": n,
//!   "pageNumber": k}}`: `conversations`, and no `conversations` at all past the last page.
//!
//! ```
//! use tower_auth_refresh::testkit::genesys::{Genesys, GenesysConfig};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! let genesys = Genesys::start(GenesysConfig::default()).await?;
//! assert!(genesys.token_url().ends_with("/oauth/token"));
//! assert_eq!(genesys.counts().token_requests, 0);
//! # Ok(())
//! # }
//! ```

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::server::{self, basic_credentials, field};

/// The window the per-token limit counts over.
const MINUTE: Duration = Duration::from_secs(60);

/// Who the emulator knows and what it enforces.
#[derive(Clone, Debug)]
pub struct GenesysConfig {
    /// The OAuth client's id. Default: `genesys-client`.
    pub client_id: String,
    /// The OAuth client's secret. Default: `genesys-client-secret`.
    pub client_secret: String,
    /// The token lifetime set on the OAuth client (300 s to 48 h at Genesys). Default: 86400 s.
    pub token_lifetime: Duration,
    /// The HIPAA idle timeout: a token unused this long is refused. Default: none (Genesys:
    /// 15 minutes in organisations with HIPAA settings).
    pub idle_timeout: Option<Duration>,
    /// Requests allowed with one token in any 60 s. Default: 300
    /// (`client.credentials.token.rate.per.minute`).
    pub per_token_limit: Option<usize>,
    /// How many users `GET /api/v2/users` lists. Default: 230.
    pub users: usize,
    /// How many conversations the details query finds. Default: 120.
    pub conversations: usize,
}

impl Default for GenesysConfig {
    fn default() -> Self {
        Self {
            client_id: "genesys-client".into(),
            client_secret: "genesys-client-secret".into(),
            token_lifetime: Duration::from_secs(86_400),
            idle_timeout: None,
            per_token_limit: Some(300),
            users: 230,
            conversations: 120,
        }
    }
}

/// What reached the emulator, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GenesysCounts {
    /// Token requests answered with a token.
    pub token_requests: usize,
    /// Token requests refused (`invalid_client`, `unauthorized_client`, ...).
    pub token_refused: usize,
    /// Requests to `/api/v2/...`, whatever the answer.
    pub api_requests: usize,
    /// API requests answered 401, whatever the reason.
    pub unauthorized: usize,
    /// Of those, tokens refused for being idle too long (each counted once).
    pub idle_timeouts: usize,
    /// API requests answered 429.
    pub throttled: usize,
}

struct State {
    config: GenesysConfig,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    counts: GenesysCounts,
    issued: usize,
    tokens: HashMap<String, Issued>,
    /// The next this many API requests get 429 with `Retry-After: 1`.
    throttle_next: usize,
}

struct Issued {
    expires_at: Instant,
    last_used: Instant,
    /// Accepted requests in the last minute, oldest first.
    recent: VecDeque<Instant>,
}

/// A running Genesys Cloud emulator. Clones share it.
#[derive(Clone)]
pub struct Genesys {
    addr: SocketAddr,
    state: Arc<State>,
}

impl Genesys {
    /// Start one on a fresh loopback port.
    pub async fn start(config: GenesysConfig) -> std::io::Result<Self> {
        let state = Arc::new(State {
            config,
            inner: Mutex::new(Inner::default()),
        });
        let handler_state = state.clone();
        let addr = server::serve(move |request| handle(&handler_state, request)).await?;
        Ok(Self { addr, state })
    }

    /// The token endpoint, `http://127.0.0.1:<port>/oauth/token`.
    pub fn token_url(&self) -> String {
        format!("http://{}/oauth/token", self.addr)
    }

    /// `path_and_query` on the emulated Platform API, such as `/api/v2/users?pageNumber=1`.
    pub fn api_url(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.addr, path_and_query)
    }

    /// The configuration it was started with.
    pub fn config(&self) -> &GenesysConfig {
        &self.state.config
    }

    /// What reached it so far.
    pub fn counts(&self) -> GenesysCounts {
        lock(&self.state.inner).counts
    }

    /// Answer the next `requests` API requests with 429 and `Retry-After: 1`, whatever the
    /// per-token limit says.
    pub fn throttle_next(&self, requests: usize) {
        lock(&self.state.inner).throttle_next = requests;
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn handle(state: &State, request: Request<Bytes>) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    if request.method() == Method::POST && path == "/oauth/token" {
        return token(state, &request);
    }
    if !path.starts_with("/api/v2/") {
        return server::json(StatusCode::NOT_FOUND, r#"{"message":"not found"}"#);
    }
    if let Some(refused) = admit(state, &request) {
        return refused;
    }
    match (request.method(), path) {
        (&Method::GET, "/api/v2/users") => users(state, &request),
        (&Method::POST, "/api/v2/analytics/conversations/details/query") => {
            conversations(state, &request)
        }
        _ => server::json(StatusCode::NOT_FOUND, r#"{"message":"not found"}"#),
    }
}

fn token(state: &State, request: &Request<Bytes>) -> Response<Full<Bytes>> {
    let config = &state.config;
    let form = String::from_utf8_lossy(request.body());
    let mut inner = lock(&state.inner);
    let authenticated = basic_credentials(request)
        .is_some_and(|(id, secret)| id == config.client_id && secret == config.client_secret);
    if !authenticated {
        inner.counts.token_refused += 1;
        return server::json(
            StatusCode::UNAUTHORIZED,
            r#"{"error":"invalid_client","description":"client authentication failed","error_description":"client authentication failed"}"#,
        );
    }
    if field(&form, "grant_type").as_deref() != Some("client_credentials") {
        inner.counts.token_refused += 1;
        return server::json(
            StatusCode::BAD_REQUEST,
            r#"{"error":"unauthorized_client","error_description":"client is not authorized to use this grant type"}"#,
        );
    }
    inner.counts.token_requests += 1;
    inner.issued += 1;
    let access_token = format!("genesys-token-{}", inner.issued);
    let now = Instant::now();
    inner.tokens.insert(
        access_token.clone(),
        Issued {
            expires_at: now + config.token_lifetime,
            last_used: now,
            recent: VecDeque::new(),
        },
    );
    let body = json!({
        "access_token": access_token,
        "token_type": "bearer",
        "expires_in": config.token_lifetime.as_secs(),
    });
    server::json(StatusCode::OK, body.to_string())
}

/// Count the request and check its token and the limits: `Some(answer)` if it is refused.
fn admit(state: &State, request: &Request<Bytes>) -> Option<Response<Full<Bytes>>> {
    let config = &state.config;
    let mut inner = lock(&state.inner);
    let inner = &mut *inner;
    inner.counts.api_requests += 1;
    let now = Instant::now();
    let Some((token, issued)) = server::bearer(request)
        .and_then(|token| Some(token).zip(inner.tokens.get_mut(token)))
        .filter(|(_, issued)| now < issued.expires_at)
    else {
        inner.counts.unauthorized += 1;
        return Some(server::invalid_token());
    };
    if config
        .idle_timeout
        .is_some_and(|idle| now >= issued.last_used + idle)
    {
        let token = token.to_owned();
        inner.tokens.remove(&token);
        inner.counts.unauthorized += 1;
        inner.counts.idle_timeouts += 1;
        return Some(server::invalid_token());
    }
    issued.last_used = now;
    if inner.throttle_next > 0 {
        inner.throttle_next -= 1;
        inner.counts.throttled += 1;
        return Some(server::too_many_requests(1));
    }
    if let Some(limit) = config.per_token_limit {
        while issued.recent.front().is_some_and(|at| *at + MINUTE <= now) {
            issued.recent.pop_front();
        }
        if issued.recent.len() >= limit {
            let wait = issued
                .recent
                .front()
                .map_or(MINUTE, |oldest| (*oldest + MINUTE) - now);
            inner.counts.throttled += 1;
            return Some(server::too_many_requests(wait.as_secs_f64().ceil() as u64));
        }
        issued.recent.push_back(now);
    }
    None
}

fn users(state: &State, request: &Request<Bytes>) -> Response<Full<Bytes>> {
    let total = state.config.users;
    let size = server::query_number(request, "pageSize")
        .unwrap_or(25)
        .clamp(1, 500);
    let number = server::query_number(request, "pageNumber")
        .unwrap_or(1)
        .max(1);
    let first = ((number - 1) * size).min(total);
    let entities: Vec<_> = (first..(first + size).min(total))
        .map(|i| json!({ "id": format!("user-{}", i + 1), "name": format!("User {}", i + 1) }))
        .collect();
    let body = json!({
        "entities": entities,
        "pageSize": size,
        "pageNumber": number,
        "total": total,
        "pageCount": total.div_ceil(size),
    });
    server::json(StatusCode::OK, body.to_string())
}

fn conversations(state: &State, request: &Request<Bytes>) -> Response<Full<Bytes>> {
    let query: Value = serde_json::from_slice(request.body()).unwrap_or(Value::Null);
    let paging = |name: &str| {
        query
            .get("paging")
            .and_then(|paging| paging.get(name))
            .and_then(Value::as_u64)
            .and_then(|n| usize::try_from(n).ok())
    };
    let size = paging("pageSize").unwrap_or(25).clamp(1, 100);
    let number = paging("pageNumber").unwrap_or(1).max(1);
    let total = state.config.conversations;
    let first = ((number - 1) * size).min(total);
    let page: Vec<_> = (first..(first + size).min(total))
        .map(|i| json!({ "conversationId": format!("conversation-{}", i + 1) }))
        .collect();
    let body = if page.is_empty() {
        // Genesys leaves `conversations` out of a page with none.
        json!({ "totalHits": total })
    } else {
        json!({ "conversations": page, "totalHits": total })
    };
    server::json(StatusCode::OK, body.to_string())
}
