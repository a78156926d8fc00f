//! Encryption under HSM-resident KEKs: Encrypt, Decrypt,
//! GenerateDataKey (with and without plaintext), ReEncrypt, GenerateRandom
//! (batch forms: `batch.rs`).
//!
//! Encrypt always uses the key's primary version; Decrypt uses the version the
//! blob names, so rotation never requires re-encryption. Decrypt and
//! ReEncrypt authorize and audit against the key inside the blob, never the
//! one the caller names (a named key must match, or the blob is "invalid").
//! Plaintext and data keys live in zeroizing buffers and are never logged.

use std::collections::HashMap;

use kms_storage::{KeyId, KeyRecord, Permission, VersionRecord, VersionState};
use zeroize::Zeroizing;

use super::lookup::{VersionUse, ensure_version_usable};
use super::operation::Operation;
use super::{AuditFields, Deferred, KmsService, RequestMeta};
use crate::ciphertext::{self, Algorithm, Header};
use crate::encryption_context::{EncryptionContext, context_digest};
use crate::error::{KmsError, Result};

/// What the `Debug` of a secret byte string prints instead of it:
/// `[REDACTED; n bytes]` (plaintext, data keys).
pub(super) struct Redacted(pub(super) usize);

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[REDACTED; {} bytes]", self.0)
    }
}

/// The result of Encrypt.
#[derive(Debug)]
pub struct Encrypted {
    pub blob: Vec<u8>,
    pub key_id: KeyId,
    pub key_version: u32,
}

/// The result of Decrypt. The plaintext is zeroized on drop.
pub struct Decrypted {
    pub plaintext: Zeroizing<Vec<u8>>,
    pub key_id: KeyId,
    pub key_version: u32,
}

impl std::fmt::Debug for Decrypted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decrypted")
            .field("plaintext", &Redacted(self.plaintext.len()))
            .field("key_id", &self.key_id)
            .field("key_version", &self.key_version)
            .finish()
    }
}

/// A generated data key: the plaintext (absent for the WithoutPlaintext form,
/// zeroized on drop) and its ciphertext blob under the master key.
pub struct DataKey {
    pub plaintext: Option<Zeroizing<Vec<u8>>>,
    pub encrypted: Encrypted,
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataKey")
            .field(
                "plaintext",
                &self.plaintext.as_ref().map(|p| Redacted(p.len())),
            )
            .field("encrypted", &self.encrypted)
            .finish()
    }
}

/// Size of a data key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataKeySize {
    Aes128,
    Aes256,
    Bytes(usize),
}

impl DataKeySize {
    pub(super) fn len(self) -> Result<usize> {
        match self {
            DataKeySize::Aes128 => Ok(16),
            DataKeySize::Aes256 => Ok(32),
            DataKeySize::Bytes(n) if (1..=1024).contains(&n) => Ok(n),
            DataKeySize::Bytes(_) => Err(KmsError::invalid("number_of_bytes", "must be 1 to 1024")),
        }
    }
}

/// Random bytes drawn from the HSM in as few calls as possible and handed
/// out in slices, each byte at most once; what is left is zeroized.
#[derive(Default)]
pub(super) struct RandomPool {
    drawn: Option<Result<(Zeroizing<Vec<u8>>, usize)>>,
}

/// Most bytes drawn per HSM call (the layer's limit).
const RANDOM_POOL_MAX: usize = 1 << 20;

impl RandomPool {
    /// The next `len` bytes. When the pool is empty or short, draws
    /// `wanted` more (what this item and every later one could need, at
    /// most 1 MiB) with `draw`; a failed draw fails this and later takes.
    pub(super) fn take(
        &mut self,
        len: usize,
        wanted: usize,
        draw: impl FnOnce(usize) -> Result<Zeroizing<Vec<u8>>>,
    ) -> Result<Zeroizing<Vec<u8>>> {
        let short = match &self.drawn {
            None => true,
            Some(Ok((bytes, used))) => bytes.len() - used < len,
            Some(Err(e)) => return Err(e.same_answer()),
        };
        if short {
            let amount = wanted.clamp(len, RANDOM_POOL_MAX.max(len));
            self.drawn = Some(draw(amount).map(|bytes| (bytes, 0)));
        }
        match &mut self.drawn {
            Some(Ok((bytes, used))) if bytes.len() - *used >= len => {
                let value = Zeroizing::new(bytes[*used..*used + len].to_vec());
                *used += len;
                Ok(value)
            }
            Some(Err(e)) => Err(e.same_answer()),
            _ => Err(KmsError::Internal {
                what: "batch random pool came back short",
            }),
        }
    }
}

/// Input of Encrypt. The plaintext is zeroized on drop.
pub struct EncryptInput {
    /// Key id or alias.
    pub key: String,
    pub plaintext: Zeroizing<Vec<u8>>,
    pub context: HashMap<String, String>,
}

impl std::fmt::Debug for EncryptInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptInput")
            .field("key", &self.key)
            .field("plaintext", &Redacted(self.plaintext.len()))
            .field("context_entries", &self.context.len())
            .finish()
    }
}

/// Input of Decrypt.
#[derive(Debug)]
pub struct DecryptInput {
    pub blob: Vec<u8>,
    pub context: HashMap<String, String>,
    /// If set, the blob must be under this key (id or alias), or it is
    /// "invalid ciphertext".
    pub expected_key: Option<String>,
}

/// Whether a generated data key is returned in plaintext too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataKeyForm {
    /// GenerateDataKey: the plaintext key and its blob.
    WithPlaintext,
    /// GenerateDataKeyWithoutPlaintext: the blob only.
    WithoutPlaintext,
}

impl DataKeyForm {
    fn operation(self) -> Operation {
        match self {
            DataKeyForm::WithPlaintext => Operation::GenerateDataKey,
            DataKeyForm::WithoutPlaintext => Operation::GenerateDataKeyWithoutPlaintext,
        }
    }
}

/// Input of GenerateDataKey and GenerateDataKeyWithoutPlaintext.
#[derive(Debug)]
pub struct DataKeyInput {
    /// Key id or alias of the master key.
    pub key: String,
    pub size: DataKeySize,
    pub context: HashMap<String, String>,
    pub form: DataKeyForm,
}

/// Input of ReEncrypt.
#[derive(Debug)]
pub struct ReEncryptInput {
    pub blob: Vec<u8>,
    pub source_context: HashMap<String, String>,
    /// If set, the blob must be under this key (id or alias).
    pub source_key: Option<String>,
    /// Key id or alias to encrypt under.
    pub destination_key: String,
    pub destination_context: HashMap<String, String>,
}

/// The result of ReEncrypt.
#[derive(Debug)]
pub struct ReEncrypted {
    pub encrypted: Encrypted,
    pub source_key_id: KeyId,
    pub source_key_version: u32,
    /// BatchReEncrypt only: the source blob was already under the
    /// destination key's primary version with the same context, so
    /// `encrypted.blob` is the source blob itself and nothing was encrypted.
    /// Always false for ReEncrypt, which makes a new blob whatever it gets.
    pub already_current: bool,
}

/// Whether ReEncrypt may hand back a blob that is already where it would go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WhenCurrent {
    /// ReEncrypt: always encrypt again (a new IV, a new blob).
    Encrypt,
    /// BatchReEncrypt: return the source blob unchanged (it was authenticated
    /// by the decryption) when it is under the destination's primary version
    /// and the destination context equals the source context.
    KeepBlob,
}

impl KmsService {
    /// Builds the canonical encryption context, enforcing the size limit.
    pub(crate) fn context(&self, map: HashMap<String, String>) -> Result<EncryptionContext> {
        EncryptionContext::new(map, self.limits.max_context_bytes)
            .map_err(|e| KmsError::invalid("encryption_context", e.to_string()))
    }

    /// Encrypt under the key's primary version. The result is released by
    /// [`KmsService::finish_async`] once its audit record is durable.
    pub fn encrypt(&self, meta: &RequestMeta, input: EncryptInput) -> Deferred<Encrypted> {
        let EncryptInput {
            key,
            plaintext,
            context,
        } = input;
        let key = key.as_str();
        self.deferred(meta, Operation::Encrypt, Some(key), |audit| {
            let context = self.context(context)?;
            audit.context_digest = Some(context_digest(&context));
            if plaintext.is_empty() || plaintext.len() > self.limits.max_plaintext_bytes {
                return Err(KmsError::invalid(
                    "plaintext",
                    format!(
                        "must be 1 to {} bytes; encrypt larger data locally with a data key (GenerateDataKey)",
                        self.limits.max_plaintext_bytes
                    ),
                ));
            }
            self.encrypt_in(meta, audit, key, &plaintext, &context)
        })
    }

    /// Encrypt's key use, once the request is validated: authorizes
    /// `meta`'s principal for `encrypt` on `key` (id or alias) with
    /// `context`, then encrypts under the key's primary version. Shared by
    /// every door that encrypts one plaintext (Crypto.Encrypt, the
    /// Kubernetes plugin), so that the key use exists once.
    pub(super) fn encrypt_in(
        &self,
        meta: &RequestMeta,
        audit: &mut AuditFields,
        key: &str,
        plaintext: &[u8],
        context: &EncryptionContext,
    ) -> Result<Encrypted> {
        let record = self.resolve_for_use(meta, audit, key, Permission::Encrypt, context)?;
        self.encrypt_under(audit, &record, plaintext, context)
    }

    /// Encrypts under the primary version of an already-resolved usable key.
    fn encrypt_under(
        &self,
        audit: &mut AuditFields,
        record: &KeyRecord,
        plaintext: &[u8],
        context: &EncryptionContext,
    ) -> Result<Encrypted> {
        if let Some(number) = record.primary_version {
            audit.key(&record.id, Some(number));
        }
        let version = self.primary_version(record)?;
        self.encrypt_with(record, &version, plaintext, context)
    }

    /// Encrypts under `version` (the enabled primary of `record`), counting
    /// the AES-GCM invocation first.
    ///
    /// # Errors
    /// [`KmsError::GcmInvocationLimit`] (FAILED_PRECONDITION) once the
    /// version has done `rotation.gcm_invocation_hard_limit` encryptions
    /// (nothing is counted or encrypted); HSM and storage failures.
    pub(super) fn encrypt_with(
        &self,
        record: &KeyRecord,
        version: &VersionRecord,
        plaintext: &[u8],
        context: &EncryptionContext,
    ) -> Result<Encrypted> {
        let version_number = version.version;
        let header = Header::new(record.id.as_str(), version_number, Algorithm::Aes256Gcm)
            .map_err(|_| KmsError::Internal {
                what: "key id does not fit the ciphertext header",
            })?;
        let aad = header.aad(context);
        // Count the invocation before using the key: the count may overshoot
        // after a crash, never undershoot (NIST SP 800-38D §8.3 budget). At
        // the hard limit the version is refused, whatever became of the
        // rotation the soft limit asked for (the scheduler may be failing).
        let limit = self.rotation.gcm_invocation_hard_limit;
        let count = self
            .catalogue()
            .add_gcm_invocations_up_to(&record.id, version_number, 1, limit)?
            .ok_or_else(|| KmsError::GcmInvocationLimit {
                key_id: record.id.clone(),
                version: version_number,
                limit,
            })?;
        if count >= self.rotation.gcm_invocation_limit {
            tracing::warn!(key_id = %record.id, version = version_number, count, "GCM invocation soft limit reached; rotation due");
        }
        let sealed = self.seal_under(version, &aad, plaintext)?;
        Ok(Encrypted {
            blob: ciphertext::seal_blob(&header, &sealed.iv, &sealed.ciphertext_and_tag),
            key_id: record.id.clone(),
            key_version: version_number,
        })
    }

    /// Decrypt with the key version the blob names. The result (plaintext)
    /// is released by [`KmsService::finish_async`] once its audit record is
    /// durable.
    pub fn decrypt(&self, meta: &RequestMeta, input: DecryptInput) -> Deferred<Decrypted> {
        let DecryptInput {
            blob,
            context,
            expected_key,
        } = input;
        let expected_key = expected_key.as_deref();
        // The audit names the key inside the blob once it parses.
        self.deferred(meta, Operation::Decrypt, expected_key, |audit| {
            self.decrypt_inner(
                meta,
                Permission::Decrypt,
                audit,
                &blob,
                context,
                expected_key,
            )
        })
    }

    /// Decrypts a blob, authorizing `permission` on the key named inside the
    /// blob (whatever key the caller named).
    pub(super) fn decrypt_inner(
        &self,
        meta: &RequestMeta,
        permission: Permission,
        audit: &mut AuditFields,
        blob: &[u8],
        context: HashMap<String, String>,
        expected_key: Option<&str>,
    ) -> Result<Decrypted> {
        let context = self.context(context)?;
        audit.context_digest = Some(context_digest(&context));
        let parsed = ciphertext::parse_blob(blob).map_err(|e| {
            tracing::debug!(reason = ?e.reason(), "ciphertext refused");
            KmsError::InvalidCiphertext
        })?;
        let key_id =
            KeyId::parse(parsed.header().key_id()).map_err(|_| KmsError::InvalidCiphertext)?;
        let version_number = parsed.header().key_version();
        audit.key(&key_id, Some(version_number));
        if let Some(expected) = expected_key.filter(|k| !k.is_empty()) {
            let named = self.resolve(expected)?;
            if named.id != key_id {
                tracing::debug!("ciphertext names another key than the caller required");
                return Err(KmsError::InvalidCiphertext);
            }
        }
        // A blob naming a key or version that never existed is just invalid.
        let record = self
            .catalogue()
            .get_key(&key_id)?
            .ok_or(KmsError::InvalidCiphertext)?;
        self.authorize(meta, &record, permission, Some(&context))?;
        super::ensure_usable(&record)?;
        let version = self
            .catalogue()
            .get_version(&key_id, version_number)?
            .ok_or(KmsError::InvalidCiphertext)?;
        // A version still being created has made no blob: this one is forged.
        if version.state == VersionState::Pending {
            return Err(KmsError::InvalidCiphertext);
        }
        let purpose = if permission == Permission::ReEncryptFrom {
            VersionUse::ReEncryptSource
        } else {
            VersionUse::Decrypt
        };
        ensure_version_usable(&version, purpose)?;
        let plaintext = self.open_under(
            &version,
            parsed.iv(),
            &parsed.aad(&context),
            parsed.ct_and_tag(),
        )?;
        Ok(Decrypted {
            plaintext,
            key_id,
            key_version: version_number,
        })
    }

    /// GenerateDataKey and GenerateDataKeyWithoutPlaintext (`input.form`).
    /// The result is released by [`KmsService::finish_async`] once its audit
    /// record is durable.
    pub fn generate_data_key(&self, meta: &RequestMeta, input: DataKeyInput) -> Deferred<DataKey> {
        let DataKeyInput {
            key,
            size,
            context,
            form,
        } = input;
        let key = key.as_str();
        self.deferred(meta, form.operation(), Some(key), |audit| {
            let context = self.context(context)?;
            audit.context_digest = Some(context_digest(&context));
            let len = size.len()?;
            let record =
                self.resolve_for_use(meta, audit, key, Permission::GenerateDataKey, &context)?;
            let data_key = self.hsm.random(len)?;
            let encrypted = self.encrypt_under(audit, &record, &data_key, &context)?;
            Ok(DataKey {
                plaintext: (form == DataKeyForm::WithPlaintext).then_some(data_key),
                encrypted,
            })
        })
    }

    /// Decrypts the blob and encrypts its plaintext under the primary version
    /// of the destination key, inside the service. The result is released by
    /// [`KmsService::finish_async`] once its audit records are durable: one
    /// naming the source key and version, and (once the destination key is
    /// resolved, whatever the outcome) one naming the destination key and
    /// the version used, in the same group, so that an auditor following
    /// either key sees the move.
    pub fn re_encrypt(&self, meta: &RequestMeta, input: ReEncryptInput) -> Deferred<ReEncrypted> {
        let ReEncryptInput {
            blob,
            source_context,
            source_key,
            destination_key,
            destination_context,
        } = input;
        let source_key = source_key.as_deref();
        let destination_key = destination_key.as_str();
        self.deferred(meta, Operation::ReEncrypt, source_key, |audit| {
            let mut destination_audit = AuditFields::default();
            let result = self.re_encrypt_inner(
                meta,
                audit,
                &mut destination_audit,
                blob,
                source_context,
                source_key,
                destination_key,
                destination_context,
                WhenCurrent::Encrypt,
            );
            audit.destination = Some(Box::new(destination_audit));
            result
        })
    }

    /// ReEncrypt's key use (shared by ReEncrypt and BatchReEncrypt's items):
    /// authorizes `reencrypt-to` on the destination, then decrypts under
    /// `reencrypt-from` on the key inside the blob, then encrypts under the
    /// destination's primary version, unless `when_current` allows keeping a
    /// blob that is already there (see [`WhenCurrent`]).
    #[allow(clippy::too_many_arguments)] // the request's fields and its two audit records
    pub(super) fn re_encrypt_inner(
        &self,
        meta: &RequestMeta,
        audit: &mut AuditFields,
        destination_audit: &mut AuditFields,
        blob: Vec<u8>,
        source_context: HashMap<String, String>,
        source_key: Option<&str>,
        destination_key: &str,
        destination_context: HashMap<String, String>,
        when_current: WhenCurrent,
    ) -> Result<ReEncrypted> {
        let same_context = source_context == destination_context;
        let destination_context = self.context(destination_context)?;
        destination_audit.context_digest = Some(context_digest(&destination_context));
        // The destination first: a caller who may not write there never
        // gets the source decrypted.
        let destination = self.resolve_for_use(
            meta,
            destination_audit,
            destination_key,
            Permission::ReEncryptTo,
            &destination_context,
        )?;
        if let Some(number) = destination.primary_version {
            destination_audit.key(&destination.id, Some(number));
        }
        let decrypted = self.decrypt_inner(
            meta,
            Permission::ReEncryptFrom,
            audit,
            &blob,
            source_context,
            source_key,
        )?;
        if when_current == WhenCurrent::KeepBlob
            && same_context
            && decrypted.key_id == destination.id
            && destination.primary_version == Some(decrypted.key_version)
        {
            // Nothing is encrypted: the destination record names the key
            // but no version, so it is not counted as an encrypt-side use
            // of the primary (the source record counts the decryption).
            destination_audit.key_version = None;
            return Ok(ReEncrypted {
                encrypted: Encrypted {
                    blob,
                    key_id: destination.id.clone(),
                    key_version: decrypted.key_version,
                },
                source_key_id: decrypted.key_id.clone(),
                source_key_version: decrypted.key_version,
                already_current: true,
            });
        }
        let encrypted = self.encrypt_under(
            destination_audit,
            &destination,
            &decrypted.plaintext,
            &destination_context,
        )?;
        Ok(ReEncrypted {
            encrypted,
            source_key_id: decrypted.key_id.clone(),
            source_key_version: decrypted.key_version,
            already_current: false,
        })
    }

    /// Random bytes from the HSM. Not tied to a key, but audited (it uses the HSM).
    pub fn generate_random(&self, meta: &RequestMeta, len: usize) -> Result<Zeroizing<Vec<u8>>> {
        self.audited(meta, Operation::GenerateRandom, None, |_| {
            if !(1..=kms_hsm::MAX_RANDOM_LEN).contains(&len) {
                return Err(KmsError::invalid("number_of_bytes", "must be 1 to 1024"));
            }
            Ok(self.hsm.random(len)?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::EncryptItem;

    #[test]
    fn the_random_pool_hands_out_each_byte_once_and_redraws_when_short() {
        let mut draws = Vec::new();
        let mut pool = RandomPool::default();
        let mut next = 0u8;
        let mut draw = |amount: usize, draws: &mut Vec<usize>| {
            draws.push(amount);
            Ok(Zeroizing::new(
                (0..amount)
                    .map(|_| {
                        next = next.wrapping_add(1);
                        next
                    })
                    .collect(),
            ))
        };
        let a = pool.take(2, 5, |n| draw(n, &mut draws)).expect("a");
        let b = pool.take(3, 3, |n| draw(n, &mut draws)).expect("b");
        assert_eq!((a.as_slice(), b.as_slice()), (&[1, 2][..], &[3, 4, 5][..]));
        // Short: a new draw, never a reused byte.
        let c = pool.take(4, 1, |n| draw(n, &mut draws)).expect("c");
        assert_eq!(c.as_slice(), &[6, 7, 8, 9]);
        assert_eq!(draws, [5, 4]);
        // A failed draw fails this take and the later ones.
        let mut failing = RandomPool::default();
        assert!(
            failing
                .take(1, 1, |_| Err(KmsError::HsmUnavailable { source: None }))
                .is_err()
        );
        assert!(failing.take(1, 1, |n| draw(n, &mut draws)).is_err());
    }

    #[test]
    fn debug_output_never_shows_plaintext_or_data_keys() {
        let secret = b"TOP-SECRET-PLAINTEXT-0123456789".to_vec();
        let key_id = KeyId::from_random([7; 16]);
        let decrypted = Decrypted {
            plaintext: Zeroizing::new(secret.clone()),
            key_id: key_id.clone(),
            key_version: 1,
        };
        let data_key = DataKey {
            plaintext: Some(Zeroizing::new(secret.clone())),
            encrypted: Encrypted {
                blob: vec![1, 2, 3],
                key_id,
                key_version: 1,
            },
        };
        let item = EncryptItem {
            plaintext: Zeroizing::new(secret.clone()),
            context: HashMap::new(),
        };
        let needle = String::from_utf8(secret.clone()).expect("utf8");
        for text in [
            format!("{decrypted:?}"),
            format!("{data_key:?}"),
            format!("{item:?}"),
        ] {
            assert!(!text.contains(&needle), "{text}");
            assert!(!text.contains("84, 79, 80"), "byte list leaked: {text}");
            assert!(text.contains("REDACTED"), "{text}");
        }
    }
}
