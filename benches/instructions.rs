//! Instruction counts of the hot path, for callgrind: repeatable to the instruction whatever
//! else the machine is doing, where criterion's wall-clock figures are not.
//!
//! Runs `N` GET requests through one variant on a current-thread runtime, over an in-process
//! service that reads the body to its end:
//!
//! ```text
//! cargo bench --bench instructions --no-run
//! B=$(ls target/release/deps/instructions-* | grep -v '\.d$')
//! for v in bare add_authorization auth_layer auth_layer_no_replay; do
//!   a=$(valgrind --tool=callgrind --callgrind-out-file=/dev/null $B $v 0 2>&1 | awk '/Collected/ {print $4}')
//!   b=$(valgrind --tool=callgrind --callgrind-out-file=/dev/null $B $v 20000 2>&1 | awk '/Collected/ {print $4}')
//!   echo "$v $(( (b - a) / 20000 )) instructions per request"
//! done
//! ```
//!
//! `cargo bench --bench instructions` alone runs every variant 100,000 times and prints the
//! wall time, as a smoke test.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty};
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_auth_refresh::{AuthLayer, ReplayBody, StaticToken, Token};
use tower_http::auth::AddAuthorizationLayer;

fn request() -> Request<Empty<Bytes>> {
    Request::get("http://api.example/contacts?page=1")
        .header("accept", "application/json")
        .header("user-agent", "bench")
        .body(Empty::new())
        .expect("a valid request")
}

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

async fn read_to_end<B: http_body::Body>(request: Request<B>) -> Result<Response<()>, Infallible> {
    let _ = request.into_body().collect().await;
    Ok(Response::new(()))
}

fn token() -> StaticToken {
    StaticToken::new(Token::new("secret-token").with_expires_in(Duration::from_secs(3600)))
}

async fn run(variant: &str, n: usize) {
    match variant {
        "bare" => drive(service_fn(read_to_end::<Empty<Bytes>>), n).await,
        "add_authorization" => {
            let layer = AddAuthorizationLayer::bearer("secret-token").as_sensitive(true);
            drive(layer.layer(service_fn(read_to_end::<Empty<Bytes>>)), n).await
        }
        "auth_layer" | "auth_layer_no_replay" => {
            let mut builder = AuthLayer::builder(token());
            if variant == "auth_layer_no_replay" {
                builder = builder.replay_when(|_| false);
            }
            let service = builder
                .build()
                .layer(service_fn(read_to_end::<ReplayBody<Empty<Bytes>>>));
            // The first request fetches the token; it is part of the N = 0 baseline too.
            drive(service.clone(), 1).await;
            drive(service, n).await
        }
        other => panic!("unknown variant {other:?}"),
    }
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
        [variant, n] => runtime.block_on(run(variant, n.parse().expect("a count"))),
        _ => {
            for variant in [
                "bare",
                "add_authorization",
                "auth_layer",
                "auth_layer_no_replay",
            ] {
                let started = Instant::now();
                runtime.block_on(run(variant, 100_000));
                let per_request = started.elapsed() / 100_000;
                println!("{variant}: {per_request:?} per request");
            }
        }
    }
}
