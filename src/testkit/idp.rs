//! An identity provider on loopback: `POST /token` (client credentials, password, refresh token)
//! issues tokens that expire on the server's side, and a [`TokenRegistry`] the
//! [`Api`](super::api::Api) checks them in, with the scope and claims each was issued for. In
//! DPoP mode it verifies the proof of every token request ([`ProofVerifier`]) and binds the
//! tokens to the proof's key.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

use super::api::{lock, respond};
use super::server::{field, serve_streaming as serve};
use crate::dpop::{DPOP, DPOP_NONCE};
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
    /// The DPoP-bound tokens and the thumbprint (`jkt`) of their key.
    bound: Arc<Mutex<HashMap<String, String>>>,
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
            .field("bound", &lock(&self.bound).len())
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

    /// [`issue`](Self::issue) a DPoP-bound token: only its holder of the key with RFC 7638
    /// thumbprint `jkt` may use it.
    pub fn issue_bound(&self, token: String, expires_at: Option<Instant>, jkt: String) {
        lock(&self.bound).insert(token.clone(), jkt);
        self.issue(token, expires_at);
    }

    /// The thumbprint of the key `token` is bound to (`cnf.jkt`), if it is a DPoP token.
    pub fn jkt(&self, token: &str) -> Option<String> {
        lock(&self.bound).get(token).cloned()
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
    /// Answer 400 `{"error":"use_dpop_nonce"}` with a new `DPoP-Nonce` every time, whatever
    /// the proof: a server no client can satisfy.
    DpopNonceChurn,
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
    dpop: Mutex<DpopState>,
    verifier: ProofVerifier,
    /// Refresh tokens that work (once each), with the `jkt` of the key they are bound to.
    refresh_tokens: Mutex<HashMap<String, Option<String>>>,
    refresh_grants: AtomicUsize,
    password_grants: AtomicUsize,
    /// Where it listens: the `htu` of its proofs.
    addr: OnceLock<SocketAddr>,
}

/// The DPoP mode of the identity provider.
#[derive(Default)]
struct DpopState {
    required: bool,
    nonce_required: bool,
    /// The nonce proofs must carry, `nonce-<k>`; a new one after every token issued.
    nonce_serial: usize,
    proofs_verified: usize,
    proofs_refused: usize,
    nonce_refusals: usize,
}

impl DpopState {
    fn nonce(&self) -> String {
        format!("nonce-{}", self.nonce_serial)
    }
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
/// `grant_type=password` (any username and password) answers the same with a `refresh_token`,
/// and `grant_type=refresh_token` with one of those rotates it: a new one each time, the old
/// one refused (`invalid_grant`) from then on.
///
/// With [`require_dpop`](Self::require_dpop) it is a DPoP (RFC 9449) authorization server:
/// every token request needs a `DPoP` proof that [`ProofVerifier`] accepts for `POST` to
/// [`token_url`](Self::token_url) (signature, `typ`, `alg`, `jwk`, `htm`, `htu`, `iat` within
/// 60 s, a `jti` never seen before), else 400 `invalid_dpop_proof`; the tokens are
/// `token_type: DPoP`, bound to the proof's key in the [`TokenRegistry`]
/// ([`TokenRegistry::jkt`]), and so are the refresh tokens: a refresh proven with another key
/// is refused. With [`require_dpop_nonce`](Self::require_dpop_nonce) the proof must carry its
/// current nonce too, else 400 `use_dpop_nonce` with the nonce in `DPoP-Nonce`; the nonce
/// changes after every token issued, and the answer that carries the token names the next one.
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
            dpop: Mutex::new(DpopState::default()),
            verifier: ProofVerifier::new(),
            refresh_tokens: Mutex::new(HashMap::new()),
            refresh_grants: AtomicUsize::new(0),
            password_grants: AtomicUsize::new(0),
            addr: OnceLock::new(),
        });
        let handler_state = state.clone();
        let addr = serve(move |request| handle(handler_state.clone(), request)).await?;
        let _ = state.addr.set(addr);
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

    /// Password grants answered with a token.
    pub fn password_grants(&self) -> usize {
        self.state.password_grants.load(Ordering::SeqCst)
    }

    /// Refresh-token grants answered with a token.
    pub fn refresh_grants(&self) -> usize {
        self.state.refresh_grants.load(Ordering::SeqCst)
    }

    /// A refresh token that works once, as if issued earlier (say, at login), bound to the
    /// DPoP key with thumbprint `jkt` if given.
    pub fn issue_refresh_token(&self, jkt: Option<&str>) -> String {
        let n = self.state.token_requests.load(Ordering::SeqCst);
        let token = format!(
            "refresh-issued-{n}-{}",
            lock(&self.state.refresh_tokens).len()
        );
        lock(&self.state.refresh_tokens).insert(token.clone(), jkt.map(str::to_owned));
        token
    }

    /// Require a verified DPoP proof on every token request and issue DPoP-bound tokens
    /// (default: no; a `DPoP` header is then ignored and tokens are `Bearer`).
    pub fn require_dpop(&self, require: bool) {
        lock(&self.state.dpop).required = require;
    }

    /// Require the current nonce in every proof (default: no). Implies nothing without
    /// [`require_dpop`](Self::require_dpop).
    pub fn require_dpop_nonce(&self, require: bool) {
        lock(&self.state.dpop).nonce_required = require;
    }

    /// Change the nonce now, without telling anyone: the next proof is refused once.
    pub fn rotate_dpop_nonce(&self) {
        lock(&self.state.dpop).nonce_serial += 1;
    }

    /// The nonce proofs must carry now (when [`require_dpop_nonce`](Self::require_dpop_nonce)).
    pub fn dpop_nonce(&self) -> String {
        lock(&self.state.dpop).nonce()
    }

    /// DPoP proofs that passed every check.
    pub fn dpop_proofs_verified(&self) -> usize {
        lock(&self.state.dpop).proofs_verified
    }

    /// Token requests refused with `invalid_dpop_proof`: a missing, malformed, forged, stale
    /// or replayed proof, or one for another method or URL.
    pub fn dpop_proofs_refused(&self) -> usize {
        lock(&self.state.dpop).proofs_refused
    }

    /// Token requests refused with `use_dpop_nonce`.
    pub fn dpop_nonce_refusals(&self) -> usize {
        lock(&self.state.dpop).nonce_refusals
    }
}

/// What a token request asks for.
enum Grant {
    ClientCredentials,
    Password,
    /// With this refresh token.
    Refresh(String),
}

async fn handle(
    state: Arc<IdpState>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.method() != Method::POST || request.uri().path() != "/token" {
        return Ok(respond(StatusCode::NOT_FOUND, "not found"));
    }
    let (parts, body) = request.into_parts();
    let form = body
        .collect()
        .await
        .map(|body| body.to_bytes())
        .unwrap_or_default();
    let form = String::from_utf8_lossy(&form);
    let n = state.token_requests.fetch_add(1, Ordering::SeqCst) + 1;
    let form_field = |name: &str| field(&form, name);
    let with_claims = form_field("claims").is_some();
    if with_claims {
        state.claims_requests.fetch_add(1, Ordering::SeqCst);
    }
    let grant = match form_field("grant_type").as_deref() {
        Some("client_credentials") => Grant::ClientCredentials,
        Some("password") => Grant::Password,
        Some("refresh_token") => Grant::Refresh(form_field("refresh_token").unwrap_or_default()),
        _ => {
            return Ok(json_answer(
                StatusCode::BAD_REQUEST,
                r#"{"error":"unsupported_grant_type"}"#.to_owned(),
            ))
        }
    };
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
        IdpMode::DpopNonceChurn => {
            let mut dpop = lock(&state.dpop);
            dpop.nonce_serial += 1;
            dpop.nonce_refusals += 1;
            return Ok(nonce_refusal(&dpop.nonce()));
        }
    }
    // The proof first: a request refused for its proof or nonce spends no refresh token.
    let jkt = match check_proof(&state, &parts.headers) {
        Ok(jkt) => jkt,
        Err(refusal) => return Ok(refusal),
    };
    match &grant {
        Grant::ClientCredentials => {}
        Grant::Password => {
            state.password_grants.fetch_add(1, Ordering::SeqCst);
        }
        Grant::Refresh(refresh_token) => {
            let mut live = lock(&state.refresh_tokens);
            // A refresh token bound to a key works only with a proof by that key (RFC 9449
            // section 5); an unbound one with or without a proof.
            match live.get(refresh_token) {
                Some(bound) if bound.is_none() || *bound == jkt => {
                    live.remove(refresh_token);
                }
                _ => {
                    return Ok(json_answer(
                        StatusCode::BAD_REQUEST,
                        r#"{"error":"invalid_grant"}"#.to_owned(),
                    ))
                }
            }
            drop(live);
            state.refresh_grants.fetch_add(1, Ordering::SeqCst);
        }
    }

    let token = format!("{}-{n}", lock(&state.prefix));
    let ttl = *lock(&state.ttl);
    let token_type = match &jkt {
        Some(jkt) => {
            lock(&state.registry.bound).insert(token.clone(), jkt.clone());
            "DPoP"
        }
        None => "Bearer",
    };
    state.registry.record(
        token.clone(),
        Issued {
            expires_at: ttl.map(|ttl| Instant::now() + ttl),
            scope: form_field("scope"),
            with_claims,
        },
    );
    let expires_in = match ttl {
        Some(ttl) if state.announce_expiry.load(Ordering::SeqCst) => {
            format!(r#","expires_in":{}"#, ttl.as_secs_f64())
        }
        _ => String::new(),
    };
    let refresh_token = match grant {
        Grant::ClientCredentials => String::new(),
        Grant::Password | Grant::Refresh(_) => {
            let refresh_token = format!("refresh-{n}");
            lock(&state.refresh_tokens).insert(refresh_token.clone(), jkt.clone());
            format!(r#","refresh_token":"{refresh_token}""#)
        }
    };
    let body = format!(
        r#"{{"access_token":"{token}","token_type":"{token_type}"{expires_in}{refresh_token}}}"#
    );
    let mut response = json_answer(StatusCode::OK, body);
    // A new nonce after every token, named in the answer: a client that learns from every
    // answer is never refused for it.
    let mut dpop = lock(&state.dpop);
    if dpop.required && dpop.nonce_required {
        dpop.nonce_serial += 1;
        if let Ok(nonce) = HeaderValue::try_from(dpop.nonce()) {
            response.headers_mut().insert(DPOP_NONCE, nonce);
        }
    }
    Ok(response)
}

fn json_answer(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = respond(status, body);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// 400 `use_dpop_nonce`, naming the nonce to use (RFC 9449 section 8).
fn nonce_refusal(nonce: &str) -> Response<Full<Bytes>> {
    let mut response = json_answer(
        StatusCode::BAD_REQUEST,
        r#"{"error":"use_dpop_nonce","error_description":"Authorization server requires nonce in DPoP proof"}"#.to_owned(),
    );
    if let Ok(nonce) = HeaderValue::try_from(nonce) {
        response.headers_mut().insert(DPOP_NONCE, nonce);
    }
    response
}

/// The DPoP check of a token request: `Ok(None)` when DPoP is off, the key's thumbprint for a
/// verified proof, or the refusal to answer with.
#[allow(clippy::result_large_err)]
fn check_proof(
    state: &IdpState,
    headers: &http::HeaderMap,
) -> Result<Option<String>, Response<Full<Bytes>>> {
    let mut dpop = lock(&state.dpop);
    if !dpop.required {
        return Ok(None);
    }
    let token_url = match state.addr.get() {
        Some(addr) => format!("http://{addr}/token"),
        None => String::new(),
    };
    let nonce = dpop.nonce_required.then(|| dpop.nonce());
    let mut proofs = headers.get_all(DPOP).iter();
    let verified = match (proofs.next(), proofs.next()) {
        (Some(proof), None) => proof
            .to_str()
            .map_err(|_| ProofError::Malformed("the DPoP header is not text"))
            .and_then(|proof| {
                state
                    .verifier
                    .verify(proof, &Method::POST, &token_url, None, nonce.as_deref())
            }),
        (None, _) => Err(ProofError::Missing),
        (Some(_), Some(_)) => Err(ProofError::Malformed("more than one DPoP header")),
    };
    match verified {
        Ok(proof) => {
            dpop.proofs_verified += 1;
            Ok(Some(proof.jkt))
        }
        Err(ProofError::Nonce) => {
            dpop.nonce_refusals += 1;
            Err(nonce_refusal(&dpop.nonce()))
        }
        Err(error) => {
            dpop.proofs_refused += 1;
            let body = serde_json::json!({
                "error": "invalid_dpop_proof",
                "error_description": error.to_string(),
            });
            Err(json_answer(StatusCode::BAD_REQUEST, body.to_string()))
        }
    }
}

/// Checks DPoP proofs (RFC 9449 section 4.3) as an authorization or resource server does,
/// with ring's ES256 verifier: a compact JWS whose header says `typ: dpop+jwt`, `alg: ES256`
/// and carries the public `jwk` (a P-256 key, no private part) that verifies its signature;
/// claims `htm` and `htu` (compared without query and fragment) naming the request, `iat`
/// within 60 s of now, a `jti` it has not seen before, and when asked the `nonce` and the `ath`
/// of the access token sent with it.
///
/// It shares no code with the crate's proof signer: a bug there cannot hide itself here.
///
/// ```
/// use http::{Method, Uri};
/// use tower_auth_refresh::dpop::Dpop;
/// use tower_auth_refresh::testkit::ProofVerifier;
///
/// let dpop = Dpop::generate().unwrap();
/// let uri: Uri = "https://api.example.com/items?page=2".parse().unwrap();
/// let proof = dpop.proof(&Method::GET, &uri, Some("token")).unwrap();
/// let verifier = ProofVerifier::new();
/// let proof = proof.to_str().unwrap();
/// let verified = verifier
///     .verify(proof, &Method::GET, "https://api.example.com/items", Some("token"), None)
///     .unwrap();
/// assert_eq!(verified.jkt, dpop.key().thumbprint());
/// // The same proof twice is a replay.
/// assert!(verifier
///     .verify(proof, &Method::GET, "https://api.example.com/items", Some("token"), None)
///     .is_err());
/// ```
#[derive(Debug, Default)]
pub struct ProofVerifier {
    /// Every `jti` accepted so far.
    seen: Mutex<HashSet<String>>,
}

/// What a [`ProofVerifier`] learned from a proof that passed every check.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifiedProof {
    /// The RFC 7638 SHA-256 thumbprint of the proof's key: what a token bound to it records.
    pub jkt: String,
    /// The proof's unique id.
    pub jti: String,
}

/// Why a [`ProofVerifier`] refused a proof.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProofError {
    /// The request carried no proof.
    Missing,
    /// Not a DPoP proof: the reason.
    Malformed(&'static str),
    /// The signature does not verify with the key in the header.
    BadSignature,
    /// `htm` is not the request's method.
    WrongMethod,
    /// `htu` is not the request's URL.
    WrongUri,
    /// `iat` is more than 60 s away from now.
    Stale,
    /// A `jti` seen before: a replayed proof.
    Replayed,
    /// The nonce is missing or not the one asked for.
    Nonce,
    /// `ath` is missing or not the hash of the access token.
    WrongAth,
}

impl fmt::Display for ProofError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProofError::Missing => f.write_str("no DPoP proof"),
            ProofError::Malformed(why) => write!(f, "malformed DPoP proof: {why}"),
            ProofError::BadSignature => f.write_str("the DPoP proof's signature does not verify"),
            ProofError::WrongMethod => f.write_str("the DPoP proof is for another method (htm)"),
            ProofError::WrongUri => f.write_str("the DPoP proof is for another URL (htu)"),
            ProofError::Stale => f.write_str("the DPoP proof's iat is not within 60 s of now"),
            ProofError::Replayed => f.write_str("the DPoP proof's jti was used before"),
            ProofError::Nonce => f.write_str("the DPoP proof lacks the current nonce"),
            ProofError::WrongAth => {
                f.write_str("the DPoP proof's ath is not the hash of the access token")
            }
        }
    }
}

impl std::error::Error for ProofError {}

/// How far `iat` may be from now.
const MAX_PROOF_AGE: u64 = 60;

impl ProofVerifier {
    /// A verifier that has seen no proof yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Check `proof` for a request of `method` to `htu`, sent with `access_token` (which `ath`
    /// must then hash) and, if `nonce` is given, carrying it. A proof that passes is recorded:
    /// the same one again is [`ProofError::Replayed`].
    pub fn verify(
        &self,
        proof: &str,
        method: &Method,
        htu: &str,
        access_token: Option<&str>,
        nonce: Option<&str>,
    ) -> Result<VerifiedProof, ProofError> {
        use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};

        let mut segments = proof.split('.');
        let (Some(header), Some(payload), Some(signature), None) = (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) else {
            return Err(ProofError::Malformed("not a compact JWS"));
        };
        let header = json_segment(header).ok_or(ProofError::Malformed("header"))?;
        if header.get("typ").and_then(serde_json::Value::as_str) != Some("dpop+jwt") {
            return Err(ProofError::Malformed("typ is not dpop+jwt"));
        }
        if header.get("alg").and_then(serde_json::Value::as_str) != Some("ES256") {
            return Err(ProofError::Malformed("alg is not ES256"));
        }
        let jwk = header
            .get("jwk")
            .and_then(serde_json::Value::as_object)
            .ok_or(ProofError::Malformed("no jwk"))?;
        if jwk.contains_key("d") {
            return Err(ProofError::Malformed("the jwk holds a private key"));
        }
        let member = |name: &str| jwk.get(name).and_then(serde_json::Value::as_str);
        if member("kty") != Some("EC") || member("crv") != Some("P-256") {
            return Err(ProofError::Malformed("the jwk is not an EC P-256 key"));
        }
        let coordinate = |name: &str| {
            member(name)
                .and_then(|text| URL_SAFE_NO_PAD.decode(text).ok())
                .filter(|bytes| bytes.len() == 32)
                .ok_or(ProofError::Malformed("the jwk's x or y is not 32 bytes"))
        };
        let (x, y) = (coordinate("x")?, coordinate("y")?);
        let point = [&[0x04][..], &x, &y].concat();
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| ProofError::Malformed("signature"))?;
        let signed_len = proof.len() - proof.rsplit('.').next().map_or(0, str::len) - 1;
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point)
            .verify(&proof.as_bytes()[..signed_len], &signature)
            .map_err(|_| ProofError::BadSignature)?;

        let claims = json_segment(payload).ok_or(ProofError::Malformed("payload"))?;
        let claim = |name: &str| claims.get(name).and_then(serde_json::Value::as_str);
        if claim("htm") != Some(method.as_str()) {
            return Err(ProofError::WrongMethod);
        }
        let without_query = |url: &str| url.split(['?', '#']).next().unwrap_or_default().to_owned();
        if claim("htu").map(without_query) != Some(without_query(htu)) {
            return Err(ProofError::WrongUri);
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        let iat = claims
            .get("iat")
            .and_then(serde_json::Value::as_u64)
            .ok_or(ProofError::Malformed("no iat"))?;
        if iat.abs_diff(now) > MAX_PROOF_AGE {
            return Err(ProofError::Stale);
        }
        if let Some(expected) = nonce {
            if claim("nonce") != Some(expected) {
                return Err(ProofError::Nonce);
            }
        }
        if let Some(token) = access_token {
            if claim("ath") != Some(sha256_b64(token.as_bytes()).as_str()) {
                return Err(ProofError::WrongAth);
            }
        }
        let jti = claim("jti")
            .filter(|jti| !jti.is_empty())
            .ok_or(ProofError::Malformed("no jti"))?;
        if !lock(&self.seen).insert(jti.to_owned()) {
            return Err(ProofError::Replayed);
        }
        // RFC 7638: the required members in lexicographic order, no whitespace.
        let jkt = sha256_b64(
            format!(
                r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
                URL_SAFE_NO_PAD.encode(&x),
                URL_SAFE_NO_PAD.encode(&y)
            )
            .as_bytes(),
        );
        Ok(VerifiedProof {
            jkt,
            jti: jti.to_owned(),
        })
    }
}

fn json_segment(segment: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    match serde_json::from_slice(&URL_SAFE_NO_PAD.decode(segment).ok()?).ok()? {
        serde_json::Value::Object(object) => Some(object),
        _ => None,
    }
}

fn sha256_b64(input: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, input))
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
