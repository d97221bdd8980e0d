//! A NICE CXone emulator: OpenID discovery, the access-key password grant with HTTP Basic
//! client authentication, rotating refresh tokens, the tenant's `cxone-configuration`, and a
//! paginated agents API.
//!
//! - `GET /.well-known/openid-configuration`: the issuer (this server) and its token endpoint.
//! - `POST /auth/token` (HTTP Basic client authentication only):
//!   - `grant_type=password` with the access key id and secret as username and password: an
//!     access token (an unsigned JWT with `tenantId`), an `id_token` with `tenantId`, a refresh
//!     token, `expires_in`;
//!   - `grant_type=refresh_token`: the same, with a new refresh token; each refresh token works
//!     once (a reused or revoked one gets `invalid_grant`);
//!   - `grant_type=client_credentials`: refused with `unauthorized_client`, as for a back-end
//!     application registered for the access-key flow.
//! - `GET /.well-known/cxone-configuration?tenantId=<id>`: `api_endpoint` (this server) and
//!   `area`.
//! - `GET /inContactAPI/services/v31.0/agents?skip=<n>&top=<m>`: `{"agents": [...],
//!   "totalRecords": n}`, an empty list past the end; 401 for a missing, unknown or expired
//!   token.
//!
//! ```
//! use tower_auth_refresh::testkit::cxone::{Cxone, CxoneConfig};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! let cxone = Cxone::start(CxoneConfig::default()).await?;
//! assert!(cxone.issuer().starts_with("http://127.0.0.1:"));
//! assert_eq!(cxone.counts().password_grants, 0);
//! # Ok(())
//! # }
//! ```

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::json;
use tokio::time::Instant;

use super::server::{self, basic_credentials, field};

/// Who the emulator knows and what it serves.
#[derive(Clone, Debug)]
pub struct CxoneConfig {
    /// The registered application's client id. Default: `cxone-app`.
    pub client_id: String,
    /// The registered application's client secret. Default: `cxone-app-secret`.
    pub client_secret: String,
    /// The API user's access key id. Default: `AKID-EMULATED`.
    pub access_key_id: String,
    /// The API user's access key secret. Default: `cxone-access-key-secret`.
    pub access_key_secret: String,
    /// The tenant the tokens name. Default: `11EB-TENANT`.
    pub tenant_id: String,
    /// The tenant's area, as `cxone-configuration` states it. Default: `emu1`.
    pub area: String,
    /// How long access tokens live, server side and in `expires_in`. Default: 3600 s.
    pub token_lifetime: Duration,
    /// How many agents the API lists. Default: 250.
    pub agents: usize,
}

impl Default for CxoneConfig {
    fn default() -> Self {
        Self {
            client_id: "cxone-app".into(),
            client_secret: "cxone-app-secret".into(),
            access_key_id: "AKID-EMULATED".into(),
            access_key_secret: "cxone-access-key-secret".into(),
            tenant_id: "11EB-TENANT".into(),
            area: "emu1".into(),
            token_lifetime: Duration::from_secs(3600),
            agents: 250,
        }
    }
}

/// What reached the emulator, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CxoneCounts {
    /// `openid-configuration` requests.
    pub discovery: usize,
    /// Password grants answered with a token.
    pub password_grants: usize,
    /// Refresh-token grants answered with a token.
    pub refresh_grants: usize,
    /// Refresh-token grants refused with `invalid_grant` (reused, revoked or unknown).
    pub refresh_refused: usize,
    /// Client credentials grants refused with `unauthorized_client`.
    pub client_credentials_refused: usize,
    /// Token requests refused for their client authentication or credentials.
    pub invalid_credentials: usize,
    /// `cxone-configuration` requests.
    pub configuration: usize,
    /// Requests to the agents API, whatever the answer.
    pub api_requests: usize,
    /// Agents API requests answered 401.
    pub api_unauthorized: usize,
}

struct State {
    config: CxoneConfig,
    addr: SocketAddr,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    counts: CxoneCounts,
    issued: usize,
    lifetime: Duration,
    /// Access tokens and when they expire.
    access: HashMap<String, Instant>,
    /// Refresh tokens that still work (once each).
    refresh: HashSet<String>,
}

/// A running CXone emulator. Clones share it.
#[derive(Clone)]
pub struct Cxone {
    state: Arc<State>,
}

impl Cxone {
    /// Start one on a fresh loopback port.
    pub async fn start(config: CxoneConfig) -> std::io::Result<Self> {
        // The address is known only once bound; the handler reads it from the shared state.
        let slot: Arc<Mutex<Option<Arc<State>>>> = Arc::new(Mutex::new(None));
        let handler_slot = slot.clone();
        let addr = server::serve(move |request| {
            let state = lock(&handler_slot).clone();
            match state {
                Some(state) => handle(&state, request),
                None => server::json(StatusCode::SERVICE_UNAVAILABLE, "{}"),
            }
        })
        .await?;
        let state = Arc::new(State {
            inner: Mutex::new(Inner {
                lifetime: config.token_lifetime,
                ..Inner::default()
            }),
            config,
            addr,
        });
        *lock(&slot) = Some(state.clone());
        Ok(Self { state })
    }

    /// The issuer URL, `http://127.0.0.1:<port>`: where discovery starts.
    pub fn issuer(&self) -> String {
        format!("http://{}", self.state.addr)
    }

    /// The configuration it was started with.
    pub fn config(&self) -> &CxoneConfig {
        &self.state.config
    }

    /// What reached it so far.
    pub fn counts(&self) -> CxoneCounts {
        lock(&self.state.inner).counts
    }

    /// How long tokens issued from now on live.
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        lock(&self.state.inner).lifetime = lifetime;
    }

    /// Refuse every refresh token issued so far, as a revoked session would.
    pub fn revoke_refresh_tokens(&self) {
        lock(&self.state.inner).refresh.clear();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn handle(state: &State, request: Request<Bytes>) -> Response<Full<Bytes>> {
    let issuer = format!("http://{}", state.addr);
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/.well-known/openid-configuration") => {
            lock(&state.inner).counts.discovery += 1;
            let body = json!({
                "issuer": issuer,
                "token_endpoint": format!("{issuer}/auth/token"),
                "token_endpoint_auth_methods_supported": ["client_secret_basic"],
                "grant_types_supported": ["password", "refresh_token", "authorization_code"],
            });
            server::json(StatusCode::OK, body.to_string())
        }
        (&Method::POST, "/auth/token") => token(state, &issuer, &request),
        (&Method::GET, "/.well-known/cxone-configuration") => {
            lock(&state.inner).counts.configuration += 1;
            let asked = request
                .uri()
                .query()
                .and_then(|query| field(query, "tenantId"));
            if asked.as_deref() != Some(state.config.tenant_id.as_str()) {
                return server::json(StatusCode::NOT_FOUND, r#"{"error":"unknown tenant"}"#);
            }
            let body = json!({
                "tenantId": state.config.tenant_id,
                "area": state.config.area,
                "api_endpoint": issuer,
                "ui_endpoint": issuer,
            });
            server::json(StatusCode::OK, body.to_string())
        }
        (&Method::GET, "/inContactAPI/services/v31.0/agents") => agents(state, &request),
        _ => server::json(StatusCode::NOT_FOUND, r#"{"error":"not found"}"#),
    }
}

fn token(state: &State, issuer: &str, request: &Request<Bytes>) -> Response<Full<Bytes>> {
    let config = &state.config;
    let form = String::from_utf8_lossy(request.body());
    let mut inner = lock(&state.inner);
    let refused = |inner: &mut Inner, status, code: &str| {
        inner.counts.invalid_credentials += 1;
        server::json(status, json!({ "error": code }).to_string())
    };
    match basic_credentials(request) {
        Some((id, secret)) if id == config.client_id && secret == config.client_secret => {}
        _ => return refused(&mut inner, StatusCode::UNAUTHORIZED, "invalid_client"),
    }
    match field(&form, "grant_type").as_deref() {
        Some("password") => {
            let username = field(&form, "username");
            let password = field(&form, "password");
            if username.as_deref() != Some(config.access_key_id.as_str())
                || password.as_deref() != Some(config.access_key_secret.as_str())
            {
                return refused(&mut inner, StatusCode::BAD_REQUEST, "invalid_grant");
            }
            inner.counts.password_grants += 1;
        }
        Some("refresh_token") => {
            let presented = field(&form, "refresh_token").unwrap_or_default();
            if !inner.refresh.remove(&presented) {
                inner.counts.refresh_refused += 1;
                return server::json(
                    StatusCode::BAD_REQUEST,
                    r#"{"error":"invalid_grant","error_description":"refresh token is invalid or was already used"}"#,
                );
            }
            inner.counts.refresh_grants += 1;
        }
        Some("client_credentials") => {
            inner.counts.client_credentials_refused += 1;
            return server::json(
                StatusCode::BAD_REQUEST,
                r#"{"error":"unauthorized_client","error_description":"the client is not authorized for this grant type"}"#,
            );
        }
        _ => {
            return server::json(
                StatusCode::BAD_REQUEST,
                r#"{"error":"unsupported_grant_type"}"#,
            )
        }
    }
    inner.issued += 1;
    let n = inner.issued;
    let lifetime = inner.lifetime;
    let exp = SystemTime::now()
        .checked_add(lifetime)
        .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |since| since.as_secs());
    let access_token = server::unsigned_jwt(&json!({
        "iss": issuer, "sub": format!("user:{}", config.access_key_id),
        "tenantId": config.tenant_id, "exp": exp, "jti": format!("access-{n}"),
    }));
    let id_token = server::unsigned_jwt(&json!({
        "iss": issuer, "sub": format!("user:{}", config.access_key_id), "aud": config.client_id,
        "tenantId": config.tenant_id, "exp": exp,
    }));
    let refresh_token = format!("cxone-refresh-{n}");
    inner
        .access
        .insert(access_token.clone(), Instant::now() + lifetime);
    inner.refresh.insert(refresh_token.clone());
    let body = json!({
        "access_token": access_token,
        "token_type": "Bearer",
        "expires_in": lifetime.as_secs(),
        "refresh_token": refresh_token,
        "id_token": id_token,
        "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
    });
    server::json(StatusCode::OK, body.to_string())
}

fn agents(state: &State, request: &Request<Bytes>) -> Response<Full<Bytes>> {
    let mut inner = lock(&state.inner);
    inner.counts.api_requests += 1;
    let valid = server::bearer(request)
        .and_then(|token| inner.access.get(token))
        .is_some_and(|expires_at| Instant::now() < *expires_at);
    if !valid {
        inner.counts.api_unauthorized += 1;
        return server::invalid_token();
    }
    let total = state.config.agents;
    let skip = server::query_number(request, "skip")
        .unwrap_or(0)
        .min(total);
    let top = server::query_number(request, "top").unwrap_or(100).max(1);
    let page: Vec<_> = (skip..(skip + top).min(total))
        .map(|i| json!({ "agentId": i + 1, "userName": format!("agent{}@tenant", i + 1) }))
        .collect();
    let body = json!({ "agents": page, "totalRecords": total });
    server::json(StatusCode::OK, body.to_string())
}
