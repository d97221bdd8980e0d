//! NICE CXone: client credentials and refresh-token flows, configured from the CXone identity
//! provider's published metadata (OpenID Connect discovery at [`ISSUER`]).
//!
//! ```no_run
//! use tower_auth_refresh::oauth2::{default_transport, nice_cxone};
//! use tower_auth_refresh::AuthLayer;
//!
//! # async fn run() -> Result<(), tower_auth_refresh::AuthError> {
//! let provider = nice_cxone::client_credentials(default_transport(), "client-id", "client-secret")
//!     .await?
//!     .build()?;
//! let auth = AuthLayer::new(provider);
//! # drop(auth);
//! # Ok(())
//! # }
//! ```

use super::{
    discover, ClientCredentials, ClientCredentialsBuilder, HttpTransport, ProviderMetadata,
    RefreshTokenGrant, RefreshTokenGrantBuilder, Secret,
};
use crate::error::AuthError;

/// The CXone identity provider.
pub const ISSUER: &str = "https://cxone.niceincontact.com";

/// The CXone identity provider's metadata.
pub async fn metadata(transport: &HttpTransport) -> Result<ProviderMetadata, AuthError> {
    discover(ISSUER, transport, false).await
}

/// Client credentials at the token endpoint CXone publishes, with the client authentication it
/// accepts.
pub async fn client_credentials(
    transport: HttpTransport,
    client_id: impl Into<String>,
    client_secret: impl Into<Secret>,
) -> Result<ClientCredentialsBuilder, AuthError> {
    let metadata = metadata(&transport).await?;
    Ok(ClientCredentials::from_metadata(&metadata, client_id, client_secret).transport(transport))
}

/// The refresh-token grant at the token endpoint CXone publishes, for a confidential client.
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
