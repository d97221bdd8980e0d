//! `WWW-Authenticate` challenges: any value is read without a panic, by the challenge reader and
//! by the predicate built on it.
#![no_main]

use http::{HeaderMap, HeaderValue, StatusCode};
use libfuzzer_sys::fuzz_target;
use tower_auth_refresh::challenge::{bearer_error, challenges};
use tower_auth_refresh::predicate::unauthorized_or_invalid_token;

fuzz_target!(|data: &[u8]| {
    if let Ok(value) = HeaderValue::from_bytes(data) {
        let mut headers = HeaderMap::new();
        headers.insert("www-authenticate", value);
        let _ = unauthorized_or_invalid_token(StatusCode::FORBIDDEN, &headers);
        let _ = challenges(&headers);
        let _ = bearer_error(&headers);
    }
});
