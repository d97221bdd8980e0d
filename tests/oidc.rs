//! Against a complete, standard identity provider: the certified `oidc-provider` (Node.js) on
//! loopback, from `tests/oidc-provider/`. `.ci/run` installs it (`npm ci`); elsewhere these tests
//! are skipped, with a note, when Node.js or the package is missing.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower_auth_refresh::oauth2::{
    discover, transport, ClientAuth, ClientCredentials, HttpTransport,
};
use tower_auth_refresh::{AuthError, ErrorCode, TokenCache};

/// The running fixture; killed when dropped.
struct OidcProvider {
    child: Child,
    _stdin: ChildStdin,
    issuer: String,
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(ttl_seconds: u64) -> Option<OidcProvider> {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oidc-provider");
    let installed = fixture.join("node_modules/oidc-provider").is_dir();
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
    static STARTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let log_path =
        std::env::temp_dir().join(format!("oidc-fixture-{}-{n}.log", std::process::id()));
    let log = std::fs::File::create(&log_path).expect("a log file");
    let mut child = Command::new("node")
        .arg(fixture.join("server.mjs"))
        .arg("0")
        .env("ACCESS_TOKEN_TTL", ttl_seconds.to_string())
        // The fixture exits when its stdin closes: keep it open for the test's lifetime.
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .expect("node is installed");
    let stdin = child.stdin.take().expect("piped stdin");
    let stdout = child.stdout.take().expect("piped stdout");
    // Read the issuer on a thread, so a fixture that never prints fails the test instead of
    // hanging it.
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = sender.send(line);
    });
    let line = receiver.recv_timeout(STEP).unwrap_or_else(|_| {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        panic!("the fixture did not print its issuer within {STEP:?}; its stderr:\n{log}")
    });
    let issuer = line
        .trim()
        .strip_prefix("LISTENING ")
        .unwrap_or_else(|| panic!("unexpected first line from the fixture: {line:?}"))
        .to_owned();
    Some(OidcProvider {
        child,
        _stdin: stdin,
        issuer,
    })
}

fn http() -> HttpTransport {
    transport(Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>())
}

/// The longest any step may take against the fixture: a generous bound, so a hang fails the
/// test with the step's name instead of stalling CI.
const STEP: Duration = Duration::from_secs(60);

/// Run one step against the fixture, or fail naming it.
async fn step<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP, future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {STEP:?}"))
}

const BASIC_ID: &str = "batch-basic";
const BASIC_SECRET: &str = "b@tch s3cret/+&=";

#[tokio::test]
async fn discovery_and_both_client_authentication_methods() {
    let Some(idp) = start(120) else { return };
    let transport = http();

    let metadata = step("discovery", discover(&idp.issuer, &transport, false))
        .await
        .unwrap();
    assert_eq!(metadata.issuer, idp.issuer);
    assert_eq!(metadata.token_endpoint, format!("{}/token", idp.issuer));
    assert_eq!(metadata.preferred_client_auth(), ClientAuth::Basic);

    // client_secret_basic, with characters that must be form-encoded inside Basic.
    let basic = ClientCredentials::from_metadata(&metadata, BASIC_ID, BASIC_SECRET)
        .transport(transport.clone())
        .build()
        .unwrap();
    let token = step("basic token request", basic.request_token())
        .await
        .unwrap();
    assert!(!token.secret().is_empty());
    let lifetime = token.expires_at().unwrap() - tokio::time::Instant::now();
    assert!(
        lifetime <= Duration::from_secs(120) && lifetime > Duration::from_secs(60),
        "{lifetime:?}"
    );

    // client_secret_post; the fixture refuses a client that uses the other method.
    let post = ClientCredentials::from_metadata(&metadata, "batch-post", "p0st-secret")
        .auth_method(ClientAuth::Post)
        .scope("contacts:read")
        .transport(transport.clone())
        .build()
        .unwrap();
    let token = step("post token request", post.request_token())
        .await
        .unwrap();
    assert_eq!(token.scope(), Some("contacts:read"));
    let wrong_method = ClientCredentials::from_metadata(&metadata, "batch-post", "p0st-secret")
        .transport(transport.clone())
        .build()
        .unwrap();
    let refused = step("wrong-method token request", wrong_method.request_token()).await;
    assert_eq!(
        refused.unwrap_err().error_code(),
        Some(&ErrorCode::InvalidClient)
    );
}

#[tokio::test]
async fn wrong_secret_is_invalid_client_and_never_shown() {
    let Some(idp) = start(120) else { return };
    let transport = http();
    let metadata = step("discovery", discover(&idp.issuer, &transport, false))
        .await
        .unwrap();
    let provider = ClientCredentials::from_metadata(&metadata, BASIC_ID, "not-the-secret")
        .transport(transport)
        .build()
        .unwrap();

    let cache = TokenCache::new(provider);
    let error = step("token with a wrong secret", cache.token())
        .await
        .unwrap_err();
    let AuthError::TokenEndpoint(refused) = &error else {
        panic!("{error:?}")
    };
    assert_eq!(refused.code, ErrorCode::InvalidClient);
    assert_eq!(refused.status, http::StatusCode::UNAUTHORIZED);
    for shown in [
        error.to_string(),
        format!("{error:?}"),
        format!("{cache:?}"),
    ] {
        assert!(!shown.contains("not-the-secret"), "{shown}");
    }
    assert_eq!(cache.stats().refresh_failures, 1);
}

#[tokio::test]
async fn unknown_issuer_path_is_a_discovery_error() {
    let Some(idp) = start(120) else { return };
    let error = discover(
        &format!("{}/tenant-that-does-not-exist", idp.issuer),
        &http(),
        false,
    )
    .await
    .unwrap_err();
    assert!(matches!(error, AuthError::Discovery { .. }), "{error:?}");
}
