//! Start-up reconciliation of key versions a crash left pending.
//!
//! A pending version was recorded (synced) before its KEK was generated. If
//! the HSM holds the KEK with the right attributes, creation finishes (the
//! version becomes enabled and primary); otherwise, or if the key is pending
//! deletion (it gets no new version), the version is discarded.
//! A key whose very first version is discarded never became usable and is
//! turned into a tombstone. Nothing here was ever acknowledged to a client.

use kms_hsm::{HsmError, KeyPurpose};
use kms_storage::KeyState;

use super::operation::Operation;
use super::{KmsService, RequestMeta, kek_object_id, now_ms};
use crate::error::{KmsError, Result};

impl KmsService {
    pub(crate) fn reconcile_pending_versions(&self) -> Result<()> {
        let catalogue = self.catalogue();
        for pending in catalogue.list_pending_versions()? {
            let meta = RequestMeta::internal("reconcile");
            let key = pending.key_id.to_string();
            self.audited(&meta, Operation::ReconcileKeyVersion, Some(&key), |audit| {
                audit.key(&pending.key_id, Some(pending.version));
                let object = kek_object_id(&pending.kek)?;
                let sound = match self.hsm.key_object_info(&object, KeyPurpose::Kek) {
                    // The HSM layer checks the object against the same attribute
                    // table the generation template is made from.
                    Ok(info) => !info.value_readable && info.conforms,
                    Err(HsmError::ObjectNotFound { .. }) => false,
                    Err(e) => return Err(KmsError::from(e)),
                };
                // A key pending deletion gets no new version (a catalogue
                // invariant): its interrupted version is discarded instead.
                let frozen = matches!(
                    catalogue.get_key(&pending.key_id)?.map(|k| k.state),
                    Some(KeyState::PendingDeletion { .. })
                );
                if sound && !frozen {
                    catalogue.commit_version(&pending.key_id, pending.version, now_ms())?;
                    tracing::info!(key_id = %pending.key_id, version = pending.version, "completed a key version interrupted by a crash");
                    return Ok(());
                }
                // Remove whatever half-made object there is, then forget the version.
                match self.hsm.destroy_key(&object) {
                    Ok(()) | Err(HsmError::ObjectNotFound { .. }) => {}
                    Err(e) => return Err(KmsError::from(e)),
                }
                catalogue.discard_version(&pending.key_id, pending.version, now_ms())?;
                tracing::warn!(key_id = %pending.key_id, version = pending.version, "discarded a key version whose KEK was never made");
                if let Some(record) = catalogue.get_key(&pending.key_id)?
                    && record.primary_version.is_none()
                {
                    catalogue.finalize_key_deletion(&pending.key_id, now_ms())?;
                }
                Ok(())
            })?;
        }
        Ok(())
    }
}
