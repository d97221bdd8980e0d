//! End to end over loopback: hyper-util's legacy client and a hyper server on 127.0.0.1, with
//! and without `AuthLayer`; then how much memory a request in flight holds.
//!
//! Groups `end_to_end_http1` and `end_to_end_http2`, on one 2-worker multi-thread tokio runtime
//! that runs both the client and a minimal hyper server (it answers `200` and a 22-byte JSON
//! body to any request with a `Bearer` authorization, `401` otherwise). Each iteration is
//! 4,096 GETs shared by concurrent tasks, each reading its response body to the end:
//!
//! - HTTP/1.1: 32 tasks, so 32 requests in flight over the client's pool (32 connections).
//! - HTTP/2: 64 tasks over one multiplexed connection (`http2_only(true)`, prior knowledge),
//!   so 64 concurrent streams; the bench asserts that each client opened exactly one
//!   connection.
//!
//! Both variants use the same client configuration (`TCP_NODELAY`, default pool), the same
//! server, and their own pool, warmed before measuring. Reported as requests/second
//! (`Throughput::Elements`).
//!
//! - `static_header`: the client alone; the caller puts a fixed, sensitive
//!   `Authorization: Bearer ...` header on each request, so the server sees the same bytes in
//!   both variants.
//! - `auth_layer`: `tower_auth_refresh::AuthLayer` over the client, with a `StaticToken` that
//!   lives an hour (fetched before measuring; the bench asserts no refresh or replay happened).
//!
//! Criterion measures one variant after the other, so a machine whose load changes between
//! them skews the ratio. The figure to quote is the interleaved comparison printed after the
//! groups: for each protocol, rounds of 4,096 requests alternate between the variants (ABBA
//! order), and the ratio `auth_layer / static_header` of requests per second is taken within
//! each round; it prints the median ratio, its interquartile range, and each variant's median
//! rate. `END_TO_END_ROUNDS` sets the rounds (default 40); `0` skips it.
//!
//! What limits it: client and server share 2 cores and the loopback TCP stack, so a request
//! costs tens of microseconds of CPU (hyper and syscalls on both sides) and `AuthLayer`'s share
//! of that is small. The figure is sensitive to anything else running: on a shared 2-core
//! machine, runs minutes apart differed by more than the two variants do, so compare variants
//! within one run, on a quiet machine.
//!
//! Memory check (outside criterion, printed after the group when run by `cargo bench`): a
//! counting `#[global_allocator]` (this file only) wraps `std::alloc::System` and tracks the
//! bytes currently allocated by the client's threads; the server runs on a separate runtime
//! whose threads are not counted. 1,000 POSTs are put in flight at once (over HTTP/1.1, one
//! pooled connection each, opened beforehand; over HTTP/2, as streams of one connection) to a
//! server that reads each body to its end and then holds the response until all 1,000 have
//! arrived. The growth in allocated bytes from before the requests
//! are created until all are held, divided by 1,000, is the client-side cost of one request in
//! flight (its task, the request, the client's and the layer's state for it), with and without
//! `AuthLayer`, for three bodies:
//!
//! - `64KiB kept by caller`: the caller allocated the 64 KiB bodies beforehand and keeps them;
//!   requests send clones (reference counts). What the requests add is bookkeeping, unless
//!   something copies the body: a copy would show as 64 KiB more per request.
//! - `64KiB handed over`: each request allocates its 64 KiB body and hands it over. Without the
//!   layer hyper frees it once written; `AuthLayer` keeps a reference for a possible replay, so
//!   the same buffer lives until the response arrives: the replay's cost is that retention,
//!   bounded by the cap.
//! - `64KiB+1B handed over`: a body over the replay cap (64 KiB by default) is not kept.
//!
//! The last column is what is still held, per request, once every response is in: `0` means
//! nothing outlives the request.
//!
//! The HTTP/1.1 check needs about 2,000 file descriptors (`ulimit -n`) for the 1,000
//! connections and their server sides. Set `END_TO_END_MEMORY=0` to skip it.
//!
//! ```text
//! cargo bench --bench end_to_end
//! ```
//!
//! About a minute and a half.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::convert::Infallible;
use std::fmt::Debug;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, SamplingMode, Throughput};
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::sync::watch;
use tower::{Layer, Service, ServiceExt};
use tower_auth_refresh::{AuthLayer, ReplayBody, StaticToken, Token};

mod common;

use common::{ClonedParts, FloorLayer};

const SECRET: &str = "eyJhbGciOiJSUzI1NiJ9.bench-access-token.signature";
/// GETs per iteration (and per round of the interleaved comparison).
const REQUESTS: u64 = 4_096;
const ANSWER: &[u8] = br#"{"id":1,"name":"item"}"#;
/// Requests held in flight at once by the memory check.
const IN_FLIGHT: usize = 1_000;
const BODY: usize = 64 * 1024;

// ---------------------------------------------------------------------------------------------
// Counting allocator: bytes currently allocated by threads that opted in.

/// Wraps the system allocator and keeps [`HELD`] up to date for the threads that set
/// [`COUNTED`]: the client's runtime threads during the memory check. Everything else (the
/// criterion measurements, the server) pays one thread-local read per allocation.
struct Counting;

static HELD: AtomicIsize = AtomicIsize::new(0);

thread_local! {
    static COUNTED: Cell<bool> = const { Cell::new(false) };
}

fn counted() -> bool {
    COUNTED.try_with(Cell::get).unwrap_or(false)
}

fn count(bytes: isize) {
    if counted() {
        HELD.fetch_add(bytes, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded to `System` unchanged; the counting touches no allocation.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which `System` shares.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            count(layout.size() as isize);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            count(layout.size() as isize);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by this allocator, that is by `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        count(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`; `new_size` is checked by the caller.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            count(new_size as isize - layout.size() as isize);
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn held() -> isize {
    HELD.load(Ordering::SeqCst)
}

// ---------------------------------------------------------------------------------------------
// Servers.

/// The protocol a server speaks and a client uses, and how many requests a throughput run keeps
/// in flight with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    /// HTTP/1.1, one connection per request in flight.
    Http1,
    /// HTTP/2 with prior knowledge, one connection multiplexing every stream.
    Http2,
}

impl Protocol {
    fn name(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
        }
    }

    /// Tasks sharing the requests of an iteration: requests (or streams) in flight.
    fn concurrency(self) -> u64 {
        match self {
            Protocol::Http1 => 32,
            Protocol::Http2 => 64,
        }
    }
}

/// A server on a fresh loopback port, running on the current runtime.
struct Server {
    addr: SocketAddr,
    /// Connections accepted so far.
    connections: Arc<AtomicUsize>,
}

/// Serve `handler` over `protocol` on a fresh loopback port, on the current runtime.
async fn serve<H, F>(protocol: Protocol, handler: H) -> Server
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local address");
    let connections = Arc::new(AtomicUsize::new(0));
    let accepted = connections.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            accepted.fetch_add(1, Ordering::SeqCst);
            let _ = stream.set_nodelay(true);
            let service = hyper::service::service_fn(handler.clone());
            let io = TokioIo::new(stream);
            tokio::spawn(async move {
                let _ = match protocol {
                    Protocol::Http1 => {
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .await
                    }
                    Protocol::Http2 => {
                        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            // Room for every stream the memory check holds at once.
                            .max_concurrent_streams(IN_FLIGHT as u32 + 64)
                            .serve_connection(io, service)
                            .await
                    }
                };
            });
        }
    });
    Server { addr, connections }
}

fn respond(status: StatusCode, body: &'static [u8]) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body)));
    *response.status_mut() = status;
    response
}

/// The API of the throughput group: any bearer token will do.
async fn api(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let authorized = request
        .headers()
        .get(header::AUTHORIZATION)
        .is_some_and(|value| value.as_bytes().starts_with(b"Bearer "));
    // Read whatever body came, as a real API does.
    let _ = request.into_body().collect().await;
    Ok(if authorized {
        respond(StatusCode::OK, ANSWER)
    } else {
        respond(StatusCode::UNAUTHORIZED, b"")
    })
}

/// The server of the memory check: reads each body to its end, counts it, and answers only
/// once the gate opens.
struct Holding {
    received: AtomicUsize,
    gate: watch::Sender<bool>,
}

async fn hold(
    state: Arc<Holding>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut gate = state.gate.subscribe();
    let mut body = request.into_body();
    while let Some(frame) = body.frame().await {
        if frame.is_err() {
            return Ok(respond(StatusCode::BAD_REQUEST, b""));
        }
    }
    state.received.fetch_add(1, Ordering::SeqCst);
    let _ = gate.wait_for(|open| *open).await;
    Ok(respond(StatusCode::OK, b"ok"))
}

// ---------------------------------------------------------------------------------------------
// Clients.

/// The one client configuration both variants use, for `protocol`.
fn client<B>(protocol: Protocol) -> Client<HttpConnector, B>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let mut builder = Client::builder(TokioExecutor::new());
    if protocol == Protocol::Http2 {
        builder.http2_only(true);
    }
    builder.build(connector)
}

fn auth_layer() -> AuthLayer {
    AuthLayer::new(StaticToken::new(
        Token::new(SECRET).with_expires_in(Duration::from_secs(3600)),
    ))
}

fn bearer() -> HeaderValue {
    let mut value = HeaderValue::from_str(&format!("Bearer {SECRET}")).expect("valid header");
    value.set_sensitive(true);
    value
}

fn request<B>(
    method: Method,
    uri: &Uri,
    body: B,
    authorization: Option<&HeaderValue>,
) -> Request<B> {
    let mut request = Request::new(body);
    *request.method_mut() = method;
    *request.uri_mut() = uri.clone();
    let headers = request.headers_mut();
    headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    headers.insert(header::USER_AGENT, HeaderValue::from_static("bench/1.0"));
    if let Some(authorization) = authorization {
        headers.insert(header::AUTHORIZATION, authorization.clone());
    }
    request
}

/// Send one request and read the response to its end.
async fn exchange<S, B>(service: &mut S, request: Request<B>) -> StatusCode
where
    S: Service<Request<B>, Response = Response<Incoming>>,
    S::Error: Debug,
{
    let response = service
        .ready()
        .await
        .expect("ready")
        .call(request)
        .await
        .expect("the server answers");
    let status = response.status();
    response
        .into_body()
        .collect()
        .await
        .expect("the response body arrives");
    status
}

// ---------------------------------------------------------------------------------------------
// Throughput.

/// One iteration: `protocol.concurrency()` tasks share `REQUESTS` GETs, each through its own
/// clone of `service`; `authorization` is the header the caller adds itself (`None` under the
/// layer).
async fn run_batch<S>(protocol: Protocol, service: S, uri: Uri, authorization: Option<HeaderValue>)
where
    S: Service<Request<Empty<Bytes>>, Response = Response<Incoming>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Debug,
{
    let tasks = protocol.concurrency();
    let per_task = REQUESTS / tasks;
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let mut service = service.clone();
            let uri = uri.clone();
            let authorization = authorization.clone();
            tokio::spawn(async move {
                for _ in 0..per_task {
                    let request = request(Method::GET, &uri, Empty::new(), authorization.as_ref());
                    let status = exchange(&mut service, request).await;
                    assert_eq!(status, StatusCode::OK);
                }
            })
        })
        .collect();
    for handle in handles {
        handle.await.expect("a request task panicked");
    }
}

/// One variant of a throughput comparison: a service, and the header its caller adds itself.
struct Variant<S> {
    service: S,
    authorization: Option<HeaderValue>,
}

impl<S> Variant<S>
where
    S: Service<Request<Empty<Bytes>>, Response = Response<Incoming>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Debug,
{
    fn batch(&self, protocol: Protocol, uri: &Uri) -> impl Future<Output = ()> + Send + 'static {
        run_batch(
            protocol,
            self.service.clone(),
            uri.clone(),
            self.authorization.clone(),
        )
    }

    /// Opens the pool's connections: for HTTP/2 one request first, so the concurrent ones find
    /// its connection instead of racing to open their own.
    async fn warm(&self, protocol: Protocol, uri: &Uri) {
        if protocol == Protocol::Http2 {
            let request = request(Method::GET, uri, Empty::new(), self.authorization.as_ref());
            let status = exchange(&mut self.service.clone(), request).await;
            assert_eq!(status, StatusCode::OK);
        }
        self.batch(protocol, uri).await;
    }

    /// Warms the variant on `runtime`, checks its connections, and returns its batches.
    fn into_batch(
        self,
        runtime: &Runtime,
        server: &Server,
        protocol: Protocol,
        uri: &Uri,
    ) -> Batch {
        let before = server.connections.load(Ordering::SeqCst);
        runtime.block_on(self.warm(protocol, uri));
        let opened = server.connections.load(Ordering::SeqCst) - before;
        if protocol == Protocol::Http2 {
            assert_eq!(
                opened, 1,
                "an HTTP/2 client multiplexes over one connection"
            );
        }
        let uri = uri.clone();
        Box::new(move || Box::pin(self.batch(protocol, &uri)))
    }
}

/// A variant's iteration, type-erased so that variants of different types take turns.
type Batch = Box<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>>>;

/// A protocol's server and variants, warmed. The first two are the compared ones; the others
/// say where a difference comes from.
struct Setup {
    variants: Vec<(&'static str, Batch)>,
    layers: Vec<AuthLayer>,
}

fn setup(runtime: &Runtime, protocol: Protocol) -> Setup {
    let server = runtime.block_on(serve(protocol, api));
    let uri: Uri = format!("http://{}/v1/items", server.addr)
        .parse()
        .expect("uri");
    let layer = auth_layer();
    let no_replay = AuthLayer::builder(StaticToken::new(
        Token::new(SECRET).with_expires_in(Duration::from_secs(3600)),
    ))
    .replay_when(|_| false)
    .build();
    let variants = vec![
        (
            "static_header",
            Variant {
                service: client::<Empty<Bytes>>(protocol),
                authorization: Some(bearer()),
            }
            .into_batch(runtime, &server, protocol, &uri),
        ),
        (
            "auth_layer",
            Variant {
                service: layer.layer(client::<ReplayBody<Empty<Bytes>>>(protocol)),
                authorization: None,
            }
            .into_batch(runtime, &server, protocol, &uri),
        ),
        (
            "auth_layer_no_replay",
            Variant {
                service: no_replay.layer(client::<ReplayBody<Empty<Bytes>>>(protocol)),
                authorization: None,
            }
            .into_batch(runtime, &server, protocol, &uri),
        ),
        (
            "floor",
            Variant {
                service: FloorLayer::<ClonedParts>::bearer(SECRET)
                    .layer(client::<Empty<Bytes>>(protocol)),
                authorization: None,
            }
            .into_batch(runtime, &server, protocol, &uri),
        ),
    ];
    Setup {
        variants,
        layers: vec![layer, no_replay],
    }
}

fn end_to_end(c: &mut Criterion, runtime: &Runtime, protocol: Protocol) {
    let setup = setup(runtime, protocol);
    let mut group = c.benchmark_group(format!("end_to_end_{}", protocol.name()));
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(20);
    group.throughput(Throughput::Elements(REQUESTS));
    for (name, batch) in &setup.variants[..2] {
        group.bench_function(*name, |b| {
            b.to_async(runtime).iter_custom(|iters| {
                let batches: Vec<_> = (0..iters).map(|_| batch()).collect();
                async move {
                    let start = Instant::now();
                    for batch in batches {
                        batch.await;
                    }
                    start.elapsed()
                }
            });
        });
    }
    group.finish();
    assert_no_refresh_or_replay(&setup.layers);
}

fn assert_no_refresh_or_replay(layers: &[AuthLayer]) {
    for layer in layers {
        let stats = layer.cache().stats();
        assert_eq!(
            (stats.token_requests, stats.replays),
            (1, 0),
            "a refresh or a replay happened inside the measured loop"
        );
    }
}

/// Every variant of `setup` in turns: in each round each variant runs one batch, in an order
/// that rotates and reverses from round to round, and its rate is divided by the
/// `static_header` rate of the same round.
fn interleaved(runtime: &Runtime, protocol: Protocol, rounds: usize) {
    let setup = setup(runtime, protocol);
    let n = setup.variants.len();
    let mut rates = vec![Vec::new(); n];
    let mut ratios = vec![Vec::new(); n];
    for round in 0..rounds {
        let mut order: Vec<usize> = (0..n).map(|i| (i + round) % n).collect();
        if (round / n) % 2 == 1 {
            order.reverse();
        }
        let mut rate = vec![0.0; n];
        for i in order {
            let start = Instant::now();
            runtime.block_on((setup.variants[i].1)());
            rate[i] = REQUESTS as f64 / start.elapsed().as_secs_f64();
        }
        for i in 0..n {
            rates[i].push(rate[i]);
            ratios[i].push(rate[i] / rate[0]);
        }
    }
    assert_no_refresh_or_replay(&setup.layers);
    let quantile = |values: &mut Vec<f64>, q: f64| {
        values.sort_by(f64::total_cmp);
        values[((values.len() - 1) as f64 * q).round() as usize]
    };
    println!(
        "end_to_end_{} interleaved: {rounds} rounds of {REQUESTS} GETs per variant, {} in \
         flight",
        protocol.name(),
        protocol.concurrency(),
    );
    println!(
        "  {:<22} {:>14}   ratio to static_header per round: median [interquartile]",
        "variant", "median req/s"
    );
    for (i, (name, _)) in setup.variants.iter().enumerate() {
        println!(
            "  {name:<22} {:>12.1} K   {:.3}x [{:.3}x, {:.3}x]",
            quantile(&mut rates[i], 0.5) / 1e3,
            quantile(&mut ratios[i], 0.5),
            quantile(&mut ratios[i], 0.25),
            quantile(&mut ratios[i], 0.75),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Memory check.

/// Where the bodies of the held requests come from.
#[derive(Clone, Copy)]
enum Bodies {
    /// Allocated before the measurement and kept by the caller; requests send clones.
    Kept,
    /// Allocated by each request, `len` bytes, and handed over.
    HandedOver(usize),
}

struct Held {
    /// Client bytes per request while all of them are in flight.
    in_flight: f64,
    /// Client bytes per request left once all responses are in.
    after: f64,
}

/// Put `IN_FLIGHT` POSTs in flight through `service`, hold them at the server, and measure.
async fn hold_in_flight<S>(
    service: &S,
    uri: &Uri,
    server: &Holding,
    bodies: Bodies,
    authorization: Option<&HeaderValue>,
) -> Held
where
    S: Service<Request<Full<Bytes>>, Response = Response<Incoming>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Debug,
{
    let kept: Vec<Bytes> = match bodies {
        Bodies::Kept => (0..IN_FLIGHT)
            .map(|_| {
                let body = Bytes::from(vec![b'x'; BODY]);
                // Make it shared now: later clones are reference counts, not allocations.
                drop(body.clone());
                body
            })
            .collect(),
        Bodies::HandedOver(_) => Vec::new(),
    };
    server.received.store(0, Ordering::SeqCst);
    server.gate.send_replace(false);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let before = held();

    // Everything from here is counted: each request's task, its request, the client's state
    // for it, and its body unless the caller allocated it beforehand.
    let handles: Vec<_> = (0..IN_FLIGHT)
        .map(|i| {
            let mut service = service.clone();
            let uri = uri.clone();
            let authorization = authorization.cloned();
            let kept = kept.get(i).cloned();
            tokio::spawn(async move {
                let body = match (kept, bodies) {
                    (Some(kept), _) => kept,
                    (None, Bodies::HandedOver(len)) => Bytes::from(vec![b'x'; len]),
                    (None, Bodies::Kept) => unreachable!("kept bodies are allocated above"),
                };
                let request = request(Method::POST, &uri, Full::new(body), authorization.as_ref());
                exchange(&mut service, request).await
            })
        })
        .collect();

    while server.received.load(Ordering::SeqCst) < IN_FLIGHT {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Let the client finish its side of the writes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let in_flight = held();

    server.gate.send_replace(true);
    for handle in handles {
        assert_eq!(handle.await.expect("request task"), StatusCode::OK);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let after = held();
    drop(kept);

    let per_request = |bytes: isize| (bytes - before) as f64 / IN_FLIGHT as f64;
    Held {
        in_flight: per_request(in_flight),
        after: per_request(after),
    }
}

fn memory_check(protocol: Protocol) {
    // The server: its own runtime, on threads the allocator does not count.
    let server_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("server runtime");
    let (gate, _) = watch::channel(true);
    let server = Arc::new(Holding {
        received: AtomicUsize::new(0),
        gate,
    });
    let state = server.clone();
    let listening =
        server_runtime.block_on(serve(protocol, move |request| hold(state.clone(), request)));
    let uri: Uri = format!("http://{}/v1/upload", listening.addr)
        .parse()
        .expect("uri");

    // The client: every allocation of its threads is counted, this one's included.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .on_thread_start(|| COUNTED.with(|counted| counted.set(true)))
        .enable_all()
        .build()
        .expect("client runtime");
    COUNTED.with(|counted| counted.set(true));

    let cases = [
        ("64KiB kept by caller", Bodies::Kept),
        ("64KiB handed over", Bodies::HandedOver(BODY)),
        ("64KiB+1B handed over", Bodies::HandedOver(BODY + 1)),
    ];
    let bare = client::<Full<Bytes>>(protocol);
    let layer = auth_layer();
    let auth = layer.layer(client::<ReplayBody<Full<Bytes>>>(protocol));
    let authorization = bearer();

    println!();
    println!(
        "end_to_end_{} memory: client-side bytes held per request, {IN_FLIGHT} requests in \
         flight (server side not counted)",
        protocol.name(),
    );
    println!(
        "{:<22} {:>14} {:>14} {:>12}   still held once all answered: bare / auth_layer",
        "body", "bare", "auth_layer", "difference"
    );
    runtime.block_on(async {
        // Open the connections (HTTP/1.1: one per request in flight) of each client.
        hold_in_flight(
            &bare,
            &uri,
            &server,
            Bodies::HandedOver(BODY),
            Some(&authorization),
        )
        .await;
        hold_in_flight(&auth, &uri, &server, Bodies::HandedOver(BODY), None).await;

        for (label, bodies) in cases {
            let without = hold_in_flight(&bare, &uri, &server, bodies, Some(&authorization)).await;
            let with = hold_in_flight(&auth, &uri, &server, bodies, None).await;
            println!(
                "{label:<22} {:>14.0} {:>14.0} {:>12.0}   {:.0} / {:.0}",
                without.in_flight,
                with.in_flight,
                with.in_flight - without.in_flight,
                without.after,
                with.after,
            );
        }
    });
    COUNTED.with(|counted| counted.set(false));

    let stats = layer.cache().stats();
    assert_eq!((stats.token_requests, stats.replays), (1, 0));
}

fn main() {
    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(6))
        .configure_from_args();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    for protocol in [Protocol::Http1, Protocol::Http2] {
        end_to_end(&mut criterion, &runtime, protocol);
    }

    // `cargo bench` passes `--bench`; `cargo test --benches` does not. Skip the rest when
    // listing or when criterion only checks that the benches run (`--test`).
    let args: Vec<String> = std::env::args().collect();
    let has = |flag: &str| args.iter().any(|arg| arg == flag);
    let benching = has("--bench") && !has("--list") && !has("--test");
    let rounds = std::env::var("END_TO_END_ROUNDS")
        .ok()
        .and_then(|rounds| rounds.parse().ok())
        .unwrap_or(40);
    if benching && rounds > 0 {
        println!();
        for protocol in [Protocol::Http1, Protocol::Http2] {
            interleaved(&runtime, protocol, rounds);
        }
    }
    drop(runtime);

    let wanted = std::env::var("END_TO_END_MEMORY").map_or(true, |value| value != "0");
    if benching && wanted {
        for protocol in [Protocol::Http1, Protocol::Http2] {
            memory_check(protocol);
        }
    }

    criterion.final_summary();
}
