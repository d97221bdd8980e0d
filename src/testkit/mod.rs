//! Loopback emulators of real platforms, for tests and examples (cargo feature `testkit`).
//!
//! Each is a real hyper server on `127.0.0.1:0` in the caller's Tokio runtime, so a test on a
//! paused clock drives token expiry on both sides with `tokio::time::advance`. They count what
//! reached them, so tests can assert exact numbers.

pub mod cxone;
pub mod genesys;
mod server;
