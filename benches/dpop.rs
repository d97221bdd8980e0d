//! What DPoP (RFC 9449) costs per request, beside the bearer hot path.
//!
//! Group `dpop`, on a current-thread tokio runtime, one request (or one proof) per iteration:
//!
//! - `bearer/auth_layer_get`: `hot_path`'s `get/auth_layer`, the same GET through `AuthLayer`
//!   over a `StaticToken` that lives an hour, into the in-process `Ok200` of
//!   `benches/common/mod.rs`: the figure the DPoP variants add to.
//! - `dpop/auth_layer_get`: the same GET through `AuthLayer::builder(..).dpop(..)`: the token
//!   as `DPoP`, and a proof with `ath` signed for the request.
//! - `proof/get`: `Dpop::proof` alone for that GET without `ath`, what a token request
//!   carries (the claims as JSON, base64url, one ES256 signature by ring, the header value).
//! - `proof/get_ath`: the same with `ath`, the hash of the access token, as every API request
//!   carries it.
//! - `proof/get_ath_nonce`: the same with the server's nonce, learned from a `DPoP-Nonce`
//!   answer (one read lock on the nonce map more).
//! - `access_token_hash/1KiB`: `ath` alone, SHA-256 and base64url of a 1 KiB token (a large
//!   JWT): the part of `get_ath` that grows with the token.
//!
//! The ratio to read: `dpop/auth_layer_get / bearer/auth_layer_get`, what a DPoP-bound request
//! costs against a bearer one. The signature dominates: ECDSA P-256 signing is tens of microseconds where
//! the bearer path is well under one.
//!
//! Run it with:
//!
//! ```text
//! cargo bench --bench dpop
//! ```
//!
//! `cargo bench --bench dpop -- --quick` gives rough figures in a few seconds.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue, Method, Uri};
use tower::Layer;
use tower_auth_refresh::dpop::{access_token_hash, Dpop, DPOP_NONCE};
use tower_auth_refresh::{AuthLayer, StaticToken, Token};

mod common;

use common::{get_request, send, Ok200, SECRET, URI};

fn dpop(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut group = c.benchmark_group("dpop");

    // The bearer hot path, as `hot_path` measures it, and the same GET through the layer in
    // DPoP mode: the service cloned once per sample and driven through `&mut`, the cache
    // warmed before measuring.
    let bearer_layer = AuthLayer::new(StaticToken::new(
        Token::new(SECRET).with_expires_in(Duration::from_secs(3600)),
    ));
    let dpop_layer = AuthLayer::builder(StaticToken::new(
        Token::new(SECRET).with_expires_in(Duration::from_secs(3600)),
    ))
    .dpop(Dpop::generate().expect("a DPoP key"))
    .build();
    for (name, layer) in [
        ("bearer/auth_layer_get", bearer_layer),
        ("dpop/auth_layer_get", dpop_layer),
    ] {
        let service = layer.layer(Ok200);
        runtime.block_on(send(&mut service.clone(), get_request()));
        assert_eq!(layer.cache().stats().token_requests, 1);
        group.bench_function(name, |b| {
            b.to_async(&runtime).iter_custom(|iters| {
                let mut service = service.clone();
                async move {
                    let start = Instant::now();
                    for _ in 0..iters {
                        send(&mut service, get_request()).await;
                    }
                    start.elapsed()
                }
            });
        });
    }

    let signer = Dpop::generate().expect("a DPoP key");
    let uri = Uri::from_static(URI);
    group.bench_function("proof/get", |b| {
        b.iter(|| signer.proof(&Method::GET, black_box(&uri), None))
    });
    group.bench_function("proof/get_ath", |b| {
        b.iter(|| signer.proof(&Method::GET, black_box(&uri), Some(SECRET)))
    });

    let with_nonce = Dpop::new(signer.key().clone());
    let mut answer = HeaderMap::new();
    answer.insert(
        DPOP_NONCE,
        HeaderValue::from_static("eyJ7S_zG.eyJH0-Z.HX4w-7v"),
    );
    assert!(with_nonce.observe(&uri, &answer));
    group.bench_function("proof/get_ath_nonce", |b| {
        b.iter(|| with_nonce.proof(&Method::GET, black_box(&uri), Some(SECRET)))
    });

    let token: String = SECRET.chars().cycle().take(1024).collect();
    group.bench_function("access_token_hash/1KiB", |b| {
        b.iter(|| access_token_hash(black_box(&token)))
    });

    group.finish();
}

criterion_group!(benches, dpop);
criterion_main!(benches);
