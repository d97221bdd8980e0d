//! The two encodings a token request needs: `application/x-www-form-urlencoded` and base64.
//!
//! Small enough to write here rather than add two dependencies; both are tested against the
//! RFC examples below.

/// Encode a form value (WHATWG `application/x-www-form-urlencoded`): unreserved bytes as they
/// are, space as `+`, everything else `%XX`. RFC 6749 section 2.3.1 also uses it for the client
/// id and secret inside HTTP Basic.
pub(crate) fn urlencode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => {
                out.push(byte as char)
            }
            b' ' => out.push('+'),
            _ => {
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                out.push('%');
                out.push(HEX[usize::from(byte >> 4)] as char);
                out.push(HEX[usize::from(byte & 0xf)] as char);
            }
        }
    }
    out
}

/// A form body from name/value pairs.
pub(crate) fn form<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut out = String::new();
    for (name, value) in pairs {
        if !out.is_empty() {
            out.push('&');
        }
        out.push_str(&urlencode(name));
        out.push('=');
        out.push_str(&urlencode(value));
    }
    out
}

const STANDARD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding, for HTTP Basic.
pub(crate) fn base64(input: &[u8]) -> String {
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(STANDARD[(n >> (18 - 6 * i) & 0x3f) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decode base64url without padding (JWT segments). `None` on any invalid input. The decoder is
/// the challenge reader's, which also reads the standard alphabet (claims challenges use both).
pub(crate) use crate::challenge::decode_base64 as base64url_decode;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urlencode_reserves_everything_but_unreserved() {
        assert_eq!(urlencode("b@tch s3cret/+&="), "b%40tch+s3cret%2F%2B%26%3D");
        assert_eq!(urlencode("a-Z_0.9*"), "a-Z_0.9*");
        assert_eq!(urlencode("é"), "%C3%A9");
        assert_eq!(
            form([("grant_type", "client_credentials"), ("scope", "a b")]),
            "grant_type=client_credentials&scope=a+b"
        );
    }

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
        // RFC 7617's example credentials.
        assert_eq!(
            base64(b"Aladdin:open sesame"),
            "QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
    }

    proptest::proptest! {
        #[test]
        fn base64url_decodes_what_base64_encodes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let url_safe = base64(&bytes).trim_end_matches('=').replace('+', "-").replace('/', "_");
            proptest::prop_assert_eq!(base64url_decode(&url_safe), Some(bytes));
        }

        #[test]
        fn base64url_never_panics(text in "\\PC{0,100}") {
            let _ = base64url_decode(&text);
        }

        #[test]
        fn urlencode_output_is_form_safe(text in "\\PC{0,60}") {
            let encoded = urlencode(&text);
            proptest::prop_assert!(encoded.bytes().all(|b| b.is_ascii_alphanumeric() || b"*-._+%".contains(&b)));
        }
    }

    #[test]
    fn base64url_round_trips_and_refuses_garbage() {
        assert_eq!(base64url_decode("eyJleHAiOjF9").unwrap(), br#"{"exp":1}"#);
        assert_eq!(base64url_decode("Zm9vYg").unwrap(), b"foob");
        assert_eq!(base64url_decode("_-8").unwrap(), [0xff, 0xef]);
        assert_eq!(base64url_decode("a"), None);
        assert_eq!(base64url_decode("ab!c"), None);
    }
}
