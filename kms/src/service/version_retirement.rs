//! Retiring one key version (issue 18 items 2 and 3): scheduled
//! destruction with a waiting period and a recent-use guard, restore within
//! the window, the scheduler's destruction at its end, and the
//! "re-encrypt only" emergency state.
//!
//! Every change takes the key's lock and validates against the records read
//! under it (as every lifecycle change, `keys.rs`); the catalogue write
//! waits for every cluster node (`Catalogue::write`), so once a schedule or
//! a destruction returns, no node decrypts under the version. Destruction
//! removes the key material for good: the HSM object of a token-object
//! version (through kms-hsm), or the wrapped blob of a wrapped version (from
//! the catalogue record); the version stays as a tombstone, so its blobs
//! fail with "key version N of key K was destroyed at T".

use kms_hsm::HsmError;
use kms_storage::{KekHandle, KeyId, KeyRecord, KeyState, Permission, VersionRecord, VersionState};

use super::lookup::version_unusable;
use super::operation::Operation;
use super::{KmsService, RequestMeta, kek_object_id, now_ms};
use crate::error::{KmsError, Result};

/// Destruction waiting period bounds, in days (issue 18 item 2).
pub const MIN_VERSION_DESTRUCTION_DAYS: u32 = 1;
/// See [`MIN_VERSION_DESTRUCTION_DAYS`].
pub const MAX_VERSION_DESTRUCTION_DAYS: u32 = 30;
/// The waiting period when the request names none, days.
pub const DEFAULT_VERSION_DESTRUCTION_DAYS: u32 = 7;

const DAY_MS: u64 = 86_400_000;

impl KmsService {
    /// ScheduleKeyVersionDestruction: the version becomes
    /// `ScheduledDestruction` at once (it refuses every use) and the
    /// scheduler destroys it `days` days later (default
    /// [`DEFAULT_VERSION_DESTRUCTION_DAYS`]). Scheduling a scheduled
    /// version again sets its new date. With `override_recent_use` the
    /// recent-use guard is skipped and the request is audited as
    /// `ScheduleKeyVersionDestructionOverrideRecentUse` (whatever its
    /// outcome), so that every override is found by its operation.
    ///
    /// # Errors
    /// INVALID_ARGUMENT for `days` outside 1..=30; FAILED_PRECONDITION for
    /// the primary version ([`KmsError::PrimaryVersionDisable`] names it),
    /// a pending or destroyed version, or a version that decrypted within
    /// `lifecycle.version_destruction_quiet_period_days`
    /// ([`KmsError::VersionRecentlyUsed`], with the last use); the errors
    /// of every key change (not found, permission, catalogue).
    pub fn schedule_key_version_destruction(
        &self,
        meta: &RequestMeta,
        key: &str,
        version: u32,
        days: Option<u32>,
        override_recent_use: bool,
    ) -> Result<VersionRecord> {
        let operation = if override_recent_use {
            Operation::ScheduleKeyVersionDestructionOverrideRecentUse
        } else {
            Operation::ScheduleKeyVersionDestruction
        };
        self.audited(meta, operation, Some(key), |audit| {
            // Resolved first, so that even a refused request's audit record
            // names the key id (found by `kms audit list --key`), not an alias.
            let resolved = self.resolve_for(meta, audit, key, Permission::Manage)?;
            audit.key(&resolved.id, Some(version));
            let days = days.unwrap_or(DEFAULT_VERSION_DESTRUCTION_DAYS);
            if !(MIN_VERSION_DESTRUCTION_DAYS..=MAX_VERSION_DESTRUCTION_DAYS).contains(&days) {
                return Err(KmsError::invalid(
                    "pending_window_days",
                    format!(
                        "must be {MIN_VERSION_DESTRUCTION_DAYS} to {MAX_VERSION_DESTRUCTION_DAYS} days (CLI: --days)"
                    ),
                ));
            }
            let _guard = self.key_locks.lock(&resolved.id);
            let record = self.locked_record(&resolved.id)?;
            let current = self.version(&record.id, version)?;
            check_retirable(&record, &current)?;
            if !override_recent_use {
                self.check_quiet_period(&current)?;
            }
            let now = now_ms();
            let destroy_at_ms = now.saturating_add(u64::from(days) * DAY_MS);
            let updated =
                self.catalogue()
                    .update_version::<KmsError>(&record.id, version, now, |v| {
                        // Re-checked against the record read under the
                        // catalogue lock (a cluster peer may have changed it).
                        check_retirable(&record, v)?;
                        v.state = VersionState::ScheduledDestruction { destroy_at_ms };
                        Ok(())
                    })?;
            self.evict_working_keys(&record.id, Some(version));
            tracing::info!(key_id = %record.id, version, days, override_recent_use, "key version scheduled for destruction");
            Ok(updated)
        })
    }

    /// The recent-use guard: refuses a version whose last decrypt-side use
    /// is within the configured quiet period (0 days: no guard).
    fn check_quiet_period(&self, version: &VersionRecord) -> Result<()> {
        let quiet_period_days = self.lifecycle.version_destruction_quiet_period_days;
        if quiet_period_days == 0 {
            return Ok(());
        }
        let Some(last_decrypt_ms) = self.last_decrypt_ms(&version.key_id, version.version)? else {
            return Ok(());
        };
        let quiet_ms = u64::from(quiet_period_days) * DAY_MS;
        if now_ms().saturating_sub(last_decrypt_ms) < quiet_ms {
            return Err(KmsError::VersionRecentlyUsed {
                key_id: version.key_id.clone(),
                version: version.version,
                last_decrypt_ms,
                quiet_period_days,
            });
        }
        Ok(())
    }

    /// The guard's one input: the version's last decrypt-side use, unix ms,
    /// from the per-version use records (issue 18 item 1, `usage.rs`).
    fn last_decrypt_ms(&self, key_id: &KeyId, version: u32) -> Result<Option<u64>> {
        Ok(self.version_usage(key_id, version)?.last_decrypt_ms)
    }

    /// RestoreKeyVersion: cancels a scheduled destruction; the version
    /// becomes `Disabled` (EnableKeyVersion to use it again).
    ///
    /// # Errors
    /// FAILED_PRECONDITION for a version not scheduled for destruction
    /// (a destroyed one with [`KmsError::VersionDestroyed`]); the errors of
    /// every version change.
    pub fn restore_key_version(
        &self,
        meta: &RequestMeta,
        key: &str,
        version: u32,
    ) -> Result<VersionRecord> {
        self.change_version(
            meta,
            Operation::RestoreKeyVersion,
            key,
            version,
            |_, v| match v.state {
                VersionState::ScheduledDestruction { .. } => {
                    v.state = VersionState::Disabled;
                    Ok(())
                }
                VersionState::Destroyed { .. } => Err(version_unusable(v)),
                _ => Err(KmsError::VersionUnusable {
                    key_id: v.key_id.clone(),
                    version: v.version,
                    state: not_scheduled(&v.state),
                }),
            },
        )
    }

    /// SetKeyVersionReEncryptOnly: the version decrypts only as the source
    /// of a ReEncrypt from now on (issue 18 item 3). Allowed from
    /// `Disabled`, from `Enabled` unless primary, and from `ReEncryptOnly`.
    ///
    /// # Errors
    /// FAILED_PRECONDITION for the primary version
    /// ([`KmsError::PrimaryVersionDisable`]) or a version in another state;
    /// the errors of every version change.
    pub fn set_key_version_reencrypt_only(
        &self,
        meta: &RequestMeta,
        key: &str,
        version: u32,
    ) -> Result<VersionRecord> {
        self.set_non_primary_state(
            meta,
            Operation::SetKeyVersionReEncryptOnly,
            key,
            version,
            VersionState::ReEncryptOnly,
        )
    }

    /// The scheduler's part: destroys every version of `record` whose
    /// destruction window ended by `now` (unix ms). Returns how many were
    /// destroyed; a failure leaves the version scheduled (the next pass
    /// retries: an HSM object already gone counts as destroyed).
    pub(super) fn destroy_due_versions(&self, record: &KeyRecord, now: u64) -> Result<usize> {
        if matches!(record.state, KeyState::Deleted { .. }) {
            return Ok(0);
        }
        let mut destroyed = 0;
        for version in self.catalogue().list_versions(&record.id)? {
            let due = matches!(
                version.state,
                VersionState::ScheduledDestruction { destroy_at_ms } if destroy_at_ms <= now
            );
            if due && self.destroy_version_now(&record.id, version.version, now)? {
                destroyed += 1;
            }
        }
        Ok(destroyed)
    }

    /// Destroys one due version under the key's lock, re-checking that it
    /// is still scheduled and due (a restore since the listing wins), and
    /// audits it as `DestroyKeyVersion` (principal "system"). The HSM
    /// object goes first, then the catalogue record (which erases a wrapped
    /// blob): a crash in between leaves the version scheduled, refused,
    /// and retried by the next pass.
    fn destroy_version_now(&self, key_id: &KeyId, version: u32, now: u64) -> Result<bool> {
        let _guard = self.key_locks.lock(key_id);
        let Some(current) = self.catalogue().get_version(key_id, version)? else {
            return Ok(false);
        };
        let due = matches!(
            current.state,
            VersionState::ScheduledDestruction { destroy_at_ms } if destroy_at_ms <= now
        );
        if !due {
            return Ok(false);
        }
        let meta = RequestMeta::internal("scheduled-version-destruction");
        let key = key_id.to_string();
        self.audited(&meta, Operation::DestroyKeyVersion, Some(&key), |audit| {
            audit.key(key_id, Some(version));
            if let KekHandle::HsmObject { .. } = &current.kek {
                match self.hsm.destroy_key(&kek_object_id(&current.kek)?) {
                    Ok(()) | Err(HsmError::ObjectNotFound { .. }) => {}
                    Err(e) => return Err(KmsError::from(e)),
                }
            }
            let destroyed = self
                .catalogue()
                .destroy_version(key_id, version, now, now_ms())?;
            self.evict_working_keys(key_id, Some(version));
            if destroyed.is_some() {
                tracing::info!(%key_id, version, "key version destroyed; tombstone kept");
            }
            Ok(destroyed.is_some())
        })
    }
}

/// Whether `version` may be scheduled for destruction: never the primary,
/// never a version being created or already destroyed.
fn check_retirable(record: &KeyRecord, version: &VersionRecord) -> Result<()> {
    if record.primary_version == Some(version.version) {
        return Err(KmsError::PrimaryVersionDisable {
            key_id: record.id.clone(),
            version: version.version,
        });
    }
    match version.state {
        VersionState::Enabled
        | VersionState::Disabled
        | VersionState::ReEncryptOnly
        | VersionState::ScheduledDestruction { .. } => Ok(()),
        _ => Err(version_unusable(version)),
    }
}

/// How RestoreKeyVersion names a version it cannot restore: it is not
/// scheduled for destruction, and in which state it is instead.
fn not_scheduled(state: &VersionState) -> &'static str {
    match state {
        VersionState::Enabled => {
            "not scheduled for destruction (it is enabled): only a scheduled version can be restored"
        }
        VersionState::Disabled => {
            "not scheduled for destruction (it is disabled): only a scheduled version can be restored"
        }
        VersionState::ReEncryptOnly => {
            "not scheduled for destruction (it is re-encrypt only): only a scheduled version can be restored"
        }
        VersionState::Pending => {
            "not scheduled for destruction (it is being created): only a scheduled version can be restored"
        }
        _ => "not scheduled for destruction: only a scheduled version can be restored",
    }
}
