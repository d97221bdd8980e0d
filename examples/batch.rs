//! A paginated batch that outlives its tokens, the job this crate exists for.
//!
//! `cargo run --example batch` starts an identity provider and a paginated API on loopback
//! (the same real hyper servers the tests use), whose tokens live one second. It then fetches
//! every page through `AuthLayer` over a hyper-util client, with a few workers in parallel, while
//! tokens expire several times and the API once forgets its tokens early (a 401 the client could
//! not foresee). At the end it prints what it did: records, pages, time, token requests, 401
//! replays, failures.
//!
//! Options, as environment variables: `RECORDS` (default 40000), `PAGE_SIZE` (50), `WORKERS` (4),
//! `TOKEN_TTL_MS` (1000).
//!
//! Against a real platform instead, set `API_URL` (a `{page}` in it is replaced by the page
//! number, from 1), `CLIENT_ID`, `CLIENT_SECRET`, `PAGES` (default 10), optionally `SCOPE` and
//! `CLIENT_AUTH=post` (client secret in the form instead of HTTP Basic), and
//! one of `TOKEN_URL` (the token endpoint), `GENESYS_REGION` (a Genesys Cloud domain such as
//! `mypurecloud.ie`) or `ISSUER` (any OpenID provider, through discovery; NICE CXone's is
//! `https://cxone.niceincontact.com`). See README.md.

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tower_auth_refresh::oauth2::{self, genesys, ClientCredentials};
use tower_auth_refresh::{AuthLayer, ReplayBody, TokenProvider};

use support::{http_provider, Api, IdentityProvider, TokenRegistry};

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

fn required(name: &str) -> Result<String, BoxError> {
    std::env::var(name).map_err(|_| format!("{name} is not set").into())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    match std::env::var("API_URL") {
        Ok(api_url) => against_platform(api_url).await,
        Err(_) => embedded().await,
    }
}

/// The default: an embedded identity provider and API on loopback.
async fn embedded() -> Result<(), BoxError> {
    let records = setting("RECORDS", 40_000);
    let page_size = setting("PAGE_SIZE", 50).max(1);
    let ttl = Duration::from_millis(setting("TOKEN_TTL_MS", 1000) as u64);

    let registry = TokenRegistry::default();
    let idp = IdentityProvider::start(registry.clone(), Some(ttl)).await;
    let api = Api::start(registry.clone(), records).await;
    // Each page takes a few milliseconds to serve, so the batch outlives several tokens.
    api.set_latency(Duration::from_millis(20));
    println!(
        "identity provider: {} (tokens live {ttl:?})",
        idp.token_url()
    );
    println!("api:               {}", api.url("/contacts"));

    let pages = records.div_ceil(page_size);
    let page_url = {
        let api = api.clone();
        move |page: usize| {
            if page == pages / 2 {
                // Halfway through, the API forgets every token: the next requests meet 401s.
                registry.revoke_all();
            }
            api.url(&format!("/contacts?page={page}&size={page_size}"))
        }
    };
    let report = run(http_provider(&idp), pages, page_url).await?;
    println!(
        "fetched {} of {records} records; the identity provider saw {} token requests",
        report.lines,
        idp.token_requests()
    );
    report.finish()
}

/// Against a real platform, with credentials from the environment.
async fn against_platform(api_url: String) -> Result<(), BoxError> {
    let client_id = required("CLIENT_ID")?;
    let client_secret = required("CLIENT_SECRET")?;
    let mut builder = if let Ok(token_url) = std::env::var("TOKEN_URL") {
        ClientCredentials::builder(token_url, client_id, client_secret)
    } else if let Ok(domain) = std::env::var("GENESYS_REGION") {
        genesys::client_credentials(genesys::Region::Domain(domain), client_id, client_secret)
    } else {
        let issuer = required("ISSUER").map_err(|_| "set TOKEN_URL, GENESYS_REGION or ISSUER")?;
        let metadata = oauth2::discover(&issuer, &oauth2::default_transport(), false).await?;
        println!("discovered token endpoint {}", metadata.token_endpoint);
        ClientCredentials::from_metadata(&metadata, client_id, client_secret)
    };
    if let Ok(scope) = std::env::var("SCOPE") {
        builder = builder.scope(scope);
    }
    if std::env::var("CLIENT_AUTH").is_ok_and(|method| method == "post") {
        builder = builder.auth_method(oauth2::ClientAuth::Post);
    }
    let pages = setting("PAGES", 10);
    let page_url = move |page: usize| api_url.replace("{page}", &(page + 1).to_string());
    let report = run(builder.build()?, pages, page_url).await?;
    println!("fetched {} lines of response bodies", report.lines);
    report.finish()
}

struct Report {
    lines: usize,
    failures: usize,
}

impl Report {
    fn finish(self) -> Result<(), BoxError> {
        match self.failures {
            0 => Ok(()),
            failures => Err(format!("{failures} pages failed").into()),
        }
    }
}

/// Fetch `pages` pages with `WORKERS` workers through `AuthLayer` over an HTTPS-capable
/// hyper-util client, and print what happened.
async fn run(
    provider: impl TokenProvider,
    pages: usize,
    page_url: impl Fn(usize) -> String + Send + Sync + 'static,
) -> Result<Report, BoxError> {
    let workers = setting("WORKERS", 4).max(1);
    let https: Https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .build();
    let http = Client::builder(TokioExecutor::new()).build::<_, ReplayBody<Empty<Bytes>>>(https);
    let auth = AuthLayer::new(provider);
    let service = ServiceBuilder::new()
        .timeout(Duration::from_secs(30))
        .layer(auth.clone())
        .service(http);

    let page_url = Arc::new(page_url);
    let next_page = Arc::new(AtomicUsize::new(0));
    let lines = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();

    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (service, page_url) = (service.clone(), page_url.clone());
        let (next_page, lines, failures) = (next_page.clone(), lines.clone(), failures.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let page = next_page.fetch_add(1, Ordering::Relaxed);
                if page >= pages {
                    break;
                }
                let request = Request::get(page_url(page)).body(Empty::new())?;
                match service.clone().oneshot(request).await {
                    Ok(response) if response.status() == StatusCode::OK => {
                        let body = response.into_body().collect().await?.to_bytes();
                        let count = body
                            .split(|b| *b == b'\n')
                            .filter(|l| !l.is_empty())
                            .count();
                        lines.fetch_add(count, Ordering::Relaxed);
                    }
                    Ok(response) => {
                        eprintln!("page {page}: {}", response.status());
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(error) => {
                        eprintln!("page {page}: {error}");
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if page > 0 && page % (pages / 10).max(1) == 0 {
                    println!(
                        "  {:>3}% {page}/{pages} pages, {:.1}s",
                        page * 100 / pages,
                        started.elapsed().as_secs_f64()
                    );
                }
            }
            Ok::<_, BoxError>(())
        }));
    }
    for task in tasks {
        task.await??;
    }

    let elapsed = started.elapsed();
    let stats = auth.cache().stats();
    let failures = failures.load(Ordering::Relaxed);
    println!(
        "{pages} pages in {:.2}s ({:.0} pages/s) with {workers} workers",
        elapsed.as_secs_f64(),
        pages as f64 / elapsed.as_secs_f64()
    );
    println!(
        "token requests: {}, 401 replays: {}, stale 401s absorbed: {}, failures: {failures}",
        stats.token_requests, stats.replays, stats.stale_rejections,
    );
    Ok(Report {
        lines: lines.load(Ordering::Relaxed),
        failures,
    })
}
