//! The `refresh_token` grant (RFC 6749 section 6), with rotation and an optional fallback.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::Mutex;

use super::client_credentials::ClientCredentials;
use super::transport::{send, HttpTransport};
use super::{token_request, Client, ClientAuth, Endpoint, EndpointOptions, Secret};
use crate::error::{AuthError, ErrorCode};
use crate::provider::{ProviderFuture, TokenProvider};
use crate::Token;

/// Fetches tokens with a refresh token, and keeps the new refresh token the server returns
/// (rotation), so the next refresh uses it.
///
/// When there is no refresh token, or the server rejects it (`invalid_grant`), it falls back to
/// client credentials if one was configured, and says so in a `warn` event; otherwise it
/// returns [`AuthError::NoRefreshToken`] or the `invalid_grant` error, which a batch can match
/// on to stop cleanly.
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
    /// The refresh token to use next. An async mutex, held across the request: two refreshes
    /// racing with one rotating token would make the second one fail.
    refresh_token: Mutex<Option<Secret>>,
    fallback: Option<ClientCredentials>,
}

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

    /// The refresh token the next refresh will use: the latest one the server issued.
    pub async fn refresh_token(&self) -> Option<Secret> {
        self.inner.refresh_token.lock().await.clone()
    }

    /// Refresh now.
    pub async fn request_token(&self) -> Result<Token, AuthError> {
        let inner = &self.inner;
        let mut current = inner.refresh_token.lock().await;
        let Some(refresh_token) = current.clone() else {
            // `fall_back` stores the refresh token it may receive: release the lock first.
            drop(current);
            return self.fall_back("there is no refresh token").await;
        };
        let mut params = vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token.expose()),
        ];
        if let Some(scope) = &inner.scope {
            params.push(("scope", scope));
        }
        let request = token_request(&inner.endpoint.uri, &inner.endpoint.client, &params)?;
        let answer = send(&inner.endpoint.transport, request).await?;
        match super::response::token_from(&answer, SystemTime::now()) {
            Ok(token) => {
                if let Some(rotated) = token.refresh_token() {
                    *current = Some(Secret::new(rotated));
                }
                Ok(token)
            }
            Err(error) if error.error_code() == Some(&ErrorCode::InvalidGrant) => {
                // The refresh token is dead; never send it again.
                *current = None;
                drop(current);
                match &self.inner.fallback {
                    Some(_) => self.fall_back("the refresh token was rejected").await,
                    None => Err(error),
                }
            }
            Err(error) => Err(error),
        }
    }

    async fn fall_back(&self, why: &str) -> Result<Token, AuthError> {
        let Some(fallback) = &self.inner.fallback else {
            return Err(AuthError::NoRefreshToken);
        };
        tracing::warn!(reason = why, "falling back to the client credentials grant");
        let token = fallback.request_token().await?;
        if let Some(refresh_token) = token.refresh_token() {
            *self.inner.refresh_token.lock().await = Some(Secret::new(refresh_token));
        }
        Ok(token)
    }
}

impl TokenProvider for RefreshTokenGrant {
    fn fetch_token(&self) -> ProviderFuture {
        let this = self.clone();
        Box::pin(async move {
            this.request_token()
                .await
                .map_err(|error| -> tower::BoxError { Box::new(error) })
        })
    }
}

impl fmt::Debug for RefreshTokenGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshTokenGrant")
            .field("endpoint", &self.inner.endpoint.uri)
            .field("client", &self.inner.endpoint.client)
            .field("refresh_token", &"<redacted>")
            .field("fallback", &self.inner.fallback)
            .finish_non_exhaustive()
    }
}

/// Options for [`RefreshTokenGrant`].
pub struct RefreshTokenGrantBuilder {
    endpoint: EndpointOptions,
    refresh_token: Option<Secret>,
    scope: Option<String>,
    fallback: Option<ClientCredentials>,
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

    /// Use client credentials when there is no usable refresh token. Default: none.
    pub fn fallback(mut self, fallback: ClientCredentials) -> Self {
        self.fallback = Some(fallback);
        self
    }

    /// The HTTP client for token requests. Default: [`default_transport`](super::default_transport).
    pub fn transport(mut self, transport: HttpTransport) -> Self {
        self.endpoint.transport = Some(transport);
        self
    }

    /// Allow a plain `http` token URL on a host that is not loopback. Default: refused.
    pub fn allow_insecure_http(mut self, allow: bool) -> Self {
        self.endpoint.allow_insecure_http = allow;
        self
    }

    /// Check the URL and build the provider.
    pub fn build(self) -> Result<RefreshTokenGrant, AuthError> {
        let endpoint = self.endpoint.check()?;
        let refresh_token = self
            .refresh_token
            .filter(|token| !token.expose().is_empty());
        Ok(RefreshTokenGrant {
            inner: Arc::new(Inner {
                endpoint,
                scope: self.scope,
                refresh_token: Mutex::new(refresh_token),
                fallback: self.fallback,
            }),
        })
    }
}

impl fmt::Debug for RefreshTokenGrantBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshTokenGrantBuilder")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}
