//! Root rotation (issue 14 item 5; design note `hierarchy-and-cluster.md`
//! §1.5.3 "Root rotation", §1.6): the running service's side of it.
//!
//! - **A new root is adopted without a restart.** `kms hsm rotate-root` (a
//!   ceremony in another process) adds root `e+1`. The service looks for it
//!   on every reload (`kms admin reload`, SIGHUP: all epochs), before every
//!   `DestroyRoot`, and every `rotation.scheduler_interval` from the re-wrap
//!   thread (one search for `kms-root/<active+1>`). A new root is verified
//!   by behaviour (the start-up probe, expecting the running variant)
//!   before it becomes active; one that fails is logged and never used.
//!   From then on new versions are wrapped under it.
//! - **The re-wrap job** (a background thread, [`spawn`]) moves every
//!   record wrapped under an older epoch to the active one: each wrapped
//!   service key ([`SERVICE_KEYS`]) and each version that is not destroyed.
//!   Per record: verify its MAC inside the HSM (a moved or altered blob is
//!   never laundered into a record with a fresh MAC), unwrap it on the job's
//!   own holder session, `C_WrapKey` it under the active root, destroy the
//!   working copy, MAC the new record, and write it with one catalogue
//!   compare-and-set against the record that was read. A record changed in
//!   between (disabled, destroyed, re-wrapped) is not overwritten: it is
//!   read again and judged again. The key material never changes, so
//!   ciphertexts and cached working keys stay valid.
//! - **Restartable at any point without progress state:** the scan is by
//!   epoch (every record names its root), so after a crash the next pass
//!   simply finds what is left. The cursor lives in memory only.
//! - **Bounded:** at most `rotation.root_rewrap_batch` re-wraps and
//!   [`MAX_SCAN_PER_STEP`] records read per step, then a pause of
//!   `rotation.root_rewrap_pause_ms`; each re-wrap is audited as the
//!   service's own `RewrapKeyVersion`. Once a whole pass found nothing below
//!   the active epoch the job only checks for a new root.
//! - **Destroying a root** (`DestroyRoot`) is refused while it is the active
//!   epoch or while any record (service key, or version not destroyed)
//!   names it. A version wrapped under an epoch is only ever written while
//!   that epoch is active (writers hold the active epoch's read guard until
//!   their write is in), so once a newer epoch is active the count of an
//!   older one can only fall.
//!
//!
//! # In a cluster (issue 15; design note §1.5, §2.3)
//!
//! Each node has its own HSM holding copies of the same roots, so a root
//! added to one HSM must not be used before every node holds it:
//! - each node publishes in its registry record (`nodes/<id>`) the epochs
//!   its HSM holds and the one it wraps under ([`NodeRoots`]), at start and
//!   after every check (reload, every `rotation.scheduler_interval`);
//! - the **active epoch is the catalogue's** (`roots/active`, written in a
//!   catalogue transaction), not the process's: a node finding a newer root
//!   in its HSM proposes it, and the proposal is refused
//!   ([`KmsError::RootNotOnEveryNode`], naming the nodes) until every
//!   registered node publishes that it holds it. Every node follows the
//!   record (each idle tick of the re-wrap thread); the re-wrap then runs on
//!   the job's leader only;
//! - a node whose HSM lacks an epoch the catalogue references (the active
//!   one, or one a record is wrapped under) refuses to start
//!   (`OpenError::ClusterRootMissing`, [`cluster_start_epoch`]);
//! - `DestroyRoot` is also refused for the catalogue's active epoch and
//!   while a node still wraps under the epoch (or has not published what
//!   it wraps under): [`KmsError::RootStillWrapping`].
//!
//! A single node keeps its active epoch in memory, as before.
//!
//! What it must never do: re-wrap a destroyed version (its blob must die
//! with its root), write over a record it did not read, use a new root that
//! failed the probe, or log a blob or a MAC.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kms_hsm::{HsmError, KeyHolder, KeyPurpose, RootVariant, WrapMechanism, WrappedKey};
use kms_storage::schema::{META_CHECKPOINT_KEY, META_INTEGRITY_KEY};
use kms_storage::{
    Catalogue, KekHandle, NodeRoots, Swap, VersionCursor, VersionRecord, VersionState,
    WrappedServiceKey,
};
use subtle::ConstantTimeEq as _;

use super::lookup::from_working_key_error;
use super::{KmsService, OpenError, Operation, RequestMeta, Wrapped};
use crate::error::{KmsError, Result};

/// Most version records one step of the job reads (decodes), whether or
/// not they need re-wrapping: bounds a step's time on a large catalogue
/// whose records are mostly done.
pub const MAX_SCAN_PER_STEP: usize = 10_000;

/// How often the idle job looks whether the active epoch changed.
const IDLE_TICK: Duration = Duration::from_secs(1);

/// Times a record is read again after a compare-and-set found it changed,
/// within one step (it is found again by the next pass otherwise).
const CAS_ATTEMPTS: usize = 4;

/// A key the service itself uses, held as one `WrappedServiceKey`
/// metadata record, which root rotation re-wraps like a version. To have
/// another one re-wrapped (e.g. an audit checkpoint key), add one row to
/// [`SERVICE_KEYS`].
#[derive(Debug)]
pub struct ServiceKeySlot {
    /// What the key is, for logs and errors.
    pub name: &'static str,
    /// Its metadata record's key in the catalogue's default column family.
    pub meta_key: &'static [u8],
    /// How it is unwrapped (HMAC or AES).
    pub purpose: KeyPurpose,
    /// Puts the re-wrapped blob in force in the running service (whoever
    /// keeps the blob in memory unwraps it again after a holder loss).
    pub adopt: fn(&KmsService, WrappedKey),
}

/// Every wrapped service key root rotation re-wraps.
pub const SERVICE_KEYS: &[ServiceKeySlot] = &[
    ServiceKeySlot {
        name: "catalogue-integrity HMAC key",
        meta_key: META_INTEGRITY_KEY,
        purpose: KeyPurpose::Hmac,
        adopt: adopt_integrity_key,
    },
    ServiceKeySlot {
        name: "audit checkpoint HMAC key",
        meta_key: META_CHECKPOINT_KEY,
        purpose: KeyPurpose::Hmac,
        adopt: adopt_checkpoint_key,
    },
];

fn adopt_checkpoint_key(service: &KmsService, wrapped: WrappedKey) {
    service.checkpoint_key.adopt_rewrapped(wrapped);
}

fn adopt_integrity_key(service: &KmsService, wrapped: WrappedKey) {
    if let Some(w) = &service.wrapped {
        w.keys.set_integrity(wrapped);
    }
}

/// One root epoch as `kms hsm roots` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RootEpochReport {
    /// The epoch (`kms-root/<epoch>`).
    pub epoch: u32,
    /// Whether the HSM holds this root.
    pub present_in_hsm: bool,
    /// Whether it is the active epoch.
    pub active: bool,
    /// Versions (not destroyed) wrapped under it.
    pub versions: u64,
    /// Destroyed versions whose record still holds a blob under it.
    pub destroyed_versions: u64,
    /// Service keys ([`SERVICE_KEYS`]) wrapped under it.
    pub service_keys: u64,
}

/// The server's roots (`Admin.ListRoots`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootsReport {
    /// New versions are wrapped under this epoch.
    pub active_epoch: u32,
    /// The variant of the roots.
    pub variant: RootVariant,
    /// Every epoch in the HSM or named by a record, ascending.
    pub roots: Vec<RootEpochReport>,
}

/// What one step of the re-wrap job did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RewrapStep {
    /// Records (versions and service keys) below the active epoch found.
    pub found: usize,
    /// Records re-wrapped and written.
    pub rewrapped: usize,
    /// Records that changed under the job and no longer needed it
    /// (destroyed, deleted, or re-wrapped by someone else).
    pub skipped: usize,
    /// Records that could not be re-wrapped (logged; retried next pass).
    pub failed: usize,
    /// The scan reached the end of the catalogue (the cursor starts over).
    pub pass_complete: bool,
}

impl RewrapStep {
    fn add(&mut self, other: RewrapStep) {
        self.found += other.found;
        self.rewrapped += other.rewrapped;
        self.skipped += other.skipped;
        self.failed += other.failed;
        self.pass_complete = other.pass_complete;
    }
}

enum Outcome {
    Rewrapped { from: u32, to: u32 },
    Skipped,
}

impl KmsService {
    fn wrapped_or_refuse(&self) -> Result<&Wrapped> {
        self.wrapped.as_ref().ok_or(KmsError::NoRootKey)
    }

    /// Looks for a root newer than the active one and, if it passes the
    /// start-up probe (expecting the running variant), makes it the active
    /// epoch. `all_epochs` lists every root on the token (reload, before
    /// `DestroyRoot`); otherwise only `kms-root/<active+1>` is searched for
    /// (the periodic check). Returns the epoch adopted, if any. Blocking.
    ///
    /// # Errors
    /// `HsmUnavailable`/`Hsm` if the token cannot be searched, or
    /// `Hsm` with `RootCheckFailed` if the new root fails the probe (it is
    /// not used; logged here).
    pub fn check_for_new_root(&self, all_epochs: bool) -> Result<Option<u32>> {
        let Some(wrapped) = &self.wrapped else {
            return Ok(None);
        };
        if self.node_id().is_some() {
            return self.cluster_root_check(wrapped);
        }
        let active = *wrapped.epoch.read();
        let holder = self.hsm.key_holder()?;
        let candidate = if all_epochs {
            holder
                .root_epochs()?
                .last()
                .copied()
                .filter(|&e| e > active)
        } else {
            match active.checked_add(1) {
                Some(next) if holder.has_root(next)? => Some(next),
                _ => None,
            }
        };
        let Some(epoch) = candidate else {
            return Ok(None);
        };
        if let Err(error) = holder.verify_root(epoch, Some(wrapped.variant)) {
            tracing::error!(
                epoch,
                active,
                %error,
                "a new root key failed its check and is not used; new versions stay under the active root"
            );
            return Err(KmsError::from(error));
        }
        drop(holder);
        // Waits for every version being wrapped under the old epoch to be
        // written (they hold the read guard): see `Wrapped::epoch`.
        let mut current = wrapped.epoch.write();
        if epoch <= *current {
            return Ok(None);
        }
        let previous = std::mem::replace(&mut *current, epoch);
        drop(current);
        tracing::info!(
            previous,
            epoch,
            "root key verified and active: new versions are wrapped under it; older records are re-wrapped in the background"
        );
        Ok(Some(epoch))
    }

    /// Cluster: [`KmsService::check_for_new_root`] (module docs, "In a
    /// cluster"): follows the catalogue's active epoch, publishes this
    /// node's roots, and proposes the newest root of this node's HSM if it
    /// is newer than the catalogue's and every registered node holds it.
    fn cluster_root_check(&self, wrapped: &Wrapped) -> Result<Option<u32>> {
        let held = self.hsm.key_holder()?.root_epochs()?;
        let mut adopted = self.follow_cluster_root_with(wrapped, &held)?;
        self.publish_roots_held(wrapped, held.clone());
        let catalogue = self.catalogue();
        let recorded = catalogue.active_root()?;
        let Some(&candidate) = held.last() else {
            return Ok(adopted);
        };
        if recorded.is_some_and(|r| candidate <= r) {
            return Ok(adopted);
        }
        if let Err(error) = self
            .hsm
            .key_holder()?
            .verify_root(candidate, Some(wrapped.variant))
        {
            tracing::error!(epoch = candidate, %error, "a new root key failed its check and is not used");
            return Err(KmsError::from(error));
        }
        let lacking = self.nodes_lacking_root(candidate)?;
        if !lacking.is_empty() {
            let error = KmsError::RootNotOnEveryNode {
                epoch: candidate,
                nodes: lacking.join(", "),
            };
            tracing::warn!(%error, "new root key not adopted");
            return Err(error);
        }
        match catalogue.set_active_root(recorded, candidate)? {
            Swap::Replaced(_) => tracing::info!(
                previous = ?recorded,
                epoch = candidate,
                "every cluster node holds the new root: it is now the cluster's active root"
            ),
            // Another node moved it first: follow whatever it recorded.
            Swap::Changed(current) => {
                tracing::info!(current = ?current, "the cluster's active root changed meanwhile");
            }
        }
        if let Some(epoch) = self.follow_cluster_root_with(wrapped, &held)? {
            adopted = Some(epoch);
        }
        self.publish_roots_held(wrapped, held);
        Ok(adopted)
    }

    /// Cluster: adopts the catalogue's active root epoch for wrapping if it
    /// is newer than this node's (cheap when it is not: one read of the
    /// view). Returns the epoch adopted. Blocking.
    ///
    /// # Errors
    /// [`KmsError::RootMissingOnThisNode`] if this node's HSM lacks it (the
    /// node keeps wrapping under its current root, which every node still
    /// holds); `Hsm` if it fails the probe; storage failures.
    pub fn follow_cluster_root(&self) -> Result<Option<u32>> {
        let Some(wrapped) = &self.wrapped else {
            return Ok(None);
        };
        if self.node_id().is_none() {
            return Ok(None);
        }
        let Some(recorded) = self.catalogue().active_root()? else {
            return Ok(None);
        };
        if recorded <= *wrapped.epoch.read() {
            return Ok(None);
        }
        let held = self.hsm.key_holder()?.root_epochs()?;
        let adopted = self.follow_cluster_root_with(wrapped, &held);
        self.publish_roots_held(wrapped, held);
        adopted
    }

    fn follow_cluster_root_with(&self, wrapped: &Wrapped, held: &[u32]) -> Result<Option<u32>> {
        let Some(recorded) = self.catalogue().active_root()? else {
            return Ok(None);
        };
        let local = *wrapped.epoch.read();
        if recorded <= local {
            return Ok(None);
        }
        if !held.contains(&recorded) {
            let error = KmsError::RootMissingOnThisNode { epoch: recorded };
            tracing::error!(%error, active = local, "cannot follow the cluster's active root");
            return Err(error);
        }
        if let Err(error) = self
            .hsm
            .key_holder()?
            .verify_root(recorded, Some(wrapped.variant))
        {
            tracing::error!(epoch = recorded, %error, "the cluster's active root key failed its check on this node");
            return Err(KmsError::from(error));
        }
        // Waits for every version being wrapped under the old epoch to be
        // written (they hold the read guard): see `Wrapped::epoch`.
        let mut current = wrapped.epoch.write();
        if recorded <= *current {
            return Ok(None);
        }
        let previous = std::mem::replace(&mut *current, recorded);
        drop(current);
        tracing::info!(
            previous,
            epoch = recorded,
            "this node now wraps under the cluster's active root"
        );
        Ok(Some(recorded))
    }

    /// The registered nodes whose published roots do not include `epoch`
    /// (or that published none yet), sorted.
    fn nodes_lacking_root(&self, epoch: u32) -> Result<Vec<String>> {
        let peers = self.catalogue().engine().node_roots()?.unwrap_or_default();
        let mut lacking: Vec<String> = peers
            .into_iter()
            .filter(|p| !p.roots.as_ref().is_some_and(|r| r.held.contains(&epoch)))
            .map(|p| p.node)
            .collect();
        lacking.sort();
        Ok(lacking)
    }

    /// Cluster: publishes the roots this node's HSM holds and the epoch it
    /// wraps under (a failure is logged: the next check publishes again, and
    /// until then other nodes count this one as lacking new roots, which
    /// only delays an adoption). No-op on a single node.
    pub fn publish_node_roots(&self) {
        let Some(wrapped) = &self.wrapped else {
            return;
        };
        if self.node_id().is_none() {
            return;
        }
        match self.hsm.key_holder().and_then(|h| h.root_epochs()) {
            Ok(held) => self.publish_roots_held(wrapped, held),
            Err(error) => {
                tracing::warn!(%error, "cannot list this node's root keys to publish them")
            }
        }
    }

    fn publish_roots_held(&self, wrapped: &Wrapped, held: Vec<u32>) {
        let roots = NodeRoots {
            held,
            wrapping: *wrapped.epoch.read(),
        };
        if let Err(error) = self.catalogue().engine().publish_roots(&roots) {
            tracing::warn!(%error, "cannot publish this node's root epochs; will retry");
        }
    }

    /// Cluster: whether every registered node published that it wraps
    /// under `epoch` (so no record under an older one can still appear).
    fn every_node_wraps_under(&self, epoch: u32) -> bool {
        match self.catalogue().engine().node_roots() {
            Ok(Some(peers)) => peers
                .iter()
                .all(|p| p.roots.as_ref().is_some_and(|r| r.wrapping >= epoch)),
            Ok(None) => true,
            Err(_) => false,
        }
    }

    /// The active root epoch, if the service holds a root.
    pub fn active_root_epoch(&self) -> Option<u32> {
        self.wrapped.as_ref().map(|w| *w.epoch.read())
    }

    /// One step of the re-wrap job (see the module docs): re-wraps the
    /// service keys below the active epoch, then scans versions from
    /// `cursor` (updated; `None` = from the start) and re-wraps up to
    /// `batch` of them. Blocking. Failures are logged and counted, never
    /// returned: the next pass retries them.
    pub fn rewrap_step(&self, cursor: &mut Option<VersionCursor>, batch: usize) -> RewrapStep {
        let mut step = RewrapStep::default();
        let Some(wrapped) = &self.wrapped else {
            step.pass_complete = true;
            return step;
        };
        let holder = match self.hsm.key_holder() {
            Ok(holder) => holder,
            Err(error) => {
                tracing::warn!(%error, "root re-wrap: no HSM session; will retry");
                step.failed += 1;
                return step;
            }
        };
        let active = *wrapped.epoch.read();
        if cursor.is_none() {
            for slot in SERVICE_KEYS {
                self.step_service_key(wrapped, &holder, slot, active, &mut step);
            }
        }
        let catalogue = self.catalogue();
        let mut candidates = Vec::new();
        let mut scanned = 0;
        while candidates.len() < batch && scanned < MAX_SCAN_PER_STEP {
            let page = match catalogue.scan_versions(cursor.as_ref(), 500) {
                Ok(page) => page,
                Err(error) => {
                    tracing::warn!(%error, "root re-wrap: cannot scan versions; will retry");
                    step.failed += 1;
                    return step;
                }
            };
            let mut full = false;
            for record in page.items {
                scanned += 1;
                if needs_rewrap(&record, active) {
                    candidates.push(record);
                    if candidates.len() == batch {
                        full = true;
                        break;
                    }
                }
            }
            if full {
                // Resume right after the last record taken.
                *cursor = candidates
                    .last()
                    .map(|r| VersionCursor::after(&r.key_id, r.version));
                break;
            }
            *cursor = page.next;
            if cursor.is_none() {
                step.pass_complete = true;
                break;
            }
        }
        step.found += candidates.len();
        for record in candidates {
            let key = record.key_id.to_string();
            let version = record.version;
            let meta = RequestMeta::internal("root-rewrap");
            let outcome = self.audited(&meta, Operation::RewrapKeyVersion, Some(&key), |audit| {
                audit.key(&record.key_id, Some(version));
                self.rewrap_version(wrapped, &holder, record)
            });
            match outcome {
                Ok(Outcome::Rewrapped { from, to }) => {
                    tracing::debug!(key_id = %key, version, from, to, "root re-wrap: version re-wrapped");
                    step.rewrapped += 1;
                }
                Ok(Outcome::Skipped) => step.skipped += 1,
                Err(error) => {
                    tracing::warn!(key_id = %key, version, error = %error.chain(), "root re-wrap: version not re-wrapped; will retry");
                    step.failed += 1;
                }
            }
        }
        step
    }

    /// Re-wraps one version record (see the module docs), reading it again
    /// when the compare-and-set finds it changed.
    fn rewrap_version(
        &self,
        wrapped: &Wrapped,
        holder: &KeyHolder,
        mut record: VersionRecord,
    ) -> Result<Outcome> {
        let catalogue = self.catalogue();
        for _ in 0..CAS_ATTEMPTS {
            // Held until the record is written: see `Wrapped::epoch`.
            let target_guard = wrapped.active_epoch();
            let target = *target_guard;
            if !needs_rewrap(&record, target) {
                return Ok(Outcome::Skipped);
            }
            let KekHandle::Wrapped {
                root_epoch,
                mechanism,
                blob,
                mac,
            } = &record.kek
            else {
                return Ok(Outcome::Skipped);
            };
            let old = WrappedKey {
                root_epoch: *root_epoch,
                mechanism: WrapMechanism::from_code(*mechanism).ok_or(
                    KmsError::CatalogueRecordCorrupt {
                        source: Some("unknown wrapping mechanism".into()),
                    },
                )?,
                blob: blob.clone(),
            };
            // The record's MAC first: a re-wrap must never turn a blob moved
            // from another key or version into a record with a valid MAC.
            let expected = wrapped
                .keys
                .mac_record(&record.key_id, record.version, &old)
                .map_err(from_working_key_error)?;
            if !bool::from(expected.ct_eq(mac)) {
                return Err(KmsError::CatalogueRecordCorrupt {
                    source: Some(
                        format!(
                            "version {} of key {}: its MAC does not verify",
                            record.version, record.key_id
                        )
                        .into(),
                    ),
                });
            }
            let new = rewrap_blob(holder, &old, KeyPurpose::Kek, wrapped.variant, target)?;
            let new_mac = wrapped
                .keys
                .mac_record(&record.key_id, record.version, &new)
                .map_err(from_working_key_error)?;
            let kek = KekHandle::Wrapped {
                root_epoch: new.root_epoch,
                mechanism: new.mechanism.code(),
                blob: new.blob,
                mac: new_mac,
            };
            match catalogue.replace_version_kek(&record, kek)? {
                Swap::Replaced(_) => {
                    return Ok(Outcome::Rewrapped {
                        from: old.root_epoch,
                        to: target,
                    });
                }
                Swap::Changed(Some(current)) => record = current,
                Swap::Changed(None) => return Ok(Outcome::Skipped),
            }
            drop(target_guard);
        }
        // Changing faster than it can be re-wrapped: the next pass tries again.
        Ok(Outcome::Skipped)
    }

    /// Re-wraps one service key if it is below `active` (audited without a key id).
    fn step_service_key(
        &self,
        wrapped: &Wrapped,
        holder: &KeyHolder,
        slot: &ServiceKeySlot,
        active: u32,
        step: &mut RewrapStep,
    ) {
        // Checked before the audited step: a service key already under the
        // active root (every start, every idle pass) is not a key use and
        // writes no audit record. A failed read goes on to the audited step,
        // which records the failure.
        let below_active = self
            .catalogue()
            .service_key(slot.meta_key)
            .map(|stored| stored.is_some_and(|k| k.root_epoch < *wrapped.epoch.read()));
        if matches!(below_active, Ok(false)) {
            return;
        }
        let meta = RequestMeta::internal("root-rewrap");
        let outcome = self.audited(&meta, Operation::RewrapKeyVersion, None, |_| {
            self.rewrap_service_key(wrapped, holder, slot)
        });
        match outcome {
            Ok(Some(Outcome::Rewrapped { from, to })) => {
                tracing::info!(
                    key = slot.name,
                    from,
                    to,
                    "root re-wrap: service key re-wrapped"
                );
                step.found += 1;
                step.rewrapped += 1;
            }
            Ok(Some(Outcome::Skipped)) => {
                step.found += 1;
                step.skipped += 1;
            }
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(key = slot.name, active, error = %error.chain(), "root re-wrap: service key not re-wrapped; will retry");
                step.found += 1;
                step.failed += 1;
            }
        }
    }

    /// `None` if the service key needs nothing (absent, or under the active epoch).
    fn rewrap_service_key(
        &self,
        wrapped: &Wrapped,
        holder: &KeyHolder,
        slot: &ServiceKeySlot,
    ) -> Result<Option<Outcome>> {
        let catalogue = self.catalogue();
        let Some(mut stored) = catalogue.service_key(slot.meta_key)? else {
            return Ok(None);
        };
        if stored.root_epoch >= *wrapped.epoch.read() {
            return Ok(None);
        }
        for _ in 0..CAS_ATTEMPTS {
            let target_guard = wrapped.active_epoch();
            let target = *target_guard;
            if stored.root_epoch >= target {
                return Ok(Some(Outcome::Skipped));
            }
            let old = WrappedKey {
                root_epoch: stored.root_epoch,
                mechanism: WrapMechanism::from_code(stored.mechanism).ok_or(
                    KmsError::CatalogueRecordCorrupt {
                        source: Some(format!("{}: unknown wrapping mechanism", slot.name).into()),
                    },
                )?,
                blob: stored.blob.clone(),
            };
            let new = rewrap_blob(holder, &old, slot.purpose, wrapped.variant, target)?;
            let record = WrappedServiceKey {
                root_epoch: new.root_epoch,
                mechanism: new.mechanism.code(),
                blob: new.blob.clone(),
            };
            match catalogue.replace_service_key(slot.meta_key, &stored, record)? {
                Swap::Replaced(_) => {
                    (slot.adopt)(self, new);
                    return Ok(Some(Outcome::Rewrapped {
                        from: old.root_epoch,
                        to: target,
                    }));
                }
                Swap::Changed(Some(current)) => stored = current,
                Swap::Changed(None) => return Ok(Some(Outcome::Skipped)),
            }
            drop(target_guard);
        }
        Ok(Some(Outcome::Skipped))
    }

    /// The roots and what each still holds (`Admin.ListRoots`): a full
    /// catalogue scan and a token search. Blocking.
    ///
    /// # Errors
    /// `NoRootKey` without wrapped versions; HSM and storage failures.
    pub fn roots_report(&self) -> Result<RootsReport> {
        let wrapped = self.wrapped_or_refuse()?;
        let in_hsm = self.hsm.key_holder()?.root_epochs()?;
        let active_epoch = *wrapped.epoch.read();
        let versions = self.catalogue().wrapped_versions_per_epoch()?;
        let service = self.service_keys_per_epoch()?;
        let mut epochs: Vec<u32> = in_hsm
            .iter()
            .copied()
            .chain(versions.keys().copied())
            .chain(service.keys().copied())
            .chain([active_epoch])
            .collect();
        epochs.sort_unstable();
        epochs.dedup();
        let roots = epochs
            .into_iter()
            .map(|epoch| {
                let counts = versions.get(&epoch).copied().unwrap_or_default();
                RootEpochReport {
                    epoch,
                    present_in_hsm: in_hsm.contains(&epoch),
                    active: epoch == active_epoch,
                    versions: counts.live_versions,
                    destroyed_versions: counts.destroyed_versions,
                    service_keys: service.get(&epoch).copied().unwrap_or(0),
                }
            })
            .collect();
        Ok(RootsReport {
            active_epoch,
            variant: wrapped.variant,
            roots,
        })
    }

    fn service_keys_per_epoch(&self) -> Result<BTreeMap<u32, u64>> {
        let catalogue = self.catalogue();
        let mut counts = BTreeMap::new();
        for slot in SERVICE_KEYS {
            if let Some(stored) = catalogue.service_key(slot.meta_key)? {
                *counts.entry(stored.root_epoch).or_default() += 1;
            }
        }
        Ok(counts)
    }

    /// `Admin.DestroyRoot`, audited: administrators only. Looks for a newer
    /// root first (as a reload does), then refuses the active epoch and any
    /// epoch a record still names, and destroys the root in the HSM.
    ///
    /// # Errors
    /// `PermissionDenied`; `InvalidArgument` for epoch 0; `NoRootKey`;
    /// `RootActive`; `RootInUse` (with the counts); `RootNotFound`; HSM and
    /// storage failures (an HSM that refuses to destroy the object is `Hsm`).
    pub fn destroy_root(&self, meta: &RequestMeta, epoch: u32) -> Result<u32> {
        self.audited(meta, Operation::DestroyRoot, None, |_| {
            self.require_admin(meta, "destroy a root key")?;
            if epoch == 0 {
                return Err(KmsError::invalid("epoch", "root epochs start at 1"));
            }
            let wrapped = self.wrapped_or_refuse()?;
            if let Err(error) = self.check_for_new_root(true) {
                // A new root that fails its check stays unused; the active
                // one is what counts below.
                tracing::warn!(error = %error.chain(), "DestroyRoot: no new root adopted");
            }
            let active = *wrapped.epoch.read();
            if epoch == active {
                return Err(KmsError::RootActive { epoch });
            }
            if self.node_id().is_some() {
                if self.catalogue().active_root()? == Some(epoch) {
                    return Err(KmsError::RootActive { epoch });
                }
                // A node that has not caught up may still write versions
                // under it (or one that never said what it wraps under).
                let mut wrapping: Vec<String> = self
                    .catalogue()
                    .engine()
                    .node_roots()?
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|p| p.roots.as_ref().is_none_or(|r| r.wrapping <= epoch))
                    .map(|p| p.node)
                    .collect();
                if !wrapping.is_empty() {
                    wrapping.sort();
                    return Err(KmsError::RootStillWrapping {
                        epoch,
                        nodes: wrapping.join(", "),
                    });
                }
            }
            // Below the active epoch nothing new is written (see
            // `Wrapped::epoch`): these counts can only fall.
            let versions = self
                .catalogue()
                .wrapped_versions_per_epoch()?
                .get(&epoch)
                .map_or(0, |c| c.live_versions);
            let service_keys = self
                .service_keys_per_epoch()?
                .get(&epoch)
                .copied()
                .unwrap_or(0);
            if versions > 0 || service_keys > 0 {
                return Err(KmsError::RootInUse {
                    epoch,
                    versions,
                    service_keys,
                });
            }
            match self.hsm.key_holder()?.destroy_root(epoch) {
                Ok(()) => {}
                Err(HsmError::ObjectNotFound { .. }) => {
                    return Err(KmsError::RootNotFound { epoch });
                }
                Err(e) => return Err(KmsError::from(e)),
            }
            tracing::info!(epoch, active, "root key destroyed");
            Ok(active)
        })
    }

    /// `Admin.ListRoots`, audited: administrators only.
    ///
    /// # Errors
    /// `PermissionDenied`, and those of [`KmsService::roots_report`].
    pub fn list_roots(&self, meta: &RequestMeta) -> Result<RootsReport> {
        self.audited(meta, Operation::ListRoots, None, |_| {
            self.require_admin(meta, "list the root keys")?;
            self.roots_report()
        })
    }

    /// Logs how many versions each epoch still holds (the job's progress).
    fn log_remaining(&self) {
        match self.catalogue().wrapped_versions_per_epoch() {
            Ok(counts) => {
                let active = self.active_root_epoch().unwrap_or(0);
                let remaining: Vec<String> = counts
                    .iter()
                    .filter(|(epoch, c)| **epoch < active && c.live_versions > 0)
                    .map(|(epoch, c)| format!("epoch {epoch}: {}", c.live_versions))
                    .collect();
                tracing::info!(
                    active,
                    remaining = %if remaining.is_empty() { "none".to_owned() } else { remaining.join(", ") },
                    "root re-wrap: versions remaining below the active epoch"
                );
            }
            Err(error) => tracing::warn!(%error, "root re-wrap: cannot count versions"),
        }
    }
}

/// Whether `record` is a version the job must move to `active`: wrapped
/// under an older epoch and not destroyed (nor pending, which wrapped
/// versions never are).
fn needs_rewrap(record: &VersionRecord, active: u32) -> bool {
    matches!(record.kek, KekHandle::Wrapped { root_epoch, .. } if root_epoch < active)
        && !matches!(
            record.state,
            VersionState::Destroyed { .. } | VersionState::Pending
        )
}

/// Unwraps `old` on `holder`, wraps the working copy under the root of
/// `target` and destroys the copy (whatever happened).
fn rewrap_blob(
    holder: &KeyHolder,
    old: &WrappedKey,
    purpose: KeyPurpose,
    variant: RootVariant,
    target: u32,
) -> Result<WrappedKey> {
    let working = holder.unwrap(old, purpose, variant).map_err(|e| match e {
        HsmError::CorruptWrappedKey { .. } => KmsError::CatalogueRecordCorrupt {
            source: Some(Box::new(e)),
        },
        other => KmsError::from(other),
    })?;
    let new = holder.rewrap(&working, target);
    // Best effort: a failure leaves it to die with the holder's session.
    let _ = holder.destroy(working);
    Ok(new?)
}

/// How the re-wrap thread paces itself.
#[derive(Debug, Clone, Copy)]
pub struct RewrapPace {
    /// Versions re-wrapped per step at most (`rotation.root_rewrap_batch`).
    pub batch: usize,
    /// Pause between steps while work remains (`rotation.root_rewrap_pause_ms`).
    pub pause: Duration,
    /// How often to look for a new root (`rotation.scheduler_interval`).
    pub check_interval: Duration,
}

/// Starts the root re-wrap thread (see the module docs) until `stop` is set
/// (then unpark it). `None` when the service holds no root key: wrapped
/// versions are decided at start-up, so there is nothing to rotate.
///
/// # Errors
/// The OS refused to start the thread.
pub fn spawn(
    service: Arc<KmsService>,
    pace: RewrapPace,
    stop: Arc<AtomicBool>,
) -> std::io::Result<Option<std::thread::JoinHandle<()>>> {
    if service.active_root_epoch().is_none() {
        return Ok(None);
    }
    std::thread::Builder::new()
        .name("kms-root-rewrap".into())
        .spawn(move || run(&service, pace, &stop))
        .map(Some)
}

/// The background job name the root re-wrap's leadership is held under.
pub const REWRAP_JOB: &str = "root-rewrap";

fn run(service: &KmsService, pace: RewrapPace, stop: &AtomicBool) {
    let mut cursor: Option<VersionCursor> = None;
    // The active epoch a whole pass found nothing to do for: nothing below
    // it can appear again until a new root is adopted (or a restart).
    let mut clean_for: Option<u32> = None;
    let mut pass = RewrapStep::default();
    let mut last_check: Option<Instant> = None;
    while !stop.load(Ordering::Acquire) {
        if last_check.is_none_or(|at| at.elapsed() >= pace.check_interval) {
            last_check = Some(Instant::now());
            if let Err(error) = service.check_for_new_root(false) {
                tracing::warn!(error = %error.chain(), "root check failed; will retry");
            }
        }
        if let Err(error) = service.follow_cluster_root() {
            tracing::warn!(error = %error.chain(), "cannot follow the cluster's active root; will retry");
        }
        let active = service.active_root_epoch();
        if active.is_some() && active == clean_for {
            // Idle: wake often enough to notice a root adopted by a reload
            // (a read of the active epoch), search the token only every
            // `check_interval` (above).
            if crate::background::wait_or_stop(stop, pace.check_interval.min(IDLE_TICK)) {
                break;
            }
            continue;
        }
        // In a cluster one node re-wraps (the leader of the job, fenced:
        // design note §2.3.3 I6); the others keep adopting roots above.
        let fence = match service.catalogue().engine().leadership(REWRAP_JOB) {
            Ok(Some(fence)) => fence,
            Ok(None) => {
                if crate::background::wait_or_stop(stop, pace.check_interval.min(IDLE_TICK)) {
                    break;
                }
                continue;
            }
            Err(error) => {
                tracing::warn!(%error, "root re-wrap cannot tell whether it leads; will retry");
                if crate::background::wait_or_stop(stop, pace.check_interval) {
                    break;
                }
                continue;
            }
        };
        if cursor.is_none() && pass == RewrapStep::default() {
            service.log_remaining();
        }
        let step = kms_storage::with_fence(fence, || service.rewrap_step(&mut cursor, pace.batch));
        pass.add(step);
        let mut wait = pace.pause;
        if step.pass_complete {
            if pass.found > 0 {
                tracing::info!(
                    rewrapped = pass.rewrapped,
                    skipped = pass.skipped,
                    failed = pass.failed,
                    "root re-wrap: pass finished"
                );
                service.log_remaining();
            }
            // In a cluster a node that has not yet followed the active
            // epoch may still write versions under an older one: the job
            // only goes idle once every node wraps under it.
            let all_follow = service.node_id().is_none()
                || active.is_some_and(|a| service.every_node_wraps_under(a));
            if pass.found == 0 && all_follow {
                // Nothing to do: idle (see above) rather than pause.
                clean_for = active;
                wait = pace.check_interval.min(IDLE_TICK);
            } else if pass.rewrapped == 0 {
                // Only failures left: retry at the slow pace, not in a loop.
                wait = pace.check_interval;
            }
            pass = RewrapStep::default();
        }
        if crate::background::wait_or_stop(stop, wait) {
            break;
        }
    }
}

/// Cluster start (`KmsService::open`): the epoch this node wraps under, from
/// the catalogue (module docs, "In a cluster"). Refuses a node whose HSM
/// (`held`, ascending) lacks any epoch the catalogue references: its active
/// root, a version not destroyed, or a service key. With no active root
/// recorded yet (the cluster's first start, or one from before this
/// record), records the newest referenced epoch, or this HSM's newest root
/// if nothing is wrapped yet. `None` when neither the catalogue nor the
/// HSM has a root (wrapped versions are off).
///
/// # Errors
/// [`OpenError::ClusterRootMissing`] naming the first missing epoch;
/// [`OpenError::Storage`] if the catalogue cannot be read or written.
pub(crate) fn cluster_start_epoch(
    catalogue: &Catalogue,
    held: &[u32],
) -> std::result::Result<Option<u32>, OpenError> {
    let recorded = catalogue.active_root().map_err(OpenError::Storage)?;
    let mut referenced: Vec<u32> = catalogue
        .wrapped_versions_per_epoch()
        .map_err(OpenError::Storage)?
        .into_iter()
        .filter(|(_, c)| c.live_versions > 0)
        .map(|(epoch, _)| epoch)
        .collect();
    for slot in SERVICE_KEYS {
        if let Some(stored) = catalogue
            .service_key(slot.meta_key)
            .map_err(OpenError::Storage)?
        {
            referenced.push(stored.root_epoch);
        }
    }
    referenced.extend(recorded);
    referenced.sort_unstable();
    referenced.dedup();
    if let Some(&epoch) = referenced.iter().find(|e| !held.contains(e)) {
        return Err(OpenError::ClusterRootMissing { epoch });
    }
    if let Some(epoch) = recorded {
        return Ok(Some(epoch));
    }
    let Some(&first) = referenced.last().or(held.last()) else {
        return Ok(None);
    };
    match catalogue
        .set_active_root(None, first)
        .map_err(OpenError::Storage)?
    {
        Swap::Replaced(epoch) => {
            tracing::info!(epoch, "recorded the cluster's active root epoch");
            Ok(Some(epoch))
        }
        // Another node recorded one meanwhile: it must be here too.
        Swap::Changed(Some(epoch)) if held.contains(&epoch) => Ok(Some(epoch)),
        Swap::Changed(Some(epoch)) => Err(OpenError::ClusterRootMissing { epoch }),
        Swap::Changed(None) => Ok(Some(first)),
    }
}
