//! The storage engine under the catalogue: the one interface both backends
//! implement (RocksDB on a single node, `kms-storage`; etcd for a cluster,
//! `kms-storage-etcd`). The idea is TiKV's `engine_traits`: the catalogue's
//! rules (lifecycle, aliases, re-wrap, GCM budgets) are written once, over
//! this trait, and know neither engine.
//!
//! The model is small on purpose:
//!
//! - **Tables** of byte keys to byte values, ordered by key
//!   ([`Table`]: a RocksDB column family, an etcd key prefix).
//! - A **generation**: a number that changes whenever what [`get`] and
//!   [`scan`] return may have changed. Every catalogue write is a [`Batch`]
//!   committed only if the generation is still the one its reads were made
//!   at ([`CatalogueEngine::commit`]): an optimistic compare-and-set over
//!   everything the write read. On a single node one writer lock makes this
//!   trivially true; in a cluster it is one etcd transaction comparing and
//!   bumping `meta/gen` (design note §2.3.3, I1).
//! - **Freshness** ([`CatalogueEngine::check_fresh`]): a cluster node may
//!   use a key only while its view is provably recent (I3); a single node
//!   always is.
//! - **Counters** outside the generation, for GCM invocation reservations
//!   (I5): compare-and-set on one key, never bumping the generation, so the
//!   encrypt path's reservations do not invalidate cached records.
//! - **Leadership** of background jobs, with a fencing token that writes
//!   made on the job's behalf carry (I6).
//!
//! [`get`]: CatalogueEngine::get
//! [`scan`]: CatalogueEngine::scan

use std::fmt;

use crate::error::StorageError;
use crate::usage::UsageRow;

/// A table of the catalogue. Its [`Table::name`] is the RocksDB column
/// family and the etcd key segment; both are part of the on-disk format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    /// Database metadata: format version, wrapped service keys.
    Meta,
    /// Key records, by key id.
    Keys,
    /// Version records, by `key id ‖ u32 BE version`.
    Versions,
    /// Index of versions being created (empty values).
    Pending,
    /// Alias name to key id.
    Aliases,
    /// Index of a key's aliases: `key id ‖ alias` (empty values).
    AliasesByKey,
    /// GCM invocation reservations (u64 BE) by `key id ‖ u32 BE version`.
    /// Written only through [`CatalogueEngine::counter_reserve`].
    GcmCounters,
}

impl Table {
    /// Every table, in a fixed order.
    pub const ALL: [Table; 7] = [
        Table::Meta,
        Table::Keys,
        Table::Versions,
        Table::Pending,
        Table::Aliases,
        Table::AliasesByKey,
        Table::GcmCounters,
    ];

    /// The table's name: RocksDB column family name and etcd key segment.
    /// `Meta` is RocksDB's `default` column family.
    pub const fn name(self) -> &'static str {
        match self {
            Table::Meta => "default",
            Table::Keys => "keys",
            Table::Versions => "versions",
            Table::Pending => "pending",
            Table::Aliases => "aliases",
            Table::AliasesByKey => "aliases_by_key",
            Table::GcmCounters => "gcm_counters",
        }
    }
}

/// One change in a [`Batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Store `value` under `key` in `table`.
    Put {
        /// The table.
        table: Table,
        /// The record's key.
        key: Vec<u8>,
        /// The record's value.
        value: Vec<u8>,
    },
    /// Remove `key` from `table` (no error if absent).
    Delete {
        /// The table.
        table: Table,
        /// The record's key.
        key: Vec<u8>,
    },
}

/// A fencing token: proof, at the time it was issued, that this node led a
/// background job ([`CatalogueEngine::leadership`]). A batch carrying one
/// commits only while the node still holds that leadership (etcd: the
/// job's election key still has the token's `create_revision`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The job's name (`"scheduler"`, `"root-rewrap"`).
    pub job: String,
    /// The engine's token for this term of leadership (etcd: the
    /// `create_revision` of `jobs/<job>`; 0 on a single node).
    pub token: i64,
}

/// The changes of one catalogue write, applied atomically.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    /// The changes, applied in order.
    pub ops: Vec<Op>,
    /// The write takes a right away (disables a key or version, schedules a
    /// deletion, tightens a policy): in a cluster, [`CatalogueEngine::commit`]
    /// returns only once no node can still act on the older state (I4).
    pub revokes: bool,
    /// Set when the write is made on behalf of a background job.
    pub fence: Option<Fence>,
}

impl Batch {
    /// Adds a put.
    pub fn put(&mut self, table: Table, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push(Op::Put {
            table,
            key: key.into(),
            value: value.into(),
        });
    }

    /// Adds a delete.
    pub fn delete(&mut self, table: Table, key: impl Into<Vec<u8>>) {
        self.ops.push(Op::Delete {
            table,
            key: key.into(),
        });
    }

    /// True if the batch changes nothing.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// A callback of [`CatalogueEngine::scan`]: gets each `(key, value)` in key
/// order, returns `Ok(false)` to stop.
pub type ScanFn<'a> = dyn FnMut(&[u8], &[u8]) -> Result<bool, StorageError> + 'a;

/// The latest audit chain head a node published (design note §2.3.6):
/// every node's log attests to the others' heads.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AuditHead {
    /// The node that published it.
    pub node: String,
    /// Sequence number of the last record the head covers (first is 1).
    pub seq: u64,
    /// That record's chain hash, hex (64 digits).
    pub hash: String,
    /// The HMAC of the checkpoint certifying it, hex.
    pub checkpoint_mac: String,
    /// When it was published, ms since the Unix epoch (wall clock; for
    /// display and merging only, never for ordering within a chain).
    pub published_ms: u64,
}

/// The root keys one node's HSM holds, as the node publishes them in its
/// registry record (design note §1.5, §2.3.2: per-node HSMs hold copies of
/// the same roots, found by CKA_ID `kms-root/<epoch>`). A cluster adopts a
/// new wrapping epoch only once every registered node holds it.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct NodeRoots {
    /// The root epochs present in the node's HSM, ascending.
    pub held: Vec<u32>,
    /// The epoch the node wraps new versions under now.
    pub wrapping: u32,
}

/// One registered node's published roots ([`CatalogueEngine::node_roots`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRoots {
    /// The node's id.
    pub node: String,
    /// What it published; `None` if it has not published its roots (yet:
    /// it is starting, or runs a build that does not publish them).
    pub roots: Option<NodeRoots>,
}

/// What a node sees of the cluster, for health and operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterView {
    /// This node's id.
    pub node: String,
    /// The generation this node's view holds.
    pub generation: u64,
    /// Whether the node may serve key use now ([`CatalogueEngine::check_fresh`]).
    pub fresh: bool,
    /// The other nodes registered now: (node id, generation applied).
    pub peers: Vec<(String, u64)>,
}

/// A catalogue storage engine. All methods block (call them from blocking
/// threads); all are safe to call concurrently.
///
/// Every error is a [`StorageError`]: `Db` for an engine failure,
/// [`StorageError::Unavailable`] when a cluster node cannot prove its view
/// recent or reach a quorum, [`StorageError::WriteConflict`] from `commit`.
pub trait CatalogueEngine: Send + Sync + fmt::Debug + 'static {
    /// The value under `key` in `table`, if any, from this node's view.
    ///
    /// # Errors
    ///
    /// `Db` if the engine fails.
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError>;

    /// Walks `table` in key order over keys starting with `prefix`, from
    /// the first key after `after` (exclusive) if given, until `f` returns
    /// `Ok(false)` or fails (its error is returned).
    ///
    /// # Errors
    ///
    /// `Db` if the engine fails; whatever `f` returns.
    fn scan(
        &self,
        table: Table,
        prefix: &[u8],
        after: Option<&[u8]>,
        f: &mut ScanFn<'_>,
    ) -> Result<(), StorageError>;

    /// The greatest key in `table` starting with `prefix`, if any.
    ///
    /// # Errors
    ///
    /// `Db` if the engine fails.
    fn last_key(&self, table: Table, prefix: &[u8]) -> Result<Option<Vec<u8>>, StorageError>;

    /// The generation of this node's view. Changes (grows) whenever a
    /// committed write becomes visible to `get`/`scan`, whichever node made it.
    fn generation(&self) -> u64;

    /// Ok if this node may use keys now: its view is provably no older than
    /// the engine's staleness bound (design note §2.3.3, I3). A single node
    /// always may.
    ///
    /// # Errors
    ///
    /// [`StorageError::Unavailable`] naming why (no recent linearizable
    /// read, no quorum) when it may not.
    fn check_fresh(&self) -> Result<(), StorageError>;

    /// Brings this node's view up to the latest committed state and returns
    /// its generation: call before the reads of a read-modify-write.
    ///
    /// # Errors
    ///
    /// [`StorageError::Unavailable`] if the latest state cannot be
    /// established (no quorum); `Db` if the engine fails.
    fn begin_write(&self) -> Result<u64, StorageError>;

    /// Applies `batch` atomically, durably, and only if the generation is
    /// still `read_at`; bumps the generation. When it returns Ok the change
    /// is visible to this node's reads, and, if `batch.revokes`, no other
    /// node can act on the state before it any more.
    ///
    /// # Errors
    ///
    /// [`StorageError::WriteConflict`] if another write committed since
    /// `read_at` (nothing was applied: re-read and retry);
    /// [`StorageError::Fenced`] if `batch.fence` is no longer current
    /// (nothing was applied); [`StorageError::Unavailable`] if the outcome
    /// is unknown or no quorum answered; `Db` if the engine fails.
    fn commit(&self, read_at: u64, batch: Batch) -> Result<(), StorageError>;

    /// The value of the counter `key` (u64; 0 if never written), read from
    /// the store (not from a cache).
    ///
    /// # Errors
    ///
    /// `Db` or `Unavailable` if it cannot be read; `Corrupt` if malformed.
    fn counter_get(&self, key: &[u8]) -> Result<u64, StorageError>;

    /// Sets the counter `key` to `new` if it still holds `expected`
    /// (durably), without bumping the generation. Returns false, changing
    /// nothing, if it held something else.
    ///
    /// # Errors
    ///
    /// As [`CatalogueEngine::counter_get`].
    fn counter_reserve(&self, key: &[u8], expected: u64, new: u64) -> Result<bool, StorageError>;

    /// This node's fencing token for background job `job` if it leads the
    /// job now (campaigning, without blocking, if nobody does); `None` if
    /// another node leads it. A single node always leads.
    ///
    /// # Errors
    ///
    /// `Unavailable` if leadership cannot be determined.
    fn leadership(&self, job: &str) -> Result<Option<Fence>, StorageError>;

    /// Publishes this node's latest audit chain head (a cluster stores it
    /// under `audit/heads/<node>`; its `seq` never goes back). A single node
    /// has nobody to publish to: no-op.
    ///
    /// # Errors
    ///
    /// `Unavailable`/`Db` if it cannot be stored.
    fn publish_audit_head(&self, head: &AuditHead) -> Result<(), StorageError> {
        let _ = head;
        Ok(())
    }

    /// The latest audit heads every node published (empty on a single node).
    ///
    /// # Errors
    ///
    /// `Unavailable`/`Db` if they cannot be read; `Corrupt` if malformed.
    fn audit_heads(&self) -> Result<Vec<AuditHead>, StorageError> {
        Ok(Vec::new())
    }

    /// Publishes the root epochs this node's HSM holds and the one it wraps
    /// under (a cluster stores them in this node's registry record,
    /// `nodes/<node>`, before returning). A single node has nobody to tell:
    /// no-op.
    ///
    /// # Errors
    ///
    /// `Unavailable`/`Db` if it cannot be stored.
    fn publish_roots(&self, roots: &NodeRoots) -> Result<(), StorageError> {
        let _ = roots;
        Ok(())
    }

    /// Every registered (live) node's published roots, this node included,
    /// read from the store (linearizable, not from the view); `None` on a
    /// single node.
    ///
    /// # Errors
    ///
    /// `Unavailable`/`Db` if they cannot be read.
    fn node_roots(&self) -> Result<Option<Vec<PeerRoots>>, StorageError> {
        Ok(None)
    }

    /// Stores this node's use records ([`crate::UsageRecord`], encoded):
    /// `rows` of `(key id, version, value)`, each replacing the node's
    /// previous value for that version, then `watermark`, the node's audit
    /// sequence number through which every use is in a stored record (the
    /// node's start-up replays its audit log from there). Plain durable
    /// puts outside the generation: never a write conflict, never waits for
    /// other nodes' views. Each node writes only its own records. Not
    /// necessarily atomic as a whole (etcd limits a transaction's size),
    /// but `watermark` is written only after every row: each record carries
    /// its own `through_seq`, so a partial write is recovered exactly.
    ///
    /// # Errors
    ///
    /// `Db`/`Unavailable` if it cannot be stored (the caller keeps the
    /// uses and tries again).
    fn usage_put(
        &self,
        node: &str,
        rows: &[(String, u32, Vec<u8>)],
        watermark: u64,
    ) -> Result<(), StorageError>;

    /// Every node's stored use records of key `key_id`, read from the store
    /// (not from a cache), in no particular order.
    ///
    /// # Errors
    ///
    /// `Db`/`Unavailable` if they cannot be read; `Corrupt` if a stored key
    /// is malformed.
    fn usage_rows(&self, key_id: &str) -> Result<Vec<UsageRow>, StorageError>;

    /// The watermark `node` last stored with [`CatalogueEngine::usage_put`]
    /// (0 if never).
    ///
    /// # Errors
    ///
    /// `Db`/`Unavailable` if it cannot be read; `Corrupt` if malformed.
    fn usage_watermark(&self, node: &str) -> Result<u64, StorageError>;

    /// What this node sees of the cluster (`None` on a single node).
    fn cluster_view(&self) -> Option<ClusterView> {
        None
    }
}
