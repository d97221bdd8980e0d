//! A long batch crossing many token expiries: 2,000 sequential paginated calls while tokens
//! expire every 200 ms of the test clock, each call taking 1 ms of it.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Empty;
use tokio::time::advance;
use tower::{ServiceBuilder, ServiceExt};
use tower_auth_refresh::AuthLayer;

use support::{client, http_provider, manual_clock, Api, IdentityProvider, TokenRegistry};

const CALLS: usize = 2_000;
const STEP: Duration = Duration::from_millis(1);
const TTL: Duration = Duration::from_millis(200);
const PAGE_SIZE: usize = 5;

struct Outcome {
    token_requests: usize,
    rejected: usize,
    replays: u64,
}

/// Fetch every page of 10,000 records, one call at a time, `STEP` of test clock per call.
async fn run_batch(announce_expiry: bool) -> Outcome {
    let _clock = manual_clock();
    let registry = TokenRegistry::default();
    let idp = IdentityProvider::start(registry.clone(), Some(TTL)).await;
    idp.announce_expiry(announce_expiry);
    let api = Api::start(registry, CALLS * PAGE_SIZE).await;
    let layer = AuthLayer::new(http_provider(&idp));
    let service = ServiceBuilder::new().layer(layer.clone()).service(client());

    let mut records = 0;
    for page in 0..CALLS {
        let url = api.url(&format!("/contacts?page={page}&size={PAGE_SIZE}"));
        let request = Request::get(url).body(Empty::<Bytes>::new()).unwrap();
        let response = service.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "page {page}");
        records += support::body_string(response).await.lines().count();
        advance(STEP).await;
    }
    assert_eq!(
        records,
        CALLS * PAGE_SIZE,
        "every record fetched, no failure"
    );
    assert_eq!(api.served(), CALLS);

    Outcome {
        token_requests: idp.token_requests(),
        rejected: api.rejected(),
        replays: layer.cache().stats().replays,
    }
}

#[tokio::test(start_paused = true)]
async fn batch_survives_expiries_it_learns_of_through_401s() {
    // The identity provider does not say when tokens expire: the client learns it from 401s.
    let outcome = run_batch(false).await;
    // Calls happen at 0 ms .. 1,999 ms; a token issued at t lives until t + 200 ms.
    let expiries = (CALLS - 1) * STEP.as_millis() as usize / TTL.as_millis() as usize;
    assert_eq!(expiries, 9);
    assert_eq!(outcome.token_requests, expiries + 1);
    assert_eq!(outcome.rejected, expiries, "one 401 per expiry");
    assert_eq!(outcome.replays, expiries as u64);
}

#[tokio::test(start_paused = true)]
async fn batch_refreshes_ahead_of_announced_expiries() {
    // With `expires_in`, each token is replaced in the background at half its life (the
    // advisory window of a short-lived token), and no request ever meets a 401.
    let outcome = run_batch(true).await;
    let half_life = TTL / 2;
    let refreshes = CALLS * STEP.as_millis() as usize / half_life.as_millis() as usize;
    assert_eq!(outcome.rejected, 0);
    assert_eq!(outcome.replays, 0);
    assert_eq!(outcome.token_requests, refreshes);
}
