//! Bring your own key (issue 14 item 6; model: AWS KMS
//! `GetParametersForImport` / `ImportKeyMaterial`).
//!
//! A key created with origin `EXTERNAL` has no version until its owner
//! imports one: `GetParametersForImport` generates a fresh RSA import key
//! pair in the HSM (a session object on this module's own `KeyHolder`) and
//! hands out its public key and a token; the owner wraps its 32-byte AES key
//! with RSA-OAEP under the public key; `ImportKeyMaterial` unwraps it inside
//! the HSM, wraps it under the active root and stores it, MAC'd like every
//! wrapped version, as a new primary version of origin `EXTERNAL`, in one
//! catalogue write.
//!
//! The token is 32 random bytes that index the outstanding import key pairs
//! held here, in memory: it cannot be forged, and it binds the key id, the
//! algorithm, the key spec and the expiry server-side. Import key pairs are
//! HSM session objects and cannot be kept as blobs under the root (see
//! `kms_hsm`'s `import` module), so a restart (or a lost holder session)
//! loses them: their tokens are then unknown, with a message that says so.
//! At most one pair per key (a new request supersedes the previous one) and
//! [`MAX_OUTSTANDING`] in all; expired pairs are destroyed when met.
//!
//! A token is spent by the first `ImportKeyMaterial` that reaches the HSM,
//! whatever the outcome: one decryption attempt per key pair, so the import
//! key is no oracle for anyone probing RSA-OAEP padding (Manger's attack).
//!
//! What it must never do: see the key material in clear (it only passes the
//! RSA ciphertext to the HSM), or store anything when an import fails.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use kms_hsm::{Hsm, HsmError, ImportKey, ImportKeySpec, KeyHolder, OaepHash};
use kms_storage::{KeyId, KeyOrigin, KeyRecord, KeyState, Permission, ResultCode, VersionRecord};
use parking_lot::Mutex;
use ring::rand::SecureRandom;

use super::{KmsService, Operation, RequestMeta, now_ms};
use crate::error::{KmsError, Result};

/// How long import parameters stay valid unless the request asks for less:
/// 24 hours, as AWS KMS.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(86_400);

/// Outstanding import key pairs, at most (each an HSM session object).
pub const MAX_OUTSTANDING: usize = 256;

/// Spent, superseded and expired tokens remembered for a clearer refusal.
const REMEMBERED: usize = 1024;

/// Length of an import token, bytes.
pub const TOKEN_LEN: usize = 32;

/// Why an import (or a use of a key awaiting one) was refused. Each says
/// what to do; none carries key material. Cheap to clone (no cause).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ImportRefusal {
    /// Encrypt (or any use) of an EXTERNAL key that has no version yet.
    #[error(
        "key {key_id} awaits its key material (origin EXTERNAL): import it with GetParametersForImport and ImportKeyMaterial"
    )]
    PendingImport { key_id: KeyId },

    /// Import into a key whose origin is KMS, or a generated version
    /// (rotation) for a key whose origin is EXTERNAL.
    #[error(
        "key {key_id} does not take this kind of version: keys of origin KMS get their material from the HSM (RotateKey), keys of origin EXTERNAL only by ImportKeyMaterial"
    )]
    OriginMismatch { key_id: KeyId },

    /// RotateKey (or automatic rotation) of an EXTERNAL key.
    #[error(
        "key {key_id} has origin EXTERNAL: kms cannot generate its key material; import new material with GetParametersForImport and ImportKeyMaterial instead of rotating"
    )]
    RotateExternal { key_id: KeyId },

    /// The server has no root key, so it cannot hold imported material.
    #[error(
        "importing key material needs a root key in the HSM (kms hsm init-root): imported material is held wrapped under it"
    )]
    NeedsWrappedVersions,

    /// The token is not one this process issued and still holds.
    #[error(
        "unknown import token: not issued by this kms process, or its import key pair was lost (kms restarted or lost its HSM session; import key pairs are HSM session objects); call GetParametersForImport again"
    )]
    UnknownToken,

    /// The token was used already (one ImportKeyMaterial attempt each).
    #[error(
        "import token already used (each token allows one ImportKeyMaterial attempt); call GetParametersForImport again"
    )]
    TokenUsed,

    /// A later GetParametersForImport for the same key replaced it.
    #[error(
        "import token superseded by a later GetParametersForImport for the same key; use the newest parameters"
    )]
    TokenSuperseded,

    /// The token's validity ended.
    #[error("import token expired; call GetParametersForImport again")]
    TokenExpired,

    /// The token was issued for another key.
    #[error("import token was issued for key {token_key}, not for key {key_id}")]
    TokenForOtherKey { token_key: KeyId, key_id: KeyId },

    /// The request's algorithm is not the token's.
    #[error("import token was issued for {token_algorithm}, not for {requested}")]
    TokenForOtherAlgorithm {
        token_algorithm: &'static str,
        requested: &'static str,
    },

    /// The HSM refused the OAEP parameters.
    #[error("the HSM does not support the wrapping algorithm {algorithm}; use RSAES_OAEP_SHA_1")]
    AlgorithmUnsupported { algorithm: &'static str },

    /// The ciphertext did not decrypt to a 32-byte key.
    #[error(
        "encrypted_key_material does not decrypt to a 32-byte AES key under the import key with the token's algorithm; the token is spent: call GetParametersForImport again"
    )]
    MaterialInvalid,

    /// Too many import key pairs are outstanding.
    #[error("too many import key pairs outstanding; retry later")]
    TooManyOutstanding,
}

impl ImportRefusal {
    /// The gRPC code: the caller's bytes are INVALID_ARGUMENT, the state of
    /// the key, token or HSM is FAILED_PRECONDITION.
    pub fn code(&self) -> ResultCode {
        match self {
            ImportRefusal::TokenForOtherKey { .. }
            | ImportRefusal::TokenForOtherAlgorithm { .. }
            | ImportRefusal::MaterialInvalid => ResultCode::InvalidArgument,
            ImportRefusal::TooManyOutstanding => ResultCode::ResourceExhausted,
            _ => ResultCode::FailedPrecondition,
        }
    }
}

/// What GetParametersForImport hands out.
#[derive(Debug)]
pub struct ImportParameters {
    /// The key's canonical id.
    pub key_id: KeyId,
    /// The import public key, DER `SubjectPublicKeyInfo`.
    pub public_key: Vec<u8>,
    /// The opaque token ([`TOKEN_LEN`] bytes).
    pub import_token: Vec<u8>,
    /// End of validity, unix milliseconds.
    pub valid_to_ms: u64,
    /// Echoed from the request.
    pub algorithm: OaepHash,
    /// Echoed from the request.
    pub spec: ImportKeySpec,
}

/// One outstanding import key pair.
struct Outstanding {
    key_id: KeyId,
    algorithm: OaepHash,
    valid_to_ms: u64,
    key: ImportKey,
    holder: Arc<KeyHolder>,
}

impl Outstanding {
    /// Best effort: a failure leaves the object to die with its holder.
    fn destroy(self) {
        if let Err(error) = self.holder.destroy_import_key(self.key) {
            tracing::debug!(%error, "import key not destroyed");
        }
    }
}

#[derive(Clone, Copy)]
enum Retired {
    Used,
    Superseded,
    Expired,
}

#[derive(Default)]
struct State {
    /// `None` until first use and after a holder loss.
    holder: Option<Arc<KeyHolder>>,
    outstanding: HashMap<[u8; TOKEN_LEN], Outstanding>,
    retired: VecDeque<([u8; TOKEN_LEN], Retired)>,
}

impl State {
    fn retire(&mut self, token: [u8; TOKEN_LEN], why: Retired) {
        if self.retired.len() == REMEMBERED {
            self.retired.pop_front();
        }
        self.retired.push_back((token, why));
    }

    /// Destroys every expired pair.
    fn purge(&mut self, now: u64) {
        let expired: Vec<[u8; TOKEN_LEN]> = self
            .outstanding
            .iter()
            .filter(|(_, o)| o.valid_to_ms <= now)
            .map(|(t, _)| *t)
            .collect();
        for token in expired {
            if let Some(o) = self.outstanding.remove(&token) {
                o.destroy();
                self.retire(token, Retired::Expired);
            }
        }
    }
}

/// The outstanding import key pairs; see the module docs.
pub(crate) struct Imports {
    hsm: Arc<Hsm>,
    state: Mutex<State>,
}

impl std::fmt::Debug for Imports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Imports")
            .field("outstanding", &self.state.lock().outstanding.len())
            .finish_non_exhaustive()
    }
}

impl KmsService {
    /// GetParametersForImport: a fresh import key pair for the EXTERNAL key
    /// `key`, valid for `valid_for` (1 s to 24 h; `None`: 24 h). Needs
    /// `Permission::Rotate` (administrators have it), like RotateKey.
    ///
    /// # Errors
    /// `Import(..)` for a key of origin KMS, a server without wrapped
    /// versions, too many outstanding pairs; INVALID_ARGUMENT for a validity
    /// out of range; the key-state errors of `ensure_usable` (only ENABLED
    /// keys take material); HSM errors.
    pub fn get_parameters_for_import(
        &self,
        meta: &RequestMeta,
        key: &str,
        algorithm: OaepHash,
        spec: ImportKeySpec,
        valid_for: Option<Duration>,
    ) -> Result<ImportParameters> {
        self.audited(
            meta,
            Operation::GetParametersForImport,
            Some(key),
            |audit| {
                let valid_for = valid_for.unwrap_or(DEFAULT_VALIDITY);
                if valid_for < Duration::from_secs(1) || valid_for > DEFAULT_VALIDITY {
                    return Err(KmsError::invalid(
                        "valid_for",
                        "must be 1 to 86400 whole seconds",
                    ));
                }
                let record = self.resolve_for(meta, audit, key, Permission::Rotate)?;
                self.importable(&record)?;
                let imports = self.imports()?;
                let now = now_ms();
                let mut token = [0u8; TOKEN_LEN];
                ring::rand::SystemRandom::new()
                    .fill(&mut token)
                    .map_err(|_| KmsError::Internal {
                        what: "the system random generator failed",
                    })?;
                let mut state = imports.state.lock();
                state.purge(now);
                // One pair per key: a new request supersedes the previous one.
                let previous: Vec<[u8; TOKEN_LEN]> = state
                    .outstanding
                    .iter()
                    .filter(|(_, o)| o.key_id == record.id)
                    .map(|(t, _)| *t)
                    .collect();
                for old in previous {
                    if let Some(o) = state.outstanding.remove(&old) {
                        o.destroy();
                        state.retire(old, Retired::Superseded);
                    }
                }
                if state.outstanding.len() >= MAX_OUTSTANDING {
                    return Err(ImportRefusal::TooManyOutstanding.into());
                }
                let (holder, (key_pair, public_key)) =
                    imports.on_holder(&mut state, |holder| holder.generate_import_key(spec))?;
                let valid_to_ms =
                    now.saturating_add(u64::try_from(valid_for.as_millis()).unwrap_or(u64::MAX));
                state.outstanding.insert(
                    token,
                    Outstanding {
                        key_id: record.id.clone(),
                        algorithm,
                        valid_to_ms,
                        key: key_pair,
                        holder,
                    },
                );
                Ok(ImportParameters {
                    key_id: record.id,
                    public_key,
                    import_token: token.to_vec(),
                    valid_to_ms,
                    algorithm,
                    spec,
                })
            },
        )
    }

    /// ImportKeyMaterial: unwraps `encrypted` with the import key pair of
    /// `token` inside the HSM and stores it, wrapped under the active root,
    /// as a new primary version of origin EXTERNAL (see the module docs).
    /// `algorithm`, if given, must be the token's. The token is spent by
    /// the attempt once it reaches the HSM.
    ///
    /// # Errors
    /// `Import(..)` for every token and material refusal; the errors of
    /// `get_parameters_for_import`; storage and HSM errors. Nothing is
    /// stored on error.
    pub fn import_key_material(
        &self,
        meta: &RequestMeta,
        key: &str,
        token: &[u8],
        encrypted: &[u8],
        algorithm: Option<OaepHash>,
    ) -> Result<VersionRecord> {
        self.audited(meta, Operation::ImportKeyMaterial, Some(key), |audit| {
            let record = self.resolve_for(meta, audit, key, Permission::Rotate)?;
            self.importable(&record)?;
            let imports = self.imports()?;
            let wrapped = self
                .wrapped
                .as_ref()
                .ok_or(ImportRefusal::NeedsWrappedVersions)?;
            let token: [u8; TOKEN_LEN] =
                token.try_into().map_err(|_| ImportRefusal::UnknownToken)?;
            // Take the pair out (spent) only once every check that needs no
            // HSM has passed, so a mistyped key id does not spend it.
            let outstanding = {
                let mut state = imports.state.lock();
                let Some(found) = state.outstanding.get(&token) else {
                    let retired = state.retired.iter().rev().find(|(t, _)| *t == token);
                    return Err(match retired.map(|(_, why)| *why) {
                        Some(Retired::Used) => ImportRefusal::TokenUsed,
                        Some(Retired::Superseded) => ImportRefusal::TokenSuperseded,
                        Some(Retired::Expired) => ImportRefusal::TokenExpired,
                        None => ImportRefusal::UnknownToken,
                    }
                    .into());
                };
                if found.key_id != record.id {
                    return Err(ImportRefusal::TokenForOtherKey {
                        token_key: found.key_id.clone(),
                        key_id: record.id.clone(),
                    }
                    .into());
                }
                if let Some(requested) = algorithm
                    && requested != found.algorithm
                {
                    return Err(ImportRefusal::TokenForOtherAlgorithm {
                        token_algorithm: found.algorithm.name(),
                        requested: requested.name(),
                    }
                    .into());
                }
                let now = now_ms();
                let expired = found.valid_to_ms <= now;
                let Some(taken) = state.outstanding.remove(&token) else {
                    return Err(ImportRefusal::UnknownToken.into());
                };
                if expired {
                    taken.destroy();
                    state.retire(token, Retired::Expired);
                    return Err(ImportRefusal::TokenExpired.into());
                }
                state.retire(token, Retired::Used);
                taken
            };
            let _guard = self.key_locks.lock(&record.id);
            // Held until the version is in the catalogue (as for generated
            // versions): root rotation must not see an epoch go unused and
            // then find a new record under it.
            let epoch = wrapped.active_epoch();
            let imported = outstanding.holder.import_version(
                &outstanding.key,
                outstanding.algorithm,
                encrypted,
                *epoch,
                wrapped.variant,
            );
            let holder_lost = matches!(imported, Err(HsmError::WorkingKeyStale));
            outstanding.destroy();
            if holder_lost {
                imports.drop_holder();
                return Err(ImportRefusal::UnknownToken.into());
            }
            let blob = imported?;
            let id = record.id.clone();
            let (_, version) = self.catalogue().add_enabled_version_of::<KmsError>(
                &id,
                KeyOrigin::External,
                now_ms(),
                |v| self.wrapped_kek(&id, v, &blob),
            )?;
            drop(epoch);
            audit.key(&id, Some(version.version));
            Ok(version)
        })
    }

    /// Whether `record` takes imported material now: origin EXTERNAL,
    /// state ENABLED, and a server with wrapped versions.
    fn importable(&self, record: &KeyRecord) -> Result<()> {
        if record.origin != KeyOrigin::External {
            return Err(ImportRefusal::OriginMismatch {
                key_id: record.id.clone(),
            }
            .into());
        }
        if record.state != KeyState::Enabled {
            super::ensure_usable(record)?;
        }
        Ok(())
    }

    fn imports(&self) -> Result<&Imports> {
        self.wrapped
            .as_ref()
            .map(|w| &w.imports)
            .ok_or_else(|| ImportRefusal::NeedsWrappedVersions.into())
    }
}

impl Imports {
    /// Forgets the holder after a loss: its pairs died with its session.
    fn drop_holder(&self) {
        let mut state = self.state.lock();
        state.holder = None;
        let dead: Vec<[u8; TOKEN_LEN]> = state.outstanding.keys().copied().collect();
        for token in dead {
            state.outstanding.remove(&token);
        }
    }
}

impl Imports {
    /// No pairs yet; the first request opens a holder on `hsm`.
    pub(crate) fn new(hsm: Arc<Hsm>) -> Imports {
        Imports {
            hsm,
            state: Mutex::new(State::default()),
        }
    }

    /// Runs `work` on the import holder (opening one if needed); on a
    /// holder loss drops it, and every pair on it (they died with its
    /// session), and tries once more on a new one.
    fn on_holder<T>(
        &self,
        state: &mut State,
        work: impl Fn(&KeyHolder) -> kms_hsm::Result<T>,
    ) -> Result<(Arc<KeyHolder>, T)> {
        let mut retried = false;
        loop {
            let holder = match &state.holder {
                Some(holder) => Arc::clone(holder),
                None => {
                    let holder = Arc::new(self.hsm.key_holder()?);
                    state.holder = Some(Arc::clone(&holder));
                    holder
                }
            };
            match work(&holder) {
                Err(HsmError::WorkingKeyStale) if !retried => {
                    retried = true;
                    state.holder = None;
                    state.outstanding.clear();
                }
                Err(e) => return Err(e.into()),
                Ok(value) => return Ok((holder, value)),
            }
        }
    }
}
