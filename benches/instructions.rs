//! Instruction counts of the hot path, for callgrind: repeatable to the instruction whatever
//! else the machine is doing, where criterion's wall-clock figures are not.
//!
//! Runs `N` GET requests through one variant on a current-thread runtime, over an in-process
//! service that reads the body to its end:
//!
//! ```text
//! cargo bench --bench instructions --no-run
//! B=$(ls target/release/deps/instructions-* | grep -v '\.d$')
//! for v in bare add_authorization floor floor_head auth_layer auth_layer_no_replay; do
//!   a=$(valgrind --tool=callgrind --callgrind-out-file=/dev/null $B $v 0 2>&1 | awk '/Collected/ {print $4}')
//!   b=$(valgrind --tool=callgrind --callgrind-out-file=/dev/null $B $v 20000 2>&1 | awk '/Collected/ {print $4}')
//!   echo "$v $(( (b - a) / 20000 )) instructions per request"
//! done
//! ```
//!
//! Variants:
//! - `bare`: the inner service alone.
//! - `add_authorization`: tower-http's `AddAuthorizationLayer::bearer`, sensitive.
//! - `floor`: the least a replay-capable layer must do (`common::FloorLayer`): insert a prebuilt
//!   sensitive header and keep `http::request::Parts` clones of the head until the response.
//! - `floor_head`: the same, keeping the head as the crate's one-allocation `RequestHead`.
//! - `auth_layer`, `auth_layer_no_replay`: `AuthLayer` over a `StaticToken` that lives an hour,
//!   the second with `replay_when(|_| false)`.
//!
//! And the copy of the head alone, for a request as `AuthLayer` sees it (the caller's headers
//! plus the inserted sensitive `Authorization`): `{build,clone_parts,capture_head}_{2,10}`
//! builds the request (with 2 or 10 caller headers) and then nothing, or clones its parts and
//! drops the clone, or captures a `RequestHead` and drops it. The copy costs the difference to
//! `build_*`.
//!
//! A counting global allocator (three relaxed atomic adds per allocation or free, in every
//! variant alike) gives the memory figures: `memory` as the only argument prints, per variant,
//! allocations per request, the heap bytes the request holds in flight beyond what the caller
//! built (sampled by the inner service), and the size of the response future the caller holds.
//!
//! `cargo bench --bench instructions` alone runs every variant 100,000 times and prints the
//! wall time, then the memory figures, as a smoke test.

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Empty};
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_auth_refresh::{AuthLayer, ReplayBody, StaticToken, Token};
use tower_http::auth::AddAuthorizationLayer;

mod common;

use common::head::RequestHead;
use common::{ClonedParts, FloorLayer, KeepHead};

const SECRET: &str = "secret-token";

// ---------------------------------------------------------------------------------------------
// Counting allocator.

/// Forwards to `System`, counting allocations and the bytes currently held.
struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);
static HELD: AtomicIsize = AtomicIsize::new(0);
/// `HELD` just before the request was handed to the service; the inner service's first poll
/// records how far above it the request's in-flight state is.
static BEFORE_CALL: AtomicIsize = AtomicIsize::new(0);
static IN_FLIGHT_MAX: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded to `System` unchanged; the counting touches no allocation.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        HELD.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which `System` shares.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HELD.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `ptr` was allocated by this allocator, that is by `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        HELD.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: as for `dealloc`; `new_size` is checked by the caller.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

// ---------------------------------------------------------------------------------------------
// Requests and the inner service.

fn request() -> Request<Empty<Bytes>> {
    Request::get("http://api.example/contacts?page=1")
        .header("accept", "application/json")
        .header("user-agent", "bench")
        .body(Empty::new())
        .expect("a valid request")
}

/// The bench request with 10 caller headers, values built at runtime as a client builds them.
fn request_10() -> Request<Empty<Bytes>> {
    Request::get("http://api.example/contacts?page=1")
        .header("accept", "application/json")
        .header("user-agent", "bench")
        .header("accept-encoding", "gzip, br")
        .header("accept-language", "en-GB,en;q=0.8")
        .header("cache-control", "no-cache")
        .header("if-none-match", "\"5e1f7a\"")
        .header("x-request-id", "0b4c2a5e-8f7d-4d8e-9a55-2f3c1d9e7b61")
        .header("x-correlation-id", "batch-42/page-1")
        .header("x-api-version", "2024-06-01")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .body(Empty::new())
        .expect("a valid request")
}

fn bearer() -> HeaderValue {
    let mut value = HeaderValue::from_str(&format!("Bearer {SECRET}")).expect("a header value");
    value.set_sensitive(true);
    value
}

/// The request's head as `AuthLayer` copies it: with its `Authorization` inserted.
fn head_as_sent(request: Request<Empty<Bytes>>, authorization: &HeaderValue) -> Parts {
    let (mut parts, _) = request.into_parts();
    parts
        .headers
        .insert(header::AUTHORIZATION, authorization.clone());
    parts
}

async fn read_to_end<B: http_body::Body>(request: Request<B>) -> Result<Response<()>, Infallible> {
    let in_flight = HELD.load(Ordering::Relaxed) - BEFORE_CALL.load(Ordering::Relaxed);
    IN_FLIGHT_MAX.fetch_max(in_flight, Ordering::Relaxed);
    let _ = request.into_body().collect().await;
    Ok(Response::new(()))
}

fn token() -> StaticToken {
    StaticToken::new(Token::new(SECRET).with_expires_in(Duration::from_secs(3600)))
}

// ---------------------------------------------------------------------------------------------
// Drivers.

async fn drive<S, B>(mut service: S, n: usize)
where
    S: Service<Request<Empty<Bytes>>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
{
    for _ in 0..n {
        let ready = service.ready().await.expect("ready");
        let response = ready.call(request()).await.expect("a response");
        std::hint::black_box(response);
    }
}

/// Per request: allocations, heap bytes held in flight beyond the request the caller built,
/// and the size of the response future.
struct Memory {
    allocations: f64,
    in_flight: isize,
    future: usize,
}

async fn measure<S, B>(mut service: S, n: usize) -> Memory
where
    S: Service<Request<Empty<Bytes>>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
{
    IN_FLIGHT_MAX.store(isize::MIN, Ordering::Relaxed);
    let mut allocations = 0;
    let mut future = 0;
    for _ in 0..n {
        let ready = service.ready().await.expect("ready");
        let request = request();
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        BEFORE_CALL.store(HELD.load(Ordering::Relaxed), Ordering::Relaxed);
        let call = ready.call(request);
        future = std::mem::size_of_val(&call);
        let response = call.await.expect("a response");
        drop(response);
        allocations += ALLOCATIONS.load(Ordering::Relaxed) - before;
    }
    Memory {
        allocations: allocations as f64 / n as f64,
        in_flight: IN_FLIGHT_MAX.load(Ordering::Relaxed),
        future,
    }
}

/// Builds a request of `headers` caller headers as `AuthLayer` sees it, copies its head with
/// `copy` (nothing, a `Parts` clone, a `RequestHead`), and drops both.
fn copy_heads(headers: usize, copy: &str, n: usize) {
    let authorization = bearer();
    let make = if headers == 10 { request_10 } else { request };
    for _ in 0..n {
        let parts = head_as_sent(make(), &authorization);
        match copy {
            "build" => {}
            "clone_parts" => drop(std::hint::black_box(ClonedParts::keep(&parts))),
            "capture_head" => drop(std::hint::black_box(RequestHead::keep(&parts))),
            other => panic!("unknown copy {other:?}"),
        }
        drop(std::hint::black_box(parts));
    }
}

/// Runs `n` requests through `variant` with `drive`, after one request that fetches the
/// token (part of the `N = 0` baseline too).
async fn with_variant<D, F>(variant: &str, n: usize, drive: D) -> F::Output
where
    D: VariantDriver<Output = F::Output, Fut = F>,
    F: Future,
{
    let inner = || service_fn(read_to_end::<Empty<Bytes>>);
    match variant {
        "bare" => drive.run(inner(), n).await,
        "add_authorization" => {
            let layer = AddAuthorizationLayer::bearer(SECRET).as_sensitive(true);
            drive.run(layer.layer(inner()), n).await
        }
        "floor" => {
            let layer = FloorLayer::<ClonedParts>::bearer(SECRET);
            drive.run(layer.layer(inner()), n).await
        }
        "floor_head" => {
            let layer = FloorLayer::<RequestHead>::bearer(SECRET);
            drive.run(layer.layer(inner()), n).await
        }
        "auth_layer" | "auth_layer_no_replay" => {
            let mut builder = AuthLayer::builder(token());
            if variant == "auth_layer_no_replay" {
                builder = builder.replay_when(|_| false);
            }
            let service = builder
                .build()
                .layer(service_fn(read_to_end::<ReplayBody<Empty<Bytes>>>));
            self::drive(service.clone(), 1).await;
            drive.run(service, n).await
        }
        other => panic!("unknown variant {other:?}"),
    }
}

/// `drive` or `measure`, generic over the service (closures cannot be).
trait VariantDriver {
    type Output;
    type Fut: Future<Output = Self::Output>;
    fn run<S, B>(self, service: S, n: usize) -> Self::Fut
    where
        S: Service<Request<Empty<Bytes>>, Response = Response<B>> + 'static,
        B: 'static,
        S::Error: std::fmt::Debug;
}

struct Drive;
struct Measure;

impl VariantDriver for Drive {
    type Output = ();
    type Fut = std::pin::Pin<Box<dyn Future<Output = ()>>>;
    fn run<S, B>(self, service: S, n: usize) -> Self::Fut
    where
        S: Service<Request<Empty<Bytes>>, Response = Response<B>> + 'static,
        B: 'static,
        S::Error: std::fmt::Debug,
    {
        Box::pin(drive(service, n))
    }
}

impl VariantDriver for Measure {
    type Output = Memory;
    type Fut = std::pin::Pin<Box<dyn Future<Output = Memory>>>;
    fn run<S, B>(self, service: S, n: usize) -> Self::Fut
    where
        S: Service<Request<Empty<Bytes>>, Response = Response<B>> + 'static,
        B: 'static,
        S::Error: std::fmt::Debug,
    {
        Box::pin(measure(service, n))
    }
}

const VARIANTS: [&str; 6] = [
    "bare",
    "add_authorization",
    "floor",
    "floor_head",
    "auth_layer",
    "auth_layer_no_replay",
];

fn run(runtime: &tokio::runtime::Runtime, variant: &str, n: usize) {
    if let Some((copy, headers)) = variant.rsplit_once('_') {
        if let ("build" | "clone_parts" | "capture_head", Ok(headers)) = (copy, headers.parse()) {
            return copy_heads(headers, copy, n);
        }
    }
    runtime.block_on(with_variant(variant, n, Drive));
}

fn memory(runtime: &tokio::runtime::Runtime) {
    println!(
        "{:<22} {:>12} {:>20} {:>14}",
        "variant", "allocations", "heap held in flight", "future size"
    );
    for variant in VARIANTS {
        let memory = runtime.block_on(with_variant(variant, 1_000, Measure));
        println!(
            "{variant:<22} {:>12.2} {:>18} B {:>12} B",
            memory.allocations, memory.in_flight, memory.future
        );
    }
    // The copy of the head alone: what it holds, and in how many allocations.
    let authorization = bearer();
    for (headers, make) in [(2, request as fn() -> _), (10, request_10)] {
        let parts = head_as_sent(make(), &authorization);
        copy_memory::<ClonedParts>(&format!("clone_parts_{headers}"), &parts);
        copy_memory::<RequestHead>(&format!("capture_head_{headers}"), &parts);
    }
}

/// Prints the allocations and heap bytes of one copy of `parts`, and the copy's own size.
fn copy_memory<K: KeepHead>(name: &str, parts: &Parts) {
    // The first copy of a fresh request, as every request's is: a `Parts` clone includes the
    // promotion of each `Vec`-backed `Bytes` to a shared allocation, which lives as long as the
    // copy or the request does.
    let (allocations, held) = (
        ALLOCATIONS.load(Ordering::Relaxed),
        HELD.load(Ordering::Relaxed),
    );
    let kept = std::hint::black_box(K::keep(parts));
    let (allocations, held) = (
        ALLOCATIONS.load(Ordering::Relaxed) - allocations,
        HELD.load(Ordering::Relaxed) - held,
    );
    drop(kept);
    println!(
        "{name:<22} {allocations:>12} {held:>18} B {:>12} B   (a copy of the head alone)",
        std::mem::size_of::<K>(),
    );
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with("--"))
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    match args.as_slice() {
        [variant, n] => run(&runtime, variant, n.parse().expect("a count")),
        [mode] if mode == "memory" => memory(&runtime),
        _ => {
            for variant in VARIANTS {
                let started = Instant::now();
                run(&runtime, variant, 100_000);
                let per_request = started.elapsed() / 100_000;
                println!("{variant}: {per_request:?} per request");
            }
            memory(&runtime);
        }
    }
}
