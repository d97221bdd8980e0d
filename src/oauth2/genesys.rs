//! Genesys Cloud: client credentials with HTTP Basic at `https://login.{region}/oauth/token`,
//! and the per-token request limit.
//!
//! What the platform does, and what covers it here:
//! - **HTTP Basic only**, `token_type` `bearer` in lower case, **no refresh token**:
//!   [`client_credentials`] sends Basic; every new token is a client credentials request.
//! - **Token lifetime** is set per OAuth client, from 300 s to 48 h (24 h by default): a batch
//!   that outlives it meets expiry mid-run, which [`AuthLayer`](crate::AuthLayer) refreshes
//!   ahead of time from `expires_in`.
//! - **HIPAA idle timeout**: an organisation with HIPAA settings refuses a token that was not
//!   used for 15 minutes, long before its expiry. The API answers 401, and the layer fetches one
//!   new token and replays the request once.
//! - **Per-token request limit**: requests made with one client-credentials token are limited
//!   (`client.credentials.token.rate.per.minute`, [`PER_TOKEN_REQUESTS_PER_MINUTE`] by default),
//!   beyond which the API answers 429 with `Retry-After`. [`per_token_rate_limit`] keeps a
//!   client under it. A fleet of workers that share one token through a
//!   [`TokenStore`](crate::TokenStore) (Redis) shares **one** limit: give each of `n` workers
//!   [`rate_limit`]`(PER_TOKEN_REQUESTS_PER_MINUTE / n)`. Workers with tokens of their own each
//!   have a limit, at the cost of one token request each per refresh.
//!
//! ```no_run
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use hyper_util::{client::legacy::Client, rt::TokioExecutor};
//! use tower::ServiceBuilder;
//! use tower_auth_refresh::oauth2::genesys::{self, Region};
//! use tower_auth_refresh::{AuthLayer, ReplayBody};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), tower_auth_refresh::AuthError> {
//! let hyper_client = Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Full<Bytes>>>();
//! let provider = genesys::client_credentials(Region::EuWest1, "client-id", "client-secret").build()?;
//! let auth = AuthLayer::new(provider);
//! let client = ServiceBuilder::new()
//!     .layer(auth)
//!     // `RateLimit` is not `Clone`: a `Buffer` shares one limiter among clones.
//!     .buffer(64)
//!     .layer(genesys::per_token_rate_limit())
//!     .service(hyper_client);
//! // Requests go to Region::EuWest1.api_base(), https://api.mypurecloud.ie
//! # drop(client);
//! # Ok(())
//! # }
//! ```

use std::time::Duration;

use tower::limit::RateLimitLayer;

use super::{ClientAuth, ClientCredentials, ClientCredentialsBuilder, Secret};

/// Requests a minute allowed with one client-credentials token, unless Genesys raised the
/// organisation's `client.credentials.token.rate.per.minute`.
pub const PER_TOKEN_REQUESTS_PER_MINUTE: u64 = 300;

/// A rate limit that keeps requests made with one token under
/// [`PER_TOKEN_REQUESTS_PER_MINUTE`]. See [`rate_limit`].
pub fn per_token_rate_limit() -> RateLimitLayer {
    rate_limit(PER_TOKEN_REQUESTS_PER_MINUTE)
}

/// A rate limit that lets no 60-second interval hold more than `requests_per_minute` requests
/// (at least 1), whenever it starts.
///
/// The requests are spaced evenly, `60 s / (n - 1)` apart, rather than allowed in bursts of `n`
/// a minute: a limiter's minute and the server's do not start together, and a burst at the
/// end of one limiter minute followed by one at the start of the next would put nearly `2n`
/// requests in one server minute. The price is a throughput of `n - 1` a minute.
///
/// Place it below [`AuthLayer`](crate::AuthLayer), so that replays after a 401 are counted,
/// behind a `Buffer` when the service is cloned: clones of a `Buffer` share one limiter, while
/// each `RateLimit` counts only its own requests.
pub fn rate_limit(requests_per_minute: u64) -> RateLimitLayer {
    let minute = Duration::from_secs(60);
    let spacing = match requests_per_minute.saturating_sub(1) {
        0 => minute,
        gaps => minute / u32::try_from(gaps).unwrap_or(u32::MAX),
    };
    RateLimitLayer::new(1, spacing)
}

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
/// authenticated with HTTP Basic, the only client authentication Genesys accepts.
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

    #[test]
    fn rate_limit_spaces_requests_so_no_minute_holds_more_than_the_limit() {
        // 299 gaps of 60/299 s: the 1st and the 300th request at most 60 s apart, the 301st
        // more than 60 s after the 1st.
        let spacing = Duration::from_secs(60) / 299;
        assert!(spacing * 299 <= Duration::from_secs(60));
        assert!(spacing * 300 > Duration::from_secs(60));
        let _ = per_token_rate_limit();
        let _ = rate_limit(0);
        let _ = rate_limit(1);
    }
}
