//! Identity provider metadata: any answer gives metadata that passes the URL policy, or a typed
//! error, never a panic.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use tower_auth_refresh::oauth2::discover;

fuzz_target!(|data: &[u8]| {
    let transport = common::answering(data);
    let found = common::runtime().block_on(discover("https://idp.example", &transport, false));
    if let Ok(metadata) = found {
        assert!(metadata.token_endpoint.starts_with("https://"));
    }
});
