//! Genesys Cloud: client credentials with HTTP Basic at `https://login.{region}/oauth/token`.
//!
//! Genesys Cloud tokens live 24 hours by default (configurable per OAuth client, down to a few
//! minutes). A batch that runs longer than that, or an administrator who shortens it, meets
//! expiry mid-run: exactly what [`AuthLayer`](crate::AuthLayer) absorbs.
//!
//! ```no_run
//! use tower_auth_refresh::oauth2::genesys::{self, Region};
//! use tower_auth_refresh::AuthLayer;
//!
//! # fn main() -> Result<(), tower_auth_refresh::AuthError> {
//! let provider = genesys::client_credentials(Region::EuWest1, "client-id", "client-secret").build()?;
//! let auth = AuthLayer::new(provider);
//! // Requests go to Region::EuWest1.api_base(), https://api.mypurecloud.ie
//! # drop(auth);
//! # Ok(())
//! # }
//! ```

use super::{ClientAuth, ClientCredentials, ClientCredentialsBuilder, Secret};

/// A Genesys Cloud region, by the domain its organisation lives on.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Region {
    /// Americas (US East): `mypurecloud.com`
    UsEast1,
    /// Americas (US East 2, FedRAMP): `use2.us-gov-pure.cloud`
    UsEast2,
    /// Americas (US West): `usw2.pure.cloud`
    UsWest2,
    /// Americas (Canada): `cac1.pure.cloud`
    CaCentral1,
    /// Americas (São Paulo): `sae1.pure.cloud`
    SaEast1,
    /// EMEA (Dublin): `mypurecloud.ie`
    EuWest1,
    /// EMEA (London): `euw2.pure.cloud`
    EuWest2,
    /// EMEA (Frankfurt): `mypurecloud.de`
    EuCentral1,
    /// EMEA (Zurich): `euc2.pure.cloud`
    EuCentral2,
    /// EMEA (UAE): `mec1.pure.cloud`
    MeCentral1,
    /// Asia Pacific (Mumbai): `aps1.pure.cloud`
    ApSouth1,
    /// Asia Pacific (Seoul): `apne2.pure.cloud`
    ApNortheast2,
    /// Asia Pacific (Osaka): `apne3.pure.cloud`
    ApNortheast3,
    /// Asia Pacific (Tokyo): `mypurecloud.jp`
    ApNortheast1,
    /// Asia Pacific (Sydney): `mypurecloud.com.au`
    ApSoutheast2,
    /// Any other domain, such as a region added after this release.
    Domain(String),
}

impl Region {
    /// The domain, such as `mypurecloud.com`.
    pub fn domain(&self) -> &str {
        match self {
            Region::UsEast1 => "mypurecloud.com",
            Region::UsEast2 => "use2.us-gov-pure.cloud",
            Region::UsWest2 => "usw2.pure.cloud",
            Region::CaCentral1 => "cac1.pure.cloud",
            Region::SaEast1 => "sae1.pure.cloud",
            Region::EuWest1 => "mypurecloud.ie",
            Region::EuWest2 => "euw2.pure.cloud",
            Region::EuCentral1 => "mypurecloud.de",
            Region::EuCentral2 => "euc2.pure.cloud",
            Region::MeCentral1 => "mec1.pure.cloud",
            Region::ApSouth1 => "aps1.pure.cloud",
            Region::ApNortheast2 => "apne2.pure.cloud",
            Region::ApNortheast3 => "apne3.pure.cloud",
            Region::ApNortheast1 => "mypurecloud.jp",
            Region::ApSoutheast2 => "mypurecloud.com.au",
            Region::Domain(domain) => domain,
        }
    }

    /// The token endpoint: `https://login.{domain}/oauth/token`.
    pub fn token_url(&self) -> String {
        format!("https://login.{}/oauth/token", self.domain())
    }

    /// The base of the Platform API: `https://api.{domain}`.
    pub fn api_base(&self) -> String {
        format!("https://api.{}", self.domain())
    }
}

/// Client credentials for a Genesys Cloud OAuth client of the "Client Credentials" grant type,
/// authenticated with HTTP Basic as Genesys requires.
pub fn client_credentials(
    region: Region,
    client_id: impl Into<String>,
    client_secret: impl Into<Secret>,
) -> ClientCredentialsBuilder {
    ClientCredentials::builder(region.token_url(), client_id, client_secret)
        .auth_method(ClientAuth::Basic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_map_to_login_and_api_hosts() {
        assert_eq!(
            Region::UsEast1.token_url(),
            "https://login.mypurecloud.com/oauth/token"
        );
        assert_eq!(Region::UsWest2.api_base(), "https://api.usw2.pure.cloud");
        assert_eq!(
            Region::Domain("example.pure.cloud".into()).token_url(),
            "https://login.example.pure.cloud/oauth/token"
        );
    }
}
