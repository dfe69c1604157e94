//! In-memory caches of what API requests read on every call: a customer's
//! entitlements (by external id) and API keys (by digest), kept exact
//! across instances (SPEC 6: a check is answered from memory).
//!
//! # How an entry is never served after the change that invalidated it
//!
//! * One choke point: a transaction that changes what a cached entry says
//!   (a customer's entitlements, which customer an external id names, an
//!   API key's revocation) names the entry's key on its [`Tx`](super::Tx).
//!   `Tx::commit` then, around its `COMMIT`:
//!   1. pins the keys in this process: while pinned nothing is served or
//!      stored for them, so no local reader sees the old value between the
//!      commit and the invalidation;
//!   2. on PostgreSQL, sends `pg_notify` inside the transaction, so the
//!      notification exists exactly when the commit does (and is ordered
//!      with every other commit's);
//!   3. commits, drops and unpins the keys;
//!   4. on PostgreSQL, waits until every other instance has acknowledged
//!      the invalidation, or until a lease has run out (see below). Only
//!      then does the write return: an API response, or the wake-up of
//!      this process's delivery worker.
//! * Fills cannot resurrect old data: a reader takes a ticket (its shard's
//!   generation) before it reads the database, and its result is stored
//!   only if no invalidation, pin or reset touched the shard meanwhile.
//! * Every instance listens on a dedicated connection. It may serve from
//!   its cache only while it holds a lease: it sends itself a ping through
//!   the database every [`PING_EVERY`], and a ping sent at `s` and heard
//!   back lets it serve until `s + LEASE`. PostgreSQL delivers notifications
//!   in commit order, so hearing a ping sent after a writer's commit means
//!   the writer's invalidation was heard first. A writer waits for the
//!   acknowledgement of every peer that is listening (`pg_stat_activity`)
//!   or pinged lately, at most `LEASE` and a margin: a peer that has not
//!   answered by then has lost its lease and is reading the database.
//! * A lost listener connection revokes the lease and clears everything;
//!   the cache is bypassed (reads go to the database) until a new listener
//!   is subscribed, after which the cache is cleared once more, because
//!   notifications sent while nobody listened are lost.
//!
//! On SQLite there is one serving process; its own writes are invalidated
//! through the same `Tx` hook. Another process writing the same file (the
//! CLI: `api-key revoke`, `events replay`) is noticed by polling
//! `PRAGMA data_version`, which clears the caches: such writes are seen
//! within one poll ([`SQLITE_POLL`]); a stalled poller stops serving after
//! the lease. It is polled on the writer's connection, every write of this
//! process's being made there: `data_version` changes with the commits of
//! other connections only, so the server's own writes (invalidated key by
//! key) do not clear everything at the next poll.
//!
//! Redis is not used for invalidation: a publish cannot be part of the
//! database transaction, so a crash between commit and publish would lose
//! it, and SQLite deployments run one instance anyway.
//!
//! Why not `moka`: the fill-versus-invalidation rule above needs the
//! generation check and the insert under one lock that invalidations also
//! take; `moka` offers no such hook and would add a dozen crates to the
//! build. `hashlink`'s ordered map is already compiled for sqlx; a few
//! lock-guarded shards of it are the whole cache.
//!
//! Hits only read: a shard is a read-write lock, and a hit takes it shared
//! and sets the entry's "referenced" bit, where an LRU moved the entry to
//! the back of its list under an exclusive lock (a write to shared memory
//! by each of the two server threads on every check, the same entries every
//! time under load). Eviction is the clock (second-chance) approximation of
//! LRU: a full shard drops the oldest insertion that has not been hit since
//! it was last passed over.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use hashlink::LinkedHashMap;
use sqlx::postgres::PgListener;
use sqlx::{PgPool, SqlitePool};
use tokio_util::sync::CancellationToken;

use super::api_keys::ApiKeyRecord;
use super::entitlements::StoredEntitlements;
use super::{Backend, Store};

/// The PostgreSQL notification channel.
pub const CHANNEL: &str = "tollgate_cache";
/// How long a heard ping lets an instance serve from its cache.
pub const LEASE: Duration = Duration::from_millis(1000);
/// How often an instance pings itself (a few per lease, so one slow ping
/// does not interrupt serving).
pub const PING_EVERY: Duration = Duration::from_millis(200);
/// How often the SQLite poller reads `PRAGMA data_version`.
pub const SQLITE_POLL: Duration = Duration::from_millis(100);
/// How long a poll lets the SQLite server serve from its cache.
pub const SQLITE_LEASE: Duration = Duration::from_millis(250);
/// The listener connection's `application_name` is this and the instance
/// id, so writers find their peers in `pg_stat_activity`.
const LISTENER_NAME: &str = "tollgate-cache:";
/// PostgreSQL refuses payloads of 8000 bytes or more; beyond this, one
/// notification says "clear everything".
const MAX_PAYLOAD: usize = 7800;
const SHARDS: usize = 16;

/// A customer's entitlements as the API serves them, with the internal id
/// of the customer the external id named when it was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerEntitlements {
    pub customer_id: String,
    pub stored: StoredEntitlements,
}

/// What a transaction changes, as cache keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheKey {
    /// The customer an external id names, and its entitlements.
    Customer(String),
    /// An API key, by digest.
    ApiKey(String),
}

impl CacheKey {
    pub(crate) fn encode(&self) -> String {
        match self {
            CacheKey::Customer(external) => Self::customer(external),
            CacheKey::ApiKey(digest) => Self::api_key(digest),
        }
    }

    fn customer(external: &str) -> String {
        Self::prefixed(CUSTOMER_PREFIX, external)
    }

    fn api_key(digest: &str) -> String {
        Self::prefixed(API_KEY_PREFIX, digest)
    }

    fn prefixed(prefix: &str, id: &str) -> String {
        let mut key = String::with_capacity(prefix.len() + id.len());
        key.push_str(prefix);
        key.push_str(id);
        key
    }
}

/// The encodings' prefixes: an encoded key (a transaction's, or one heard
/// from a peer) names its cache by them. Within a cache, entries are keyed
/// by the id alone, so a lookup need not build the encoded key.
const CUSTOMER_PREFIX: &str = "c:";
const API_KEY_PREFIX: &str = "k:";

/// An encoded key, as the cache it names and the key within that cache.
enum Named<'a> {
    Customer(&'a str),
    ApiKey(&'a str),
    /// Not an encoding this version makes (a newer peer's, say): which
    /// entry it names is unknown, so everything goes.
    Unknown,
}

/// What a commit does to an entry (see the module docs).
#[derive(Clone, Copy)]
enum Change {
    Invalidate,
    Pin,
    Unpin,
}

fn named(encoded: &str) -> Named<'_> {
    match (encoded.strip_prefix(CUSTOMER_PREFIX), encoded.strip_prefix(API_KEY_PREFIX)) {
        (Some(external), _) => Named::Customer(external),
        (None, Some(digest)) => Named::ApiKey(digest),
        (None, None) => Named::Unknown,
    }
}

/// Proof that a reader looked before reading the database: the shard's
/// generation at the time.
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    shard: usize,
    generation: u64,
}

pub enum Lookup<V> {
    Hit(Arc<V>),
    Miss(Ticket),
}

struct Entry<V> {
    value: Arc<V>,
    /// Hit since eviction last passed over it (the clock's bit).
    referenced: AtomicBool,
}

struct Shard<V> {
    /// In insertion order: the clock hand is the front. Hashed with the
    /// cache's hasher, so that a lookup hashes its key once, for the shard
    /// and the map.
    entries: LinkedHashMap<String, Entry<V>, RandomState>,
    capacity: usize,
    /// Bumped by every invalidation, pin, unpin and reset in the shard.
    generation: u64,
    /// Keys whose change is being committed: neither served nor stored.
    pinned: HashMap<String, u32>,
}

impl<V> Shard<V> {
    /// Makes room for one more entry: the oldest entry not hit since the
    /// hand last passed goes; a hit one gets a second chance at the back.
    fn evict_for_one(&mut self) {
        // Each turn clears a bit or removes an entry, so this ends.
        while self.entries.len() >= self.capacity {
            let Some((key, entry)) = self.entries.pop_front() else { return };
            if entry.referenced.swap(false, Ordering::Relaxed) {
                self.entries.insert(key, entry);
            }
        }
    }
}

/// A bounded map in lock-guarded shards, read-only on hits; see the
/// module docs.
pub struct Cache<V> {
    name: &'static str,
    shards: Box<[RwLock<Shard<V>>]>,
    hasher: RandomState,
    /// `cache_requests_total` for this cache by result, made on first use:
    /// the registry lookup per request was a measurable part of a check.
    /// (Not at construction: the recorder may not be installed yet.)
    counters: OnceLock<Counters>,
}

struct Counters {
    hit: metrics::Counter,
    miss: metrics::Counter,
    bypass: metrics::Counter,
}

impl<V> Cache<V> {
    fn new(name: &'static str, capacity: usize) -> Self {
        let per_shard = capacity.div_ceil(SHARDS).max(1);
        let hasher = RandomState::new();
        let shards = (0..SHARDS)
            .map(|_| {
                RwLock::new(Shard {
                    entries: LinkedHashMap::with_hasher(hasher.clone()),
                    capacity: per_shard,
                    generation: 0,
                    pinned: HashMap::new(),
                })
            })
            .collect();
        Cache { name, shards, hasher, counters: OnceLock::new() }
    }

    fn counters(&self) -> &Counters {
        self.counters.get_or_init(|| {
            let counter = |result: &'static str| {
                metrics::counter!("cache_requests_total", "cache" => self.name, "result" => result)
            };
            Counters { hit: counter("hit"), miss: counter("miss"), bypass: counter("bypass") }
        })
    }

    fn shard_of(&self, key: &str) -> usize {
        Self::shard_for(self.hasher.hash_one(key))
    }

    /// Bits of the hash that the shard's map uses for neither the bucket
    /// (the low bits) nor its tag (the top seven).
    fn shard_for(hash: u64) -> usize {
        ((hash >> 32) as usize) % SHARDS
    }

    fn lock(&self, shard: usize) -> RwLockWriteGuard<'_, Shard<V>> {
        // A panic while holding the lock leaves at worst a missing entry.
        self.shards[shard].write().unwrap_or_else(PoisonError::into_inner)
    }

    fn read(&self, shard: usize) -> RwLockReadGuard<'_, Shard<V>> {
        self.shards[shard].read().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn lookup(&self, key: &str) -> Lookup<V> {
        let hash = self.hasher.hash_one(key);
        let shard = Self::shard_for(hash);
        let s = self.read(shard);
        if s.pinned.is_empty() || !s.pinned.contains_key(key) {
            if let Some((_, entry)) = s.entries.raw_entry().from_key_hashed_nocheck(hash, key) {
                // Written only when not yet set, so steady hits on the
                // same entry from both threads only read its cache line.
                if !entry.referenced.load(Ordering::Relaxed) {
                    entry.referenced.store(true, Ordering::Relaxed);
                }
                return Lookup::Hit(entry.value.clone());
            }
        }
        Lookup::Miss(Ticket { shard, generation: s.generation })
    }

    /// Stores what a reader read, unless anything touched the shard since
    /// its ticket was taken (the value may predate a commit).
    pub fn fill(&self, key: String, ticket: Ticket, value: Arc<V>) -> bool {
        let mut s = self.lock(ticket.shard);
        if s.generation != ticket.generation || s.pinned.contains_key(&key) {
            metrics::counter!("cache_stale_fills_rejected_total", "cache" => self.name).increment(1);
            return false;
        }
        if !s.entries.contains_key(&key) {
            s.evict_for_one();
        }
        s.entries.insert(key, Entry { value, referenced: AtomicBool::new(false) });
        true
    }

    fn change(&self, key: &str, change: Change) {
        match change {
            Change::Invalidate => self.invalidate(key),
            Change::Pin => self.pin(key),
            Change::Unpin => self.unpin(key),
        }
    }

    fn invalidate(&self, key: &str) {
        let mut s = self.lock(self.shard_of(key));
        s.generation += 1;
        s.entries.remove(key);
    }

    fn pin(&self, key: &str) {
        let mut s = self.lock(self.shard_of(key));
        s.generation += 1;
        s.entries.remove(key);
        *s.pinned.entry(key.to_owned()).or_default() += 1;
    }

    fn unpin(&self, key: &str) {
        let mut s = self.lock(self.shard_of(key));
        s.generation += 1;
        s.entries.remove(key);
        if let Some(n) = s.pinned.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                s.pinned.remove(key);
            }
        }
    }

    fn clear(&self) {
        for shard in 0..SHARDS {
            let mut s = self.lock(shard);
            s.generation += 1;
            s.entries.clear();
        }
    }

    pub fn len(&self) -> usize {
        (0..SHARDS).map(|i| self.read(i).entries.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Counts for tests and `/health`-style introspection of one process's
/// caches (the Prometheus metrics are process-wide).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    /// Reads that went to the database because the cache may not serve now.
    pub bypassed: u64,
    pub resets: u64,
    /// Times this process confirmed it may go on serving: SQLite polls, or
    /// its own pings heard back on PostgreSQL.
    pub polls: u64,
    /// Commits that waited out a peer's lease (no acknowledgement came).
    pub ack_timeouts: u64,
    pub listener_up: bool,
    pub serving: bool,
}

/// One process's caches and their invalidation state. Shared by every
/// clone of a [`Store`].
pub struct CacheHub {
    pub entitlements: Cache<CustomerEntitlements>,
    pub api_keys: Cache<ApiKeyRecord>,
    enabled: bool,
    instance: String,
    started: Instant,
    /// Milliseconds since `started` until which hits may be served.
    lease_until_ms: AtomicU64,
    listener_up: AtomicBool,
    /// A server whose caches are off: commits do not wait for peers.
    serves_without_cache: AtomicBool,
    /// Set once this process listens (PostgreSQL): writers then wait for
    /// their peers. A process without a listener (the CLI) does not.
    pg: OnceLock<PgPool>,
    next_seq: AtomicU64,
    acks: Mutex<HashMap<u64, HashSet<String>>>,
    ack_arrived: tokio::sync::Notify,
    /// Peers' pings, by instance, in this process's clock.
    peers_seen: Mutex<HashMap<String, Instant>>,
    /// Since when this process's listener has been up without a break.
    listening_since: Mutex<Option<Instant>>,
    hits: AtomicU64,
    misses: AtomicU64,
    bypassed: AtomicU64,
    resets: AtomicU64,
    polls: AtomicU64,
    ack_timeouts: AtomicU64,
}

impl std::fmt::Debug for CacheHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheHub").field("instance", &self.instance).field("stats", &self.stats()).finish()
    }
}

impl CacheHub {
    pub(crate) fn new(capacity: usize) -> Self {
        CacheHub {
            entitlements: Cache::new("entitlements", capacity.max(1)),
            api_keys: Cache::new("api_keys", capacity.max(1)),
            enabled: capacity > 0,
            instance: ulid::Ulid::new().to_string().to_lowercase(),
            started: Instant::now(),
            lease_until_ms: AtomicU64::new(0),
            listener_up: AtomicBool::new(false),
            serves_without_cache: AtomicBool::new(false),
            pg: OnceLock::new(),
            next_seq: AtomicU64::new(1),
            acks: Mutex::new(HashMap::new()),
            ack_arrived: tokio::sync::Notify::new(),
            peers_seen: Mutex::new(HashMap::new()),
            listening_since: Mutex::new(None),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            bypassed: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            polls: AtomicU64::new(0),
            ack_timeouts: AtomicU64::new(0),
        }
    }

    /// This process's id among the instances sharing the database.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The `application_name` of this process's listener connection.
    pub fn listener_name(&self) -> String {
        format!("{LISTENER_NAME}{}", self.instance)
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Whether hits may be served now: the cache is on and the lease holds.
    pub fn serving(&self) -> bool {
        self.enabled && self.now_ms() < self.lease_until_ms.load(Ordering::Acquire)
    }

    fn renew_lease(&self, sent_at_ms: u64, lease: Duration) {
        self.lease_until_ms.fetch_max(sent_at_ms + lease.as_millis() as u64, Ordering::AcqRel);
    }

    fn revoke_lease(&self) {
        self.lease_until_ms.store(0, Ordering::Release);
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            bypassed: self.bypassed.load(Ordering::Relaxed),
            resets: self.resets.load(Ordering::Relaxed),
            polls: self.polls.load(Ordering::Relaxed),
            ack_timeouts: self.ack_timeouts.load(Ordering::Relaxed),
            listener_up: self.listener_up.load(Ordering::Relaxed),
            serving: self.serving(),
        }
    }

    /// A lookup that counts: `None` when the cache may not serve (bypass).
    pub(crate) fn lookup<V>(&self, cache: &Cache<V>, key: &str) -> Option<Lookup<V>> {
        if !self.serving() {
            self.bypassed.fetch_add(1, Ordering::Relaxed);
            cache.counters().bypass.increment(1);
            return None;
        }
        let found = cache.lookup(key);
        match found {
            Lookup::Hit(_) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                cache.counters().hit.increment(1);
            }
            Lookup::Miss(_) => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                cache.counters().miss.increment(1);
            }
        }
        Some(found)
    }

    /// Applies `change` to the entry each encoded key names, in its cache.
    fn change_each(&self, keys: &[String], change: Change) {
        for key in keys {
            match named(key) {
                Named::Customer(external) => self.entitlements.change(external, change),
                Named::ApiKey(digest) => self.api_keys.change(digest, change),
                Named::Unknown => self.reset("unknown_key"),
            }
        }
    }

    fn invalidate(&self, keys: &[String], source: &'static str) {
        self.change_each(keys, Change::Invalidate);
        metrics::counter!("cache_invalidations_total", "source" => source).increment(keys.len() as u64);
    }

    pub(crate) fn pin(&self, keys: &[String]) {
        self.change_each(keys, Change::Pin);
    }

    /// Drops and unpins the keys once their transaction has ended.
    pub(crate) fn unpin(&self, keys: &[String]) {
        self.change_each(keys, Change::Unpin);
        metrics::counter!("cache_invalidations_total", "source" => "local").increment(keys.len() as u64);
    }

    /// Clears both caches; in-flight fills are refused.
    pub fn reset(&self, reason: &'static str) {
        self.entitlements.clear();
        self.api_keys.clear();
        self.resets.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("cache_resets_total", "reason" => reason).increment(1);
    }

    fn set_listener_up(&self, up: bool) {
        {
            let mut since = self.listening_since.lock().unwrap_or_else(PoisonError::into_inner);
            match (up, since.is_some()) {
                (true, false) => *since = Some(Instant::now()),
                (false, _) => *since = None,
                (true, true) => {}
            }
        }
        self.listener_up.store(up, Ordering::Release);
        metrics::gauge!("cache_listener_up").set(if up { 1.0 } else { 0.0 });
    }

    /// Before a PostgreSQL commit that invalidates `keys`: the notification
    /// to send inside the transaction, and its sequence number.
    pub(crate) fn begin_commit(&self, keys: &[String]) -> (u64, String) {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        self.acks.lock().unwrap_or_else(PoisonError::into_inner).insert(seq, HashSet::new());
        let mut payload = format!("inv {} {seq}", self.instance);
        for key in keys {
            payload.push(' ');
            payload.push_str(key);
        }
        if payload.len() > MAX_PAYLOAD {
            payload = format!("inv {} {seq} *", self.instance);
        }
        (seq, payload)
    }

    pub(crate) fn abandon_commit(&self, seq: u64) {
        self.acks.lock().unwrap_or_else(PoisonError::into_inner).remove(&seq);
    }

    /// After a PostgreSQL commit: returns once every peer that may be
    /// serving from its cache has dropped the keys, or has lost its lease.
    pub(crate) async fn await_peers(&self, seq: u64, own: Option<&PgPool>) {
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + LEASE + PING_EVERY;
        if self.serves_without_cache.load(Ordering::Acquire) {
            self.abandon_commit(seq);
            return;
        }
        let Some(listener_pool) = self.pg.get() else {
            // A process without a listener (the CLI): the servers hear the
            // notification, but it cannot hear their acknowledgements, so
            // it waits out their leases.
            tokio::time::sleep_until(deadline).await;
            self.abandon_commit(seq);
            return;
        };
        // The committing store's own pool where it has one (the inbox's, on
        // its own runtime): a connection serves the runtime that opened it.
        let pool = own.unwrap_or(listener_pool);
        let listening: Result<Vec<(String, i64)>, sqlx::Error> = sqlx::query_as(
            "SELECT application_name, CAST(EXTRACT(EPOCH FROM (now() - backend_start)) * 1000 AS BIGINT) \
             FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name LIKE 'tollgate-cache:%'",
        )
        .fetch_all(pool)
        .await;
        // A listed peer this process has heard nothing from for two leases,
        // though both have listened that long, holds no lease (it serves
        // from memory only while it hears its own pings, which reach this
        // process too): its connection is dead but not yet reaped (a host
        // gone without a TCP reset stays listed until keepalives give up),
        // and waiting for it would slow every write by a lease.
        let settled = LEASE * 2;
        // Only while this process's own listener is current (it heard its
        // own ping within a lease, so it has heard every ping sent before).
        let heard_long_enough = self.now_ms() < self.lease_until_ms.load(Ordering::Acquire)
            && self
                .listening_since
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_some_and(|since| since.elapsed() >= settled);
        let mut peers: HashSet<String> = match listening {
            Ok(names) => {
                let seen = self.peers_seen.lock().unwrap_or_else(PoisonError::into_inner);
                names
                    .iter()
                    .filter_map(|(n, age_ms)| n.strip_prefix(LISTENER_NAME).map(|p| (p, *age_ms)))
                    .filter(|(p, age_ms)| {
                        let young = u128::try_from(*age_ms).unwrap_or(0) < settled.as_millis();
                        let heard = seen.get(*p).is_some_and(|at| at.elapsed() < settled);
                        !heard_long_enough || young || heard
                    })
                    .map(|(p, _)| p.to_owned())
                    .collect()
            }
            Err(e) => {
                // Who listens is unknown: wait out every lease.
                tracing::warn!(error = %e, "cannot list cache peers; waiting out their leases");
                tokio::time::sleep_until(deadline).await;
                self.abandon_commit(seq);
                return;
            }
        };
        {
            // A peer whose listener just dropped is no longer listed but may
            // still hold a lease: it counts until its pings are old.
            let seen = self.peers_seen.lock().unwrap_or_else(PoisonError::into_inner);
            peers.extend(seen.iter().filter(|(_, at)| at.elapsed() < LEASE * 2).map(|(p, _)| p.clone()));
        }
        peers.remove(&self.instance);
        if !self.listener_up.load(Ordering::Acquire) && !peers.is_empty() {
            // Acknowledgements cannot be heard without a listener.
            tokio::time::sleep_until(deadline).await;
            self.abandon_commit(seq);
            return;
        }
        loop {
            let arrived = self.ack_arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            let missing: Vec<String> = {
                let acks = self.acks.lock().unwrap_or_else(PoisonError::into_inner);
                let got = acks.get(&seq);
                peers.iter().filter(|p| got.is_none_or(|g| !g.contains(*p))).cloned().collect()
            };
            if missing.is_empty() {
                break;
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                metrics::counter!("cache_ack_timeouts_total").increment(1);
                self.ack_timeouts.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(peers = ?missing, "cache peers did not acknowledge an invalidation; their leases have run out");
                break;
            }
        }
        self.abandon_commit(seq);
        metrics::histogram!("cache_ack_wait_seconds").record(started.elapsed().as_secs_f64());
    }

    /// After a SQLite commit: a process that does not poll (the CLI)
    /// returns only once the server's poller must have seen its commit
    /// (or the server has stopped serving from memory).
    pub(crate) async fn await_sqlite_server(&self) {
        if !self.listener_up.load(Ordering::Acquire) && !self.serves_without_cache.load(Ordering::Acquire) {
            tokio::time::sleep(SQLITE_LEASE + SQLITE_POLL / 2).await;
        }
    }

    /// One notification from the channel.
    fn handle(self: &Arc<Self>, payload: &str, pool: &PgPool) {
        let mut parts = payload.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some("ping"), Some(from), Some(sent_at)) => {
                if from == self.instance {
                    if let Ok(ms) = sent_at.parse() {
                        self.renew_lease(ms, LEASE);
                        self.polls.fetch_add(1, Ordering::Relaxed);
                    }
                } else {
                    let mut seen = self.peers_seen.lock().unwrap_or_else(PoisonError::into_inner);
                    seen.insert(from.to_owned(), Instant::now());
                    seen.retain(|_, at| at.elapsed() < LEASE * 4);
                }
            }
            (Some("bye"), Some(from), _) => {
                self.peers_seen.lock().unwrap_or_else(PoisonError::into_inner).remove(from);
            }
            (Some("inv"), Some(origin), Some(seq)) if origin != self.instance => {
                let keys: Vec<String> = parts.map(str::to_owned).collect();
                if keys.iter().any(|k| k == "*") {
                    self.reset("remote_all");
                } else {
                    self.invalidate(&keys, "remote");
                }
                let ack = format!("ack {origin} {seq} {}", self.instance);
                let pool = pool.clone();
                tokio::spawn(async move {
                    if let Err(e) = notify(&pool, &ack).await {
                        tracing::debug!(error = %e, "could not acknowledge a cache invalidation");
                    }
                });
            }
            (Some("ack"), Some(origin), Some(seq)) if origin == self.instance => {
                if let (Ok(seq), Some(from)) = (seq.parse::<u64>(), parts.next()) {
                    let mut acks = self.acks.lock().unwrap_or_else(PoisonError::into_inner);
                    if let Some(got) = acks.get_mut(&seq) {
                        got.insert(from.to_owned());
                        drop(acks);
                        self.ack_arrived.notify_waiters();
                    }
                }
            }
            _ => {}
        }
    }
}

async fn notify(pool: &PgPool, payload: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, $2)").bind(CHANNEL).bind(payload).execute(pool).await.map(|_| ())
}

/// Keeps this process's caches in step with the database until `shutdown`:
/// the PostgreSQL listener and its pings, or the SQLite poller. Without it
/// the caches never serve.
#[tracing::instrument(skip_all, name = "cache_sync")]
pub async fn sync(store: Store, shutdown: CancellationToken) {
    let hub = store.cache.clone();
    if !hub.enabled {
        // A server with its caches off has nothing to keep in step, and
        // its writes need not wait for anyone (a deployment mixing
        // instances with and without caches is not supported).
        hub.serves_without_cache.store(true, Ordering::Release);
        return;
    }
    match &store.backend {
        Backend::Postgres(pool) => pg_sync(hub, pool.clone(), shutdown).await,
        Backend::Sqlite { writer, writer_connections, .. } => {
            sqlite_sync(hub, writer.clone(), writer_connections.clone(), shutdown).await
        }
    }
}

async fn pg_sync(hub: Arc<CacheHub>, pool: PgPool, shutdown: CancellationToken) {
    let _ = hub.pg.set(pool.clone());
    let pinger = {
        let (hub, pool, shutdown) = (hub.clone(), pool.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PING_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    _ = tick.tick() => {}
                }
                if !hub.listener_up.load(Ordering::Acquire) {
                    continue;
                }
                // The time is taken before sending: the lease counts from
                // a moment no later than the ping's commit.
                let ping = format!("ping {} {}", hub.instance, hub.now_ms());
                if let Err(e) = notify(&pool, &ping).await {
                    tracing::debug!(error = %e, "cache ping failed");
                }
            }
        })
    };
    let mut backoff = Duration::from_millis(50);
    while !shutdown.is_cancelled() {
        match listen(&hub, &pool).await {
            Ok(mut listener) => {
                backoff = Duration::from_millis(50);
                // Whatever was missed while nobody listened is forgotten.
                hub.reset("listener_connected");
                hub.set_listener_up(true);
                tracing::info!("cache invalidation listener subscribed");
                let lost = tokio::select! {
                    () = shutdown.cancelled() => None,
                    e = receive(&hub, &pool, &mut listener) => Some(e),
                };
                hub.set_listener_up(false);
                hub.revoke_lease();
                hub.reset("listener_lost");
                match lost {
                    None => break,
                    Some(e) => tracing::warn!(
                        error = %e,
                        "cache invalidation listener lost; reading from the database until it is back"
                    ),
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot subscribe to cache invalidations"),
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
    pinger.abort();
    let _ = pinger.await;
    // Peers stop waiting for this instance's acknowledgements at once.
    let _ = notify(&pool, &format!("bye {}", hub.instance)).await;
}

/// A subscribed listener. It is named only after `LISTEN` succeeded, so a
/// writer that finds it in `pg_stat_activity` knows it will hear the
/// writer's notification.
async fn listen(hub: &CacheHub, pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    // A lost connection must surface (to clear the cache), not be
    // silently replaced.
    listener.eager_reconnect(false);
    listener.listen(CHANNEL).await?;
    sqlx::query("SELECT set_config('application_name', $1, false)")
        .bind(hub.listener_name())
        .execute(&mut listener)
        .await?;
    Ok(listener)
}

async fn receive(hub: &Arc<CacheHub>, pool: &PgPool, listener: &mut PgListener) -> String {
    loop {
        match listener.try_recv().await {
            Ok(Some(n)) => hub.handle(n.payload(), pool),
            Ok(None) => return "connection closed".to_owned(),
            Err(e) => return e.to_string(),
        }
    }
}

async fn sqlite_sync(
    hub: Arc<CacheHub>,
    writer: SqlitePool,
    connections: Arc<AtomicU64>,
    shutdown: CancellationToken,
) {
    // `data_version` is per connection, and changes with other connections'
    // commits: read on the writer's (the pool's one connection, taken for
    // each poll, between two write transactions), it changes only when
    // another process writes. Readings of two connections cannot be
    // compared (each starts at the same count, and its own writes do not
    // move it), so a reading is paired with the connection it came from.
    let mut last: Option<(u64, i64)> = None;
    let mut tick = tokio::time::interval(SQLITE_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    hub.set_listener_up(true);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let polled_at = hub.now_ms();
        let polled = match writer.acquire().await {
            Ok(mut c) => {
                // Counted before the pool handed it over.
                let connection = connections.load(Ordering::Acquire);
                let version = sqlx::query_scalar::<_, i64>("PRAGMA data_version").fetch_one(&mut *c).await;
                version.map(|v| (connection, v))
            }
            Err(e) => Err(e),
        };
        match polled {
            Ok(reading) => {
                // First poll, another process committed, or the writer's
                // connection is a new one (the old one failed) whose count
                // says nothing about what happened in between: anything
                // cached may predate it.
                if last != Some(reading) {
                    hub.reset("data_version");
                }
                last = Some(reading);
                hub.renew_lease(polled_at, SQLITE_LEASE);
                hub.polls.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot poll SQLite for changes; reading from the database");
                last = None;
                hub.revoke_lease();
            }
        }
    }
    hub.set_listener_up(false);
    hub.revoke_lease();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn miss<V>(cache: &Cache<V>, key: &str) -> Ticket {
        match cache.lookup(key) {
            Lookup::Miss(t) => t,
            Lookup::Hit(_) => panic!("unexpected hit for {key}"),
        }
    }

    fn hit(cache: &Cache<u32>, key: &str) -> Option<u32> {
        match cache.lookup(key) {
            Lookup::Hit(v) => Some(*v),
            Lookup::Miss(_) => None,
        }
    }

    #[test]
    fn a_fill_that_started_before_an_invalidation_is_not_stored() {
        let cache = Cache::new("t", 100);
        let ticket = miss(&cache, "c:a");
        cache.invalidate("c:a");
        assert!(!cache.fill("c:a".into(), ticket, Arc::new(1)));
        assert_eq!(hit(&cache, "c:a"), None);
        let ticket = miss(&cache, "c:a");
        assert!(cache.fill("c:a".into(), ticket, Arc::new(2)));
        assert_eq!(hit(&cache, "c:a"), Some(2));
    }

    #[test]
    fn pinned_keys_are_neither_served_nor_stored_until_unpinned() {
        let cache = Cache::new("t", 100);
        let ticket = miss(&cache, "c:a");
        assert!(cache.fill("c:a".into(), ticket, Arc::new(1)));
        cache.pin("c:a");
        let ticket = miss(&cache, "c:a");
        assert!(!cache.fill("c:a".into(), ticket, Arc::new(2)), "pinned");
        cache.unpin("c:a");
        assert!(!cache.fill("c:a".into(), ticket, Arc::new(2)), "the unpin moved the generation on");
        let ticket = miss(&cache, "c:a");
        assert!(cache.fill("c:a".into(), ticket, Arc::new(3)));
        assert_eq!(hit(&cache, "c:a"), Some(3));
    }

    #[test]
    fn a_reset_refuses_fills_in_flight_and_the_size_is_bounded() {
        let cache = Cache::new("t", 32);
        let ticket = miss(&cache, "c:x");
        cache.clear();
        assert!(!cache.fill("c:x".into(), ticket, Arc::new(1)));
        for i in 0..1000 {
            let key = format!("c:{i}");
            let ticket = miss(&cache, &key);
            cache.fill(key, ticket, Arc::new(i));
        }
        assert!(cache.len() <= 32, "{}", cache.len());
        assert_eq!(hit(&cache, "c:999"), Some(999), "the newest entry stays");
    }

    #[test]
    fn entries_that_are_hit_outlive_a_stream_of_new_ones() {
        // Four entries per shard: without the hit bit, "hot" would be the
        // oldest insertion in its shard after four more there.
        let cache = Cache::new("t", 4 * SHARDS);
        let ticket = miss(&cache, "c:hot");
        assert!(cache.fill("c:hot".into(), ticket, Arc::new(7)));
        for i in 0..1000 {
            assert_eq!(hit(&cache, "c:hot"), Some(7), "evicted after {i} fills");
            let key = format!("c:{i}");
            let ticket = miss(&cache, &key);
            cache.fill(key, ticket, Arc::new(i));
        }
        assert!(cache.len() <= 4 * SHARDS, "{}", cache.len());
    }

    #[test]
    fn a_hub_without_its_sync_task_never_serves() {
        let hub = CacheHub::new(10);
        assert!(!hub.serving());
        hub.renew_lease(hub.now_ms(), LEASE);
        assert!(hub.serving());
        hub.revoke_lease();
        assert!(!hub.serving());
        let off = CacheHub::new(0);
        off.renew_lease(off.now_ms(), LEASE);
        assert!(!off.serving(), "capacity 0 turns the cache off");
    }

    #[test]
    fn encoded_keys_reach_the_entry_of_the_cache_they_name() {
        let hub = CacheHub::new(10);
        let ticket = miss(&hub.entitlements, "u_1");
        let stored = StoredEntitlements { version: 1, entitlements: Default::default(), updated_at: 0 };
        let entitlements = CustomerEntitlements { customer_id: "cus_1".into(), stored };
        assert!(hub.entitlements.fill("u_1".into(), ticket, Arc::new(entitlements)));
        let ticket = miss(&hub.api_keys, "d1");
        assert!(hub.api_keys.fill("d1".into(), ticket, hub_record()));
        // Each encoding reaches its own cache only, by the id alone.
        hub.invalidate(&[CacheKey::ApiKey("u_1".into()).encode()], "test");
        assert!(matches!(hub.entitlements.lookup("u_1"), Lookup::Hit(_)));
        hub.invalidate(&[CacheKey::Customer("u_1".into()).encode()], "test");
        assert!(matches!(hub.entitlements.lookup("u_1"), Lookup::Miss(_)));
        assert!(matches!(hub.api_keys.lookup("d1"), Lookup::Hit(_)));
        hub.pin(&[CacheKey::ApiKey("d1".into()).encode()]);
        assert!(matches!(hub.api_keys.lookup("d1"), Lookup::Miss(_)));
        hub.unpin(&[CacheKey::ApiKey("d1".into()).encode()]);
        assert!(hub.api_keys.shards.iter().all(|s| s.read().unwrap().pinned.is_empty()));
        // A key of an unknown encoding (a newer peer's) clears everything.
        let ticket = miss(&hub.api_keys, "d1");
        assert!(hub.api_keys.fill("d1".into(), ticket, hub_record()));
        hub.invalidate(&["x:d1".to_owned()], "test");
        assert!(matches!(hub.api_keys.lookup("d1"), Lookup::Miss(_)));
        assert_eq!(hub.stats().resets, 1);
    }

    fn hub_record() -> Arc<ApiKeyRecord> {
        Arc::new(ApiKeyRecord {
            id: "key_1".into(),
            name: "k".into(),
            scope: crate::auth::Scope::Read,
            mode: crate::auth::KeyMode::Test,
            prefix: "tg_test_".into(),
            created_at: 0,
            revoked_at: None,
        })
    }

    #[test]
    fn long_invalidations_become_one_reset() {
        let hub = CacheHub::new(10);
        let keys: Vec<String> = (0..2000).map(|i| format!("c:customer_{i}")).collect();
        let (seq, payload) = hub.begin_commit(&keys);
        assert!(payload.len() < 8000 && payload.ends_with(" *"), "{}", payload.len());
        hub.abandon_commit(seq);
        let (_, payload) = hub.begin_commit(&keys[..2]);
        assert!(payload.ends_with("c:customer_0 c:customer_1"));
    }
}
