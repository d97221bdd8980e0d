//! What a rejected response's `WWW-Authenticate` asks for (RFC 9110 section 11.6.1, RFC 6750
//! section 3).
//!
//! A refusal says *why* it refused, and the layer acts on it, at most once per request:
//! - an expired or revoked token (`error="invalid_token"`, or no error at all) is worth one
//!   refresh and one replay;
//! - `error="insufficient_scope"` is not worth a blind refresh, since a new token with the same
//!   scope is refused just the same: the response goes back unchanged (counted in
//!   [`CacheStats::insufficient_scope`](crate::CacheStats::insufficient_scope)), unless a step-up
//!   hook ([`AuthLayerBuilder::step_up`](crate::AuthLayerBuilder::step_up)) asks for a token with
//!   the challenged scope, which is then fetched and the request replayed once;
//! - `error="insufficient_claims"` with `claims=` (base64 JSON, as Microsoft Entra's continuous
//!   access evaluation sends) refreshes with those claims
//!   ([`TokenRequest::claims`](crate::TokenRequest::claims)) and replays once (counted in
//!   [`CacheStats::claims_refreshes`](crate::CacheStats::claims_refreshes)).
//!
//! The grammar is read in full: several challenges in one header value or in several headers,
//! parameters whose values are tokens or quoted strings with `\` escapes, and `token68`
//! credentials. Anything malformed ends the reading of that value; what was read before stays.
//!
//! ```
//! use http::{HeaderMap, HeaderValue};
//! use tower_auth_refresh::challenge::challenges;
//!
//! let mut headers = HeaderMap::new();
//! headers.insert(
//!     "www-authenticate",
//!     HeaderValue::from_static(
//!         r#"Basic realm="files", Bearer realm="api", error="insufficient_scope", scope="read write""#,
//!     ),
//! );
//! let found = challenges(&headers);
//! assert_eq!(found.len(), 2);
//! assert!(found[1].is("bearer"));
//! assert_eq!(found[1].param("error"), Some("insufficient_scope"));
//! assert_eq!(found[1].param("SCOPE"), Some("read write"));
//! ```

use http::header::WWW_AUTHENTICATE;
use http::HeaderMap;

use crate::provider::TokenRequest;

/// A step-up hook: from the scope an `insufficient_scope` challenge names, the token to ask
/// for, or `None` to give the response back unchanged.
pub(crate) type StepUp = dyn Fn(&str) -> Option<TokenRequest> + Send + Sync;

/// One challenge: an authentication scheme and its parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Challenge {
    /// The scheme as sent (`Bearer`, `DPoP`, `Basic`, ...); compare with [`is`](Self::is).
    pub scheme: String,
    /// The parameters in order, names in lower case, quoted values unescaped.
    pub params: Vec<(String, String)>,
    /// A `token68` sent instead of parameters, if any.
    pub token68: Option<String>,
}

impl Challenge {
    /// Whether this challenge is for `scheme` (compared without regard to case).
    pub fn is(&self, scheme: &str) -> bool {
        self.scheme.eq_ignore_ascii_case(scheme)
    }

    /// The value of the first parameter called `name` (compared without regard to case).
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(param, _)| param.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

/// Every challenge of every `WWW-Authenticate` header, in order.
pub fn challenges(headers: &HeaderMap) -> Vec<Challenge> {
    let mut found = Vec::new();
    for value in headers.get_all(WWW_AUTHENTICATE) {
        Reader::new(value.as_bytes()).challenges(&mut found);
    }
    found
}

/// The `error` of the first `Bearer` challenge that carries one (RFC 6750 section 3.1).
pub fn bearer_error(headers: &HeaderMap) -> Option<String> {
    challenges(headers)
        .into_iter()
        .filter(|challenge| challenge.is("bearer"))
        .find_map(|challenge| challenge.param("error").map(str::to_owned))
}

/// What a rejected response asks for, read once from its challenges (the first `Bearer` or
/// `DPoP` challenge that carries an `error`: RFC 9449 section 7.1 gives DPoP the same errors).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Demand {
    /// A new token: `invalid_token`, no error, an error this crate does not act on, or claims
    /// that cannot be read.
    Refresh,
    /// `insufficient_scope`, with the challenge's `scope` (empty if it named none).
    Scope(String),
    /// `insufficient_claims`, with its `claims` decoded to JSON text.
    Claims(String),
}

impl Demand {
    /// Read what `headers` ask for. Only called for a rejected response.
    pub(crate) fn of(headers: &HeaderMap) -> Self {
        let challenge = challenges(headers).into_iter().find(|challenge| {
            (challenge.is("bearer") || challenge.is("dpop")) && challenge.param("error").is_some()
        });
        let Some(challenge) = challenge else {
            return Self::Refresh;
        };
        match challenge.param("error") {
            Some("insufficient_scope") => {
                Self::Scope(challenge.param("scope").unwrap_or_default().to_owned())
            }
            Some("insufficient_claims") => {
                let claims = challenge
                    .param("claims")
                    .and_then(decode_base64)
                    .and_then(|bytes| String::from_utf8(bytes).ok());
                match claims {
                    Some(claims) => Self::Claims(claims),
                    None => {
                        // The value is not logged: it is the API's, and may be long.
                        tracing::debug!(
                            "insufficient_claims challenge without readable claims \
                             (missing, not base64 or not UTF-8); refreshing without them"
                        );
                        Self::Refresh
                    }
                }
            }
            _ => Self::Refresh,
        }
    }
}

/// Decode base64 in either alphabet (standard `+/` or URL-safe `-_`), with or without `=`
/// padding. `None` on any other input. APIs send claims in either form, and JWT segments are
/// URL-safe without padding.
pub(crate) fn decode_base64(input: &str) -> Option<Vec<u8>> {
    let input = input.trim_end_matches('=');
    if input.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(input.len() * 3 / 4);
    let mut buffer = 0u32;
    let mut bits = 0;
    for byte in input.bytes() {
        let value = match byte {
            b'A'..=b'Z' => byte - b'A',
            b'a'..=b'z' => byte - b'a' + 26,
            b'0'..=b'9' => byte - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        };
        buffer = buffer << 6 | u32::from(value);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
            buffer &= (1 << bits) - 1;
        }
    }
    Some(out)
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, at: 0 }
    }

    fn challenges(&mut self, found: &mut Vec<Challenge>) {
        loop {
            self.skip(|b| b == b' ' || b == b'\t' || b == b',');
            let Some(scheme) = self.token() else {
                return; // the end, or something that is not a challenge
            };
            let mut challenge = Challenge {
                scheme,
                params: Vec::new(),
                token68: None,
            };
            if self.skip(|b| b == b' ') > 0 {
                let start = self.at;
                match self.token68() {
                    Some(token68) => challenge.token68 = Some(token68),
                    None => {
                        self.at = start;
                        if !self.params(&mut challenge.params) {
                            found.push(challenge);
                            return;
                        }
                    }
                }
            }
            found.push(challenge);
        }
    }

    /// `#auth-param` after a scheme, up to the next challenge. `false` on malformed input.
    fn params(&mut self, params: &mut Vec<(String, String)>) -> bool {
        loop {
            self.skip(|b| b == b' ' || b == b'\t' || b == b',');
            let start = self.at;
            let Some(name) = self.token() else {
                return self.at_end();
            };
            self.skip(|b| b == b' ' || b == b'\t');
            if !self.eat(b'=') {
                // `name` is the scheme of the next challenge.
                self.at = start;
                return true;
            }
            self.skip(|b| b == b' ' || b == b'\t');
            let value = if self.peek() == Some(b'"') {
                self.quoted()
            } else {
                self.token()
            };
            let Some(value) = value else {
                return false;
            };
            params.push((name.to_ascii_lowercase(), value));
            self.skip(|b| b == b' ' || b == b'\t');
            match self.peek() {
                None => return true,
                Some(b',') => continue,
                Some(_) => return false,
            }
        }
    }

    /// A `token68` that stands alone: followed by the end or a comma.
    fn token68(&mut self) -> Option<String> {
        let start = self.at;
        let body = self.skip(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b));
        let pad = self.skip(|b| b == b'=');
        if body == 0 && pad == 0 {
            return None;
        }
        let end = self.at;
        self.skip(|b| b == b' ' || b == b'\t');
        match self.peek() {
            None | Some(b',') => {
                Some(String::from_utf8_lossy(&self.bytes[start..end]).into_owned())
            }
            Some(_) => None,
        }
    }

    fn token(&mut self) -> Option<String> {
        let start = self.at;
        let len = self.skip(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        (len > 0).then(|| String::from_utf8_lossy(&self.bytes[start..self.at]).into_owned())
    }

    /// A quoted string, unescaped; `None` if it is not closed.
    fn quoted(&mut self) -> Option<String> {
        self.eat(b'"');
        let mut value = Vec::new();
        while let Some(byte) = self.peek() {
            self.at += 1;
            match byte {
                b'"' => return Some(String::from_utf8_lossy(&value).into_owned()),
                b'\\' => {
                    let escaped = self.peek()?;
                    self.at += 1;
                    value.push(escaped);
                }
                other => value.push(other),
            }
        }
        None
    }

    fn skip(&mut self, mut keep: impl FnMut(u8) -> bool) -> usize {
        let start = self.at;
        while self.peek().is_some_and(&mut keep) {
            self.at += 1;
        }
        self.at - start
    }

    fn eat(&mut self, byte: u8) -> bool {
        let found = self.peek() == Some(byte);
        if found {
            self.at += 1;
        }
        found
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn at_end(&self) -> bool {
        self.at >= self.bytes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn read(value: &str) -> Vec<Challenge> {
        let mut found = Vec::new();
        Reader::new(value.as_bytes()).challenges(&mut found);
        found
    }

    fn challenge(scheme: &str, params: &[(&str, &str)], token68: Option<&str>) -> Challenge {
        Challenge {
            scheme: scheme.to_owned(),
            params: params
                .iter()
                .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
                .collect(),
            token68: token68.map(str::to_owned),
        }
    }

    #[test]
    fn the_rfc_examples_and_their_variants() {
        assert_eq!(
            read(
                r#"Newauth realm="apps", type=1, title="Login to \"apps\"", Basic realm="simple""#
            ),
            vec![
                challenge(
                    "Newauth",
                    &[
                        ("realm", "apps"),
                        ("type", "1"),
                        ("title", r#"Login to "apps""#)
                    ],
                    None
                ),
                challenge("Basic", &[("realm", "simple")], None),
            ]
        );
        assert_eq!(
            read(r#"Bearer realm="example", error="invalid_token", error_description="The access token expired""#)[0]
                .param("error"),
            Some("invalid_token")
        );
        assert_eq!(
            read("Negotiate abc+/def==, Bearer"),
            vec![
                challenge("Negotiate", &[], Some("abc+/def==")),
                challenge("Bearer", &[], None)
            ]
        );
        assert_eq!(
            read("bearer  ERROR = insufficient_scope ,scope=\"a b\""),
            vec![challenge(
                "bearer",
                &[("error", "insufficient_scope"), ("scope", "a b")],
                None
            )]
        );
        assert_eq!(read(""), vec![]);
        assert_eq!(read(" , ,"), vec![]);
        // Malformed: what was read before stays, the rest is dropped.
        assert_eq!(
            read(r#"Bearer error="unterminated"#),
            vec![challenge("Bearer", &[], None)]
        );
    }

    #[test]
    fn several_headers_and_the_bearer_error() {
        let mut headers = HeaderMap::new();
        headers.append(
            WWW_AUTHENTICATE,
            HeaderValue::from_static(r#"Basic realm="x""#),
        );
        headers.append(
            WWW_AUTHENTICATE,
            HeaderValue::from_static(
                r#"Bearer error="insufficient_claims", claims="eyJhIjoxfQ==""#,
            ),
        );
        assert_eq!(challenges(&headers).len(), 2);
        assert_eq!(
            bearer_error(&headers).as_deref(),
            Some("insufficient_claims")
        );
        assert_eq!(bearer_error(&HeaderMap::new()), None);
    }

    fn demand(values: &[&'static str]) -> Demand {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(WWW_AUTHENTICATE, HeaderValue::from_static(value));
        }
        Demand::of(&headers)
    }

    /// Entra's CAE shape, and its standard base64 (padded).
    const CLAIMS_BASE64: &str =
        "eyJhY2Nlc3NfdG9rZW4iOnsibmJmIjp7ImVzc2VudGlhbCI6dHJ1ZSwidmFsdWUiOiIxNzAwMDAwMDAwIn19fQ==";
    const CLAIMS: &str = r#"{"access_token":{"nbf":{"essential":true,"value":"1700000000"}}}"#;

    #[test]
    fn the_demand_of_a_rejection() {
        assert_eq!(demand(&[]), Demand::Refresh);
        assert_eq!(demand(&["Bearer"]), Demand::Refresh);
        // DPoP challenges carry the same errors (RFC 9449 section 7.1).
        assert_eq!(
            demand(&[r#"DPoP error="insufficient_scope", scope="write", algs="ES256""#]),
            Demand::Scope("write".into())
        );
        assert_eq!(
            demand(&[r#"Bearer error="invalid_token""#]),
            Demand::Refresh
        );
        // Several challenges in one header: the Bearer one that carries an error decides.
        assert_eq!(
            demand(&[
                r#"Basic realm="x", Bearer realm="api", error="insufficient_scope", scope="admin read""#
            ]),
            Demand::Scope("admin read".to_owned())
        );
        assert_eq!(
            demand(&[r#"Bearer error="insufficient_scope""#]),
            Demand::Scope(String::new())
        );
        // Several headers; an error in another scheme's challenge is not ours.
        assert_eq!(
            demand(&[
                r#"Basic error="insufficient_scope", scope="x""#,
                r#"Bearer realm="api""#,
                r#"Bearer error="insufficient_claims", claims="eyJhIjoxfQ==""#,
            ]),
            Demand::Claims(r#"{"a":1}"#.to_owned())
        );
    }

    #[test]
    fn claims_in_either_base64_alphabet_with_or_without_padding() {
        let unpadded = CLAIMS_BASE64.trim_end_matches('=');
        for encoded in [CLAIMS_BASE64, unpadded] {
            let header = format!(r#"Bearer error="insufficient_claims", claims="{encoded}""#);
            let mut headers = HeaderMap::new();
            headers.insert(WWW_AUTHENTICATE, HeaderValue::from_str(&header).unwrap());
            assert_eq!(
                Demand::of(&headers),
                Demand::Claims(CLAIMS.to_owned()),
                "{encoded}"
            );
        }
        // JSON whose base64 needs the alphabets' last letters: `+/` or `-_`.
        for encoded in ["eyJ4Ijoifn5+PyJ9", "eyJ4Ijoifn5-PyJ9"] {
            let header = format!(r#"Bearer error="insufficient_claims", claims="{encoded}""#);
            let mut headers = HeaderMap::new();
            headers.insert(WWW_AUTHENTICATE, HeaderValue::from_str(&header).unwrap());
            assert_eq!(
                Demand::of(&headers),
                Demand::Claims(r#"{"x":"~~~?"}"#.to_owned())
            );
        }
        // Bytes that need both alphabets' last two letters: `+/` and `-_` read the same.
        assert_eq!(decode_base64("+/+/"), Some(vec![0xfb, 0xff, 0xbf]));
        assert_eq!(decode_base64("-_-_"), Some(vec![0xfb, 0xff, 0xbf]));
    }

    #[test]
    fn garbage_claims_are_a_plain_refresh() {
        for garbage in [
            r#"Bearer error="insufficient_claims""#,
            r#"Bearer error="insufficient_claims", claims="not base64!""#,
            r#"Bearer error="insufficient_claims", claims="a""#,
            // Valid base64 of bytes that are not UTF-8.
            r#"Bearer error="insufficient_claims", claims="//79""#,
        ] {
            assert_eq!(demand(&[garbage]), Demand::Refresh, "{garbage}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_are_read_without_panicking(value in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let mut found = Vec::new();
            Reader::new(&value).challenges(&mut found);
        }

        #[test]
        fn written_challenges_read_back(
            scheme in "[A-Za-z][A-Za-z0-9]{0,8}",
            params in proptest::collection::vec(("[a-z][a-z_]{0,8}", "[ -~&&[^\"\\\\]]{0,16}"), 0..4),
        ) {
            let written = params
                .iter()
                .map(|(name, value)| format!("{name}=\"{value}\""))
                .collect::<Vec<_>>()
                .join(", ");
            let header = if written.is_empty() { scheme.clone() } else { format!("{scheme} {written}") };
            let read_back = read(&header);
            proptest::prop_assert_eq!(read_back.len(), 1);
            proptest::prop_assert_eq!(&read_back[0].scheme, &scheme);
            let expected: Vec<(String, String)> = params.clone();
            proptest::prop_assert_eq!(&read_back[0].params, &expected);
        }
    }
}
