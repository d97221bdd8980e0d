//! A strict RFC 6749 authorization server on 127.0.0.1:0, for the `oauth2` integration tests.
//!
//! - `POST /token`: the token endpoint. It checks exactly what RFC 6749 requires: the method,
//!   the form content type, a properly form-decoded body without repeated parameters, a
//!   `grant_type`, and one client authentication method (HTTP Basic with form-encoded id and
//!   secret, section 2.3.1, or `client_id`/`client_secret` form fields), the one the client is
//!   registered for. It serves `client_credentials` and `refresh_token` with rotation: every
//!   refresh issues a new refresh token and invalidates the one it used.
//! - `GET /.well-known/openid-configuration` and `GET /.well-known/oauth-authorization-server`:
//!   metadata, each path configurable (correct, missing, lying).
//! - `GET /api`: a tiny API that accepts only a current, unexpired access token.
//!
//! Tests queue [`Fault`]s: each token request that passes the checks takes the next one and
//! answers with it instead of the normal answer, or delays the normal answer: [`Fault::Slow`]
//! before the server acts on it, [`Fault::SlowAnswer`] after (a refresh token already rotated). Everything is
//! counted, and every token request is logged (without the client secret).
//!
//! Token expiry on the server follows tokio's clock, so a test on a paused clock drives the
//! server and the client with `tokio::time::advance`. JWT `exp` claims and HTTP-dates follow
//! the system clock, as real servers do.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::time::Instant;

/// A confidential client registered for HTTP Basic. Id and secret need form-encoding.
pub const BASIC_ID: &str = "batch client";
pub const BASIC_SECRET: &str = "b@tch s3cret/+&=";
/// A confidential client registered for `client_secret_post`. The literal `%20` catches a
/// client (or server) that decodes twice.
pub const POST_ID: &str = "post:client&co";
pub const POST_SECRET: &str = "p@st s3cret%20+/=?#";
/// A public client: identifies itself with `client_id` only.
pub const PUBLIC_ID: &str = "public client";

/// How a client authenticates at the token endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthUsed {
    /// `Authorization: Basic` (`client_secret_basic`).
    Basic,
    /// `client_id` and `client_secret` form fields (`client_secret_post`).
    Post,
    /// `client_id` only: a public client.
    ClientIdOnly,
    /// Nothing that identifies a client.
    Nothing,
}

/// What the next token request gets instead of the normal answer.
#[derive(Clone, Debug)]
pub enum Fault {
    /// An RFC 6749 section 5.2 error response.
    Error {
        status: StatusCode,
        code: String,
        description: Option<String>,
        uri: Option<String>,
    },
    /// 429 with `Retry-After: <seconds>`.
    TooManyRequests { retry_after_secs: u64 },
    /// 503 with `Retry-After: <HTTP-date>`.
    Unavailable { retry_at: SystemTime },
    /// This status and body, as JSON or not.
    Raw { status: StatusCode, body: String },
    /// A token is issued, and the JSON answer carrying it is cut short after the token.
    TruncatedToken,
    /// 302 to `location`.
    Redirect { location: String },
    /// Sleep this long (tokio clock), then answer normally.
    Slow(Duration),
    /// Answer normally at once (a refresh token is rotated, a token issued), then hold the
    /// answer back this long (tokio clock): the server has committed, the client does not know.
    SlowAnswer(Duration),
    /// A token without `expires_in` whose access token is an unsigned JWT with
    /// `exp = now + lifetime`.
    Jwt { lifetime: Duration },
    /// A token of this `token_type`.
    TokenType(String),
    /// A valid token response padded beyond 64 KiB.
    Oversized,
}

impl Fault {
    /// An RFC 6749 error response with description and uri.
    pub fn error(status: u16, code: &str, description: &str, uri: &str) -> Self {
        Fault::Error {
            status: StatusCode::from_u16(status).unwrap(),
            code: code.to_owned(),
            description: Some(description.to_owned()),
            uri: Some(uri.to_owned()),
        }
    }
}

/// A metadata document, as served at one of the two well-known paths.
#[derive(Clone, Debug)]
pub struct Metadata {
    pub issuer: String,
    pub token_endpoint: String,
    /// `None`: the field is left out.
    pub auth_methods: Option<Vec<String>>,
}

/// One token request as the server saw it. The client secret is not kept.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub auth: AuthUsed,
    pub client_id: Option<String>,
    pub grant_type: Option<String>,
    /// The decoded form fields, `client_secret` removed.
    pub form: BTreeMap<String, String>,
    pub content_type: Option<String>,
    pub accept: Option<String>,
    /// What the server answered.
    pub status: StatusCode,
}

impl Recorded {
    pub fn field(&self, name: &str) -> Option<&str> {
        self.form.get(name).map(String::as_str)
    }
}

struct RegisteredClient {
    secret: Option<String>,
    auth: AuthUsed,
}

struct State {
    addr: SocketAddr,
    /// The path of the issuer identifier (`""` or such as `/tenant-a`).
    issuer_path: String,
    clients: HashMap<String, RegisteredClient>,
    /// Live refresh tokens and the client each was issued to.
    refresh_tokens: HashMap<String, String>,
    /// Every refresh token issued, in order.
    issued_refresh_tokens: Vec<String>,
    /// Access tokens and their expiry (tokio clock), for `/api`.
    access_tokens: HashMap<String, Option<Instant>>,
    /// Every access token issued, in order.
    issued_access_tokens: Vec<String>,
    serial: usize,
    /// The `expires_in` of issued tokens; `None` leaves it out (and the token never expires).
    expires_in: Option<Duration>,
    /// Whether `client_credentials` answers carry a refresh token (RFC 6749 4.4.3 says they
    /// should not; some servers do).
    refresh_token_with_client_credentials: bool,
    faults: VecDeque<Fault>,
    /// Token requests by `grant_type` (`""` when there was none or the body was unreadable).
    by_grant: HashMap<String, usize>,
    token_requests: usize,
    log: Vec<Recorded>,
    openid: Option<Metadata>,
    oauth: Option<Metadata>,
    openid_requests: usize,
    oauth_requests: usize,
    /// Every `/.well-known/` path asked for, in order.
    well_known_paths: Vec<String>,
    api_requests: usize,
    api_rejected: usize,
}

/// The server. Cloning shares it.
#[derive(Clone)]
pub struct TokenServer {
    state: Arc<Mutex<State>>,
}

impl TokenServer {
    /// Start one with the three clients registered, tokens that live an hour, and correct
    /// metadata at both well-known paths.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut clients = HashMap::new();
        for (id, secret, auth) in [
            (BASIC_ID, Some(BASIC_SECRET), AuthUsed::Basic),
            (POST_ID, Some(POST_SECRET), AuthUsed::Post),
            (PUBLIC_ID, None, AuthUsed::ClientIdOnly),
        ] {
            clients.insert(
                id.to_owned(),
                RegisteredClient {
                    secret: secret.map(str::to_owned),
                    auth,
                },
            );
        }
        let server = Self {
            state: Arc::new(Mutex::new(State {
                addr,
                issuer_path: String::new(),
                clients,
                refresh_tokens: HashMap::new(),
                issued_refresh_tokens: Vec::new(),
                access_tokens: HashMap::new(),
                issued_access_tokens: Vec::new(),
                serial: 0,
                expires_in: Some(Duration::from_secs(3600)),
                refresh_token_with_client_credentials: false,
                faults: VecDeque::new(),
                by_grant: HashMap::new(),
                token_requests: 0,
                log: Vec::new(),
                openid: None,
                oauth: None,
                openid_requests: 0,
                oauth_requests: 0,
                well_known_paths: Vec::new(),
                api_requests: 0,
                api_rejected: 0,
            })),
        };
        let correct = server.metadata();
        server.set_discovery(Some(correct.clone()), Some(correct));
        let handler = server.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let handler = handler.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let handler = handler.clone();
                        async move { Ok::<_, Infallible>(handler.handle(request).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        server
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// `http://127.0.0.1:<port>`: the issuer.
    pub fn issuer(&self) -> String {
        let state = self.lock();
        format!("http://{}{}", state.addr, state.issuer_path)
    }

    /// Give the issuer identifier a path, such as `/tenant-a`. The metadata is then served
    /// where each specification puts it: OpenID Connect Discovery appends
    /// `/.well-known/openid-configuration` to the issuer, RFC 8414 (section 3.1) inserts
    /// `/.well-known/oauth-authorization-server` between the host and the path.
    pub fn set_issuer_path(&self, path: &str) {
        self.lock().issuer_path = path.to_owned();
    }

    /// `http://127.0.0.1:<port><path>`, whatever the issuer's path.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.lock().addr)
    }

    pub fn token_url(&self) -> String {
        self.url("/token")
    }

    /// The correct metadata document: this issuer, this token endpoint, both methods.
    pub fn metadata(&self) -> Metadata {
        Metadata {
            issuer: self.issuer(),
            token_endpoint: self.token_url(),
            auth_methods: Some(vec![
                "client_secret_basic".to_owned(),
                "client_secret_post".to_owned(),
            ]),
        }
    }

    /// What the two well-known paths serve; `None` is a 404.
    pub fn set_discovery(&self, openid: Option<Metadata>, oauth: Option<Metadata>) {
        let mut state = self.lock();
        state.openid = openid;
        state.oauth = oauth;
    }

    /// Requests to `/.well-known/openid-configuration` and `/.well-known/oauth-authorization-server`.
    pub fn discovery_requests(&self) -> (usize, usize) {
        let state = self.lock();
        (state.openid_requests, state.oauth_requests)
    }

    /// Every `/.well-known/` path asked for, in order, found or not.
    pub fn well_known_paths(&self) -> Vec<String> {
        self.lock().well_known_paths.clone()
    }

    /// The `expires_in` of tokens issued from now on (`None`: not sent, never expire).
    pub fn set_expires_in(&self, expires_in: Option<Duration>) {
        self.lock().expires_in = expires_in;
    }

    pub fn refresh_token_with_client_credentials(&self, include: bool) {
        self.lock().refresh_token_with_client_credentials = include;
    }

    pub fn push_fault(&self, fault: Fault) {
        self.lock().faults.push_back(fault);
    }

    /// Issue a refresh token to `client_id`, as an authorization-code exchange would have.
    pub fn issue_refresh_token(&self, client_id: &str) -> String {
        let mut state = self.lock();
        state.serial += 1;
        let token = format!("rt-{:04}-Qp3", state.serial);
        state
            .refresh_tokens
            .insert(token.clone(), client_id.to_owned());
        state.issued_refresh_tokens.push(token.clone());
        token
    }

    /// Revoke every refresh token: the next refresh gets `invalid_grant`.
    pub fn revoke_refresh_tokens(&self) {
        self.lock().refresh_tokens.clear();
    }

    /// Every refresh token issued, in order.
    pub fn issued_refresh_tokens(&self) -> Vec<String> {
        self.lock().issued_refresh_tokens.clone()
    }

    /// Every access token issued, in order.
    pub fn issued_access_tokens(&self) -> Vec<String> {
        self.lock().issued_access_tokens.clone()
    }

    /// Requests that reached `POST /token`, whatever the answer.
    pub fn token_requests(&self) -> usize {
        self.lock().token_requests
    }

    /// Token requests with this `grant_type`.
    pub fn grant_requests(&self, grant_type: &str) -> usize {
        self.lock().by_grant.get(grant_type).copied().unwrap_or(0)
    }

    /// Every token request answered so far, in order.
    pub fn log(&self) -> Vec<Recorded> {
        self.lock().log.clone()
    }

    pub fn last_request(&self) -> Recorded {
        self.lock()
            .log
            .last()
            .cloned()
            .expect("no token request yet")
    }

    /// Requests to `/api`, and how many were refused.
    pub fn api_requests(&self) -> (usize, usize) {
        let state = self.lock();
        (state.api_requests, state.api_rejected)
    }

    async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = request.uri().path().to_owned();
        match path.as_str() {
            "/token" => self.token_endpoint(request).await,
            _ if path.contains("/.well-known/") => self.well_known(&path, request.method()),
            "/api" => self.api(&request),
            _ => plain(StatusCode::NOT_FOUND, "not found"),
        }
    }

    fn well_known(&self, path: &str, method: &Method) -> Response<Full<Bytes>> {
        let mut state = self.lock();
        state.well_known_paths.push(path.to_owned());
        let issuer_path = state.issuer_path.clone();
        let document = if path == format!("{issuer_path}/.well-known/openid-configuration") {
            state.openid_requests += 1;
            state.openid.clone()
        } else if path == format!("/.well-known/oauth-authorization-server{issuer_path}") {
            state.oauth_requests += 1;
            state.oauth.clone()
        } else {
            None
        };
        if method != Method::GET {
            return method_not_allowed("GET");
        }
        let Some(document) = document else {
            return plain(StatusCode::NOT_FOUND, "no such document");
        };
        let mut body = json!({
            "issuer": document.issuer,
            "token_endpoint": document.token_endpoint,
            "grant_types_supported": ["client_credentials", "refresh_token"],
            "response_types_supported": ["code"],
        });
        if let Some(methods) = document.auth_methods {
            body["token_endpoint_auth_methods_supported"] = json!(methods);
        }
        json_response(StatusCode::OK, &body)
    }

    fn api(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        let mut state = self.lock();
        state.api_requests += 1;
        let token = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        let valid = request.method() == Method::GET
            && token.is_some_and(|token| match state.access_tokens.get(token) {
                Some(Some(expires_at)) => Instant::now() < *expires_at,
                Some(None) => true,
                None => false,
            });
        if !valid {
            state.api_rejected += 1;
            let mut response = plain(StatusCode::UNAUTHORIZED, "invalid or expired token");
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"Bearer error="invalid_token""#),
            );
            return response;
        }
        plain(StatusCode::OK, "ok")
    }

    async fn token_endpoint(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let (parts, body) = request.into_parts();
        let body = body.collect().await.map(|body| body.to_bytes());
        let mut record = Recorded {
            auth: AuthUsed::Nothing,
            client_id: None,
            grant_type: None,
            form: BTreeMap::new(),
            content_type: header_text(&parts.headers, header::CONTENT_TYPE),
            accept: header_text(&parts.headers, header::ACCEPT),
            status: StatusCode::OK,
        };
        let form = body
            .map_err(|_| "the body could not be read".to_owned())
            .and_then(|body| form_decode(&body));
        // Counted on arrival, before any fault (a slow answer) or check.
        {
            let mut state = self.lock();
            state.token_requests += 1;
            let grant = form
                .as_ref()
                .ok()
                .and_then(|pairs| pairs.iter().find(|(name, _)| name == "grant_type"))
                .map(|(_, value)| value.clone())
                .unwrap_or_default();
            *state.by_grant.entry(grant).or_default() += 1;
        }
        let response = self
            .token_answer(&parts.method, &parts.headers, form, &mut record)
            .await;
        record.status = response.status();
        self.lock().log.push(record);
        response
    }

    async fn token_answer(
        &self,
        method: &Method,
        headers: &HeaderMap,
        form: Result<Vec<(String, String)>, String>,
        record: &mut Recorded,
    ) -> Response<Full<Bytes>> {
        // RFC 6749 3.2: POST only.
        if method != Method::POST {
            return method_not_allowed("POST");
        }
        // RFC 6749 4.4.2 / 6: application/x-www-form-urlencoded.
        let form_type = record.content_type.as_deref().is_some_and(|value| {
            value
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
        if !form_type {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "the body must be application/x-www-form-urlencoded",
            );
        }
        let pairs = match form {
            Ok(pairs) => pairs,
            Err(why) => return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", &why),
        };
        // RFC 6749 3.2: no parameter more than once; one sent without a value is omitted.
        let mut fields = BTreeMap::new();
        for (name, value) in pairs {
            if fields.contains_key(&name) {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    &format!("parameter {name} repeated"),
                );
            }
            if !value.is_empty() {
                fields.insert(name, value);
            }
        }
        let client_secret = fields.remove("client_secret");
        record.form = fields.clone();
        record.grant_type = fields.get("grant_type").cloned();
        let Some(grant_type) = record.grant_type.clone() else {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "grant_type is missing",
            );
        };

        // RFC 6749 2.3.1: one client authentication method.
        let basic = match headers.get(header::AUTHORIZATION) {
            None => None,
            Some(value) => match parse_basic(value) {
                Some(credentials) => Some(credentials),
                None => {
                    record.auth = AuthUsed::Basic;
                    return invalid_client(true, "unreadable Basic credentials");
                }
            },
        };
        let (auth, client_id, secret) = match (basic, client_secret) {
            (Some(_), Some(_)) => {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "more than one client authentication method",
                )
            }
            (Some((id, secret)), None) => {
                if fields.get("client_id").is_some_and(|field| *field != id) {
                    return oauth_error(
                        StatusCode::BAD_REQUEST,
                        "invalid_request",
                        "client_id differs from the authenticated client",
                    );
                }
                (AuthUsed::Basic, id, Some(secret))
            }
            (None, Some(secret)) => match fields.get("client_id") {
                Some(id) => (AuthUsed::Post, id.clone(), Some(secret)),
                None => {
                    return oauth_error(
                        StatusCode::BAD_REQUEST,
                        "invalid_request",
                        "client_secret without client_id",
                    )
                }
            },
            (None, None) => match fields.get("client_id") {
                Some(id) => (AuthUsed::ClientIdOnly, id.clone(), None),
                None => return invalid_client(false, "no client authentication"),
            },
        };
        record.auth = auth;
        record.client_id = Some(client_id.clone());
        let basic_used = auth == AuthUsed::Basic;
        {
            let state = self.lock();
            let Some(client) = state.clients.get(&client_id) else {
                return invalid_client(basic_used, "unknown client");
            };
            if client.auth != auth {
                return invalid_client(
                    basic_used,
                    "not the authentication method this client is registered for",
                );
            }
            if client.secret != secret {
                return invalid_client(basic_used, "wrong client secret");
            }
        }

        let fault = self.lock().faults.pop_front();
        let lifetime = self.lock().expires_in;
        match fault {
            None => {}
            Some(Fault::Slow(wait)) => tokio::time::sleep(wait).await,
            Some(Fault::SlowAnswer(wait)) => {
                let answer = self.grant_answer(&grant_type, auth, &client_id, &fields, lifetime);
                tokio::time::sleep(wait).await;
                return answer;
            }
            Some(Fault::Error {
                status,
                code,
                description,
                uri,
            }) => {
                let mut body = json!({ "error": code });
                if let Some(description) = description {
                    body["error_description"] = json!(description);
                }
                if let Some(uri) = uri {
                    body["error_uri"] = json!(uri);
                }
                return json_response(status, &body);
            }
            Some(Fault::TooManyRequests { retry_after_secs }) => {
                let mut response = plain(StatusCode::TOO_MANY_REQUESTS, "slow down");
                response.headers_mut().insert(
                    header::RETRY_AFTER,
                    HeaderValue::from_str(&retry_after_secs.to_string()).unwrap(),
                );
                return response;
            }
            Some(Fault::Unavailable { retry_at }) => {
                let mut response = plain(StatusCode::SERVICE_UNAVAILABLE, "maintenance");
                response.headers_mut().insert(
                    header::RETRY_AFTER,
                    HeaderValue::from_str(&http_date(retry_at)).unwrap(),
                );
                return response;
            }
            Some(Fault::Raw { status, body }) => return plain(status, body),
            Some(Fault::Redirect { location }) => {
                let mut response = plain(StatusCode::FOUND, "");
                response
                    .headers_mut()
                    .insert(header::LOCATION, HeaderValue::from_str(&location).unwrap());
                return response;
            }
            Some(Fault::TruncatedToken) => {
                let token = self.issue_access_token(lifetime);
                let body = format!(r#"{{"access_token":"{token}","token_type":"Bearer","expi"#);
                return plain(StatusCode::OK, body);
            }
            Some(Fault::Jwt { lifetime }) => {
                let token = self.issue_jwt(lifetime);
                return token_response(&json!({ "access_token": token, "token_type": "Bearer" }));
            }
            Some(Fault::TokenType(token_type)) => {
                let token = self.issue_access_token(lifetime);
                return token_response(&json!({
                    "access_token": token,
                    "token_type": token_type,
                    "expires_in": 3600,
                }));
            }
            Some(Fault::Oversized) => {
                let token = self.issue_access_token(lifetime);
                return token_response(&json!({
                    "access_token": token,
                    "token_type": "Bearer",
                    "expires_in": 3600,
                    "padding": "x".repeat(70 * 1024),
                }));
            }
        }

        self.grant_answer(&grant_type, auth, &client_id, &fields, lifetime)
    }

    /// The normal answer to a token request that passed the checks.
    fn grant_answer(
        &self,
        grant_type: &str,
        auth: AuthUsed,
        client_id: &str,
        fields: &BTreeMap<String, String>,
        lifetime: Option<Duration>,
    ) -> Response<Full<Bytes>> {
        match grant_type {
            "client_credentials" => {
                // RFC 6749 4.4: confidential clients only.
                if auth == AuthUsed::ClientIdOnly {
                    return oauth_error(
                        StatusCode::BAD_REQUEST,
                        "unauthorized_client",
                        "a public client cannot use client_credentials",
                    );
                }
                let with_refresh = self.lock().refresh_token_with_client_credentials;
                let refresh = with_refresh.then(|| self.issue_refresh_token(client_id));
                self.grant(lifetime, refresh, fields.get("scope"))
            }
            "refresh_token" => {
                let Some(used) = fields.get("refresh_token") else {
                    return oauth_error(
                        StatusCode::BAD_REQUEST,
                        "invalid_request",
                        "refresh_token is missing",
                    );
                };
                // Rotation: the used refresh token dies with this request.
                let owner = self.lock().refresh_tokens.remove(used);
                if owner.as_deref() != Some(client_id) {
                    return oauth_error(
                        StatusCode::BAD_REQUEST,
                        "invalid_grant",
                        "the refresh token is invalid, expired, revoked, or was issued to another client",
                    );
                }
                let refresh = self.issue_refresh_token(client_id);
                self.grant(lifetime, Some(refresh), fields.get("scope"))
            }
            _ => oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "only client_credentials and refresh_token",
            ),
        }
    }

    /// RFC 6749 5.1: a successful answer.
    fn grant(
        &self,
        lifetime: Option<Duration>,
        refresh_token: Option<String>,
        scope: Option<&String>,
    ) -> Response<Full<Bytes>> {
        let access_token = self.issue_access_token(lifetime);
        let mut body = json!({ "access_token": access_token, "token_type": "Bearer" });
        if let Some(lifetime) = lifetime {
            body["expires_in"] = if lifetime.subsec_nanos() == 0 {
                json!(lifetime.as_secs())
            } else {
                json!(lifetime.as_secs_f64())
            };
        }
        if let Some(refresh_token) = refresh_token {
            body["refresh_token"] = json!(refresh_token);
        }
        if let Some(scope) = scope {
            body["scope"] = json!(scope);
        }
        token_response(&body)
    }

    fn issue_access_token(&self, lifetime: Option<Duration>) -> String {
        let mut state = self.lock();
        state.serial += 1;
        let token = format!("at-{:04}-Zk7", state.serial);
        state.access_tokens.insert(
            token.clone(),
            lifetime.map(|lifetime| Instant::now() + lifetime),
        );
        state.issued_access_tokens.push(token.clone());
        token
    }

    fn issue_jwt(&self, lifetime: Duration) -> String {
        let mut state = self.lock();
        state.serial += 1;
        let exp = unix_seconds(SystemTime::now()) + lifetime.as_secs();
        let header = base64url(br#"{"alg":"none","typ":"JWT"}"#);
        let payload = base64url(
            format!(
                r#"{{"sub":"batch client","exp":{exp},"jti":"jwt-{:04}"}}"#,
                state.serial
            )
            .as_bytes(),
        );
        // Unsigned (`alg: none`): an empty signature segment.
        let token = format!("{header}.{payload}.");
        state.access_tokens.insert(
            token.clone(),
            Some(Instant::now() + Duration::from_secs(lifetime.as_secs())),
        );
        state.issued_access_tokens.push(token.clone());
        token
    }
}

fn header_text(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
}

fn plain(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
}

fn method_not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut response = plain(status, body.to_string());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json;charset=UTF-8"),
    );
    response
}

/// RFC 6749 5.1: JSON, never cached.
fn token_response(body: &Value) -> Response<Full<Bytes>> {
    let mut response = json_response(StatusCode::OK, body);
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

/// RFC 6749 5.2.
fn oauth_error(status: StatusCode, code: &str, description: &str) -> Response<Full<Bytes>> {
    let mut response = json_response(
        status,
        &json!({ "error": code, "error_description": description }),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// RFC 6749 5.2: 401, with a challenge when the client tried HTTP Basic.
fn invalid_client(basic_used: bool, description: &str) -> Response<Full<Bytes>> {
    let mut response = oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", description);
    if basic_used {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(r#"Basic realm="token""#),
        );
    }
    response
}

/// `Basic <base64(form(id):form(secret))>` (RFC 6749 2.3.1), decoded.
fn parse_basic(value: &HeaderValue) -> Option<(String, String)> {
    let value = value.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(base64_decode(encoded.trim())?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((
        form_value(id.as_bytes()).ok()?,
        form_value(secret.as_bytes()).ok()?,
    ))
}

/// `application/x-www-form-urlencoded` pairs: `+` is a space, `%XX` a byte, UTF-8 required.
pub fn form_decode(body: &[u8]) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    for pair in body.split(|byte| *byte == b'&') {
        if pair.is_empty() {
            continue;
        }
        let (name, value) = match pair.iter().position(|byte| *byte == b'=') {
            Some(at) => (&pair[..at], &pair[at + 1..]),
            None => (pair, &[][..]),
        };
        pairs.push((form_value(name)?, form_value(value)?));
    }
    Ok(pairs)
}

fn form_value(encoded: &[u8]) -> Result<String, String> {
    let mut out = Vec::with_capacity(encoded.len());
    let mut bytes = encoded.iter();
    while let Some(&byte) = bytes.next() {
        match byte {
            b'+' => out.push(b' '),
            b'%' => {
                let high = bytes.next().and_then(|b| (*b as char).to_digit(16));
                let low = bytes.next().and_then(|b| (*b as char).to_digit(16));
                match (high, low) {
                    (Some(high), Some(low)) => out.push((high * 16 + low) as u8),
                    _ => return Err("a bad percent-escape in the form".to_owned()),
                }
            }
            _ => out.push(byte),
        }
    }
    String::from_utf8(out).map_err(|_| "the form is not UTF-8".to_owned())
}

/// Form-encode one value (WHATWG): what a correct client sends.
pub fn form_encode(value: &str) -> String {
    let mut out = String::new();
    for byte in value.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => {
                out.push(byte as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn base64(input: &[u8]) -> String {
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, byte)| n | u32::from(*byte) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(BASE64[(n >> (18 - 6 * i) & 0x3f) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Base64url without padding, as JWT segments are.
pub fn base64url(input: &[u8]) -> String {
    base64(input)
        .trim_end_matches('=')
        .replace('+', "-")
        .replace('/', "_")
}

/// Strict standard base64 with padding.
fn base64_decode(input: &str) -> Option<Vec<u8>> {
    if input.len() % 4 != 0 {
        return None;
    }
    let mut out = Vec::new();
    for chunk in input.as_bytes().chunks(4) {
        let padding = chunk.iter().rev().take_while(|b| **b == b'=').count();
        if padding > 2 {
            return None;
        }
        let mut n = 0u32;
        for (i, byte) in chunk.iter().enumerate() {
            let value = if i >= 4 - padding {
                0
            } else {
                BASE64.iter().position(|c| c == byte)? as u32
            };
            n = n << 6 | value;
        }
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - padding]);
    }
    Some(out)
}

fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// IMF-fixdate (RFC 9110 5.6.7), such as `Sun, 06 Nov 1994 08:49:37 GMT`.
pub fn http_date(time: SystemTime) -> String {
    let seconds = unix_seconds(time);
    let days = (seconds / 86_400) as i64;
    let of_day = seconds % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        WEEKDAYS[days.rem_euclid(7) as usize],
        MONTHS[(month - 1) as usize],
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60
    )
}

/// A request sent by hand, for what the providers never send: reused refresh tokens, broken
/// requests. Returns the status and the JSON body (`Null` if not JSON).
pub async fn raw_request(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (StatusCode, HeaderMap, Value) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut request = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        headers,
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

/// `Authorization: Basic ...` as RFC 6749 2.3.1 builds it.
pub fn basic_header(id: &str, secret: &str) -> String {
    format!(
        "Basic {}",
        base64(format!("{}:{}", form_encode(id), form_encode(secret)).as_bytes())
    )
}

/// Yield until `condition` holds, without moving tokio's clock: loopback IO makes progress.
/// Gives up after a generous real-time bound.
pub async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    let started = std::time::Instant::now();
    while !condition() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{what}: never happened"
        );
        tokio::task::yield_now().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_round_trip() {
        for value in [BASIC_SECRET, POST_SECRET, POST_ID, "", "é ü"] {
            assert_eq!(form_value(form_encode(value).as_bytes()).unwrap(), value);
        }
        for plain in ["", "f", "fo", "foo", "foob", "fooba", "foobar"] {
            assert_eq!(
                base64_decode(&base64(plain.as_bytes())).unwrap(),
                plain.as_bytes()
            );
        }
        assert_eq!(
            base64(b"Aladdin:open sesame"),
            "QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
        assert_eq!(base64_decode("Zm9v!"), None);
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
        assert_eq!(
            http_date(UNIX_EPOCH + Duration::from_secs(784_111_777)),
            "Sun, 06 Nov 1994 08:49:37 GMT"
        );
        assert!(form_value(b"%4").is_err());
    }
}
