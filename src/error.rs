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
}

impl AuthError {
    pub(crate) fn refresh(source: impl Into<tower::BoxError>) -> Self {
        let source: tower::BoxError = source.into();
        AuthError::Refresh {
            source: Arc::from(source),
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
        }
    }
}

impl StdError for AuthError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            AuthError::Refresh { source } => Some(&**source),
            AuthError::Backoff { last_error, .. } => Some(&**last_error),
            _ => None,
        }
    }
}

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
