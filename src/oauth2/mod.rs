//! Real OAuth2 token sources (RFC 6749) that plug into [`AuthLayer`](crate::AuthLayer) and
//! [`TokenCache`](crate::TokenCache).
//!
//! - [`ClientCredentials`]: the `client_credentials` grant, for service-to-service batch jobs.
//! - [`RefreshTokenGrant`]: the `refresh_token` grant, keeping the rotated refresh token, with
//!   an optional fallback to client credentials when the refresh token is rejected.
//! - [`PasswordGrant`]: the resource owner password grant, then the refresh tokens it returns
//!   (rotation kept), and the password grant again when a refresh token is refused.
//! - [`discover`]: an identity provider's metadata from its issuer URL alone (OpenID Connect
//!   discovery, then RFC 8414).
//! - Presets for [`genesys`] Cloud and [`nice_cxone`].
//!
//! Every request is sent through an [`HttpTransport`], any tower HTTP service; the default
//! ([`default_transport`], cargo feature `rustls`) is hyper-util over rustls. Token requests
//! never follow redirects, go only to `https` URLs unless the host is loopback or plain HTTP was
//! allowed, and read at most 64 KiB. The client secret and every token are redacted in `Debug`
//! and never logged.
//!
//! ```no_run
//! use tower_auth_refresh::oauth2::ClientCredentials;
//! use tower_auth_refresh::AuthLayer;
//!
//! # fn main() -> Result<(), tower_auth_refresh::AuthError> {
//! let provider = ClientCredentials::builder(
//!     "https://login.example.com/oauth/token",
//!     "batch-client",
//!     std::env::var("CLIENT_SECRET").unwrap_or_default(),
//! )
//! .scope("contacts:read")
//! .build()?;
//! let auth = AuthLayer::new(provider);
//! # drop(auth);
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Request, Uri};
use http_body_util::Full;

use crate::error::{displayable_url, AuthError};
use crate::Token;
use transport::send;

mod client_credentials;
mod discovery;
pub(crate) mod form;
pub mod genesys;
pub mod nice_cxone;
mod password;
mod refresh_token;
mod response;
mod transport;

pub use client_credentials::{ClientCredentials, ClientCredentialsBuilder};
pub use discovery::{discover, ProviderMetadata};
pub use password::{PasswordGrant, PasswordGrantBuilder};
pub use refresh_token::{Fallback, RefreshTokenGrant, RefreshTokenGrantBuilder};
#[cfg(feature = "rustls")]
pub use transport::default_transport;
pub use transport::{transport, HttpTransport};

/// A client secret or refresh token: shown as `<redacted>` by `Debug`, read with
/// [`Secret::expose`].
#[derive(Clone)]
pub struct Secret(Arc<str>);

impl Secret {
    /// Wrap a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(Arc::from(value.into()))
    }

    /// The secret itself. Handle with care.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self::new(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self::new(value)
    }
}

/// How the client proves its identity to the token endpoint (RFC 6749 section 2.3.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientAuth {
    /// HTTP Basic with the form-encoded id and secret (`client_secret_basic`). The RFC's
    /// preferred way, and the default.
    #[default]
    Basic,
    /// `client_id` and `client_secret` as form fields (`client_secret_post`).
    Post,
}

impl ClientAuth {
    /// The name RFC 8414 metadata uses for it.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientAuth::Basic => "client_secret_basic",
            ClientAuth::Post => "client_secret_post",
        }
    }
}

/// A URL credentials may be sent to: `https`, or `http` on a loopback host, or `http` anywhere
/// when the user allowed it.
pub(crate) fn checked_url(url: &str, allow_insecure_http: bool) -> Result<Uri, AuthError> {
    let refused = || AuthError::InsecureUrl {
        url: displayable_url(url),
    };
    let uri: Uri = url.parse().map_err(|_| refused())?;
    let host = uri.host().ok_or_else(refused)?;
    match uri.scheme_str() {
        Some("https") => Ok(uri),
        Some("http") if allow_insecure_http || is_loopback(host) => Ok(uri),
        _ => Err(refused()),
    }
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<IpAddr>()
            .is_ok_and(|address| address.is_loopback())
}

/// The client's credentials as a token request carries them.
#[derive(Clone)]
pub(crate) struct Client {
    pub(crate) id: String,
    pub(crate) secret: Option<Secret>,
    pub(crate) auth: ClientAuth,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("id", &self.id)
            .field("secret", &self.secret)
            .field("auth", &self.auth)
            .finish()
    }
}

/// The form fields of a token request for `request`: the grant's own `fields`, then its
/// `configured` parameters, the configured `scope` replaced by the one `request` asks for (a
/// step-up), then the `claims` `request` carries (what MSAL sends for continuous access
/// evaluation). One place for every grant.
pub(crate) fn request_fields<'a>(
    mut fields: Vec<(&'a str, &'a str)>,
    configured: impl IntoIterator<Item = (&'a str, &'a str)>,
    request: &'a crate::TokenRequest,
) -> Vec<(&'a str, &'a str)> {
    let scope = request.scope();
    fields.extend(
        configured
            .into_iter()
            .filter(|(name, _)| scope.is_none() || *name != "scope"),
    );
    if let Some(scope) = scope {
        fields.push(("scope", scope));
    }
    if let Some(claims) = request.claims() {
        fields.push(("claims", claims));
    }
    fields
}

/// A token request: `POST` of a form, with the client authenticated as configured.
pub(crate) fn token_request(
    endpoint: &Uri,
    client: &Client,
    params: &[(&str, &str)],
) -> Result<Request<Full<Bytes>>, AuthError> {
    let mut fields: Vec<(&str, &str)> = params.to_vec();
    let mut request = Request::post(endpoint.clone())
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(ACCEPT, "application/json");
    match (&client.secret, client.auth) {
        (Some(secret), ClientAuth::Basic) => {
            let credentials = format!(
                "{}:{}",
                form::urlencode(&client.id),
                form::urlencode(secret.expose())
            );
            let mut value =
                HeaderValue::from_str(&format!("Basic {}", form::base64(credentials.as_bytes())))
                    .map_err(|_| AuthError::InvalidHeaderValue)?;
            value.set_sensitive(true);
            request = request.header(AUTHORIZATION, value);
        }
        (Some(secret), ClientAuth::Post) => {
            fields.push(("client_id", &client.id));
            fields.push(("client_secret", secret.expose()));
        }
        // A public client identifies itself without a secret.
        (None, _) => fields.push(("client_id", &client.id)),
    }
    request
        .body(Full::new(Bytes::from(form::form(fields))))
        .map_err(|_| AuthError::InsecureUrl {
            url: displayable_url(&endpoint.to_string()),
        })
}

/// What every token-source builder collects: where to send, as whom, and how.
pub(crate) struct EndpointOptions {
    pub(crate) token_url: String,
    pub(crate) client: Client,
    pub(crate) transport: Option<HttpTransport>,
    pub(crate) allow_insecure_http: bool,
    /// A DPoP proof on every token request, and `DPoP` tokens only (`None`: bearer tokens).
    #[cfg(feature = "dpop")]
    pub(crate) dpop: Option<crate::dpop::Dpop>,
}

/// [`EndpointOptions`], checked: the URL passed the policy and a transport is chosen.
#[derive(Clone)]
pub(crate) struct Endpoint {
    pub(crate) uri: Uri,
    pub(crate) client: Client,
    pub(crate) transport: HttpTransport,
    #[cfg(feature = "dpop")]
    pub(crate) dpop: Option<crate::dpop::Dpop>,
}

impl fmt::Debug for EndpointOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointOptions")
            .field("token_url", &displayable_url(&self.token_url))
            .field("client", &self.client)
            .field("transport", &self.transport)
            .field("allow_insecure_http", &self.allow_insecure_http)
            .field("dpop", &self.shown_dpop())
            .finish()
    }
}

impl EndpointOptions {
    /// The DPoP key as `Debug` may show it: its thumbprint, never the key.
    fn shown_dpop(&self) -> Option<&dyn fmt::Debug> {
        #[cfg(feature = "dpop")]
        return self.dpop.as_ref().map(|dpop| dpop as &dyn fmt::Debug);
        #[cfg(not(feature = "dpop"))]
        None
    }
}

impl Endpoint {
    /// The token URL as `Debug` may show it: no credentials, no query.
    pub(crate) fn shown_uri(&self) -> String {
        displayable_url(&self.uri.to_string())
    }

    /// The DPoP key as `Debug` may show it: its thumbprint, never the key.
    pub(crate) fn shown_dpop(&self) -> Option<&dyn fmt::Debug> {
        #[cfg(feature = "dpop")]
        return self.dpop.as_ref().map(|dpop| dpop as &dyn fmt::Debug);
        #[cfg(not(feature = "dpop"))]
        None
    }

    /// One token request with `params`, and the token it is answered with: the send path of
    /// every grant.
    ///
    /// With DPoP the request carries a proof, the nonce of every answer is learned, and a
    /// refusal for want of a nonce (`use_dpop_nonce`) that brings a new one is answered by one
    /// resend with a fresh proof. Never more: a second refusal is returned as it is.
    pub(crate) async fn request_token(&self, params: &[(&str, &str)]) -> Result<Token, AuthError> {
        #[cfg(feature = "dpop")]
        if let Some(dpop) = &self.dpop {
            let (answer, new_nonce) = self.send_proven(dpop, params).await?;
            let answer = if new_nonce && response::asks_for_nonce(&answer) {
                self.send_proven(dpop, params).await?.0
            } else {
                answer
            };
            return response::token_from(&answer, SystemTime::now(), true);
        }
        let answer = send(
            &self.transport,
            token_request(&self.uri, &self.client, params)?,
        )
        .await?;
        response::token_from(&answer, SystemTime::now(), false)
    }

    /// Send the token request with a DPoP proof; the answer, and whether it brought a new nonce.
    #[cfg(feature = "dpop")]
    async fn send_proven(
        &self,
        dpop: &crate::dpop::Dpop,
        params: &[(&str, &str)],
    ) -> Result<(transport::Answer, bool), AuthError> {
        let mut request = token_request(&self.uri, &self.client, params)?;
        let proof = dpop.proof(&http::Method::POST, &self.uri, None)?;
        request.headers_mut().insert(crate::dpop::DPOP, proof);
        let answer = send(&self.transport, request).await?;
        let new_nonce = dpop.observe(&self.uri, &answer.headers);
        Ok((answer, new_nonce))
    }
}

impl EndpointOptions {
    pub(crate) fn new(token_url: String, client: Client) -> Self {
        Self {
            token_url,
            client,
            transport: None,
            allow_insecure_http: false,
            #[cfg(feature = "dpop")]
            dpop: None,
        }
    }

    /// Check the URL against the policy and pick the transport (the default one if none).
    pub(crate) fn check(self) -> Result<Endpoint, AuthError> {
        let uri = checked_url(&self.token_url, self.allow_insecure_http)?;
        let transport = match self.transport {
            Some(transport) => transport,
            #[cfg(feature = "rustls")]
            None => default_transport(),
            #[cfg(not(feature = "rustls"))]
            None => return Err(AuthError::transport(
                "no HTTP transport: enable the `rustls` feature or pass one with `.transport(..)`",
            )),
        };
        Ok(Endpoint {
            uri,
            client: self.client,
            transport,
            #[cfg(feature = "dpop")]
            dpop: self.dpop,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_or_loopback_http() {
        assert!(checked_url("https://login.example.com/oauth/token", false).is_ok());
        assert!(checked_url("http://127.0.0.1:8080/token", false).is_ok());
        assert!(checked_url("http://[::1]:8080/token", false).is_ok());
        assert!(checked_url("http://localhost/token", false).is_ok());
        assert!(matches!(
            checked_url("http://login.example.com/token", false),
            Err(AuthError::InsecureUrl { .. })
        ));
        assert!(checked_url("http://login.example.com/token", true).is_ok());
        assert!(checked_url("ftp://x/token", true).is_err());
        assert!(checked_url("/token", true).is_err());
    }

    #[test]
    fn basic_auth_form_encodes_id_and_secret_and_is_sensitive() {
        let client = Client {
            id: "batch basic".into(),
            secret: Some(Secret::new("b@tch s3cret/+&=")),
            auth: ClientAuth::Basic,
        };
        let endpoint: Uri = "https://idp/token".parse().unwrap();
        let request =
            token_request(&endpoint, &client, &[("grant_type", "client_credentials")]).unwrap();
        let header = &request.headers()[AUTHORIZATION];
        assert!(header.is_sensitive());
        let expected = form::base64(b"batch+basic:b%40tch+s3cret%2F%2B%26%3D");
        assert_eq!(header.to_str().unwrap(), format!("Basic {expected}"));
        assert!(!format!("{client:?}").contains("b@tch"));
    }
}
