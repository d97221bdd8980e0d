//! Which responses mean "token rejected", and which requests may be replayed.
//!
//! The defaults follow RFC 6750: a `401 Unauthorized` says the credentials were refused before
//! the request was acted on, so any request may be replayed once with a new token. APIs that
//! answer an expired token with `403` and `WWW-Authenticate: Bearer error="invalid_token"` can
//! opt in to [`unauthorized_or_invalid_token`]; callers that want to be conservative can replay
//! only idempotent methods with [`idempotent`].

use http::header::WWW_AUTHENTICATE;
use http::{request, HeaderMap, StatusCode};

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
        && headers
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .any(bearer_invalid_token)
}

fn bearer_invalid_token(challenge: &str) -> bool {
    let Some((scheme, params)) = challenge.trim_start().split_once(' ') else {
        return false;
    };
    scheme.eq_ignore_ascii_case("bearer")
        && params.split(',').any(|param| {
            param.split_once('=').is_some_and(|(name, value)| {
                name.trim().eq_ignore_ascii_case("error")
                    && value.trim().trim_matches('"') == "invalid_token"
            })
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

    proptest::proptest! {
        #[test]
        fn any_challenge_is_read_without_panicking(challenge in "\\PC{0,120}") {
            let _ = bearer_invalid_token(&challenge);
            if let Ok(value) = http::HeaderValue::from_str(&challenge) {
                let mut headers = HeaderMap::new();
                headers.insert(WWW_AUTHENTICATE, value);
                let _ = unauthorized_or_invalid_token(StatusCode::FORBIDDEN, &headers);
            }
        }
    }

    #[test]
    fn challenge_parsing_is_strict_about_scheme_and_value() {
        assert!(bearer_invalid_token(r#"Bearer error="invalid_token""#));
        assert!(bearer_invalid_token(
            r#"bearer realm="x",error=invalid_token"#
        ));
        assert!(!bearer_invalid_token(r#"Basic error="invalid_token""#));
        assert!(!bearer_invalid_token(
            r#"Bearer error="insufficient_scope""#
        ));
        assert!(!bearer_invalid_token("Bearer"));
        assert!(!bearer_invalid_token(""));
    }
}
