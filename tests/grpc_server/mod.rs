//! A real tonic gRPC server on 127.0.0.1:0 for tests/grpc.rs and examples/grpc.rs: service
//! `test.Test`, written by hand on tonic's codegen-free server API with prost-derived messages
//! (no protoc needed), behind a tonic interceptor that checks the bearer token against the
//! loopback identity provider's [`TokenRegistry`] and answers `UNAUTHENTICATED` (a trailers-only
//! response) for a missing, unknown or revoked token.
//!
//! Methods (all take and return [`Msg`]):
//! - `Unary`: `n` back, and the token that was accepted as `text`.
//! - `Sum` (client streaming): the sum of the `n`s, and how many messages came, as `text`.
//! - `Count` (server streaming): `n` messages, numbered from 0.
//! - `CountThenRefuse` (server streaming): `n` messages, then status `UNAUTHENTICATED` in the
//!   trailers, as a server does whose token check runs per message.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use http::uri::PathAndQuery;
use tokio::net::TcpListener;
use tonic::codec::Streaming;
use tonic::service::interceptor::InterceptorLayer;
use tonic::{Request, Response, Status};
use tonic_prost::ProstCodec;
use tower::service_fn;

use super::support::TokenRegistry;

/// The one message type of `test.Test`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Msg {
    #[prost(uint32, tag = "1")]
    pub n: u32,
    #[prost(string, tag = "2")]
    pub text: String,
}

impl Msg {
    pub fn n(n: u32) -> Self {
        Self {
            n,
            text: String::new(),
        }
    }
}

/// The codec a client of `test.Test` uses.
pub fn codec() -> ProstCodec<Msg, Msg> {
    ProstCodec::default()
}

pub const UNARY: PathAndQuery = PathAndQuery::from_static("/test.Test/Unary");
pub const SUM: PathAndQuery = PathAndQuery::from_static("/test.Test/Sum");
pub const COUNT: PathAndQuery = PathAndQuery::from_static("/test.Test/Count");
pub const COUNT_THEN_REFUSE: PathAndQuery = PathAndQuery::from_static("/test.Test/CountThenRefuse");

#[derive(Default)]
struct Counters {
    /// Calls that passed the token check.
    accepted: AtomicUsize,
    /// Calls answered `UNAUTHENTICATED` by the interceptor.
    refused: AtomicUsize,
    /// Distinct tokens the interceptor refused.
    refused_tokens: Mutex<HashSet<String>>,
    /// Refusals per `call-id` metadata value, for calls that carry one.
    refused_calls: Mutex<HashMap<String, usize>>,
    /// Revoke every issued token after this many accepted calls (0: never).
    revoke_every: AtomicUsize,
    /// How many times the server revoked every token.
    revocations: AtomicUsize,
}

/// A running `test.Test` server; counters of what reached it.
#[derive(Clone)]
pub struct GrpcServer {
    addr: SocketAddr,
    counters: Arc<Counters>,
}

impl GrpcServer {
    /// Start one that accepts the tokens `registry` holds.
    pub async fn start(registry: TokenRegistry) -> Self {
        let counters = Arc::new(Counters::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = futures::stream::unfold(listener, |listener| async move {
            let stream = listener.accept().await.map(|(stream, _)| stream);
            Some((stream, listener))
        });
        let check = {
            let counters = counters.clone();
            move |request: Request<()>| check_token(&registry, &counters, request)
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .layer(InterceptorLayer::new(check))
                .serve_with_incoming(TestService, incoming),
        );
        Self { addr, counters }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Calls that passed the token check (first attempts and replays).
    pub fn accepted(&self) -> usize {
        self.counters.accepted.load(Ordering::SeqCst)
    }

    /// Calls refused with `UNAUTHENTICATED` by the token check.
    pub fn refused(&self) -> usize {
        self.counters.refused.load(Ordering::SeqCst)
    }

    /// Distinct tokens the token check refused.
    pub fn refused_tokens(&self) -> usize {
        self.counters.refused_tokens.lock().unwrap().len()
    }

    /// How many times the call whose `call-id` metadata is `id` was refused.
    pub fn refusals_of(&self, id: &str) -> usize {
        let calls = self.counters.refused_calls.lock().unwrap();
        calls.get(id).copied().unwrap_or(0)
    }

    /// Revoke every issued token each time `calls` more calls were accepted: the server-side
    /// expiry a client learns of only through `UNAUTHENTICATED`.
    pub fn revoke_every(&self, calls: usize) {
        self.counters.revoke_every.store(calls, Ordering::SeqCst);
    }

    /// How many times every token was revoked.
    pub fn revocations(&self) -> usize {
        self.counters.revocations.load(Ordering::SeqCst)
    }
}

fn check_token(
    registry: &TokenRegistry,
    counters: &Counters,
    request: Request<()>,
) -> Result<Request<()>, Status> {
    let token = request
        .metadata()
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    match token {
        Some(token) if registry.is_valid(token) => {
            let accepted = counters.accepted.fetch_add(1, Ordering::SeqCst) + 1;
            let every = counters.revoke_every.load(Ordering::SeqCst);
            if every > 0 && accepted % every == 0 {
                registry.revoke_all();
                counters.revocations.fetch_add(1, Ordering::SeqCst);
            }
            Ok(request)
        }
        token => {
            counters.refused.fetch_add(1, Ordering::SeqCst);
            if let Some(id) = request.metadata().get("call-id") {
                let id = id.to_str().unwrap_or_default().to_owned();
                *counters
                    .refused_calls
                    .lock()
                    .unwrap()
                    .entry(id)
                    .or_default() += 1;
            }
            if let Some(token) = token {
                counters
                    .refused_tokens
                    .lock()
                    .unwrap()
                    .insert(token.to_owned());
            }
            Err(Status::unauthenticated("invalid or expired token"))
        }
    }
}

/// `test.Test`, dispatched by path as tonic's generated servers do.
#[derive(Clone)]
struct TestService;

impl tower::Service<http::Request<tonic::body::Body>> for TestService {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(codec());
            let path = request.uri().path().to_owned();
            let response = if path == UNARY.path() {
                grpc.unary(service_fn(unary), request).await
            } else if path == SUM.path() {
                grpc.client_streaming(service_fn(sum), request).await
            } else if path == COUNT.path() {
                grpc.server_streaming(service_fn(count), request).await
            } else if path == COUNT_THEN_REFUSE.path() {
                grpc.server_streaming(service_fn(count_then_refuse), request)
                    .await
            } else {
                Status::unimplemented(path).into_http()
            };
            Ok(response)
        })
    }
}

async fn unary(request: Request<Msg>) -> Result<Response<Msg>, Status> {
    let token = request
        .metadata()
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_owned();
    Ok(Response::new(Msg {
        n: request.get_ref().n,
        text: token,
    }))
}

async fn sum(request: Request<Streaming<Msg>>) -> Result<Response<Msg>, Status> {
    let mut stream = request.into_inner();
    let (mut sum, mut messages) = (0, 0);
    while let Some(message) = stream.message().await? {
        sum += message.n;
        messages += 1;
    }
    Ok(Response::new(Msg {
        n: sum,
        text: messages.to_string(),
    }))
}

type MsgStream = futures::stream::Iter<std::vec::IntoIter<Result<Msg, Status>>>;

async fn count(request: Request<Msg>) -> Result<Response<MsgStream>, Status> {
    let messages: Vec<_> = (0..request.get_ref().n).map(|i| Ok(Msg::n(i))).collect();
    Ok(Response::new(futures::stream::iter(messages)))
}

async fn count_then_refuse(request: Request<Msg>) -> Result<Response<MsgStream>, Status> {
    let mut messages: Vec<_> = (0..request.get_ref().n).map(|i| Ok(Msg::n(i))).collect();
    messages.push(Err(Status::unauthenticated("token revoked mid-stream")));
    Ok(Response::new(futures::stream::iter(messages)))
}
