//! The background scheduler: periodic rotation (persisted next time, so it
//! survives restarts), usage-based rotation (GCM invocation limit), and
//! execution of due deletions. Each action is audited as the service's own
//! principal. Rotation re-checks under the key's lock that it is still due,
//! so a restart or a concurrent manual rotation never rotates twice;
//! deletion re-checks under the lock that the key is still pending deletion,
//! so a cancelled deletion is never carried out; likewise a key version
//! whose destruction window ended is destroyed only if it is still
//! scheduled (`version_retirement.rs`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kms_hsm::HsmError;
use kms_storage::{KeyRecord, KeyState, VersionState};

use super::operation::Operation;
use super::{KmsService, RequestMeta, kek_object_id, now_ms};
use crate::error::{KmsError, Result};

/// The background job name the scheduler's leadership is held under.
pub const SCHEDULER_JOB: &str = "scheduler";

/// What one pass of the scheduler did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerPass {
    pub rotated: usize,
    pub deleted: usize,
    /// Key versions destroyed at the end of their destruction window.
    pub versions_destroyed: usize,
    pub failed: usize,
}

impl KmsService {
    /// One pass over every key. Safe to run at any time and repeatedly.
    pub fn run_scheduler_pass(&self) -> SchedulerPass {
        self.run_scheduler_pass_at(now_ms())
    }

    /// One pass as if the time were `now` (unix ms): tests use it to reach
    /// deletion dates and rotation times without waiting for them.
    ///
    /// In a cluster only the node that leads the `scheduler` job (an etcd
    /// lease, design note §2.3.3 I6) runs passes; the others return an
    /// empty pass. The pass's catalogue writes carry the leader's fence,
    /// so a node that lost the lease mid-pass commits nothing more.
    pub fn run_scheduler_pass_at(&self, now: u64) -> SchedulerPass {
        let fence = match self.catalogue().engine().leadership(SCHEDULER_JOB) {
            Ok(Some(fence)) => fence,
            Ok(None) => return SchedulerPass::default(),
            Err(e) => {
                tracing::warn!(error = %e, "scheduler cannot tell whether it leads; skipping this pass");
                return SchedulerPass {
                    failed: 1,
                    ..SchedulerPass::default()
                };
            }
        };
        kms_storage::with_fence(fence, || self.scheduler_pass(now))
    }

    fn scheduler_pass(&self, now: u64) -> SchedulerPass {
        let mut pass = SchedulerPass::default();
        let mut token: Option<String> = None;
        loop {
            let page = match self.catalogue().list_keys(token.as_deref(), 500) {
                Ok(page) => page,
                Err(e) => {
                    tracing::error!(error = %e, "scheduler cannot list keys");
                    pass.failed += 1;
                    return pass;
                }
            };
            for record in &page.items {
                // Versions first: a key deleted in this pass takes its
                // versions with it anyway.
                match self.destroy_due_versions(record, now) {
                    Ok(n) => pass.versions_destroyed += n,
                    Err(e) => {
                        tracing::warn!(key_id = %record.id, error = %e.chain(), "scheduled version destruction failed; will retry");
                        pass.failed += 1;
                    }
                }
                match self.schedule_one(record, now) {
                    Ok(Some(Action::Rotated)) => pass.rotated += 1,
                    Ok(Some(Action::Deleted)) => pass.deleted += 1,
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(key_id = %record.id, error = %e.chain(), "scheduled action failed; will retry");
                        pass.failed += 1;
                    }
                }
            }
            match page.next_page_token {
                Some(next) => token = Some(next),
                None => return pass,
            }
        }
    }

    fn schedule_one(&self, record: &KeyRecord, now: u64) -> Result<Option<Action>> {
        match record.state {
            KeyState::PendingDeletion { delete_at_ms } if delete_at_ms <= now => {
                self.execute_deletion(record, now)
            }
            KeyState::Enabled if self.rotation_due(record, now)? => {
                let meta = RequestMeta::internal("scheduled-rotation");
                let key = record.id.to_string();
                let rotated =
                    self.audited(&meta, Operation::AutomaticRotation, Some(&key), |audit| {
                        audit.key(&record.id, None);
                        let version = self.rotate_locked(&record.id, Some(now))?;
                        audit.key(&record.id, Some(version.version));
                        Ok(version)
                    });
                match rotated {
                    Ok(_) => Ok(Some(Action::Rotated)),
                    // Someone else rotated in between: nothing to do.
                    Err(KmsError::RotationNotDue) => Ok(None),
                    Err(e) => Err(e),
                }
            }
            _ => Ok(None),
        }
    }

    /// Destroys every KEK of the key in the HSM, then makes the key a
    /// tombstone (its id is never reused; its audit history stays readable).
    /// Under the key's lock, and only if the key read under it is still
    /// pending deletion and due at `now`: `record` comes from a listing,
    /// and a deletion cancelled since must not be carried out.
    fn execute_deletion(&self, record: &KeyRecord, now: u64) -> Result<Option<Action>> {
        let meta = RequestMeta::internal("scheduled-deletion");
        let key = record.id.to_string();
        let _guard = self.key_locks.lock(&record.id);
        let current = self.catalogue().get_key(&record.id)?;
        let due = matches!(
            current.map(|k| k.state),
            Some(KeyState::PendingDeletion { delete_at_ms }) if delete_at_ms <= now
        );
        if !due {
            return Ok(None);
        }
        self.audited(&meta, Operation::DeleteKeyMaterial, Some(&key), |audit| {
            audit.key(&record.id, None);
            let catalogue = self.catalogue();
            for version in catalogue.list_versions(&record.id)? {
                // A wrapped version has no HSM object: its blob goes with
                // the tombstone's versions (and with its root, from backups).
                if matches!(version.state, VersionState::Destroyed { .. })
                    || matches!(version.kek, kms_storage::KekHandle::Wrapped { .. })
                {
                    continue;
                }
                match self.hsm.destroy_key(&kek_object_id(&version.kek)?) {
                    Ok(()) | Err(HsmError::ObjectNotFound { .. }) => {}
                    Err(e) => return Err(KmsError::from(e)),
                }
            }
            catalogue.finalize_key_deletion(&record.id, now_ms())?;
            self.evict_working_keys(&record.id, None);
            tracing::info!(key_id = %record.id, "key deleted; tombstone kept");
            Ok(Some(Action::Deleted))
        })
    }
}

enum Action {
    Rotated,
    Deleted,
}

/// Runs scheduler passes every `interval` on a dedicated thread until
/// `stop` is set (then unpark the thread to stop it at once). The thread is
/// blocking work by nature (HSM, RocksDB).
pub fn spawn(
    service: Arc<KmsService>,
    interval: Duration,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("kms-scheduler".into())
        .spawn(move || {
            while !stop.load(Ordering::Acquire) {
                let pass = service.run_scheduler_pass();
                if pass != SchedulerPass::default() {
                    tracing::info!(
                        rotated = pass.rotated,
                        deleted = pass.deleted,
                        versions_destroyed = pass.versions_destroyed,
                        failed = pass.failed,
                        "scheduler pass"
                    );
                }
                if crate::background::wait_or_stop(&stop, interval) {
                    break;
                }
            }
        })
        .unwrap_or_else(|e| panic!("cannot start the scheduler thread: {e}"))
}
