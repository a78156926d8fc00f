//! The per-version use record (issue 18): for every key version, how many
//! successful encrypt-side and decrypt-side uses it had and when it was
//! last used each way, so that an operator can answer "does anything still
//! use version N?".
//!
//! **Source of truth: the audit log.** Every key use is audited, durably,
//! before its reply is released, and its record names the operation, key
//! id, key version and outcome. So uses are counted from the audit
//! records themselves: the audit writer hands every durable batch to
//! [`UsageTracker::observe`] (in sequence order, before any submitter is
//! released), which classifies each record ([`classify`]) and adds it to
//! in-memory counters: no write per request. Counting what the log says
//! (rather than what a handler did) also means every path that uses a key
//! (gRPC, batch forms, Kubernetes, the AWS door) is counted the same way.
//!
//! **Persistence, bounded staleness.** A flusher thread stores the pending
//! uses every `audit.usage_flush_interval_ms` (default 5 s) with
//! [`kms_storage::CatalogueEngine::usage_put`]: one synced RocksDB write, or
//! plain etcd puts of this node's own records, never through the
//! catalogue's compare-and-set commit. Each stored record carries the audit
//! sequence number it covers (`through_seq`), and the node stores the
//! sequence number every stored record covers (its watermark) after them.
//!
//! **Exact across crashes.** At start-up, before the audit writer opens,
//! the audit records after the watermark are replayed, each counted only
//! if its sequence number is above its version's `through_seq`. A SIGKILL,
//! a power failure or a failed flush therefore loses no use and counts none
//! twice (as long as the audit log itself is intact). A graceful stop
//! flushes once more.
//!
//! **Reads** ([`KmsService::version_usage`]) sum the stored records of every
//! node (counts summed, times maximal) plus this node's pending uses. In a
//! cluster another node's uses are visible once it has flushed: at most one
//! flush interval late (plus the time a failing store takes to recover).
//! Counts never decrease and times never move back.
//!
//! Never logs plaintext, contexts or key material (it sees audit records only).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kms_storage::{
    AuditFilter, AuditReader, AuditRecord, Catalogue, KeyId, ResultCode, StorageError, UsageRecord,
};
use parking_lot::Mutex;

use kms_storage::{Permission, VersionState};

use super::{KmsService, Operation, RequestMeta};
use crate::error::{KmsError, Result};

/// What [`KmsService::version_usage`] reports for one key version, over
/// every node of the deployment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VersionUsage {
    /// Successful encrypt-side uses: Encrypt, GenerateDataKey,
    /// GenerateDataKeyWithoutPlaintext, ReEncrypt (as destination), the
    /// batch forms, Kubernetes encrypt, and the same through the AWS door.
    pub encrypt_count: u64,
    /// Successful decrypt-side uses: Decrypt (including data-key unwraps),
    /// ReEncrypt (as source), the batch forms, Kubernetes decrypt, and the
    /// same through the AWS door.
    pub decrypt_count: u64,
    /// Time of the last successful encrypt-side use, unix milliseconds
    /// (the commit time of its audit record); `None` if never used so.
    pub last_encrypt_ms: Option<u64>,
    /// Time of the last successful decrypt-side use, unix milliseconds;
    /// `None` if never used so.
    pub last_decrypt_ms: Option<u64>,
}

impl VersionUsage {
    /// Adds `other`'s uses: counts summed (saturating), the later times kept.
    pub fn merge(&mut self, other: &VersionUsage) {
        let mut record = self.record();
        record.merge(&other.record());
        *self = VersionUsage::from(record);
    }

    fn record(&self) -> UsageRecord {
        UsageRecord {
            encrypt_count: self.encrypt_count,
            decrypt_count: self.decrypt_count,
            last_encrypt_ms: self.last_encrypt_ms,
            last_decrypt_ms: self.last_decrypt_ms,
            through_seq: 0,
        }
    }
}

/// What [`KmsService::get_key_last_usage`] answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyLastUsage {
    /// The key's canonical id.
    pub key_id: KeyId,
    /// The uses of `versions`, summed.
    pub total: VersionUsage,
    /// The requested version, or every version of the key by number.
    pub versions: Vec<VersionUsageEntry>,
}

/// One version in a [`KeyLastUsage`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionUsageEntry {
    /// The version number.
    pub version: u32,
    /// Its state now.
    pub state: VersionState,
    /// Its uses.
    pub usage: VersionUsage,
}

impl From<UsageRecord> for VersionUsage {
    fn from(r: UsageRecord) -> Self {
        VersionUsage {
            encrypt_count: r.encrypt_count,
            decrypt_count: r.decrypt_count,
            last_encrypt_ms: r.last_encrypt_ms,
            last_decrypt_ms: r.last_decrypt_ms,
        }
    }
}

/// The side of a key use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// Encrypt, data key generation, re-encryption destination.
    Encrypt,
    /// Decrypt, re-encryption source.
    Decrypt,
}

/// The key use an audit record shows, if it is one: `(key id, version,
/// side)`. Only successful records with a key version count. `previous` is
/// the record just before it in the log: a re-encryption writes two records
/// of the same request in one group, the source's first and then the
/// destination's (`AuditFields::destination`).
pub(crate) fn classify<'a>(
    record: &'a AuditRecord,
    previous: Option<&AuditRecord>,
) -> Option<(&'a str, u32, Side)> {
    let event = &record.event;
    if event.result != ResultCode::Ok {
        return None;
    }
    let key = event.key_id.as_deref()?;
    let version = event.key_version?;
    let side = match event.operation.as_str() {
        "Encrypt"
        | "GenerateDataKey"
        | "GenerateDataKeyWithoutPlaintext"
        | "BatchEncrypt"
        | "BatchGenerateDataKey"
        | "KubernetesEncrypt" => Side::Encrypt,
        "Decrypt" | "BatchDecrypt" | "KubernetesDecrypt" => Side::Decrypt,
        // The batch form (issue 18) records its items as ReEncrypt does.
        op @ ("ReEncrypt" | "BatchReEncrypt") => {
            let destination = previous.is_some_and(|p| {
                p.seq + 1 == record.seq
                    && p.event.operation == op
                    && p.event.request_id == event.request_id
            });
            if destination {
                Side::Encrypt
            } else {
                Side::Decrypt
            }
        }
        _ => return None,
    };
    Some((key, version, side))
}

/// Adds one use at `time_ms` to `record`.
fn count(record: &mut UsageRecord, side: Side, time_ms: u64) {
    match side {
        Side::Encrypt => {
            record.encrypt_count = record.encrypt_count.saturating_add(1);
            record.last_encrypt_ms = Some(record.last_encrypt_ms.unwrap_or(0).max(time_ms));
        }
        Side::Decrypt => {
            record.decrypt_count = record.decrypt_count.saturating_add(1);
            record.last_decrypt_ms = Some(record.last_decrypt_ms.unwrap_or(0).max(time_ms));
        }
    }
}

type VersionRef = (String, u32);

/// Uses counted but not yet stored.
#[derive(Debug, Default)]
struct Pending {
    /// Per version, the uses since the last flush (`through_seq` unused).
    uses: HashMap<VersionRef, UsageRecord>,
    /// The last audit sequence number counted: every use up to it is in
    /// `uses` or stored.
    through: u64,
}

/// What this node has stored.
#[derive(Debug, Default)]
struct Stored {
    /// This node's stored records, for the keys in `loaded`: only this
    /// node writes them, so once read they stay current here.
    own: HashMap<VersionRef, UsageRecord>,
    /// Keys whose records `own` holds.
    loaded: HashSet<String>,
    /// The watermark last stored.
    watermark: u64,
}

/// Counts key version uses from the audit log and stores them in batches.
#[derive(Debug)]
pub(crate) struct UsageTracker {
    catalogue: Catalogue,
    /// This node's id in the usage records (`""` on a single node).
    node: String,
    /// The hot path: the audit writer thread adds to it.
    pending: Mutex<Pending>,
    /// Held by a flush from taking `pending` until the store has it, and by
    /// readers around their read of store plus `pending`, so that a reader
    /// never sees uses twice or not at all.
    stored: Mutex<Stored>,
}

impl UsageTracker {
    /// Replays this node's audit log after its stored watermark into the
    /// pending uses. Call before the audit writer opens (nothing is
    /// appended meanwhile).
    ///
    /// # Errors
    ///
    /// Storage errors reading the watermark, the records or the log.
    pub(crate) fn open(
        catalogue: Catalogue,
        node: String,
        audit: &AuditReader,
    ) -> std::result::Result<Arc<UsageTracker>, StorageError> {
        let watermark = catalogue.engine().usage_watermark(&node)?;
        let last = audit.last_seq()?;
        let tracker = UsageTracker {
            catalogue,
            node,
            pending: Mutex::new(Pending {
                uses: HashMap::new(),
                through: last,
            }),
            stored: Mutex::new(Stored {
                watermark,
                ..Stored::default()
            }),
        };
        if watermark > last {
            // Not the log the records were counted from (a database
            // replaced under the records): count from here on.
            tracing::warn!(
                watermark,
                audit_head = last,
                "the stored usage watermark is beyond the audit log; not replaying"
            );
        } else {
            tracker.replay(audit, watermark, last)?;
        }
        Ok(Arc::new(tracker))
    }

    fn replay(
        &self,
        audit: &AuditReader,
        mut after: u64,
        last: u64,
    ) -> std::result::Result<(), StorageError> {
        let filter = AuditFilter::default();
        let mut previous: Option<AuditRecord> = None;
        let mut replayed = 0u64;
        while after < last {
            let page = audit.query_range(&filter, Some(after), last, kms_storage::MAX_PAGE_SIZE)?;
            for record in &page.records {
                if let Some((key, version, side)) = classify(record, previous.as_ref()) {
                    let covered = self.stored_record(key, version)?.through_seq;
                    if record.seq > covered {
                        let mut pending = self.pending.lock();
                        let entry = pending.uses.entry((key.to_owned(), version)).or_default();
                        count(entry, side, record.time_micros / 1000);
                        replayed += 1;
                    }
                }
            }
            previous = page.records.last().cloned();
            match page.next_after {
                Some(next) if next > after => after = next,
                _ => break,
            }
        }
        if replayed > 0 {
            tracing::info!(replayed, "counted key version uses from the audit log");
        }
        Ok(())
    }

    /// This node's stored record of a version (default if none), reading
    /// the key's records from the store the first time.
    fn stored_record(
        &self,
        key: &str,
        version: u32,
    ) -> std::result::Result<UsageRecord, StorageError> {
        let mut stored = self.stored.lock();
        self.load(&mut stored, key)?;
        Ok(stored
            .own
            .get(&(key.to_owned(), version))
            .copied()
            .unwrap_or_default())
    }

    fn load(&self, stored: &mut Stored, key: &str) -> std::result::Result<(), StorageError> {
        if stored.loaded.contains(key) {
            return Ok(());
        }
        for row in self.catalogue.engine().usage_rows(key)? {
            if row.node == self.node {
                let record = UsageRecord::decode(key.as_bytes(), &row.value)?;
                stored.own.insert((key.to_owned(), row.version), record);
            }
        }
        stored.loaded.insert(key.to_owned());
        Ok(())
    }

    /// Counts the uses among `records` (a durable audit batch, in sequence
    /// order). Called on the audit writer thread: only in-memory work.
    pub(crate) fn observe(&self, records: &[AuditRecord]) {
        let mut pending = self.pending.lock();
        let mut previous: Option<&AuditRecord> = None;
        for record in records {
            if let Some((key, version, side)) = classify(record, previous) {
                let entry = pending.uses.entry((key.to_owned(), version)).or_default();
                count(entry, side, record.time_micros / 1000);
            }
            pending.through = pending.through.max(record.seq);
            previous = Some(record);
        }
    }

    /// Stores the pending uses (and the watermark). On failure the uses
    /// stay pending for the next flush.
    ///
    /// # Errors
    ///
    /// The store's error.
    pub(crate) fn flush(&self) -> std::result::Result<(), StorageError> {
        let mut stored = self.stored.lock();
        let (uses, through) = {
            let mut pending = self.pending.lock();
            (std::mem::take(&mut pending.uses), pending.through)
        };
        if uses.is_empty() && through == stored.watermark {
            return Ok(());
        }
        match self.store(&mut stored, &uses, through) {
            Ok(()) => Ok(()),
            Err(e) => {
                let mut pending = self.pending.lock();
                for (version, delta) in uses {
                    pending.uses.entry(version).or_default().merge(&delta);
                }
                Err(e)
            }
        }
    }

    fn store(
        &self,
        stored: &mut Stored,
        uses: &HashMap<VersionRef, UsageRecord>,
        through: u64,
    ) -> std::result::Result<(), StorageError> {
        let mut updated = Vec::with_capacity(uses.len());
        let mut rows = Vec::with_capacity(uses.len());
        for ((key, version), delta) in uses {
            self.load(stored, key)?;
            let mut record = stored
                .own
                .get(&(key.clone(), *version))
                .copied()
                .unwrap_or_default();
            record.merge(delta);
            record.through_seq = through;
            rows.push((key.clone(), *version, record.encode()?));
            updated.push(((key.clone(), *version), record));
        }
        self.catalogue
            .engine()
            .usage_put(&self.node, &rows, through)?;
        stored.own.extend(updated);
        stored.watermark = through;
        Ok(())
    }

    /// Every node's uses of the versions of `key`, with this node's pending
    /// uses, by version.
    ///
    /// # Errors
    ///
    /// The store's error.
    pub(crate) fn key_usage(
        &self,
        key: &str,
    ) -> std::result::Result<HashMap<u32, VersionUsage>, StorageError> {
        let _stored = self.stored.lock();
        let mut by_version: HashMap<u32, UsageRecord> = HashMap::new();
        for row in self.catalogue.engine().usage_rows(key)? {
            let record = UsageRecord::decode(key.as_bytes(), &row.value)?;
            by_version.entry(row.version).or_default().merge(&record);
        }
        let pending = self.pending.lock();
        for ((k, version), delta) in &pending.uses {
            if k == key {
                by_version.entry(*version).or_default().merge(delta);
            }
        }
        Ok(by_version
            .into_iter()
            .map(|(v, r)| (v, VersionUsage::from(r)))
            .collect())
    }
}

/// The flusher thread and its stop flag; dropping it stops the thread and
/// flushes once more (after the audit writer has stopped, when dropped
/// with the service: `KmsService` declares it after the audit log).
#[derive(Debug)]
pub(crate) struct UsageFlusher {
    tracker: Arc<UsageTracker>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UsageFlusher {
    /// Starts the thread that flushes `tracker` every `interval`.
    ///
    /// # Errors
    ///
    /// The OS error if the thread cannot be spawned.
    pub(crate) fn start(
        tracker: Arc<UsageTracker>,
        interval: Duration,
    ) -> std::io::Result<UsageFlusher> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let tracker = Arc::clone(&tracker);
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("kms-usage-flush".into())
                .spawn(move || {
                    while !crate::background::wait_or_stop(&stop, interval) {
                        if let Err(e) = tracker.flush() {
                            tracing::warn!(error = %e, "storing key version uses failed; retrying at the next flush");
                        }
                    }
                })?
        };
        Ok(UsageFlusher {
            tracker,
            stop,
            thread: Some(thread),
        })
    }

    pub(crate) fn tracker(&self) -> &UsageTracker {
        &self.tracker
    }
}

impl Drop for UsageFlusher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            if thread.join().is_err() {
                tracing::error!("usage flusher thread panicked");
            }
        }
        // What a crash would leave to the start-up replay.
        if let Err(e) = self.tracker.flush() {
            tracing::warn!(error = %e, "storing key version uses at shutdown failed; the next start replays them from the audit log");
        }
    }
}

impl KmsService {
    /// The uses of version `version` of key `key` over every node: counts
    /// and last-use times of each side, including this node's uses not yet
    /// stored (another node's become visible within its flush interval,
    /// `audit.usage_flush_interval_ms`). A version never used (or that does
    /// not exist) reports zeros. Not audited and not authorized: the
    /// domain's own read (the API's `GetKeyLastUsage` is both).
    ///
    /// # Errors
    ///
    /// [`crate::error::KmsError::Storage`] if the stored records cannot be
    /// read (UNAVAILABLE in a cluster without quorum).
    pub fn version_usage(&self, key: &KeyId, version: u32) -> Result<VersionUsage> {
        Ok(self
            .usage
            .tracker()
            .key_usage(key.as_str())?
            .remove(&version)
            .unwrap_or_default())
    }

    /// [`KmsService::version_usage`] for every version of `key` that has
    /// any use recorded, by version number.
    ///
    /// # Errors
    ///
    /// As [`KmsService::version_usage`].
    pub fn key_usage(&self, key: &KeyId) -> Result<HashMap<u32, VersionUsage>> {
        Ok(self.usage.tracker().key_usage(key.as_str())?)
    }

    /// `GetKeyLastUsage`: the uses of `key` (id or alias), of version
    /// `version` only if given, else of each of its versions and summed.
    /// Authorized as DescribeKey (the describe permission) and audited.
    ///
    /// # Errors
    ///
    /// NOT_FOUND for an unknown key or a version it does not have;
    /// PERMISSION_DENIED without the describe permission; as
    /// [`KmsService::version_usage`] if the uses cannot be read.
    pub fn get_key_last_usage(
        &self,
        meta: &RequestMeta,
        key: &str,
        version: Option<u32>,
    ) -> Result<KeyLastUsage> {
        self.audited(meta, Operation::GetKeyLastUsage, Some(key), |audit| {
            let record = self.resolve_for(meta, audit, key, Permission::Describe)?;
            audit.key(&record.id, version);
            let mut versions = self.catalogue().list_versions(&record.id)?;
            if let Some(number) = version {
                versions.retain(|v| v.version == number);
                if versions.is_empty() {
                    return Err(KmsError::VersionNotFound {
                        key_id: record.id.clone(),
                        version: number,
                    });
                }
            }
            let mut uses = self.key_usage(&record.id)?;
            let mut total = VersionUsage::default();
            let versions = versions
                .into_iter()
                .map(|v| {
                    let usage = uses.remove(&v.version).unwrap_or_default();
                    total.merge(&usage);
                    VersionUsageEntry {
                        version: v.version,
                        state: v.state,
                        usage,
                    }
                })
                .collect();
            Ok(KeyLastUsage {
                key_id: record.id,
                total,
                versions,
            })
        })
    }

    /// Stores this node's pending uses now (the flusher does it every
    /// interval; a graceful stop once more).
    ///
    /// # Errors
    ///
    /// [`crate::error::KmsError::Storage`] if they cannot be stored (they
    /// stay pending).
    pub fn flush_usage(&self) -> Result<()> {
        Ok(self.usage.tracker().flush()?)
    }
}
