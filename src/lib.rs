//! Keep long-running HTTP work alive across OAuth2 token expiry.
//!
//! [`AuthLayer`] is a tower layer that adds `Authorization: Bearer <token>` to every request
//! from a shared [`TokenCache`], refreshes the token before it expires, and when the API still
//! rejects it (a `401`), fetches one new token for all concurrent callers and replays each
//! rejected request once.
//!
//! ```
//! use std::time::Duration;
//! use tower::ServiceBuilder;
//! use tower_auth_refresh::{provider_fn, AuthLayer, Token};
//!
//! # fn wrap<S: Clone>(hyper_client: S) {
//! let auth = AuthLayer::new(provider_fn(|| async {
//!     Ok::<_, tower::BoxError>(Token::new("secret").with_expires_in(Duration::from_secs(3600)))
//! }));
//! // Clones of `auth`, and every service it builds, share one token cache.
//! let client = ServiceBuilder::new().layer(auth.clone()).service(hyper_client);
//! # drop(client);
//! # }
//! ```
//!
//! What it guarantees:
//! - **One token request** for any number of concurrent requests that need a new token, whether
//!   they noticed the expiry up front or through a 401; a 401 for an older token than the
//!   current one replays with the current token and fetches nothing.
//! - **At most one replay** per request; a rejection of the replay goes back to the caller.
//!   Bodies up to a cap (64 KiB by default) are kept while they stream, never copied.
//! - **No request waits** while the old token is still good: a background refresh starts in an
//!   advisory window before expiry.
//! - **Faults are typed**: a provider that fails, hangs or panics yields an [`AuthError`] for the
//!   waiting requests, then a backoff; an expired token is never sent.
//! - **No leaks**: the header value is marked sensitive, and [`Token`] and every error redact
//!   secrets in `Debug` and `Display`.
//! - **One token for a fleet** (feature `redis`): processes whose caches share a
//!   `redis_store::RedisStore` make one token request per refresh between them, and keep
//!   working, each with its own token, while Redis is down. See [`store`].
//! - **reqwest** (feature `reqwest`): `reqwest_auth::AuthMiddleware` gives a
//!   `reqwest-middleware` client the same guarantees over the same [`TokenCache`].
#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![warn(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod cache;
pub mod challenge;
#[cfg(feature = "dpop")]
pub mod dpop;
pub mod error;
mod future;
#[cfg(feature = "tonic")]
pub mod grpc;
mod head;
pub mod inner_body;
pub mod keyed;
pub mod layer;
#[cfg(feature = "oauth2")]
pub mod oauth2;
mod origin;
pub mod predicate;
mod proof;
pub mod provider;
#[cfg(feature = "redis")]
pub mod redis_store;
pub mod replay;
#[cfg(feature = "reqwest")]
pub mod reqwest_auth;
pub mod retry;
mod retry_after;
mod service;
pub mod store;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod token;

pub use cache::{CacheStats, NotReplayedCounts, Rejection, TokenCache, TokenCacheBuilder};
pub use error::{AuthError, ErrorCode, TokenEndpointError};
pub use future::ResponseFuture;
pub use keyed::{KeyedAuthLayer, KeyedAuthService, KeyedCaches, KeyedStats};
pub use layer::{AuthLayer, AuthLayerBuilder, ExistingAuthorization};
pub use origin::{InvalidOrigin, Origin};
pub use provider::{
    provider_fn, ProviderFn, ProviderFuture, StaticToken, TokenProvider, TokenRequest,
};
pub use replay::{NotReplayable, ReplayBody};
pub use service::AuthService;
pub use store::{LocalStore, TokenStore};
pub use token::Token;

/// The README's example, compiled with the doctests so it stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
