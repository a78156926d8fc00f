//! `KeyHolder`: one dedicated logged-in session that holds working keys
//! (unwrapped key versions, session objects) for as long as it lives, and
//! the public API of the wrapped-key hierarchy (design note
//! `hierarchy-and-cluster.md` §1.5.3 "Use": working copies live on one
//! long-lived holder session because session objects die with their
//! session and on logout).
//!
//! A holder belongs to one module generation: after a re-initialization or
//! a session/login loss every call answers `HsmError::WorkingKeyStale`, and
//! the caller (the service's working-key cache) drops its handles and
//! unwraps again on a new holder. Calls on one holder are serialized (a
//! PKCS#11 session is single-threaded). Nothing here runs under the
//! `Hsm`'s recovery policy; the caller decides.
//!
//! What it must never do: hand out a working key's bytes, or use a handle
//! from another holder or generation.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use parking_lot::Mutex;
use ring::rand::SystemRandom;
use zeroize::Zeroizing;

use super::{
    GcmSealed, Hsm, check_gcm_open_input, gcm_open, gcm_seal, hmac_sign_with, hmac_verify_with,
};
use crate::error::{HsmError, Operation, Result};
use crate::module::{Module, ModuleState};
use crate::objects::KeyPurpose;
use crate::return_code::FailureClass;
use crate::root::{self, RootVariant};
use crate::wrapped::{self, WrappedKey};

/// Distinguishes holders, so a working key is only used on its own.
static NEXT_HOLDER: AtomicU64 = AtomicU64::new(1);

/// A dedicated session that holds working keys; see the module docs.
/// Obtain one with `Hsm::key_holder`. Dropping it closes its session, which
/// destroys every working key it holds.
pub struct KeyHolder {
    module: Arc<Module>,
    slot: Slot,
    /// The module generation the session was opened in.
    generation: u64,
    id: u64,
    /// `None` only while being dropped.
    session: Mutex<Option<Session>>,
    rng: SystemRandom,
}

impl std::fmt::Debug for KeyHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyHolder")
            .field("id", &self.id)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// A working key: the handle of an unwrapped (or freshly generated) key
/// version, a private sensitive session object on one `KeyHolder`. Holds no
/// key material. Valid until destroyed or until its holder is gone.
#[derive(Debug)]
pub struct WorkingKey {
    handle: ObjectHandle,
    holder: u64,
    purpose: KeyPurpose,
}

impl WorkingKey {
    /// What the key is for (AES-GCM or HMAC).
    pub fn purpose(&self) -> KeyPurpose {
        self.purpose
    }
}

impl Hsm {
    /// Opens a new holder session on this token (design note §1.5.3). The
    /// login is the `Hsm`'s (PKCS#11 logins are per application), so the
    /// holder's keys also die if every session of the token closes.
    ///
    /// # Errors
    /// `Unavailable` if the token is gone, or the PKCS#11 error of
    /// `C_OpenSession`.
    pub fn key_holder(&self) -> Result<KeyHolder> {
        let state = self.module.read();
        let slot = self.pool.slot(&state)?;
        let mut session = self.pool.open_extra_session(&state, slot)?;
        if !logged_in_as_user(&session) {
            // The login was lost behind the pool's back (a C_Logout on any
            // session of this application logs them all out): a holder
            // without it cannot unwrap private keys. Log in again through
            // the pool, which also drops its now-public sessions.
            drop(session);
            self.pool.reconnect(&state)?;
            session = self
                .pool
                .open_extra_session(&state, self.pool.slot(&state)?)?;
        }
        Ok(KeyHolder {
            module: Arc::clone(&self.module),
            slot,
            generation: state.generation(),
            id: NEXT_HOLDER.fetch_add(1, Ordering::Relaxed),
            session: Mutex::new(Some(session)),
            rng: SystemRandom::new(),
        })
    }
}

impl Hsm {
    /// AES-256-GCM encryption under `holder`'s working key `key` on one of
    /// the pool's sessions, so that encryptions under working keys run in
    /// parallel like `Hsm::encrypt` (PKCS#11 session objects are visible to
    /// every session of the application that made them). Runs under the
    /// recovery policy; a dead working key is `WorkingKeyStale` and does not
    /// make the pool reconnect.
    ///
    /// # Errors
    /// As `Hsm::encrypt`, plus `InvalidArgument` if `key` is not `holder`'s
    /// and `WorkingKeyStale` if the holder's generation is over or the key
    /// is gone.
    pub fn encrypt_with(
        &self,
        holder: &KeyHolder,
        key: &WorkingKey,
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<GcmSealed> {
        let handle = holder.handle_of(key)?;
        self.run(Operation::Encrypt, |session, state| {
            holder.check_generation(state)?;
            gcm_seal(session, handle, &self.rng, aad, plaintext).map_err(stale_key)
        })
    }

    /// AES-256-GCM decryption under `holder`'s working key `key` on one of
    /// the pool's sessions (see `encrypt_with`).
    ///
    /// # Errors
    /// As `Hsm::decrypt`, plus those of `encrypt_with`.
    pub fn decrypt_with(
        &self,
        holder: &KeyHolder,
        key: &WorkingKey,
        iv: &[u8],
        aad: &[u8],
        ciphertext_and_tag: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        let handle = holder.handle_of(key)?;
        check_gcm_open_input(iv, aad, ciphertext_and_tag)?;
        self.run(Operation::Decrypt, |session, state| {
            holder.check_generation(state)?;
            gcm_open(session, handle, iv, aad, ciphertext_and_tag).map_err(stale_key)
        })
    }
}

/// On a pooled session, an invalid *key* handle means the working key (or
/// its holder session) is gone, not that the pool's session is: report it
/// as stale instead of letting recovery reconnect the pool.
fn stale_key(error: HsmError) -> HsmError {
    match &error {
        HsmError::Pkcs11 { code, .. } if code.is_invalid_handle() => HsmError::WorkingKeyStale,
        _ => error,
    }
}

impl KeyHolder {
    /// `WorkingKeyStale` unless the module is still in the holder's generation.
    fn check_generation(&self, state: &ModuleState) -> Result<()> {
        if state.generation() == self.generation {
            Ok(())
        } else {
            Err(HsmError::WorkingKeyStale)
        }
    }

    /// Runs `work` on the holder's session if the module generation is
    /// still the one it was opened in. A lost session, login or object
    /// (the class recovery would reconnect for) becomes `WorkingKeyStale`.
    fn with<T>(&self, work: impl FnOnce(&Session, &ModuleState) -> Result<T>) -> Result<T> {
        let state = self.module.read();
        if state.generation() != self.generation {
            return Err(HsmError::WorkingKeyStale);
        }
        let guard = self.session.lock();
        let session = guard.as_ref().ok_or(HsmError::WorkingKeyStale)?;
        match work(session, &state) {
            Err(e) if e.class() == FailureClass::SessionLost => Err(HsmError::WorkingKeyStale),
            other => other,
        }
    }

    fn handle_of(&self, key: &WorkingKey) -> Result<ObjectHandle> {
        if key.holder != self.id {
            return Err(HsmError::InvalidArgument(
                "working key belongs to another holder",
            ));
        }
        Ok(key.handle)
    }

    fn working(&self, handle: ObjectHandle, purpose: KeyPurpose) -> WorkingKey {
        WorkingKey {
            handle,
            holder: self.id,
            purpose,
        }
    }

    /// The start-up probe of design note §1.5.5 for the root of `epoch`:
    /// `CKM_AES_KEY_WRAP` advertises wrap and unwrap; a throw-away version
    /// wraps under the root and not under a fresh ordinary user key; its
    /// blob unwraps into a working key that reads back as the template, and
    /// does not unwrap as non-sensitive, with `WRAP_WITH_TRUSTED=false` (T)
    /// or as extractable (N), or as a token object; `C_Decrypt`/`C_Encrypt`
    /// with the root fail. With `expected = None` the variant is detected.
    /// Leaves no object behind.
    ///
    /// # Errors
    /// `RootCheckFailed { epoch, check }` naming the failed check;
    /// `ObjectNotFound`/`ObjectAmbiguous` if `kms-root/<epoch>` is missing
    /// or duplicated; `WorkingKeyStale`; `Unavailable`.
    pub fn verify_root(&self, epoch: u32, expected: Option<RootVariant>) -> Result<RootVariant> {
        self.with(|session, state| {
            root::verify_root(session, state.context()?, self.slot, epoch, expected)
        })
    }

    /// Generates a new key version of `purpose` inside the HSM as a session
    /// object, wraps it under the root of `epoch` with `CKM_AES_KEY_WRAP`
    /// and returns the `WRAPPED_KEY_LEN`-byte blob (for the catalogue) and
    /// the live working key (design note §1.5.1, §1.5.3 "Create"). A crash
    /// before the caller stores the blob leaves nothing behind.
    ///
    /// # Errors
    /// `ObjectNotFound` for a missing root; `TemplateViolation` if the
    /// generated key does not read back as the version table (destroyed);
    /// `Pkcs11` with `C_WrapKey`'s code if the root refuses (e.g.
    /// `CKR_KEY_NOT_WRAPPABLE` for an untrusted root in variant T);
    /// `WorkingKeyStale`; `Unavailable`.
    pub fn generate_version(
        &self,
        epoch: u32,
        purpose: KeyPurpose,
        variant: RootVariant,
    ) -> Result<(WrappedKey, WorkingKey)> {
        self.with(|session, _| {
            let root = root::find_root(session, epoch)?;
            let (wrapped, handle) =
                wrapped::generate_version(session, root, epoch, purpose, variant)?;
            Ok((wrapped, self.working(handle, purpose)))
        })
    }

    /// Unwraps `wrapped` under its root into a working key of `purpose`
    /// with the version table's unwrap template (`CKA_MODIFIABLE=false`
    /// last, no `CKA_VALUE_LEN`), reads every attribute back and refuses
    /// and destroys the object on any mismatch (design note §1.5.1).
    ///
    /// # Errors
    /// `CorruptWrappedKey` for a tampered, truncated or foreign blob (never
    /// `Unavailable`); `TemplateViolation` on a read-back mismatch;
    /// `ObjectNotFound` for a missing root; `WorkingKeyStale`; `Unavailable`.
    pub fn unwrap(
        &self,
        wrapped: &WrappedKey,
        purpose: KeyPurpose,
        variant: RootVariant,
    ) -> Result<WorkingKey> {
        self.with(|session, _| {
            let root = root::find_root(session, wrapped.root_epoch)?;
            let handle = wrapped::unwrap_version(session, root, wrapped, purpose, variant)?;
            Ok(self.working(handle, purpose))
        })
    }

    /// Wraps the working key `key` under the root of `epoch` (root
    /// rotation: design note §1.5.3). Only variant T keys can be re-wrapped.
    ///
    /// # Errors
    /// `Pkcs11` with `C_WrapKey`'s code if the token refuses (variant N:
    /// `CKR_KEY_UNEXTRACTABLE`; an untrusted target root:
    /// `CKR_KEY_NOT_WRAPPABLE`); `ObjectNotFound` for a missing root;
    /// `InvalidArgument` for a key of another holder; `WorkingKeyStale`.
    pub fn rewrap(&self, key: &WorkingKey, epoch: u32) -> Result<WrappedKey> {
        let handle = self.handle_of(key)?;
        self.with(|session, _| {
            let root = root::find_root(session, epoch)?;
            wrapped::wrap(session, root, epoch, handle)
        })
    }

    /// AES-256-GCM encryption under a working key, with a fresh random
    /// 96-bit IV chosen here and a 128-bit tag (as `Hsm::encrypt`).
    ///
    /// # Errors
    /// As `Hsm::encrypt`, plus `InvalidArgument` for a key of another
    /// holder and `WorkingKeyStale`.
    pub fn encrypt(&self, key: &WorkingKey, aad: &[u8], plaintext: &[u8]) -> Result<GcmSealed> {
        let handle = self.handle_of(key)?;
        self.with(|session, _| gcm_seal(session, handle, &self.rng, aad, plaintext))
    }

    /// AES-256-GCM decryption under a working key (as `Hsm::decrypt`).
    ///
    /// # Errors
    /// As `Hsm::decrypt`, plus `InvalidArgument` for a key of another
    /// holder and `WorkingKeyStale`.
    pub fn decrypt(
        &self,
        key: &WorkingKey,
        iv: &[u8],
        aad: &[u8],
        ciphertext_and_tag: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        let handle = self.handle_of(key)?;
        check_gcm_open_input(iv, aad, ciphertext_and_tag)?;
        self.with(|session, _| gcm_open(session, handle, iv, aad, ciphertext_and_tag))
    }

    /// HMAC-SHA256 (`CKM_SHA256_HMAC`, 32 bytes) of arbitrary `data` under
    /// a working HMAC key, computed inside the HSM: e.g. the catalogue MAC
    /// over `WrappedKey::mac_input` (design note §1.5.2).
    ///
    /// # Errors
    /// `Pkcs11` (`CKR_KEY_FUNCTION_NOT_PERMITTED`/`CKR_KEY_TYPE_INCONSISTENT`)
    /// for an AES key; `InvalidArgument` for a key of another holder;
    /// `WorkingKeyStale`; `Unavailable`.
    pub fn hmac_sign(&self, key: &WorkingKey, data: &[u8]) -> Result<[u8; 32]> {
        let handle = self.handle_of(key)?;
        self.with(|session, _| hmac_sign_with(session, handle, data))
    }

    /// Verifies an HMAC-SHA256 of `data` inside the HSM. A wrong or wrongly
    /// sized `mac` is `Ok(false)`.
    ///
    /// # Errors
    /// As `hmac_sign`.
    pub fn hmac_verify(&self, key: &WorkingKey, data: &[u8], mac: &[u8]) -> Result<bool> {
        let handle = self.handle_of(key)?;
        self.with(|session, _| hmac_verify_with(session, handle, data, mac))
    }

    /// Destroys a working key (cache eviction, disabled version).
    ///
    /// # Errors
    /// `InvalidArgument` for a key of another holder; `WorkingKeyStale` if
    /// it is already gone with its session; the PKCS#11 error otherwise.
    pub fn destroy(&self, key: WorkingKey) -> Result<()> {
        let handle = self.handle_of(&key)?;
        self.with(|session, _| {
            session
                .destroy_object(handle)
                .map_err(|e| crate::error::from_cryptoki(Operation::DestroyObject, e))
        })
    }

    /// How many session objects this process holds on the token (any
    /// session), for leak checks and tests. Searches the token: not for the
    /// hot path.
    ///
    /// # Errors
    /// `WorkingKeyStale`; the PKCS#11 error of the search.
    pub fn session_object_count(&self) -> Result<usize> {
        self.with(|session, _| {
            session
                .find_objects(&[cryptoki::object::Attribute::Token(false)])
                .map(|found| found.len())
                .map_err(|e| crate::error::from_cryptoki(Operation::FindObjects, e))
        })
    }

    /// The epochs of every root (`kms-root/<epoch>` secret key) this
    /// session can see, ascending: for `kms hsm roots` and start-up.
    /// Searches the token: not for the hot path.
    ///
    /// # Errors
    /// `WorkingKeyStale`; the PKCS#11 error of the search or attribute read.
    pub fn root_epochs(&self) -> Result<Vec<u32>> {
        self.with(|session, _| root::root_epochs(session))
    }

    /// Whether the root `kms-root/<epoch>` exists (one `C_FindObjects` by
    /// `CKA_ID`, cheap enough for a periodic check for a new root).
    ///
    /// # Errors
    /// `ObjectAmbiguous` if the id is duplicated; `WorkingKeyStale`; the
    /// PKCS#11 error of the search.
    pub fn has_root(&self, epoch: u32) -> Result<bool> {
        self.with(|session, _| match root::find_root(session, epoch) {
            Ok(_) => Ok(true),
            Err(HsmError::ObjectNotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        })
    }

    /// Destroys the root `kms-root/<epoch>` (root rotation's last step,
    /// design note §1.6): every blob still wrapped under it becomes
    /// unusable for good, in this catalogue and in every backup of it. The
    /// caller must have made sure that no record references it. Works where
    /// the user may destroy the (security officer's) root, as on SoftHSM2
    /// (`CKA_DESTROYABLE=true`, a public or user-visible token object);
    /// elsewhere the token refuses and the root must be destroyed with the
    /// vendor's tool.
    ///
    /// # Errors
    /// `ObjectNotFound`/`ObjectAmbiguous` for a missing or duplicated root;
    /// `WorkingKeyStale`; the PKCS#11 error of `C_DestroyObject` (e.g.
    /// `CKR_ACTION_PROHIBITED`, `CKR_SESSION_READ_ONLY`).
    pub fn destroy_root(&self, epoch: u32) -> Result<()> {
        self.with(|session, _| {
            let handle = root::find_root(session, epoch)?;
            session
                .destroy_object(handle)
                .map_err(|e| crate::error::from_cryptoki(Operation::DestroyObject, e))
        })
    }

    /// The root of `epoch` as the token reports it: its boolean attributes
    /// and its `CKA_WRAP_TEMPLATE` and `CKA_UNWRAP_TEMPLATE` (operators and
    /// tests; the probe does not rely on reading templates).
    ///
    /// # Errors
    /// `ObjectNotFound` for a missing root; `WorkingKeyStale`; the PKCS#11
    /// error of `C_GetAttributeValue`.
    pub fn root_info(&self, epoch: u32) -> Result<RootInfo> {
        self.with(|session, _| {
            let handle = root::find_root(session, epoch)?;
            root::root_info(self.module.path(), session, handle)
        })
    }
}

#[cfg(feature = "testing")]
impl KeyHolder {
    /// Runs `attack` on the holder's own logged-in session, with the raw
    /// handle of `key` if given: what any PIN holder of the token can do.
    /// For tests that play the attacker of design note §1.5.5/§1.7 only.
    ///
    /// # Errors
    /// `WorkingKeyStale`; `InvalidArgument` for a key of another holder.
    pub fn attack_session_for_tests<T>(
        &self,
        key: Option<&WorkingKey>,
        attack: impl FnOnce(&Session, Option<ObjectHandle>) -> T,
    ) -> Result<T> {
        let handle = key.map(|k| self.handle_of(k)).transpose()?;
        self.with(|session, _| Ok(attack(session, handle)))
    }
}

/// What the token reports about a root key (`KeyHolder::root_info`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootInfo {
    /// (attribute name, value) of the root's boolean attributes
    /// (`CKA_TOKEN`, `CKA_TRUSTED`, `CKA_WRAP`, …).
    pub flags: Vec<(&'static str, bool)>,
    /// `CKA_WRAP_TEMPLATE` as (attribute name, boolean value) pairs, or
    /// `None` if the root has none; non-boolean entries are named with
    /// value `true` if they match the design (`CKA_CLASS=CKO_SECRET_KEY`).
    pub wrap_template: Option<Vec<(&'static str, bool)>>,
    /// `CKA_UNWRAP_TEMPLATE` as (attribute name, boolean value) pairs, or
    /// `None` if the root has none.
    pub unwrap_template: Option<Vec<(&'static str, bool)>>,
    /// `CKA_ALLOWED_MECHANISMS` is exactly `[CKM_AES_KEY_WRAP]`.
    pub only_aes_key_wrap: bool,
    /// Whether the token handed out `CKA_VALUE`. Must always be false.
    pub value_readable: bool,
}

impl Drop for KeyHolder {
    fn drop(&mut self) {
        // Hold the module's read lock: closing must not race a re-initialization.
        let state = self.module.read();
        if let Some(session) = self.session.get_mut().take() {
            if state.generation() == self.generation {
                // Closing destroys every working key the holder holds.
                let _ = session.close();
            } else {
                // C_Finalize closed it already; its handle number may have
                // been reused by a live session that closing would kill.
                std::mem::forget(session);
            }
        }
    }
}

/// Whether `session` carries the user login (PKCS#11 v2.40 §5.6, session
/// states `CKS_RO_USER_FUNCTIONS` / `CKS_RW_USER_FUNCTIONS`); a session
/// whose state cannot be read counts as not logged in.
fn logged_in_as_user(session: &cryptoki::session::Session) -> bool {
    use cryptoki::session::SessionState;
    session.get_session_info().is_ok_and(|info| {
        matches!(
            info.session_state(),
            SessionState::RoUser | SessionState::RwUser
        )
    })
}

/// The private half of an RSA import key pair (bring your own key): a
/// sensitive, non-extractable session object on one `KeyHolder` that can
/// only unwrap with RSA-OAEP. Holds no key material. Lost with its holder
/// (restart, session or login loss); see `crate::import`.
#[derive(Debug)]
pub struct ImportKey {
    handle: ObjectHandle,
    holder: u64,
}

impl KeyHolder {
    /// Generates an RSA import key pair of `spec` inside the HSM as session
    /// objects on this holder and returns its private half and the public
    /// key as a DER `SubjectPublicKeyInfo` (the public object is not kept).
    ///
    /// # Errors
    /// `Pkcs11` with `C_GenerateKeyPair`'s code (e.g. an unsupported size);
    /// `TemplateViolation` if the private half does not read back as its
    /// table; `WorkingKeyStale`; `Unavailable`.
    pub fn generate_import_key(
        &self,
        spec: crate::import::ImportKeySpec,
    ) -> Result<(ImportKey, Vec<u8>)> {
        self.with(|session, _| {
            let (handle, spki) = crate::import::generate_pair(session, spec)?;
            Ok((
                ImportKey {
                    handle,
                    holder: self.id,
                },
                spki,
            ))
        })
    }

    /// Unwraps `encrypted` (the caller's 32-byte AES key under the import
    /// public key, RSA-OAEP with `hash`) with `key` into a sensitive session
    /// object, wraps that under the root of `epoch` and destroys it; returns
    /// the blob, to be stored as a new version (with its catalogue MAC).
    ///
    /// # Errors
    /// `ImportAlgorithmUnsupported` naming the algorithm the HSM refuses;
    /// `ImportMaterialInvalid`; `InvalidArgument` for a key of another
    /// holder; `WorkingKeyStale` if the holder (and so the key) is gone;
    /// `ObjectNotFound` for a missing root; `TemplateViolation`.
    pub fn import_version(
        &self,
        key: &ImportKey,
        hash: crate::import::OaepHash,
        encrypted: &[u8],
        epoch: u32,
        variant: RootVariant,
    ) -> Result<WrappedKey> {
        if key.holder != self.id {
            return Err(HsmError::InvalidArgument(
                "import key belongs to another holder",
            ));
        }
        self.with(|session, _| {
            let root = root::find_root(session, epoch)?;
            crate::import::import_version(
                session, key.handle, hash, encrypted, root, epoch, variant,
            )
            .map_err(stale_key)
        })
    }

    /// Tests only: the OAEP unwrap of `import_version` without the wrap
    /// under the root, leaving the imported object as a working key for
    /// the caller to inspect (attribute read-back, wrap attacks).
    ///
    /// # Errors
    /// As `import_version`.
    #[cfg(feature = "testing")]
    pub fn unwrap_imported_for_tests(
        &self,
        key: &ImportKey,
        hash: crate::import::OaepHash,
        encrypted: &[u8],
        variant: RootVariant,
    ) -> Result<WorkingKey> {
        if key.holder != self.id {
            return Err(HsmError::InvalidArgument(
                "import key belongs to another holder",
            ));
        }
        self.with(|session, _| {
            let handle =
                crate::import::unwrap_imported(session, key.handle, hash, encrypted, variant)?;
            Ok(self.working(handle, KeyPurpose::Kek))
        })
    }

    /// Destroys an import key pair's private half (used, superseded or
    /// expired).
    ///
    /// # Errors
    /// As `destroy`.
    pub fn destroy_import_key(&self, key: ImportKey) -> Result<()> {
        if key.holder != self.id {
            return Err(HsmError::InvalidArgument(
                "import key belongs to another holder",
            ));
        }
        self.with(|session, _| {
            session
                .destroy_object(key.handle)
                .map_err(|e| crate::error::from_cryptoki(Operation::DestroyObject, e))
        })
    }
}
