//! Token endpoint answers (RFC 6749 5.1 and 5.2, JWT `exp`): any status and body gives a token or
//! a typed error, never a panic, and an error never shows the client secret.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use tower_auth_refresh::oauth2::ClientCredentials;

fuzz_target!(|data: &[u8]| {
    let provider = ClientCredentials::builder("https://idp.example/token", "id", "fuzz-s3cret")
        .transport(common::answering(data))
        .build()
        .expect("a valid URL");
    if let Err(error) = common::runtime().block_on(provider.request_token()) {
        assert!(!error.to_string().contains("fuzz-s3cret"));
        assert!(!format!("{error:?}").contains("fuzz-s3cret"));
    }
});
