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
    /// The token endpoint issued a token of another type than the token source asks for:
    /// `Bearer`, or `DPoP` when it has a DPoP key. A `Bearer` answer to a request with a DPoP
    /// proof is refused too: the server ignored the proof, and the token would work for whoever
    /// steals it.
    UnsupportedTokenType {
        /// The `token_type` it sent.
        token_type: String,
    },
    /// The token endpoint answered with a redirect. It is not followed: that would send the
    /// client secret to another URL.
    Redirected {
        /// The 3xx status.
        status: StatusCode,
        /// Where it pointed, as far as it is safe to show: `scheme://host[:port]/path`, without
        /// the user name, password, query or fragment, which may carry secrets.
        location: Option<String>,
    },
    /// A token or metadata URL that is not `https` (nor loopback), and plain HTTP was not
    /// allowed.
    InsecureUrl {
        /// The refused URL, as far as it is safe to show: `scheme://host[:port]/path`.
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
    /// A DPoP proof could not be made (the key, or a request URI without scheme and authority).
    #[cfg(feature = "dpop")]
    Dpop(crate::dpop::DpopError),
}

/// An RFC 6749 (section 5.2) error response from a token endpoint.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TokenEndpointError {
    /// The HTTP status of the answer (usually 400 or 401).
    pub status: StatusCode,
    /// The `error` code.
    pub code: ErrorCode,
    /// The `error_description`, if any, as the server sent it (at most 500 characters).
    ///
    /// The server controls this text: `Display` and `Debug` show it with control characters
    /// escaped and at most 200 characters; print it yourself only with the same care.
    pub description: Option<String>,
    /// The `error_uri`, if any, as the server sent it (at most 500 characters). `Debug` shows
    /// it as `scheme://host[:port]/path`.
    pub uri: Option<String>,
}

/// The `error` code of an RFC 6749 error response.
#[derive(Clone, PartialEq, Eq)]
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

/// The most of an `error` code shown: RFC 6749 codes are short.
const MAX_CODE: usize = 64;
/// The most of an `error_description` shown.
const MAX_DESCRIPTION: usize = 200;
/// The most of a URL shown.
const MAX_URL: usize = 200;
/// The most of any other text shown.
const MAX_TEXT: usize = 600;

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorCode::InvalidRequest => f.write_str("InvalidRequest"),
            ErrorCode::InvalidClient => f.write_str("InvalidClient"),
            ErrorCode::InvalidGrant => f.write_str("InvalidGrant"),
            ErrorCode::UnauthorizedClient => f.write_str("UnauthorizedClient"),
            ErrorCode::UnsupportedGrantType => f.write_str("UnsupportedGrantType"),
            ErrorCode::InvalidScope => f.write_str("InvalidScope"),
            ErrorCode::Other(code) => f
                .debug_tuple("Other")
                .field(&Shown(displayable(code, MAX_CODE)))
                .finish(),
        }
    }
}

impl fmt::Display for TokenEndpointError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the token endpoint refused the request ({}, {})",
            self.status,
            displayable(self.code.as_str(), MAX_CODE)
        )?;
        if let Some(description) = &self.description {
            write!(f, ": {}", displayable(description, MAX_DESCRIPTION))?;
        }
        Ok(())
    }
}

impl fmt::Debug for TokenEndpointError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenEndpointError")
            .field("status", &self.status)
            .field("code", &self.code)
            .field(
                "description",
                &self
                    .description
                    .as_deref()
                    .map(|text| Shown(displayable(text, MAX_DESCRIPTION))),
            )
            .field(
                "uri",
                &self.uri.as_deref().map(|uri| Shown(displayable_url(uri))),
            )
            .finish()
    }
}

/// Text already made safe to show, written in quotes without a second round of escaping.
struct Shown(String);

impl fmt::Debug for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", self.0)
    }
}

/// Text that came from outside (a server, a URL) as it may be shown in a message or a log:
/// control characters, and the invisible ones that reorder or hide text (bidirectional
/// overrides, zero-width characters), escaped as `\r`, `\u{1b}`, ...; at most `max`
/// characters, the last three `...` when it was cut.
///
/// A server's text unfiltered could forge log lines (CR/LF), drive a terminal (ANSI escapes),
/// or flood a log. Idempotent: what it returns comes back unchanged.
pub(crate) fn displayable(text: &str, max: usize) -> String {
    const CUT: &str = "...";
    let mut out = String::new();
    let mut shown = 0;
    // Where to cut if the whole does not fit: the last escape that fits with room for `CUT`.
    let mut cut_at = None;
    for c in text.chars() {
        let start = out.len();
        if c.is_control() {
            out.extend(c.escape_debug());
        } else if is_invisible(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
        let width = out[start..].chars().count();
        if cut_at.is_none() && shown + width > max.saturating_sub(CUT.len()) {
            cut_at = Some(start);
        }
        shown += width;
        if shown > max {
            out.truncate(cut_at.unwrap_or(start));
            out.push_str(CUT);
            return out;
        }
    }
    out
}

/// Format characters that change how text around them reads without showing themselves.
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{061c}'
            | '\u{200b}'..='\u{200f}'
            | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{2069}'
            | '\u{feff}'
            | '\u{fff9}'..='\u{fffb}'
    )
}

/// A URL as it may be shown: `scheme://host[:port]/path`, without the user name and password,
/// the query or the fragment, any of which may carry a secret (`?client_secret=`); then
/// [`displayable`].
///
/// Parsed by hand and leniently, so that even a URL no parser accepts loses its credentials:
/// everything up to the last `@` before the path is user information.
pub(crate) fn displayable_url(url: &str) -> String {
    let is_scheme_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.');
    let scheme_len = match url.find(':') {
        Some(colon)
            if url[..colon].starts_with(|c: char| c.is_ascii_alphabetic())
                && url[..colon].chars().all(is_scheme_char) =>
        {
            colon + 1
        }
        _ => 0,
    };
    let (scheme, rest) = url.split_at(scheme_len);
    let slashes = rest.len() - rest.trim_start_matches(['/', '\\']).len();
    let (slashes, rest) = rest.split_at(slashes);
    let authority_end = rest.find(['/', '\\']).unwrap_or(rest.len());
    let (scheme, rest) = match rest[..authority_end].rfind('@') {
        // `user:password@host` without `//`: what looked like a scheme is the user name.
        Some(at) if slashes.is_empty() => ("", &rest[at + 1..]),
        Some(at) => (scheme, &rest[at + 1..]),
        None => (scheme, rest),
    };
    let rest = &rest[..rest.find(['?', '#']).unwrap_or(rest.len())];
    displayable(&format!("{scheme}{slashes}{rest}"), MAX_URL)
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
                "the token endpoint's answer ({status}) is not a usable token response: {}",
                displayable(excerpt, MAX_TEXT)
            ),
            AuthError::UnsupportedTokenType { token_type } => write!(
                f,
                "the token endpoint issued a {:?} token, not the type asked for: Bearer, or DPoP when the token source has a DPoP key",
                Shown(displayable(token_type, MAX_CODE))
            ),
            AuthError::Redirected { status, location } => write!(
                f,
                "the token endpoint answered {status} with a redirect to {}; redirects are not followed, they would carry the client secret elsewhere",
                location.as_deref().map_or_else(|| "nowhere".to_owned(), displayable_url)
            ),
            AuthError::InsecureUrl { url } => write!(
                f,
                "refusing to send credentials to {}: not https; allow plain HTTP explicitly for non-loopback hosts",
                displayable_url(url)
            ),
            AuthError::Transport { .. } => f.write_str("the token endpoint could not be reached"),
            AuthError::Discovery { issuer, reason } => write!(
                f,
                "the metadata of identity provider {} cannot be used: {}",
                displayable_url(issuer),
                displayable(reason, MAX_TEXT)
            ),
            AuthError::NoRefreshToken => f.write_str(
                "no refresh token to use (none was given, or the last one was rejected) and no fallback is configured",
            ),
            #[cfg(feature = "dpop")]
            AuthError::Dpop(error) => fmt::Display::fmt(error, f),
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
                .field("excerpt", &Shown(displayable(excerpt, MAX_TEXT)))
                .finish(),
            AuthError::UnsupportedTokenType { token_type } => f
                .debug_struct("UnsupportedTokenType")
                .field("token_type", &Shown(displayable(token_type, MAX_CODE)))
                .finish(),
            AuthError::Redirected { status, location } => f
                .debug_struct("Redirected")
                .field("status", status)
                .field(
                    "location",
                    &location
                        .as_deref()
                        .map(|location| Shown(displayable_url(location))),
                )
                .finish(),
            AuthError::InsecureUrl { url } => f
                .debug_struct("InsecureUrl")
                .field("url", &Shown(displayable_url(url)))
                .finish(),
            AuthError::Transport { source } => f
                .debug_struct("Transport")
                .field("source", &source.to_string())
                .finish(),
            AuthError::Discovery { issuer, reason } => f
                .debug_struct("Discovery")
                .field("issuer", &Shown(displayable_url(issuer)))
                .field("reason", &Shown(displayable(reason, MAX_TEXT)))
                .finish(),
            AuthError::NoRefreshToken => f.write_str("NoRefreshToken"),
            #[cfg(feature = "dpop")]
            AuthError::Dpop(error) => f.debug_tuple("Dpop").field(error).finish(),
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
    fn displayable_escapes_control_and_invisible_characters_and_caps() {
        assert_eq!(
            displayable("plain text, \"quoted\"", 200),
            "plain text, \"quoted\""
        );
        assert_eq!(displayable("é ü 日本", 200), "é ü 日本");
        assert_eq!(
            displayable("a\r\nb\u{1b}[31m\u{7}\u{202e}c\u{200b}", 200),
            r"a\r\nb\u{1b}[31m\u{7}\u{202e}c\u{200b}"
        );
        assert_eq!(displayable(&"x".repeat(10), 10), "x".repeat(10));
        assert_eq!(displayable(&"x".repeat(11), 10), "xxxxxxx...");
        // An escape is never cut in half.
        assert_eq!(displayable("xxxxx\u{1b}yyyy", 10), "xxxxx...");
    }

    #[test]
    fn displayable_url_keeps_scheme_host_port_and_path_only() {
        for (url, shown) in [
            (
                "https://idp.example/oauth/token",
                "https://idp.example/oauth/token",
            ),
            ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
            ("http://[::1]:8080/token", "http://[::1]:8080/token"),
            (
                "https://user:pa55@idp.example:8443/t?client_secret=s#f",
                "https://idp.example:8443/t",
            ),
            ("https://u:p?w@idp.example/t", "https://idp.example/t"),
            ("https://u:p@w@idp.example/a@b", "https://idp.example/a@b"),
            ("//u:p@idp.example/t", "//idp.example/t"),
            ("user:pa55@idp.example/t", "idp.example/t"),
            ("/login?token=s", "/login"),
            (
                "https://idp.example/t\r\nX: y",
                r"https://idp.example/t\r\nX: y",
            ),
            ("not a url", "not a url"),
        ] {
            assert_eq!(displayable_url(url), shown, "{url}");
        }
    }

    proptest::proptest! {
        #[test]
        fn displayable_is_bounded_printable_and_idempotent(text in "\\PC*|[\\x00-\\x1f\\u{202e}a-z]{0,300}", max in 0usize..250) {
            let shown = displayable(&text, max);
            proptest::prop_assert!(shown.chars().count() <= max.max(3));
            proptest::prop_assert!(!shown.contains(|c: char| c.is_control() || is_invisible(c)));
            proptest::prop_assert_eq!(displayable(&shown, max), shown.clone());
        }

        #[test]
        fn displayable_url_never_shows_userinfo_or_query(
            scheme in "(https?:)?(//)?",
            user in "[a-z]{0,8}",
            password in "[A-Za-z0-9?#:@]{0,8}",
            host in "[a-z.]{1,12}(:[0-9]{1,5})?",
            path in "(/[a-z@]{0,6}){0,3}",
            query in "[?#][a-z=&]{0,10}",
        ) {
            let url = format!("{scheme}ZZUSER{user}:{password}ZZSECRET@{host}{path}{query}SECRETQ");
            let shown = displayable_url(&url);
            proptest::prop_assert!(!shown.contains("ZZSECRET"), "{} -> {}", url, shown);
            proptest::prop_assert!(!shown.contains("SECRETQ"), "{} -> {}", url, shown);
            proptest::prop_assert!(!shown.contains("ZZUSER"), "{} -> {}", url, shown);
        }
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
