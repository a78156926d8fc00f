//! `Hsm`: the blocking facade the rest of kms uses. It owns one token's
//! session pool, object-handle cache (`handle_cache`) and recovery state
//! (`recovery`), and runs every PKCS#11 call under the recovery policy.
//!
//! Nothing secret is logged here: errors carry operations, return codes and
//! object ids only. There is never a fallback to software keys.

mod handle_cache;
mod holder;
mod recovery;

pub use holder::{ImportKey, KeyHolder, RootInfo, WorkingKey};

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, AttributeType, ObjectHandle};
use cryptoki::session::Session;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use self::handle_cache::HandleCache;
use self::recovery::Recovery;
use crate::config::HsmConfig;
use crate::error::{HsmError, Operation, Result, from_cryptoki};
use crate::module::Module;
use crate::objects::{self, KeyPurpose, ObjectId};
use crate::session_pool::SessionPool;
use crate::token;

/// Length of the GCM IV the layer generates, in bytes: 96 bits, the only size accepted.
pub const GCM_IV_LEN: usize = 12;
/// Length of the GCM tag, in bytes: 128 bits, the only size produced or accepted.
pub const GCM_TAG_LEN: usize = 16;
/// Largest single plaintext, ciphertext (without tag) or AAD the layer passes
/// to the HSM, in bytes (1 MiB). The service caps requests far lower; this
/// guards the layer itself.
pub const MAX_GCM_INPUT: usize = 1 << 20;
/// Largest `Hsm::random` request, in bytes.
pub const MAX_RANDOM_LEN: usize = 1024;

/// The output of AES-GCM encryption: the IV the layer chose and the
/// ciphertext with the 16-byte tag appended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcmSealed {
    /// The 96-bit IV, chosen by the layer from the host's generator.
    pub iv: [u8; GCM_IV_LEN],
    /// Ciphertext (as long as the plaintext) followed by the `GCM_TAG_LEN`-byte tag.
    pub ciphertext_and_tag: Vec<u8>,
}

/// Session pool occupancy, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolUsage {
    /// Configured number of work sessions.
    pub size: usize,
    /// Work sessions open now (idle or checked out).
    pub open: usize,
    /// Work sessions open and idle now.
    pub idle: usize,
}

/// Counters of the expensive PKCS#11 calls, which must not happen on the hot path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HsmCounters {
    /// C_FindObjects searches performed (cache misses, reconciliation, generation).
    pub object_searches: u64,
    /// Sessions opened (pool growth, reconnects, fresh-session confirmations).
    pub sessions_opened: u64,
}

/// Attributes of a key object as the token reports them (for operators and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyObjectInfo {
    /// (attribute name, value) for every security-relevant boolean attribute
    /// (`CKA_TOKEN`, `CKA_SENSITIVE`, …, `CKA_LOCAL`) the token reported.
    pub flags: Vec<(&'static str, bool)>,
    /// Whether the object carries every attribute of the key table (class,
    /// key type, length, id, label and every flag), exactly as
    /// `Hsm::generate_key` checks it after generation.
    pub conforms: bool,
    /// Whether the token handed out CKA_VALUE. Must always be false.
    pub value_readable: bool,
}

/// Calls and total time of one kind of HSM operation since the `Hsm` opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OperationStats {
    /// The operation.
    pub operation: Operation,
    /// Calls made, successful or not.
    pub calls: u64,
    /// Their total wall-clock time, in microseconds (including pool waits and recovery retries).
    pub total_micros: u64,
}

/// Room for every `Operation` variant.
const OPERATION_SLOTS: usize = 32;

/// One token of one PKCS#11 module, ready for cryptographic work.
///
/// Every method blocks on the token; call it from blocking threads. Methods
/// that touch the token return `HsmError::Unavailable` while the token is
/// unreachable (and fail fast during the reconnect backoff), and
/// `HsmError::PoolExhausted` if no session frees up within the configured
/// wait; those two are what `HsmError::is_unavailable` reports.
#[derive(Debug)]
pub struct Hsm {
    module: Arc<Module>,
    label: String,
    pool: SessionPool,
    /// Object handles by CKA_ID, valid only for the module generation they
    /// were found in.
    handles: HandleCache,
    rng: SystemRandom,
    recovery: Recovery,
    sync_token_dir: Option<std::path::PathBuf>,
    object_searches: AtomicU64,
    /// Per operation (indexed by `Operation as usize`): calls and total microseconds.
    timings: [(AtomicU64, AtomicU64); OPERATION_SLOTS],
}

impl Hsm {
    /// Loads the module (once per process), finds the token by label, logs in
    /// and checks that the token offers every mechanism the service needs.
    ///
    /// # Errors
    /// `Config` for an invalid configuration, `PinUnavailable` if the PIN
    /// cannot be read, `ModuleLoad`, `TokenNotFound`/`TokenLabelAmbiguous`,
    /// `PinRejected`, `MechanismMissing`, or the PKCS#11 error of the call
    /// that failed.
    pub fn open(config: HsmConfig) -> Result<Hsm> {
        config.validate()?;
        let pin = config.pin.read()?;
        let module = crate::module::module(&config.module_path)?;
        let pool = SessionPool::new(
            Arc::clone(&module),
            config.token_label.clone(),
            pin,
            config.pool_size,
            config.session_wait,
        );
        {
            let state = module.read();
            let slot = pool.slot(&state)?;
            token::probe_mechanisms(state.context()?, slot, &config.token_label)?;
        }
        Ok(Hsm {
            module,
            label: config.token_label,
            pool,
            handles: HandleCache::default(),
            rng: SystemRandom::new(),
            recovery: Recovery::new(config.reconnect_backoff_min, config.reconnect_backoff_max),
            sync_token_dir: config.sync_token_dir,
            object_searches: AtomicU64::new(0),
            timings: std::array::from_fn(|_| (AtomicU64::new(0), AtomicU64::new(0))),
        })
    }

    /// The label of the token this `Hsm` uses.
    pub fn token_label(&self) -> &str {
        &self.label
    }

    /// Session pool occupancy now.
    pub fn pool_usage(&self) -> PoolUsage {
        let (open, idle) = self.pool.usage();
        PoolUsage {
            size: self.pool.size(),
            open,
            idle,
        }
    }

    /// Generates a key of `purpose` inside the HSM under `id`, reads back and
    /// checks every attribute of the key table, syncs the token directory if
    /// configured, and returns only once a fresh session can find it.
    ///
    /// # Errors
    /// `ObjectExists` if `id` is taken; `TemplateViolation` if the token did
    /// not honour the template (the object is destroyed again); `Unavailable`
    /// if the token or its storage is gone; `ObjectNotFound` if a fresh
    /// session cannot see the new key.
    pub fn generate_key(&self, purpose: KeyPurpose, id: &ObjectId) -> Result<()> {
        let template = objects::template(purpose, id);
        let mechanism = match purpose {
            KeyPurpose::Kek => Mechanism::AesKeyGen,
            KeyPurpose::Hmac => Mechanism::GenericSecretKeyGen,
        };
        self.run(Operation::GenerateKey, |session, _| {
            if !self.find(session, id)?.is_empty() {
                return Err(HsmError::ObjectExists { id: id.to_string() });
            }
            let handle = session
                .generate_key(&mechanism, &template)
                .map_err(|e| from_cryptoki(Operation::GenerateKey, e))?;
            let check = read_key_attributes(session, handle, purpose, id)
                .and_then(|read_back| objects::verify(purpose, id, &read_back));
            if let Err(violation) = check {
                // Never leave a key that breaks the template on the token.
                let _ = session.destroy_object(handle);
                return Err(violation);
            }
            Ok(())
        })?;
        self.sync_or_fail(Operation::GenerateKey)?;
        self.confirm_from_fresh_session(id, true)?;
        Ok(())
    }

    /// Whether a key object with `id` exists (searches the token: start-up
    /// reconciliation, not the hot path).
    ///
    /// # Errors
    /// `Unavailable` if the token is gone, or the PKCS#11 error of the search.
    pub fn key_exists(&self, id: &ObjectId) -> Result<bool> {
        let found = self.run(Operation::FindObjects, |session, _| {
            Ok(!self.find(session, id)?.is_empty())
        })?;
        // "Not found" while the token's storage is gone says nothing about
        // the key: SoftHSM2 answers from a token it has dropped, and keeps
        // doing so after the storage returns unless the module is
        // re-initialized. Fail closed instead, which starts the recovery.
        if !found && self.token_storage_missing() {
            let operation = Operation::FindObjects;
            return Err(self.fail(
                operation,
                recovery::unavailable(operation),
                self.module.generation(),
            ));
        }
        Ok(found)
    }

    /// Destroys the key object `id`, syncs the token directory if configured,
    /// and confirms from a fresh session that it is gone.
    ///
    /// # Errors
    /// `ObjectNotFound` if there is no such object (callers can treat that as
    /// done); `ObjectExists` if a fresh session still sees it; `Unavailable`
    /// if the token or its storage is gone.
    pub fn destroy_key(&self, id: &ObjectId) -> Result<()> {
        self.run(Operation::DestroyObject, |session, _| {
            let handles = self.find(session, id)?;
            if handles.is_empty() {
                return Err(HsmError::ObjectNotFound { id: id.to_string() });
            }
            for handle in handles {
                session
                    .destroy_object(handle)
                    .map_err(|e| from_cryptoki(Operation::DestroyObject, e))?;
            }
            Ok(())
        })?;
        self.handles.remove(id);
        self.sync_or_fail(Operation::DestroyObject)?;
        self.confirm_from_fresh_session(id, false)
    }

    /// Reads the attributes of the key table for `id` and whether its value
    /// can be read.
    ///
    /// # Errors
    /// `ObjectNotFound`/`ObjectAmbiguous` for a missing or duplicated id,
    /// `Unavailable` if the token is gone.
    pub fn key_object_info(&self, id: &ObjectId, purpose: KeyPurpose) -> Result<KeyObjectInfo> {
        self.run(Operation::GetAttributes, |session, state| {
            let handle = self.handle(session, state, id)?;
            let read_back = read_key_attributes(session, handle, purpose, id)?;
            let flags = objects::reported_flags(purpose, id, &read_back);
            let conforms = objects::verify(purpose, id, &read_back).is_ok();
            // A sensitive value must not come back: cryptoki drops attributes
            // the token refuses (CKR_ATTRIBUTE_SENSITIVE), so presence = leak.
            let value_readable = match session.get_attributes(handle, &[AttributeType::Value]) {
                Ok(values) => values
                    .iter()
                    .any(|a| matches!(a, Attribute::Value(v) if !v.is_empty())),
                Err(_) => false,
            };
            Ok(KeyObjectInfo {
                flags,
                conforms,
                value_readable,
            })
        })
    }

    /// AES-256-GCM encryption under the KEK `kek` with a fresh random 96-bit
    /// IV chosen here (never by a caller) and a 128-bit tag.
    ///
    /// # Errors
    /// `InvalidArgument` if `plaintext` or `aad` exceeds `MAX_GCM_INPUT`;
    /// `RngFailed` if the host's generator fails; `ObjectNotFound` for an
    /// unknown KEK; `Unavailable` if the token is gone.
    pub fn encrypt(&self, kek: &ObjectId, aad: &[u8], plaintext: &[u8]) -> Result<GcmSealed> {
        if plaintext.len() > MAX_GCM_INPUT || aad.len() > MAX_GCM_INPUT {
            return Err(HsmError::InvalidArgument("plaintext or AAD too large"));
        }
        self.run(Operation::Encrypt, |session, state| {
            let handle = self.handle(session, state, kek)?;
            gcm_seal(session, handle, &self.rng, aad, plaintext)
        })
    }

    /// AES-256-GCM decryption of `ciphertext_and_tag` (tag last) with the
    /// 12-byte `iv`.
    ///
    /// # Errors
    /// `InvalidCiphertext`, with no detail, for any authentication failure
    /// (wrong key, AAD, IV, tag, truncation) and for lengths the layer never
    /// produces; `ObjectNotFound` for an unknown KEK; `Unavailable` if the
    /// token is gone.
    pub fn decrypt(
        &self,
        kek: &ObjectId,
        iv: &[u8],
        aad: &[u8],
        ciphertext_and_tag: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        check_gcm_open_input(iv, aad, ciphertext_and_tag)?;
        self.run(Operation::Decrypt, |session, state| {
            let handle = self.handle(session, state, kek)?;
            gcm_open(session, handle, iv, aad, ciphertext_and_tag)
        })
    }

    /// HMAC-SHA256 (32 bytes) of `data` under the HSM-resident key `key`.
    ///
    /// # Errors
    /// `ObjectNotFound` for an unknown key; the PKCS#11 error if the key is
    /// not an HMAC key; `Unavailable` if the token is gone.
    pub fn hmac_sign(&self, key: &ObjectId, data: &[u8]) -> Result<[u8; 32]> {
        self.run(Operation::Sign, |session, state| {
            let handle = self.handle(session, state, key)?;
            hmac_sign_with(session, handle, data)
        })
    }

    /// Verifies an HMAC-SHA256 inside the HSM (constant-time there). A wrong
    /// or wrongly sized `mac` is `Ok(false)`, not an error.
    ///
    /// # Errors
    /// As `hmac_sign`.
    pub fn hmac_verify(&self, key: &ObjectId, data: &[u8], mac: &[u8]) -> Result<bool> {
        // Checked here, not left to the token: openCryptoki 3.8's software
        // token verifies CKM_SHA256_HMAC against a truncated MAC (a 16-byte
        // prefix of the right MAC verifies), where SoftHSM2 answers
        // CKR_SIGNATURE_LEN_RANGE. Only the full 32 bytes may verify.
        if mac.len() != 32 {
            return Ok(false);
        }
        self.run(Operation::Verify, |session, state| {
            let handle = self.handle(session, state, key)?;
            hmac_verify_with(session, handle, data, mac)
        })
    }

    /// `len` random bytes (1 to `MAX_RANDOM_LEN`) from the HSM's generator.
    ///
    /// # Errors
    /// `InvalidArgument` for a length out of range; `RngFailed` if the
    /// token's generator fails; `Unavailable` if the token is gone.
    pub fn random(&self, len: usize) -> Result<Zeroizing<Vec<u8>>> {
        if len == 0 || len > MAX_RANDOM_LEN {
            return Err(HsmError::InvalidArgument(
                "random length must be 1 to 1024 bytes",
            ));
        }
        self.generate_random(len)
    }

    /// `len` random bytes (1 to `MAX_GCM_INPUT`, 1 MiB) from ONE call into
    /// the token, for callers that cut many values out of it: a batch of data
    /// keys costs one HSM round trip for its randomness instead of one per key.
    ///
    /// # Errors
    /// As `random`.
    pub fn random_pool(&self, len: usize) -> Result<Zeroizing<Vec<u8>>> {
        if len == 0 || len > MAX_GCM_INPUT {
            return Err(HsmError::InvalidArgument(
                "random pool must be 1 byte to 1 MiB",
            ));
        }
        self.generate_random(len)
    }

    /// One C_GenerateRandom of `len` bytes (bounds checked by the callers).
    fn generate_random(&self, len: usize) -> Result<Zeroizing<Vec<u8>>> {
        self.run(Operation::GenerateRandom, |session, _| {
            let mut bytes = Zeroizing::new(vec![0u8; len]);
            session
                .generate_random_slice(&mut bytes)
                .map_err(|e| from_cryptoki(Operation::GenerateRandom, e))?;
            Ok(bytes)
        })
    }

    /// A cheap round trip to the token (one random byte), for health checks.
    ///
    /// # Errors
    /// As `random`.
    pub fn ping(&self) -> Result<()> {
        self.random(1).map(drop)
    }

    /// Expensive-call counters since the `Hsm` opened.
    pub fn counters(&self) -> HsmCounters {
        HsmCounters {
            object_searches: self.object_searches.load(Ordering::Relaxed),
            sessions_opened: self.pool.sessions_opened(),
        }
    }

    /// Latency totals of the operations performed so far (for metrics): one
    /// entry per reported operation, zero if it never ran.
    pub fn operation_stats(&self) -> Vec<OperationStats> {
        const REPORTED: [Operation; 9] = [
            Operation::Encrypt,
            Operation::Decrypt,
            Operation::Sign,
            Operation::Verify,
            Operation::GenerateRandom,
            Operation::GenerateKey,
            Operation::DestroyObject,
            Operation::FindObjects,
            Operation::GetAttributes,
        ];
        REPORTED
            .iter()
            .map(|&operation| {
                let (calls, micros) = &self.timings[operation as usize % OPERATION_SLOTS];
                OperationStats {
                    operation,
                    calls: calls.load(Ordering::Relaxed),
                    total_micros: micros.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// Whether the layer currently considers the HSM unreachable (and fails
    /// closed until a reconnect succeeds).
    pub fn is_down(&self) -> bool {
        self.recovery.is_down()
    }

    fn record_timing(&self, operation: Operation, elapsed: Duration) {
        let (calls, micros) = &self.timings[operation as usize % OPERATION_SLOTS];
        calls.fetch_add(1, Ordering::Relaxed);
        micros.fetch_add(
            u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Confirms from a brand-new session (not the one that made the change)
    /// that the object is (or is no longer) there, so that we acknowledge only
    /// what the token has really recorded.
    fn confirm_from_fresh_session(&self, id: &ObjectId, expect_present: bool) -> Result<()> {
        let state = self.module.read();
        let slot = self.pool.slot(&state)?;
        let session = self.pool.open_extra_session(&state, slot)?;
        let present = !self.find(&session, id)?.is_empty();
        drop(session);
        if present == expect_present {
            Ok(())
        } else if expect_present {
            Err(HsmError::ObjectNotFound { id: id.to_string() })
        } else {
            Err(HsmError::ObjectExists { id: id.to_string() })
        }
    }
}

#[cfg(feature = "testing")]
impl Hsm {
    /// Imports a known AES-256 key as a sensitive, non-extractable token
    /// object. For test vectors only: an imported key is not LOCAL, so the
    /// service itself would never accept it as a KEK.
    ///
    /// # Errors
    /// `Unavailable` if the token is gone, or the PKCS#11 error of C_CreateObject.
    pub fn import_aes_key_for_tests(&self, id: &ObjectId, value: &[u8]) -> Result<()> {
        use cryptoki::object::{KeyType, ObjectClass};
        self.run(Operation::GenerateKey, |session, _| {
            session
                .create_object(&[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Encrypt(true),
                    Attribute::Decrypt(true),
                    Attribute::Id(id.as_bytes().to_vec()),
                    Attribute::Value(value.to_vec()),
                ])
                .map(drop)
                .map_err(|e| from_cryptoki(Operation::GenerateKey, e))
        })
    }
}

/// Reads every attribute of the key table (never CKA_VALUE).
fn read_key_attributes(
    session: &Session,
    handle: ObjectHandle,
    purpose: KeyPurpose,
    id: &ObjectId,
) -> Result<Vec<Attribute>> {
    session
        .get_attributes(handle, &objects::read_back_types(purpose, id))
        .map_err(|e| from_cryptoki(Operation::GetAttributes, e))
}

/// AES-256-GCM under `handle` with a fresh IV from `rng` (checks the input
/// sizes); shared by `Hsm::encrypt` and `KeyHolder::encrypt`.
fn gcm_seal(
    session: &Session,
    handle: ObjectHandle,
    rng: &SystemRandom,
    aad: &[u8],
    plaintext: &[u8],
) -> Result<GcmSealed> {
    if plaintext.len() > MAX_GCM_INPUT || aad.len() > MAX_GCM_INPUT {
        return Err(HsmError::InvalidArgument("plaintext or AAD too large"));
    }
    let mut iv = [0u8; GCM_IV_LEN];
    rng.fill(&mut iv)
        .map_err(|_| HsmError::host_rng(Operation::Encrypt))?;
    let mut iv_param = iv;
    let params = GcmParams::new(&mut iv_param, aad, (GCM_TAG_LEN as u64 * 8).into())
        .map_err(|e| from_cryptoki(Operation::Encrypt, e))?;
    let ciphertext_and_tag = session
        .encrypt(&Mechanism::AesGcm(params), handle, plaintext)
        .map_err(|e| from_cryptoki(Operation::Encrypt, e))?;
    if ciphertext_and_tag.len() != plaintext.len() + GCM_TAG_LEN {
        return Err(HsmError::Wrapper {
            operation: Operation::Encrypt,
            reason: "token returned an unexpected GCM output length".into(),
        });
    }
    Ok(GcmSealed {
        iv,
        ciphertext_and_tag,
    })
}

/// The sizes `gcm_open` accepts: exactly what `gcm_seal` produces.
fn check_gcm_open_input(iv: &[u8], aad: &[u8], ciphertext_and_tag: &[u8]) -> Result<()> {
    // SoftHSM2 accepts short IVs and tags; we accept exactly what we produce.
    if iv.len() != GCM_IV_LEN
        || ciphertext_and_tag.len() < GCM_TAG_LEN
        || ciphertext_and_tag.len() > MAX_GCM_INPUT + GCM_TAG_LEN
        || aad.len() > MAX_GCM_INPUT
    {
        return Err(HsmError::InvalidCiphertext);
    }
    Ok(())
}

/// AES-256-GCM decryption under `handle` (sizes checked by the caller with
/// `check_gcm_open_input`).
fn gcm_open(
    session: &Session,
    handle: ObjectHandle,
    iv: &[u8],
    aad: &[u8],
    ciphertext_and_tag: &[u8],
) -> Result<Zeroizing<Vec<u8>>> {
    let mut iv_param = [0u8; GCM_IV_LEN];
    iv_param.copy_from_slice(iv);
    let params = GcmParams::new(&mut iv_param, aad, (GCM_TAG_LEN as u64 * 8).into())
        .map_err(|e| from_cryptoki(Operation::Decrypt, e))?;
    match session.decrypt(&Mechanism::AesGcm(params), handle, ciphertext_and_tag) {
        Ok(plaintext) => Ok(Zeroizing::new(plaintext)),
        Err(e) => Err(decrypt_error(e)),
    }
}

/// HMAC-SHA256 (`CKM_SHA256_HMAC`, 32 bytes) of `data` under `handle`.
fn hmac_sign_with(session: &Session, handle: ObjectHandle, data: &[u8]) -> Result<[u8; 32]> {
    let mac = session
        .sign(&Mechanism::Sha256Hmac, handle, data)
        .map_err(|e| from_cryptoki(Operation::Sign, e))?;
    mac.try_into().map_err(|_| HsmError::Wrapper {
        operation: Operation::Sign,
        reason: "HMAC-SHA256 output is not 32 bytes".into(),
    })
}

/// Verifies an HMAC-SHA256 under `handle` inside the HSM; a wrong MAC is `Ok(false)`.
fn hmac_verify_with(
    session: &Session,
    handle: ObjectHandle,
    data: &[u8],
    mac: &[u8],
) -> Result<bool> {
    match session.verify(&Mechanism::Sha256Hmac, handle, data, mac) {
        Ok(()) => Ok(true),
        Err(cryptoki::error::Error::Pkcs11(
            cryptoki::error::RvError::SignatureInvalid
            | cryptoki::error::RvError::SignatureLenRange,
            _,
        )) => Ok(false),
        Err(e) => Err(from_cryptoki(Operation::Verify, e)),
    }
}

/// Maps a failed C_Decrypt: authentication and length failures (SoftHSM2
/// reports a bad tag as CKR_GENERAL_ERROR) are "invalid ciphertext"; session
/// and device losses keep their class so recovery still happens.
fn decrypt_error(error: cryptoki::error::Error) -> HsmError {
    use cryptoki::error::{Error, RvError};
    match error {
        Error::Pkcs11(
            RvError::GeneralError
            | RvError::EncryptedDataInvalid
            | RvError::EncryptedDataLenRange
            | RvError::DataInvalid
            | RvError::DataLenRange
            | RvError::MechanismParamInvalid,
            _,
        ) => HsmError::InvalidCiphertext,
        other => from_cryptoki(Operation::Decrypt, other),
    }
}
