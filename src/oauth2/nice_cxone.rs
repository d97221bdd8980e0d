//! NICE CXone: the access-key flow its developer documentation shows for back-end applications,
//! configured from the CXone identity provider's published metadata (OpenID Connect discovery
//! at [`ISSUER`]), and the tenant's API found from the token itself.
//!
//! A back-end application (no user present) authenticates with the resource owner password
//! grant: its own client id and secret, and an API user's **access key id and access key
//! secret** as username and password ([`access_key_grant`], a [`PasswordGrant`]). Access tokens
//! live about an hour; each answer carries a refresh token, which CXone rotates: the grant
//! refreshes with it, keeps the new one, and uses the access key again when a refresh token is
//! refused.
//!
//! Which cluster serves the tenant is not something a batch should have to be told: the token's
//! `tenantId` claim names the tenant, and `{issuer}/.well-known/cxone-configuration` names its
//! API ([`tenant_api`]).
//!
//! ```no_run
//! use tower_auth_refresh::oauth2::{default_transport, nice_cxone};
//! use tower_auth_refresh::AuthLayer;
//!
//! # async fn run() -> Result<(), tower::BoxError> {
//! let transport = default_transport();
//! let metadata = nice_cxone::metadata(&transport).await?;
//! let access_key = nice_cxone::AccessKey::new(
//!     std::env::var("CXONE_ACCESS_KEY_ID")?,
//!     std::env::var("CXONE_ACCESS_KEY_SECRET")?,
//! );
//! let provider = nice_cxone::access_key_grant(
//!     &metadata,
//!     std::env::var("CXONE_CLIENT_ID")?,
//!     std::env::var("CXONE_CLIENT_SECRET")?,
//!     access_key,
//! )
//! .transport(transport.clone())
//! .build()?;
//! let auth = AuthLayer::new(provider);
//! // The first token, which the layer then uses for the first requests too.
//! let token = auth.cache().token().await?;
//! let api = nice_cxone::tenant_api(&transport, &metadata, &token).await?;
//! let agents = api.url("/inContactAPI/services/v31.0/agents?skip=0&top=100");
//! # drop(agents);
//! # Ok(())
//! # }
//! ```

use std::fmt;

use http::{Request, StatusCode};
use http_body_util::Full;
use serde_json::Value;

use super::transport::send;
use super::{
    checked_url, discover, form, ClientCredentials, ClientCredentialsBuilder, HttpTransport,
    PasswordGrant, PasswordGrantBuilder, ProviderMetadata, RefreshTokenGrant,
    RefreshTokenGrantBuilder, Secret,
};
use crate::error::{displayable_url, AuthError};
use crate::Token;

/// The CXone identity provider.
pub const ISSUER: &str = "https://cxone.niceincontact.com";

/// The CXone identity provider's metadata.
pub async fn metadata(transport: &HttpTransport) -> Result<ProviderMetadata, AuthError> {
    discover(ISSUER, transport, false).await
}

/// An API user's access key: the id, and the secret CXone shows once when it is generated.
///
/// `Debug` shows the id and redacts the secret.
#[derive(Clone)]
pub struct AccessKey {
    id: String,
    secret: Secret,
}

impl AccessKey {
    /// The key pair generated in CXone (My Profile or Employees, Access Keys).
    pub fn new(id: impl Into<String>, secret: impl Into<Secret>) -> Self {
        Self {
            id: id.into(),
            secret: secret.into(),
        }
    }
}

impl fmt::Debug for AccessKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessKey")
            .field("id", &self.id)
            .field("secret", &self.secret)
            .finish()
    }
}

/// The back-end flow: the password grant with an access key, at the token endpoint CXone
/// publishes, with the client authentication it accepts, then refresh tokens (rotation kept),
/// and the access key again when a refresh token is refused.
///
/// `client_id` and `client_secret` are the application's, from its registration with NICE.
pub fn access_key_grant(
    metadata: &ProviderMetadata,
    client_id: impl Into<String>,
    client_secret: impl Into<Secret>,
    access_key: AccessKey,
) -> PasswordGrantBuilder {
    PasswordGrant::builder(
        metadata.token_endpoint.clone(),
        client_id,
        access_key.id,
        access_key.secret,
    )
    .client_secret(client_secret)
    .auth_method(metadata.preferred_client_auth())
}

/// Client credentials at the token endpoint CXone publishes.
///
/// CXone's documentation authenticates back-end applications with an access key
/// ([`access_key_grant`]), not with this grant: use it only for an application that NICE
/// registered for the client credentials grant. Any other registration is refused
/// (`unauthorized_client`).
pub async fn client_credentials(
    transport: HttpTransport,
    client_id: impl Into<String>,
    client_secret: impl Into<Secret>,
) -> Result<ClientCredentialsBuilder, AuthError> {
    let metadata = metadata(&transport).await?;
    Ok(ClientCredentials::from_metadata(&metadata, client_id, client_secret).transport(transport))
}

/// The refresh-token grant at the token endpoint CXone publishes, for a confidential client
/// holding a refresh token from a user's login.
pub async fn refresh_token_grant(
    transport: HttpTransport,
    client_id: impl Into<String>,
    client_secret: impl Into<Secret>,
    refresh_token: impl Into<Secret>,
) -> Result<RefreshTokenGrantBuilder, AuthError> {
    let metadata = metadata(&transport).await?;
    Ok(
        RefreshTokenGrant::builder(metadata.token_endpoint.clone(), client_id, refresh_token)
            .client_secret(client_secret)
            .auth_method(metadata.preferred_client_auth())
            .transport(transport),
    )
}

/// The `tenantId` claim of the token's `id_token`, else of its access token (a JWT at CXone).
///
/// The JWT is decoded without checking its signature: the claim only chooses which CXone API
/// to call, and that API checks the token itself. Never use it for anything security-relevant.
pub fn tenant_id(token: &Token) -> Option<String> {
    let claim = |jwt: &str| {
        super::response::jwt_claims(jwt)?
            .get("tenantId")?
            .as_str()
            .filter(|id| !id.is_empty())
            .map(str::to_owned)
    };
    token
        .id_token()
        .and_then(claim)
        .or_else(|| claim(token.secret()))
}

/// Where a tenant's API lives, from `{issuer}/.well-known/cxone-configuration`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TenantApi {
    /// The tenant, from the token's `tenantId` claim.
    pub tenant_id: String,
    /// The base URL of the tenant's API, such as `https://api-na1.niceincontact.com`, without
    /// a trailing `/`.
    pub api_endpoint: String,
    /// The tenant's area (cluster), such as `na1`, when the configuration names it.
    pub area: Option<String>,
}

impl TenantApi {
    /// `path_and_query` on the tenant's API: `api.url("/inContactAPI/services/v31.0/agents")`.
    pub fn url(&self, path_and_query: &str) -> String {
        format!(
            "{}/{}",
            self.api_endpoint,
            path_and_query.trim_start_matches('/')
        )
    }
}

/// The API of the tenant `token` belongs to: its `tenantId` claim ([`tenant_id`]) looked up at
/// `{issuer}/.well-known/cxone-configuration?tenantId=<id>`.
///
/// The configuration's `api_endpoint` is used; without one, its `area` gives
/// `https://api-{area}.niceincontact.com`. The URL must be `https` (or loopback).
pub async fn tenant_api(
    transport: &HttpTransport,
    metadata: &ProviderMetadata,
    token: &Token,
) -> Result<TenantApi, AuthError> {
    let issuer = metadata.issuer.trim_end_matches('/');
    let failed = |reason: String| AuthError::Discovery {
        issuer: displayable_url(issuer),
        reason,
    };
    let tenant_id =
        tenant_id(token).ok_or_else(|| failed("the token carries no tenantId claim".into()))?;
    let url = format!(
        "{issuer}/.well-known/cxone-configuration?tenantId={}",
        form::urlencode(&tenant_id)
    );
    checked_url(&url, false)?;
    let request = Request::get(&url)
        .header(http::header::ACCEPT, "application/json")
        .body(Full::default())
        .map_err(|_| failed("the configuration URL is not valid".into()))?;
    let answer = send(transport, request).await?;
    let shown = displayable_url(&url);
    if answer.status != StatusCode::OK {
        return Err(failed(format!("{shown} answered {}", answer.status)));
    }
    let json = super::response::json_object(&answer)?;
    let text = |name: &str| {
        json.get(name)
            .and_then(Value::as_str)
            .filter(|text| !text.is_empty())
    };
    let area = text("area").map(str::to_owned);
    let api_endpoint = match (text("api_endpoint"), &area) {
        (Some(endpoint), _) => endpoint.trim_end_matches('/').to_owned(),
        (None, Some(area)) if area.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') => {
            format!("https://api-{area}.niceincontact.com")
        }
        _ => {
            return Err(failed(format!(
                "{shown} names neither an api_endpoint nor a usable area"
            )))
        }
    };
    checked_url(&api_endpoint, false)?;
    Ok(TenantApi {
        tenant_id,
        api_endpoint,
        area,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oauth2::form::base64;

    fn jwt(claims: &str) -> String {
        let payload = base64(claims.as_bytes())
            .trim_end_matches('=')
            .replace('+', "-")
            .replace('/', "_");
        format!("eyJhbGciOiJub25lIn0.{payload}.sig")
    }

    #[test]
    fn tenant_id_from_the_id_token_then_the_access_token() {
        let token = Token::new(jwt(r#"{"tenantId":"from-access"}"#))
            .with_id_token(jwt(r#"{"tenantId":"from-id"}"#));
        assert_eq!(tenant_id(&token).as_deref(), Some("from-id"));
        let token =
            Token::new(jwt(r#"{"tenantId":"from-access"}"#)).with_id_token(jwt(r#"{"sub":"x"}"#));
        assert_eq!(tenant_id(&token).as_deref(), Some("from-access"));
        assert_eq!(tenant_id(&Token::new("opaque")), None);
    }

    #[test]
    fn access_key_secret_is_redacted() {
        let key = AccessKey::new("AKID", "the-access-key-secret");
        let shown = format!("{key:?}");
        assert!(shown.contains("AKID") && !shown.contains("the-access-key-secret"));
    }
}
