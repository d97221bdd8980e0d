//! An identity provider on loopback: `POST /token` (client credentials) issues tokens that expire
//! on the server's side, and a [`TokenRegistry`] the [`Api`](super::api::Api) checks them in,
//! with the scope and claims each was issued for.

use std::collections::{HashMap, HashSet};
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
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

use super::api::{lock, respond, serve};
use crate::oauth2::form::urlencode;
use crate::{AuthError, ProviderFuture, Token, TokenProvider, TokenRequest};

/// Tokens the identity provider issued, with their server-side expiry, shared with the API.
///
/// Clones share one registry: give the same one to [`IdentityProvider::start`] and
/// [`Api::start`](super::api::Api::start).
#[derive(Clone, Default)]
pub struct TokenRegistry {
    tokens: Arc<Mutex<HashMap<String, Issued>>>,
    rejected: Arc<Mutex<HashSet<String>>>,
}

/// What the registry knows of one token.
#[derive(Clone, Debug, Default)]
struct Issued {
    expires_at: Option<Instant>,
    /// The `scope` of the token request, if it named one.
    scope: Option<String>,
    /// Whether the token request carried `claims`.
    with_claims: bool,
}

impl std::fmt::Debug for TokenRegistry {
    // The tokens are secrets, even on loopback: only how many there are.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenRegistry")
            .field("tokens", &lock(&self.tokens).len())
            .field("rejected", &lock(&self.rejected).len())
            .finish()
    }
}

impl TokenRegistry {
    /// Record `token` as issued, valid until `expires_at` (`None`: forever): for a test that
    /// issues its own tokens, many of them, without a token request each.
    pub fn issue(&self, token: String, expires_at: Option<Instant>) {
        self.record(
            token,
            Issued {
                expires_at,
                ..Issued::default()
            },
        );
    }

    fn record(&self, token: String, issued: Issued) {
        lock(&self.tokens).insert(token, issued);
    }

    /// The scope `token` was issued for (the token request's `scope`), if any.
    pub fn scope_of(&self, token: &str) -> Option<String> {
        lock(&self.tokens).get(token)?.scope.clone()
    }

    /// Whether `token` was issued for a request that carried `claims` (a claims challenge's).
    pub fn issued_with_claims(&self, token: &str) -> bool {
        lock(&self.tokens)
            .get(token)
            .is_some_and(|issued| issued.with_claims)
    }

    /// How many distinct tokens the API turned away as expired (or unknown).
    pub fn rejected_tokens(&self) -> usize {
        lock(&self.rejected).len()
    }

    pub(super) fn reject(&self, token: &str) {
        lock(&self.rejected).insert(token.to_owned());
    }

    /// Whether `token` was issued and has not expired.
    pub fn is_valid(&self, token: &str) -> bool {
        match lock(&self.tokens)
            .get(token)
            .map(|issued| issued.expires_at)
        {
            Some(Some(expires_at)) => Instant::now() < expires_at,
            Some(None) => true,
            None => false,
        }
    }

    /// The server-side expiry of every token still on record (`None`: never expires), earliest
    /// first.
    pub fn expiries(&self) -> Vec<Option<Instant>> {
        let mut expiries: Vec<_> = lock(&self.tokens)
            .values()
            .map(|issued| issued.expires_at)
            .collect();
        expiries.sort();
        expiries
    }

    /// Expire every token now: the server-side expiry a client cannot foresee.
    pub fn revoke_all(&self) {
        lock(&self.tokens).clear();
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
    /// Token requests that carried `claims`.
    claims_requests: AtomicUsize,
    ttl: Mutex<Option<Duration>>,
    announce_expiry: AtomicBool,
    mode: Mutex<IdpMode>,
    /// Each token request waits this long (Tokio's clock) before it is answered.
    latency: Mutex<Duration>,
    /// Issued tokens are `<prefix>-<n>`.
    prefix: Mutex<String>,
}

/// An OAuth2 token endpoint on `127.0.0.1`: `POST /token` with
/// `grant_type=client_credentials` answers
/// `{"access_token": "token-<n>", "token_type": "Bearer", "expires_in": <seconds>}`.
///
/// A `scope` parameter is recorded as the token's scope and a `claims` parameter (a claims
/// challenge's, see [`TokenRequest`]) as satisfied, in the
/// [`TokenRegistry`], for the [`Api`](super::api::Api)'s `/needs-scope` and `/needs-claims`.
///
/// It accepts any client id and secret: it exists to issue tokens that expire, and to count the
/// requests for them. It runs on hyper in the caller's Tokio runtime, so a test on a paused clock
/// moves its token expiry with `tokio::time::advance`.
///
/// ```
/// use std::time::Duration;
/// use tower_auth_refresh::testkit::{IdentityProvider, TokenRegistry};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let registry = TokenRegistry::default();
/// let idp = IdentityProvider::start(registry, Some(Duration::from_secs(3))).await;
/// assert!(idp.token_url().ends_with("/token"));
/// assert_eq!(idp.token_requests(), 0);
/// # }
/// ```
#[derive(Clone)]
pub struct IdentityProvider {
    addr: SocketAddr,
    state: Arc<IdpState>,
}

impl std::fmt::Debug for IdentityProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityProvider")
            .field("addr", &self.addr)
            .field("token_requests", &self.token_requests())
            .finish_non_exhaustive()
    }
}

impl IdentityProvider {
    /// Start one whose tokens live `ttl` on the server's side (`None`: forever), announced in
    /// `expires_in`, recorded in `registry`.
    ///
    /// # Panics
    /// If no loopback port can be bound: a test cannot go on without its server. See
    /// [`try_start`](Self::try_start).
    pub async fn start(registry: TokenRegistry, ttl: Option<Duration>) -> Self {
        match Self::try_start(registry, ttl).await {
            Ok(idp) => idp,
            Err(error) => panic!("the test identity provider cannot listen on 127.0.0.1: {error}"),
        }
    }

    /// [`start`](Self::start), with the error of binding the loopback port.
    pub async fn try_start(
        registry: TokenRegistry,
        ttl: Option<Duration>,
    ) -> std::io::Result<Self> {
        let state = Arc::new(IdpState {
            registry,
            token_requests: AtomicUsize::new(0),
            claims_requests: AtomicUsize::new(0),
            ttl: Mutex::new(ttl),
            announce_expiry: AtomicBool::new(true),
            mode: Mutex::new(IdpMode::Issue),
            latency: Mutex::new(Duration::ZERO),
            prefix: Mutex::new("token".to_owned()),
        });
        let handler_state = state.clone();
        let addr = serve(move |request| handle(handler_state.clone(), request)).await?;
        Ok(Self { addr, state })
    }

    /// The token endpoint: `http://127.0.0.1:<port>/token`.
    pub fn token_url(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// Token requests that reached the endpoint, whatever the answer.
    pub fn token_requests(&self) -> usize {
        self.state.token_requests.load(Ordering::SeqCst)
    }

    /// Token requests that carried a `claims` parameter, whatever the answer.
    pub fn claims_requests(&self) -> usize {
        self.state.claims_requests.load(Ordering::SeqCst)
    }

    /// How the next token requests are answered (default: [`IdpMode::Issue`]).
    pub fn set_mode(&self, mode: IdpMode) {
        *lock(&self.state.mode) = mode;
    }

    /// Whether `expires_in` is sent (default: yes); without it, clients learn of expiry through
    /// 401s.
    pub fn announce_expiry(&self, announce: bool) {
        self.state.announce_expiry.store(announce, Ordering::SeqCst);
    }

    /// How long each token request takes to be answered (default: no time).
    pub fn set_latency(&self, latency: Duration) {
        *lock(&self.state.latency) = latency;
    }

    /// Issue `<prefix>-<n>` from now on instead of `token-<n>`, to tell apart the tokens of
    /// several identity providers (one per audience, say).
    pub fn set_token_prefix(&self, prefix: &str) {
        *lock(&self.state.prefix) = prefix.to_owned();
    }

    /// How long the tokens issued from now on live (server side; `None`: forever).
    pub fn set_ttl(&self, ttl: Option<Duration>) {
        *lock(&self.state.ttl) = ttl;
    }
}

async fn handle(
    state: Arc<IdpState>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.method() != http::Method::POST || request.uri().path() != "/token" {
        return Ok(respond(StatusCode::NOT_FOUND, "not found"));
    }
    let form = request.into_body().collect().await.map(|b| b.to_bytes());
    let n = state.token_requests.fetch_add(1, Ordering::SeqCst) + 1;
    let fields = form.as_deref().map(form_fields).unwrap_or_default();
    let field = |name: &str| {
        fields
            .iter()
            .find(|(field, _)| field == name)
            .map(|(_, value)| value.clone())
    };
    let with_claims = field("claims").is_some();
    if with_claims {
        state.claims_requests.fetch_add(1, Ordering::SeqCst);
    }
    if field("grant_type").as_deref() != Some("client_credentials") {
        return Ok(respond(
            StatusCode::BAD_REQUEST,
            r#"{"error":"unsupported_grant_type"}"#,
        ));
    }
    let latency = *lock(&state.latency);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let mode = *lock(&state.mode);
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
    let token = format!("{}-{n}", lock(&state.prefix));
    let ttl = *lock(&state.ttl);
    state.registry.record(
        token.clone(),
        Issued {
            expires_at: ttl.map(|ttl| Instant::now() + ttl),
            scope: field("scope"),
            with_claims,
        },
    );
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

/// The fields of an `application/x-www-form-urlencoded` body, decoded (`+` is a space, `%XX` a
/// byte); a field that does not decode to UTF-8 is left out.
fn form_fields(body: &[u8]) -> Vec<(String, String)> {
    fn decode(text: &[u8]) -> Option<String> {
        let mut out = Vec::with_capacity(text.len());
        let mut bytes = text.iter();
        while let Some(&byte) = bytes.next() {
            match byte {
                b'+' => out.push(b' '),
                b'%' => {
                    let hex = [*bytes.next()?, *bytes.next()?];
                    out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
                }
                other => out.push(other),
            }
        }
        String::from_utf8(out).ok()
    }
    body.split(|&byte| byte == b'&')
        .filter_map(|pair| {
            let at = pair.iter().position(|&byte| byte == b'=')?;
            Some((decode(&pair[..at])?, decode(&pair[at + 1..])?))
        })
        .collect()
}

/// A token provider that asks `idp` over HTTP (client credentials, a hand-written request) and
/// reads its JSON answer: the smallest provider that goes through the network. It sends the
/// scope and claims of a [`TokenRequest`]
/// ([`TokenProvider::fetch_token_for`]) as form parameters. Against a real endpoint, use
/// [`oauth2::ClientCredentials`](crate::oauth2::ClientCredentials).
pub fn http_provider(idp: &IdentityProvider) -> impl TokenProvider {
    http_provider_at(idp.token_url())
}

/// [`http_provider`] for an identity provider at `url`, possibly in another process.
///
/// A 429 becomes [`AuthError::Throttled`] with its `Retry-After`, so the cache waits as long as
/// the endpoint asked.
pub fn http_provider_at(url: String) -> impl TokenProvider {
    HttpProvider {
        http: Client::builder(TokioExecutor::new()).build_http(),
        url,
    }
}

struct HttpProvider {
    http: Client<HttpConnector, Full<Bytes>>,
    url: String,
}

impl TokenProvider for HttpProvider {
    fn fetch_token(&self) -> ProviderFuture {
        self.fetch_token_for(&TokenRequest::default())
    }

    fn fetch_token_for(&self, wanted: &TokenRequest) -> ProviderFuture {
        let http = self.http.clone();
        let url = self.url.clone();
        let mut form =
            "grant_type=client_credentials&client_id=batch&client_secret=s3cr3t".to_owned();
        for (name, value) in [("scope", wanted.scope()), ("claims", wanted.claims())] {
            if let Some(value) = value {
                form.push_str(&format!("&{name}={}", urlencode(value)));
            }
        }
        Box::pin(async move {
            let request = Request::post(url)
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Full::from(form))?;
            let response = http.request(request).await?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|value| value.to_str().ok()?.parse().ok())
                .map(Duration::from_secs);
            let body = response.into_body().collect().await?.to_bytes();
            if status == StatusCode::TOO_MANY_REQUESTS {
                return Err(AuthError::Throttled {
                    status,
                    retry_after,
                }
                .into());
            }
            if !status.is_success() {
                return Err(format!("token endpoint answered {status}").into());
            }
            parse_token_response(&body)
        })
    }
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
