//! `Hsm`: the blocking facade the rest of kms uses. It owns one token's
//! session pool and object-handle cache and wraps every PKCS#11 call in the
//! recovery policy:
//!
//! - session or login lost → reconnect (new sessions, log in) and retry once;
//! - device or token lost → fail closed with `Unavailable`, then try to
//!   reconnect (and, failing that, re-initialize the module) with exponential
//!   backoff on later calls, recovering without a restart when the token returns;
//! - never any fallback to software keys.
//!
//! Nothing secret is logged here: errors carry operations, return codes and
//! object ids only.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, AttributeType, ObjectHandle};
use cryptoki::session::Session;
use parking_lot::{Mutex, RwLock};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::config::HsmConfig;
use crate::error::{FailureClass, HsmError, Operation, Result, from_cryptoki};
use crate::module::{Module, ModuleState};
use crate::objects::{self, KeyPurpose, ObjectId};
use crate::session_pool::SessionPool;
use crate::token;

/// Length of the GCM IV the layer generates: 96 bits, the only size accepted.
pub const GCM_IV_LEN: usize = 12;
/// Length of the GCM tag: 128 bits, the only size produced or accepted.
pub const GCM_TAG_LEN: usize = 16;
/// Largest single plaintext or ciphertext the layer passes to the HSM. The
/// service caps requests far lower; this guards the layer itself.
pub const MAX_GCM_INPUT: usize = 1 << 20;
/// Largest random request served in one call.
pub const MAX_RANDOM_LEN: usize = 1024;

/// The output of AES-GCM encryption: the IV the layer chose and the
/// ciphertext with the 16-byte tag appended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcmSealed {
    pub iv: [u8; GCM_IV_LEN],
    pub ciphertext_and_tag: Vec<u8>,
}

/// Session pool occupancy, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolUsage {
    pub size: usize,
    pub open: usize,
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
    /// (attribute name, value) for every security-relevant boolean attribute.
    pub flags: Vec<(&'static str, bool)>,
    /// Whether the token handed out CKA_VALUE. Must always be false.
    pub value_readable: bool,
}

#[derive(Debug, Default)]
struct HandleCache {
    generation: u64,
    handles: HashMap<ObjectId, ObjectHandle>,
}

#[derive(Debug)]
struct RecoveryState {
    /// Set while the HSM is considered unreachable.
    down: Option<DownState>,
}

#[derive(Debug)]
struct DownState {
    next_attempt: Instant,
    backoff: Duration,
    generation_seen: u64,
}

/// One token of one PKCS#11 module, ready for cryptographic work.
#[derive(Debug)]
pub struct Hsm {
    module: Arc<Module>,
    label: String,
    pool: SessionPool,
    /// Object handles by CKA_ID, valid only for the module generation they
    /// were found in (a re-initialization may renumber every handle).
    handles: RwLock<HandleCache>,
    rng: SystemRandom,
    recovery: Mutex<RecoveryState>,
    sync_token_dir: Option<std::path::PathBuf>,
    backoff_min: Duration,
    backoff_max: Duration,
    object_searches: AtomicU64,
    /// Per operation (indexed by `Operation as usize`): calls and total microseconds.
    timings: [(AtomicU64, AtomicU64); OPERATION_SLOTS],
}

/// Room for every `Operation` variant.
const OPERATION_SLOTS: usize = 32;

/// Calls and total time of one kind of HSM operation since the `Hsm` opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OperationStats {
    pub operation: Operation,
    pub calls: u64,
    pub total_micros: u64,
}

impl Hsm {
    /// Loads the module (once per process), finds the token by label, logs in
    /// and checks that the token offers every mechanism the service needs.
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
            handles: RwLock::new(HandleCache::default()),
            rng: SystemRandom::new(),
            recovery: Mutex::new(RecoveryState { down: None }),
            sync_token_dir: config.sync_token_dir,
            backoff_min: config.reconnect_backoff_min,
            backoff_max: config.reconnect_backoff_max,
            object_searches: AtomicU64::new(0),
            timings: std::array::from_fn(|_| (AtomicU64::new(0), AtomicU64::new(0))),
        })
    }

    pub fn token_label(&self) -> &str {
        &self.label
    }

    pub fn pool_usage(&self) -> PoolUsage {
        let (open, idle) = self.pool.usage();
        PoolUsage {
            size: self.pool.size(),
            open,
            idle,
        }
    }

    /// Generates a key of `purpose` inside the HSM under `id`, verifies its
    /// attributes, syncs the token directory if configured, and returns only
    /// once a fresh session can find it.
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
            let check = read_flags(session, handle, purpose)
                .and_then(|read_back| objects::verify_flags(purpose, id, &read_back));
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
    pub fn key_exists(&self, id: &ObjectId) -> Result<bool> {
        self.run(Operation::FindObjects, |session, _| {
            Ok(!self.find(session, id)?.is_empty())
        })
    }

    /// Destroys the key object `id`. Destroying an absent key is an error the
    /// caller can treat as done (`ObjectNotFound`).
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
        self.handles.write().handles.remove(id);
        self.sync_or_fail(Operation::DestroyObject)?;
        self.confirm_from_fresh_session(id, false)
    }

    /// Reads the security-relevant attributes of a key and whether its value
    /// can be read.
    pub fn key_object_info(&self, id: &ObjectId, purpose: KeyPurpose) -> Result<KeyObjectInfo> {
        self.run(Operation::GetAttributes, |session, state| {
            let handle = self.handle(session, state, id)?;
            let read_back = read_flags(session, handle, purpose)?;
            let flags = objects::required_flags(purpose)
                .into_iter()
                .filter_map(|(kind, name, _)| {
                    read_back
                        .iter()
                        .find(|a| a.attribute_type() == kind)
                        .and_then(|a| match a {
                            Attribute::Token(v)
                            | Attribute::Private(v)
                            | Attribute::Sensitive(v)
                            | Attribute::Extractable(v)
                            | Attribute::Modifiable(v)
                            | Attribute::Wrap(v)
                            | Attribute::Unwrap(v)
                            | Attribute::Derive(v)
                            | Attribute::AlwaysSensitive(v)
                            | Attribute::NeverExtractable(v)
                            | Attribute::Local(v)
                            | Attribute::Encrypt(v)
                            | Attribute::Decrypt(v)
                            | Attribute::Sign(v)
                            | Attribute::Verify(v) => Some((name, *v)),
                            _ => None,
                        })
                })
                .collect();
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
                value_readable,
            })
        })
    }

    /// AES-256-GCM encryption under the KEK `kek` with a fresh random 96-bit
    /// IV chosen here (never by a caller) and a 128-bit tag.
    pub fn encrypt(&self, kek: &ObjectId, aad: &[u8], plaintext: &[u8]) -> Result<GcmSealed> {
        if plaintext.len() > MAX_GCM_INPUT || aad.len() > MAX_GCM_INPUT {
            return Err(HsmError::InvalidArgument("plaintext or AAD too large"));
        }
        self.run(Operation::Encrypt, |session, state| {
            let handle = self.handle(session, state, kek)?;
            let mut iv = [0u8; GCM_IV_LEN];
            self.rng
                .fill(&mut iv)
                .map_err(|_| HsmError::InvalidArgument("system RNG failed"))?;
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
        })
    }

    /// AES-256-GCM decryption. Any authentication failure (wrong key, AAD,
    /// IV, tag, truncation) is `InvalidCiphertext`, with no detail.
    pub fn decrypt(
        &self,
        kek: &ObjectId,
        iv: &[u8],
        aad: &[u8],
        ciphertext_and_tag: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        // SoftHSM2 accepts short IVs and tags; we accept exactly what we produce.
        if iv.len() != GCM_IV_LEN
            || ciphertext_and_tag.len() < GCM_TAG_LEN
            || ciphertext_and_tag.len() > MAX_GCM_INPUT + GCM_TAG_LEN
            || aad.len() > MAX_GCM_INPUT
        {
            return Err(HsmError::InvalidCiphertext);
        }
        self.run(Operation::Decrypt, |session, state| {
            let handle = self.handle(session, state, kek)?;
            let mut iv_param = [0u8; GCM_IV_LEN];
            iv_param.copy_from_slice(iv);
            let params = GcmParams::new(&mut iv_param, aad, (GCM_TAG_LEN as u64 * 8).into())
                .map_err(|e| from_cryptoki(Operation::Decrypt, e))?;
            match session.decrypt(&Mechanism::AesGcm(params), handle, ciphertext_and_tag) {
                Ok(plaintext) => Ok(Zeroizing::new(plaintext)),
                Err(e) => Err(decrypt_error(e)),
            }
        })
    }

    /// HMAC-SHA256 of `data` under the HSM-resident key `key`.
    pub fn hmac_sign(&self, key: &ObjectId, data: &[u8]) -> Result<[u8; 32]> {
        self.run(Operation::Sign, |session, state| {
            let handle = self.handle(session, state, key)?;
            let mac = session
                .sign(&Mechanism::Sha256Hmac, handle, data)
                .map_err(|e| from_cryptoki(Operation::Sign, e))?;
            mac.try_into().map_err(|_| HsmError::Wrapper {
                operation: Operation::Sign,
                reason: "HMAC-SHA256 output is not 32 bytes".into(),
            })
        })
    }

    /// Verifies an HMAC-SHA256 inside the HSM (constant-time there).
    pub fn hmac_verify(&self, key: &ObjectId, data: &[u8], mac: &[u8]) -> Result<bool> {
        self.run(Operation::Verify, |session, state| {
            let handle = self.handle(session, state, key)?;
            match session.verify(&Mechanism::Sha256Hmac, handle, data, mac) {
                Ok(()) => Ok(true),
                Err(cryptoki::error::Error::Pkcs11(
                    cryptoki::error::RvError::SignatureInvalid
                    | cryptoki::error::RvError::SignatureLenRange,
                    _,
                )) => Ok(false),
                Err(e) => Err(from_cryptoki(Operation::Verify, e)),
            }
        })
    }

    /// `len` random bytes from the HSM's generator.
    pub fn random(&self, len: usize) -> Result<Zeroizing<Vec<u8>>> {
        if len == 0 || len > MAX_RANDOM_LEN {
            return Err(HsmError::InvalidArgument(
                "random length must be 1 to 1024 bytes",
            ));
        }
        self.generate_random(len)
    }

    /// `len` random bytes (up to 1 MiB) from ONE call into the token, for
    /// callers that cut many values out of it: a batch of data keys costs one
    /// HSM round trip for its randomness instead of one per key.
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

    /// A cheap round trip to the token (for health checks).
    pub fn ping(&self) -> Result<()> {
        self.random(1).map(drop)
    }

    pub fn counters(&self) -> HsmCounters {
        HsmCounters {
            object_searches: self.object_searches.load(Ordering::Relaxed),
            sessions_opened: self.pool.sessions_opened(),
        }
    }

    /// Latency totals of the operations performed so far (for metrics).
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

    /// Whether the layer currently considers the HSM unreachable.
    pub fn is_down(&self) -> bool {
        self.recovery.lock().down.is_some()
    }

    // ----- internals -----

    /// Runs `work` on a pooled session under the recovery policy.
    fn run<T>(
        &self,
        operation: Operation,
        mut work: impl FnMut(&Session, &ModuleState) -> Result<T>,
    ) -> Result<T> {
        self.recover_if_due(operation)?;
        let started = Instant::now();
        let result = self.run_with_recovery(operation, &mut work);
        let (calls, micros) = &self.timings[operation as usize % OPERATION_SLOTS];
        calls.fetch_add(1, Ordering::Relaxed);
        micros.fetch_add(
            u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        result
    }

    fn run_with_recovery<T>(
        &self,
        operation: Operation,
        work: &mut impl FnMut(&Session, &ModuleState) -> Result<T>,
    ) -> Result<T> {
        let mut retried = false;
        loop {
            let state = self.module.read();
            let generation = state.generation();
            let pooled = match self.pool.check_out(&state) {
                Ok(pooled) => pooled,
                Err(e) => {
                    drop(state);
                    return Err(self.fail(operation, e, generation));
                }
            };
            match work(pooled.session(), &state) {
                Ok(value) => {
                    self.pool.check_in(pooled);
                    return Ok(value);
                }
                Err(e) => match e.class() {
                    FailureClass::SessionLost if !retried => {
                        tracing::warn!(%operation, error = %e, "HSM session lost; reconnecting once");
                        retried = true;
                        self.pool.discard(pooled);
                        self.handles.write().handles.clear();
                        if let Err(e) = self.pool.reconnect(&state) {
                            drop(state);
                            return Err(self.fail(operation, e, generation));
                        }
                    }
                    FailureClass::DeviceLost | FailureClass::SessionLost => {
                        self.pool.discard(pooled);
                        drop(state);
                        return Err(self.fail(operation, e, generation));
                    }
                    FailureClass::Other => {
                        self.pool.check_in(pooled);
                        if matches!(e, HsmError::TokenNotFound { .. }) {
                            return Err(self.fail(operation, e, generation));
                        }
                        return Err(e);
                    }
                },
            }
        }
    }

    /// Records a failure; device-level failures put the layer in the "down"
    /// state (fail closed) and come back as `Unavailable`.
    fn fail(&self, operation: Operation, error: HsmError, generation: u64) -> HsmError {
        let device_level = matches!(
            error,
            HsmError::Unavailable { .. } | HsmError::TokenNotFound { .. }
        ) || error.class() != FailureClass::Other;
        if !device_level {
            return error;
        }
        let mut recovery = self.recovery.lock();
        if recovery.down.is_none() {
            tracing::error!(%operation, %error, token = %self.label, "HSM unavailable; failing closed until it returns");
            recovery.down = Some(DownState {
                next_attempt: Instant::now() + self.backoff_min,
                backoff: self.backoff_min,
                generation_seen: generation,
            });
        }
        self.handles.write().handles.clear();
        match error {
            HsmError::Unavailable { .. } => error,
            other => HsmError::Unavailable {
                operation,
                code: match other {
                    HsmError::Pkcs11 { code, .. } => code,
                    _ => crate::error::ReturnCode::token_not_present(),
                },
            },
        }
    }

    /// While down: fail fast until the backoff expires, then try to come back
    /// (reconnect; if the token is still unreachable, re-initialize the module).
    fn recover_if_due(&self, operation: Operation) -> Result<()> {
        let mut recovery = self.recovery.lock();
        let Some(down) = recovery.down.as_mut() else {
            return Ok(());
        };
        let unavailable = || HsmError::Unavailable {
            operation,
            code: crate::error::ReturnCode::token_not_present(),
        };
        if Instant::now() < down.next_attempt {
            return Err(unavailable());
        }
        match self.try_reconnect(down.generation_seen) {
            Ok(()) => {
                tracing::info!(token = %self.label, "HSM reachable again; resuming");
                recovery.down = None;
                Ok(())
            }
            Err(e) => {
                down.backoff = (down.backoff * 2).min(self.backoff_max);
                down.next_attempt = Instant::now() + down.backoff;
                down.generation_seen = self.module.generation();
                tracing::warn!(error = %e, retry_in_ms = down.backoff.as_millis() as u64, "HSM still unavailable");
                Err(unavailable())
            }
        }
    }

    fn try_reconnect(&self, generation_seen: u64) -> Result<()> {
        self.handles.write().handles.clear();
        let attempt = || -> Result<()> {
            let state = self.module.read();
            self.pool.reconnect(&state)?;
            let pooled = self.pool.check_out(&state)?;
            let probe = pooled
                .session()
                .generate_random_vec(1)
                .map_err(|e| from_cryptoki(Operation::GenerateRandom, e));
            match probe {
                Ok(_) => {
                    self.pool.check_in(pooled);
                    // A module that answers from memory is not enough: the
                    // token's storage must be back too.
                    self.sync_token_directory()
                }
                Err(e) => {
                    self.pool.discard(pooled);
                    Err(e)
                }
            }
        };
        match attempt() {
            Ok(()) => Ok(()),
            Err(first) => {
                tracing::debug!(error = %first, "reconnect failed; re-initializing the module");
                self.module.reinitialize(generation_seen)?;
                attempt()
            }
        }
    }

    /// The cached object handle for `id`, searching the token only on a miss.
    fn handle(
        &self,
        session: &Session,
        state: &ModuleState,
        id: &ObjectId,
    ) -> Result<ObjectHandle> {
        {
            let cache = self.handles.read();
            if let Some(handle) = cache.handles.get(id)
                && cache.generation == state.generation()
            {
                return Ok(*handle);
            }
        }
        let found = self.find(session, id)?;
        let handle = match found.as_slice() {
            [handle] => *handle,
            [] if self.token_storage_missing() => {
                // SoftHSM2 answers searches from its directory: with the
                // directory gone every object is "missing". That is the
                // device going away (fail closed, recover), not a lost key.
                return Err(HsmError::Unavailable {
                    operation: Operation::FindObjects,
                    code: crate::error::ReturnCode::token_not_present(),
                });
            }
            [] => return Err(HsmError::ObjectNotFound { id: id.to_string() }),
            many => {
                return Err(HsmError::ObjectAmbiguous {
                    id: id.to_string(),
                    count: many.len(),
                });
            }
        };
        let mut cache = self.handles.write();
        if cache.generation != state.generation() {
            cache.handles.clear();
            cache.generation = state.generation();
        }
        cache.handles.insert(id.clone(), handle);
        Ok(handle)
    }

    fn find(&self, session: &Session, id: &ObjectId) -> Result<Vec<ObjectHandle>> {
        self.object_searches.fetch_add(1, Ordering::Relaxed);
        find_objects(session, id)
    }

    /// Whether the configured token directory (SoftHSM2) is gone.
    fn token_storage_missing(&self) -> bool {
        self.sync_token_dir
            .as_ref()
            .is_some_and(|dir| !dir.is_dir())
    }

    fn sync_token_directory(&self) -> Result<()> {
        match &self.sync_token_dir {
            Some(dir) => crate::token_sync::sync_tree(dir),
            None => Ok(()),
        }
    }

    /// Makes a token change durable. If the token's storage is gone or
    /// failing, the module may still have accepted the change in memory
    /// (SoftHSM2 does), but nothing it records is durable any more: fail
    /// closed exactly as for a lost device, until recovery finds the storage.
    fn sync_or_fail(&self, operation: Operation) -> Result<()> {
        self.sync_token_directory().map_err(|e| {
            tracing::error!(%operation, error = %e, "the token's storage is unusable");
            self.fail(
                operation,
                HsmError::Unavailable {
                    operation,
                    code: crate::error::ReturnCode::token_not_present(),
                },
                self.module.generation(),
            )
        })
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

fn find_objects(session: &Session, id: &ObjectId) -> Result<Vec<ObjectHandle>> {
    session
        .find_objects(&[
            Attribute::Class(cryptoki::object::ObjectClass::SECRET_KEY),
            Attribute::Id(id.as_bytes().to_vec()),
        ])
        .map_err(|e| from_cryptoki(Operation::FindObjects, e))
}

fn read_flags(
    session: &Session,
    handle: ObjectHandle,
    purpose: KeyPurpose,
) -> Result<Vec<Attribute>> {
    let kinds: Vec<AttributeType> = objects::required_flags(purpose)
        .into_iter()
        .map(|(kind, _, _)| kind)
        .collect();
    session
        .get_attributes(handle, &kinds)
        .map_err(|e| from_cryptoki(Operation::GetAttributes, e))
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
