//! The first start after `kms backup restore` (design note
//! `hierarchy-and-cluster.md` §1.6): before the service serves anything, it
//! checks that every root epoch the restored catalogue references is in the
//! HSM (rule 3), records the restore in the audit log (whose chain
//! continues from the backup's head), and rotates every enabled key because
//! the restored GCM invocation counters went back in time (rule 2): the
//! restored versions stay enabled for decryption but are never the primary
//! again. Then it removes the catalogue's restore marker. Destructions were
//! replayed by the restore itself (rule 1), before this catalogue could serve.
//!
//! In a cluster the marker is in etcd and every node sees it: the node that
//! wins the `restore` job's leadership does the above once, under its fence
//! (a node that loses leadership mid-way cannot write; its successor starts
//! over); every other node waits, not serving, until the marker is gone.

use std::time::{Duration, Instant};

use kms_storage::{KeyOrigin, KeyState, StorageError};

use super::{KmsService, OpenError, Operation, RequestMeta, SYSTEM_PRINCIPAL};
use crate::backup::RestoreMarker;
use crate::error::KmsError;

/// The background job whose leader finishes a cluster's restore.
const RESTORE_JOB: &str = "restore";

/// How often a cluster node waiting for the restore's leader looks again.
const RESTORE_POLL: Duration = Duration::from_millis(250);

/// How often a waiting node says so in its log.
const RESTORE_NOTE_EVERY: Duration = Duration::from_secs(10);

impl KmsService {
    /// Finishes a pending restore, if the catalogue holds the marker `kms
    /// backup restore` leaves (else does nothing). Idempotent up to the
    /// marker's removal: interrupted, it starts over at the next start (a
    /// key rotated twice loses nothing).
    ///
    /// # Errors
    /// `RestoreRootMissing` naming the first referenced epoch the HSM does
    /// not hold; `Restore` if the catalogue, the HSM or the audit log fails
    /// (the marker stays).
    pub(crate) fn finish_restore(&self) -> Result<(), OpenError> {
        if self.catalogue.engine().cluster_view().is_none() {
            return match self.pending_restore()? {
                Some(marker) => self.finish_restore_with(marker),
                None => Ok(()),
            };
        }
        // A cluster: one node (the `restore` job's leader) rotates, the
        // others wait for it. No timeout: a node must not serve restored
        // GCM counters, and a leader that dies is replaced within its
        // lease (about 2Δ), its successor starting over.
        let mut last_note: Option<Instant> = None;
        loop {
            let Some(marker) = self.pending_restore()? else {
                return Ok(());
            };
            match self.catalogue.engine().leadership(RESTORE_JOB) {
                Ok(Some(fence)) => {
                    return kms_storage::with_fence(fence, || self.finish_restore_with(marker));
                }
                Ok(None) | Err(StorageError::Unavailable { .. }) => {}
                Err(e) => return Err(OpenError::Storage(e)),
            }
            if last_note.is_none_or(|t| t.elapsed() >= RESTORE_NOTE_EVERY) {
                tracing::info!(
                    backup = %marker.backup_id,
                    "waiting for the node that leads the restore to rotate every key before serving"
                );
                last_note = Some(Instant::now());
            }
            std::thread::sleep(RESTORE_POLL);
        }
    }

    /// The catalogue's pending-restore marker, if any.
    fn pending_restore(&self) -> Result<Option<RestoreMarker>, OpenError> {
        self.catalogue
            .restore_marker::<RestoreMarker>()
            .map_err(OpenError::Storage)
    }

    /// Checks the roots, audits the restore, rotates every enabled key and
    /// removes `marker` (see [`KmsService::finish_restore`]).
    fn finish_restore_with(&self, marker: RestoreMarker) -> Result<(), OpenError> {
        let catalogue = &self.catalogue;
        let backup = crate::backup::restore_short_id(&marker.backup_id).to_owned();
        let failed = |source: KmsError| OpenError::Restore {
            backup: backup.clone(),
            source,
        };
        self.check_restored_roots()?;
        let meta = RequestMeta {
            principal: SYSTEM_PRINCIPAL.into(),
            peer: String::new(),
            request_id: format!("restore-{backup}"),
        };
        self.audited(&meta, Operation::Restore, None, |_| Ok(()))
            .map_err(failed)?;
        for key in &marker.replayed_destructions {
            self.audited(&meta, Operation::Restore, Some(key), |_| Ok(()))
                .map_err(failed)?;
        }
        let mut rotated = 0usize;
        let mut token: Option<String> = None;
        loop {
            let page = catalogue
                .list_keys(token.as_deref(), kms_storage::MAX_PAGE_SIZE)
                .map_err(|e| failed(e.into()))?;
            for record in &page.items {
                // Keys that cannot encrypt now are not rotated (a disabled
                // key refuses rotation; an imported key's material comes
                // from its owner); see the README on restore.
                if record.state != KeyState::Enabled
                    || record.origin != KeyOrigin::Kms
                    || record.primary_version.is_none()
                {
                    continue;
                }
                let key = record.id.to_string();
                self.audited(&meta, Operation::Restore, Some(&key), |audit| {
                    audit.key(&record.id, None);
                    let version = self.rotate_locked(&record.id, None)?;
                    audit.key(&record.id, Some(version.version));
                    Ok(())
                })
                .map_err(failed)?;
                rotated += 1;
            }
            match page.next_page_token {
                Some(next) => token = Some(next),
                None => break,
            }
        }
        catalogue
            .clear_restore_marker()
            .map_err(OpenError::Storage)?;
        tracing::info!(
            backup = %marker.backup_id,
            from = %marker.backup_dir,
            audit_head = marker.audit_head_seq,
            replayed = marker.replayed_destructions.len(),
            rotated,
            "restore finished: every enabled key has a new primary version"
        );
        Ok(())
    }

    /// Rule 3 at start: every root epoch the catalogue references (versions
    /// not destroyed, service keys) must be in the HSM.
    fn check_restored_roots(&self) -> Result<(), OpenError> {
        let referenced = crate::backup::referenced_root_epochs(&self.catalogue).map_err(|e| {
            OpenError::Restore {
                backup: String::new(),
                source: KmsError::Backup { source: e },
            }
        })?;
        if referenced.is_empty() {
            return Ok(());
        }
        let present = self
            .hsm
            .key_holder()
            .and_then(|holder| holder.root_epochs())
            .map_err(OpenError::Hsm)?;
        match referenced.iter().find(|e| !present.contains(e)) {
            Some(&epoch) => Err(OpenError::RestoreRootMissing { epoch }),
            None => Ok(()),
        }
    }
}
