//! Errors raised by this crate.
//!
//! [`AuthService`](crate::AuthService) returns `tower::BoxError`, so that errors of the inner
//! service pass through untouched. Errors raised here are [`AuthError`]s inside that box:
//!
//! ```
//! use tower_auth_refresh::AuthError;
//!
//! fn explain(error: &tower::BoxError) -> &'static str {
//!     match error.downcast_ref::<AuthError>() {
//!         Some(AuthError::Refresh { .. }) => "the identity provider refused or failed",
//!         Some(AuthError::RefreshTimeout { .. }) => "the identity provider is too slow",
//!         Some(AuthError::Backoff { .. }) => "waiting before asking the identity provider again",
//!         Some(_) => "another token problem",
//!         None => "the request itself failed",
//!     }
//! }
//! # let _ = explain;
//! ```

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;

/// A shareable error source: one failed refresh is reported to every request that waited on it.
pub(crate) type SharedSource = Arc<dyn StdError + Send + Sync + 'static>;

/// Why a request could not be given a token.
///
/// Cloneable because a single refresh answers many waiting requests. No variant ever contains a
/// token or a client secret.
#[derive(Clone)]
#[non_exhaustive]
pub enum AuthError {
    /// The token provider returned an error; `source()` is that error.
    Refresh {
        /// What the provider reported.
        source: SharedSource,
    },
    /// The token provider did not answer within the refresh timeout.
    RefreshTimeout {
        /// The timeout that elapsed.
        timeout: Duration,
    },
    /// The last refresh failed and the next one is not due yet; `source()` is the last failure.
    ///
    /// Backing off keeps a struggling identity provider from being hammered by every request.
    Backoff {
        /// How long until the next refresh may be attempted.
        retry_in: Duration,
        /// The failure that started the backoff.
        last_error: Box<AuthError>,
    },
    /// The token (or the configured scheme) cannot be sent in an HTTP header, for example because
    /// it contains a line break. It is never sent.
    InvalidHeaderValue,
    /// The token provider panicked. The cache recovers: the next refresh calls it again.
    ProviderPanicked,
    /// A refresh was needed outside a Tokio runtime; the cache runs refreshes on Tokio tasks.
    NoRuntime,
    /// A refresh was needed on a Tokio runtime built without its timer (`enable_time`); the
    /// cache bounds every provider call with a timeout.
    NoTimer,
    /// The token endpoint refused the request with an RFC 6749 error response.
    TokenEndpoint(TokenEndpointError),
    /// The token endpoint answered 429 or 503. The cache waits at least `retry_after` before the
    /// next attempt.
    Throttled {
        /// 429 or 503.
        status: StatusCode,
        /// What the `Retry-After` header asked for, if it was readable.
        retry_after: Option<Duration>,
    },
    /// The token endpoint's answer is not a token response: not JSON, truncated, or missing
    /// `access_token`. `excerpt` is at most the first 200 bytes, withheld if it may hold a token.
    MalformedResponse {
        /// The HTTP status of the answer.
        status: StatusCode,
        /// What went wrong, and the start of the body.
        excerpt: String,
    },
    /// The token endpoint issued a token that is not a bearer token.
    UnsupportedTokenType {
        /// The `token_type` it sent.
        token_type: String,
    },
    /// The token endpoint answered with a redirect. It is not followed: that would send the
    /// client secret to another URL.
    Redirected {
        /// The 3xx status.
        status: StatusCode,
        /// Where it pointed.
        location: Option<String>,
    },
    /// A token or metadata URL that is not `https` (nor loopback), and plain HTTP was not
    /// allowed.
    InsecureUrl {
        /// The refused URL.
        url: String,
    },
    /// The token endpoint could not be reached; `source()` says why.
    Transport {
        /// The transport's error.
        source: SharedSource,
    },
    /// The identity provider's metadata could not be used.
    Discovery {
        /// The issuer that was asked.
        issuer: String,
        /// What was wrong.
        reason: String,
    },
    /// A refresh-token grant has no refresh token (none was given, or the last was rejected)
    /// and no fallback was configured.
    NoRefreshToken,
}

/// An RFC 6749 (section 5.2) error response from a token endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TokenEndpointError {
    /// The HTTP status of the answer (usually 400 or 401).
    pub status: StatusCode,
    /// The `error` code.
    pub code: ErrorCode,
    /// The `error_description`, if any.
    pub description: Option<String>,
    /// The `error_uri`, if any.
    pub uri: Option<String>,
}

/// The `error` code of an RFC 6749 error response.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorCode {
    /// `invalid_request`
    InvalidRequest,
    /// `invalid_client`: client authentication failed (wrong id or secret).
    InvalidClient,
    /// `invalid_grant`: the refresh token (or code) is invalid, expired or revoked.
    InvalidGrant,
    /// `unauthorized_client`: this client may not use this grant type.
    UnauthorizedClient,
    /// `unsupported_grant_type`
    UnsupportedGrantType,
    /// `invalid_scope`
    InvalidScope,
    /// Any other code, as sent.
    Other(String),
}

impl ErrorCode {
    /// The code as RFC 6749 spells it.
    pub fn parse(code: &str) -> Self {
        match code {
            "invalid_request" => ErrorCode::InvalidRequest,
            "invalid_client" => ErrorCode::InvalidClient,
            "invalid_grant" => ErrorCode::InvalidGrant,
            "unauthorized_client" => ErrorCode::UnauthorizedClient,
            "unsupported_grant_type" => ErrorCode::UnsupportedGrantType,
            "invalid_scope" => ErrorCode::InvalidScope,
            other => ErrorCode::Other(other.to_owned()),
        }
    }

    /// The code as RFC 6749 spells it.
    pub fn as_str(&self) -> &str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::InvalidClient => "invalid_client",
            ErrorCode::InvalidGrant => "invalid_grant",
            ErrorCode::UnauthorizedClient => "unauthorized_client",
            ErrorCode::UnsupportedGrantType => "unsupported_grant_type",
            ErrorCode::InvalidScope => "invalid_scope",
            ErrorCode::Other(other) => other,
        }
    }
}

impl fmt::Display for TokenEndpointError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the token endpoint refused the request ({}, {})",
            self.status,
            self.code.as_str()
        )?;
        if let Some(description) = &self.description {
            write!(f, ": {description}")?;
        }
        Ok(())
    }
}

impl AuthError {
    /// Wrap a provider's error. An `AuthError` the provider raised itself (as the `oauth2`
    /// providers do) is kept as it is, so a program can match on it.
    pub(crate) fn refresh(source: impl Into<tower::BoxError>) -> Self {
        let source: tower::BoxError = source.into();
        match source.downcast::<AuthError>() {
            Ok(error) => *error,
            Err(source) => AuthError::Refresh {
                source: Arc::from(source),
            },
        }
    }

    pub(crate) fn transport(source: impl Into<tower::BoxError>) -> Self {
        let source: tower::BoxError = source.into();
        AuthError::Transport {
            source: Arc::from(source),
        }
    }

    /// How long the identity provider asked us to wait, for errors that carry it.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            AuthError::Throttled { retry_after, .. } => *retry_after,
            AuthError::Backoff { retry_in, .. } => Some(*retry_in),
            _ => None,
        }
    }

    /// The RFC 6749 error code, when the token endpoint refused the request.
    pub fn error_code(&self) -> Option<&ErrorCode> {
        match self {
            AuthError::TokenEndpoint(error) => Some(&error.code),
            AuthError::Backoff { last_error, .. } => last_error.error_code(),
            _ => None,
        }
    }
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthError::Refresh { .. } => f.write_str("token refresh failed: the token provider returned an error"),
            AuthError::RefreshTimeout { timeout } => write!(
                f,
                "token refresh failed: the token provider did not answer within {timeout:?}"
            ),
            AuthError::Backoff { retry_in, .. } => write!(
                f,
                "no valid token: the last refresh failed and the next attempt is due in {retry_in:?}"
            ),
            AuthError::InvalidHeaderValue => f.write_str(
                "the token or its scheme contains bytes that are not allowed in an HTTP header; it was not sent",
            ),
            AuthError::ProviderPanicked => f.write_str("token refresh failed: the token provider panicked"),
            AuthError::NoRuntime => f.write_str(
                "token refresh needs a Tokio runtime, and none is running on this thread",
            ),
            AuthError::NoTimer => f.write_str(
                "token refresh needs the Tokio runtime's timer; build the runtime with `enable_time` (or `enable_all`)",
            ),
            AuthError::TokenEndpoint(error) => fmt::Display::fmt(error, f),
            AuthError::Throttled { status, retry_after } => {
                write!(f, "the token endpoint is rate limiting ({status})")?;
                match retry_after {
                    Some(wait) => write!(f, "; it asked to wait {wait:?}"),
                    None => Ok(()),
                }
            }
            AuthError::MalformedResponse { status, excerpt } => write!(
                f,
                "the token endpoint's answer ({status}) is not a usable token response: {excerpt}"
            ),
            AuthError::UnsupportedTokenType { token_type } => write!(
                f,
                "the token endpoint issued a {token_type:?} token; only Bearer tokens are supported"
            ),
            AuthError::Redirected { status, location } => write!(
                f,
                "the token endpoint answered {status} with a redirect to {}; redirects are not followed, they would carry the client secret elsewhere",
                location.as_deref().unwrap_or("nowhere")
            ),
            AuthError::InsecureUrl { url } => write!(
                f,
                "refusing to send credentials to {url}: not https; allow plain HTTP explicitly for non-loopback hosts"
            ),
            AuthError::Transport { .. } => f.write_str("the token endpoint could not be reached"),
            AuthError::Discovery { issuer, reason } => write!(
                f,
                "the metadata of identity provider {issuer} cannot be used: {reason}"
            ),
            AuthError::NoRefreshToken => f.write_str(
                "no refresh token to use (none was given, or the last one was rejected) and no fallback is configured",
            ),
        }
    }
}

impl fmt::Debug for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthError::Refresh { source } => f
                .debug_struct("Refresh")
                .field("source", &source.to_string())
                .finish(),
            AuthError::RefreshTimeout { timeout } => f
                .debug_struct("RefreshTimeout")
                .field("timeout", timeout)
                .finish(),
            AuthError::Backoff {
                retry_in,
                last_error,
            } => f
                .debug_struct("Backoff")
                .field("retry_in", retry_in)
                .field("last_error", last_error)
                .finish(),
            AuthError::InvalidHeaderValue => f.write_str("InvalidHeaderValue"),
            AuthError::ProviderPanicked => f.write_str("ProviderPanicked"),
            AuthError::NoRuntime => f.write_str("NoRuntime"),
            AuthError::NoTimer => f.write_str("NoTimer"),
            AuthError::TokenEndpoint(error) => f.debug_tuple("TokenEndpoint").field(error).finish(),
            AuthError::Throttled {
                status,
                retry_after,
            } => f
                .debug_struct("Throttled")
                .field("status", status)
                .field("retry_after", retry_after)
                .finish(),
            AuthError::MalformedResponse { status, excerpt } => f
                .debug_struct("MalformedResponse")
                .field("status", status)
                .field("excerpt", excerpt)
                .finish(),
            AuthError::UnsupportedTokenType { token_type } => f
                .debug_struct("UnsupportedTokenType")
                .field("token_type", token_type)
                .finish(),
            AuthError::Redirected { status, location } => f
                .debug_struct("Redirected")
                .field("status", status)
                .field("location", location)
                .finish(),
            AuthError::InsecureUrl { url } => {
                f.debug_struct("InsecureUrl").field("url", url).finish()
            }
            AuthError::Transport { source } => f
                .debug_struct("Transport")
                .field("source", &source.to_string())
                .finish(),
            AuthError::Discovery { issuer, reason } => f
                .debug_struct("Discovery")
                .field("issuer", issuer)
                .field("reason", reason)
                .finish(),
            AuthError::NoRefreshToken => f.write_str("NoRefreshToken"),
        }
    }
}

impl StdError for AuthError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            AuthError::Refresh { source } => Some(&**source),
            AuthError::Backoff { last_error, .. } => Some(&**last_error),
            AuthError::Transport { source } => Some(&**source),
            _ => None,
        }
    }
}

impl StdError for TokenEndpointError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_error_keeps_the_provider_error_as_source() {
        let error = AuthError::refresh("connection refused");
        assert_eq!(
            error.source().map(ToString::to_string).as_deref(),
            Some("connection refused")
        );
        let boxed: tower::BoxError = Box::new(error);
        assert!(matches!(
            boxed.downcast_ref::<AuthError>(),
            Some(AuthError::Refresh { .. })
        ));
    }

    #[test]
    fn backoff_chains_to_the_failure_behind_it() {
        let error = AuthError::Backoff {
            retry_in: Duration::from_secs(2),
            last_error: Box::new(AuthError::RefreshTimeout {
                timeout: Duration::from_secs(30),
            }),
        };
        let chain: Vec<String> =
            std::iter::successors(Some(&error as &(dyn StdError + 'static)), |e| (*e).source())
                .map(ToString::to_string)
                .collect();
        assert_eq!(chain.len(), 2);
        assert!(chain[0].contains("next attempt is due in 2s"), "{chain:?}");
        assert!(chain[1].contains("within 30s"), "{chain:?}");
    }
}
