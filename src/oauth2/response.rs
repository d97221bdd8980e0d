//! Reading a token endpoint's answer (RFC 6749 sections 5.1 and 5.2).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

use super::form::base64url_decode;
use super::transport::Answer;
use crate::error::{AuthError, ErrorCode, TokenEndpointError};
use crate::Token;

/// The longest lifetime believed from `expires_in`; larger values are clamped, not overflowed.
const MAX_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The token in a successful answer, or the typed error the answer stands for. `dpop`: the
/// request carried a DPoP proof, so the token must be a `DPoP` one.
pub(crate) fn token_from(answer: &Answer, now: SystemTime, dpop: bool) -> Result<Token, AuthError> {
    if !answer.status.is_success() {
        return Err(error_from(answer));
    }
    let json = json_object(answer)?;
    let malformed = |what: &str| AuthError::MalformedResponse {
        status: answer.status,
        excerpt: what.to_owned(),
    };

    let access_token = json
        .get("access_token")
        .and_then(Value::as_str)
        .filter(|token| !token.is_empty())
        .ok_or_else(|| malformed("it has no access_token"))?;
    // RFC 6749 requires token_type; without DPoP a missing one is read as the only kind we can
    // send. With DPoP only `DPoP` will do (RFC 9449 section 5): a `Bearer` answer to a request
    // with a proof means the server ignored the proof, and its token works for whoever steals it.
    let (expected, assumed) = if dpop {
        ("DPoP", "")
    } else {
        ("Bearer", "Bearer")
    };
    let token_type = match json.get("token_type") {
        Some(token_type) => token_type.as_str().unwrap_or_default(),
        None => assumed,
    };
    if !token_type.eq_ignore_ascii_case(expected) {
        return Err(AuthError::UnsupportedTokenType {
            token_type: token_type.chars().take(40).collect(),
        });
    }

    let mut token = Token::new(access_token);
    let lifetime =
        match json.get("expires_in") {
            Some(value) => Some(expires_in(value).ok_or_else(|| {
                malformed("its expires_in is not a number of seconds zero or more")
            })?),
            None => jwt_lifetime(access_token, now),
        };
    if let Some(lifetime) = lifetime {
        token = token.with_expires_in(lifetime.min(MAX_LIFETIME));
    }
    if let Some(refresh_token) = json.get("refresh_token").and_then(Value::as_str) {
        token = token.with_refresh_token(refresh_token);
    }
    if let Some(scope) = json.get("scope").and_then(Value::as_str) {
        token = token.with_scope(scope);
    }
    if let Some(id_token) = json.get("id_token").and_then(Value::as_str) {
        token = token.with_id_token(id_token);
    }
    Ok(token)
}

/// Whether a token endpoint refused a DPoP proof for want of its nonce: 400 with
/// `{"error":"use_dpop_nonce"}` (RFC 9449 section 8).
#[cfg(feature = "dpop")]
pub(crate) fn asks_for_nonce(answer: &Answer) -> bool {
    answer.status == http::StatusCode::BAD_REQUEST
        && json_object(answer)
            .is_ok_and(|json| json.get("error").and_then(Value::as_str) == Some("use_dpop_nonce"))
}

/// The typed error a non-success answer stands for.
pub(crate) fn error_from(answer: &Answer) -> AuthError {
    let json = match json_object(answer) {
        Ok(json) => json,
        Err(error) => return error,
    };
    let Some(code) = json.get("error").and_then(Value::as_str) else {
        return AuthError::MalformedResponse {
            status: answer.status,
            excerpt: format!(
                "an error answer without an error code: {}",
                excerpt(&answer.body)
            ),
        };
    };
    let text = |name: &str| {
        json.get(name)
            .and_then(Value::as_str)
            .map(|text| text.chars().take(500).collect())
    };
    AuthError::TokenEndpoint(TokenEndpointError {
        status: answer.status,
        code: ErrorCode::parse(code),
        description: text("error_description"),
        uri: text("error_uri"),
    })
}

pub(crate) fn json_object(answer: &Answer) -> Result<Map<String, Value>, AuthError> {
    match serde_json::from_slice::<Value>(&answer.body) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(AuthError::MalformedResponse {
            status: answer.status,
            excerpt: format!("not a JSON object: {}", excerpt(&answer.body)),
        }),
        Err(error) => Err(AuthError::MalformedResponse {
            status: answer.status,
            excerpt: format!(
                "not JSON ({}): {}",
                if error.is_eof() {
                    "truncated"
                } else {
                    "syntax error"
                },
                excerpt(&answer.body)
            ),
        }),
    }
}

/// At most the first 200 bytes of a body, printable, and withheld if it may carry a token.
pub(crate) fn excerpt(body: &[u8]) -> String {
    const LIMIT: usize = 200;
    let text = String::from_utf8_lossy(&body[..body.len().min(LIMIT)]);
    let lowered = String::from_utf8_lossy(body).to_ascii_lowercase();
    if ["token", "secret", "password", "assertion"]
        .iter()
        .any(|word| lowered.contains(word))
    {
        return format!("<{} bytes withheld: they may contain a secret>", body.len());
    }
    let mut shown: String = text.escape_debug().collect();
    if body.len() > LIMIT {
        shown.push_str("...");
    }
    if shown.is_empty() {
        shown.push_str("<empty body>");
    }
    shown
}

/// `expires_in` as a lifetime: seconds as a number or a numeric string, never negative.
fn expires_in(value: &Value) -> Option<Duration> {
    let seconds = match value {
        Value::Number(number) => number.as_f64()?,
        Value::String(text) => text.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    if !seconds.is_finite() || seconds < 0.0 {
        return None;
    }
    Some(Duration::try_from_secs_f64(seconds).unwrap_or(MAX_LIFETIME))
}

/// The claims of a JWT, read without verifying its signature: only for what is not trusted
/// (a lifetime, a routing hint); whoever receives the token checks it.
pub(crate) fn jwt_claims(token: &str) -> Option<Map<String, Value>> {
    let mut segments = token.split('.');
    let (_header, payload, _signature) = (segments.next()?, segments.next()?, segments.next()?);
    if segments.next().is_some() || payload.len() > 16 * 1024 {
        return None;
    }
    match serde_json::from_slice(&base64url_decode(payload)?).ok()? {
        Value::Object(claims) => Some(claims),
        _ => None,
    }
}

/// The lifetime a JWT access token's `exp` claim gives, read without verifying the signature:
/// only the time is used, the token is the API's to check.
fn jwt_lifetime(token: &str, now: SystemTime) -> Option<Duration> {
    let claims = jwt_claims(token)?;
    let exp = claims.get("exp")?.as_f64()?;
    if !exp.is_finite() || exp < 0.0 {
        return None;
    }
    let expires_at = UNIX_EPOCH.checked_add(Duration::try_from_secs_f64(exp).ok()?)?;
    // An `exp` in the past gives a zero lifetime: the cache refuses the token as expired.
    Some(expires_at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oauth2::form::base64;
    use http::StatusCode;

    fn answer(status: u16, body: &str) -> Answer {
        Answer {
            status: StatusCode::from_u16(status).unwrap(),
            headers: http::HeaderMap::new(),
            body: body.to_owned().into(),
        }
    }

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    #[test]
    fn full_token_response() {
        let token = token_from(
            &answer(
                200,
                r#"{"access_token":"at","token_type":"bearer","expires_in":"3600","refresh_token":"rt","scope":"a b"}"#,
            ),
            now(),
            false,
        )
        .unwrap();
        assert_eq!(token.secret(), "at");
        assert_eq!(token.refresh_token(), Some("rt"));
        assert_eq!(token.scope(), Some("a b"));
        assert!(token.expires_at().is_some());
    }

    #[test]
    fn jwt_exp_sets_the_lifetime_when_expires_in_is_missing() {
        let payload = base64(br#"{"sub":"batch","exp":1700000600}"#)
            .trim_end_matches('=')
            .replace('+', "-")
            .replace('/', "_");
        let jwt = format!("eyJhbGciOiJub25lIn0.{payload}.sig");
        assert_eq!(jwt_lifetime(&jwt, now()), Some(Duration::from_secs(600)));
        let body = format!(r#"{{"access_token":"{jwt}","token_type":"Bearer"}}"#);
        assert!(token_from(&answer(200, &body), now(), false)
            .unwrap()
            .expires_at()
            .is_some());
        // Not a JWT: no expiry, used until a 401.
        assert_eq!(jwt_lifetime("opaque", now()), None);
        assert_eq!(jwt_lifetime("a.!!!.c", now()), None);
    }

    #[test]
    fn rfc_6749_error_codes_are_typed() {
        let error = token_from(
            &answer(
                400,
                r#"{"error":"invalid_grant","error_description":"refresh token revoked","error_uri":"https://idp/doc"}"#,
            ),
            now(),
            false,
        )
        .unwrap_err();
        let AuthError::TokenEndpoint(error) = error else {
            panic!("{error:?}")
        };
        assert_eq!(error.code, ErrorCode::InvalidGrant);
        assert_eq!(error.description.as_deref(), Some("refresh token revoked"));
        assert_eq!(error.uri.as_deref(), Some("https://idp/doc"));
        for (code, expected) in [
            ("invalid_client", ErrorCode::InvalidClient),
            ("unauthorized_client", ErrorCode::UnauthorizedClient),
            ("invalid_scope", ErrorCode::InvalidScope),
            ("slow_down", ErrorCode::Other("slow_down".into())),
        ] {
            let body = format!(r#"{{"error":"{code}"}}"#);
            assert_eq!(
                token_from(&answer(401, &body), now(), false)
                    .unwrap_err()
                    .error_code(),
                Some(&expected)
            );
        }
    }

    #[test]
    fn malformed_answers_show_status_and_a_short_excerpt() {
        let long = "x".repeat(1000);
        let error = token_from(&answer(502, &long), now(), false).unwrap_err();
        let shown = error.to_string();
        assert!(shown.contains("502"), "{shown}");
        assert!(shown.len() < 400, "{shown}");
        let error = token_from(&answer(200, r#"{"access_tok"#), now(), false).unwrap_err();
        assert!(error.to_string().contains("truncated"), "{error}");
        // A body that may hold a token is never shown.
        let error =
            token_from(&answer(200, r#"{"access_token":"s3cr3t","#), now(), false).unwrap_err();
        assert!(!error.to_string().contains("s3cr3t"), "{error}");
        assert!(!format!("{error:?}").contains("s3cr3t"), "{error:?}");
    }

    proptest::proptest! {
        #[test]
        fn any_body_and_status_gives_a_token_or_a_typed_error(
            status in 100u16..600,
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..600),
        ) {
            let answer = Answer { status: StatusCode::from_u16(status).unwrap(), headers: http::HeaderMap::new(), body: body.into() };
            match token_from(&answer, now(), false) {
                Ok(token) => proptest::prop_assert!(!token.secret().is_empty()),
                Err(error) => {
                    let shown = error.to_string();
                    // At most 200 bytes of the body, escaped, plus the explanation.
                    proptest::prop_assert!(shown.len() < 1400, "{}", shown.len());
                }
            }
        }

        #[test]
        fn a_truncated_token_response_never_shows_the_token(cut in 0usize..60) {
            let full = r#"{"access_token":"s3cr3t-t0ken","token_type":"Bearer","expires_in":60}"#;
            let answer = Answer { status: StatusCode::OK, headers: http::HeaderMap::new(), body: full[..cut.min(full.len())].to_owned().into() };
            if let Err(error) = token_from(&answer, now(), false) {
                let (shown, debugged) = (error.to_string(), format!("{:?}", error));
                proptest::prop_assert!(!shown.contains("s3cr3t"));
                proptest::prop_assert!(!debugged.contains("s3cr3t"));
            }
        }

        #[test]
        fn jwt_lifetime_never_panics(token in "\\PC{0,200}", dotted in "[A-Za-z0-9_-]{0,40}\\.[A-Za-z0-9_-]{0,80}\\.[A-Za-z0-9_-]{0,10}") {
            let _ = jwt_lifetime(&token, now());
            let _ = jwt_lifetime(&dotted, now());
        }
    }

    #[test]
    fn bad_token_fields_are_refused() {
        let cases = [
            r#"{"token_type":"Bearer"}"#,
            r#"{"access_token":"","token_type":"Bearer"}"#,
            r#"{"access_token":"a","token_type":"Bearer","expires_in":-5}"#,
            r#"{"access_token":"a","token_type":"Bearer","expires_in":"soon"}"#,
        ];
        for body in cases {
            assert!(
                matches!(
                    token_from(&answer(200, body), now(), false),
                    Err(AuthError::MalformedResponse { .. })
                ),
                "{body}"
            );
        }
        assert!(matches!(
            token_from(
                &answer(200, r#"{"access_token":"a","token_type":"mac"}"#),
                now(),
                false
            ),
            Err(AuthError::UnsupportedTokenType { .. })
        ));
        // A DPoP token without DPoP, a Bearer one (or none said) with it: refused.
        let dpop_token = r#"{"access_token":"a","token_type":"DPoP"}"#;
        let bearer_token = r#"{"access_token":"a","token_type":"Bearer"}"#;
        let untyped = r#"{"access_token":"a"}"#;
        for (body, dpop, accepted) in [
            (dpop_token, false, false),
            (dpop_token, true, true),
            (r#"{"access_token":"a","token_type":"dpop"}"#, true, true),
            (bearer_token, true, false),
            (untyped, true, false),
            (untyped, false, true),
        ] {
            match token_from(&answer(200, body), now(), dpop) {
                Ok(_) => assert!(accepted, "{body} with dpop {dpop}"),
                Err(AuthError::UnsupportedTokenType { .. }) => {
                    assert!(!accepted, "{body} with dpop {dpop}")
                }
                Err(error) => panic!("{body}: {error:?}"),
            }
        }
        // Huge lifetimes are clamped, not overflowed.
        let huge = r#"{"access_token":"a","token_type":"Bearer","expires_in":1e300}"#;
        assert!(token_from(&answer(200, huge), now(), false).is_ok());
    }
}
