//! The `client_credentials` grant (RFC 6749 section 4.4).

use std::fmt;
use std::sync::Arc;

use super::discovery::ProviderMetadata;
use super::transport::HttpTransport;
use super::{request_fields, Client, ClientAuth, Endpoint, EndpointOptions, Secret};
use crate::error::AuthError;
use crate::provider::{ProviderFuture, TokenProvider, TokenRequest};
use crate::Token;

/// Fetches tokens with the client's own credentials: the grant for batch jobs with no user.
///
/// ```no_run
/// use tower_auth_refresh::oauth2::{ClientAuth, ClientCredentials};
///
/// # fn main() -> Result<(), tower_auth_refresh::AuthError> {
/// let provider = ClientCredentials::builder("https://idp.example/oauth/token", "id", "secret")
///     .auth_method(ClientAuth::Post)
///     .scope("contacts:read")
///     .param("audience", "https://api.example")
///     .build()?;
/// # drop(provider);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct ClientCredentials {
    inner: Arc<Inner>,
}

struct Inner {
    endpoint: Endpoint,
    params: Vec<(String, String)>,
}

impl ClientCredentials {
    /// Options for a provider that asks `token_url` for tokens as `client_id`.
    pub fn builder(
        token_url: impl Into<String>,
        client_id: impl Into<String>,
        client_secret: impl Into<Secret>,
    ) -> ClientCredentialsBuilder {
        let client = Client {
            id: client_id.into(),
            secret: Some(client_secret.into()),
            auth: ClientAuth::default(),
        };
        ClientCredentialsBuilder {
            endpoint: EndpointOptions::new(token_url.into(), client),
            params: Vec::new(),
        }
    }

    /// Options for a provider at the token endpoint an identity provider's metadata names, with
    /// the client authentication it supports (Basic preferred).
    pub fn from_metadata(
        metadata: &ProviderMetadata,
        client_id: impl Into<String>,
        client_secret: impl Into<Secret>,
    ) -> ClientCredentialsBuilder {
        Self::builder(metadata.token_endpoint.clone(), client_id, client_secret)
            .auth_method(metadata.preferred_client_auth())
    }

    /// The same grant, its token requests proven with `dpop`'s key: a
    /// [`RefreshTokenGrant`](super::RefreshTokenGrant)'s fallback takes the grant's key.
    #[cfg(feature = "dpop")]
    pub(crate) fn with_dpop(&self, dpop: crate::dpop::Dpop) -> Self {
        let mut endpoint = self.inner.endpoint.clone();
        endpoint.dpop = Some(dpop);
        Self {
            inner: Arc::new(Inner {
                endpoint,
                params: self.inner.params.clone(),
            }),
        }
    }

    /// Ask the token endpoint for a new token.
    pub async fn request_token(&self) -> Result<Token, AuthError> {
        self.request_token_for(&TokenRequest::default()).await
    }

    /// Ask the token endpoint for a new token that satisfies `wanted`: its scope replaces the
    /// configured one, its claims go as the `claims` parameter.
    pub async fn request_token_for(&self, wanted: &TokenRequest) -> Result<Token, AuthError> {
        let inner = &self.inner;
        let endpoint = &inner.endpoint;
        let configured = inner.params.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        let params = request_fields(
            vec![("grant_type", "client_credentials")],
            configured,
            wanted,
        );
        endpoint.request_token(&params).await
    }
}

impl TokenProvider for ClientCredentials {
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

impl fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCredentials")
            .field("endpoint", &self.inner.endpoint.shown_uri())
            .field("client", &self.inner.endpoint.client)
            .field("params", &self.inner.params)
            .field("dpop", &self.inner.endpoint.shown_dpop())
            .finish_non_exhaustive()
    }
}

/// Options for [`ClientCredentials`].
pub struct ClientCredentialsBuilder {
    endpoint: EndpointOptions,
    params: Vec<(String, String)>,
}

impl ClientCredentialsBuilder {
    /// How the client authenticates. Default: [`ClientAuth::Basic`].
    pub fn auth_method(mut self, auth: ClientAuth) -> Self {
        self.endpoint.client.auth = auth;
        self
    }

    /// The `scope` to ask for (space-separated). Default: none, the client's default scope.
    pub fn scope(self, scope: impl Into<String>) -> Self {
        self.param("scope", scope)
    }

    /// An extra form parameter, such as `audience` or `resource`.
    pub fn param(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.params.push((name.into(), value.into()));
        self
    }

    /// The HTTP client for token requests. Default: [`default_transport`](super::default_transport).
    pub fn transport(mut self, transport: HttpTransport) -> Self {
        self.endpoint.transport = Some(transport);
        self
    }

    /// Allow a plain `http` token URL on a host that is not loopback. Default: refused, since
    /// the client secret would cross the network in clear text.
    pub fn allow_insecure_http(mut self, allow: bool) -> Self {
        self.endpoint.allow_insecure_http = allow;
        self
    }

    /// Bind the tokens to `dpop`'s key (RFC 9449): every token request carries a DPoP proof,
    /// and only `DPoP` tokens are accepted. Give the same [`Dpop`](crate::dpop::Dpop) to the
    /// layer, so that one key signs the token requests and the API requests. Default: none,
    /// bearer tokens.
    #[cfg(feature = "dpop")]
    pub fn dpop(mut self, dpop: crate::dpop::Dpop) -> Self {
        self.endpoint.dpop = Some(dpop);
        self
    }

    /// Check the URL and build the provider.
    pub fn build(self) -> Result<ClientCredentials, AuthError> {
        Ok(ClientCredentials {
            inner: Arc::new(Inner {
                endpoint: self.endpoint.check()?,
                params: self.params,
            }),
        })
    }
}

impl fmt::Debug for ClientCredentialsBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCredentialsBuilder")
            .field("endpoint", &self.endpoint)
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}
