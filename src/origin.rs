//! Which origins a token may be sent to.
//!
//! A token is meant for one API. Scoping an [`AuthLayer`](crate::AuthLayer) to that API's
//! origins keeps the token off every other request that passes through the same client: a
//! redirect to another host, a pre-signed download URL, a webhook call. Requests to other origins
//! go out untouched: no token, no replay.

use std::fmt;

use http::uri::{Scheme, Uri};

/// A scheme, host and port, as in RFC 6454. Hosts compare case-insensitively and a missing port
/// is the scheme's default.
///
/// ```
/// use tower_auth_refresh::Origin;
///
/// let api = Origin::parse("https://api.mypurecloud.ie").unwrap();
/// let uri: http::Uri = "https://API.mypurecloud.ie:443/api/v2/users".parse().unwrap();
/// assert_eq!(Origin::of(&uri), Some(api.clone()));
/// assert_ne!(Origin::parse("http://api.mypurecloud.ie").unwrap(), api);
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    scheme: String,
    host: String,
    port: u16,
}

/// A string that is not an origin (`scheme://host[:port]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidOrigin(String);

impl fmt::Display for InvalidOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "not an origin (scheme://host[:port]): {:?}", self.0)
    }
}

impl std::error::Error for InvalidOrigin {}

impl Origin {
    /// Parse `scheme://host[:port]` (a path, if any, is ignored).
    pub fn parse(origin: &str) -> Result<Self, InvalidOrigin> {
        let uri: Uri = origin
            .parse()
            .map_err(|_| InvalidOrigin(origin.to_owned()))?;
        Self::of(&uri).ok_or_else(|| InvalidOrigin(origin.to_owned()))
    }

    /// The origin a request URI points at; `None` for a relative URI or an unknown default port.
    pub fn of(uri: &Uri) -> Option<Self> {
        let scheme = uri.scheme()?;
        let host = uri.host()?;
        let port = match uri.port_u16() {
            Some(port) => port,
            None if *scheme == Scheme::HTTPS => 443,
            None if *scheme == Scheme::HTTP => 80,
            None => return None,
        };
        Some(Self {
            scheme: scheme.as_str().to_ascii_lowercase(),
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

impl fmt::Debug for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}:{}", self.scheme, self.host, self.port)
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_ports_and_case_are_normalised() {
        let a = Origin::parse("HTTPS://Api.Example.com").unwrap();
        let b = Origin::parse("https://api.example.com:443/ignored").unwrap();
        assert_eq!(a, b);
        assert_ne!(a, Origin::parse("https://api.example.com:8443").unwrap());
        assert_ne!(a, Origin::parse("https://example.com").unwrap());
        assert!(Origin::parse("/relative").is_err());
        assert!(Origin::parse("ftp://example.com").is_err());
        assert_eq!(
            Origin::of(&"/relative".parse().unwrap()),
            None,
            "a relative URI has no origin"
        );
    }
}
