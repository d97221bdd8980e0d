//! gRPC over tonic (feature `tonic`): a real tonic `Channel` through the auth layer against a
//! real tonic server on loopback whose interceptor answers `UNAUTHENTICATED` for a revoked
//! token, with tokens from the loopback identity provider.
//!
//! `GRPC_ROUNDS` and `GRPC_CALLS` size the soak of unary calls (default 20 rounds of 1,000).

mod support;

#[path = "grpc_server/mod.rs"]
mod grpc_server;

use tonic::transport::{Channel, Endpoint};
use tonic::Code;
use tower::ServiceBuilder;
use tower_auth_refresh::grpc::{self, TonicBody};
use tower_auth_refresh::{AuthLayer, AuthService};

use grpc_server::{codec, GrpcServer, Msg, COUNT, COUNT_THEN_REFUSE, SUM, UNARY};
use support::{http_provider, IdentityProvider, TokenRegistry};

type Client = tonic::client::Grpc<AuthService<Channel, TonicBody>>;

struct World {
    idp: IdentityProvider,
    server: GrpcServer,
    registry: TokenRegistry,
    auth: AuthLayer<TonicBody>,
    client: Client,
}

/// Tokens that never expire by time and are not announced as expiring: they expire when the
/// server revokes them, and the client learns of it only through `UNAUTHENTICATED`.
async fn world() -> World {
    let (registry, idp, server, channel, auth) = parts().await;
    let service = ServiceBuilder::new().layer(auth.clone()).service(channel);
    World {
        idp,
        server,
        registry,
        auth,
        client: tonic::client::Grpc::new(service),
    }
}

/// The servers, a connected channel, and the layer with tonic's body and gRPC's predicate.
async fn parts() -> (
    TokenRegistry,
    IdentityProvider,
    GrpcServer,
    Channel,
    AuthLayer<TonicBody>,
) {
    let registry = TokenRegistry::default();
    let idp = IdentityProvider::start(registry.clone(), None).await;
    let server = GrpcServer::start(registry.clone()).await;
    let channel = Endpoint::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let auth = AuthLayer::builder(http_provider(&idp))
        .inner_body(TonicBody)
        .token_rejected_when(grpc::unauthenticated)
        .build();
    (registry, idp, server, channel, auth)
}

async fn unary(client: &mut Client, n: u32) -> Result<Msg, tonic::Status> {
    client
        .ready()
        .await
        .map_err(|e| tonic::Status::unknown(e.to_string()))?;
    let mut request = tonic::Request::new(Msg::n(n));
    request.metadata_mut().insert("call-id", n.into());
    let response = client.unary(request, UNARY, codec()).await?;
    Ok(response.into_inner())
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// 1,000 unary calls, 16 at a time, while the server revokes every token after each 100
/// accepted calls: every call succeeds, each revocation costs exactly one token request, and
/// every call the server refused was replayed (none lost to the race between the response and
/// the request body's last poll). Repeated 20 times, each round with fresh servers and client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_calls_survive_revocations_with_one_token_request_each() {
    use futures::StreamExt;

    let rounds = env("GRPC_ROUNDS", 20);
    let calls = env("GRPC_CALLS", 1_000);
    let revoke_every = 100;
    for round in 0..rounds {
        let w = world().await;
        w.server.revoke_every(revoke_every);
        let results: Vec<_> = futures::stream::iter(0..calls as u32)
            .map(|n| {
                let mut client = w.client.clone();
                async move { (n, unary(&mut client, n).await) }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        let failed: Vec<_> = results
            .iter()
            .filter(|(n, result)| result.as_ref().map(|msg| msg.n).ok() != Some(*n))
            .collect();
        let stats = w.auth.cache().stats();
        assert!(
            failed.is_empty(),
            "round {round}: {} of {calls} calls failed, first: {:?}, refused {:?} times; \
             {} refused in all; {stats:?}",
            failed.len(),
            failed.first(),
            failed
                .first()
                .map(|(n, _)| w.server.refusals_of(&n.to_string())),
            w.server.refused(),
        );
        // The last revocation comes with the last accepted call: nothing is refused after it.
        let revocations = calls / revoke_every;
        assert_eq!(w.server.revocations(), revocations, "round {round}");
        assert_eq!(
            w.server.accepted(),
            calls,
            "round {round}: one accepted attempt per call"
        );
        assert_eq!(
            w.idp.token_requests(),
            revocations,
            "round {round}: one token for the start, one per revocation but the last"
        );
        assert_eq!(stats.token_requests, revocations as u64, "round {round}");
        assert_eq!(w.server.refused_tokens(), revocations - 1, "round {round}");
        assert_eq!(
            stats.replays,
            w.server.refused() as u64,
            "round {round}: every refused call was replayed once"
        );
        assert!(w.server.refused() >= revocations - 1, "round {round}");
    }
}

/// A client-streaming call whose messages fit the replay cap is replayed whole.
#[tokio::test]
async fn a_client_streaming_call_is_replayed_within_the_cap() {
    let mut w = world().await;
    assert_eq!(unary(&mut w.client, 7).await.unwrap().text, "token-1");
    w.registry.revoke_all();

    let messages = futures::stream::iter((1..=10).map(Msg::n));
    w.client.ready().await.unwrap();
    let response = w
        .client
        .client_streaming(tonic::Request::new(messages), SUM, codec())
        .await
        .unwrap()
        .into_inner();
    assert_eq!((response.n, response.text.as_str()), (55, "10"));
    assert_eq!(w.idp.token_requests(), 2);
    assert_eq!(w.server.refused(), 1);
    assert_eq!(w.server.accepted(), 2, "the warm-up call and the replay");
    assert_eq!(w.auth.cache().stats().replays, 1);
}

/// A client stream larger than the replay cap goes out once; its `UNAUTHENTICATED` reaches the
/// caller, and the next call gets a new token.
#[tokio::test]
async fn a_client_stream_over_the_cap_is_refused_and_the_next_call_recovers() {
    let mut w = world().await;
    unary(&mut w.client, 1).await.unwrap();
    w.registry.revoke_all();

    // 20 messages of 4 KiB each: 80 KiB, over the default 64 KiB cap.
    let big = "x".repeat(4096);
    let messages = futures::stream::iter((0..20).map(move |n| Msg {
        n,
        text: big.clone(),
    }));
    w.client.ready().await.unwrap();
    let status = w
        .client
        .client_streaming(tonic::Request::new(messages), SUM, codec())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(w.auth.cache().stats().replays, 0);

    assert_eq!(unary(&mut w.client, 2).await.unwrap().text, "token-2");
    assert_eq!(w.idp.token_requests(), 2);
    assert_eq!(w.server.refused(), 1);
}

/// A server-streaming call refused before its first message gets a trailers-only
/// `UNAUTHENTICATED` (the status in the headers): it is replayed, and the whole stream arrives.
#[tokio::test]
async fn a_trailers_only_refusal_of_a_server_stream_is_replayed() {
    let mut w = world().await;
    unary(&mut w.client, 1).await.unwrap();
    w.registry.revoke_all();

    w.client.ready().await.unwrap();
    let mut stream = w
        .client
        .server_streaming(tonic::Request::new(Msg::n(5)), COUNT, codec())
        .await
        .unwrap()
        .into_inner();
    let mut received = Vec::new();
    while let Some(message) = stream.message().await.unwrap() {
        received.push(message.n);
    }
    assert_eq!(received, [0, 1, 2, 3, 4]);
    assert_eq!(w.idp.token_requests(), 2);
    assert_eq!(w.server.refused(), 1);
    assert_eq!(w.auth.cache().stats().replays, 1);
}

/// A status in trailers after a normal header frame is not seen by the layer: the caller gets
/// the messages and then `UNAUTHENTICATED`, nothing is replayed, and no token is fetched.
#[tokio::test]
async fn a_status_in_trailers_reaches_the_caller_unreplayed() {
    let mut w = world().await;
    w.client.ready().await.unwrap();
    let mut stream = w
        .client
        .server_streaming(tonic::Request::new(Msg::n(2)), COUNT_THEN_REFUSE, codec())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stream.message().await.unwrap().map(|m| m.n), Some(0));
    assert_eq!(stream.message().await.unwrap().map(|m| m.n), Some(1));
    let status = stream.message().await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(w.idp.token_requests(), 1);
    assert_eq!(w.auth.cache().stats().replays, 0);
    assert_eq!(w.auth.cache().stats().invalidations, 0);
}

/// Without the gRPC predicate, `UNAUTHENTICATED` inside an HTTP 200 is not a rejection: the
/// call fails and the token stays in use (the first symptom).
#[tokio::test]
async fn the_default_predicate_does_not_see_unauthenticated() {
    let registry = TokenRegistry::default();
    let idp = IdentityProvider::start(registry.clone(), None).await;
    let server = GrpcServer::start(registry.clone()).await;
    let channel = Endpoint::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let auth = AuthLayer::builder(http_provider(&idp))
        .inner_body(TonicBody)
        .build();
    let service = ServiceBuilder::new().layer(auth.clone()).service(channel);
    let mut client = tonic::client::Grpc::new(service);
    client.ready().await.unwrap();
    client
        .unary(tonic::Request::new(Msg::n(1)), UNARY, codec())
        .await
        .unwrap();
    registry.revoke_all();
    for _ in 0..2 {
        client.ready().await.unwrap();
        let status = client
            .unary(tonic::Request::new(Msg::n(1)), UNARY, codec())
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }
    assert_eq!(idp.token_requests(), 1);
    assert_eq!(auth.cache().stats().replays, 0);
}

/// A status in trailers cannot be replayed, but with `TrailersRejectionLayer` below the auth
/// layer it retires the token it refused: the next call takes a new token up front.
#[tokio::test]
async fn a_status_in_trailers_retires_the_token_with_the_trailers_layer() {
    let (_registry, idp, _server, channel, auth) = parts().await;
    let service = ServiceBuilder::new()
        .layer(auth.clone())
        .layer(grpc::TrailersRejectionLayer::new(auth.cache().clone()))
        .service(channel);
    let mut client = tonic::client::Grpc::new(service);
    client.ready().await.unwrap();
    let mut stream = client
        .server_streaming(tonic::Request::new(Msg::n(2)), COUNT_THEN_REFUSE, codec())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stream.message().await.unwrap().map(|m| m.n), Some(0));
    assert_eq!(stream.message().await.unwrap().map(|m| m.n), Some(1));
    let status = stream.message().await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let stats = auth.cache().stats();
    assert_eq!((stats.invalidations, stats.replays), (1, 0));

    // The next call takes token-2 up front: no refusal, no replay.
    client.ready().await.unwrap();
    client
        .unary(tonic::Request::new(Msg::n(7)), UNARY, codec())
        .await
        .unwrap();
    assert_eq!(idp.token_requests(), 2);
    assert_eq!(auth.cache().stats().replays, 0);
}
