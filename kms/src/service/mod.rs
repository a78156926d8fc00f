//! The domain service: key lifecycle, encryption and auditing, on top
//! of the HSM layer and the storage layer. It knows nothing of gRPC.
//!
//! Every public operation is blocking (HSM and RocksDB calls) and runs on a
//! blocking worker thread, never on the async executor. Every operation that
//! touches a key or the catalogue goes through [`KmsService::audited`]: one
//! audit record per request, success, failure or denial, made durable before
//! the result is released. If the record cannot be written, the result is
//! dropped (plaintext zeroized) and the caller gets UNAVAILABLE: fail closed.
//!
//! Never logs plaintext, data keys, ciphertexts or encryption contexts.

mod aliases;
mod audit;
pub mod audit_witness;
mod authz;
mod backup;
mod batch;
pub(crate) mod checkpoint_key;
mod crypto;
pub(crate) mod import;
mod keys;
pub mod kubernetes;
mod lookup;
pub mod operation;
pub(crate) mod page_token;
mod reconcile;
mod restore;
pub mod root_rotation;
pub mod scheduler;
mod usage;
mod version_retirement;
pub(crate) mod working_keys;

pub use working_keys::WorkingKeyStats;

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use kms_hsm::{Hsm, KeyPurpose, RootVariant};
use kms_storage::{
    AuditConfig, AuditEvent, AuditLog, Catalogue, KeyId, ResultCode, Storage, StorageOptions,
    WrappedServiceKey,
};

use crate::auth::policy::{AccessControl, Roles};
use crate::config::{Config, LifecycleSettings, Limits, RotationSettings};
use crate::error::{KmsError, Result};

pub use audit::{AuditFollower, AuditListing, AuditQuery, AuditVerification};
pub use authz::EffectivePolicy;
pub use batch::{DataKeyItem, DecryptItem, EncryptItem, ReEncryptItem};
pub use crypto::{
    DataKey, DataKeyForm, DataKeyInput, DataKeySize, DecryptInput, Decrypted, EncryptInput,
    Encrypted, ReEncryptInput, ReEncrypted,
};
pub use import::{ImportParameters, ImportRefusal};
pub use keys::{
    CreateKeyInput, DEFAULT_DELETION_DAYS, KeyView, MAX_DELETION_DAYS, MIN_DELETION_DAYS,
    RotationPolicyInput,
};
pub(crate) use lookup::{ensure_usable, kek_object_id, new_kek_handle};
pub use operation::Operation;
pub use usage::{KeyLastUsage, VersionUsage, VersionUsageEntry};
pub use version_retirement::{
    DEFAULT_VERSION_DESTRUCTION_DAYS, MAX_VERSION_DESTRUCTION_DAYS, MIN_VERSION_DESTRUCTION_DAYS,
};

/// What the health probe found (see [`KmsService::readiness`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readiness {
    /// The HSM answered a token search and holds the audit MAC key (the
    /// active root key when the checkpoint key is wrapped).
    pub hsm_available: bool,
    /// The audit log accepts records (it is not poisoned).
    pub audit_writable: bool,
    /// The key catalogue may be used: always on a single node; on a
    /// cluster node, while its view is provably no older than Δ.
    pub catalogue_fresh: bool,
}

/// The audit principal of work the service does by itself (`audit.proto`,
/// `AuditEvent.principal`).
pub const SYSTEM_PRINCIPAL: &str = "system";

/// Who is calling and from where, as recorded in the audit log.
#[derive(Debug, Clone)]
pub struct RequestMeta {
    pub principal: String,
    pub peer: String,
    pub request_id: String,
}

impl RequestMeta {
    /// The service's own work (scheduled rotation and deletion, start-up
    /// reconciliation, a reload on SIGHUP), as `audit.proto` documents it:
    /// principal "system", empty peer, and a request id of its own
    /// (`<what>-<16 hex digits>`), so that two actions never share one.
    pub fn internal(what: &str) -> RequestMeta {
        use ring::rand::SecureRandom;
        let mut bytes = [0u8; 8];
        // A request id need not be secret; a failing RNG only makes it less
        // unique, never refuses the work.
        let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
        RequestMeta {
            principal: SYSTEM_PRINCIPAL.into(),
            peer: String::new(),
            request_id: format!("{what}-{}", hex::encode(bytes)),
        }
    }
}

/// What an operation learned that the audit record should say.
#[derive(Debug, Default)]
pub(crate) struct AuditFields {
    key_id: Option<String>,
    key_version: Option<u32>,
    context_digest: Option<[u8; 32]>,
    /// A second key the request used (ReEncrypt's destination): once its
    /// `key_id` is known it gets a record of its own, in the same audit
    /// group and with the same request id and outcome, so that an auditor
    /// following that key finds the request.
    destination: Option<Box<AuditFields>>,
}

impl AuditFields {
    pub(crate) fn key(&mut self, key_id: &KeyId, version: Option<u32>) {
        self.key_id = Some(key_id.to_string());
        if version.is_some() {
            self.key_version = version;
        }
    }
}

/// The outcome of an operation whose audit records (one, or two for a
/// request that names a destination key) are not durable yet. The result
/// (possibly plaintext) is released only by `finish`/`finish_async`.
#[derive(Debug)]
pub struct Deferred<T> {
    result: Result<T>,
    events: Vec<AuditEvent>,
}

/// Fail closed: whatever the operation produced (possibly plaintext,
/// zeroized on drop) is withheld when its audit record is not durable. (The
/// cause travels in the error and is logged at the request boundary.)
fn withhold<T>(result: Result<T>, error: kms_storage::StorageError) -> Result<T> {
    drop(result);
    Err(KmsError::AuditUnavailable {
        source: Some(error),
    })
}

/// The CKA_ID of the HMAC key that MACs audit checkpoints.
pub const AUDIT_MAC_KEY_ID: &[u8] = b"kms-audit-hmac/v1";

/// The service. Cheap to share (`Arc`) across handler tasks.
#[derive(Debug)]
pub struct KmsService {
    hsm: Arc<Hsm>,
    /// This node's database: its audit log, and (single node) the catalogue.
    storage: Arc<Storage>,
    /// The key catalogue: in `storage` on a single node, in etcd for a
    /// cluster (`[cluster]`).
    catalogue: Catalogue,
    /// This node's id in a cluster (`[cluster] node_id`); `None` alone.
    node_id: Option<String>,
    audit_log: AuditLog,
    /// A cluster node's audit head publisher; declared after `audit_log`
    /// so that the writer (which feeds it) stops first.
    audit_publisher: Option<audit_witness::AuditPublisher>,
    /// Key version uses (`usage`); declared after `audit_log` so that its
    /// last flush, when dropped, comes after the writer's last record.
    usage: usage::UsageFlusher,
    limits: Limits,
    rotation: RotationSettings,
    /// `[lifecycle]`: the version-destruction guard's quiet period.
    lifecycle: LifecycleSettings,
    access: AccessControl,
    key_locks: keys::KeyLocks,
    /// Wrapped key versions (issue 14): `None` when the token has no root
    /// key (every version is a token object).
    wrapped: Option<Wrapped>,
    /// The key that MACs audit checkpoints (token object or wrapped).
    checkpoint_key: Arc<checkpoint_key::CheckpointKey>,
    /// `[backup] dir`: where `Admin.CreateBackup` may write (None: refused).
    backup_dir: Option<std::path::PathBuf>,
}

/// What the service needs for wrapped key versions.
#[derive(Debug)]
pub(crate) struct Wrapped {
    /// The working-key cache (and the catalogue-integrity key).
    pub(crate) keys: working_keys::WorkingKeys,
    /// The active (highest verified) root epoch: new versions are wrapped
    /// under it. Raised at run time when root rotation adds a root
    /// (`root_rotation`). Whoever wraps a new version under it holds the
    /// read guard until the version is written (`active_epoch`), so once a
    /// new epoch is in force no version under an older one is still on
    /// its way to the catalogue.
    pub(crate) epoch: parking_lot::RwLock<u32>,
    /// The variant of every root of the token (a rotation keeps it).
    pub(crate) variant: RootVariant,
    /// Whether new versions are wrapped (else token objects).
    pub(crate) new_versions: bool,
    /// Outstanding import key pairs (bring your own key).
    pub(crate) imports: import::Imports,
}

impl Wrapped {
    /// The active root epoch, read-locked: hold the guard until the
    /// version wrapped under it is in the catalogue.
    pub(crate) fn active_epoch(&self) -> parking_lot::RwLockReadGuard<'_, u32> {
        self.epoch.read()
    }
}

impl KmsService {
    /// Opens the HSM token and the database, makes sure the audit MAC key
    /// exists, reconciles half-created key versions, and starts the audit writer.
    pub fn open(config: &Config) -> Result<KmsService, OpenError> {
        let hsm = Arc::new(Hsm::open(config.hsm.clone()).map_err(OpenError::Hsm)?);
        std::fs::create_dir_all(&config.data_dir).map_err(|source| OpenError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        let storage = Arc::new(
            Storage::open(&config.data_dir, &StorageOptions::default())
                .map_err(OpenError::Storage)?,
        );
        let catalogue = open_catalogue(&storage, config)?;
        let (wrapped, roots) = open_wrapped(&hsm, &catalogue, config)?;
        let checkpoint_key = Arc::new(checkpoint_key::CheckpointKey::open(
            &hsm, &storage, &catalogue, roots,
        )?);
        let mac_hsm = Arc::clone(&hsm);
        let mac_key = Arc::clone(&checkpoint_key);
        let mac: kms_storage::MacFn = Box::new(move |message: &[u8]| {
            mac_key
                .sign(&mac_hsm, message)
                .map(|mac| mac.to_vec())
                .map_err(|e| Box::new(e) as kms_storage::CallbackError)
        });
        let audit_config = AuditConfig {
            sync: config.audit.sync,
            checkpoint_every_records: config.audit.checkpoint_every_records,
            checkpoint_interval: Some(config.audit.checkpoint_interval),
            ..AuditConfig::default()
        };
        // A cluster node witnesses the others' heads and publishes its own;
        // a single node's log is exactly what it was without clusters.
        let (witnessing, audit_publisher) = match &config.cluster {
            None => (None, None),
            Some(cluster) => {
                let (w, p) = audit_witness::start(cluster.node_id.clone(), catalogue.clone())
                    .map_err(OpenError::AuditPublisher)?;
                (Some(w), Some(p))
            }
        };
        // Before the writer opens: replays the uses its log holds beyond
        // what is stored, then counts every durable record from the writer.
        let usage = usage::UsageTracker::open(
            catalogue.clone(),
            config
                .cluster
                .as_ref()
                .map(|c| c.node_id.clone())
                .unwrap_or_default(),
            &storage.audit_reader(),
        )
        .map_err(OpenError::Storage)?;
        let observer = {
            let usage = Arc::clone(&usage);
            Box::new(move |records: &[kms_storage::AuditRecord]| usage.observe(records))
        };
        let audit_log = storage
            .open_audit_log_observed(audit_config, mac, witnessing, Some(observer))
            .map_err(OpenError::Storage)?;
        let usage = usage::UsageFlusher::start(usage, config.audit.usage_flush_interval)
            .map_err(OpenError::UsageFlusher)?;
        let service = KmsService {
            hsm,
            storage,
            catalogue,
            node_id: config.cluster.as_ref().map(|c| c.node_id.clone()),
            audit_log,
            audit_publisher,
            usage,
            limits: config.limits.clone(),
            rotation: config.rotation.clone(),
            lifecycle: config.lifecycle.clone(),
            access: AccessControl::new(Roles {
                admins: config.auth.admins.clone(),
                auditors: config.auth.auditors.clone(),
                default_policy: config.auth.default_policy.clone(),
            }),
            key_locks: keys::KeyLocks::default(),
            wrapped,
            checkpoint_key,
            backup_dir: config.backup_dir.clone(),
        };
        service
            .reconcile_pending_versions()
            .map_err(OpenError::Reconcile)?;
        // Before anything serves: a restored catalogue's keys are rotated
        // and the restore audited (design note §1.6).
        service.finish_restore()?;
        // Cluster: tell the other nodes which roots this node's HSM holds
        // (root adoption waits for every node; `root_rotation`).
        service.publish_node_roots();
        Ok(service)
    }

    /// The roles in force; a configuration reload replaces them through
    /// this handle (`server::reload`).
    pub fn access(&self) -> &AccessControl {
        &self.access
    }

    pub fn hsm(&self) -> &Hsm {
        &self.hsm
    }

    /// The key catalogue (RocksDB on a single node, etcd in a cluster).
    pub fn catalogue(&self) -> &Catalogue {
        &self.catalogue
    }

    /// This node's id in a cluster; `None` for a single node.
    pub fn node_id(&self) -> Option<&str> {
        self.node_id.as_deref()
    }

    /// Whether this node may use keys now: a single node always may; a
    /// cluster node only while its catalogue view is provably no older
    /// than Δ (design note §2.3.3, I3). Health reports NOT_SERVING and key
    /// use answers UNAVAILABLE while it may not.
    pub fn catalogue_is_fresh(&self) -> bool {
        self.catalogue.check_fresh().is_ok()
    }

    /// Whether the audit checkpoint HMAC key is wrapped under a root (the
    /// `audit_checkpoint_key` meta record) rather than the token object
    /// `kms-audit-hmac/v1` (see `checkpoint_key`'s module docs).
    pub fn checkpoint_key_is_wrapped(&self) -> bool {
        self.checkpoint_key.is_wrapped()
    }

    /// Group-commit totals of the audit log, for metrics.
    pub fn audit_stats(&self) -> kms_storage::AuditStats {
        self.audit_log.stats()
    }

    /// A cluster node's audit head publishing totals, for metrics (`None`
    /// on a single node).
    pub fn audit_publish_counts(&self) -> Option<audit_witness::PublishCounts> {
        self.audit_publisher.as_ref().map(|p| p.stats.counts())
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Probes the dependencies every request needs (blocking: one HSM
    /// round trip). The HSM counts as available when a token search finds
    /// the audit MAC key if it is a token object, else the active root key
    /// (the wrapped checkpoint key is a session object): a search reads the token's storage, which a
    /// cached-handle operation would not, and goes through the HSM layer's
    /// recovery (so probing while it is down also brings it back once the
    /// token returns). The audit log is writable until a failed write has
    /// poisoned it (only a restart clears that).
    pub fn readiness(&self) -> Readiness {
        let probe = match (&*self.checkpoint_key, &self.wrapped) {
            (checkpoint_key::CheckpointKey::Token(id), _) => id.clone(),
            (_, Some(wrapped)) => kms_hsm::root_id(*wrapped.epoch.read()),
            // A wrapped checkpoint key without a root does not start.
            (_, None) => checkpoint_key::token_key_id(),
        };
        let hsm_available = match self.hsm.key_exists(&probe) {
            Ok(found) => found && !self.hsm.is_down(),
            Err(e) => {
                tracing::debug!(error = %e, "health probe: HSM unavailable");
                false
            }
        };
        Readiness {
            catalogue_fresh: self.catalogue_is_fresh(),
            hsm_available,
            audit_writable: !self.audit_log.is_poisoned(),
        }
    }

    /// Runs `work` and records its outcome in the audit log before returning
    /// it. `named_key` is the key as the request named it; `work` replaces it
    /// with the canonical id (and version, context digest) once known.
    pub(crate) fn audited<T>(
        &self,
        meta: &RequestMeta,
        operation: Operation,
        named_key: Option<&str>,
        work: impl FnOnce(&mut AuditFields) -> Result<T>,
    ) -> Result<T> {
        self.finish(self.deferred(meta, operation, named_key, work))
    }

    /// Runs `work` and builds its audit record, without writing it yet: the
    /// result must go through [`KmsService::finish`] or
    /// [`KmsService::finish_async`] before anyone sees it.
    pub(crate) fn deferred<T>(
        &self,
        meta: &RequestMeta,
        operation: Operation,
        named_key: Option<&str>,
        work: impl FnOnce(&mut AuditFields) -> Result<T>,
    ) -> Deferred<T> {
        let (result, events) = self.recorded(meta, operation, named_key, work);
        Deferred { result, events }
    }

    /// Makes the audit records durable (blocking), then releases the result.
    pub fn finish<T>(&self, deferred: Deferred<T>) -> Result<T> {
        let Deferred { result, events } = deferred;
        match self.audit_log.submit_group(events).and_then(|h| h.wait()) {
            Ok(_) => result,
            Err(e) => withhold(result, e),
        }
    }

    /// Like [`KmsService::finish`], but waits for the group commit without
    /// holding a thread: the writer thread wakes this task when the record
    /// is durable.
    pub async fn finish_async<T>(&self, deferred: Deferred<T>) -> Result<T> {
        let Deferred { result, events } = deferred;
        let (tx, rx) = tokio::sync::oneshot::channel();
        if let Err(e) = self
            .audit_log
            .submit_group_with_callback(events, move |outcome| {
                let _ = tx.send(outcome);
            })
        {
            return withhold(result, e);
        }
        match rx.await {
            Ok(Ok(_)) => result,
            Ok(Err(e)) => withhold(result, e),
            Err(_) => withhold(result, kms_storage::StorageError::AuditClosed),
        }
    }

    /// A batch: every item is a key use with its own audit record, and all
    /// the records are committed together (one group commit) before any
    /// result is released. If they cannot all be made durable, the whole
    /// batch fails.
    pub(crate) fn audited_batch<I, T>(
        &self,
        meta: &RequestMeta,
        operation: Operation,
        named_key: Option<&str>,
        items: Vec<I>,
        mut work: impl FnMut(&mut AuditFields, I) -> Result<T>,
    ) -> Result<Vec<Result<T>>> {
        let mut results = Vec::with_capacity(items.len());
        let mut events = Vec::with_capacity(items.len());
        for (index, item) in items.into_iter().enumerate() {
            let item_meta = RequestMeta {
                request_id: format!("{}#{index}", meta.request_id),
                ..meta.clone()
            };
            let (result, item_events) =
                self.recorded(&item_meta, operation, named_key, |audit| work(audit, item));
            results.push(result);
            events.extend(item_events);
        }
        // One group: consecutive records in one write, one wake-up for the batch.
        match self.audit_log.submit_group(events).and_then(|h| h.wait()) {
            Ok(_) => Ok(results),
            Err(e) => {
                // Fail closed; the cause is logged at the request boundary.
                drop(results);
                Err(KmsError::AuditUnavailable { source: Some(e) })
            }
        }
    }

    /// Runs `work` and builds its audit events (not yet written): the
    /// request's record, then one naming its destination key if `work`
    /// resolved one.
    fn recorded<T>(
        &self,
        meta: &RequestMeta,
        operation: Operation,
        named_key: Option<&str>,
        work: impl FnOnce(&mut AuditFields) -> Result<T>,
    ) -> (Result<T>, Vec<AuditEvent>) {
        let started = Instant::now();
        let mut fields = AuditFields {
            key_id: named_key
                .filter(|k| !k.is_empty())
                .map(|k| truncate(k, 256)),
            ..AuditFields::default()
        };
        let result = work(&mut fields);
        let code = match &result {
            Ok(_) => ResultCode::Ok,
            Err(e) => e.code(),
        };
        let latency_micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let event = |fields: AuditFields| AuditEvent {
            principal: truncate(&meta.principal, 1024),
            peer: truncate(&meta.peer, 256),
            request_id: truncate(&meta.request_id, 256),
            operation: operation::name(operation).to_owned(),
            key_id: fields.key_id,
            key_version: fields.key_version,
            context_digest: fields.context_digest,
            result: code,
            latency_micros,
        };
        let destination = fields.destination.take().filter(|d| d.key_id.is_some());
        let mut events = vec![event(fields)];
        events.extend(destination.map(|d| event(*d)));
        (result, events)
    }
}

pub(crate) fn now_ms() -> u64 {
    let elapsed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// Start-up for wrapped key versions (design note §1.5.3): finds the
/// token's roots; with none, wrapped versions are off (refused if the
/// configuration demands them). Otherwise verifies the active (highest)
/// root by behaviour, loads the catalogue-integrity HMAC key's blob from the
/// catalogue (generating and storing it, wrapped under the active root, on
/// first run), unwraps it once so that a broken blob refuses start naming
/// its record (not the first wrapped request), and builds the working-key
/// cache. Also returns what the checkpoint key needs to know of the roots.
fn open_wrapped(
    hsm: &Arc<Hsm>,
    catalogue: &Catalogue,
    config: &Config,
) -> Result<(Option<Wrapped>, Option<checkpoint_key::RootState>), OpenError> {
    let holder = hsm.key_holder().map_err(OpenError::Hsm)?;
    let epochs = holder.root_epochs().map_err(OpenError::Hsm)?;
    // A cluster node wraps under the catalogue's active root, and refuses
    // to start without every root the catalogue references (issue 15).
    let cluster_epoch = match config.cluster {
        Some(_) => root_rotation::cluster_start_epoch(catalogue, &epochs)?,
        None => None,
    };
    let Some(&epoch) = cluster_epoch.as_ref().or(epochs.last()) else {
        if config.cluster.is_some() {
            return Err(OpenError::ClusterNoRoot);
        }
        if config.wrapped_versions == Some(true) {
            return Err(OpenError::NoRoot);
        }
        tracing::info!("no root key on the token: new key versions are token objects");
        return Ok((None, None));
    };
    let variant = holder
        .verify_root(epoch, None)
        .map_err(|source| OpenError::Root { epoch, source })?;
    let stored = match catalogue.integrity_key().map_err(OpenError::Storage)? {
        Some(stored) => stored,
        None => {
            let (wrapped, key) = holder
                .generate_version(epoch, KeyPurpose::Hmac, variant)
                .map_err(OpenError::Hsm)?;
            // Only the blob is kept; the cache unwraps it on its own holder.
            let _ = holder.destroy(key);
            let stored = catalogue
                .init_integrity_key(WrappedServiceKey {
                    root_epoch: wrapped.root_epoch,
                    mechanism: wrapped.mechanism.code(),
                    blob: wrapped.blob,
                })
                .map_err(OpenError::Storage)?;
            tracing::info!(epoch, "created the catalogue-integrity HMAC key");
            stored
        }
    };
    let integrity = checkpoint_key::service_key_blob(INTEGRITY_KEY_RECORD, stored)?;
    // Eagerly: the cache would unwrap it only on the first wrapped request.
    let probe = holder
        .unwrap(&integrity, KeyPurpose::Hmac, variant)
        .map_err(|source| OpenError::ServiceKey {
            record: INTEGRITY_KEY_RECORD,
            what: "its blob does not unwrap",
            source: Some(source),
        })?;
    let _ = holder.destroy(probe);
    drop(holder);
    let new_versions = config.wrapped_versions != Some(false);
    tracing::info!(
        epoch,
        ?variant,
        new_versions,
        "root key verified; wrapped key versions on"
    );
    let roots = checkpoint_key::RootState {
        epoch,
        variant,
        new_versions,
    };
    Ok((
        Some(Wrapped {
            keys: working_keys::WorkingKeys::new(
                Arc::clone(hsm),
                variant,
                integrity,
                config.working_key_cache,
            ),
            epoch: parking_lot::RwLock::new(epoch),
            variant,
            new_versions,
            imports: import::Imports::new(Arc::clone(hsm)),
        }),
        Some(roots),
    ))
}

/// The catalogue of this node: the RocksDB database's on a single node;
/// with `[cluster]`, the shared catalogue in etcd (`crate::cluster`).
fn open_catalogue(storage: &Storage, config: &Config) -> Result<Catalogue, OpenError> {
    match &config.cluster {
        None => Ok(storage.catalogue().clone()),
        Some(cluster) => crate::cluster::open_catalogue(cluster, &config.server.listen.to_string())
            .map_err(OpenError::Storage),
    }
}

/// Name of the catalogue-integrity key's meta record, as start-up errors
/// name it.
const INTEGRITY_KEY_RECORD: &str = "integrity_key";

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("HSM")]
    Hsm(#[source] kms_hsm::HsmError),
    #[error("storage")]
    Storage(#[source] kms_storage::StorageError),
    #[error("cannot create data directory {path}")]
    DataDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reconciling pending key versions")]
    Reconcile(#[source] KmsError),
    /// The audit head publisher thread of a cluster node did not start.
    #[error("cannot start the audit head publisher")]
    AuditPublisher(#[source] std::io::Error),
    /// The thread that stores key version uses did not start.
    #[error("cannot start the key usage flusher")]
    UsageFlusher(#[source] std::io::Error),
    /// `hsm.wrapped_versions = true` but the token has no root key.
    #[error(
        "hsm.wrapped_versions is true but the token has no root key; create one with `kms hsm init-root`"
    )]
    NoRoot,
    /// A cluster node's token has no root key: its key versions would be
    /// token objects no other node's HSM holds (issue 15).
    #[error(
        "this node is a cluster node ([cluster]) but its token has no root key: clone the cluster's root into this node's HSM (the HSM vendor's key cloning; `kms hsm init-root` only for the first node of a new cluster)"
    )]
    ClusterNoRoot,
    /// The active root key failed its start-up check (the cause names it).
    #[error("the root key of epoch {epoch} is refused")]
    Root {
        epoch: u32,
        #[source]
        source: kms_hsm::HsmError,
    },
    /// The first start after `kms backup restore` could not finish the
    /// restore (the marker stays: the next start tries again).
    #[error("finishing the restore of backup {backup}")]
    Restore {
        /// The backup's id (first 16 hex digits).
        backup: String,
        #[source]
        source: KmsError,
    },
    /// A root epoch the restored catalogue references is not in the HSM:
    /// its versions could never be decrypted (design note §1.6 rule 3).
    #[error(
        "the restored catalogue references root key epoch {epoch} (kms-root/{epoch}), which no longer exists in the HSM; restore onto the HSM that holds it"
    )]
    RestoreRootMissing { epoch: u32 },
    /// Cluster: a root epoch the shared catalogue references (its active
    /// root, or a record wrapped under it) is not in this node's HSM: the
    /// node could not decrypt those versions (issue 15; design note §1.5).
    #[error(
        "the cluster catalogue references root key epoch {epoch} (kms-root/{epoch}), which this node's HSM does not hold; clone that root into this node's HSM (the HSM vendor's key cloning, never a new key) and start the node again"
    )]
    ClusterRootMissing { epoch: u32 },
    /// A wrapped service key's catalogue meta record (`integrity_key`,
    /// `audit_checkpoint_key`) cannot be used: checked at start so that a
    /// broken or swapped blob refuses start instead of failing at first use.
    #[error("catalogue meta record {record} is refused: {what}")]
    ServiceKey {
        record: &'static str,
        what: &'static str,
        #[source]
        source: Option<kms_hsm::HsmError>,
    },
}

impl KmsService {
    /// Audits and returns a request refused before it reached the domain
    /// (e.g. a malformed field): every request that names a key is recorded.
    pub fn refuse<T>(
        &self,
        meta: &RequestMeta,
        operation: Operation,
        key: &str,
        error: KmsError,
    ) -> Result<T> {
        self.audited(meta, operation, Some(key), |_| Err(error))
    }

    /// `refuse` for the deferred (async-audited) path.
    pub fn refuse_deferred<T>(
        &self,
        meta: &RequestMeta,
        operation: Operation,
        key: &str,
        error: KmsError,
    ) -> Deferred<T> {
        self.deferred(meta, operation, Some(key), |_| Err(error))
    }
}
