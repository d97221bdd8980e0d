//! End to end over loopback: hyper-util's legacy client and a hyper server on 127.0.0.1, with
//! and without `AuthLayer`; then how much memory a request in flight holds.
//!
//! Group `end_to_end`, on one 2-worker multi-thread tokio runtime that runs both the client and
//! a minimal HTTP/1.1 server (it answers `200` and a 22-byte JSON body to any request with a
//! `Bearer` authorization, `401` otherwise). 16 tasks share 2,048 GETs per iteration, so 16
//! requests are in flight; each reads its response body to the end. Both variants use the same
//! client configuration (`TCP_NODELAY`, default pool) and their own pool, warmed before
//! measuring. Reported as requests/second (`Throughput::Elements`).
//!
//! - `bare`: the client alone; the caller puts a fixed `Authorization: Bearer ...` header on
//!   each request, so the server sees the same bytes in both variants.
//! - `auth_layer`: `tower_auth_refresh::AuthLayer` over the client, with a `StaticToken` that
//!   lives an hour (fetched before measuring; the bench asserts no refresh or replay happened).
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
//! whose threads are not counted. 1,000 POSTs are put in flight at once (one pooled connection
//! each, opened beforehand) to a server that reads each body to its end and then holds the
//! response until all 1,000 have arrived. The growth in allocated bytes from before the requests
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
//! It needs about 2,000 file descriptors (`ulimit -n`) for the 1,000 connections and their
//! server sides. Set `END_TO_END_MEMORY=0` to skip it.
//!
//! ```text
//! cargo bench --bench end_to_end
//! ```
//!
//! About 40 seconds.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::convert::Infallible;
use std::fmt::Debug;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, SamplingMode, Throughput};
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

const SECRET: &str = "eyJhbGciOiJSUzI1NiJ9.bench-access-token.signature";
const CONCURRENCY: u64 = 16;
const REQUESTS: u64 = 2_048;
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

/// Serve `handler` over HTTP/1.1 on a fresh loopback port, on the current runtime.
async fn serve<H, F>(handler: H) -> SocketAddr
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local address");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let handler = handler.clone();
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), hyper::service::service_fn(handler))
                    .await;
            });
        }
    });
    addr
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

/// The one client configuration both variants use.
fn client<B>() -> Client<HttpConnector, B>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
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

/// `CONCURRENCY` tasks share `REQUESTS` GETs per iteration, each through its own clone of
/// `service`; `authorization` is the header the caller adds itself (`None` under the layer).
fn bench_variant<S>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    runtime: &Runtime,
    name: &str,
    service: &S,
    uri: &Uri,
    authorization: Option<HeaderValue>,
) where
    S: Service<Request<Empty<Bytes>>, Response = Response<Incoming>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Debug,
{
    let per_task = REQUESTS / CONCURRENCY;
    let run = move |service: S, uri: Uri, authorization: Option<HeaderValue>| async move {
        let handles: Vec<_> = (0..CONCURRENCY)
            .map(|_| {
                let mut service = service.clone();
                let uri = uri.clone();
                let authorization = authorization.clone();
                tokio::spawn(async move {
                    for _ in 0..per_task {
                        let request =
                            request(Method::GET, &uri, Empty::new(), authorization.as_ref());
                        let status = exchange(&mut service, request).await;
                        assert_eq!(status, StatusCode::OK);
                    }
                })
            })
            .collect();
        for handle in handles {
            handle.await.expect("a request task panicked");
        }
    };

    // Open the pool's connections before measuring.
    runtime.block_on(run(service.clone(), uri.clone(), authorization.clone()));

    group.bench_function(name, |b| {
        b.to_async(runtime).iter_custom(|iters| {
            let (service, uri, authorization) =
                (service.clone(), uri.clone(), authorization.clone());
            async move {
                let start = Instant::now();
                for _ in 0..iters {
                    run(service.clone(), uri.clone(), authorization.clone()).await;
                }
                start.elapsed()
            }
        });
    });
}

fn end_to_end(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let addr = runtime.block_on(serve(api));
    let uri: Uri = format!("http://{addr}/v1/items").parse().expect("uri");

    let bare = client::<Empty<Bytes>>();
    let layer = auth_layer();
    let auth = layer.layer(client::<ReplayBody<Empty<Bytes>>>());

    let mut group = c.benchmark_group("end_to_end");
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(20);
    group.throughput(Throughput::Elements(REQUESTS));
    bench_variant(&mut group, &runtime, "bare", &bare, &uri, Some(bearer()));
    bench_variant(&mut group, &runtime, "auth_layer", &auth, &uri, None);
    group.finish();

    let stats = layer.cache().stats();
    assert_eq!(
        (stats.token_requests, stats.replays),
        (1, 0),
        "a refresh or a replay happened inside the measured loop"
    );
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

fn memory_check() {
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
    let addr = server_runtime.block_on(serve(move |request| hold(state.clone(), request)));
    let uri: Uri = format!("http://{addr}/v1/upload").parse().expect("uri");

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
    let bare = client::<Full<Bytes>>();
    let layer = auth_layer();
    let auth = layer.layer(client::<ReplayBody<Full<Bytes>>>());
    let authorization = bearer();

    println!();
    println!(
        "end_to_end memory: client-side bytes held per request, {IN_FLIGHT} requests in flight \
         (server side not counted)"
    );
    println!(
        "{:<22} {:>14} {:>14} {:>12}   still held once all answered: bare / auth_layer",
        "body", "bare", "auth_layer", "difference"
    );
    runtime.block_on(async {
        // Open one pooled connection per request in flight, for each client.
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
    end_to_end(&mut criterion);

    // `cargo bench` passes `--bench`; `cargo test --benches` does not. Skip it when listing or
    // when criterion only checks that the benches run (`--test`).
    let args: Vec<String> = std::env::args().collect();
    let has = |flag: &str| args.iter().any(|arg| arg == flag);
    let benching = has("--bench") && !has("--list") && !has("--test");
    let wanted = std::env::var("END_TO_END_MEMORY").map_or(true, |value| value != "0");
    if benching && wanted {
        memory_check();
    }

    criterion.final_summary();
}
