//! The refresh path with and without Redis: what a shared `TokenStore` adds to one refresh.
//!
//! Needs the `redis` feature and a `redis-server` binary (`$REDIS_SERVER`, else `redis-server`
//! on the `PATH`). The bench starts its own server on a free loopback port (no persistence) and
//! stops it when it ends, also when it panics; without the binary it says so and exits 0.
//!
//! Group `store_refresh`, on a current-thread tokio runtime, the provider in-process and instant
//! (`provider_fn` issuing a new unique `Token` per call), so every figure is the store's own
//! cost plus Redis round trips over loopback. One iteration is one refresh: the time from
//! `TokenCache::token()` on a cache whose token has expired until it returns the new token,
//! which is when requests have it. Forcing the refresh: each chunk of up to 4,096 iterations
//! builds that many caches, gives each a first token that lives 10 ms, waits until all have
//! expired, then times one `token()` per cache. Only that call is timed; building, priming,
//! emptying Redis and letting the finished refresh task run (a `yield_now`) are not.
//!
//! - `local`: the default `LocalStore` (the provider is called): the baseline.
//! - `redis_publish`: `RedisStore` with Redis emptied before each refresh, so this process
//!   fetches and publishes: `GET` (nothing), `SET lock NX PX`, `GET` again, the provider, `SET`
//!   the token `PX`, release the lock (compare-and-delete script, `EVALSHA`).
//! - `redis_publish_sealed`: the same with an `EncryptionKey` (XChaCha20-Poly1305 seal on
//!   publish).
//! - `redis_adopt`: another "process" (a second `RedisStore`, its own connection, its own
//!   provider) published a fresh token before the chunk, so the refresh is one `GET` and no
//!   provider call.
//! - `redis_ping`: one `PING` over a connection of the same kind, on the same runtime: the price
//!   of one round trip, to read the others against.
//!
//! Every refresh is checked outside the timed region: a new token, and one provider call
//! (`local`, `redis_publish*`) or none (`redis_adopt`); the stores' `RedisStats` must show one
//! publication or adoption per refresh and no fallback. After the group, a counting pass of 256
//! refreshes per Redis variant reads Redis's `INFO commandstats` around the timed calls and
//! prints the commands, hence round trips, each refresh made. It also prints how many primed
//! caches were replaced because their first refresh failed: a cache that adopts a shared
//! 10 ms token in the last moments of its life finds it expired when the refresh ends, and
//! backs off (the store accepts any token still alive when it reads it).
//!
//! What limits it: Redis round trips, one after another, each a wake-up of the runtime by the
//! socket (`redis_ping`); the store's own work (encoding, sealing, the lock owner) is a few
//! microseconds.
//!
//! Group `store_hot_path`: one GET through `AuthLayer` over an in-process service (as in
//! `hot_path`) while the token is valid, with `LocalStore` and with `RedisStore`. The store is
//! not consulted on that path; the bench asserts that Redis received no command meanwhile.
//!
//! ```text
//! cargo bench --features redis --bench store
//! ```
//!
//! About a minute on 2 cores.

mod common;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::hint::black_box;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, SamplingMode};
use redis::aio::MultiplexedConnection;
use tokio::runtime::Runtime;
use tower::Layer;
use tower_auth_refresh::redis_store::{EncryptionKey, RedisStats, RedisStore};
use tower_auth_refresh::{provider_fn, AuthLayer, Token, TokenCache, TokenProvider};

use common::{get_request, send, Ok200, SECRET};

/// The lifetime of the tokens caches are primed with; the chunk waits this long (plus
/// `EXPIRY_MARGIN`) before timing their refreshes.
const PRIME_LIFETIME: Duration = Duration::from_millis(10);
/// Shared expiries travel as wall-clock milliseconds: allow for the rounding.
const EXPIRY_MARGIN: Duration = Duration::from_millis(3);
/// The lifetime of every token fetched while measuring, as a real one.
const LIFETIME: Duration = Duration::from_secs(3600);
/// Caches alive at once: bounds memory however many iterations criterion asks for.
const CHUNK: u64 = 4096;
/// Refreshes per variant in the counting pass.
const COUNTED: u64 = 256;

// ---- a redis-server of our own --------------------------------------------------------------

/// A `redis-server` child process on a free loopback port; killed on drop, so also when the
/// bench panics.
struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    /// `None` if there is no `redis-server` to run.
    fn start() -> Option<Self> {
        let binary = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free loopback port")
            .port();
        let child = Command::new(&binary)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(error) if error.kind() == ErrorKind::NotFound => return None,
            Err(error) => panic!("cannot start `{binary}`: {error}"),
        };
        // The guard exists from here on: a server that never answers is still killed.
        let server = Self { child, port };
        let started = Instant::now();
        while !server.answers_ping() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "`{binary}` did not answer PING on port {port} within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(server)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn answers_ping(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let mut answer = [0; 7];
        stream
            .set_read_timeout(Some(Duration::from_secs(1)))
            .and_then(|()| stream.write_all(b"PING\r\n"))
            .and_then(|()| stream.read_exact(&mut answer))
            .is_ok_and(|()| &answer == b"+PONG\r\n")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- the bench's own Redis commands (never timed) -------------------------------------------

async fn admin(server: &RedisServer) -> MultiplexedConnection {
    redis::Client::open(server.url())
        .expect("a Redis URL")
        .get_multiplexed_async_connection()
        .await
        .expect("a connection to the bench's redis-server")
}

async fn run(admin: &mut MultiplexedConnection, command: &str, arg: Option<&str>) {
    let mut command = redis::cmd(command);
    if let Some(arg) = arg {
        command.arg(arg);
    }
    let () = command.query_async(admin).await.expect("a Redis command");
}

async fn flush(admin: &mut MultiplexedConnection) {
    run(admin, "FLUSHDB", None).await;
}

async fn reset_command_stats(admin: &mut MultiplexedConnection) {
    run(admin, "CONFIG", Some("RESETSTAT")).await;
}

/// Calls per command since the last `CONFIG RESETSTAT`, as Redis counts them: commands a Lua
/// script runs are counted too.
async fn command_stats(admin: &mut MultiplexedConnection) -> BTreeMap<String, u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(admin)
        .await
        .expect("INFO commandstats");
    info.lines()
        .filter_map(|line| {
            let (name, fields) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = fields
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

/// The commands the stores sent: without the bench's own, and without those run inside the
/// compare-and-delete script (one `GET` per invocation, and a `DEL` when it matched).
fn store_commands(mut stats: BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    for own in ["flushdb", "config|resetstat", "info", "ping"] {
        stats.remove(own);
    }
    let scripts =
        stats.get("evalsha").copied().unwrap_or(0) + stats.get("eval").copied().unwrap_or(0);
    if let Some(get) = stats.get_mut("get") {
        *get = get.saturating_sub(scripts);
    }
    // The stores send no DEL of their own: every one ran inside the script.
    stats.remove("del");
    stats.retain(|_, calls| *calls > 0);
    stats
}

// ---- the variants -------------------------------------------------------------------------------

/// The in-process identity provider: a new unique token per call, short-lived while caches are
/// primed.
struct Issuer {
    tag: &'static str,
    issued: AtomicU64,
    priming: AtomicBool,
}

impl Issuer {
    fn new(tag: &'static str) -> Arc<Self> {
        Arc::new(Self {
            tag,
            issued: AtomicU64::new(0),
            priming: AtomicBool::new(false),
        })
    }
}

fn provider(issuer: &Arc<Issuer>) -> impl TokenProvider {
    let issuer = issuer.clone();
    provider_fn(move || {
        let n = issuer.issued.fetch_add(1, Ordering::Relaxed) + 1;
        let lifetime = if issuer.priming.load(Ordering::Relaxed) {
            PRIME_LIFETIME
        } else {
            LIFETIME
        };
        let token = Token::new(format!("{SECRET}-{}-{n}", issuer.tag)).with_expires_in(lifetime);
        async move { Ok::<_, Infallible>(token) }
    })
}

/// One way of refreshing, and how to set the stage for it.
struct Variant {
    name: &'static str,
    issuer: Arc<Issuer>,
    /// `None`: the default `LocalStore`.
    store: Option<RedisStore>,
    /// Empty Redis before each refresh, so that this process fetches and publishes.
    flush_each: bool,
    /// Another process (its own store, connection and provider) that publishes a fresh token
    /// before each chunk's refreshes, for this one to adopt.
    publisher: Option<(RedisStore, Arc<Issuer>)>,
    /// Primed caches whose first refresh failed, and the last such error.
    priming_failures: AtomicU64,
    last_priming_error: std::sync::Mutex<Option<String>>,
}

impl Variant {
    fn local() -> Self {
        Self {
            name: "local",
            issuer: Issuer::new("local"),
            store: None,
            flush_each: false,
            publisher: None,
            priming_failures: AtomicU64::new(0),
            last_priming_error: std::sync::Mutex::new(None),
        }
    }

    fn publish(server: &RedisServer, key: Option<EncryptionKey>) -> Self {
        let (name, namespace) = match key {
            None => ("redis_publish", "bench-publish"),
            Some(_) => ("redis_publish_sealed", "bench-sealed"),
        };
        let builder = RedisStore::builder(&server.url(), namespace).expect("a store");
        let store = match key {
            Some(key) => builder.encryption_key(key),
            None => builder,
        }
        .build();
        Self {
            name,
            issuer: Issuer::new(name),
            store: Some(store),
            flush_each: true,
            publisher: None,
            priming_failures: AtomicU64::new(0),
            last_priming_error: std::sync::Mutex::new(None),
        }
    }

    fn adopt(server: &RedisServer) -> Self {
        let store = || {
            RedisStore::builder(&server.url(), "bench-adopt")
                .expect("a store")
                .build()
        };
        Self {
            name: "redis_adopt",
            issuer: Issuer::new("adopt"),
            store: Some(store()),
            flush_each: false,
            publisher: Some((store(), Issuer::new("other-process"))),
            priming_failures: AtomicU64::new(0),
            last_priming_error: std::sync::Mutex::new(None),
        }
    }

    fn provider_calls_per_refresh(&self) -> u64 {
        u64::from(self.publisher.is_none())
    }

    fn cache(&self) -> TokenCache {
        let builder = TokenCache::builder(provider(&self.issuer));
        match &self.store {
            Some(store) => builder.store(store.clone()).build(),
            None => builder.build(),
        }
    }

    /// A cache holding a short-lived token, and that token's secret. With a shared store the
    /// token may be one another primed cache published; one adopted just as it expires is
    /// refused (the cache backs off), so that cache is replaced.
    async fn primed_cache(&self) -> (TokenCache, String) {
        let mut last_error = None;
        for _ in 0..100 {
            let cache = self.cache();
            match cache.token().await {
                Ok(token) => return (cache, token.secret().to_owned()),
                Err(error) => {
                    self.priming_failures.fetch_add(1, Ordering::Relaxed);
                    let cause = std::error::Error::source(&error)
                        .map_or_else(String::new, |cause| format!(": {cause}"));
                    *self.last_priming_error.lock().expect("not poisoned") =
                        Some(format!("{error}{cause}"));
                    last_error = Some(error);
                }
            }
        }
        panic!(
            "{}: no first token in 100 attempts: {last_error:?}",
            self.name
        );
    }

    /// `n` refreshes, one per primed cache; returns the time spent in them. With `counts`,
    /// adds the commands Redis received during the timed calls.
    async fn chunk(
        &self,
        admin: &mut MultiplexedConnection,
        n: u64,
        counts: Option<&mut BTreeMap<String, u64>>,
    ) -> Duration {
        if self.store.is_some() {
            // The last chunk's token lives an hour: primed caches must not adopt it.
            flush(admin).await;
        }
        self.issuer.priming.store(true, Ordering::Relaxed);
        let mut caches = Vec::new();
        for _ in 0..n {
            caches.push(self.primed_cache().await);
        }
        self.issuer.priming.store(false, Ordering::Relaxed);
        tokio::time::sleep(PRIME_LIFETIME + EXPIRY_MARGIN).await;

        if let Some((store, issuer)) = &self.publisher {
            flush(admin).await;
            let other = TokenCache::builder(provider(issuer))
                .store(store.clone())
                .build();
            other
                .token()
                .await
                .expect("the other process publishes a token");
        }
        let before = self.store.as_ref().map(RedisStore::stats);
        if counts.is_some() {
            reset_command_stats(admin).await;
        }

        let mut total = Duration::ZERO;
        for (cache, primed) in &caches {
            if self.flush_each {
                flush(admin).await;
            }
            let provider_calls = cache.stats().token_requests;
            let start = Instant::now();
            let token = cache.token().await;
            total += start.elapsed();
            let token = token.expect("a refreshed token");
            assert_ne!(token.secret(), primed, "{}: no refresh happened", self.name);
            assert_eq!(
                cache.stats().token_requests - provider_calls,
                self.provider_calls_per_refresh(),
                "{}: provider calls in one refresh",
                self.name
            );
            black_box(token);
            // The refresh ran on a task the cache spawned; let it finish, untimed.
            tokio::task::yield_now().await;
        }

        if let Some(counts) = counts {
            for (command, calls) in command_stats(admin).await {
                *counts.entry(command).or_default() += calls;
            }
        }
        if let (Some(store), Some(before)) = (&self.store, before) {
            let after = store.stats();
            let adopting = self.publisher.is_some();
            assert_eq!(
                (
                    after.adopted - before.adopted,
                    after.published - before.published,
                    after.fallbacks - before.fallbacks,
                    after.lock_waits - before.lock_waits,
                ),
                if adopting { (n, 0, 0, 0) } else { (0, n, 0, 0) },
                "{}: (adopted, published, fallbacks, lock waits) in {n} refreshes",
                self.name
            );
        }
        total
    }
}

fn bench_refresh(
    group: &mut BenchmarkGroup<'_, WallTime>,
    runtime: &Runtime,
    admin: &MultiplexedConnection,
    variant: &Variant,
) {
    group.bench_function(variant.name, |b| {
        b.to_async(runtime).iter_custom(|iters| {
            let mut admin = admin.clone();
            async move {
                let mut total = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let n = left.min(CHUNK);
                    total += variant.chunk(&mut admin, n, None).await;
                    left -= n;
                }
                total
            }
        });
    });
}

fn store_refresh(c: &mut Criterion, runtime: &Runtime, server: &RedisServer) {
    let admin = runtime.block_on(admin(server));
    let variants = [
        Variant::local(),
        Variant::publish(server, None),
        Variant::publish(server, Some(EncryptionKey::from_bytes([7; 32]))),
        Variant::adopt(server),
    ];

    let mut group = c.benchmark_group("store_refresh");
    // Each sample primes its caches and waits for their tokens to expire: few, long samples.
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(20);
    for variant in &variants {
        bench_refresh(&mut group, runtime, &admin, variant);
    }
    group.bench_function("redis_ping", |b| {
        b.to_async(runtime).iter_custom(|iters| {
            let mut admin = admin.clone();
            async move {
                let start = Instant::now();
                for _ in 0..iters {
                    let pong: String = redis::cmd("PING")
                        .query_async(&mut admin)
                        .await
                        .expect("PONG");
                    black_box(pong);
                }
                start.elapsed()
            }
        });
    });
    group.finish();

    // The round trips each refresh made, as Redis saw them.
    let mut admin = admin;
    for variant in variants.iter().filter(|variant| variant.store.is_some()) {
        let mut counts = BTreeMap::new();
        runtime.block_on(variant.chunk(&mut admin, COUNTED, Some(&mut counts)));
        let counts = store_commands(counts);
        let per_refresh: Vec<String> = counts
            .iter()
            .map(|(command, calls)| {
                format!(
                    "{} {:.2}",
                    command.to_uppercase(),
                    *calls as f64 / COUNTED as f64
                )
            })
            .collect();
        let total: u64 = counts.values().sum();
        println!(
            "store_refresh/{}: Redis commands per refresh ({COUNTED} refreshes): {} = {:.2} round trips",
            variant.name,
            per_refresh.join(", "),
            total as f64 / COUNTED as f64
        );
    }
    for variant in &variants {
        println!(
            "store_refresh/{}: primed caches whose first refresh failed: {} (last error: {})",
            variant.name,
            variant.priming_failures.load(Ordering::Relaxed),
            variant
                .last_priming_error
                .lock()
                .expect("not poisoned")
                .as_deref()
                .unwrap_or("none")
        );
    }
}

// ---- the hot path -------------------------------------------------------------------------------

fn store_hot_path(c: &mut Criterion, runtime: &Runtime, server: &RedisServer) {
    let mut admin = runtime.block_on(admin(server));
    let issuer = Issuer::new("hot");
    let store = RedisStore::builder(&server.url(), "bench-hot")
        .expect("a store")
        .build();
    let local = AuthLayer::new(provider(&issuer));
    let shared = AuthLayer::builder(provider(&issuer))
        .store(store.clone())
        .build();

    let mut group = c.benchmark_group("store_hot_path");
    for (name, layer) in [("local", &local), ("redis", &shared)] {
        let service = layer.layer(Ok200);
        // The first request fetches the token (through Redis for `redis`); no measured one may.
        runtime.block_on(send(&mut service.clone(), get_request()));
        runtime.block_on(reset_command_stats(&mut admin));
        group.bench_function(name, |b| {
            b.to_async(runtime).iter_custom(|iters| {
                let mut service = service.clone();
                async move {
                    let start = Instant::now();
                    for _ in 0..iters {
                        send(&mut service, get_request()).await;
                    }
                    start.elapsed()
                }
            });
        });
        let commands = store_commands(runtime.block_on(command_stats(&mut admin)));
        println!("store_hot_path/{name}: Redis commands while measuring: {commands:?}");
        assert!(
            commands.is_empty(),
            "the hot path reached Redis: {commands:?}"
        );
        let stats = layer.cache().stats();
        assert_eq!(
            (stats.token_requests, stats.replays),
            (1, 0),
            "{name}: a refresh or a replay happened inside the measured loop"
        );
    }
    group.finish();
    let RedisStats {
        published,
        adopted,
        fallbacks,
        ..
    } = store.stats();
    assert_eq!(
        (published, adopted, fallbacks),
        (1, 0, 0),
        "the RedisStore did more than publish the first token"
    );
}

fn main() {
    let Some(server) = RedisServer::start() else {
        println!(
            "benches/store.rs: skipped, no `redis-server` to run (set REDIS_SERVER to its path, \
             or install it: apt-get install redis-server)"
        );
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    store_refresh(&mut criterion, &runtime, &server);
    store_hot_path(&mut criterion, &runtime, &server);
    criterion.final_summary();
    // The runtime holds the stores' connections: close them before the server goes.
    drop(runtime);
    drop(server);
}
