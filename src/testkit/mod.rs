//! Real servers on `127.0.0.1:0` for testing what is built on this crate (cargo feature
//! `testkit`): an identity provider whose tokens expire, an API that checks them, answers 401
//! and 429 on demand and pages its records the way real platforms do, with counters of what
//! reached each, so a test asserts exact numbers. [`cxone`] and [`genesys`] emulate the two
//! platforms' token endpoints and APIs as their documentation describes them.
//!
//! They run on hyper in the caller's Tokio runtime: a test on a paused clock
//! (`#[tokio::test(start_paused = true)]`) moves token expiry on both sides with
//! `tokio::time::advance`.
//!
//! ```
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http_body_util::Empty;
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_auth_refresh::testkit::{client, http_provider, Api, IdentityProvider, TokenRegistry};
//! use tower_auth_refresh::AuthLayer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower::BoxError> {
//! let registry = TokenRegistry::default();
//! let idp = IdentityProvider::start(registry.clone(), Some(Duration::from_secs(3))).await;
//! let api = Api::start(registry, 250).await;
//! let auth = AuthLayer::new(http_provider(&idp));
//! let service = ServiceBuilder::new().layer(auth).service(client::<Empty<Bytes>>());
//!
//! let request = http::Request::get(api.url("/users?pageSize=100&pageNumber=3")).body(Empty::new())?;
//! let response = service.oneshot(request).await?;
//! assert_eq!(response.status(), 200);
//! assert_eq!((idp.token_requests(), api.records_served()), (1, 50));
//! # Ok(())
//! # }
//! ```

pub mod api;
pub mod cxone;
pub mod genesys;
pub mod idp;
mod server;

pub use api::{client, client_h2, Api, ApiCounters, CLAIMS_CHALLENGE};
pub use idp::{
    http_provider, http_provider_at, parse_token_response, IdentityProvider, IdpMode, ProofError,
    ProofVerifier, TokenRegistry, VerifiedProof,
};
