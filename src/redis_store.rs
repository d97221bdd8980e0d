//! One token for a fleet of processes, shared through Redis (feature `redis`).
//!
//! A batch split over many workers would otherwise make one token request per worker per
//! expiry, and identity providers cap token requests per client. With a [`RedisStore`] under
//! each worker's [`TokenCache`](crate::TokenCache), the fleet makes one:
//!
//! - Requests are still served from each process's memory; Redis is touched only when a cache
//!   needs a new token.
//! - That cache first reads the shared token. If it is newer than the one being replaced, it is
//!   taken and no provider call is made.
//! - Otherwise the process takes a short lock (`SET lock owner NX PX ttl`), looks again, calls
//!   the provider, publishes the token with its expiry as the key's TTL, and releases the lock
//!   with a compare-and-delete script, so it never frees a lock that expired and passed to
//!   someone else. While the provider call runs, the holder renews the lock every third of its
//!   TTL (a compare-and-`PEXPIRE` script, inside the refresh itself, so renewal stops when the
//!   call ends or the refresh is cancelled): a slow identity provider keeps the lock held, and
//!   a holder that dies loses it within one TTL. Processes that find the lock taken poll for
//!   the published token with backoff, for as long as a healthy holder may take (see
//!   [`DEFAULT_WAIT_TIMEOUT`]).
//! - Publishing is one script that checks both who holds the lock and how new the stored token
//!   is: it writes only while this process still holds the lock (or nobody does) and Redis
//!   holds no token issued at the same time or later. So a token never overwrites a newer one
//!   however late its provider answers, and the fleet never goes back to an older token. When
//!   Redis already holds a newer token, the process takes that one instead of its own, so the
//!   fleet stays on one token. When another process has taken the lock over (this one's lock
//!   expired, e.g. while Redis was unreachable), the token is not published: the new holder
//!   sent its request later and will publish a newer token; publishing ours as well would only
//!   split the fleet over two tokens. When the lock is simply gone (expired, nobody took it
//!   over), the token is published if it is newer: nobody else will publish one, and the
//!   waiting processes would otherwise each fetch their own.
//! - A 401 removes the shared token only if Redis still holds the rejected one (compare and
//!   delete), so a late 401 from a slow worker never discards the fleet's fresh token.
//! - When Redis is down or slow, the cache fetches its own token (a `warn` event says so) and
//!   requests never fail because of the store; sharing resumes when Redis answers again.
//!
//! # Threat model
//! Redis then holds a live bearer token: whoever can read the key can call the API as your
//! client until the token expires. Without encryption, whoever can *write* it can also make
//! every worker send a token of their choosing. With an [`EncryptionKey`], values are sealed
//! with XChaCha20-Poly1305 (the key's name and the expiry are authenticated with it), which
//! protects against readers of Redis, its snapshots, backups and replicas who lack the key, and
//! against forged or swapped values (they fail to open and are ignored). It does not protect
//! against a compromised worker, which holds the key and the token anyway, nor against
//! deletion: someone who can delete keys, or write a value claiming a far-future issue time
//! (which no publish then overwrites until its TTL ends), can only make the fleet fetch more
//! tokens. Expiries and issue times are exchanged as wall-clock times, so the workers' clocks
//! must agree to within the refresh skew.
//!
//! # Stored format
//! The token key holds `tar1p <expiry> <issued> <secret>` (plain) or
//! `tar1e <expiry> <issued> <nonce><sealed secret>` (sealed), times in Unix milliseconds, `0`
//! for unknown. Both times stay in plain text so the publish script can compare issue times
//! without the key; sealed, they are authenticated as associated data, so a changed time makes
//! the value fail to open.
//!
//! ```no_run
//! use tower_auth_refresh::redis_store::{EncryptionKey, RedisStore};
//! use tower_auth_refresh::{provider_fn, AuthLayer, Token};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = RedisStore::builder("redis://127.0.0.1:6379/", "contacts-api:client-42")?
//!     .encryption_key(EncryptionKey::from_hex(&std::env::var("TOKEN_KEY")?)?)
//!     .build();
//! let auth = AuthLayer::builder(provider_fn(|| async {
//!     Ok::<_, tower::BoxError>(Token::new("from the identity provider"))
//! }))
//! .store(store)
//! .build();
//! # drop(auth);
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chacha20poly1305::aead::{Aead, Generate, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use futures::future::Either;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::time::Instant;

use crate::store::{FetchToken, RefreshRequest, StoreFuture, TokenStore};
use crate::Token;

/// Default lifetime of the lock a process holds while it fetches the fleet's token. The holder
/// renews it every third of this while its provider call runs, so this bounds how long a dead
/// holder blocks the others, not how long a provider may take.
pub const DEFAULT_LOCK_TTL: Duration = Duration::from_secs(10);
/// Default longest wait for another process's token before fetching one locally: the cache's
/// default refresh timeout ([`DEFAULT_REFRESH_TIMEOUT`](crate::cache::DEFAULT_REFRESH_TIMEOUT),
/// the longest a healthy holder's provider call can take) plus one [`DEFAULT_LOCK_TTL`] (how
/// long a cancelled holder's lock outlives it if Redis missed its release).
///
/// A waiter never fetches while a healthy holder may still deliver: with the defaults, its own
/// refresh timeout ends the wait first. A dead holder stops renewing the lock, and the waiters
/// take over within one lock TTL, well before this.
pub const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(
    crate::cache::DEFAULT_REFRESH_TIMEOUT.as_secs() + DEFAULT_LOCK_TTL.as_secs(),
);
/// Default bound on one Redis command; past it, Redis counts as down for this refresh.
pub const DEFAULT_OPERATION_TIMEOUT: Duration = Duration::from_secs(1);
/// Default time a token without a known expiry stays shared (until a 401 removes it first).
pub const DEFAULT_MAX_TOKEN_TTL: Duration = Duration::from_secs(60 * 60);

const FIRST_POLL: Duration = Duration::from_millis(10);
const LONGEST_POLL: Duration = Duration::from_millis(200);
const PLAIN_TAG: &[u8] = b"tar1p";
const SEALED_TAG: &[u8] = b"tar1e";
const NONCE_LEN: usize = 24;

/// Deletes `KEYS[1]` only if it still holds `ARGV[1]`: releases a lock only for its owner, and
/// removes a rejected token only if nobody replaced it meanwhile.
const COMPARE_AND_DELETE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
";

/// Extends the lock `KEYS[1]` to `ARGV[2]` ms only while `ARGV[1]` holds it: a holder renews
/// its own lock, never one that expired and passed to someone else.
const RENEW_LOCK: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// Publishes `ARGV[2]` as the token `KEYS[1]` for `ARGV[3]` ms, issued at `ARGV[4]` (Unix ms),
/// by the owner `ARGV[1]` of the lock `KEYS[2]`. Answers `{1}` when stored, `{-1}` when another
/// process holds the lock, `{0, stored}` when Redis holds a token issued at the same time or
/// later (a stored value without a readable issue time counts as older). Checked and written in
/// one step, so no other publish slips in between.
const PUBLISH: &str = r"
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then
    return {-1, false}
end
local stored = redis.call('GET', KEYS[1])
if stored then
    local issued = string.match(stored, '^tar1[pe] %d+ (%d+) ')
    if issued and tonumber(issued) >= tonumber(ARGV[4]) then
        return {0, stored}
    end
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return {1, false}
";

/// A [`TokenStore`] that shares one token among every process using the same Redis namespace.
///
/// Cheap to clone; clones share one connection. See the [module docs](self) for the protocol
/// and the threat model.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    config: ConnectionManagerConfig,
    /// Made on first use, inside the runtime; it reconnects by itself afterwards.
    connection: tokio::sync::OnceCell<ConnectionManager>,
    namespace: String,
    token_key: String,
    lock_key: String,
    lock_ttl: Duration,
    wait_timeout: Duration,
    operation_timeout: Duration,
    max_token_ttl: Duration,
    cipher: Option<XChaCha20Poly1305>,
    compare_and_delete: redis::Script,
    renew_lock: redis::Script,
    publish: redis::Script,
    stats: Counters,
}

#[derive(Default)]
struct Counters {
    adopted: AtomicU64,
    published: AtomicU64,
    not_published: AtomicU64,
    lock_waits: AtomicU64,
    withdrawn: AtomicU64,
    fallbacks: AtomicU64,
}

/// What a [`RedisStore`] has done, for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisStats {
    /// Tokens taken from Redis instead of calling the provider.
    pub adopted: u64,
    /// Tokens this process fetched and published for the others.
    pub published: u64,
    /// Tokens this process fetched but did not publish: Redis already held a newer one (which
    /// this process then took instead), or another process had taken the lock over.
    pub not_published: u64,
    /// Refreshes that found another process holding the lock and waited for its token.
    pub lock_waits: u64,
    /// Rejected tokens removed from Redis after a 401.
    pub withdrawn: u64,
    /// Refreshes that fell back to a local provider call because Redis failed or was too slow.
    pub fallbacks: u64,
}

/// A 256-bit key that seals tokens at rest in Redis. Its `Debug` output is redacted.
#[derive(Clone)]
pub struct EncryptionKey([u8; 32]);

impl EncryptionKey {
    /// A key from its 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// A key from 64 hexadecimal digits, as `openssl rand -hex 32` prints one.
    pub fn from_hex(hex: &str) -> Result<Self, RedisStoreError> {
        let hex = hex.trim().as_bytes();
        let mut bytes = [0_u8; 32];
        if hex.len() != 64 {
            return Err(RedisStoreError::new(
                "an encryption key is 64 hexadecimal digits",
            ));
        }
        for (byte, pair) in bytes.iter_mut().zip(hex.chunks_exact(2)) {
            let digit = |c: u8| (c as char).to_digit(16);
            match (digit(pair[0]), digit(pair[1])) {
                (Some(high), Some(low)) => *byte = (high * 16 + low) as u8,
                _ => {
                    return Err(RedisStoreError::new(
                        "an encryption key is 64 hexadecimal digits",
                    ))
                }
            }
        }
        Ok(Self(bytes))
    }
}

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EncryptionKey(<redacted>)")
    }
}

/// A [`RedisStore`] could not be configured: a malformed URL or key.
#[derive(Clone, Debug)]
pub struct RedisStoreError {
    message: String,
}

impl RedisStoreError {
    fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }
}

impl fmt::Display for RedisStoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RedisStoreError {}

/// Options of a [`RedisStore`], with documented defaults.
pub struct RedisStoreBuilder {
    client: redis::Client,
    namespace: String,
    lock_ttl: Duration,
    wait_timeout: Duration,
    operation_timeout: Duration,
    max_token_ttl: Duration,
    key: Option<EncryptionKey>,
}

impl RedisStore {
    /// Options for a store on the Redis at `url` (`redis://host:port/db`, with a password as
    /// `redis://:password@host/`), sharing one token among every process that uses the same
    /// `namespace`. Give each client id its own namespace: processes of different clients must
    /// not share tokens.
    pub fn builder(url: &str, namespace: &str) -> Result<RedisStoreBuilder, RedisStoreError> {
        let client = redis::Client::open(url).map_err(|error| {
            RedisStoreError::new(format!("not a Redis URL: {}", error.category()))
        })?;
        if namespace.is_empty() {
            return Err(RedisStoreError::new("the namespace must not be empty"));
        }
        Ok(RedisStoreBuilder {
            client,
            namespace: namespace.to_owned(),
            lock_ttl: DEFAULT_LOCK_TTL,
            wait_timeout: DEFAULT_WAIT_TIMEOUT,
            operation_timeout: DEFAULT_OPERATION_TIMEOUT,
            max_token_ttl: DEFAULT_MAX_TOKEN_TTL,
            key: None,
        })
    }

    /// What this store has done so far.
    pub fn stats(&self) -> RedisStats {
        let c = &self.inner.stats;
        RedisStats {
            adopted: c.adopted.load(Ordering::Relaxed),
            published: c.published.load(Ordering::Relaxed),
            not_published: c.not_published.load(Ordering::Relaxed),
            lock_waits: c.lock_waits.load(Ordering::Relaxed),
            withdrawn: c.withdrawn.load(Ordering::Relaxed),
            fallbacks: c.fallbacks.load(Ordering::Relaxed),
        }
    }
}

impl RedisStoreBuilder {
    /// How long the lock lives that a process takes while it fetches the fleet's token. The
    /// holder renews it every third of this while its provider call runs, so a slow provider
    /// does not lose it; if the holder dies, another process takes over after at most this
    /// long. Keep it well above a Redis round trip. Default: 10 seconds.
    pub fn lock_ttl(mut self, ttl: Duration) -> Self {
        self.lock_ttl = ttl;
        self
    }

    /// How long a process waits for the token another process is fetching before it fetches
    /// its own. Keep it above the cache's refresh timeout plus the lock TTL: a waiter that gives
    /// up while the holder's provider call is still running makes a second token request, the
    /// very thing this store prevents. Default: [`DEFAULT_WAIT_TIMEOUT`], 40 seconds (the
    /// default refresh timeout of 30 seconds plus the default lock TTL).
    pub fn wait_timeout(mut self, wait: Duration) -> Self {
        self.wait_timeout = wait;
        self
    }

    /// The bound on one Redis command (and on connecting). A Redis that does not answer in time
    /// counts as down: the process fetches its own token. Default: 1 second.
    pub fn operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    /// How long a token whose expiry is unknown stays in Redis, unless a 401 removes it first.
    /// Default: 1 hour.
    pub fn max_token_ttl(mut self, ttl: Duration) -> Self {
        self.max_token_ttl = ttl;
        self
    }

    /// Seal tokens at rest with this key (every process of the fleet needs the same one).
    /// Default: none, tokens are stored as they are. See the threat model in the
    /// [module docs](self).
    pub fn encryption_key(mut self, key: EncryptionKey) -> Self {
        self.key = Some(key);
        self
    }

    /// Build the store. It connects on first use, so building never waits for Redis, and a
    /// Redis that is down at start only means local refreshes until it is up.
    pub fn build(self) -> RedisStore {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.operation_timeout))
            .set_response_timeout(Some(self.operation_timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(self.operation_timeout);
        let cipher = self.key.map(|key| XChaCha20Poly1305::new((&key.0).into()));
        let prefix = format!("tower-auth-refresh:{}", self.namespace);
        RedisStore {
            inner: Arc::new(Inner {
                client: self.client,
                config,
                connection: tokio::sync::OnceCell::new(),
                token_key: format!("{prefix}:token"),
                lock_key: format!("{prefix}:lock"),
                namespace: self.namespace,
                lock_ttl: self.lock_ttl,
                wait_timeout: self.wait_timeout,
                operation_timeout: self.operation_timeout,
                max_token_ttl: self.max_token_ttl,
                cipher,
                compare_and_delete: redis::Script::new(COMPARE_AND_DELETE),
                renew_lock: redis::Script::new(RENEW_LOCK),
                publish: redis::Script::new(PUBLISH),
                stats: Counters::default(),
            }),
        }
    }
}

impl fmt::Debug for RedisStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The client's connection info may carry a password: not shown.
        f.debug_struct("RedisStoreBuilder")
            .field("namespace", &self.namespace)
            .field("lock_ttl", &self.lock_ttl)
            .field("wait_timeout", &self.wait_timeout)
            .field("operation_timeout", &self.operation_timeout)
            .field("max_token_ttl", &self.max_token_ttl)
            .field("encrypted", &self.key.is_some())
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &self.inner;
        f.debug_struct("RedisStore")
            .field("namespace", &inner.namespace)
            .field("lock_ttl", &inner.lock_ttl)
            .field("wait_timeout", &inner.wait_timeout)
            .field("operation_timeout", &inner.operation_timeout)
            .field("max_token_ttl", &inner.max_token_ttl)
            .field("encrypted", &inner.cipher.is_some())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl TokenStore for RedisStore {
    fn refresh(&self, request: RefreshRequest, fetch: FetchToken) -> StoreFuture {
        let inner = self.inner.clone();
        Box::pin(async move { inner.refresh(request, fetch).await })
    }
}

/// A token as read from Redis, with the exact value it was stored as.
struct Shared {
    token: Token,
    raw: Vec<u8>,
}

/// Why Redis could not help this time. Never reaches a request: the process fetches its own.
#[derive(Debug)]
enum Unavailable {
    Redis(redis::RedisError),
    TimedOut,
    WaitedTooLong,
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Redis(error) => write!(f, "Redis failed: {}", error.category()),
            Self::TimedOut => f.write_str("Redis did not answer in time"),
            Self::WaitedTooLong => {
                f.write_str("another process held the refresh lock for too long")
            }
        }
    }
}

/// What the shared refresh came to.
enum Outcome {
    /// Another process's token.
    Adopted(Token),
    /// This process called the provider (whatever it answered).
    Fetched(Result<Token, tower::BoxError>),
}

/// Whether `request` may be satisfied by `shared`, a token another process published. Never for a
/// refresh that asks for a scope or claims: the shared token lacks them. Such a refresh still
/// publishes what it fetched, which is the fleet's token from then on.
fn adoptable(request: &RefreshRequest, shared: &Token, now: Instant) -> bool {
    request.token_request().is_default() && request.accepts(shared, now)
}

impl Inner {
    async fn refresh(
        self: &Arc<Self>,
        request: RefreshRequest,
        fetch: FetchToken,
    ) -> Result<Token, tower::BoxError> {
        match self.shared_refresh(&request, &fetch).await {
            Ok(Outcome::Adopted(token)) => {
                self.stats.adopted.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(namespace = %self.namespace, "took the fleet's shared token");
                Ok(token)
            }
            Ok(Outcome::Fetched(result)) => result,
            Err(unavailable) => {
                self.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    namespace = %self.namespace,
                    reason = %unavailable,
                    "shared token store unavailable; fetching a token for this process only"
                );
                fetch.fetch().await
            }
        }
    }

    async fn shared_refresh(
        self: &Arc<Self>,
        request: &RefreshRequest,
        fetch: &FetchToken,
    ) -> Result<Outcome, Unavailable> {
        let deadline = Instant::now() + self.wait_timeout;
        if let Some(shared) = self.read().await? {
            if adoptable(request, &shared.token, Instant::now()) {
                return Ok(Outcome::Adopted(shared.token));
            }
            let still_rejected = request
                .replacing()
                .is_some_and(|old| old.secret() == shared.token.secret());
            if request.rejected() && still_rejected {
                // Still the token the API refused: nobody else should take it either.
                let removed: i64 = self
                    .compare_and_delete(&self.token_key, &shared.raw)
                    .await?;
                if removed > 0 {
                    self.stats.withdrawn.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(namespace = %self.namespace, "withdrew the rejected shared token");
                }
            }
        }

        let owner = lock_owner();
        let mut poll = FIRST_POLL;
        let mut waited = false;
        loop {
            if self.try_lock(&owner).await? {
                let lock = HeldLock {
                    inner: self.clone(),
                    owner,
                    released: false,
                };
                return Ok(self.fetch_and_publish(request, fetch, lock).await);
            }
            if !waited {
                waited = true;
                self.stats.lock_waits.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(namespace = %self.namespace, "another process is fetching the token; waiting for it");
            }
            if Instant::now() >= deadline {
                return Err(Unavailable::WaitedTooLong);
            }
            tokio::time::sleep(poll).await;
            poll = (poll * 2).min(LONGEST_POLL);
            if let Some(shared) = self.read().await? {
                if adoptable(request, &shared.token, Instant::now()) {
                    return Ok(Outcome::Adopted(shared.token));
                }
            }
        }
    }

    /// Holding the lock: look once more, then fetch (renewing the lock meanwhile) and publish.
    /// Past the provider call, a Redis failure no longer matters to this process: it has its
    /// token.
    async fn fetch_and_publish(
        &self,
        request: &RefreshRequest,
        fetch: &FetchToken,
        lock: HeldLock,
    ) -> Outcome {
        let outcome = match self.read().await {
            Ok(Some(shared)) if adoptable(request, &shared.token, Instant::now()) => {
                Outcome::Adopted(shared.token)
            }
            _ => match self.fetch_holding(fetch, &lock.owner).await {
                Ok(token) => self.share(request, token, &lock.owner).await,
                Err(error) => Outcome::Fetched(Err(error)),
            },
        };
        lock.release().await;
        outcome
    }

    /// Frees the lock if `owner` still holds it.
    async fn release_lock(&self, owner: &str) {
        if let Err(error) = self
            .compare_and_delete(&self.lock_key, owner.as_bytes())
            .await
        {
            tracing::debug!(namespace = %self.namespace, reason = %error, "lock not released; it expires by itself");
        }
    }

    /// The provider call, with the lock renewed until it ends. Both run inside this future, so
    /// nothing renews a lock after the refresh is over or cancelled.
    async fn fetch_holding(
        &self,
        fetch: &FetchToken,
        owner: &str,
    ) -> Result<Token, tower::BoxError> {
        let fetching = std::pin::pin!(fetch.fetch());
        let renewing = std::pin::pin!(self.keep_lock(owner));
        match futures::future::select(fetching, renewing).await {
            Either::Left((result, _renewing)) => result,
            Either::Right(((), fetching)) => fetching.await,
        }
    }

    /// Renews the lock every third of its TTL; returns once it is lost, never otherwise. A
    /// failed renewal is retried on the next tick: the lock may well still be held.
    async fn keep_lock(&self, owner: &str) {
        let every = (self.lock_ttl / 3).max(Duration::from_millis(1));
        loop {
            tokio::time::sleep(every).await;
            let mut renew = self.renew_lock.key(&self.lock_key);
            renew.arg(owner).arg(millis(self.lock_ttl));
            match self.invoke::<i64>(&renew).await {
                Ok(1) => {}
                Ok(_) => {
                    tracing::warn!(
                        namespace = %self.namespace,
                        "lost the refresh lock while the provider was answering; \
                         another process may fetch a token too"
                    );
                    return;
                }
                Err(error) => tracing::debug!(
                    namespace = %self.namespace,
                    reason = %error,
                    "could not renew the refresh lock; trying again"
                ),
            }
        }
    }

    /// Publish a token this process fetched, unless Redis already holds a newer one (then take
    /// that one) or the lock passed to another process.
    async fn share(&self, request: &RefreshRequest, token: Token, owner: &str) -> Outcome {
        match self.publish(&token, owner).await {
            Ok(Published::Stored) => {
                self.stats.published.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(namespace = %self.namespace, "published a new shared token");
            }
            Ok(Published::Expired) => {}
            Ok(Published::Newer(raw)) => {
                self.stats.not_published.fetch_add(1, Ordering::Relaxed);
                if let Some(newer) = self.decode(&raw) {
                    if adoptable(request, &newer, Instant::now()) {
                        tracing::debug!(
                            namespace = %self.namespace,
                            "another process published a newer token; using it instead"
                        );
                        return Outcome::Adopted(newer);
                    }
                }
            }
            Ok(Published::LockTaken) => {
                self.stats.not_published.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    namespace = %self.namespace,
                    "another process took the refresh lock over; not publishing this token"
                );
            }
            Err(error) => tracing::warn!(
                namespace = %self.namespace,
                reason = %error,
                "could not publish the new token; other processes will fetch their own"
            ),
        }
        Outcome::Fetched(Ok(token))
    }

    async fn read(&self) -> Result<Option<Shared>, Unavailable> {
        let raw: Option<Vec<u8>> = self.run(redis::cmd("GET").arg(&self.token_key)).await?;
        Ok(raw.and_then(|raw| match self.decode(&raw) {
            Some(token) => Some(Shared { token, raw }),
            None => {
                tracing::warn!(
                    namespace = %self.namespace,
                    "ignoring a shared token that cannot be read (wrong key, or not written by this crate)"
                );
                None
            }
        }))
    }

    async fn try_lock(&self, owner: &str) -> Result<bool, Unavailable> {
        let set: Option<String> = self
            .run(
                redis::cmd("SET")
                    .arg(&self.lock_key)
                    .arg(owner)
                    .arg("NX")
                    .arg("PX")
                    .arg(millis(self.lock_ttl)),
            )
            .await?;
        Ok(set.is_some())
    }

    async fn publish(&self, token: &Token, owner: &str) -> Result<Published, Unavailable> {
        let ttl = match token.expires_at() {
            Some(at) => at.saturating_duration_since(Instant::now()),
            None => self.max_token_ttl,
        };
        if ttl.is_zero() {
            return Ok(Published::Expired);
        }
        let times = Times::of(token);
        let mut publish = self.publish.key(&self.token_key);
        publish
            .key(&self.lock_key)
            .arg(owner)
            .arg(self.encode_with(token, times))
            .arg(millis(ttl))
            .arg(times.issued_ms);
        let (status, stored): (i64, Option<Vec<u8>>) = self.invoke(&publish).await?;
        Ok(match status {
            1 => Published::Stored,
            0 => Published::Newer(stored.unwrap_or_default()),
            _ => Published::LockTaken,
        })
    }

    async fn compare_and_delete(&self, key: &str, expected: &[u8]) -> Result<i64, Unavailable> {
        let mut invocation = self.compare_and_delete.key(key);
        invocation.arg(expected);
        self.invoke(&invocation).await
    }

    async fn invoke<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, Unavailable> {
        let mut connection = self.connection().await?;
        match tokio::time::timeout(
            self.operation_timeout,
            invocation.invoke_async(&mut connection),
        )
        .await
        {
            Ok(result) => result.map_err(Unavailable::Redis),
            Err(_elapsed) => Err(Unavailable::TimedOut),
        }
    }

    async fn run<T: redis::FromRedisValue>(&self, command: &redis::Cmd) -> Result<T, Unavailable> {
        let mut connection = self.connection().await?;
        match tokio::time::timeout(self.operation_timeout, command.query_async(&mut connection))
            .await
        {
            Ok(result) => result.map_err(Unavailable::Redis),
            Err(_elapsed) => Err(Unavailable::TimedOut),
        }
    }

    async fn connection(&self) -> Result<ConnectionManager, Unavailable> {
        self.connection
            .get_or_try_init(|| async {
                ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone())
            })
            .await
            .cloned()
            .map_err(Unavailable::Redis)
    }

    /// `tar1p <expiry> <issued> <secret>` or `tar1e <expiry> <issued> <nonce><sealed secret>`,
    /// times in Unix milliseconds, 0 for unknown. Sealed, the key's name and both times are
    /// authenticated with the secret. The issue time stays readable: the publish script
    /// compares it.
    #[cfg(test)]
    fn encode(&self, token: &Token) -> Vec<u8> {
        self.encode_with(token, Times::of(token))
    }

    fn encode_with(&self, token: &Token, times: Times) -> Vec<u8> {
        let times = format!("{} {}", times.expiry_ms, times.issued_ms);
        let body = match &self.cipher {
            None => token.secret().as_bytes().to_vec(),
            Some(cipher) => {
                let nonce = XNonce::generate();
                let payload = Payload {
                    msg: token.secret().as_bytes(),
                    aad: &self.associated_data(&times),
                };
                let Ok(sealed) = cipher.encrypt(&nonce, payload) else {
                    return Vec::new(); // cannot happen for a token-sized message
                };
                [&nonce[..], &sealed].concat()
            }
        };
        let tag = if self.cipher.is_some() {
            SEALED_TAG
        } else {
            PLAIN_TAG
        };
        [tag, b" ", times.as_bytes(), b" ", &body].concat()
    }

    fn decode(&self, raw: &[u8]) -> Option<Token> {
        let mut parts = raw.splitn(4, |byte| *byte == b' ');
        let (tag, expiry, issued, body) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let millis = |field: &[u8]| std::str::from_utf8(field).ok()?.parse::<u64>().ok();
        let (expiry_ms, issued_ms) = (millis(expiry)?, millis(issued)?);
        let secret = match (tag, &self.cipher) {
            (PLAIN_TAG, None) => String::from_utf8(body.to_vec()).ok()?,
            (SEALED_TAG, Some(cipher)) => {
                if body.len() < NONCE_LEN {
                    return None;
                }
                let (nonce, sealed) = body.split_at(NONCE_LEN);
                let nonce = XNonce::try_from(nonce).ok()?;
                let payload = Payload {
                    msg: sealed,
                    aad: &self.associated_data(&format!("{expiry_ms} {issued_ms}")),
                };
                String::from_utf8(cipher.decrypt(&nonce, payload).ok()?).ok()?
            }
            // A plain value when we expect a sealed one (or the reverse) is not trusted.
            _ => return None,
        };
        if secret.is_empty() {
            return None;
        }
        let mut token = Token::new(secret);
        if expiry_ms != 0 {
            token = token.with_expires_at(instant_from_wall_clock_millis(expiry_ms));
        }
        if issued_ms != 0 {
            token = token.with_issued_at(instant_from_wall_clock_millis(issued_ms));
        }
        Some(token)
    }

    fn associated_data(&self, times: &str) -> Vec<u8> {
        format!("{}\n{}", self.token_key, times).into_bytes()
    }
}

/// What publishing came to.
enum Published {
    /// Stored for the fleet.
    Stored,
    /// Not stored: the token has already expired.
    Expired,
    /// Not stored: Redis holds a token issued at the same time or later (this value).
    Newer(Vec<u8>),
    /// Not stored: another process took the lock over.
    LockTaken,
}

/// A token's expiry and issue time in Unix milliseconds, 0 for unknown: taken once, so the
/// stored value and the issue time the publish script compares are the same.
#[derive(Clone, Copy)]
struct Times {
    expiry_ms: u64,
    issued_ms: u64,
}

impl Times {
    fn of(token: &Token) -> Self {
        Self {
            expiry_ms: token.expires_at().map_or(0, wall_clock_millis),
            issued_ms: token.issued_at().map_or(0, wall_clock_millis),
        }
    }
}

/// The refresh lock while this process holds it. Released on the way out; if the refresh is
/// dropped first (the cache's refresh timeout cancelled it), released by a task of its own,
/// one Redis command bounded by the operation timeout, so waiters need not wait for the lock's
/// TTL to run out.
struct HeldLock {
    inner: Arc<Inner>,
    owner: String,
    released: bool,
}

impl HeldLock {
    async fn release(mut self) {
        self.released = true;
        self.inner.release_lock(&self.owner).await;
    }
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // no runtime: the lock expires by its TTL
        };
        let (inner, owner) = (self.inner.clone(), std::mem::take(&mut self.owner));
        runtime.spawn(async move { inner.release_lock(&owner).await });
    }
}

/// A lock owner nobody else can have: process id, the time and a counter.
fn lock_owner() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos());
    format!(
        "{}-{}-{}",
        std::process::id(),
        nanos,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

fn wall_clock_millis(at: Instant) -> u64 {
    let now = Instant::now();
    let wall = if at >= now {
        SystemTime::now().checked_add(at - now)
    } else {
        SystemTime::now().checked_sub(now - at)
    };
    wall.and_then(|wall| wall.duration_since(UNIX_EPOCH).ok())
        .map_or(1, millis)
}

fn instant_from_wall_clock_millis(ms: u64) -> Instant {
    let at = UNIX_EPOCH + Duration::from_millis(ms);
    let now_wall = SystemTime::now();
    let now = Instant::now();
    match at.duration_since(now_wall) {
        Ok(ahead) => now.checked_add(ahead).unwrap_or(now),
        Err(behind) => now.checked_sub(behind.duration()).unwrap_or(now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(key: Option<EncryptionKey>) -> RedisStore {
        let builder = RedisStore::builder("redis://127.0.0.1:1/", "unit").unwrap();
        match key {
            Some(key) => builder.encryption_key(key),
            None => builder,
        }
        .build()
    }

    #[test]
    fn builds_outside_a_runtime_without_connecting() {
        let store = store(None);
        assert_eq!(store.stats(), RedisStats::default());
    }

    #[tokio::test]
    async fn values_round_trip_plain_and_sealed() {
        for key in [None, Some(EncryptionKey::from_bytes([7; 32]))] {
            let store = store(key);
            let token = Token::new("s3cr3t token").with_expires_in(Duration::from_secs(60));
            let raw = store.inner.encode(&token);
            assert!(!raw.is_empty());
            let back = store.inner.decode(&raw).unwrap();
            assert_eq!(back.secret(), "s3cr3t token");
            let drift = back
                .expires_at()
                .unwrap()
                .saturating_duration_since(token.expires_at().unwrap())
                + token
                    .expires_at()
                    .unwrap()
                    .saturating_duration_since(back.expires_at().unwrap());
            assert!(drift < Duration::from_millis(50), "{drift:?}");
        }
    }

    #[tokio::test]
    async fn sealed_values_hide_the_token_and_refuse_tampering() {
        let store = store(Some(EncryptionKey::from_bytes([7; 32])));
        let raw = store.inner.encode(&Token::new("s3cr3t"));
        assert!(!raw.windows(6).any(|w| w == b"s3cr3t"));
        // Another expiry, another key, a flipped bit, a plain value: all refused.
        let mut later = raw.clone();
        later[6] = b'9';
        assert!(store.inner.decode(&later).is_none());
        let other = self::store(Some(EncryptionKey::from_bytes([8; 32])));
        assert!(other.inner.decode(&raw).is_none());
        let mut flipped = raw.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(store.inner.decode(&flipped).is_none());
        assert!(store.inner.decode(b"tar1p 0 0 forged").is_none());
        assert!(self::store(None).inner.decode(&raw).is_none());
    }

    #[test]
    fn garbage_values_are_ignored() {
        let store = store(None);
        for raw in [
            &b""[..],
            b"tar1p",
            b"tar1p x y",
            b"tar1p 0 ",
            b"other 0 t",
            b"\xff\xfe",
        ] {
            assert!(store.inner.decode(raw).is_none(), "{raw:?}");
        }
    }

    #[test]
    fn keys_parse_from_hex_and_stay_secret() {
        let key = EncryptionKey::from_hex(&"ab".repeat(32)).unwrap();
        assert_eq!(key.0, [0xab; 32]);
        assert_eq!(format!("{key:?}"), "EncryptionKey(<redacted>)");
        assert!(EncryptionKey::from_hex("abc").is_err());
        assert!(EncryptionKey::from_hex(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn bad_configuration_is_a_typed_error() {
        assert!(RedisStore::builder("not a url", "ns").is_err());
        assert!(RedisStore::builder("redis://127.0.0.1/", "").is_err());
        let debug = format!(
            "{:?}",
            RedisStore::builder("redis://:hunter2@127.0.0.1/", "ns").unwrap()
        );
        assert!(!debug.contains("hunter2"), "{debug}");
    }
}
