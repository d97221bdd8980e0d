//! A tonic gRPC client whose calls outlive their tokens:
//! `cargo run --example grpc --features tonic`.
//!
//! An embedded identity provider issues tokens without an expiry; an embedded tonic server
//! revokes every token after each 100 calls and answers `UNAUTHENTICATED`. The client learns of
//! each revocation only from that answer, fetches one new token, and replays the refused calls.

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "../tests/grpc_server/mod.rs"]
mod grpc_server;

use futures::StreamExt;
use tower::ServiceBuilder;
use tower_auth_refresh::{grpc, AuthLayer};

use grpc_server::{codec, GrpcServer, Msg, UNARY};
use support::{http_provider, IdentityProvider, TokenRegistry};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let registry = TokenRegistry::default();
    let idp = IdentityProvider::start(registry.clone(), None).await;
    let server = GrpcServer::start(registry).await;
    server.revoke_every(100);

    // The client: a tonic channel below the auth layer.
    let channel = tonic::transport::Endpoint::from_shared(server.url())?
        .connect()
        .await?;
    let auth = AuthLayer::builder(http_provider(&idp))
        .inner_body(grpc::TonicBody) // tonic's Channel takes tonic::body::Body
        .token_rejected_when(grpc::unauthenticated) // grpc-status 16, or HTTP 401
        .build();
    let client =
        tonic::client::Grpc::new(ServiceBuilder::new().layer(auth.clone()).service(channel));

    let calls = 1_000u32;
    let ok = futures::stream::iter(0..calls)
        .map(|n| {
            let mut client = client.clone();
            async move {
                client.ready().await.ok()?;
                let reply = client.unary(tonic::Request::new(Msg::n(n)), UNARY, codec());
                reply.await.ok().filter(|reply| reply.get_ref().n == n)
            }
        })
        .buffer_unordered(16)
        .filter(|reply| std::future::ready(reply.is_some()))
        .count()
        .await;

    let stats = auth.cache().stats();
    println!("{ok} of {calls} calls succeeded");
    println!(
        "the server revoked every token {} times and refused {} calls",
        server.revocations(),
        server.refused()
    );
    println!(
        "{} token requests, {} replays",
        stats.token_requests, stats.replays
    );
    Ok(())
}
