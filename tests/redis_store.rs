//! `RedisStore` against a real `redis-server` on loopback (feature `redis`; `.ci/run` installs
//! the Debian package): a fleet of 8 processes sharing one token, a lock holder killed while it
//! fetches, Redis stopped and restarted mid-run, late 401s, sealed tokens.
//!
//! Each test starts its own `redis-server` on a free port, so it can stop and restart it. The
//! fleet's processes are this test binary started again with `fleet_worker` as the only test
//! to run, driven by environment variables; the identity provider and API stay in the parent.

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Empty;
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};
use tower_auth_refresh::redis_store::{EncryptionKey, RedisStats, RedisStore};
use tower_auth_refresh::{AuthLayer, AuthService, TokenCache};

use support::{
    body_string, client, http_provider_at, Api, IdentityProvider, IdpMode, TokenRegistry,
};

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    tower_auth_refresh::ReplayBody<Empty<Bytes>>,
>;

/// Bounds every wait of these tests; far above what any step needs on a loaded 2-core machine.
const PATIENCE: Duration = Duration::from_secs(60);

// ---- a real redis-server -------------------------------------------------------------------

struct RedisServer {
    port: u16,
    child: Option<std::process::Child>,
}

impl RedisServer {
    fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map(|addr| addr.port())
            .unwrap();
        let mut server = Self { port, child: None };
        server.restart();
        server
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// (Re)start on the same port, empty, and wait until it answers `PING`.
    fn restart(&mut self) {
        self.stop();
        let binary = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let child = std::process::Command::new(&binary)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| {
                panic!(
                    "cannot start `{binary}` ({error}): these tests need a Redis server \
                     (Debian: apt-get install redis-server; .ci/run installs it)"
                )
            });
        self.child = Some(child);
        let started = std::time::Instant::now();
        while self.command("PING").as_deref() != Some("+PONG") {
            assert!(started.elapsed() < PATIENCE, "redis-server never answered");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// One inline command, answered on one line (enough for `PING`, `PTTL`, `GET` of a small
    /// value).
    fn command(&self, command: &str) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        stream.write_all(format!("{command}\r\n").as_bytes()).ok()?;
        let mut answer = vec![0; 64 * 1024];
        let mut read = 0;
        loop {
            let n = stream.read(&mut answer[read..]).ok()?;
            read += n;
            let text = String::from_utf8_lossy(&answer[..read]);
            // A bulk string is `$<len>\r\n<data>\r\n`; everything else is one line.
            let complete = match text.strip_prefix('$') {
                Some(rest) => match rest.split_once("\r\n") {
                    Some((len, data)) => {
                        len.parse::<i64>().is_ok_and(|len| len < 0)
                            || data.len() >= len.parse::<usize>().unwrap_or(0) + 2
                    }
                    None => false,
                },
                None => text.ends_with("\r\n"),
            };
            if complete || n == 0 {
                return Some(text.trim_end().to_owned());
            }
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---- helpers --------------------------------------------------------------------------------

fn store(redis: &RedisServer) -> RedisStore {
    RedisStore::builder(&redis.url(), "tests").unwrap().build()
}

fn service(cache: &TokenCache) -> AuthService<Client> {
    ServiceBuilder::new()
        .layer(AuthLayer::with_cache(cache.clone()))
        .service(client())
}

/// One GET of `/whoami`: the status, and the token the API accepted.
async fn whoami(service: &AuthService<Client>, api: &Api) -> (StatusCode, String) {
    let request = Request::get(api.url("/whoami")).body(Empty::new()).unwrap();
    let response = tokio::time::timeout(PATIENCE, service.clone().oneshot(request))
        .await
        .expect("a request hung")
        .expect("a request failed");
    let status = response.status();
    (status, body_string(response).await)
}

/// An identity provider whose tokens expire after `ttl` on the server without saying so:
/// clients learn of each expiry through a 401, so every token request answers an expiry.
async fn servers(ttl: Option<Duration>) -> (TokenRegistry, IdentityProvider, Api) {
    let registry = TokenRegistry::default();
    let idp = IdentityProvider::start(registry.clone(), ttl).await;
    idp.announce_expiry(false);
    let api = Api::start(registry.clone(), 1_000).await;
    (registry, idp, api)
}

// ---- the worker processes -------------------------------------------------------------------

/// Not a test of its own: the body of the fleet's processes, started by the tests below with
/// `FLEET_ROLE` set. Run directly it does nothing.
#[test]
#[ignore = "a worker process of the fleet tests; does nothing without FLEET_ROLE"]
fn fleet_worker() {
    let Ok(role) = std::env::var("FLEET_ROLE") else {
        return;
    };
    let env = |name: &str| std::env::var(name).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = RedisStore::builder(&env("REDIS_URL"), "tests")
            .unwrap()
            .lock_ttl(Duration::from_millis(env("LOCK_TTL_MS").parse().unwrap()))
            .build();
        let cache = TokenCache::builder(http_provider_at(env("IDP_URL")))
            .store(store.clone())
            .build();
        match role.as_str() {
            // Take the lock and hang in the provider call until killed.
            "lock_holder" => {
                let _ = cache.token().await;
                unreachable!("the identity provider hangs; this process is killed first");
            }
            "requests" => {
                let service = service(&cache);
                let api_url = env("API_URL");
                let run_for = Duration::from_millis(env("RUN_FOR_MS").parse().unwrap());
                let tasks: usize = env("TASKS").parse().unwrap();
                let deadline = Instant::now() + run_for;
                let handles: Vec<_> = (0..tasks)
                    .map(|_| {
                        let service = service.clone();
                        let url = format!("{api_url}/whoami");
                        tokio::spawn(async move {
                            let (mut ok, mut failed) = (0_u64, 0_u64);
                            while Instant::now() < deadline {
                                let request = Request::get(&url).body(Empty::new()).unwrap();
                                match service.clone().oneshot(request).await {
                                    Ok(response) if response.status() == StatusCode::OK => ok += 1,
                                    _ => failed += 1,
                                }
                            }
                            (ok, failed)
                        })
                    })
                    .collect();
                let (mut ok, mut failed) = (0, 0);
                for handle in handles {
                    let (o, f) = handle.await.unwrap();
                    ok += o;
                    failed += f;
                }
                let stats: RedisStats = store.stats();
                println!(
                    "FLEET_RESULT ok={ok} failed={failed} token_requests={} adopted={} \
                     published={} lock_waits={} fallbacks={} replays={}",
                    cache.stats().token_requests,
                    stats.adopted,
                    stats.published,
                    stats.lock_waits,
                    stats.fallbacks,
                    cache.stats().replays,
                );
            }
            other => panic!("unknown FLEET_ROLE {other}"),
        }
    });
}

fn worker(role: &str, vars: &[(&str, String)]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(std::env::current_exe().unwrap());
    command
        .args(["fleet_worker", "--exact", "--ignored", "--nocapture"])
        .args(["--test-threads", "1"])
        .env("FLEET_ROLE", role)
        .envs(vars.iter().map(|(name, value)| (name, value)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// The numbers one worker printed.
#[derive(Debug, Default)]
struct WorkerResult {
    ok: u64,
    failed: u64,
    token_requests: u64,
    adopted: u64,
    published: u64,
    lock_waits: u64,
    fallbacks: u64,
    replays: u64,
}

fn parse_result(stdout: &str) -> Option<WorkerResult> {
    // libtest prints the test's name on the same line, before what the test prints.
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("FLEET_RESULT ").map(|(_, rest)| rest))?;
    let mut result = WorkerResult::default();
    for field in line.split_whitespace() {
        let (name, value) = field.split_once('=')?;
        let value: u64 = value.parse().ok()?;
        match name {
            "ok" => result.ok = value,
            "failed" => result.failed = value,
            "token_requests" => result.token_requests = value,
            "adopted" => result.adopted = value,
            "published" => result.published = value,
            "lock_waits" => result.lock_waits = value,
            "fallbacks" => result.fallbacks = value,
            "replays" => result.replays = value,
            _ => return None,
        }
    }
    Some(result)
}

// ---- the tests ------------------------------------------------------------------------------

/// Start `processes` workers of `tasks` tasks each, sending requests for `run_for`; their
/// results once all have exited.
async fn run_fleet(
    redis: &RedisServer,
    idp: &IdentityProvider,
    api: &Api,
    processes: usize,
    tasks: usize,
    run_for: Duration,
) -> Vec<WorkerResult> {
    let vars = [
        ("REDIS_URL", redis.url()),
        ("IDP_URL", idp.token_url()),
        ("API_URL", api.url("")),
        ("RUN_FOR_MS", run_for.as_millis().to_string()),
        ("TASKS", tasks.to_string()),
        ("LOCK_TTL_MS", "10000".to_owned()),
    ];
    let children: Vec<_> = (0..processes)
        .map(|_| worker("requests", &vars).spawn().unwrap())
        .collect();
    let mut results = Vec::new();
    for child in children {
        let output = tokio::time::timeout(PATIENCE, child.wait_with_output())
            .await
            .expect("a worker process hung")
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "a worker failed:\n{stdout}\n{stderr}"
        );
        results.push(parse_result(&stdout).unwrap_or_else(|| panic!("no result in:\n{stdout}")));
    }
    eprintln!("fleet: {results:#?}");
    // Every token request the processes made reached the identity provider; none failed.
    let fleet_token_requests: u64 = results.iter().map(|r| r.token_requests).sum();
    assert_eq!(fleet_token_requests, idp.token_requests() as u64);
    assert_eq!(results.iter().map(|r| r.fallbacks).sum::<u64>(), 0);
    assert_eq!(
        results.iter().map(|r| r.failed).sum::<u64>(),
        0,
        "no request may fail"
    );
    assert!(results.iter().all(|r| r.ok > 0));
    assert_eq!(
        api.served() as u64,
        results.iter().map(|r| r.ok).sum::<u64>()
    );
    results
}

/// Waits until the identity provider has received `n` token requests.
async fn until_token_requests(idp: &IdentityProvider, n: usize) {
    let waiting = Instant::now();
    while idp.token_requests() < n {
        assert!(waiting.elapsed() < PATIENCE, "token request {n} never came");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// When each token was issued, earliest first (the identity provider's tokens live `ttl`).
fn issue_times(registry: &TokenRegistry, ttl: Duration) -> Vec<Instant> {
    registry
        .expiries()
        .into_iter()
        .map(|expiry| expiry.unwrap() - ttl)
        .collect()
}

/// 8 processes × 32 tasks for 10 seconds while tokens expire every second, unannounced: the
/// whole fleet makes one token request per expiry (plus the first), not one per process, and
/// no request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_8_processes_makes_one_token_request_per_expiry() {
    const PROCESSES: usize = 8;
    const TTL: Duration = Duration::from_secs(1);
    let redis = RedisServer::start();
    let (registry, idp, api) = servers(Some(TTL)).await;
    let results = run_fleet(&redis, &idp, &api, PROCESSES, 32, Duration::from_secs(10)).await;

    // Each token was requested only after the one before it had expired on the server: every
    // token request after the first answers one expiry.
    let token_requests = idp.token_requests();
    let issued = issue_times(&registry, TTL);
    assert_eq!(issued.len(), token_requests);
    for pair in issued.windows(2) {
        assert!(
            pair[1] >= pair[0] + TTL,
            "a token was requested {:?} before the previous one expired",
            pair[0] + TTL - pair[1]
        );
    }
    let expiries = issued
        .windows(2)
        .filter(|pair| pair[1] >= pair[0] + TTL)
        .count();
    assert_eq!(
        token_requests,
        expiries + 1,
        "token requests = expiries + 1"
    );
    let adopted: u64 = results.iter().map(|r| r.adopted).sum();
    let published: u64 = results.iter().map(|r| r.published).sum();
    eprintln!(
        "fleet of {PROCESSES}: {} requests, {token_requests} token requests, {expiries} \
         expiries, {adopted} tokens taken from Redis",
        api.served()
    );
    // Ten seconds of one-second tokens: about ten expiries, each noticed by a 401 at once (a
    // loaded machine stretches each cycle by the time a refresh takes, hence the wide bound).
    assert!((5..=11).contains(&expiries), "{expiries} expiries in 10 s");
    assert_eq!(published, token_requests as u64);
    assert!(adopted >= PROCESSES as u64 - 1, "{adopted} tokens adopted");
}

/// The same with announced lifetimes: each process refreshes ahead of expiry (at half the
/// token's life), yet the fleet still fetches one token per refresh, never one per process:
/// consecutive token requests are about half a lifetime apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_refreshing_ahead_of_expiry_fetches_one_token_per_refresh() {
    const TTL: Duration = Duration::from_secs(1);
    let redis = RedisServer::start();
    let (registry, idp, api) = servers(Some(TTL)).await;
    idp.announce_expiry(true);
    let run_for = Duration::from_secs(5);
    run_fleet(&redis, &idp, &api, 4, 8, run_for).await;

    let issued = issue_times(&registry, TTL);
    // Half a lifetime apart, less what a token request spends in flight (the process counts
    // from when it sent the request, the identity provider from when it arrived; on a loaded
    // machine tens of milliseconds). Two processes fetching for the same refresh would be
    // milliseconds apart.
    for pair in issued.windows(2) {
        assert!(
            pair[1] >= pair[0] + TTL / 4,
            "two token requests {:?} apart",
            pair[1] - pair[0]
        );
    }
    // 5 s of refreshes every half second, plus the first token and the start-up of 4 processes.
    assert!(issued.len() <= 12, "{} token requests in 5 s", issued.len());
    assert_eq!(api.rejected(), 0, "refreshed ahead of expiry: no 401");
}

/// The process holding the lock is killed while it waits for the identity provider; another
/// process takes over once the lock's TTL has passed, and fetches the token itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_holder_killed_mid_refresh_is_taken_over_after_the_lock_ttl() {
    let redis = RedisServer::start();
    let (_registry, idp, api) = servers(None).await;
    idp.set_mode(IdpMode::Hang);
    let vars = [
        ("REDIS_URL", redis.url()),
        ("IDP_URL", idp.token_url()),
        ("LOCK_TTL_MS", "2000".to_owned()),
    ];
    let mut holder = worker("lock_holder", &vars).spawn().unwrap();
    let waiting = Instant::now();
    while idp.token_requests() == 0 {
        assert!(
            waiting.elapsed() < PATIENCE,
            "the lock holder never asked for a token"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    holder.kill().await.unwrap();
    idp.set_mode(IdpMode::Issue);
    let lock_key = "tower-auth-refresh:tests:lock";
    let ttl: i64 = redis.command(&format!("PTTL {lock_key}")).unwrap()[1..]
        .parse()
        .unwrap();
    assert!(
        ttl > 0,
        "the dead process's lock is still held ({ttl} ms left)"
    );

    let store = store(&redis);
    let cache = TokenCache::builder(http_provider_at(idp.token_url()))
        .store(store.clone())
        .build();
    let started = Instant::now();
    let (status, token) = whoami(&service(&cache), &api).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!token.is_empty());
    assert!(
        started.elapsed() + Duration::from_millis(50) >= Duration::from_millis(ttl as u64),
        "took over after {:?}, before the lock's {ttl} ms ran out",
        started.elapsed()
    );
    assert_eq!(
        idp.token_requests(),
        2,
        "the dead holder's request and the new one"
    );
    let stats = store.stats();
    assert_eq!(
        (stats.lock_waits, stats.published, stats.fallbacks),
        (1, 1, 0)
    );
}

/// Four caches (as four processes would) share tokens that expire every 400 ms, unannounced,
/// under steady traffic. Redis is stopped: every request still succeeds, each cache fetching
/// its own tokens. Redis comes back: the caches share one token per expiry again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_mid_run_falls_back_to_local_refresh_and_sharing_resumes() {
    const CACHES: usize = 4;
    const TTL: Duration = Duration::from_millis(400);
    const PHASE: Duration = Duration::from_secs(2);
    let mut redis = RedisServer::start();
    let (registry, idp, api) = servers(Some(TTL)).await;
    let stores: Vec<RedisStore> = (0..CACHES)
        .map(|_| {
            RedisStore::builder(&redis.url(), "tests")
                .unwrap()
                .operation_timeout(Duration::from_millis(500))
                .build()
        })
        .collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut traffic = Vec::new();
    for store in &stores {
        let cache = TokenCache::builder(http_provider_at(idp.token_url()))
            .store(store.clone())
            .build();
        for _ in 0..8 {
            let (service, url, stop) = (service(&cache), api.url("/whoami"), stop.clone());
            traffic.push(tokio::spawn(async move {
                let mut statuses = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let request = Request::get(&url).body(Empty::new()).unwrap();
                    let response = tokio::time::timeout(PATIENCE, service.clone().oneshot(request));
                    match response.await {
                        Ok(Ok(response)) => statuses.push(response.status()),
                        Ok(Err(error)) => panic!("a request failed: {error}"),
                        Err(_) => panic!("a request hung"),
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                statuses
            }));
        }
    }

    tokio::time::sleep(PHASE).await;
    let stopped_at = Instant::now();
    redis.stop();
    tokio::time::sleep(PHASE).await;
    redis.restart();
    // Each connection notices the restart on its next command, and tokens that diverged while
    // Redis was away converge at their next expiry.
    tokio::time::sleep(PHASE).await;
    let settled_at = Instant::now();
    tokio::time::sleep(PHASE).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut statuses = Vec::new();
    for task in traffic {
        statuses.extend(task.await.unwrap());
    }

    let failed = statuses.iter().filter(|s| **s != StatusCode::OK).count();
    assert_eq!(failed, 0, "{failed} of {} requests failed", statuses.len());
    let fallbacks: u64 = stores.iter().map(|store| store.stats().fallbacks).sum();
    assert!(fallbacks >= CACHES as u64, "{fallbacks} local refreshes");

    // Shared, before the outage and once settled after it: each token requested only once the
    // one before it expired.
    let issued = issue_times(&registry, TTL);
    let one_per_expiry = |from: Instant, to: Instant| {
        let phase: Vec<_> = issued
            .iter()
            .filter(|at| **at >= from && **at < to)
            .collect();
        assert!(phase.len() >= 2, "{} tokens in a phase", phase.len());
        phase.windows(2).all(|pair| *pair[1] >= *pair[0] + TTL)
    };
    let started = issued[0];
    assert!(one_per_expiry(started, stopped_at), "before the outage");
    assert!(
        one_per_expiry(settled_at, Instant::now()),
        "after Redis came back"
    );
    // While Redis was away, each cache fetched its own: several tokens per expiry.
    let during = issued
        .iter()
        .filter(|at| **at >= stopped_at && **at < stopped_at + PHASE)
        .count();
    eprintln!(
        "{} requests; {} tokens in all, {during} while Redis was down; {fallbacks} local refreshes",
        statuses.len(),
        issued.len()
    );
    assert!(during > (PHASE.as_millis() / TTL.as_millis()) as usize + 1);
}

/// A 401 withdraws the shared token only while Redis still holds the rejected one: a slow
/// process's late 401 for an old token takes the fleet's new token, and deletes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_401_for_an_old_token_keeps_the_fleets_new_token() {
    let redis = RedisServer::start();
    let (registry, idp, api) = servers(None).await;
    let (store_a, store_b) = (store(&redis), store(&redis));
    let cache_a = TokenCache::builder(http_provider_at(idp.token_url()))
        .store(store_a.clone())
        .build();
    let cache_b = TokenCache::builder(http_provider_at(idp.token_url()))
        .store(store_b.clone())
        .build();
    let (a, b) = (service(&cache_a), service(&cache_b));

    let (_, first) = whoami(&a, &api).await;
    let (_, same) = whoami(&b, &api).await;
    assert_eq!(first, same, "B took A's token from Redis");
    assert_eq!(idp.token_requests(), 1);

    registry.revoke_all();
    let (status, second) = whoami(&a, &api).await;
    assert_eq!(status, StatusCode::OK);
    assert_ne!(second, first);
    assert_eq!(
        store_a.stats().withdrawn,
        1,
        "A withdrew the rejected token"
    );

    // B still holds the first token; its 401 comes late.
    let (status, for_b) = whoami(&b, &api).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(for_b, second, "B took the fleet's new token");
    assert_eq!(idp.token_requests(), 2);
    let stats_b = store_b.stats();
    assert_eq!(
        (stats_b.adopted, stats_b.withdrawn, stats_b.published),
        (2, 0, 0)
    );
    let shared = redis.command("GET tower-auth-refresh:tests:token").unwrap();
    assert!(shared.contains(&second), "the new token is still shared");
}

/// With an encryption key, Redis never sees the token, and a process with another key (or
/// none) cannot use what is stored: it fetches its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_tokens_are_unreadable_in_redis_and_need_the_key() {
    let redis = RedisServer::start();
    let (_registry, idp, api) = servers(None).await;
    let sealed = |key: [u8; 32]| {
        RedisStore::builder(&redis.url(), "tests")
            .unwrap()
            .encryption_key(EncryptionKey::from_bytes(key))
            .build()
    };
    let cache = |store: RedisStore| {
        TokenCache::builder(http_provider_at(idp.token_url()))
            .store(store)
            .build()
    };
    let (first, same_key, other_key) = (sealed([1; 32]), sealed([1; 32]), sealed([2; 32]));
    let (_, token) = whoami(&service(&cache(first)), &api).await;
    let stored = redis.command("GET tower-auth-refresh:tests:token").unwrap();
    assert!(stored.contains("tar1e"), "{stored}");
    assert!(!stored.contains(&token), "the token is readable in Redis");

    let (_, with_same_key) = whoami(&service(&cache(same_key.clone())), &api).await;
    assert_eq!(with_same_key, token);
    assert_eq!(same_key.stats().adopted, 1);
    assert_eq!(idp.token_requests(), 1);

    let other_key_cache = cache(other_key.clone());
    let (_, with_other_key) = whoami(&service(&other_key_cache), &api).await;
    assert_ne!(with_other_key, token);
    assert_eq!(other_key.stats().adopted, 0);
    let plain = store(&redis);
    let (_, with_no_key) = whoami(&service(&cache(plain.clone())), &api).await;
    assert_eq!(plain.stats().adopted, 0);
    assert!(!with_no_key.is_empty());
    assert_eq!(idp.token_requests(), 3);
}

/// No Redis at all (down from the start): the token still arrives from the provider, a warning
/// says why, and nothing logged shows the token.
#[tokio::test]
async fn no_redis_at_start_is_a_warning_not_a_failure() {
    let (captured, _guard) = support::capture_traces();
    let closed_port = TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .unwrap()
        .port();
    let (_registry, idp, api) = servers(None).await;
    let store = RedisStore::builder(&format!("redis://127.0.0.1:{closed_port}/"), "tests")
        .unwrap()
        .build();
    let cache = TokenCache::builder(http_provider_at(idp.token_url()))
        .store(store.clone())
        .build();
    let (status, token) = whoami(&service(&cache), &api).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(idp.token_requests(), 1);
    assert_eq!(store.stats().fallbacks, 1);
    let logged = captured.text();
    assert!(
        logged.contains("shared token store unavailable"),
        "{logged}"
    );
    assert!(!logged.contains(&token), "a token in the log: {logged}");
}

/// Four caches (as four processes would) need their first token at once from an identity
/// provider that takes three times the lock's TTL to answer. The holder renews its lock while it
/// waits, so the others keep waiting instead of taking the lock over: one token request for the
/// fleet, and every cache ends with that one token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_slower_than_the_lock_ttl_is_called_once_for_the_fleet() {
    const CACHES: usize = 4;
    const LOCK_TTL: Duration = Duration::from_secs(1);
    let redis = RedisServer::start();
    let (_registry, idp, api) = servers(None).await;
    idp.set_latency(LOCK_TTL * 3);
    let stores: Vec<RedisStore> = (0..CACHES)
        .map(|_| {
            RedisStore::builder(&redis.url(), "tests")
                .unwrap()
                .lock_ttl(LOCK_TTL)
                .build()
        })
        .collect();
    let services: Vec<_> = stores
        .iter()
        .map(|store| {
            service(
                &TokenCache::builder(http_provider_at(idp.token_url()))
                    .store(store.clone())
                    .build(),
            )
        })
        .collect();

    let answers =
        futures::future::join_all(services.iter().map(|service| whoami(service, &api))).await;

    assert_eq!(idp.token_requests(), 1, "one token request for the fleet");
    for (status, token) in &answers {
        assert_eq!(*status, StatusCode::OK);
        assert_eq!(token, "token-1", "every cache uses the one token");
    }
    let stats: Vec<RedisStats> = stores.iter().map(RedisStore::stats).collect();
    let sum = |field: fn(&RedisStats) -> u64| stats.iter().map(field).sum::<u64>();
    assert_eq!(sum(|s| s.published), 1);
    assert_eq!(sum(|s| s.adopted), CACHES as u64 - 1);
    assert_eq!(sum(|s| s.lock_waits), CACHES as u64 - 1);
    assert_eq!(sum(|s| s.fallbacks), 0);
    let stored = redis.command("GET tower-auth-refresh:tests:token").unwrap();
    assert!(stored.contains("token-1"), "{stored}");
    assert_eq!(
        redis
            .command("EXISTS tower-auth-refresh:tests:lock")
            .as_deref(),
        Some(":0"),
        "the holder released its lock"
    );
}

/// A's provider call is sent first but answers last; meanwhile its lock is lost (deleted, as a
/// Redis failover can lose a key) and B fetches and publishes a newer token. A's late publish
/// must not overwrite B's: Redis keeps B's token, A takes B's instead of its own, and a third
/// cache that asks afterwards gets B's too. A's older token is used by no one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_publish_never_overwrites_a_newer_token() {
    let redis = RedisServer::start();
    let (_registry, idp, api) = servers(None).await;
    let stores = [store(&redis), store(&redis), store(&redis)];
    let [a, b, c] = stores.clone().map(|store| {
        service(
            &TokenCache::builder(http_provider_at(idp.token_url()))
                .store(store)
                .build(),
        )
    });

    // A takes the lock and asks the identity provider, which holds its answer for 2 s.
    idp.set_latency(Duration::from_secs(2));
    let late = {
        let api_url = api.url("/whoami");
        tokio::spawn(async move {
            let request = Request::get(api_url).body(Empty::new()).unwrap();
            let response = a.oneshot(request).await.expect("A's request failed");
            (response.status(), body_string(response).await)
        })
    };
    until_token_requests(&idp, 1).await;
    idp.set_latency(Duration::ZERO);
    assert_eq!(
        redis
            .command("DEL tower-auth-refresh:tests:lock")
            .as_deref(),
        Some(":1"),
        "A held the lock"
    );

    // B finds no lock and no token: it fetches a newer token and publishes it.
    let (status, newer) = whoami(&b, &api).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(newer, "token-2");
    assert!(!late.is_finished(), "A's provider call was still running");

    let (status, for_a) = tokio::time::timeout(PATIENCE, late)
        .await
        .expect("A's request hung")
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let stored = redis.command("GET tower-auth-refresh:tests:token").unwrap();
    assert!(
        stored.contains("token-2") && !stored.contains("token-1"),
        "Redis holds B's newer token: {stored}"
    );
    assert_eq!(for_a, "token-2", "A took B's newer token over its own");
    let (_, for_c) = whoami(&c, &api).await;
    assert_eq!(for_c, "token-2", "C took B's token");
    assert_eq!(idp.token_requests(), 2);

    let [a, b, c] = stores.map(|store| store.stats());
    assert_eq!((a.published, a.not_published, a.adopted), (0, 1, 1));
    assert_eq!((b.published, b.not_published, b.adopted), (1, 0, 0));
    assert_eq!((c.published, c.adopted), (0, 1));
}

/// A holder whose refresh is cancelled by the cache's refresh timeout (its identity provider
/// never answers) frees the lock at once rather than leaving it to its 30 s TTL: the next
/// process fetches without waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_cancelled_by_its_refresh_timeout_frees_the_lock() {
    const LOCK_TTL: Duration = Duration::from_secs(30);
    let redis = RedisServer::start();
    let (_registry, idp, api) = servers(None).await;
    let store = |redis: &RedisServer| {
        RedisStore::builder(&redis.url(), "tests")
            .unwrap()
            .lock_ttl(LOCK_TTL)
            .build()
    };
    let (holder, next) = (store(&redis), store(&redis));
    idp.set_mode(IdpMode::Hang);
    let cancelled = TokenCache::builder(http_provider_at(idp.token_url()))
        .store(holder)
        .refresh_timeout(Duration::from_millis(500))
        .build();
    let error = cancelled.token().await.unwrap_err();
    assert!(
        matches!(error, tower_auth_refresh::AuthError::RefreshTimeout { .. }),
        "{error:?}"
    );
    idp.set_mode(IdpMode::Issue);

    let freed = Instant::now();
    while redis
        .command("EXISTS tower-auth-refresh:tests:lock")
        .as_deref()
        != Some(":0")
    {
        assert!(
            freed.elapsed() < LOCK_TTL / 3,
            "the cancelled holder's lock is still held"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cache = TokenCache::builder(http_provider_at(idp.token_url()))
        .store(next.clone())
        .build();
    let (status, _) = whoami(&service(&cache), &api).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(idp.token_requests(), 2);
    let stats = next.stats();
    assert_eq!((stats.lock_waits, stats.published), (0, 1));
}

/// A's lock is lost while its provider call runs, and B takes the lock over and asks the
/// identity provider too. A's answer arrives first: A uses its token but does not publish it,
/// since B, holding the lock, will publish a newer one; the fleet then shares B's token only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_whose_lock_was_taken_over_does_not_publish() {
    let redis = RedisServer::start();
    let (_registry, idp, api) = servers(None).await;
    let stores = [store(&redis), store(&redis), store(&redis)];
    let [a, b, c] = stores.clone().map(|store| {
        service(
            &TokenCache::builder(http_provider_at(idp.token_url()))
                .store(store)
                .build(),
        )
    });
    let spawn_whoami = |service: AuthService<Client>| {
        let api_url = api.url("/whoami");
        tokio::spawn(async move {
            let request = Request::get(api_url).body(Empty::new()).unwrap();
            let response = service.oneshot(request).await.expect("a request failed");
            (response.status(), body_string(response).await)
        })
    };

    // A's answer comes after 1 s, B's (sent later) after 3 s.
    idp.set_latency(Duration::from_secs(1));
    let first = spawn_whoami(a);
    until_token_requests(&idp, 1).await;
    idp.set_latency(Duration::from_secs(3));
    assert_eq!(
        redis
            .command("DEL tower-auth-refresh:tests:lock")
            .as_deref(),
        Some(":1"),
        "A held the lock"
    );
    let second = spawn_whoami(b);
    until_token_requests(&idp, 2).await;

    let (status, for_a) = tokio::time::timeout(PATIENCE, first)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((status, for_a.as_str()), (StatusCode::OK, "token-1"));
    assert!(
        !second.is_finished(),
        "B was still fetching when A published"
    );
    assert_eq!(
        redis
            .command("EXISTS tower-auth-refresh:tests:token")
            .as_deref(),
        Some(":0"),
        "A did not publish under B's lock"
    );
    let (status, for_b) = tokio::time::timeout(PATIENCE, second)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((status, for_b.as_str()), (StatusCode::OK, "token-2"));
    let (_, for_c) = whoami(&c, &api).await;
    assert_eq!(for_c, "token-2", "the fleet shares B's token");
    assert_eq!(idp.token_requests(), 2);

    let [a, b, c] = stores.map(|store| store.stats());
    assert_eq!((a.published, a.not_published, a.adopted), (0, 1, 0));
    assert_eq!((b.published, b.not_published), (1, 0));
    assert_eq!((c.published, c.adopted), (0, 1));
}

/// A refresh for a claims challenge never takes the fleet's shared token (it lacks the claims),
/// and publishes the token it fetched, which becomes the fleet's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claims_refresh_fetches_its_own_token_and_shares_it() {
    let redis = RedisServer::start();
    let (_registry, idp, api) = servers(None).await;
    let (store_a, store_b) = (store(&redis), store(&redis));
    let cache_a = TokenCache::builder(http_provider_at(idp.token_url()))
        .store(store_a.clone())
        .build();
    let cache_b = TokenCache::builder(http_provider_at(idp.token_url()))
        .store(store_b.clone())
        .build();
    let (a, b) = (service(&cache_a), service(&cache_b));
    let get = |service: &AuthService<Client>, path: &str| {
        let request = Request::get(api.url(path)).body(Empty::new()).unwrap();
        let call = service.clone().oneshot(request);
        async move {
            let response = tokio::time::timeout(PATIENCE, call).await.unwrap().unwrap();
            let status = response.status();
            (status, body_string(response).await)
        }
    };

    assert_eq!(whoami(&a, &api).await.1, "token-1");
    assert_eq!(whoami(&b, &api).await.1, "token-1", "B took A's token");
    // A's token is refused by one route (not expired): A fetches and shares token-2.
    assert_eq!(get(&a, "/always-401").await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(idp.token_requests(), 2);

    // B, still on token-1, meets a claims challenge: token-2 lacks the claims too.
    let (status, token) = get(&b, "/needs-claims").await;
    assert_eq!((status, token.as_str()), (StatusCode::OK, "token-3"));
    assert_eq!((idp.token_requests(), idp.claims_requests()), (3, 1));
    let stats_b = store_b.stats();
    assert_eq!((stats_b.adopted, stats_b.published), (1, 1));
    let shared = redis.command("GET tower-auth-refresh:tests:token").unwrap();
    assert!(
        shared.contains("token-3"),
        "the claims token is the fleet's"
    );
}
