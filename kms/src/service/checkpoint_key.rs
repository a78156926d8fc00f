//! The audit checkpoint HMAC key: which key MACs the audit log's
//! checkpoints, and signing/verifying with it (issue 14 item 2).
//!
//! Two forms, chosen once at start-up ([`CheckpointKey::open`]) and never
//! migrated from one to the other:
//!
//! - **Token object** `kms-audit-hmac/v1` (`AUDIT_MAC_KEY_ID`): every
//!   deployment whose first start had no root key, and every deployment
//!   that already has this object. Kept as it is when a root appears later,
//!   so the existing chain keeps verifying under the key that made it (a
//!   silent switch would leave two keys and one chain).
//! - **Wrapped**: a deployment whose first start had a root key (and
//!   wrapped versions on) generates the key inside the HSM as a session
//!   object, wraps it under the active root and stores only the blob, as the
//!   catalogue meta record `audit_checkpoint_key` (`WrappedServiceKey`, like
//!   the catalogue-integrity key). Every start unwraps it eagerly onto a
//!   holder session of its own and checks it against the first stored
//!   checkpoint, so a broken or swapped blob refuses start naming the
//!   record instead of failing the first checkpoint.
//!
//! What it must never do: hold or log key bytes (only handles and the
//! wrapped blob), or fall back from a stored wrapped key to the token
//! object (that would let whoever deletes the meta record choose the key).

use std::sync::Arc;

use kms_hsm::{
    Hsm, HsmError, KeyHolder, KeyPurpose, ObjectId, RootVariant, WorkingKey, WrapMechanism,
    WrappedKey,
};
use kms_storage::{Catalogue, Storage, WrappedServiceKey};
use parking_lot::Mutex;

use super::{AUDIT_MAC_KEY_ID, OpenError};

/// Name of the wrapped checkpoint key's catalogue meta record, as start-up
/// errors name it.
pub(crate) const CHECKPOINT_KEY_RECORD: &str = "audit_checkpoint_key";

/// The key that MACs audit checkpoints; see the module docs.
pub(crate) enum CheckpointKey {
    /// The token object `kms-audit-hmac/v1`.
    Token(ObjectId),
    /// Unwrapped from the `audit_checkpoint_key` meta record.
    Wrapped(WrappedCheckpointKey),
}

impl std::fmt::Debug for CheckpointKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckpointKey::Token(id) => f.debug_tuple("Token").field(id).finish(),
            CheckpointKey::Wrapped(key) => f
                .debug_struct("Wrapped")
                .field("root_epoch", &key.blob.lock().root_epoch)
                .finish_non_exhaustive(),
        }
    }
}

/// The wrapped form: the blob, and its working copy on a holder of its own
/// (re-unwrapped after a holder loss).
pub(crate) struct WrappedCheckpointKey {
    hsm: Arc<Hsm>,
    variant: RootVariant,
    /// Replaced when root rotation re-wraps the stored record
    /// ([`CheckpointKey::adopt_rewrapped`]): an unwrap after a holder loss
    /// must not need a root that may since have been destroyed.
    blob: Mutex<WrappedKey>,
    /// `None` after a holder loss, until the next use.
    held: Mutex<Option<(KeyHolder, WorkingKey)>>,
}

/// What start-up knows about the roots (from `open_wrapped`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RootState {
    /// The active (highest) root epoch.
    pub(crate) epoch: u32,
    pub(crate) variant: RootVariant,
    /// Whether new keys are wrapped (`hsm.wrapped_versions` not false).
    pub(crate) new_versions: bool,
}

impl CheckpointKey {
    /// Root rotation re-wrapped the stored `audit_checkpoint_key` record:
    /// later unwraps (after a holder loss) use the new blob. The key
    /// material is unchanged, so the working copy in use stays valid. A
    /// token-object key has no blob and ignores this.
    pub(crate) fn adopt_rewrapped(&self, rewrapped: WrappedKey) {
        if let CheckpointKey::Wrapped(key) = self {
            *key.blob.lock() = rewrapped;
        }
    }

    /// Finds or creates the checkpoint key (see the module docs for the
    /// rule) and, for a wrapped one, unwraps it and checks it against the
    /// first stored checkpoint.
    ///
    /// # Errors
    /// `OpenError::ServiceKey` naming `audit_checkpoint_key` if the stored
    /// record names an unknown mechanism, does not unwrap (tampered,
    /// truncated, wrapped under a root the token lacks) or does not verify
    /// the first checkpoint (swapped); `OpenError::Hsm`/`Storage` otherwise.
    pub(crate) fn open(
        hsm: &Arc<Hsm>,
        storage: &Storage,
        catalogue: &Catalogue,
        roots: Option<RootState>,
    ) -> Result<CheckpointKey, OpenError> {
        if let Some(stored) = catalogue.checkpoint_key().map_err(OpenError::Storage)? {
            let variant = roots.map(|r| r.variant).ok_or(OpenError::ServiceKey {
                record: CHECKPOINT_KEY_RECORD,
                what: "it is wrapped under a root key but the token has none",
                source: None,
            })?;
            let key = CheckpointKey::Wrapped(WrappedCheckpointKey::open(hsm, variant, stored)?);
            key.check_first_checkpoint(storage)?;
            return Ok(key);
        }
        let token_id = token_key_id();
        if hsm.key_exists(&token_id).map_err(OpenError::Hsm)? {
            // An existing deployment: keep the key its chain was made with.
            return Ok(CheckpointKey::Token(token_id));
        }
        match roots {
            Some(roots) if roots.new_versions => {
                let holder = hsm.key_holder().map_err(OpenError::Hsm)?;
                let (wrapped, key) = holder
                    .generate_version(roots.epoch, KeyPurpose::Hmac, roots.variant)
                    .map_err(OpenError::Hsm)?;
                // Only the blob is kept; it is unwrapped below like on every start.
                let _ = holder.destroy(key);
                drop(holder);
                let stored = catalogue
                    .init_checkpoint_key(WrappedServiceKey {
                        root_epoch: wrapped.root_epoch,
                        mechanism: wrapped.mechanism.code(),
                        blob: wrapped.blob,
                    })
                    .map_err(OpenError::Storage)?;
                tracing::info!(
                    epoch = roots.epoch,
                    "created the audit checkpoint HMAC key, wrapped under the root"
                );
                let key =
                    CheckpointKey::Wrapped(WrappedCheckpointKey::open(hsm, roots.variant, stored)?);
                key.check_first_checkpoint(storage)?;
                Ok(key)
            }
            _ => {
                // The first start of a deployment without a root (an
                // existing database whose key vanished will fail
                // verification, as it should).
                hsm.generate_key(KeyPurpose::Hmac, &token_id)
                    .map_err(OpenError::Hsm)?;
                tracing::info!("created the audit checkpoint HMAC key in the HSM");
                Ok(CheckpointKey::Token(token_id))
            }
        }
    }

    /// Whether the key is the wrapped form (tests, `kms hsm` reports).
    pub(crate) fn is_wrapped(&self) -> bool {
        matches!(self, CheckpointKey::Wrapped(_))
    }

    /// HMAC-SHA256 of `message` inside the HSM.
    ///
    /// # Errors
    /// The HSM's error (a holder loss is retried once on a new holder).
    pub(crate) fn sign(&self, hsm: &Hsm, message: &[u8]) -> Result<[u8; 32], HsmError> {
        match self {
            CheckpointKey::Token(id) => hsm.hmac_sign(id, message),
            CheckpointKey::Wrapped(key) => key.with(|holder, k| holder.hmac_sign(k, message)),
        }
    }

    /// Verifies an HMAC-SHA256 of `message` inside the HSM; a wrong or
    /// wrongly sized `mac` is `Ok(false)`.
    ///
    /// # Errors
    /// As [`CheckpointKey::sign`].
    pub(crate) fn verify(&self, hsm: &Hsm, message: &[u8], mac: &[u8]) -> Result<bool, HsmError> {
        match self {
            CheckpointKey::Token(id) => hsm.hmac_verify(id, message, mac),
            CheckpointKey::Wrapped(key) => {
                // As `Hsm::hmac_verify`: only the full 32 bytes may verify.
                if mac.len() != 32 {
                    return Ok(false);
                }
                key.with(|holder, k| holder.hmac_verify(k, message, mac))
            }
        }
    }

    /// A swapped blob (another valid blob under the same root) unwraps
    /// fine; the first checkpoint of the log, if any, tells whether it is
    /// the key the log was made with.
    fn check_first_checkpoint(&self, storage: &Storage) -> Result<(), OpenError> {
        let first = storage
            .audit_reader()
            .checkpoints(None, 1)
            .map_err(OpenError::Storage)?;
        let Some(checkpoint) = first.first() else {
            return Ok(());
        };
        let CheckpointKey::Wrapped(key) = self else {
            return Ok(());
        };
        let message = kms_storage::Checkpoint::mac_message(
            checkpoint.seq,
            checkpoint.time_micros,
            &checkpoint.head_hash,
        );
        let verified = self
            .verify(&key.hsm, &message, &checkpoint.mac)
            .map_err(OpenError::Hsm)?;
        if verified {
            Ok(())
        } else {
            Err(OpenError::ServiceKey {
                record: CHECKPOINT_KEY_RECORD,
                what: "it does not verify the audit log's first checkpoint (a swapped blob?)",
                source: None,
            })
        }
    }
}

impl WrappedCheckpointKey {
    /// Unwraps `stored` on a new holder (eagerly: start-up).
    fn open(
        hsm: &Arc<Hsm>,
        variant: RootVariant,
        stored: WrappedServiceKey,
    ) -> Result<WrappedCheckpointKey, OpenError> {
        let blob = service_key_blob(CHECKPOINT_KEY_RECORD, stored)?;
        let held =
            unwrap_on_new_holder(hsm, &blob, variant).map_err(|source| OpenError::ServiceKey {
                record: CHECKPOINT_KEY_RECORD,
                what: "its blob does not unwrap",
                source: Some(source),
            })?;
        Ok(WrappedCheckpointKey {
            hsm: Arc::clone(hsm),
            variant,
            blob: Mutex::new(blob),
            held: Mutex::new(Some(held)),
        })
    }

    /// Runs `work` with the working copy, re-unwrapping it on a new holder
    /// once if the holder was lost (`WorkingKeyStale`). The lock serialises
    /// checkpoint MACs (one per checkpoint, from the audit writer) and
    /// verification.
    fn with<T>(
        &self,
        work: impl Fn(&KeyHolder, &WorkingKey) -> Result<T, HsmError>,
    ) -> Result<T, HsmError> {
        let mut held = self.held.lock();
        let mut retried = false;
        loop {
            if held.is_none() {
                let blob = self.blob.lock().clone();
                *held = Some(unwrap_on_new_holder(&self.hsm, &blob, self.variant)?);
            }
            let Some((holder, key)) = held.as_ref() else {
                return Err(HsmError::WorkingKeyStale);
            };
            match work(holder, key) {
                Err(HsmError::WorkingKeyStale) if !retried => {
                    // Dropping the holder closes its session (and the key with it).
                    *held = None;
                    retried = true;
                }
                other => return other,
            }
        }
    }
}

fn unwrap_on_new_holder(
    hsm: &Hsm,
    blob: &WrappedKey,
    variant: RootVariant,
) -> Result<(KeyHolder, WorkingKey), HsmError> {
    let holder = hsm.key_holder()?;
    let key = holder.unwrap(blob, KeyPurpose::Hmac, variant)?;
    Ok((holder, key))
}

/// The blob of a stored service key, or `ServiceKey` naming `record` if it
/// names a mechanism this build does not know.
pub(crate) fn service_key_blob(
    record: &'static str,
    stored: WrappedServiceKey,
) -> Result<WrappedKey, OpenError> {
    let mechanism = WrapMechanism::from_code(stored.mechanism).ok_or(OpenError::ServiceKey {
        record,
        what: "it names an unknown wrapping mechanism",
        source: None,
    })?;
    Ok(WrappedKey {
        root_epoch: stored.root_epoch,
        mechanism,
        blob: stored.blob,
    })
}

pub(crate) fn token_key_id() -> ObjectId {
    // A non-empty constant of 17 bytes: always a valid id.
    ObjectId::new(AUDIT_MAC_KEY_ID.to_vec()).unwrap_or_else(|_| unreachable!("valid constant id"))
}
