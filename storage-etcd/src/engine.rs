//! [`EtcdEngine`]: the catalogue engine over etcd.
//!
//! # Tasks
//!
//! The engine owns a small tokio runtime (two worker threads) running:
//! - the **view** task: loads the whole prefix at a revision R (paged range
//!   reads pinned at R), then watches from R + 1 and applies each watch
//!   response under one write lock; a cancelled, compacted or broken watch
//!   (or a view the freshness task finds stuck) reloads and re-watches;
//! - the **freshness** task (I3): every Δ/4 a linearizable read of
//!   `meta/gen`, with a deadline of Δ/4 (a failed read is retried after
//!   Δ/16, on another member); if the view holds that generation (waiting
//!   up to Δ/4 for the watch to bring it), the instant the read *started*
//!   becomes `last_fresh`. [`CatalogueEngine::check_fresh`] is Ok only
//!   while `now − last_fresh < Δ`, on this process's monotonic clock;
//! - the **lease** task: keeps this node's lease (TTL ≈ 2Δ) alive, one
//!   keep-alive round every min(TTL/3, Δ/2) with a deadline of Δ/4 (a
//!   failed round is retried after Δ/16, on another member), and grants a
//!   new one (re-registering the node) only once etcd says it expired;
//! - the **registry** task: publishes `nodes/<id>` = the generation the view
//!   applied, whenever it changes.
//!
//! The blocking trait methods hand a future to the runtime and wait on a
//! std channel, so they may be called from any thread (the service calls
//! them from blocking worker threads); every etcd call has a deadline of Δ
//! (Δ/4 for the freshness reads and lease keep-alives).
//!
//! # One member at a time, and failover
//!
//! The node holds one client per configured member and sends every
//! request to the *current* member. A request that fails as unavailable
//! (connection refused or reset, no leader, deadline passed) moves the
//! node to the next member, and the watch follows. etcd-client's own
//! balanced channel is not used for this: it spreads requests at random
//! over every member, dead or alive, and only drops a frozen member's
//! connection after HTTP/2 keep-alive timeouts, so with one member frozen
//! (SIGSTOP: its TCP connections stay open) about one freshness read in
//! three hung for its whole deadline and the node went unfresh while a
//! quorum was alive. With the Δ/4 deadlines, a node whose member dies or
//! freezes is fresh again within one election (about 1 s with etcd's
//! defaults) plus Δ/4 plus one read, and its lease, which etcd keeps
//! across an election, is renewed in time.
//!
//! # Catching up by generation, not revision
//!
//! Every catalogue change bumps `meta/gen` in the same transaction, so a
//! view holding generation G holds exactly the catalogue of G. The
//! freshness poll and [`CatalogueEngine::begin_write`] therefore wait for
//! the view's *generation* to reach the value their linearizable read
//! returned, rather than for a revision: the etcd revision also moves for
//! writes outside the catalogue (node heartbeats, GCM reservations, other
//! prefixes), and a watch header's revision can run ahead of the events
//! still to come while a watcher catches up.
//!
//! # Limits
//!
//! - One catalogue write is one etcd transaction: at most etcd's
//!   `--max-txn-ops` operations (128 by default, including the generation
//!   bump) and `--max-request-bytes` (1.5 MiB by default); a larger batch
//!   fails with `Db`.
//! - The whole catalogue is held in memory on every node (it is small:
//!   records without key material).
//! - A scan copies the view in chunks of 256 entries so that its callback
//!   never runs under the view's lock; a scan may thus span a watch update.
//!   Writes built on such reads are still protected by the commit's
//!   compare-and-set of the generation, and the catalogue retries a write
//!   whose checks failed on a view that moved under them.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse, TxnResponse, WatchOptions,
};
use kms_catalogue::{
    AuditHead, Batch, CatalogueEngine, ClusterView, DbError, Fence, NodeRoots, Op, PeerRoots,
    ScanFn, StorageError, Table, USAGE_TABLE, UsageRow,
};
use parking_lot::{Mutex, RwLock};
use secrecy::ExposeSecret;
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use crate::config::{ConfigError, EtcdConfig};
use crate::keyspace::{FORMAT_VERSION, Keyspace, MIN_FORMAT_VERSION, NodeRecord, prefix_end};
use crate::view::{Change, View, decode_gen};

/// Entries copied out of the view per lock hold while scanning, so the
/// scan callback never runs under the view's lock.
const SCAN_CHUNK: usize = 256;

/// Keys per page of the reload's range reads (bounded gRPC messages).
const LOAD_PAGE: i64 = 1000;

/// Margin added to Δ in the revocation wait (I4): covers scheduling jitter
/// and clock-rate differences between nodes.
const REVOCATION_MARGIN: Duration = Duration::from_millis(500);

/// The catalogue engine over etcd, for a cluster of kms nodes. See the
/// module documentation for its tasks and the crate's for the invariants.
/// Dropping it revokes the node's lease (its registration and any job
/// leadership end at once) and stops its tasks.
pub struct EtcdEngine {
    shared: Arc<Shared>,
    runtime: Background,
}

impl std::fmt::Debug for EtcdEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdEngine")
            .field("node_id", &self.shared.node_id)
            .field("prefix", &String::from_utf8_lossy(self.shared.ks.prefix()))
            .field("staleness_bound", &self.shared.delta)
            .finish_non_exhaustive()
    }
}

struct Shared {
    node_id: String,
    address: Option<String>,
    ks: Keyspace,
    /// Δ: the staleness bound, and every etcd call's deadline.
    delta: Duration,
    /// One client per configured member (`None` while it could not be
    /// connected: only with etcd authentication, whose token needs a
    /// round trip); requests go to `members[current]`.
    members: Vec<Member>,
    current: AtomicUsize,
    /// A connected client, for when the current member has none.
    fallback: Client,
    options: ConnectOptions,
    /// Notified when `current` moves (the watch follows it).
    moved: Notify,
    view: RwLock<View>,
    /// Bumped after every change of the view (watch response or reload).
    changes: watch::Sender<u64>,
    /// Start of the last linearizable read that confirmed the view's generation.
    last_fresh: Mutex<Option<Instant>>,
    /// This node's lease: id, and until when it is certainly alive.
    lease: Mutex<LeaseState>,
    lease_id: AtomicI64,
    /// Asks the view task to reload (the watch looks stuck).
    resync: Notify,
    /// Full reloads of the view since connect.
    reloads: AtomicU64,
    /// The roots this node last published (part of `nodes/<id>`).
    roots: Mutex<Option<NodeRoots>>,
}

/// How a watch ended.
enum WatchEnd {
    /// The stream broke: re-watch from the last applied revision.
    Broken(StorageError),
    /// The watch lost history (compaction) or the view is stuck: reload.
    Reload(String),
}

#[derive(Debug, Clone, Copy)]
struct LeaseState {
    valid_until: Instant,
    /// The TTL etcd granted: a keep-alive sent at t keeps it until t + ttl.
    ttl: Duration,
}

/// One configured etcd member and this node's client to it.
struct Member {
    endpoint: String,
    client: RwLock<Option<Client>>,
}

/// The pause before retrying a failed freshness read or lease keep-alive
/// (on the next member): Δ/16, at least 25 ms.
fn retry_pause(delta: Duration) -> Duration {
    (delta / 16).max(Duration::from_millis(25))
}

/// An etcd client error: connection and quorum failures are
/// `Unavailable` (fail closed, retry later); anything else is `Db`.
pub(crate) fn etcd_error(op: &'static str) -> impl FnOnce(etcd_client::Error) -> StorageError {
    move |e| {
        let unavailable = match &e {
            etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
            etcd_client::Error::GRpcStatus(s) => matches!(
                s.code(),
                tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Cancelled
                    | tonic::Code::Aborted
                    | tonic::Code::Unknown
            ),
            _ => false,
        };
        if unavailable {
            StorageError::Unavailable {
                reason: format!("etcd {op} failed: {e}"),
            }
        } else {
            StorageError::Db {
                op,
                source: DbError::new(e),
            }
        }
    }
}

pub(crate) fn config_error(e: ConfigError) -> StorageError {
    StorageError::Db {
        op: "check the etcd configuration",
        source: DbError::new(e),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

impl Shared {
    /// A client to the current member (see the module documentation).
    fn client(&self) -> Client {
        let i = self.current.load(Ordering::Acquire) % self.members.len();
        self.members[i]
            .client
            .read()
            .clone()
            .unwrap_or_else(|| self.fallback.clone())
    }

    /// Moves requests off member `from` (if they are still going there)
    /// to the next member that has a client.
    fn fail_over(&self, from: usize, why: &StorageError) {
        let n = self.members.len();
        let Some(to) = (1..n)
            .map(|k| (from + k) % n)
            .find(|&i| self.members[i].client.read().is_some())
        else {
            return;
        };
        if self
            .current
            .compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            info!(
                from = %self.members[from].endpoint,
                to = %self.members[to].endpoint,
                error = %why,
                "moving to another etcd member"
            );
            self.moved.notify_waiters();
        }
    }

    /// Runs one etcd call (built on [`Shared::client`]) with the deadline Δ.
    async fn call<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StorageError> {
        self.call_within(op, self.delta, fut).await
    }

    /// Runs one etcd call with the deadline `limit`; if it fails as
    /// unavailable, later calls go to the next member.
    async fn call_within<T>(
        &self,
        op: &'static str,
        limit: Duration,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StorageError> {
        // The future is lazy: it was built on the client of the member
        // current now (`client()` was called just before).
        let member = self.current.load(Ordering::Acquire);
        let err = match tokio::time::timeout(limit, fut).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => etcd_error(op)(e),
            Err(_) => StorageError::Unavailable {
                reason: format!("etcd {op} did not answer within {} ms", ms(limit)),
            },
        };
        if matches!(err, StorageError::Unavailable { .. }) {
            self.fail_over(member, &err);
        }
        Err(err)
    }

    async fn txn(&self, op: &'static str, txn: Txn) -> Result<TxnResponse, StorageError> {
        let mut kv = self.client().kv_client();
        self.call(op, kv.txn(txn)).await
    }

    /// Linearizable read of one key with the deadline `limit`: its
    /// key-value if present, and the revision the read was made at.
    async fn get_within(
        &self,
        op: &'static str,
        key: Vec<u8>,
        limit: Duration,
    ) -> Result<(Option<etcd_client::KeyValue>, i64), StorageError> {
        let mut kv = self.client().kv_client();
        let mut resp = self.call_within(op, limit, kv.get(key, None)).await?;
        let rev = resp.header().map_or(0, |h| h.revision());
        Ok((resp.take_kvs().into_iter().next(), rev))
    }

    /// Linearizable read of one key with the deadline Δ.
    async fn get(
        &self,
        op: &'static str,
        key: Vec<u8>,
    ) -> Result<(Option<etcd_client::KeyValue>, i64), StorageError> {
        self.get_within(op, key, self.delta).await
    }

    /// Linearizable read of `meta/gen`, with the deadline `limit`.
    async fn read_gen(&self, limit: Duration) -> Result<u64, StorageError> {
        let (kv, _) = self
            .get_within("read the generation", self.ks.gen_key(), limit)
            .await?;
        match kv {
            None => Ok(0),
            Some(kv) => decode_gen(kv.value()).ok_or_else(|| StorageError::Corrupt {
                cf: "meta",
                key_hex: hex_encode(&self.ks.gen_key()),
                reason: "generation is not 8 bytes",
            }),
        }
    }

    /// Waits until `cond` holds on the view, at most until `deadline`.
    async fn wait_view(&self, deadline: Instant, cond: impl Fn(&View) -> bool) -> bool {
        let mut rx = self.changes.subscribe();
        loop {
            if cond(&self.view.read()) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match tokio::time::timeout(left, rx.changed()).await {
                Ok(Ok(())) => {}
                // Sender gone (shutting down) or deadline: one last look.
                _ => return cond(&self.view.read()),
            }
        }
    }

    /// Loads the whole prefix at one revision into a new view; returns it.
    async fn load(&self) -> Result<View, StorageError> {
        let prefix = self.ks.prefix().to_vec();
        let end = prefix_end(&prefix).unwrap_or_else(|| vec![0]);
        let mut view = View::default();
        let mut from = prefix;
        let mut revision = 0;
        loop {
            let mut opts = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LOAD_PAGE);
            if revision != 0 {
                // Later pages read the same revision as the first.
                opts = opts.with_revision(revision);
            }
            let mut kv = self.client().kv_client();
            let mut resp = self
                .call("load the catalogue", kv.get(from.clone(), Some(opts)))
                .await?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            let more = resp.more();
            let kvs = resp.take_kvs();
            let Some(last) = kvs.last().map(|kv| kv.key().to_vec()) else {
                break;
            };
            for kv in kvs {
                let (k, v) = kv.into_key_value();
                if !view.apply(&self.ks, Change::Put(k.clone(), v)) {
                    warn!(key = %String::from_utf8_lossy(&k), "ignoring a malformed catalogue entry in etcd");
                }
            }
            if !more {
                break;
            }
            from = last;
            from.push(0);
        }
        view.revision = revision;
        Ok(view)
    }

    /// Replaces the view with a fresh load; returns its revision.
    async fn reload(&self) -> Result<i64, StorageError> {
        let view = self.load().await?;
        let revision = view.revision;
        {
            let mut current = self.view.write();
            if view.generation < current.generation {
                // etcd went back in time (restored from an older backup?):
                // keep serving nothing rather than a state older than one
                // this node already acted on.
                return Err(StorageError::Unavailable {
                    reason: format!(
                        "the catalogue generation in etcd ({}) is older than this node's view ({}); restart the node",
                        view.generation, current.generation
                    ),
                });
            }
            *current = view;
        }
        self.changes.send_modify(|c| *c += 1);
        Ok(revision)
    }

    fn lease_id(&self) -> i64 {
        self.lease_id.load(Ordering::Acquire)
    }

    fn lease_alive(&self) -> bool {
        self.lease.lock().valid_until > Instant::now()
    }

    /// Writes `nodes/<id>` under this node's lease, refusing (after waiting
    /// up to one lease TTL for a crashed predecessor's lease to expire) if
    /// another live process holds the id.
    async fn register(&self, ttl: Duration) -> Result<(), StorageError> {
        let key = self.ks.node(&self.node_id);
        let deadline = Instant::now() + ttl + Duration::from_secs(1);
        loop {
            // Waiting out a crashed predecessor's lease can outlast our own
            // (nothing keeps it alive before registration): take a fresh
            // one whenever ours may expire before this attempt lands. An
            // abandoned lease expires on its own.
            if self.lease.lock().valid_until < Instant::now() + Duration::from_secs(1) {
                let (id, state) = self.grant(ttl).await?;
                self.lease_id.store(id, Ordering::Release);
                *self.lease.lock() = state;
            }
            let lease = self.lease_id();
            let record = self.node_record();
            let txn = Txn::new()
                .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    key.clone(),
                    record,
                    Some(PutOptions::new().with_lease(lease)),
                )])
                .or_else([TxnOp::get(key.clone(), None)]);
            let resp = self.txn("register the node", txn).await?;
            if resp.succeeded() {
                return Ok(());
            }
            let holder = first_kv(&resp).map(|kv| kv.lease());
            if holder == Some(lease) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(StorageError::Unavailable {
                    reason: format!(
                        "cluster node id {:?} is registered by another live process (etcd lease {:x}); node ids must be unique",
                        self.node_id,
                        holder.unwrap_or(0)
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn node_record(&self) -> Vec<u8> {
        let record = NodeRecord {
            applied_gen: self.view.read().generation,
            heartbeat_ms: now_ms(),
            address: self.address.clone(),
            roots: self.roots.lock().clone(),
        };
        // A struct of integers and strings always serializes.
        serde_json::to_vec(&record).unwrap_or_default()
    }

    fn check_fresh(&self) -> Result<(), StorageError> {
        // A node whose lease may have expired may have lost its
        // registration, and with it its place in the revocation wait (I4):
        // it must not serve, however recent its last read.
        if !self.lease_alive() {
            return Err(StorageError::Unavailable {
                reason: "this node's etcd lease is not known to be alive".to_owned(),
            });
        }
        let last = *self.last_fresh.lock();
        let age = last.map(|t| t.elapsed());
        match age {
            Some(age) if age < self.delta => Ok(()),
            _ => Err(StorageError::Unavailable {
                reason: match age {
                    Some(age) => format!(
                        "no linearizable read of the catalogue for {} ms (staleness bound {} ms)",
                        ms(age),
                        ms(self.delta)
                    ),
                    None => "no linearizable read of the catalogue yet".to_owned(),
                },
            }),
        }
    }

    /// The view task: load, watch, apply. A broken watch is re-created
    /// from the revision after the last one applied; a compacted or
    /// cancelled one (or a view the freshness task finds stuck) reloads
    /// the whole catalogue at a new revision first.
    async fn view_task(self: Arc<Self>, revision: i64) {
        let pause = (self.delta / 4).min(Duration::from_secs(1));
        let mut next = Some(revision + 1);
        loop {
            let start = match next {
                Some(r) => r,
                None => match self.reload().await {
                    Ok(r) => {
                        self.reloads.fetch_add(1, Ordering::Relaxed);
                        r + 1
                    }
                    Err(e) => {
                        warn!(error = %e, "reloading the catalogue from etcd failed; retrying");
                        tokio::time::sleep(pause).await;
                        continue;
                    }
                },
            };
            match self.watch_from(start).await {
                WatchEnd::Broken(e) => {
                    debug!(error = %e, "catalogue watch broke; re-watching");
                    // Complete up to `revision`: resume right after it.
                    next = Some(self.view.read().revision + 1);
                    tokio::time::sleep(pause).await;
                }
                WatchEnd::Reload(reason) => {
                    warn!(%reason, "catalogue watch lost its history; reloading");
                    next = None;
                }
            }
        }
    }

    /// Watches the prefix from `start` and applies every response until the
    /// watch ends.
    async fn watch_from(&self, start: i64) -> WatchEnd {
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(start)
            .with_progress_notify();
        // The watch follows the current member: it ends when requests
        // move off the member it was opened on.
        let member = self.current.load(Ordering::Acquire);
        let mut wc = self.client().watch_client();
        let mut stream = match self
            .call(
                "watch the catalogue",
                wc.watch(self.ks.prefix().to_vec(), Some(opts)),
            )
            .await
        {
            Ok(s) => s,
            Err(e) => return WatchEnd::Broken(e),
        };
        loop {
            let moved = self.moved.notified();
            if self.current.load(Ordering::Acquire) != member {
                return WatchEnd::Broken(StorageError::Unavailable {
                    reason: "moved to another etcd member".to_owned(),
                });
            }
            let msg = tokio::select! {
                m = stream.message() => m,
                () = self.resync.notified() => {
                    return WatchEnd::Reload("the view lags the linearizable reads".to_owned());
                }
                () = moved => continue,
            };
            let resp = match msg {
                Ok(Some(resp)) => resp,
                Ok(None) => {
                    return WatchEnd::Broken(StorageError::Unavailable {
                        reason: "watch stream closed".to_owned(),
                    });
                }
                Err(e) => return WatchEnd::Broken(etcd_error("watch the catalogue")(e)),
            };
            if resp.canceled() || resp.compact_revision() != 0 {
                return WatchEnd::Reload(format!(
                    "watch cancelled (compacted at revision {}): {}",
                    resp.compact_revision(),
                    resp.cancel_reason()
                ));
            }
            if resp.events().is_empty() {
                continue;
            }
            {
                let mut view = self.view.write();
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let change = match ev.event_type() {
                        EventType::Put => Change::Put(kv.key().to_vec(), kv.value().to_vec()),
                        EventType::Delete => Change::Delete(kv.key().to_vec()),
                    };
                    if !view.apply(&self.ks, change) {
                        warn!(key = %String::from_utf8_lossy(kv.key()), "ignoring a malformed catalogue entry in etcd");
                    }
                    // etcd never splits one revision's events across
                    // responses (no fragmenting requested), so after this
                    // response the view is complete up to its last event.
                    // (The header's revision is not: a catching-up watcher
                    // gets the store's current revision there while later
                    // batches are still to come.)
                    view.revision = view.revision.max(kv.mod_revision());
                }
            }
            self.changes.send_modify(|c| *c += 1);
        }
    }

    /// The freshness task (I3).
    async fn freshness_task(self: Arc<Self>) {
        let period = self.delta / 4;
        let mut behind = 0u32;
        let mut pause = period;
        loop {
            tokio::time::sleep(pause).await;
            pause = period;
            let start = Instant::now();
            // Deadline Δ/4: a read stuck on a dead or frozen member gives
            // up (and moves to another member) early enough that its retry
            // still refreshes `last_fresh` within Δ.
            let generation = match self.read_gen(period).await {
                Ok(g) => g,
                Err(e) => {
                    debug!(error = %e, "freshness read of the catalogue generation failed");
                    pause = retry_pause(self.delta);
                    continue;
                }
            };
            if self
                .wait_view(Instant::now() + period, |v| v.generation >= generation)
                .await
            {
                behind = 0;
                let mut last = self.last_fresh.lock();
                if last.is_none_or(|t| t < start) {
                    *last = Some(start);
                }
            } else {
                behind += 1;
                if behind >= 2 {
                    warn!(
                        etcd_gen = generation,
                        view_gen = self.view.read().generation,
                        "the catalogue view lags etcd; reloading"
                    );
                    behind = 0;
                    self.resync.notify_one();
                }
            }
        }
    }

    /// The lease task: one keep-alive round every min(TTL/3, Δ/2), each
    /// with the deadline Δ/4, retried after Δ/16 (on the next member) if it
    /// failed; a new lease (and registration) only once etcd answers that
    /// the lease expired. A lease whose keep-alives could not get through
    /// for a while is not given up locally: etcd keeps it across an
    /// election, and the next round that reaches a live member renews it.
    async fn lease_task(self: Arc<Self>, ttl: Duration) {
        let period = (ttl / 3).min(self.delta / 2);
        loop {
            let id = self.lease_id();
            let sent = Instant::now();
            let mut lc = self.client().lease_client();
            let round = self
                .call_within("keep the lease alive", self.delta / 4, async move {
                    // `keep_alive` opens the stream and waits for the answer
                    // to its first keep-alive: one whole round.
                    match lc.keep_alive(id).await {
                        Ok(_) => Ok(true),
                        // etcd answered TTL ≤ 0: the lease is gone.
                        Err(etcd_client::Error::LeaseKeepAliveError(_)) => Ok(false),
                        Err(e) => Err(e),
                    }
                })
                .await;
            let pause = match round {
                Ok(true) => {
                    let mut lease = self.lease.lock();
                    lease.valid_until = lease.valid_until.max(sent + lease.ttl);
                    period
                }
                Ok(false) => {
                    warn!("this node's etcd lease expired");
                    match self.renew_lease(ttl).await {
                        Ok(()) => period,
                        Err(e) => {
                            warn!(error = %e, "could not renew this node's etcd lease");
                            retry_pause(self.delta)
                        }
                    }
                }
                Err(e) => {
                    debug!(error = %e, "lease keep-alive failed");
                    retry_pause(self.delta)
                }
            };
            tokio::time::sleep(pause).await;
        }
    }

    /// Grants a new lease and registers the node under it.
    async fn renew_lease(&self, ttl: Duration) -> Result<(), StorageError> {
        let (id, state) = self.grant(ttl).await?;
        self.lease_id.store(id, Ordering::Release);
        *self.lease.lock() = state;
        info!(
            lease = format_args!("{id:x}"),
            "granted a new etcd lease for this node"
        );
        self.register(ttl).await
    }

    async fn grant(&self, ttl: Duration) -> Result<(i64, LeaseState), StorageError> {
        let sent = Instant::now();
        let mut lc = self.client().lease_client();
        let secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX).max(2);
        let resp = self.call("grant a lease", lc.grant(secs, None)).await?;
        let granted = Duration::from_secs(u64::try_from(resp.ttl()).unwrap_or(0));
        Ok((
            resp.id(),
            LeaseState {
                valid_until: sent + granted,
                ttl: granted,
            },
        ))
    }

    /// The registry task: publish `nodes/<id>` whenever the view's
    /// generation (or the lease) changes.
    async fn registry_task(self: Arc<Self>) {
        let mut rx = self.changes.subscribe();
        let mut published: Option<(u64, i64)> = None;
        loop {
            let now = (self.view.read().generation, self.lease_id());
            if published != Some(now) {
                let key = self.ks.node(&self.node_id);
                let record = self.node_record();
                let mut kv = self.client().kv_client();
                let put = kv.put(key, record, Some(PutOptions::new().with_lease(now.1)));
                match self.call("publish the node's generation", put).await {
                    Ok(_) => published = Some(now),
                    Err(e) => debug!(error = %e, "publishing nodes/<id> failed; retrying"),
                }
            }
            // Wake on a view change, or retry a failed publication soon.
            let _ = tokio::time::timeout(Duration::from_millis(500), rx.changed()).await;
        }
    }

    async fn begin_write(self: Arc<Self>) -> Result<u64, StorageError> {
        let start = Instant::now();
        let generation = self.read_gen(self.delta).await?;
        if !self
            .wait_view(Instant::now() + self.delta, |v| v.generation >= generation)
            .await
        {
            return Err(StorageError::Unavailable {
                reason: format!(
                    "this node's view did not reach catalogue generation {generation} within {} ms",
                    ms(self.delta)
                ),
            });
        }
        let view_gen = self.view.read().generation;
        if view_gen == generation {
            let mut last = self.last_fresh.lock();
            if last.is_none_or(|t| t < start) {
                *last = Some(start);
            }
        }
        Ok(view_gen)
    }

    async fn commit(self: Arc<Self>, read_at: u64, batch: Batch) -> Result<(), StorageError> {
        let new_gen = read_at.checked_add(1).ok_or(StorageError::WriteConflict)?;
        let gen_key = self.ks.gen_key();
        let mut compares = vec![Compare::value(
            gen_key.clone(),
            CompareOp::Equal,
            read_at.to_be_bytes().to_vec(),
        )];
        let mut or_else = vec![TxnOp::get(gen_key.clone(), None)];
        if let Some(fence) = &batch.fence {
            let job = self.ks.job(&fence.job);
            compares.push(Compare::create_revision(
                job.clone(),
                CompareOp::Equal,
                fence.token,
            ));
            or_else.push(TxnOp::get(job, None));
        }
        let mut ops: Vec<TxnOp> = batch
            .ops
            .iter()
            .map(|op| match op {
                Op::Put { table, key, value } => {
                    TxnOp::put(self.ks.table(*table, key), value.clone(), None)
                }
                Op::Delete { table, key } => TxnOp::delete(self.ks.table(*table, key), None),
            })
            .collect();
        ops.push(TxnOp::put(gen_key, new_gen.to_be_bytes().to_vec(), None));
        let txn = Txn::new().when(compares).and_then(ops).or_else(or_else);
        let resp = match self.txn("commit", txn).await {
            Ok(r) => r,
            Err(StorageError::Unavailable { reason }) => {
                return Err(StorageError::Unavailable {
                    reason: format!("the outcome of a catalogue commit is unknown: {reason}"),
                });
            }
            Err(e) => return Err(e),
        };
        // The commit happened at etcd before this instant: the start of
        // the revocation window (I4).
        let committed = Instant::now();
        if !resp.succeeded() {
            if let Some(fence) = &batch.fence {
                let kvs = all_kvs(&resp);
                let job_key = self.ks.job(&fence.job);
                let current = kvs
                    .iter()
                    .find(|kv| kv.key() == job_key.as_slice())
                    .map(|kv| kv.create_revision());
                if current != Some(fence.token) {
                    return Err(StorageError::Fenced {
                        job: fence.job.clone(),
                    });
                }
            }
            return Err(StorageError::WriteConflict);
        }
        // Read-your-writes: the view must hold the commit before we return.
        if !self
            .wait_view(committed + self.delta, |v| v.generation >= new_gen)
            .await
        {
            return Err(StorageError::Unavailable {
                reason: format!(
                    "committed catalogue generation {new_gen}, but this node's view did not apply it within {} ms",
                    ms(self.delta)
                ),
            });
        }
        if batch.revokes {
            // I4: every registered node applied the change, or any node
            // that did not has been unable to prove its view fresh since.
            let deadline = committed + self.delta + REVOCATION_MARGIN;
            let all = self
                .wait_view(deadline, |v| v.nodes.values().all(|g| *g >= new_gen))
                .await;
            if !all {
                let lagging: Vec<String> = self
                    .view
                    .read()
                    .nodes
                    .iter()
                    .filter(|(_, g)| **g < new_gen)
                    .map(|(n, _)| n.clone())
                    .collect();
                warn!(
                    generation = new_gen,
                    ?lagging,
                    "revocation: nodes did not confirm; waited the staleness bound instead"
                );
            }
        }
        Ok(())
    }

    async fn counter_get(self: Arc<Self>, key: Vec<u8>) -> Result<u64, StorageError> {
        let full = self.ks.table(Table::GcmCounters, &key);
        match self.get("read a GCM counter", full).await?.0 {
            None => Ok(0),
            Some(kv) => decode_counter(&key, kv.value()),
        }
    }

    async fn counter_reserve(
        self: Arc<Self>,
        key: Vec<u8>,
        expected: u64,
        new: u64,
    ) -> Result<bool, StorageError> {
        let full = self.ks.table(Table::GcmCounters, &key);
        let put = TxnOp::put(full.clone(), new.to_be_bytes().to_vec(), None);
        if expected == 0 {
            // 0 is also the value of a counter never written.
            let txn = Txn::new()
                .when([Compare::version(full.clone(), CompareOp::Equal, 0)])
                .and_then([put.clone()]);
            if self.txn("reserve GCM invocations", txn).await?.succeeded() {
                return Ok(true);
            }
        }
        let txn = Txn::new()
            .when([Compare::value(
                full,
                CompareOp::Equal,
                expected.to_be_bytes().to_vec(),
            )])
            .and_then([put]);
        Ok(self.txn("reserve GCM invocations", txn).await?.succeeded())
    }

    async fn leadership(self: Arc<Self>, job: String) -> Result<Option<Fence>, StorageError> {
        if !self.lease_alive() {
            return Ok(None);
        }
        let lease = self.lease_id();
        let key = self.ks.job(&job);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                self.node_id.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key, None)]);
        let resp = self.txn("campaign for a job", txn).await?;
        if resp.succeeded() {
            // The key was created by this transaction: its create_revision
            // is the transaction's revision.
            let token = resp.header().map_or(0, |h| h.revision());
            return Ok((token > 0).then_some(Fence { job, token }));
        }
        let Some(kv) = first_kv(&resp) else {
            return Ok(None);
        };
        let ours = kv.value() == self.node_id.as_bytes() && kv.lease() == lease;
        Ok((ours && self.lease_alive()).then(|| Fence {
            job,
            token: kv.create_revision(),
        }))
    }

    async fn publish_audit_head(self: Arc<Self>, head: AuditHead) -> Result<(), StorageError> {
        let key = self.ks.audit_head(&head.node);
        let value = serde_json::to_vec(&head).map_err(|source| StorageError::Serialize {
            what: "audit head",
            source,
        })?;
        for _ in 0..16 {
            let (kv, _) = self.get("read an audit head", key.clone()).await?;
            let compare = match &kv {
                None => Compare::version(key.clone(), CompareOp::Equal, 0),
                Some(kv) => {
                    let old = decode_head(&key, kv.value())?;
                    if old.seq > head.seq {
                        return Err(StorageError::Corrupt {
                            cf: "audit/heads",
                            key_hex: hex_encode(&key),
                            reason: "a published audit head cannot go back",
                        });
                    }
                    Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision())
                }
            };
            let txn =
                Txn::new()
                    .when([compare])
                    .and_then([TxnOp::put(key.clone(), value.clone(), None)]);
            if self.txn("publish an audit head", txn).await?.succeeded() {
                return Ok(());
            }
        }
        Err(StorageError::WriteConflict)
    }

    /// Stores `roots` in this node's registry record now (the registry
    /// task republishes it with every later heartbeat).
    async fn publish_roots(self: Arc<Self>, roots: NodeRoots) -> Result<(), StorageError> {
        *self.roots.lock() = Some(roots);
        let mut kv = self.client().kv_client();
        let put = kv.put(
            self.ks.node(&self.node_id),
            self.node_record(),
            Some(PutOptions::new().with_lease(self.lease_id())),
        );
        self.call("publish the node's root epochs", put).await?;
        Ok(())
    }

    /// Linearizable read of every `nodes/<id>` record's roots.
    async fn node_roots(self: Arc<Self>) -> Result<Vec<PeerRoots>, StorageError> {
        let prefix = self.ks.node("");
        let mut kv = self.client().kv_client();
        let mut resp = self
            .call(
                "read the nodes' root epochs",
                kv.get(prefix.clone(), Some(GetOptions::new().with_prefix())),
            )
            .await?;
        resp.take_kvs()
            .iter()
            .map(|kv| {
                let node = String::from_utf8_lossy(&kv.key()[prefix.len()..]).into_owned();
                let record: NodeRecord = serde_json::from_slice(kv.value()).map_err(|source| {
                    StorageError::CorruptJson {
                        cf: "nodes",
                        key_hex: hex_encode(kv.key()),
                        source,
                    }
                })?;
                Ok(PeerRoots {
                    node,
                    roots: record.roots,
                })
            })
            .collect()
    }

    async fn audit_heads(self: Arc<Self>) -> Result<Vec<AuditHead>, StorageError> {
        let mut kv = self.client().kv_client();
        let mut resp = self
            .call(
                "read the audit heads",
                kv.get(self.ks.audit_heads(), Some(GetOptions::new().with_prefix())),
            )
            .await?;
        resp.take_kvs()
            .iter()
            .map(|kv| decode_head(kv.key(), kv.value()))
            .collect()
    }
}

/// Most puts of one usage transaction: etcd refuses a transaction of more
/// than `--max-txn-ops` operations (128 by default).
const USAGE_PUTS_PER_TXN: usize = 64;

impl Shared {
    async fn usage_put(
        self: Arc<Self>,
        node: String,
        rows: Vec<(String, u32, Vec<u8>)>,
        watermark: u64,
    ) -> Result<(), StorageError> {
        // Plain puts of this node's own keys: no compare, no generation.
        // The watermark goes last, after every row is stored.
        for chunk in rows.chunks(USAGE_PUTS_PER_TXN) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|(key_id, version, value)| {
                    TxnOp::put(self.ks.usage(key_id, *version, &node), value.clone(), None)
                })
                .collect();
            self.txn("store use records", Txn::new().and_then(ops))
                .await?;
        }
        let mut kv = self.client().kv_client();
        self.call(
            "store the usage watermark",
            kv.put(
                self.ks.usage_mark(&node),
                watermark.to_be_bytes().to_vec(),
                None,
            ),
        )
        .await?;
        Ok(())
    }

    async fn usage_rows(self: Arc<Self>, key_id: String) -> Result<Vec<UsageRow>, StorageError> {
        let prefix = self.ks.usage_of_key(&key_id);
        let mut kv = self.client().kv_client();
        let mut resp = self
            .call(
                "read use records",
                kv.get(prefix.clone(), Some(GetOptions::new().with_prefix())),
            )
            .await?;
        resp.take_kvs()
            .iter()
            .map(|kv| {
                let corrupt = || StorageError::Corrupt {
                    cf: USAGE_TABLE,
                    key_hex: hex_encode(kv.key()),
                    reason: "usage key is not key id ‖ version ‖ node",
                };
                let rest = kv
                    .key()
                    .strip_prefix(prefix.as_slice())
                    .ok_or_else(corrupt)?;
                let (version, node) = rest.split_at_checked(4).ok_or_else(corrupt)?;
                let version = u32::from_be_bytes(version.try_into().map_err(|_| corrupt())?);
                let node = std::str::from_utf8(node).map_err(|_| corrupt())?;
                Ok(UsageRow {
                    node: node.to_owned(),
                    version,
                    value: kv.value().to_vec(),
                })
            })
            .collect()
    }

    async fn usage_watermark(self: Arc<Self>, node: String) -> Result<u64, StorageError> {
        let key = self.ks.usage_mark(&node);
        match self.get("read the usage watermark", key.clone()).await?.0 {
            None => Ok(0),
            Some(kv) => Ok(u64::from_be_bytes(kv.value().try_into().map_err(|_| {
                StorageError::Corrupt {
                    cf: USAGE_TABLE,
                    key_hex: hex_encode(&key),
                    reason: "usage watermark is not 8 bytes",
                }
            })?)),
        }
    }
}

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn decode_counter(key: &[u8], v: &[u8]) -> Result<u64, StorageError> {
    Ok(u64::from_be_bytes(v.try_into().map_err(|_| {
        StorageError::Corrupt {
            cf: Table::GcmCounters.name(),
            key_hex: hex_encode(key),
            reason: "counter is not 8 bytes",
        }
    })?))
}

fn decode_head(key: &[u8], v: &[u8]) -> Result<AuditHead, StorageError> {
    serde_json::from_slice(v).map_err(|source| StorageError::CorruptJson {
        cf: "audit/heads",
        key_hex: hex_encode(key),
        source,
    })
}

/// Every key-value the (else-branch) gets of a transaction returned.
fn all_kvs(resp: &TxnResponse) -> Vec<etcd_client::KeyValue> {
    resp.op_responses()
        .into_iter()
        .filter_map(|r| match r {
            TxnOpResponse::Get(mut g) => Some(g.take_kvs()),
            _ => None,
        })
        .flatten()
        .collect()
}

fn first_kv(resp: &TxnResponse) -> Option<etcd_client::KeyValue> {
    all_kvs(resp).into_iter().next()
}

impl EtcdEngine {
    /// Connects to etcd, checks the keyspace's format version (writing it
    /// and the generation on a new cluster), loads the catalogue, registers
    /// this node under a new lease (TTL ≈ 2Δ) and starts the engine's tasks.
    /// Blocks for at most a few Δ.
    ///
    /// # Errors
    ///
    /// `Db` (op `"check the etcd configuration"`, source a
    /// [`ConfigError`]) for a malformed configuration or unreadable TLS
    /// file; [`StorageError::FormatTooNew`]/[`StorageError::FormatTooOld`]
    /// for a keyspace of another format; [`StorageError::Unavailable`] if
    /// etcd cannot be reached within Δ, or if another live process is
    /// registered with the same node id; `Db` for other etcd errors.
    pub fn connect(config: EtcdConfig) -> Result<EtcdEngine, StorageError> {
        config.validate().map_err(config_error)?;
        let options = connect_options(&config)?;
        let runtime = Background(Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("kms-etcd")
                .enable_all()
                .build()
                .map_err(|source| StorageError::Db {
                    op: "start the etcd engine's runtime",
                    source: DbError::new(source),
                })?,
        ));
        let delta = config.staleness_bound;
        let endpoints = config.endpoints.clone();
        let opts = options.clone();
        // One client per member. Without etcd authentication connecting is
        // lazy (no round trip); with it, a member down now is connected
        // later by the members task.
        let clients = runtime.run(async move {
            let mut clients = Vec::new();
            let mut first_error = None;
            for endpoint in &endpoints {
                match connect_member(endpoint, &opts, delta).await {
                    Ok(c) => clients.push(Some(c)),
                    Err(e) => {
                        debug!(%endpoint, error = %e, "could not connect to an etcd member");
                        first_error.get_or_insert(e);
                        clients.push(None);
                    }
                }
            }
            match first_error {
                Some(e) if clients.iter().all(Option::is_none) => Err(e),
                _ => Ok(clients),
            }
        })?;
        let current = clients.iter().position(Option::is_some).unwrap_or(0);
        let Some(fallback) = clients.iter().flatten().next().cloned() else {
            return Err(StorageError::Unavailable {
                reason: "no etcd member could be connected".to_owned(),
            });
        };
        let members = config
            .endpoints
            .iter()
            .zip(clients)
            .map(|(endpoint, client)| Member {
                endpoint: endpoint.clone(),
                client: RwLock::new(client),
            })
            .collect();
        let (changes, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            node_id: config.node_id,
            address: config.address,
            ks: Keyspace::new(&config.prefix),
            delta,
            members,
            current: AtomicUsize::new(current),
            fallback,
            options,
            moved: Notify::new(),
            view: RwLock::new(View::default()),
            changes,
            last_fresh: Mutex::new(None),
            lease: Mutex::new(LeaseState {
                valid_until: Instant::now(),
                ttl: Duration::ZERO,
            }),
            lease_id: AtomicI64::new(0),
            resync: Notify::new(),
            reloads: AtomicU64::new(0),
            roots: Mutex::new(None),
        });
        // Lease TTL ≈ 2Δ: a crashed node's registration and leadership end
        // within 2Δ; whole seconds, at least 2 (etcd's own minimum is
        // about 1.5 s with default election settings).
        let ttl = Duration::from_secs((2 * delta).as_secs_f64().ceil().max(2.0) as u64);
        let engine = EtcdEngine {
            shared: Arc::clone(&shared),
            runtime,
        };
        let rt = engine.runtime()?;
        let s = Arc::clone(&shared);
        let revision = engine.runtime.run(async move {
            // A member down at start moves the node to the next one.
            let mut tries = s.members.len();
            while let Err(e) = s.init_keyspace().await {
                tries -= 1;
                if tries == 0 || !matches!(e, StorageError::Unavailable { .. }) {
                    return Err(e);
                }
            }
            // Register (as having applied nothing) *before* loading: a
            // revoking commit either happened before the load (which then
            // holds it) or sees this node registered and waits for it (I4).
            let (id, state) = s.grant(ttl).await?;
            s.lease_id.store(id, Ordering::Release);
            *s.lease.lock() = state;
            s.register(ttl).await?;
            let start = Instant::now();
            let rev = s.reload().await?;
            *s.last_fresh.lock() = Some(start);
            Ok::<i64, StorageError>(rev)
        })?;
        rt.spawn(Arc::clone(&shared).view_task(revision));
        rt.spawn(Arc::clone(&shared).freshness_task());
        rt.spawn(Arc::clone(&shared).lease_task(ttl));
        rt.spawn(Arc::clone(&shared).registry_task());
        rt.spawn(Arc::clone(&shared).members_task());
        info!(node = %shared.node_id, revision, "connected the catalogue to etcd");
        Ok(engine)
    }

    fn runtime(&self) -> Result<&tokio::runtime::Runtime, StorageError> {
        self.runtime.get()
    }

    fn run<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T, StorageError>> + Send + 'static,
    ) -> Result<T, StorageError> {
        self.runtime.run(fut)
    }

    /// The etcd revision this node's view is complete up to (diagnostics).
    pub fn view_revision(&self) -> i64 {
        self.shared.view.read().revision
    }

    /// How many times the view was reloaded whole since connect: after a
    /// compaction removed history its watch needed, or when it lagged the
    /// linearizable reads (diagnostics; a growing count means trouble).
    pub fn view_reloads(&self) -> u64 {
        self.shared.reloads.load(Ordering::Relaxed)
    }
}

impl Shared {
    /// Writes `meta/format` and `meta/gen` on a new keyspace, and checks
    /// the format of an existing one (like `storage/src/db.rs`).
    async fn init_keyspace(&self) -> Result<(), StorageError> {
        let fk = self.ks.format();
        let gk = self.ks.gen_key();
        let txn = Txn::new()
            .when([Compare::version(fk.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                fk.clone(),
                FORMAT_VERSION.to_be_bytes().to_vec(),
                None,
            )])
            .or_else([TxnOp::get(fk.clone(), None)]);
        let resp = self.txn("write the format version", txn).await?;
        if !resp.succeeded() {
            let kv = first_kv(&resp).ok_or_else(|| StorageError::Unavailable {
                reason: "meta/format vanished while checking it".to_owned(),
            })?;
            let found =
                u32::from_be_bytes(kv.value().try_into().map_err(|_| StorageError::Corrupt {
                    cf: "meta",
                    key_hex: hex_encode(&fk),
                    reason: "format version is not 4 bytes",
                })?);
            if found > FORMAT_VERSION {
                return Err(StorageError::FormatTooNew {
                    found,
                    supported: FORMAT_VERSION,
                });
            }
            if found < MIN_FORMAT_VERSION {
                return Err(StorageError::FormatTooOld {
                    found,
                    supported: MIN_FORMAT_VERSION,
                });
            }
        }
        // The generation must exist: a compare on the value of a missing
        // key fails, so commits at generation 0 would never succeed.
        let txn = Txn::new()
            .when([Compare::version(gk.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(gk, 0u64.to_be_bytes().to_vec(), None)]);
        self.txn("write the generation", txn).await?;
        Ok(())
    }
}

/// A client to one member, connected within `limit`.
async fn connect_member(
    endpoint: &str,
    options: &ConnectOptions,
    limit: Duration,
) -> Result<Client, StorageError> {
    match tokio::time::timeout(limit, Client::connect([endpoint], Some(options.clone()))).await {
        Ok(r) => r.map_err(etcd_error("connect")),
        Err(_) => Err(StorageError::Unavailable {
            reason: format!("etcd did not answer within {} ms", ms(limit)),
        }),
    }
}

impl Shared {
    /// Connects the members that could not be connected at start (only
    /// with etcd authentication), one try per second; ends once all are.
    async fn members_task(self: Arc<Self>) {
        loop {
            let missing: Vec<usize> = (0..self.members.len())
                .filter(|&i| self.members[i].client.read().is_none())
                .collect();
            if missing.is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            for i in missing {
                let m = &self.members[i];
                if let Ok(c) = connect_member(&m.endpoint, &self.options, self.delta).await {
                    *m.client.write() = Some(c);
                }
            }
        }
    }
}

pub(crate) fn connect_options(config: &EtcdConfig) -> Result<ConnectOptions, StorageError> {
    let delta = config.staleness_bound;
    let mut options = ConnectOptions::new()
        // A connection attempt to a dead member gives up within a
        // freshness round.
        .with_connect_timeout(delta / 4)
        // Detects a dead or frozen member under an open stream (the watch)
        // within 3Δ/4.
        .with_keep_alive(delta / 4, delta / 2)
        .with_keep_alive_while_idle(true)
        // Fail fast on a member without a leader rather than wait on it.
        .with_require_leader(true);
    if let Some(auth) = &config.auth {
        options = options
            .with_user(auth.user.clone(), auth.password.expose_secret().to_owned())
            .with_auto_token_refresh(true);
    }
    let read = |what: &'static str, path: &std::path::Path| {
        std::fs::read(path).map_err(|source| {
            config_error(ConfigError::ReadFile {
                what,
                path: path.to_owned(),
                source,
            })
        })
    };
    if config.ca_file.is_some() || config.cert_file.is_some() {
        let mut tls = TlsOptions::new();
        if let Some(ca) = &config.ca_file {
            tls = tls.ca_certificate(Certificate::from_pem(read("CA", ca)?));
        }
        if let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) {
            let cert = read("client certificate", cert)?;
            let key = zeroize::Zeroizing::new(read("client key", key)?);
            tls = tls.identity(Identity::from_pem(cert, key.as_slice()));
        }
        options = options.with_tls(tls);
    }
    Ok(options)
}

/// The engine's runtime. Dropped with `shutdown_background`, which never
/// blocks: a plain `Runtime` panics when dropped inside another runtime
/// (an async `main` that fails to connect, say).
struct Background(Option<tokio::runtime::Runtime>);

impl Background {
    fn get(&self) -> Result<&tokio::runtime::Runtime, StorageError> {
        self.0.as_ref().ok_or_else(|| StorageError::Unavailable {
            reason: "the etcd engine is shut down".to_owned(),
        })
    }

    /// Runs `fut` on the runtime and waits for it on this thread through a
    /// std channel (`Runtime::block_on` would panic on a thread that is
    /// inside another runtime; this only blocks the calling thread).
    fn run<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T, StorageError>> + Send + 'static,
    ) -> Result<T, StorageError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.get()?.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().unwrap_or_else(|_| {
            Err(StorageError::Unavailable {
                reason: "the etcd engine is shut down".to_owned(),
            })
        })
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for EtcdEngine {
    fn drop(&mut self) {
        let Ok(rt) = self.runtime.get() else {
            return;
        };
        // Revoke the lease: the registration and any leadership end now,
        // not a TTL later. Bounded: a dead etcd must not hang the drop.
        let s = Arc::clone(&self.shared);
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rt.spawn(async move {
            let mut lc = s.client().lease_client();
            let r = tokio::time::timeout(Duration::from_secs(1), lc.revoke(s.lease_id())).await;
            let _ = tx.send(r.is_ok_and(|r| r.is_ok()));
        });
        if !rx.recv_timeout(Duration::from_secs(2)).unwrap_or(false) {
            warn!("could not revoke this node's etcd lease; it expires on its own");
        }
        // `Background` then shuts the runtime down without blocking.
    }
}

impl CatalogueEngine for EtcdEngine {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.shared.view.read().table(table).get(key).cloned())
    }

    fn scan(
        &self,
        table: Table,
        prefix: &[u8],
        after: Option<&[u8]>,
        f: &mut ScanFn<'_>,
    ) -> Result<(), StorageError> {
        // In chunks, so that `f` (which may read the engine) never runs
        // under the view's lock. A scan may therefore span a watch update;
        // writes built on it are still checked by the commit's
        // compare-and-set of the generation.
        let mut cursor: Option<Vec<u8>> = after.map(<[u8]>::to_vec);
        loop {
            let chunk = self
                .shared
                .view
                .read()
                .chunk(table, prefix, cursor.as_deref(), SCAN_CHUNK);
            let full = chunk.len() == SCAN_CHUNK;
            for (k, v) in &chunk {
                if !f(k, v)? {
                    return Ok(());
                }
            }
            match chunk.into_iter().next_back() {
                Some((k, _)) if full => cursor = Some(k),
                _ => return Ok(()),
            }
        }
    }

    fn last_key(&self, table: Table, prefix: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.shared.view.read().last_key(table, prefix))
    }

    fn generation(&self) -> u64 {
        self.shared.view.read().generation
    }

    fn check_fresh(&self) -> Result<(), StorageError> {
        self.shared.check_fresh()
    }

    fn begin_write(&self) -> Result<u64, StorageError> {
        self.run(Arc::clone(&self.shared).begin_write())
    }

    fn commit(&self, read_at: u64, batch: Batch) -> Result<(), StorageError> {
        self.run(Arc::clone(&self.shared).commit(read_at, batch))
    }

    fn counter_get(&self, key: &[u8]) -> Result<u64, StorageError> {
        self.run(Arc::clone(&self.shared).counter_get(key.to_vec()))
    }

    fn counter_reserve(&self, key: &[u8], expected: u64, new: u64) -> Result<bool, StorageError> {
        self.run(Arc::clone(&self.shared).counter_reserve(key.to_vec(), expected, new))
    }

    fn leadership(&self, job: &str) -> Result<Option<Fence>, StorageError> {
        self.run(Arc::clone(&self.shared).leadership(job.to_owned()))
    }

    fn publish_audit_head(&self, head: &AuditHead) -> Result<(), StorageError> {
        self.run(Arc::clone(&self.shared).publish_audit_head(head.clone()))
    }

    fn audit_heads(&self) -> Result<Vec<AuditHead>, StorageError> {
        self.run(Arc::clone(&self.shared).audit_heads())
    }

    fn publish_roots(&self, roots: &NodeRoots) -> Result<(), StorageError> {
        self.run(Arc::clone(&self.shared).publish_roots(roots.clone()))
    }

    fn node_roots(&self) -> Result<Option<Vec<PeerRoots>>, StorageError> {
        self.run(Arc::clone(&self.shared).node_roots()).map(Some)
    }

    fn usage_put(
        &self,
        node: &str,
        rows: &[(String, u32, Vec<u8>)],
        watermark: u64,
    ) -> Result<(), StorageError> {
        self.run(Arc::clone(&self.shared).usage_put(node.to_owned(), rows.to_vec(), watermark))
    }

    fn usage_rows(&self, key_id: &str) -> Result<Vec<UsageRow>, StorageError> {
        self.run(Arc::clone(&self.shared).usage_rows(key_id.to_owned()))
    }

    fn usage_watermark(&self, node: &str) -> Result<u64, StorageError> {
        self.run(Arc::clone(&self.shared).usage_watermark(node.to_owned()))
    }

    fn cluster_view(&self) -> Option<ClusterView> {
        let view = self.shared.view.read();
        Some(ClusterView {
            node: self.shared.node_id.clone(),
            generation: view.generation,
            fresh: self.shared.check_fresh().is_ok(),
            peers: view
                .nodes
                .iter()
                .filter(|(n, _)| **n != self.shared.node_id)
                .map(|(n, g)| (n.clone(), *g))
                .collect(),
        })
    }
}
