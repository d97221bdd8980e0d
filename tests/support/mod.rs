//! Real servers on 127.0.0.1:0 for the integration tests and the batch example: an identity
//! provider that issues, expires and counts tokens, and an API that checks them.
//!
//! Both run on hyper in the caller's runtime, so a test with a paused clock drives token expiry
//! on both sides with `tokio::time::advance`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tower_auth_refresh::{provider_fn, ReplayBody, Token, TokenProvider};

/// Tokens the identity provider issued, with their server-side expiry, shared with the API.
#[derive(Clone, Default)]
pub struct TokenRegistry {
    tokens: Arc<Mutex<HashMap<String, Option<Instant>>>>,
    rejected: Arc<Mutex<std::collections::HashSet<String>>>,
}

impl TokenRegistry {
    fn issue(&self, token: String, expires_at: Option<Instant>) {
        self.lock().insert(token, expires_at);
    }

    /// How many distinct tokens the API turned away as expired (or unknown).
    pub fn rejected_tokens(&self) -> usize {
        self.rejected.lock().unwrap().len()
    }

    fn reject(&self, token: &str) {
        self.rejected.lock().unwrap().insert(token.to_owned());
    }

    /// Whether `token` was issued and has not expired.
    pub fn is_valid(&self, token: &str) -> bool {
        match self.lock().get(token) {
            Some(Some(expires_at)) => Instant::now() < *expires_at,
            Some(None) => true,
            None => false,
        }
    }

    /// The server-side expiry of every token still on record (`None`: never expires), earliest
    /// first.
    pub fn expiries(&self) -> Vec<Option<Instant>> {
        let mut expiries: Vec<_> = self.lock().values().copied().collect();
        expiries.sort();
        expiries
    }

    /// Expire every token now: the server-side expiry a client cannot foresee.
    pub fn revoke_all(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Option<Instant>>> {
        self.tokens.lock().unwrap()
    }
}

/// What the identity provider does with the next token requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdpMode {
    /// Issue a token.
    Issue,
    /// Answer 500.
    Fail,
    /// Never answer.
    Hang,
    /// Answer 200 with a body that is not a token response.
    Garbage,
    /// Answer 429 with `Retry-After: <seconds>`.
    Throttle(u64),
}

struct IdpState {
    registry: TokenRegistry,
    token_requests: AtomicUsize,
    ttl: Mutex<Option<Duration>>,
    announce_expiry: AtomicBool,
    mode: Mutex<IdpMode>,
    /// Each token request waits this long (test clock) before it is answered.
    latency: Mutex<Duration>,
}

/// An OAuth2-style token endpoint: `POST /token` answers
/// `{"access_token": "...", "token_type": "Bearer", "expires_in": <seconds>}`.
#[derive(Clone)]
pub struct IdentityProvider {
    addr: SocketAddr,
    state: Arc<IdpState>,
}

impl IdentityProvider {
    /// Start one whose tokens live `ttl` (server side), announced in `expires_in`.
    pub async fn start(registry: TokenRegistry, ttl: Option<Duration>) -> Self {
        let state = Arc::new(IdpState {
            registry,
            token_requests: AtomicUsize::new(0),
            ttl: Mutex::new(ttl),
            announce_expiry: AtomicBool::new(true),
            mode: Mutex::new(IdpMode::Issue),
            latency: Mutex::new(Duration::ZERO),
        });
        let handler_state = state.clone();
        let addr = serve(move |request| idp_handle(handler_state.clone(), request)).await;
        Self { addr, state }
    }

    pub fn token_url(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// Token requests that reached the endpoint, whatever the answer.
    pub fn token_requests(&self) -> usize {
        self.state.token_requests.load(Ordering::SeqCst)
    }

    pub fn set_mode(&self, mode: IdpMode) {
        *self.state.mode.lock().unwrap() = mode;
    }

    /// Whether `expires_in` is sent; without it, clients learn of expiry through 401s.
    pub fn announce_expiry(&self, announce: bool) {
        self.state.announce_expiry.store(announce, Ordering::SeqCst);
    }

    pub fn set_latency(&self, latency: Duration) {
        *self.state.latency.lock().unwrap() = latency;
    }

    /// How long the tokens issued from now on live (server side; `None`: forever).
    pub fn set_ttl(&self, ttl: Option<Duration>) {
        *self.state.ttl.lock().unwrap() = ttl;
    }
}

async fn idp_handle(
    state: Arc<IdpState>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.method() != http::Method::POST || request.uri().path() != "/token" {
        return Ok(respond(StatusCode::NOT_FOUND, "not found"));
    }
    let form = request.into_body().collect().await.map(|b| b.to_bytes());
    let n = state.token_requests.fetch_add(1, Ordering::SeqCst) + 1;
    let grant_ok = form.as_ref().is_ok_and(|form| {
        form.windows(29)
            .any(|w| w == b"grant_type=client_credentials")
    });
    if !grant_ok {
        return Ok(respond(
            StatusCode::BAD_REQUEST,
            r#"{"error":"unsupported_grant_type"}"#,
        ));
    }
    let latency = *state.latency.lock().unwrap();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let mode = *state.mode.lock().unwrap();
    match mode {
        IdpMode::Issue => {}
        IdpMode::Fail => {
            return Ok(respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                r#"{"error":"server_error"}"#,
            ))
        }
        IdpMode::Hang => std::future::pending::<()>().await,
        IdpMode::Garbage => return Ok(respond(StatusCode::OK, "<html>maintenance</html>")),
        IdpMode::Throttle(seconds) => {
            let mut response = respond(StatusCode::TOO_MANY_REQUESTS, r#"{"error":"slow_down"}"#);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(seconds));
            return Ok(response);
        }
    }
    let token = format!("token-{n}");
    let ttl = *state.ttl.lock().unwrap();
    state
        .registry
        .issue(token.clone(), ttl.map(|ttl| Instant::now() + ttl));
    let expires_in = match ttl {
        Some(ttl) if state.announce_expiry.load(Ordering::SeqCst) => {
            format!(r#","expires_in":{}"#, ttl.as_secs_f64())
        }
        _ => String::new(),
    };
    let body = format!(r#"{{"access_token":"{token}","token_type":"Bearer"{expires_in}}}"#);
    let mut response = respond(StatusCode::OK, body);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

/// Counters of what reached the API.
#[derive(Default)]
pub struct ApiCounters {
    /// Every request that reached the API.
    pub requests: AtomicUsize,
    /// Requests answered 401.
    pub rejected: AtomicUsize,
    /// Requests answered 429 (or 503, see [`Api::set_throttle_status`]).
    pub throttled: AtomicUsize,
    /// Requests that got a 200.
    pub served: AtomicUsize,
    /// Requests that arrived with an `Authorization` header, valid or not.
    pub with_authorization: AtomicUsize,
}

struct ApiState {
    registry: TokenRegistry,
    counters: ApiCounters,
    /// The next this many requests get 429 with `Retry-After: 1`.
    throttle_next: AtomicUsize,
    /// Each request takes this long (test clock) to answer.
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
    /// When each request arrived (test clock), in order.
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

/// An API that checks the bearer token on every request.
///
/// - `GET /contacts?page=N&size=M`: a page of records; `x-total-pages` says how many there are.
/// - `POST /echo`: the request body back.
/// - `POST /upload`: `/echo`, but the whole body (and its trailers, copied into the response
///   headers) is read before the token is checked.
/// - `POST /reject-early`: 401 at once, without reading the body.
/// - `GET /always-401`: 401 whatever the token.
/// - `GET /redirect?to=<url>`: 302 to `<url>`, whatever the token.
/// - anything else: 200 with the accepted token as the body.
///
/// A missing, unknown or expired token gets 401.
#[derive(Clone)]
pub struct Api {
    addr: SocketAddr,
    state: Arc<ApiState>,
}

impl Api {
    pub async fn start(registry: TokenRegistry, total_records: usize) -> Self {
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
        let addr = serve(move |request| api_handle(handler_state.clone(), request)).await;
        Self { addr, state }
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.addr, path_and_query)
    }

    pub fn counters(&self) -> &ApiCounters {
        &self.state.counters
    }

    pub fn requests(&self) -> usize {
        self.state.counters.requests.load(Ordering::SeqCst)
    }

    pub fn rejected(&self) -> usize {
        self.state.counters.rejected.load(Ordering::SeqCst)
    }

    pub fn served(&self) -> usize {
        self.state.counters.served.load(Ordering::SeqCst)
    }

    pub fn throttled(&self) -> usize {
        self.state.counters.throttled.load(Ordering::SeqCst)
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

    pub fn throttle_next(&self, requests: usize) {
        self.state.throttle_next.store(requests, Ordering::SeqCst);
    }

    pub fn set_latency(&self, latency: Duration) {
        *self.state.latency.lock().unwrap() = latency;
    }

    /// The `Retry-After` value of the 429s (default `1`); empty: no `Retry-After` at all.
    pub fn set_retry_after(&self, value: &str) {
        *self.state.retry_after.lock().unwrap() = value.to_owned();
    }

    /// Throttle with this status instead of 429 (503, say); counted as throttled all the same.
    pub fn set_throttle_status(&self, status: StatusCode) {
        *self.state.throttle_status.lock().unwrap() = status;
    }

    /// When each request arrived, on the test clock, in order of arrival.
    pub fn arrivals(&self) -> Vec<Instant> {
        self.state.arrivals.lock().unwrap().clone()
    }

    /// Answer every `n`-th request with 429 (0 turns it off).
    pub fn throttle_every(&self, n: usize) {
        self.state.throttle_every.store(n, Ordering::SeqCst);
    }

    /// Enforce a published rate limit: more than `limit` requests in a window of `per` (which
    /// starts with the first request after the last window ended) get 429.
    pub fn enforce_rate(&self, limit: usize, per: Duration) {
        *self.state.rate_limit.lock().unwrap() = Some(RateWindow {
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

fn over_published_limits(state: &ApiState, in_flight: usize) -> bool {
    let concurrency = state.concurrency_limit.load(Ordering::SeqCst);
    if concurrency > 0 && in_flight > concurrency {
        return true;
    }
    let mut rate = state.rate_limit.lock().unwrap();
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

async fn api_handle(
    state: Arc<ApiState>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let counters = &state.counters;
    state.arrivals.lock().unwrap().push(Instant::now());
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
        api_answer(&state, request).await
    };
    state.in_flight.fetch_sub(1, Ordering::SeqCst);
    let counter = match response.status() {
        StatusCode::UNAUTHORIZED => &counters.rejected,
        status if status == *state.throttle_status.lock().unwrap() => &counters.throttled,
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
    let mut response = api_answer(
        state,
        Request::from_parts(parts, Full::new(body.to_bytes())),
    )
    .await;
    if let Some(trailers) = trailers {
        response.headers_mut().extend(trailers);
    }
    response
}

async fn api_answer<B>(state: &ApiState, request: Request<B>) -> Response<Full<Bytes>>
where
    B: http_body::Body<Data = Bytes>,
{
    let latency = *state.latency.lock().unwrap();
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
        let mut response = respond(StatusCode::FOUND, Bytes::new());
        response
            .headers_mut()
            .insert(header::LOCATION, header::HeaderValue::from_str(to).unwrap());
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
        if size > 0 {
            let mut response = unauthorized();
            *response.body_mut() = Full::new(Bytes::from(vec![b'x'; size]));
            return response;
        }
        return unauthorized();
    };
    let token = token.to_owned();
    let throttled = state
        .throttle_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    let every = state.throttle_every.load(Ordering::SeqCst);
    let periodic = every > 0 && state.counters.requests.load(Ordering::SeqCst) % every == 0;
    if throttled || periodic {
        return too_many_requests(state);
    }
    match path.as_str() {
        "/echo" | "/upload" => match request.into_body().collect().await {
            Ok(body) => respond(StatusCode::OK, body.to_bytes()),
            Err(_) => respond(StatusCode::BAD_REQUEST, "body failed"),
        },
        "/contacts" => contacts_page(state, request.uri().query().unwrap_or("")),
        // Which token was accepted, so tests can tell the generations apart.
        _ => respond(StatusCode::OK, token),
    }
}

fn contacts_page(state: &ApiState, query: &str) -> Response<Full<Bytes>> {
    let param = |name: &str| {
        query
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(key, _)| *key == name)
            .and_then(|(_, value)| value.parse::<usize>().ok())
    };
    let page = param("page").unwrap_or(0);
    let size = param("size").unwrap_or(100).max(1);
    let pages = state.total_records.div_ceil(size);
    let first = (page * size).min(state.total_records);
    let last = ((page + 1) * size).min(state.total_records);
    let body: String = (first..last).map(|i| format!("contact-{i}\n")).collect();
    let mut response = respond(StatusCode::OK, body);
    response.headers_mut().insert(
        "x-total-pages",
        header::HeaderValue::from_str(&pages.to_string()).unwrap(),
    );
    response
}

fn too_many_requests(state: &ApiState) -> Response<Full<Bytes>> {
    let status = *state.throttle_status.lock().unwrap();
    let mut response = respond(status, "slow down");
    let retry_after = state.retry_after.lock().unwrap().clone();
    if retry_after.is_empty() {
        return response;
    }
    response.headers_mut().insert(
        header::RETRY_AFTER,
        header::HeaderValue::from_str(&retry_after).unwrap(),
    );
    response
}

fn unauthorized() -> Response<Full<Bytes>> {
    let mut response = respond(StatusCode::UNAUTHORIZED, "invalid or expired token");
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static(r#"Bearer error="invalid_token""#),
    );
    response
}

fn respond(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
}

/// Serve `handler` over HTTP/1 and HTTP/2 on a fresh loopback port, until the runtime ends.
async fn serve<H, F>(handler: H) -> SocketAddr
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(handler);
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// The client every test drives: hyper-util's legacy client, with the body type `AuthLayer`
/// hands down.
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

/// A token provider that asks `idp` over HTTP (client credentials) and reads its JSON answer.
pub fn http_provider(idp: &IdentityProvider) -> impl TokenProvider {
    http_provider_at(idp.token_url())
}

/// [`http_provider`] for an identity provider at `url`, possibly in another process.
pub fn http_provider_at(url: String) -> impl TokenProvider {
    let http: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    provider_fn(move || {
        let http = http.clone();
        let url = url.clone();
        async move {
            let request = Request::post(url)
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Full::from(
                    "grant_type=client_credentials&client_id=batch&client_secret=s3cr3t",
                ))?;
            let response = http.request(request).await?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|value| value.to_str().ok()?.parse().ok())
                .map(Duration::from_secs);
            let body = response.into_body().collect().await?.to_bytes();
            if status == StatusCode::TOO_MANY_REQUESTS {
                return Err(tower_auth_refresh::AuthError::Throttled {
                    status,
                    retry_after,
                }
                .into());
            }
            if !status.is_success() {
                return Err(format!("token endpoint answered {status}").into());
            }
            parse_token_response(&body)
        }
    })
}

/// Read `access_token` and `expires_in` from a token endpoint's JSON answer.
pub fn parse_token_response(body: &[u8]) -> Result<Token, tower::BoxError> {
    let json: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("token response is not JSON: {e}"))?;
    let access_token = json["access_token"]
        .as_str()
        .ok_or("token response has no access_token")?;
    let token = Token::new(access_token);
    Ok(match json["expires_in"].as_f64() {
        Some(seconds) => token.with_expires_in(Duration::from_secs_f64(seconds)),
        None => token,
    })
}

/// Read a response body to a string.
pub async fn body_string<B>(response: Response<B>) -> String
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// Freezes tokio's paused clock until the guard is dropped: time moves only when the test calls
/// `tokio::time::advance`.
///
/// With `start_paused`, tokio jumps the clock to the next timer whenever the runtime parks, even
/// while a socket read is in flight, so a 30 s refresh timeout would fire while the identity
/// provider's answer is still crossing loopback. A running blocking task inhibits that jump; this
/// guard keeps one running.
pub struct ManualClock {
    _release: std::sync::mpsc::Sender<()>,
}

pub fn manual_clock() -> ManualClock {
    let (release, released) = std::sync::mpsc::channel::<()>();
    tokio::task::spawn_blocking(move || {
        let _ = released.recv();
    });
    ManualClock { _release: release }
}

/// Yield until `condition` holds: lets loopback IO progress without moving the clock.
pub async fn until(mut condition: impl FnMut() -> bool) {
    for _ in 0..100_000 {
        if condition() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("condition never held");
}

/// Everything a tracing subscriber writes, for tests that check no secret is ever logged.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Captured {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Capture every event and span at TRACE level on this thread until the guard is dropped.
///
/// `tracing` caches each callsite's interest process-wide, computed when the callsite is first
/// hit. With one dispatcher registered, that is computed from the hitting thread's own
/// subscriber: a parallel test with none would cache "never" and blind this capture to the
/// crate's events. A second, inert dispatcher kept alive with the guard makes the cache ask
/// every live dispatcher instead (tracing-core's `Rebuilder::All`), this capture included.
pub fn capture_traces() -> (Captured, TraceGuard) {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(captured.clone())
        .finish();
    let anchor = tracing::Dispatch::new(tracing_subscriber::registry());
    let default = tracing::subscriber::set_default(subscriber);
    tracing::callsite::rebuild_interest_cache();
    (
        captured,
        TraceGuard {
            _default: default,
            _anchor: anchor,
        },
    )
}

/// Keeps a [`capture_traces`] capture installed.
pub struct TraceGuard {
    _default: tracing::subscriber::DefaultGuard,
    _anchor: tracing::Dispatch,
}
