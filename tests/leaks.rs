//! Tokens go only where they are meant to: scoping an `AuthLayer` to its API's origin keeps the
//! token off a redirect to another host, with tower-http's `FollowRedirectLayer` above it.
//!
//! Layer order: `FollowRedirect -> AuthLayer (allowed_origins) -> client`. Every hop of a
//! redirect passes through the auth layer again, which adds the token only for allowed origins.
//! (`FollowRedirect`'s own credential filter cannot help here: it sees the request before the
//! auth layer adds the token.)

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Empty;
use tower::{ServiceBuilder, ServiceExt};
use tower_auth_refresh::{AuthLayer, Origin};
use tower_http::follow_redirect::FollowRedirectLayer;

use support::{body_string, client, http_provider, Api, IdentityProvider, TokenRegistry};

const HOUR: Duration = Duration::from_secs(3600);

struct World {
    idp: IdentityProvider,
    api: Api,
    elsewhere: Api,
}

async fn world() -> World {
    let registry = TokenRegistry::default();
    let idp = IdentityProvider::start(registry.clone(), Some(HOUR)).await;
    let api = Api::start(registry, 0).await;
    // Another host: a storage service, say, that knows nothing of our tokens.
    let elsewhere = Api::start(TokenRegistry::default(), 0).await;
    World {
        idp,
        api,
        elsewhere,
    }
}

fn redirect_request(w: &World) -> Request<Empty<Bytes>> {
    let target = w.elsewhere.url("/whoami");
    Request::get(w.api.url(&format!("/redirect?to={target}")))
        .body(Empty::new())
        .unwrap()
}

#[tokio::test]
async fn a_scoped_layer_keeps_the_token_off_a_cross_origin_redirect() {
    let w = world().await;
    let api_origin = Origin::of(&w.api.url("/").parse().unwrap()).unwrap();
    let auth = AuthLayer::builder(http_provider(&w.idp))
        .allowed_origins([api_origin])
        .build();
    let service = ServiceBuilder::new()
        .layer(FollowRedirectLayer::new())
        .layer(auth.clone())
        .service(client());

    let response = service.clone().oneshot(redirect_request(&w)).await.unwrap();

    // The redirect was followed, and the other host saw no credential at all.
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(w.elsewhere.requests(), 1);
    assert_eq!(w.elsewhere.with_authorization(), 0);
    // The API itself got the token, and the other host's 401 cost no refresh or replay.
    assert_eq!(w.api.with_authorization(), 1);
    assert_eq!(w.idp.token_requests(), 1);
    assert_eq!(auth.cache().stats().replays, 0);

    // Requests to the API keep working.
    let request = Request::get(w.api.url("/whoami"))
        .body(Empty::new())
        .unwrap();
    let response = service.oneshot(request).await.unwrap();
    assert_eq!(body_string(response).await, "token-1");
}

#[tokio::test]
async fn an_unscoped_layer_would_leak_the_token_to_the_redirect_target() {
    // The control experiment: without `allowed_origins`, the token reaches the other host,
    // which is why a client that follows redirects must scope its auth layer.
    let w = world().await;
    let auth = AuthLayer::new(http_provider(&w.idp));
    let service = ServiceBuilder::new()
        .layer(FollowRedirectLayer::new())
        .layer(auth)
        .service(client());

    service.oneshot(redirect_request(&w)).await.unwrap();
    // Worse than one leak: the other host's 401 invalidates our token, and the replay hands it
    // the new one too.
    assert_eq!(w.elsewhere.with_authorization(), 2);
    assert_eq!(w.idp.token_requests(), 2);
}
