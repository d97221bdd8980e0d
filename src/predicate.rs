//! Which responses mean "token rejected", and which requests may be replayed.
//!
//! The defaults follow RFC 6750: a `401 Unauthorized` says the credentials were refused before
//! the request was acted on, so any request may be replayed once with a new token. APIs that
//! answer an expired token with `403` and `WWW-Authenticate: Bearer error="invalid_token"` can
//! opt in to [`unauthorized_or_invalid_token`]; callers that want to be conservative can replay
//! only idempotent methods with [`idempotent`].

use http::{request, HeaderMap, StatusCode};

use crate::challenge::challenges;

/// Decides from a response's status and headers whether the API rejected the token.
pub type RejectionPredicate = dyn Fn(StatusCode, &HeaderMap) -> bool + Send + Sync;

/// Decides from a request's head whether it may be replayed after a rejection.
pub type ReplayPredicate = dyn Fn(&request::Parts) -> bool + Send + Sync;

/// The default rejection test: status `401 Unauthorized`.
///
/// ```
/// use http::{HeaderMap, StatusCode};
/// use tower_auth_refresh::predicate::unauthorized;
///
/// assert!(unauthorized(StatusCode::UNAUTHORIZED, &HeaderMap::new()));
/// assert!(!unauthorized(StatusCode::FORBIDDEN, &HeaderMap::new()));
/// ```
pub fn unauthorized(status: StatusCode, _headers: &HeaderMap) -> bool {
    status == StatusCode::UNAUTHORIZED
}

/// `401`, or `403` whose `WWW-Authenticate` challenge says `error="invalid_token"` (RFC 6750
/// section 3.1). A plain `403` (forbidden for this user) is not a token problem and is not
/// replayed.
///
/// ```
/// use http::{HeaderMap, HeaderValue, StatusCode};
/// use tower_auth_refresh::predicate::unauthorized_or_invalid_token;
///
/// let mut headers = HeaderMap::new();
/// headers.insert(
///     "www-authenticate",
///     HeaderValue::from_static(r#"Bearer realm="api", error="invalid_token""#),
/// );
/// assert!(unauthorized_or_invalid_token(StatusCode::FORBIDDEN, &headers));
/// assert!(!unauthorized_or_invalid_token(StatusCode::FORBIDDEN, &HeaderMap::new()));
/// ```
pub fn unauthorized_or_invalid_token(status: StatusCode, headers: &HeaderMap) -> bool {
    if status == StatusCode::UNAUTHORIZED {
        return true;
    }
    status == StatusCode::FORBIDDEN
        && challenges(headers).iter().any(|challenge| {
            challenge.is("bearer") && challenge.param("error") == Some("invalid_token")
        })
}

/// Replay only methods RFC 9110 calls idempotent (GET, HEAD, OPTIONS, TRACE, PUT, DELETE).
///
/// ```
/// use tower_auth_refresh::predicate::idempotent;
///
/// let (get, _) = http::Request::get("/").body(()).unwrap().into_parts();
/// let (post, _) = http::Request::post("/").body(()).unwrap().into_parts();
/// assert!(idempotent(&get));
/// assert!(!idempotent(&post));
/// ```
pub fn idempotent(parts: &request::Parts) -> bool {
    use http::Method;
    matches!(
        parts.method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::WWW_AUTHENTICATE;

    fn forbidden_with(challenge: &str) -> bool {
        let mut headers = HeaderMap::new();
        headers.insert(
            WWW_AUTHENTICATE,
            http::HeaderValue::from_str(challenge).unwrap(),
        );
        unauthorized_or_invalid_token(StatusCode::FORBIDDEN, &headers)
    }

    proptest::proptest! {
        #[test]
        fn any_challenge_is_read_without_panicking(challenge in "\\PC{0,120}") {
            if let Ok(value) = http::HeaderValue::from_str(&challenge) {
                let mut headers = HeaderMap::new();
                headers.insert(WWW_AUTHENTICATE, value);
                let _ = unauthorized_or_invalid_token(StatusCode::FORBIDDEN, &headers);
            }
        }
    }

    #[test]
    fn challenge_parsing_is_strict_about_scheme_and_value() {
        assert!(forbidden_with(r#"Bearer error="invalid_token""#));
        assert!(forbidden_with(r#"bearer realm="x",error=invalid_token"#));
        assert!(forbidden_with(
            r#"Basic realm="x", Bearer error="invalid_token""#
        ));
        assert!(!forbidden_with(r#"Basic error="invalid_token""#));
        assert!(!forbidden_with(r#"Bearer error="insufficient_scope""#));
        assert!(!forbidden_with("Bearer"));
        assert!(!forbidden_with(""));
    }
}
