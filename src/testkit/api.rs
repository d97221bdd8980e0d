//! An API on loopback that checks every bearer token against a [`TokenRegistry`], throttles on
//! demand, and serves one set of records through the pagination styles real platforms use.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::idp::TokenRegistry;
use super::server::serve_streaming as serve;
use crate::ReplayBody;

/// The claims `GET /needs-claims` asks for, before base64: the shape of Microsoft Entra's
/// continuous access evaluation challenge.
pub const CLAIMS_CHALLENGE: &str =
    r#"{"access_token":{"nbf":{"essential":true,"value":"1700000000"}}}"#;

/// Counters of what reached the API.
#[derive(Debug, Default)]
pub struct ApiCounters {
    /// Every request that reached the API.
    pub requests: AtomicUsize,
    /// Requests answered 401.
    pub rejected: AtomicUsize,
    /// Requests answered 429 (or 503, see [`Api::set_throttle_status`]).
    pub throttled: AtomicUsize,
    /// Requests that got any other answer (a 200, mostly).
    pub served: AtomicUsize,
    /// Requests that arrived with an `Authorization` header, valid or not.
    pub with_authorization: AtomicUsize,
    /// Records sent in the pages of the paginated endpoints (`/users`, `/conversations/query`,
    /// `/agents`, `/items`).
    pub records: AtomicUsize,
}

struct ApiState {
    registry: TokenRegistry,
    counters: ApiCounters,
    /// The next this many requests get 429 with `Retry-After: 1`.
    throttle_next: AtomicUsize,
    /// Each request takes this long (Tokio's clock) to answer.
    latency: Mutex<Duration>,
    total_records: usize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    /// The `Retry-After` value 429s carry.
    retry_after: Mutex<String>,
    /// Every n-th request gets a 429 (0: never).
    throttle_every: AtomicUsize,
    /// A published limit the API enforces with 429s: at most `n` requests per window.
    rate_limit: Mutex<Option<RateWindow>>,
    /// A published limit of requests in flight at once (0: none), enforced with 429s.
    concurrency_limit: AtomicUsize,
    /// The status throttled requests get (default 429).
    throttle_status: Mutex<StatusCode>,
    /// When each request arrived (Tokio's clock), in order.
    arrivals: Mutex<Vec<Instant>>,
    /// Bytes of body a 401 for a missing, unknown or expired token carries (0: a short text).
    rejection_body: AtomicUsize,
}

struct RateWindow {
    limit: usize,
    per: Duration,
    started: Instant,
    count: usize,
}

/// An API on `127.0.0.1` that checks the bearer token of every request against the tokens a
/// [`TokenRegistry`] holds: a missing, unknown or expired token gets 401 with
/// `WWW-Authenticate: Bearer error="invalid_token"`.
///
/// It serves `total_records` records, `{"id": <n>, "name": "record-<n>"}` for n from 0, in the
/// pagination styles of real platforms, so a batch job can be tested against each:
/// - `GET /users?pageSize=<n>&pageNumber=<k>` (k from 1; Genesys Cloud's users): `entities`,
///   `pageSize`, `pageNumber`, `total`, `pageCount`, and `nextUri` (a path and query) on every
///   page but the last. Past the last page, `entities` is empty.
/// - `POST /conversations/query` with `{"paging": {"pageSize": <n>, "pageNumber": <k>}}`
///   (Genesys Cloud's analytics details query): `conversations` and `totalHits`; past the last
///   page there is no `conversations` at all.
/// - `GET /agents?skip=<s>&top=<n>` (NICE CXone's agents): `agents` and `totalRecords`; past the
///   end, `agents` is empty.
/// - `GET /items?limit=<n>&cursor=<c>` (cursor pagination): `items`, and `cursor`, an opaque
///   string for the next page, on every page but the last. An unknown cursor gets 400.
///
/// And for the crate's own tests:
/// - `GET /contacts?page=N&size=M` (N from 0): a page of `contact-<n>` lines; `x-total-pages`
///   says how many pages there are.
/// - `POST /echo`: the request body back.
/// - `POST /upload`: `/echo`, but the whole body (and its trailers, copied into the response
///   headers) is read before the token is checked.
/// - `POST /reject-early`: 401 at once, without reading the body.
/// - `GET /always-401`: 401 whatever the token.
/// - `GET /needs-scope`: 401 with `WWW-Authenticate: Bearer error="insufficient_scope",
///   scope="admin"` for a valid token whose scope (the `scope` of its token request, see
///   [`TokenRegistry::scope_of`]) lacks `admin`; 200 with the token as the body for one that has
///   it. A missing or expired token gets the usual `invalid_token` 401.
/// - `GET /needs-scope-403`: the same, answered 403 as RFC 6750 section 3.1 says.
/// - `GET /needs-claims`: for a valid token issued without claims, 401 with
///   `WWW-Authenticate: Bearer error="insufficient_claims", claims="<base64>"`, the JSON
///   [`CLAIMS_CHALLENGE`] in standard base64 (the shape of Microsoft Entra's continuous access
///   evaluation); 200 with the token as the body for a token issued for a request that carried
///   `claims` ([`TokenRegistry::issued_with_claims`]). A `POST` to any of the three gets its
///   body back instead of the token, once the token is accepted.
/// - `GET /redirect?to=<url>`: 302 to `<url>`, whatever the token.
/// - anything else: 200 with the accepted token as the body.
///
/// Throttling ([`throttle_next`](Self::throttle_next), [`throttle_every`](Self::throttle_every),
/// [`enforce_rate`](Self::enforce_rate), [`enforce_concurrency`](Self::enforce_concurrency))
/// applies after the token check; [`counters`](Self::counters) count every answer.
///
/// ```
/// use tower_auth_refresh::testkit::{Api, TokenRegistry};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let api = Api::start(TokenRegistry::default(), 250).await;
/// let first_page = api.url("/users?pageSize=100&pageNumber=1");
/// assert!(first_page.starts_with("http://127.0.0.1:"));
/// assert_eq!(api.requests(), 0);
/// # }
/// ```
#[derive(Clone)]
pub struct Api {
    addr: SocketAddr,
    state: Arc<ApiState>,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("addr", &self.addr)
            .field("total_records", &self.state.total_records)
            .field("counters", &self.state.counters)
            .finish_non_exhaustive()
    }
}

impl Api {
    /// Start one that serves `total_records` records and accepts the tokens in `registry`.
    ///
    /// # Panics
    /// If no loopback port can be bound: a test cannot go on without its server. See
    /// [`try_start`](Self::try_start).
    pub async fn start(registry: TokenRegistry, total_records: usize) -> Self {
        match Self::try_start(registry, total_records).await {
            Ok(api) => api,
            Err(error) => panic!("the test API cannot listen on 127.0.0.1: {error}"),
        }
    }

    /// [`start`](Self::start), with the error of binding the loopback port.
    pub async fn try_start(registry: TokenRegistry, total_records: usize) -> std::io::Result<Self> {
        let state = Arc::new(ApiState {
            registry,
            counters: ApiCounters::default(),
            throttle_next: AtomicUsize::new(0),
            latency: Mutex::new(Duration::ZERO),
            total_records,
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            retry_after: Mutex::new("1".to_owned()),
            throttle_every: AtomicUsize::new(0),
            rate_limit: Mutex::new(None),
            concurrency_limit: AtomicUsize::new(0),
            rejection_body: AtomicUsize::new(0),
            throttle_status: Mutex::new(StatusCode::TOO_MANY_REQUESTS),
            arrivals: Mutex::new(Vec::new()),
        });
        let handler_state = state.clone();
        let addr = serve(move |request| handle(handler_state.clone(), request)).await?;
        Ok(Self { addr, state })
    }

    /// `http://127.0.0.1:<port>` followed by `path_and_query`.
    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.addr, path_and_query)
    }

    /// Every counter.
    pub fn counters(&self) -> &ApiCounters {
        &self.state.counters
    }

    /// Requests that reached the API.
    pub fn requests(&self) -> usize {
        self.state.counters.requests.load(Ordering::SeqCst)
    }

    /// Requests answered 401.
    pub fn rejected(&self) -> usize {
        self.state.counters.rejected.load(Ordering::SeqCst)
    }

    /// Requests answered neither 401 nor throttled.
    pub fn served(&self) -> usize {
        self.state.counters.served.load(Ordering::SeqCst)
    }

    /// Requests throttled (429, or the status of [`set_throttle_status`](Self::set_throttle_status)).
    pub fn throttled(&self) -> usize {
        self.state.counters.throttled.load(Ordering::SeqCst)
    }

    /// Records sent in pages of the paginated endpoints.
    pub fn records_served(&self) -> usize {
        self.state.counters.records.load(Ordering::SeqCst)
    }

    /// Requests that carried an `Authorization` header at all.
    pub fn with_authorization(&self) -> usize {
        self.state
            .counters
            .with_authorization
            .load(Ordering::SeqCst)
    }

    /// The most requests the API was serving at the same time.
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    /// Answer the next `requests` requests that carry a valid token with 429.
    pub fn throttle_next(&self, requests: usize) {
        self.state.throttle_next.store(requests, Ordering::SeqCst);
    }

    /// How long each request takes to be answered (default: no time).
    pub fn set_latency(&self, latency: Duration) {
        *lock(&self.state.latency) = latency;
    }

    /// The `Retry-After` value of the 429s (default `1`); empty: no `Retry-After` at all.
    pub fn set_retry_after(&self, value: &str) {
        *lock(&self.state.retry_after) = value.to_owned();
    }

    /// Throttle with this status instead of 429 (503, say); counted as throttled all the same.
    pub fn set_throttle_status(&self, status: StatusCode) {
        *lock(&self.state.throttle_status) = status;
    }

    /// When each request arrived, on Tokio's clock, in order of arrival.
    pub fn arrivals(&self) -> Vec<Instant> {
        lock(&self.state.arrivals).clone()
    }

    /// Answer every `n`-th request with 429 (0 turns it off).
    pub fn throttle_every(&self, n: usize) {
        self.state.throttle_every.store(n, Ordering::SeqCst);
    }

    /// Enforce a published rate limit: more than `limit` requests in a window of `per` (which
    /// starts with the first request after the last window ended) get 429.
    pub fn enforce_rate(&self, limit: usize, per: Duration) {
        *lock(&self.state.rate_limit) = Some(RateWindow {
            limit,
            per,
            started: Instant::now(),
            count: 0,
        });
    }

    /// Make every 401 for a bad token carry `bytes` of body, as an HTML error page would.
    pub fn set_rejection_body(&self, bytes: usize) {
        self.state.rejection_body.store(bytes, Ordering::SeqCst);
    }

    /// Enforce a limit of `limit` requests in flight at once with 429s.
    pub fn enforce_concurrency(&self, limit: usize) {
        self.state.concurrency_limit.store(limit, Ordering::SeqCst);
    }
}

/// A mutex's guard, poisoned or not: a test server's state stays readable after a panic
/// elsewhere.
pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn over_published_limits(state: &ApiState, in_flight: usize) -> bool {
    let concurrency = state.concurrency_limit.load(Ordering::SeqCst);
    if concurrency > 0 && in_flight > concurrency {
        return true;
    }
    let mut rate = lock(&state.rate_limit);
    let Some(window) = rate.as_mut() else {
        return false;
    };
    let now = Instant::now();
    if now >= window.started + window.per {
        window.started = now;
        window.count = 0;
    }
    window.count += 1;
    window.count > window.limit
}

async fn handle(
    state: Arc<ApiState>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let counters = &state.counters;
    lock(&state.arrivals).push(Instant::now());
    counters.requests.fetch_add(1, Ordering::SeqCst);
    if request.headers().contains_key(header::AUTHORIZATION) {
        counters.with_authorization.fetch_add(1, Ordering::SeqCst);
    }
    let now_in_flight = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state
        .max_in_flight
        .fetch_max(now_in_flight, Ordering::SeqCst);
    let response = if request.uri().path() == "/upload" {
        upload_answer(&state, request).await
    } else {
        answer(&state, request, now_in_flight).await
    };
    state.in_flight.fetch_sub(1, Ordering::SeqCst);
    let throttle_status = *lock(&state.throttle_status);
    let counter = match response.status() {
        StatusCode::UNAUTHORIZED => &counters.rejected,
        status if status == throttle_status => &counters.throttled,
        StatusCode::TOO_MANY_REQUESTS => &counters.throttled,
        _ => &counters.served,
    };
    counter.fetch_add(1, Ordering::SeqCst);
    Ok(response)
}

/// `POST /upload`: reads the whole body, trailers included, before it checks the token, as an
/// API that authenticates after buffering does; answers like `/echo`, with the trailers it
/// received copied into the response headers.
async fn upload_answer(state: &ApiState, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let Ok(body) = body.collect().await else {
        return respond(StatusCode::BAD_REQUEST, "body failed");
    };
    let trailers = body.trailers().cloned();
    let in_flight = state.in_flight.load(Ordering::SeqCst);
    let mut response = answer(
        state,
        Request::from_parts(parts, Full::new(body.to_bytes())),
        in_flight,
    )
    .await;
    if let Some(trailers) = trailers {
        response.headers_mut().extend(trailers);
    }
    response
}

async fn answer<B>(state: &ApiState, request: Request<B>, in_flight: usize) -> Response<Full<Bytes>>
where
    B: http_body::Body<Data = Bytes>,
{
    let latency = *lock(&state.latency);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let path = request.uri().path().to_owned();
    if path == "/reject-early" || path == "/always-401" {
        return unauthorized();
    }
    if path == "/redirect" {
        // `/redirect?to=<url>`: a 302 to wherever `to` says, as a pre-signed download would.
        let to = request
            .uri()
            .query()
            .and_then(|query| query.strip_prefix("to="))
            .unwrap_or("/");
        let Ok(location) = HeaderValue::from_str(to) else {
            return respond(StatusCode::BAD_REQUEST, "`to` is not a header value");
        };
        let mut response = respond(StatusCode::FOUND, Bytes::new());
        response.headers_mut().insert(header::LOCATION, location);
        return response;
    }
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    let Some(token) = token.filter(|token| state.registry.is_valid(token)) else {
        if let Some(token) = token {
            state.registry.reject(token);
        }
        let size = state.rejection_body.load(Ordering::SeqCst);
        let mut response = unauthorized();
        if size > 0 {
            *response.body_mut() = Full::new(Bytes::from(vec![b'x'; size]));
        }
        return response;
    };
    if path == "/needs-scope" || path == "/needs-scope-403" {
        let has_admin = state
            .registry
            .scope_of(token)
            .is_some_and(|scope| scope.split(' ').any(|scope| scope == "admin"));
        if !has_admin {
            // A valid token that lacks the scope this resource wants (RFC 6750 section 3.1),
            // sent as a 401 the way some APIs do, or as the 403 the RFC says.
            let status = if path == "/needs-scope" {
                StatusCode::UNAUTHORIZED
            } else {
                StatusCode::FORBIDDEN
            };
            let mut response = respond(status, "insufficient scope");
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"Bearer error="insufficient_scope", scope="admin""#),
            );
            return response;
        }
    }
    if path == "/needs-claims" && !state.registry.issued_with_claims(token) {
        // A valid token issued before a policy change (continuous access evaluation): the API
        // asks for a new one that satisfies these claims.
        let challenge = format!(
            r#"Bearer realm="", error="insufficient_claims", claims="{}""#,
            crate::oauth2::form::base64(CLAIMS_CHALLENGE.as_bytes())
        );
        let mut response = respond(StatusCode::UNAUTHORIZED, "insufficient claims");
        if let Ok(value) = HeaderValue::from_str(&challenge) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, value);
        }
        return response;
    }
    let token = token.to_owned();
    let throttled = state
        .throttle_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    let every = state.throttle_every.load(Ordering::SeqCst);
    let periodic = every > 0 && state.counters.requests.load(Ordering::SeqCst) % every == 0;
    if throttled || periodic || over_published_limits(state, in_flight) {
        return too_many_requests(state);
    }
    let query = request.uri().query().unwrap_or("").to_owned();
    match path.as_str() {
        "/echo" | "/upload" => echo(request).await,
        "/needs-scope" | "/needs-scope-403" | "/needs-claims"
            if request.method() == http::Method::POST =>
        {
            echo(request).await
        }
        "/contacts" => contacts_page(state, &query),
        "/users" => users_page(state, &query),
        "/conversations/query" => match request.into_body().collect().await {
            Ok(body) => conversations_page(state, &body.to_bytes()),
            Err(_) => respond(StatusCode::BAD_REQUEST, "body failed"),
        },
        "/agents" => agents_page(state, &query),
        "/items" => items_page(state, &query),
        // Which token was accepted, so tests can tell the generations apart.
        _ => respond(StatusCode::OK, token),
    }
}

/// The request's body back.
async fn echo<B>(request: Request<B>) -> Response<Full<Bytes>>
where
    B: http_body::Body<Data = Bytes>,
{
    match request.into_body().collect().await {
        Ok(body) => respond(StatusCode::OK, body.to_bytes()),
        Err(_) => respond(StatusCode::BAD_REQUEST, "body failed"),
    }
}

/// The value of `name` in a query string, as a number.
fn param(query: &str, name: &str) -> Option<usize> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .and_then(|(_, value)| value.parse::<usize>().ok())
}

fn contacts_page(state: &ApiState, query: &str) -> Response<Full<Bytes>> {
    let page = param(query, "page").unwrap_or(0);
    let size = param(query, "size").unwrap_or(100).max(1);
    let pages = state.total_records.div_ceil(size);
    let first = page.saturating_mul(size).min(state.total_records);
    let last = first.saturating_add(size).min(state.total_records);
    let body: String = (first..last).map(|i| format!("contact-{i}\n")).collect();
    let mut response = respond(StatusCode::OK, body);
    response
        .headers_mut()
        .insert("x-total-pages", HeaderValue::from(pages));
    response
}

/// Records `skip .. skip + size` (as many as there are), counted as served.
fn records(state: &ApiState, skip: usize, size: usize) -> Vec<Value> {
    let first = skip.min(state.total_records);
    let last = skip.saturating_add(size).min(state.total_records);
    state
        .counters
        .records
        .fetch_add(last - first, Ordering::SeqCst);
    (first..last)
        .map(|n| json!({ "id": n, "name": format!("record-{n}") }))
        .collect()
}

/// `GET /users?pageSize=<n>&pageNumber=<k>`, Genesys Cloud's paging.
fn users_page(state: &ApiState, query: &str) -> Response<Full<Bytes>> {
    let size = param(query, "pageSize").unwrap_or(25).max(1);
    let number = param(query, "pageNumber").unwrap_or(1).max(1);
    let page_count = state.total_records.div_ceil(size);
    let entities = records(state, (number - 1).saturating_mul(size), size);
    let mut body = json!({
        "entities": entities,
        "pageSize": size,
        "pageNumber": number,
        "total": state.total_records,
        "pageCount": page_count,
    });
    if number < page_count {
        body["nextUri"] = json!(format!("/users?pageSize={size}&pageNumber={}", number + 1));
    }
    json_response(&body)
}

/// `POST /conversations/query`, paged by `paging.pageNumber` in the body.
fn conversations_page(state: &ApiState, body: &[u8]) -> Response<Full<Bytes>> {
    let Ok(query) = serde_json::from_slice::<Value>(body) else {
        return respond(StatusCode::BAD_REQUEST, "the query is not JSON");
    };
    let number = |name: &str, default: u64| query["paging"][name].as_u64().unwrap_or(default);
    let size = usize::try_from(number("pageSize", 100))
        .unwrap_or(usize::MAX)
        .max(1);
    let page = usize::try_from(number("pageNumber", 1))
        .unwrap_or(usize::MAX)
        .max(1);
    let conversations = records(state, (page - 1).saturating_mul(size), size);
    let mut body = json!({ "totalHits": state.total_records });
    // Past the last page, Genesys leaves `conversations` out rather than sending it empty.
    if !conversations.is_empty() {
        body["conversations"] = Value::Array(conversations);
    }
    json_response(&body)
}

/// `GET /agents?skip=<s>&top=<n>`, NICE CXone's paging.
fn agents_page(state: &ApiState, query: &str) -> Response<Full<Bytes>> {
    let skip = param(query, "skip").unwrap_or(0);
    let top = param(query, "top").unwrap_or(100).max(1);
    let agents = records(state, skip, top);
    json_response(&json!({ "totalRecords": state.total_records, "agents": agents }))
}

/// `GET /items?limit=<n>&cursor=<c>`: an opaque cursor to the next page.
fn items_page(state: &ApiState, query: &str) -> Response<Full<Bytes>> {
    let limit = param(query, "limit").unwrap_or(100).max(1);
    let cursor = query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == "cursor")
        .map(|(_, value)| value);
    let skip = match cursor {
        None | Some("") => 0,
        Some(cursor) => match cursor
            .strip_prefix("after-")
            .and_then(|hex| usize::from_str_radix(hex, 16).ok())
        {
            Some(skip) => skip,
            None => return respond(StatusCode::BAD_REQUEST, "unknown cursor"),
        },
    };
    let items = records(state, skip, limit);
    let next = skip.saturating_add(limit);
    let mut body = json!({ "items": items });
    if next < state.total_records {
        body["cursor"] = json!(format!("after-{next:x}"));
    }
    json_response(&body)
}

fn json_response(body: &Value) -> Response<Full<Bytes>> {
    let mut response = respond(StatusCode::OK, body.to_string());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn too_many_requests(state: &ApiState) -> Response<Full<Bytes>> {
    let status = *lock(&state.throttle_status);
    let mut response = respond(status, "slow down");
    let retry_after = lock(&state.retry_after).clone();
    if let Ok(value) = HeaderValue::from_str(&retry_after) {
        if !retry_after.is_empty() {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
    }
    response
}

fn unauthorized() -> Response<Full<Bytes>> {
    let mut response = respond(StatusCode::UNAUTHORIZED, "invalid or expired token");
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(r#"Bearer error="invalid_token""#),
    );
    response
}

pub(super) fn respond(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
}

/// A hyper-util client for plain HTTP with the body type [`AuthLayer`](crate::AuthLayer) hands
/// down: the service to put under the layer in a test.
pub fn client<B>() -> Client<HttpConnector, ReplayBody<B>>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    Client::builder(TokioExecutor::new()).build_http()
}

/// [`client`] speaking HTTP/2 only (prior knowledge over plain TCP), for what differs between
/// the protocols: how far a request body is polled, and trailers.
pub fn client_h2<B>() -> Client<HttpConnector, ReplayBody<B>>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}
