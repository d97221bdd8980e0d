//! The `refresh_token` grant (RFC 6749 section 6), with rotation and an optional fallback.
//!
//! [`PasswordGrant`](super::PasswordGrant) is this grant with the password grant as its
//! fallback: one copy of the rotation and fallback logic for both.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, OwnedMutexGuard};
use tracing::Instrument;

use super::client_credentials::ClientCredentials;
use super::password::PasswordExchange;
use super::transport::HttpTransport;
use super::{request_fields, Client, ClientAuth, Endpoint, EndpointOptions, Secret};
use crate::error::{AuthError, ErrorCode};
use crate::provider::{ProviderFuture, TokenProvider, TokenRequest};
use crate::Token;

/// Fetches tokens with a refresh token, and keeps the new refresh token the server returns
/// (rotation), so the next refresh uses it.
///
/// When there is no refresh token, or the server rejects it (`invalid_grant`), it falls back to
/// another grant if one was configured ([`Fallback`]: client credentials here, the password
/// grant in [`PasswordGrant`](super::PasswordGrant)), and says so in a `warn` event when a
/// refresh token was rejected; otherwise it
/// returns [`AuthError::NoRefreshToken`] or the `invalid_grant` error, which a batch can match
/// on to stop cleanly.
///
/// A server that rotates refresh tokens spends the old one when it answers; a client that stops
/// listening before it reads the answer would keep a dead refresh token. So each token request
/// runs on its own Tokio task, and stores the new refresh token, even when its caller stops
/// waiting (the cache's `refresh_timeout`, a dropped request): the next refresh waits for it
/// and uses what it received. It is bounded by its own
/// [`request_timeout`](RefreshTokenGrantBuilder::request_timeout). Refreshes take turns, each
/// with the refresh token the previous one received.
///
/// ```no_run
/// use tower_auth_refresh::oauth2::{ClientCredentials, RefreshTokenGrant};
///
/// # fn main() -> Result<(), tower_auth_refresh::AuthError> {
/// let url = "https://idp.example/oauth/token";
/// let provider = RefreshTokenGrant::builder(url, "id", "refresh-token-from-login")
///     .client_secret("secret")
///     .fallback(ClientCredentials::builder(url, "id", "secret").build()?)
///     .build()?;
/// # drop(provider);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RefreshTokenGrant {
    inner: Arc<Inner>,
}

struct Inner {
    endpoint: Endpoint,
    scope: Option<String>,
    /// The refresh token to use next. An async mutex, held across the request (and its
    /// fallback): two refreshes racing with one rotating token would make the second one fail.
    /// Owned guards let the request's own task hold it after its caller has gone.
    refresh_token: Arc<Mutex<Option<Secret>>>,
    fallback: Option<Fallback>,
    request_timeout: Duration,
}

/// A grant that needs no refresh token, used when there is none or the server refused it.
///
/// Made from a [`ClientCredentials`] (`.into()`); [`PasswordGrant`](super::PasswordGrant)
/// makes its own from the resource owner's credentials.
#[derive(Clone, Debug)]
pub struct Fallback(FallbackGrant);

#[derive(Clone, Debug)]
enum FallbackGrant {
    ClientCredentials(ClientCredentials),
    Password(Arc<PasswordExchange>),
}

impl From<ClientCredentials> for Fallback {
    fn from(grant: ClientCredentials) -> Self {
        Self(FallbackGrant::ClientCredentials(grant))
    }
}

impl Fallback {
    pub(crate) fn password(exchange: PasswordExchange) -> Self {
        Self(FallbackGrant::Password(Arc::new(exchange)))
    }

    /// The grant's name, as events show it.
    fn name(&self) -> &'static str {
        match &self.0 {
            FallbackGrant::ClientCredentials(_) => "client credentials",
            FallbackGrant::Password(_) => "password",
        }
    }

    /// The same fallback, its token requests proven with `dpop`'s key: one key binds every
    /// token of a grant. The password grant's exchange shares the grant's endpoint already.
    #[cfg(feature = "dpop")]
    fn with_dpop(self, dpop: &crate::dpop::Dpop) -> Self {
        match self.0 {
            FallbackGrant::ClientCredentials(grant) => Self(FallbackGrant::ClientCredentials(
                grant.with_dpop(dpop.clone()),
            )),
            password @ FallbackGrant::Password(_) => Self(password),
        }
    }

    async fn request_token(&self, wanted: &TokenRequest) -> Result<Token, AuthError> {
        match &self.0 {
            FallbackGrant::ClientCredentials(grant) => grant.request_token_for(wanted).await,
            FallbackGrant::Password(exchange) => exchange.request_token(wanted).await,
        }
    }
}

/// How long one refresh may take, fallback included, when nobody says otherwise: longer than
/// the cache's default `refresh_timeout` (30 s), so that a late answer is still read and its
/// refresh token kept after the cache has stopped waiting.
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

impl RefreshTokenGrant {
    /// Options for a provider that refreshes with `refresh_token` at `token_url`.
    pub fn builder(
        token_url: impl Into<String>,
        client_id: impl Into<String>,
        refresh_token: impl Into<Secret>,
    ) -> RefreshTokenGrantBuilder {
        let client = Client {
            id: client_id.into(),
            secret: None,
            auth: ClientAuth::default(),
        };
        RefreshTokenGrantBuilder {
            endpoint: EndpointOptions::new(token_url.into(), client),
            refresh_token: Some(refresh_token.into()),
            scope: None,
            fallback: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }

    /// Options for a provider that starts from the result of an authorization-code exchange:
    /// the refresh token that came with `token`.
    pub fn from_token(
        token_url: impl Into<String>,
        client_id: impl Into<String>,
        token: &Token,
    ) -> RefreshTokenGrantBuilder {
        let mut builder = Self::builder(token_url, client_id, "");
        builder.refresh_token = token.refresh_token().map(Secret::new);
        builder
    }

    /// The refresh token the next refresh will use: the latest one the server issued. Waits
    /// for a refresh in flight, so that it answers with what that refresh received.
    pub async fn refresh_token(&self) -> Option<Secret> {
        self.inner.refresh_token.lock().await.clone()
    }

    /// Refresh now.
    ///
    /// Waits for a refresh already in flight, then runs one on its own task (when a Tokio
    /// runtime is running; otherwise inline) so that dropping the returned future does not
    /// lose a rotated refresh token.
    pub async fn request_token(&self) -> Result<Token, AuthError> {
        self.request_token_for(&TokenRequest::default()).await
    }

    /// [`request_token`](Self::request_token) for a token that satisfies `wanted`: its scope
    /// replaces the configured one, its claims go as the `claims` parameter (of the fallback's
    /// request too).
    pub async fn request_token_for(&self, wanted: &TokenRequest) -> Result<Token, AuthError> {
        // Taken before spawning: a caller that leaves while waiting for its turn sends nothing.
        let current = self.inner.refresh_token.clone().lock_owned().await;
        let this = self.clone();
        let wanted = wanted.clone();
        let limit = self.inner.request_timeout;
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let exchange = async move {
                    tokio::time::timeout(limit, this.exchange(current, &wanted))
                        .await
                        .unwrap_or(Err(AuthError::RefreshTimeout { timeout: limit }))
                };
                // Dropping the handle detaches the task; it still stores what it receives.
                runtime
                    .spawn(exchange.in_current_span())
                    .await
                    .unwrap_or_else(|joined| {
                        Err(if joined.is_panic() {
                            AuthError::ProviderPanicked
                        } else {
                            AuthError::transport("the runtime shut down during the token request")
                        })
                    })
            }
            // Outside Tokio there is no task to detach nor a timer: the caller drives it, and
            // dropping it mid-request may lose a rotation (the fallback then recovers).
            Err(_) => this.exchange(current, &wanted).await,
        }
    }

    /// One refresh, holding the refresh-token lock from the request to the stored answer.
    async fn exchange(
        &self,
        mut current: OwnedMutexGuard<Option<Secret>>,
        wanted: &TokenRequest,
    ) -> Result<Token, AuthError> {
        let inner = &self.inner;
        let Some(refresh_token) = current.clone() else {
            return self
                .fall_back(&mut current, Why::NoRefreshToken, wanted)
                .await;
        };
        let fields = vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token.expose()),
        ];
        let configured = inner.scope.as_deref().map(|scope| ("scope", scope));
        let params = request_fields(fields, configured, wanted);
        match inner.endpoint.request_token(&params).await {
            Ok(token) => {
                if let Some(rotated) = token.refresh_token() {
                    *current = Some(Secret::new(rotated));
                }
                Ok(token)
            }
            Err(error) if error.error_code() == Some(&ErrorCode::InvalidGrant) => {
                // The refresh token is dead; never send it again.
                *current = None;
                match &self.inner.fallback {
                    Some(_) => self.fall_back(&mut current, Why::Rejected, wanted).await,
                    None => Err(error),
                }
            }
            Err(error) => Err(error),
        }
    }

    /// The fallback grant instead; a refresh token in its answer is kept for next time.
    async fn fall_back(
        &self,
        current: &mut Option<Secret>,
        why: Why,
        wanted: &TokenRequest,
    ) -> Result<Token, AuthError> {
        let Some(fallback) = &self.inner.fallback else {
            return Err(AuthError::NoRefreshToken);
        };
        let grant = fallback.name();
        match (why, &fallback.0) {
            // The password grant's first token, or its next after a refresh token came without
            // a successor: its normal course, not worth a warning.
            (Why::NoRefreshToken, FallbackGrant::Password(_)) => {
                tracing::debug!(reason = why.text(), "using the password grant");
            }
            _ => tracing::warn!(reason = why.text(), "falling back to the {grant} grant"),
        }
        let token = fallback.request_token(wanted).await?;
        if let Some(refresh_token) = token.refresh_token() {
            *current = Some(Secret::new(refresh_token));
        }
        Ok(token)
    }
}

/// Why a refresh falls back.
#[derive(Clone, Copy)]
enum Why {
    NoRefreshToken,
    Rejected,
}

impl Why {
    fn text(self) -> &'static str {
        match self {
            Why::NoRefreshToken => "there is no refresh token",
            Why::Rejected => "the refresh token was rejected",
        }
    }
}

impl RefreshTokenGrant {
    /// The grant over a checked endpoint, for [`PasswordGrant`](super::PasswordGrant).
    pub(crate) fn from_parts(
        endpoint: Endpoint,
        refresh_token: Option<Secret>,
        fallback: Fallback,
        request_timeout: Duration,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                endpoint,
                scope: None,
                refresh_token: Arc::new(Mutex::new(
                    refresh_token.filter(|token| !token.expose().is_empty()),
                )),
                fallback: Some(fallback),
                request_timeout,
            }),
        }
    }
}

impl TokenProvider for RefreshTokenGrant {
    fn fetch_token(&self) -> ProviderFuture {
        self.fetch_token_for(&TokenRequest::default())
    }

    fn fetch_token_for(&self, request: &TokenRequest) -> ProviderFuture {
        let this = self.clone();
        let request = request.clone();
        Box::pin(async move {
            this.request_token_for(&request)
                .await
                .map_err(|error| -> tower::BoxError { Box::new(error) })
        })
    }
}

impl fmt::Debug for RefreshTokenGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshTokenGrant")
            .field("endpoint", &self.inner.endpoint.shown_uri())
            .field("client", &self.inner.endpoint.client)
            .field("refresh_token", &"<redacted>")
            .field("fallback", &self.inner.fallback)
            .field("dpop", &self.inner.endpoint.shown_dpop())
            .finish_non_exhaustive()
    }
}

/// Options for [`RefreshTokenGrant`].
pub struct RefreshTokenGrantBuilder {
    endpoint: EndpointOptions,
    refresh_token: Option<Secret>,
    scope: Option<String>,
    fallback: Option<Fallback>,
    request_timeout: Duration,
}

impl RefreshTokenGrantBuilder {
    /// The client secret, for a confidential client. Default: none (a public client sends only
    /// its `client_id`).
    pub fn client_secret(mut self, secret: impl Into<Secret>) -> Self {
        self.endpoint.client.secret = Some(secret.into());
        self
    }

    /// How a confidential client authenticates. Default: [`ClientAuth::Basic`].
    pub fn auth_method(mut self, auth: ClientAuth) -> Self {
        self.endpoint.client.auth = auth;
        self
    }

    /// Narrow the scope of refreshed tokens. Default: the scope originally granted.
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = Some(scope.into());
        self
    }

    /// Use another grant (a [`ClientCredentials`]) when there is no usable refresh token.
    /// Default: none.
    pub fn fallback(mut self, fallback: impl Into<Fallback>) -> Self {
        self.fallback = Some(fallback.into());
        self
    }

    /// The HTTP client for token requests. Default: [`default_transport`](super::default_transport).
    pub fn transport(mut self, transport: HttpTransport) -> Self {
        self.endpoint.transport = Some(transport);
        self
    }

    /// How long one refresh may take, fallback included, before it is given up with
    /// [`AuthError::RefreshTimeout`]. Default: 60 s.
    ///
    /// A refresh runs to its end even when its caller stops waiting, so that a rotated refresh
    /// token is kept; this bounds how long a token endpoint that never answers holds up the
    /// next refresh. Keep it longer than the cache's `refresh_timeout`: an answer that arrives
    /// after the grant gave up is lost, and a server that rotated its refresh token then
    /// refuses the old one (`invalid_grant`), which ends in the fallback if there is one.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Allow a plain `http` token URL on a host that is not loopback. Default: refused.
    pub fn allow_insecure_http(mut self, allow: bool) -> Self {
        self.endpoint.allow_insecure_http = allow;
        self
    }

    /// Bind the tokens to `dpop`'s key (RFC 9449): every refresh, and the
    /// [`fallback`](Self::fallback)'s requests, carry a DPoP proof made with it, and only
    /// `DPoP` tokens are accepted. Give the same [`Dpop`](crate::dpop::Dpop) to the layer, so
    /// that one key signs the token requests and the API requests. Default: none, bearer tokens.
    #[cfg(feature = "dpop")]
    pub fn dpop(mut self, dpop: crate::dpop::Dpop) -> Self {
        self.endpoint.dpop = Some(dpop);
        self
    }

    /// Check the URL and build the provider.
    pub fn build(self) -> Result<RefreshTokenGrant, AuthError> {
        let endpoint = self.endpoint.check()?;
        #[cfg(feature = "dpop")]
        let fallback = match &endpoint.dpop {
            Some(dpop) => self.fallback.map(|fallback| fallback.with_dpop(dpop)),
            None => self.fallback,
        };
        #[cfg(not(feature = "dpop"))]
        let fallback = self.fallback;
        let refresh_token = self
            .refresh_token
            .filter(|token| !token.expose().is_empty());
        Ok(RefreshTokenGrant {
            inner: Arc::new(Inner {
                endpoint,
                scope: self.scope,
                refresh_token: Arc::new(Mutex::new(refresh_token)),
                fallback,
                request_timeout: self.request_timeout,
            }),
        })
    }
}

impl fmt::Debug for RefreshTokenGrantBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshTokenGrantBuilder")
            .field("endpoint", &self.endpoint)
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}
