//! Shared by the benches: the in-process inner service, the requests they send, the contended
//! loop of the `contention` groups, the baseline `AuthLayer` is compared against under
//! contention (a hand-written layer that keeps the token behind a `tokio::sync::Mutex`), and
//! the floor of the hot path (a layer that does only what any replay-capable layer must).
//!
//! Not a bench target itself (Cargo only discovers `benches/*.rs` and `benches/*/main.rs`).
#![allow(dead_code)]

/// The crate-private `RequestHead`, compiled from the crate's own file so the benches measure
/// the code the crate runs.
#[allow(dead_code)]
#[path = "../../src/head.rs"]
pub mod head;

use std::convert::Infallible;
use std::fmt::Debug;
use std::future::Future;
use std::hint::black_box;
use std::mem;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, BenchmarkId};
use http::header::{self, AUTHORIZATION};
use http::request::Parts;
use http::{HeaderValue, Method, Request, Response, Uri};
use http_body::Body;
use http_body_util::Empty;
use tokio::runtime::Runtime;
use tokio::sync::Mutex;
use tower::{BoxError, Layer, Service, ServiceExt};

pub const SECRET: &str = "eyJhbGciOiJSUzI1NiJ9.bench-access-token.signature";
pub const URI: &str = "http://api.example.com/v1/items";

/// The inner service: reads the body to its end, then answers `200` with an empty body.
///
/// Hand-written rather than `service_fn` so that one `Clone` type serves every request body
/// type (`B` for `bare` and `add_authorization`, `ReplayBody<B>` under `AuthLayer`), and its
/// future is a plain struct: no boxing that would blur the comparison.
#[derive(Clone, Copy, Debug, Default)]
pub struct Ok200;

impl<B: Body + Unpin> Service<Request<B>> for Ok200 {
    type Response = Response<Empty<Bytes>>;
    type Error = Infallible;
    type Future = DrainBody<B>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        DrainBody {
            body: request.into_body(),
        }
    }
}

/// Polls the request body until it says it has ended, as hyper does when it sends one. With
/// `Empty` and `Full` bodies this completes on the first poll: the inner service is immediate.
pub struct DrainBody<B> {
    body: B,
}

impl<B: Body + Unpin> Future for DrainBody<B> {
    type Output = Result<Response<Empty<Bytes>>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        while !self.body.is_end_stream() {
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Ready(Some(frame)) => drop(black_box(frame)),
                Poll::Ready(None) => break,
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(Response::new(Empty::new())))
    }
}

/// A GET with the headers a typical API client sends. `AuthLayer` copies the headers for a
/// possible replay, so an empty header map would flatter it.
pub fn get_request() -> Request<Empty<Bytes>> {
    request(Method::GET, Empty::new())
}

/// A request of `method` with `body` and the headers of [`get_request`].
pub fn request<B>(method: Method, body: B) -> Request<B> {
    let mut request = Request::new(body);
    *request.method_mut() = method;
    *request.uri_mut() = Uri::from_static(URI);
    let headers = request.headers_mut();
    headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    headers.insert(header::USER_AGENT, HeaderValue::from_static("bench/1.0"));
    request
}

/// One request: the same code, monomorphised, for every variant.
pub async fn send<S, B>(service: &mut S, request: Request<B>)
where
    S: Service<Request<B>, Response = Response<Empty<Bytes>>>,
    S::Error: Debug,
{
    let response = service
        .ready()
        .await
        .expect("the service is always ready")
        .call(request)
        .await
        .expect("the inner service never fails");
    black_box(response);
}

/// Requests per iteration in the `contention` groups: divisible by every task count, and enough
/// (several milliseconds) that waking the worker threads and joining the tasks do not dominate:
/// with 1,024 the figures mostly measured how fast an idle worker picks up a spawned task.
pub const CONTENDED_REQUESTS: u64 = 16_384;
pub const TASK_COUNTS: [u64; 4] = [1, 2, 8, 64];

/// The runtime of the contended groups: two workers, one per core of the project's machine.
pub fn multi_thread_runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// `tasks` tasks share `CONTENDED_REQUESTS` requests per iteration, each through its own clone
/// of `service`. Spawning, cloning and joining are timed too; they cost the same for every
/// variant and are small next to `CONTENDED_REQUESTS` requests.
pub fn bench_contended<S>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    runtime: &Runtime,
    name: &str,
    tasks: u64,
    service: &S,
) where
    S: Service<Request<Empty<Bytes>>, Response = Response<Empty<Bytes>>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Debug,
{
    let per_task = CONTENDED_REQUESTS / tasks;
    group.bench_with_input(BenchmarkId::new(name, tasks), &tasks, |b, &tasks| {
        b.to_async(runtime).iter_custom(|iters| {
            let service = service.clone();
            async move {
                let start = Instant::now();
                for _ in 0..iters {
                    let handles: Vec<_> = (0..tasks)
                        .map(|_| {
                            let mut service = service.clone();
                            tokio::spawn(async move {
                                for _ in 0..per_task {
                                    send(&mut service, get_request()).await;
                                }
                            })
                        })
                        .collect();
                    for handle in handles {
                        handle.await.expect("a request task panicked");
                    }
                }
                start.elapsed()
            }
        });
    });
}

/// The token as the hand-written fix keeps it: the secret and when the identity provider said
/// it expires.
pub struct HandToken {
    pub secret: String,
    pub expires_at: Option<Instant>,
}

type FetchFuture = Pin<Box<dyn Future<Output = Result<HandToken, BoxError>> + Send>>;
type Fetch = Arc<dyn Fn() -> FetchFuture + Send + Sync>;

/// The baseline: what most hand-written fixes look like. One `Arc<tokio::sync::Mutex<..>>`
/// shared by every clone; each request locks it, fetches a token if there is none or it has
/// expired (while holding the lock, so concurrent requests queue behind the refresh instead of
/// all calling the identity provider), formats `Bearer <token>`, marks it sensitive, and
/// inserts it.
///
/// It is correct (`poll_ready` is the inner service's, and the service made ready is the one
/// called, tower's `mem::replace` idiom), it refreshes once per expiry, and it never sends an
/// expired token. Its costs are the ones such fixes pay: an async lock on every request, a
/// `format!` and header parse per request, and a boxed future.
#[derive(Clone)]
pub struct MutexAuthLayer {
    token: Arc<Mutex<Option<HandToken>>>,
    fetch: Fetch,
}

impl MutexAuthLayer {
    /// No token until the first request fetches one through `fetch`.
    pub fn new<F, Fut>(fetch: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<HandToken, BoxError>> + Send + 'static,
    {
        Self {
            token: Arc::new(Mutex::new(None)),
            fetch: Arc::new(move || -> FetchFuture { Box::pin(fetch()) }),
        }
    }
}

impl<S> Layer<S> for MutexAuthLayer {
    type Service = MutexAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MutexAuth {
            inner,
            token: self.token.clone(),
            fetch: self.fetch.clone(),
        }
    }
}

/// The service [`MutexAuthLayer`] builds.
#[derive(Clone)]
pub struct MutexAuth<S> {
    inner: S,
    token: Arc<Mutex<Option<HandToken>>>,
    fetch: Fetch,
}

impl<S, B> Service<Request<B>> for MutexAuth<S>
where
    S: Service<Request<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = mem::replace(&mut self.inner, clone);
        let token = self.token.clone();
        let fetch = self.fetch.clone();
        Box::pin(async move {
            let value = {
                let mut cached = token.lock().await;
                let fresh = cached
                    .take()
                    .filter(|t| t.expires_at.is_none_or(|at| Instant::now() < at));
                let current = match fresh {
                    Some(current) => current,
                    // The first request to find it missing or expired refreshes it, holding the
                    // lock: the others wait for the lock, then find the new token.
                    None => fetch().await?,
                };
                let mut value = HeaderValue::from_str(&format!("Bearer {}", current.secret))?;
                value.set_sensitive(true);
                *cached = Some(current);
                value
            };
            request.headers_mut().insert(AUTHORIZATION, value);
            inner.call(request).await.map_err(Into::into)
        })
    }
}

/// What a [`FloorLayer`] keeps of each request's head until its response arrives.
pub trait KeepHead: Send + 'static {
    /// Copies the head of a request about to be sent.
    fn keep(parts: &Parts) -> Self;
}

/// The head as `http` clones it: `Method`, `Uri`, `HeaderMap` and `Extensions` clones, which is
/// what `AuthLayer` keeps today.
pub struct ClonedParts(pub Parts);

impl KeepHead for ClonedParts {
    fn keep(parts: &Parts) -> Self {
        let (mut copy, ()) = Request::new(()).into_parts();
        copy.method = parts.method.clone();
        copy.uri = parts.uri.clone();
        copy.version = parts.version;
        copy.headers = parts.headers.clone();
        copy.extensions = parts.extensions.clone();
        ClonedParts(copy)
    }
}

impl KeepHead for head::RequestHead {
    fn keep(parts: &Parts) -> Self {
        head::RequestHead::capture(parts)
    }
}

/// The floor of the hot path: the least a layer that can replay a request after a 401 must do.
/// It inserts a prebuilt, sensitive `Authorization` value (no token cache, no clock) and keeps
/// a copy of the request head (`H`) alive until the response future completes, because after
/// the inner service has consumed the request nothing can give its head back. It never
/// replays, never wraps the body and never looks at the response.
///
/// `FloorLayer<ClonedParts>` keeps the head as `http::request::Parts` clones (the floor of
/// `AuthLayer` as it copies today); `FloorLayer<head::RequestHead>` keeps the one-allocation
/// snapshot.
pub struct FloorLayer<H> {
    header: HeaderValue,
    head: std::marker::PhantomData<fn() -> H>,
}

impl<H> FloorLayer<H> {
    /// Sends `Bearer <secret>`, marked sensitive.
    pub fn bearer(secret: &str) -> Self {
        let mut header =
            HeaderValue::from_str(&format!("Bearer {secret}")).expect("a valid header value");
        header.set_sensitive(true);
        FloorLayer {
            header,
            head: std::marker::PhantomData,
        }
    }
}

impl<H> Clone for FloorLayer<H> {
    fn clone(&self) -> Self {
        FloorLayer {
            header: self.header.clone(),
            head: std::marker::PhantomData,
        }
    }
}

impl<S, H> Layer<S> for FloorLayer<H> {
    type Service = Floor<S, H>;

    fn layer(&self, inner: S) -> Self::Service {
        Floor {
            inner,
            header: self.header.clone(),
            head: std::marker::PhantomData,
        }
    }
}

/// The service [`FloorLayer`] builds.
pub struct Floor<S, H> {
    inner: S,
    header: HeaderValue,
    head: std::marker::PhantomData<fn() -> H>,
}

impl<S: Clone, H> Clone for Floor<S, H> {
    fn clone(&self) -> Self {
        Floor {
            inner: self.inner.clone(),
            header: self.header.clone(),
            head: std::marker::PhantomData,
        }
    }
}

impl<S, H, B> Service<Request<B>> for Floor<S, H>
where
    S: Service<Request<B>>,
    H: KeepHead,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = FloorFuture<S::Future, H>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let (mut parts, body) = request.into_parts();
        parts.headers.insert(AUTHORIZATION, self.header.clone());
        let head = H::keep(&parts);
        FloorFuture {
            inner: self.inner.call(Request::from_parts(parts, body)),
            head: Some(head),
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner future, and the head kept until it completes.
    pub struct FloorFuture<F, H> {
        #[pin]
        inner: F,
        head: Option<H>,
    }
}

impl<F: Future, H> Future for FloorFuture<F, H> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let output = std::task::ready!(this.inner.poll(cx));
        // The response is in: no replay can be needed any more.
        *this.head = None;
        Poll::Ready(output)
    }
}
