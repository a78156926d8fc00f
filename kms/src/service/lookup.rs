//! The key-lookup chain every key use walks, in one place and in this
//! order: resolve the name (id or alias) → authorize the caller → ensure
//! the key is usable → its primary version → the HSM object of that
//! version's KEK. Authorization comes before the usability check so that a
//! denied caller learns nothing of the key's state; the checks themselves
//! (policy grants) live in `authz.rs`.

use kms_hsm::{GcmSealed, ObjectId};
use kms_storage::{KekHandle, KeyId, KeyRecord, KeyState, Permission, VersionRecord, VersionState};
use zeroize::Zeroizing;

use super::working_keys::WorkingKeyError;

use super::{AuditFields, KmsService, RequestMeta};
use crate::encryption_context::EncryptionContext;
use crate::error::{KmsError, Result};

impl KmsService {
    /// Looks a key up by id or alias. Every key use and key change starts
    /// here, so this is where a cluster node fails closed: it refuses with
    /// UNAVAILABLE unless its catalogue view is provably no older than Δ
    /// (design note §2.3.3, I3; a single node always passes).
    pub(crate) fn resolve(&self, key: &str) -> Result<KeyRecord> {
        if key.is_empty() {
            return Err(KmsError::invalid(
                "key_id",
                "required (a key id or alias/<name>)",
            ));
        }
        self.catalogue().check_fresh()?;
        self.catalogue()
            .resolve_key(key)?
            .ok_or_else(|| KmsError::KeyNotFound {
                key: key.to_owned(),
            })
    }

    pub(crate) fn version(&self, key: &KeyId, version: u32) -> Result<VersionRecord> {
        self.catalogue()
            .get_version(key, version)?
            .ok_or_else(|| KmsError::VersionNotFound {
                key_id: key.clone(),
                version,
            })
    }

    /// Resolves `key`, authorizes `permission` and only then says whether
    /// the key is usable (so a denied caller learns nothing of its state).
    pub(crate) fn resolve_for_use(
        &self,
        meta: &RequestMeta,
        audit: &mut AuditFields,
        key: &str,
        permission: Permission,
        context: &EncryptionContext,
    ) -> Result<KeyRecord> {
        let record = self.resolve(key)?;
        // A denial is recorded under the canonical key id, not the alias.
        audit.key(&record.id, None);
        self.authorize(meta, &record, permission, Some(context))?;
        ensure_usable(&record)?;
        Ok(record)
    }

    /// Resolves `key` and authorizes an operation that has no context.
    pub(crate) fn resolve_for(
        &self,
        meta: &RequestMeta,
        audit: &mut AuditFields,
        key: &str,
        permission: Permission,
    ) -> Result<KeyRecord> {
        let record = self.resolve(key)?;
        audit.key(&record.id, None);
        self.authorize(meta, &record, permission, None)?;
        Ok(record)
    }

    /// The enabled primary version of a key (batches read it once, not per item).
    pub(crate) fn primary_version(&self, record: &KeyRecord) -> Result<VersionRecord> {
        let number = record.primary_version.ok_or_else(|| match record.origin {
            kms_storage::KeyOrigin::External => super::ImportRefusal::PendingImport {
                key_id: record.id.clone(),
            }
            .into(),
            _ => KmsError::NoPrimaryVersion {
                key_id: record.id.clone(),
            },
        })?;
        let version = self.version(&record.id, number)?;
        ensure_version_usable(&version, VersionUse::Encrypt)?;
        Ok(version)
    }
}

/// What a key version is about to be used for: the one input, with its
/// state, of [`ensure_version_usable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VersionUse {
    /// Encrypt-side use (Encrypt, data keys, a ReEncrypt destination):
    /// the primary version only.
    Encrypt,
    /// Decrypt-side use that hands plaintext to the caller: Decrypt,
    /// BatchDecrypt, the Kubernetes plugin's and the AWS API's Decrypt.
    Decrypt,
    /// The source of a ReEncrypt (BatchReEncrypt too): the plaintext never
    /// leaves the service, so a `ReEncryptOnly` version allows it.
    ReEncryptSource,
}

/// Whether a version's state allows `purpose`: the one place that decides
/// (issue 18 item 3). `Enabled` allows everything (encryption is further
/// limited to the primary, which is always `Enabled`); `ReEncryptOnly`
/// allows only [`VersionUse::ReEncryptSource`]; every other state refuses
/// (a destroyed version with [`KmsError::VersionDestroyed`]).
///
/// # Errors
/// [`KmsError::VersionUnusable`] naming the state, or
/// [`KmsError::VersionDestroyed`] (both FAILED_PRECONDITION).
pub(crate) fn ensure_version_usable(version: &VersionRecord, purpose: VersionUse) -> Result<()> {
    match (version.state, purpose) {
        (VersionState::Enabled, _) | (VersionState::ReEncryptOnly, VersionUse::ReEncryptSource) => {
            Ok(())
        }
        _ => Err(version_unusable(version)),
    }
}

impl KmsService {
    /// AES-256-GCM encryption under `version`'s KEK, however it is held: a
    /// token object (found by its CKA_ID) or a wrapped blob (through the
    /// working-key cache, unwrapped on first use).
    ///
    /// # Errors
    /// [`KmsError::CatalogueRecordCorrupt`] for a wrapped record that fails
    /// its MAC or does not unwrap; HSM errors as `Hsm::encrypt`.
    pub(crate) fn seal_under(
        &self,
        version: &VersionRecord,
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<GcmSealed> {
        match &version.kek {
            KekHandle::Wrapped { .. } => self
                .wrapped_keys()?
                .with_key(
                    &version.key_id,
                    version.version,
                    &version.kek,
                    || self.still_usable(version),
                    |holder, key| self.hsm.encrypt_with(holder, key, aad, plaintext),
                )
                .map_err(from_working_key_error),
            other => Ok(self.hsm.encrypt(&kek_object_id(other)?, aad, plaintext)?),
        }
    }

    /// AES-256-GCM decryption under `version`'s KEK (see `seal_under`).
    ///
    /// # Errors
    /// [`KmsError::InvalidCiphertext`] if the tag does not verify;
    /// otherwise as `seal_under`.
    pub(crate) fn open_under(
        &self,
        version: &VersionRecord,
        iv: &[u8],
        aad: &[u8],
        ciphertext_and_tag: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        match &version.kek {
            KekHandle::Wrapped { .. } => self
                .wrapped_keys()?
                .with_key(
                    &version.key_id,
                    version.version,
                    &version.kek,
                    || self.still_usable(version),
                    |holder, key| {
                        self.hsm
                            .decrypt_with(holder, key, iv, aad, ciphertext_and_tag)
                    },
                )
                .map_err(from_working_key_error),
            other => Ok(self
                .hsm
                .decrypt(&kek_object_id(other)?, iv, aad, ciphertext_and_tag)?),
        }
    }

    /// Whether `version` and its key are, as the catalogue says now, still
    /// usable (the key enabled, the version enabled or re-encrypt only: a
    /// re-encrypt-only version is used, as a ReEncrypt source, after
    /// `ensure_version_usable` allowed it): asked by the working-key cache after a miss
    /// (see `WorkingKeys::with_key`). A failed read counts as unusable (the
    /// entry is then evicted; the next use unwraps again).
    fn still_usable(&self, version: &VersionRecord) -> bool {
        let catalogue = self.catalogue();
        let key_enabled = matches!(
            catalogue.get_key(&version.key_id),
            Ok(Some(key)) if key.state == KeyState::Enabled
        );
        key_enabled
            && matches!(
                catalogue.get_version(&version.key_id, version.version),
                Ok(Some(v)) if matches!(v.state, VersionState::Enabled | VersionState::ReEncryptOnly)
            )
    }

    /// Evicts the cached working keys of `key_id` (of `version` only, if
    /// given) once they stopped being usable (issue 14 item 3: a disabled,
    /// deleted or destroyed version does not stay unwrapped in the HSM).
    /// Call after the catalogue change is written. Nothing to do without
    /// wrapped versions.
    pub(crate) fn evict_working_keys(&self, key_id: &KeyId, version: Option<u32>) {
        if let Some(wrapped) = &self.wrapped {
            wrapped.keys.evict(key_id, version);
        }
    }

    fn wrapped_keys(&self) -> Result<&super::working_keys::WorkingKeys> {
        self.wrapped
            .as_ref()
            .map(|w| &w.keys)
            .ok_or(KmsError::Internal {
                what: "a wrapped key version, but the token has no root key",
            })
    }
}

/// A corrupt record is "catalogue record corrupt" (INTERNAL, audited),
/// never a lost device; other HSM failures map as usual.
pub(crate) fn from_working_key_error(error: WorkingKeyError) -> KmsError {
    if error.is_corrupt_record() {
        return KmsError::CatalogueRecordCorrupt {
            source: Some(Box::new(error)),
        };
    }
    match error {
        WorkingKeyError::Hsm(e) => KmsError::from(e),
        _ => KmsError::Internal {
            what: "working-key cache refused a version",
        },
    }
}

/// Refuses keys that are not enabled, with a distinct error per state.
pub(crate) fn ensure_usable(record: &KeyRecord) -> Result<()> {
    let key_id = record.id.clone();
    match record.state {
        // An EXTERNAL key before its first import has nothing to use.
        KeyState::Enabled
            if record.origin == kms_storage::KeyOrigin::External
                && record.primary_version.is_none() =>
        {
            Err(super::ImportRefusal::PendingImport { key_id }.into())
        }
        KeyState::Enabled => Ok(()),
        KeyState::Disabled => Err(KmsError::KeyDisabled { key_id }),
        KeyState::PendingDeletion { .. } => Err(KmsError::KeyPendingDeletion { key_id }),
        KeyState::Deleted { .. } => Err(KmsError::KeyDeleted { key_id }),
        _ => Err(KmsError::KeyStateUnknown { key_id }),
    }
}

/// The HSM object id of a key version's KEK.
pub(crate) fn kek_object_id(kek: &KekHandle) -> Result<ObjectId> {
    match kek {
        KekHandle::HsmObject { object_id } => {
            ObjectId::new(object_id.clone()).map_err(|_| KmsError::Internal {
                what: "corrupt KEK handle in the catalogue",
            })
        }
        // A wrapped version has no token object: callers branch on the
        // handle first; never treat the blob as an object id.
        KekHandle::Wrapped { .. } => Err(KmsError::Internal {
            what: "a wrapped key version has no token object",
        }),
        _ => Err(KmsError::Internal {
            what: "KEK handle of an unsupported kind",
        }),
    }
}

pub(crate) fn new_kek_handle(key: &KeyId, version: u32) -> KekHandle {
    KekHandle::HsmObject {
        object_id: format!("{key}/v{version}").into_bytes(),
    }
}

/// The refusal of a version in a state that does not allow the use: a
/// destroyed version is [`KmsError::VersionDestroyed`] (with its time),
/// any other [`KmsError::VersionUnusable`] naming the state.
pub(crate) fn version_unusable(v: &VersionRecord) -> KmsError {
    if let VersionState::Destroyed { destroyed_at_ms } = v.state {
        return KmsError::VersionDestroyed {
            key_id: v.key_id.clone(),
            version: v.version,
            destroyed_at_ms,
        };
    }
    KmsError::VersionUnusable {
        key_id: v.key_id.clone(),
        version: v.version,
        state: version_state_name(&v.state),
    }
}

pub(crate) fn version_state_name(state: &VersionState) -> &'static str {
    match state {
        VersionState::Pending => "pending",
        VersionState::Enabled => "enabled",
        VersionState::Disabled => "disabled",
        VersionState::ScheduledDestruction { .. } => "scheduled for destruction",
        VersionState::Destroyed { .. } => "destroyed",
        VersionState::ReEncryptOnly => {
            "re-encrypt only (it decrypts only as the source of ReEncrypt)"
        }
        _ => "in an unknown state",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrapped_kek_handle_is_refused_by_name_not_misread_as_an_object_id() {
        let wrapped = KekHandle::Wrapped {
            root_epoch: 1,
            mechanism: 0x2109,
            blob: vec![7; 40],
            mac: [9; 32],
        };
        match kek_object_id(&wrapped) {
            Err(KmsError::Internal { what }) => {
                assert_eq!(what, "a wrapped key version has no token object");
            }
            other => panic!("expected Internal, got {other:?}"),
        }
    }
}
