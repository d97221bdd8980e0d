//! The resource owner password grant (RFC 6749 section 4.3), kept alive with refresh tokens.

use std::fmt;
use std::time::Duration;

use super::refresh_token::{Fallback, RefreshTokenGrant};
use super::transport::HttpTransport;
use super::{request_fields, Client, ClientAuth, Endpoint, EndpointOptions, Secret};
use crate::error::AuthError;
use crate::provider::{ProviderFuture, TokenProvider, TokenRequest};
use crate::Token;

/// Fetches tokens with a username and password (RFC 6749 section 4.3), then refreshes them with
/// the refresh token each answer carries, keeping the rotated one; when a refresh token is
/// refused (`invalid_grant`), or an answer came without one, it asks with the password again.
///
/// Platforms whose back-end credentials are an API user's key pair use this grant: NICE CXone's
/// access keys (see [`nice_cxone::access_key_grant`](super::nice_cxone::access_key_grant)). The
/// refresh and fallback are [`RefreshTokenGrant`]'s own, with the password grant as its
/// fallback: a refresh runs to its end on its own task, so a rotated refresh token is never
/// lost, and refreshes take turns.
///
/// The password, like the client secret and every token, is redacted in `Debug` and never
/// logged; the username is shown.
///
/// ```no_run
/// use tower_auth_refresh::oauth2::PasswordGrant;
///
/// # fn main() -> Result<(), tower_auth_refresh::AuthError> {
/// let provider = PasswordGrant::builder(
///     "https://idp.example/oauth/token",
///     "client-id",
///     "api-user",
///     std::env::var("API_PASSWORD").unwrap_or_default(),
/// )
/// .client_secret(std::env::var("CLIENT_SECRET").unwrap_or_default())
/// .build()?;
/// # drop(provider);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PasswordGrant {
    grant: RefreshTokenGrant,
}

/// One password-grant request: what [`PasswordGrant`] falls back to.
pub(crate) struct PasswordExchange {
    endpoint: Endpoint,
    username: String,
    password: Secret,
    params: Vec<(String, String)>,
}

impl PasswordExchange {
    pub(crate) async fn request_token(&self, wanted: &TokenRequest) -> Result<Token, AuthError> {
        let fields = vec![
            ("grant_type", "password"),
            ("username", self.username.as_str()),
            ("password", self.password.expose()),
        ];
        let configured = self.params.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        let params = request_fields(fields, configured, wanted);
        self.endpoint.request_token(&params).await
    }
}

impl fmt::Debug for PasswordExchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PasswordExchange")
            .field("endpoint", &self.endpoint.shown_uri())
            .field("client", &self.endpoint.client)
            .field("username", &self.username)
            .field("password", &self.password)
            .field("params", &self.params)
            .finish()
    }
}

impl PasswordGrant {
    /// Options for a provider that asks `token_url` for tokens as `client_id`, on behalf of
    /// `username` with `password`.
    pub fn builder(
        token_url: impl Into<String>,
        client_id: impl Into<String>,
        username: impl Into<String>,
        password: impl Into<Secret>,
    ) -> PasswordGrantBuilder {
        let client = Client {
            id: client_id.into(),
            secret: None,
            auth: ClientAuth::default(),
        };
        PasswordGrantBuilder {
            endpoint: EndpointOptions::new(token_url.into(), client),
            username: username.into(),
            password: password.into(),
            params: Vec::new(),
            refresh_token: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }

    /// A new token: with the refresh token if there is one, else (or when it is refused) with
    /// the password. Waits for a token request in flight, as
    /// [`RefreshTokenGrant::request_token`] does.
    pub async fn request_token(&self) -> Result<Token, AuthError> {
        self.grant.request_token().await
    }

    /// The refresh token the next request will use: the latest one the server issued.
    pub async fn refresh_token(&self) -> Option<Secret> {
        self.grant.refresh_token().await
    }
}

impl TokenProvider for PasswordGrant {
    fn fetch_token(&self) -> ProviderFuture {
        self.grant.fetch_token()
    }

    fn fetch_token_for(&self, request: &TokenRequest) -> ProviderFuture {
        self.grant.fetch_token_for(request)
    }
}

impl fmt::Debug for PasswordGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PasswordGrant")
            .field("grant", &self.grant)
            .finish()
    }
}

/// The same bound as [`RefreshTokenGrant`]'s: longer than the cache's `refresh_timeout`.
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Options for [`PasswordGrant`].
pub struct PasswordGrantBuilder {
    endpoint: EndpointOptions,
    username: String,
    password: Secret,
    params: Vec<(String, String)>,
    refresh_token: Option<Secret>,
    request_timeout: Duration,
}

impl PasswordGrantBuilder {
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

    /// The `scope` the password grant asks for (space-separated). Default: none, the client's
    /// default scope; refreshes keep what was granted.
    pub fn scope(self, scope: impl Into<String>) -> Self {
        self.param("scope", scope)
    }

    /// An extra form parameter of the password grant, such as `audience`.
    pub fn param(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.params.push((name.into(), value.into()));
        self
    }

    /// A refresh token to start with (one saved from an earlier run), so the first token
    /// request is a refresh. Default: none, the first request uses the password.
    pub fn refresh_token(mut self, refresh_token: impl Into<Secret>) -> Self {
        self.refresh_token = Some(refresh_token.into());
        self
    }

    /// The HTTP client for token requests. Default: [`default_transport`](super::default_transport).
    pub fn transport(mut self, transport: HttpTransport) -> Self {
        self.endpoint.transport = Some(transport);
        self
    }

    /// How long one token request may take, fallback to the password included. Default: 60 s.
    /// See [`RefreshTokenGrantBuilder::request_timeout`](super::RefreshTokenGrantBuilder::request_timeout).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Allow a plain `http` token URL on a host that is not loopback. Default: refused, since
    /// the password would cross the network in clear text.
    pub fn allow_insecure_http(mut self, allow: bool) -> Self {
        self.endpoint.allow_insecure_http = allow;
        self
    }

    /// Bind the tokens to `dpop`'s key (RFC 9449): every token request, password and refresh,
    /// carries a DPoP proof, and only `DPoP` tokens are accepted. Give the same
    /// [`Dpop`](crate::dpop::Dpop) to the layer, so that one key signs the token requests and
    /// the API requests. Default: none, bearer tokens.
    #[cfg(feature = "dpop")]
    pub fn dpop(mut self, dpop: crate::dpop::Dpop) -> Self {
        self.endpoint.dpop = Some(dpop);
        self
    }

    /// Check the URL and build the provider.
    pub fn build(self) -> Result<PasswordGrant, AuthError> {
        let endpoint = self.endpoint.check()?;
        let exchange = PasswordExchange {
            endpoint: endpoint.clone(),
            username: self.username,
            password: self.password,
            params: self.params,
        };
        Ok(PasswordGrant {
            grant: RefreshTokenGrant::from_parts(
                endpoint,
                self.refresh_token,
                Fallback::password(exchange),
                self.request_timeout,
            ),
        })
    }
}

impl fmt::Debug for PasswordGrantBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PasswordGrantBuilder")
            .field("endpoint", &self.endpoint)
            .field("username", &self.username)
            .field("password", &self.password)
            .field("params", &self.params)
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}
