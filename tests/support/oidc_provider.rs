//! Launcher of the certified `oidc-provider` fixture (`tests/oidc-provider/`, contract in its
//! README.md): an OpenID Connect provider and a protected API, both on loopback, in one Node.js
//! process. Include it where needed with
//! `#[path = "support/oidc_provider.rs"] mod oidc_provider;` (not from `support/mod.rs`, so the
//! tests that do not use it do not compile it).
//!
//! `.ci/run` installs the fixture (`npm ci`); elsewhere [`start`] returns `None`, with a note,
//! when the package is missing, and the test returns early.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// How long the fixture may take to start: generous, so a loaded machine does not fail a test,
/// while a hang still does.
const STARTUP: Duration = Duration::from_secs(60);

/// How to start the fixture (its environment variables).
#[derive(Clone, Debug)]
pub struct Options {
    /// `ACCESS_TOKEN_TTL`: token lifetime in seconds (default 3600). oidc-provider counts whole
    /// seconds, so a token lives between `ttl_seconds - 1` and `ttl_seconds`.
    pub ttl_seconds: u64,
    /// `API_NONCE_EVERY`: the API rotates its DPoP nonce every this many accepted requests
    /// (default 50; 0 = never).
    pub api_nonce_every: u64,
    /// `DPOP_TOKEN_NONCE`: whether the token endpoint requires a DPoP nonce (default true).
    pub token_nonce: bool,
    /// `API_PAGES`: pages of `GET /contacts` (default 1000).
    pub api_pages: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            ttl_seconds: 3600,
            api_nonce_every: 50,
            token_nonce: true,
            api_pages: 1000,
        }
    }
}

/// The running fixture; killed when dropped.
pub struct OidcProvider {
    /// The issuer, e.g. `http://127.0.0.1:41234`; token endpoint at `{issuer}/token`.
    pub issuer: String,
    /// The API origin, e.g. `http://127.0.0.1:41235` (`/contacts`, `/stats`).
    pub api: String,
    child: Child,
    // The fixture exits when its stdin closes: held open for the fixture's lifetime.
    _stdin: ChildStdin,
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start the fixture, or `None` (with a note on stderr) when it is not installed. On CI (`CI` is
/// set) a missing fixture fails the test instead.
pub fn start(options: Options) -> Option<OidcProvider> {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oidc-provider");
    let installed = fixture.join("node_modules/oidc-provider").is_dir()
        && fixture.join("node_modules/jose").is_dir();
    if !installed {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install the fixture: npm ci --prefix tests/oidc-provider"
        );
        eprintln!(
            "skipped: run `npm ci --prefix tests/oidc-provider` to test against oidc-provider"
        );
        return None;
    }
    // The fixture's stderr goes to a file, shown if it fails to start.
    static STARTS: AtomicUsize = AtomicUsize::new(0);
    let n = STARTS.fetch_add(1, Ordering::Relaxed);
    let log_path =
        std::env::temp_dir().join(format!("oidc-fixture-{}-{n}.log", std::process::id()));
    let log = std::fs::File::create(&log_path).expect("a log file");
    let mut child = Command::new("node")
        .arg(fixture.join("server.mjs"))
        .arg("0")
        .env("ACCESS_TOKEN_TTL", options.ttl_seconds.to_string())
        .env("API_NONCE_EVERY", options.api_nonce_every.to_string())
        .env(
            "DPOP_TOKEN_NONCE",
            if options.token_nonce { "1" } else { "0" },
        )
        .env("API_PAGES", options.api_pages.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .expect("node is installed");
    let stdin = child.stdin.take().expect("piped stdin");
    let stdout = child.stdout.take().expect("piped stdout");
    // Read the two startup lines on a thread, so a fixture that never prints fails the test
    // instead of hanging it. The pipe is dropped after them: the fixture writes nothing more.
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut lines = String::new();
        for _ in 0..2 {
            if reader.read_line(&mut lines).unwrap_or(0) == 0 {
                break;
            }
        }
        let _ = sender.send(lines);
    });
    let lines = receiver.recv_timeout(STARTUP).unwrap_or_else(|_| {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        panic!("the fixture did not print its addresses within {STARTUP:?}; its stderr:\n{log}")
    });
    let mut lines_iter = lines.lines();
    let (Some(issuer), Some(api)) = (
        lines_iter
            .next()
            .and_then(|line| line.strip_prefix("LISTENING ")),
        lines_iter.next().and_then(|line| line.strip_prefix("API ")),
    ) else {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        panic!("unexpected startup lines from the fixture: {lines:?}; its stderr:\n{log}")
    };
    Some(OidcProvider {
        issuer: issuer.to_owned(),
        api: api.to_owned(),
        child,
        _stdin: stdin,
    })
}

impl OidcProvider {
    /// `GET {api}/stats`: the API's counters and the token endpoint's (`token_requests`,
    /// `token_requests_ok`), as JSON.
    ///
    /// No tokio timer bounds it, so it also works under a paused clock (which would fire a
    /// timeout while the answer is still crossing loopback).
    pub async fn stats(&self) -> serde_json::Value {
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let uri: http::Uri = format!("{}/stats", self.api).parse().expect("a URI");
        let response = client.get(uri).await.expect("GET /stats");
        assert_eq!(response.status(), http::StatusCode::OK, "GET /stats");
        let body = response
            .into_body()
            .collect()
            .await
            .expect("the /stats body")
            .to_bytes();
        serde_json::from_slice(&body).expect("/stats is JSON")
    }

    /// `POST {api}/stats/reset`: zero every counter (and restart the count towards the next
    /// nonce rotation).
    pub async fn reset_stats(&self) {
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let request = http::Request::post(format!("{}/stats/reset", self.api))
            .body(Empty::new())
            .expect("a request");
        let response = client.request(request).await.expect("POST /stats/reset");
        assert_eq!(response.status(), http::StatusCode::OK, "POST /stats/reset");
    }
}
