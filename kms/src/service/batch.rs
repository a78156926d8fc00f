//! The batch forms of the key-use operations: BatchEncrypt, BatchDecrypt,
//! BatchGenerateDataKey and BatchReEncrypt. Each item succeeds or fails alone, with the same
//! checks, authorization and audit record as its single form; a call's audit
//! records go to the log as one group, the key's primary version is read once,
//! and a data-key batch draws its randomness in one HSM call at the first
//! authorized item. Plaintext and data keys stay in zeroizing buffers.

use std::collections::HashMap;

use kms_storage::Permission;
use zeroize::Zeroizing;

use super::crypto::{
    DataKey, DataKeySize, Decrypted, Encrypted, RandomPool, ReEncrypted, Redacted, WhenCurrent,
};
use super::operation::Operation;
use super::{AuditFields, KmsService, RequestMeta};
use crate::ciphertext;
use crate::encryption_context::context_digest;
use crate::error::{KmsError, Result};

/// One item of BatchEncrypt.
pub struct EncryptItem {
    pub plaintext: Zeroizing<Vec<u8>>,
    pub context: HashMap<String, String>,
}

impl std::fmt::Debug for EncryptItem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptItem")
            .field("plaintext", &Redacted(self.plaintext.len()))
            .field("context_entries", &self.context.len())
            .finish()
    }
}

/// One item of BatchDecrypt.
#[derive(Debug)]
pub struct DecryptItem {
    pub blob: Vec<u8>,
    pub context: HashMap<String, String>,
}

/// One item of BatchGenerateDataKey.
#[derive(Debug)]
pub struct DataKeyItem {
    pub size: DataKeySize,
    pub context: HashMap<String, String>,
}

/// One item of BatchReEncrypt.
#[derive(Debug)]
pub struct ReEncryptItem {
    pub blob: Vec<u8>,
    pub source_context: HashMap<String, String>,
    pub destination_context: HashMap<String, String>,
}

impl KmsService {
    fn check_batch_len(&self, len: usize) -> Result<()> {
        if len == 0 || len > self.limits.max_batch_items {
            return Err(KmsError::invalid(
                "entries",
                format!("a batch holds 1 to {} entries", self.limits.max_batch_items),
            ));
        }
        Ok(())
    }

    /// Encrypts each item under the key; each item succeeds or fails alone.
    pub fn batch_encrypt(
        &self,
        meta: &RequestMeta,
        key: &str,
        items: Vec<EncryptItem>,
    ) -> Result<Vec<Result<Encrypted>>> {
        if let Err(e) = self.check_batch_len(items.len()) {
            return self.audited(meta, Operation::BatchEncrypt, Some(key), |_| Err(e));
        }
        let record = self.resolve(key);
        let primary = record
            .as_ref()
            .map_err(KmsError::same_answer)
            .and_then(|r| self.primary_version(r));
        self.audited_batch(
            meta,
            Operation::BatchEncrypt,
            Some(key),
            items,
            |audit, item| {
                let context = self.context(item.context)?;
                audit.context_digest = Some(context_digest(&context));
                if item.plaintext.is_empty()
                    || item.plaintext.len() > self.limits.max_plaintext_bytes
                {
                    return Err(KmsError::invalid(
                        "plaintext",
                        format!("must be 1 to {} bytes", self.limits.max_plaintext_bytes),
                    ));
                }
                let record = record.as_ref().map_err(KmsError::same_answer)?;
                // Per item: grants may require entries of each item's own context.
                audit.key(&record.id, None);
                self.authorize(meta, record, Permission::Encrypt, Some(&context))?;
                super::ensure_usable(record)?;
                let version = primary.as_ref().map_err(KmsError::same_answer)?;
                audit.key(&record.id, Some(version.version));
                self.encrypt_with(record, version, &item.plaintext, &context)
            },
        )
    }

    /// Decrypts each item (each may name a different key); each succeeds or fails alone.
    pub fn batch_decrypt(
        &self,
        meta: &RequestMeta,
        expected_key: Option<&str>,
        items: Vec<DecryptItem>,
    ) -> Result<Vec<Result<Decrypted>>> {
        if let Err(e) = self.check_batch_len(items.len()) {
            return self.audited(meta, Operation::BatchDecrypt, expected_key, |_| Err(e));
        }
        self.audited_batch(
            meta,
            Operation::BatchDecrypt,
            expected_key,
            items,
            |audit, item| {
                self.decrypt_inner(
                    meta,
                    Permission::Decrypt,
                    audit,
                    &item.blob,
                    item.context,
                    expected_key,
                )
            },
        )
    }

    /// Generates a data key per item under one key.
    pub fn batch_generate_data_key(
        &self,
        meta: &RequestMeta,
        key: &str,
        items: Vec<DataKeyItem>,
    ) -> Result<Vec<Result<DataKey>>> {
        if let Err(e) = self.check_batch_len(items.len()) {
            return self.audited(meta, Operation::BatchGenerateDataKey, Some(key), |_| Err(e));
        }
        let record = self.resolve(key);
        let primary = record
            .as_ref()
            .map_err(KmsError::same_answer)
            .and_then(|r| self.primary_version(r));
        // Randomness for the data keys comes from one HSM call, drawn when the
        // first item is authorized (never for a caller who may use nothing):
        // enough for that item and every later one, each key a fresh slice.
        let sizes: Vec<usize> = items.iter().map(|i| i.size.len().unwrap_or(0)).collect();
        let mut pool = RandomPool::default();
        let mut index = 0;
        self.audited_batch(
            meta,
            Operation::BatchGenerateDataKey,
            Some(key),
            items,
            |audit, item| {
                let this = index;
                index += 1;
                let context = self.context(item.context)?;
                audit.context_digest = Some(context_digest(&context));
                let len = item.size.len()?;
                let record = record.as_ref().map_err(KmsError::same_answer)?;
                audit.key(&record.id, None);
                self.authorize(meta, record, Permission::GenerateDataKey, Some(&context))?;
                super::ensure_usable(record)?;
                let version = primary.as_ref().map_err(KmsError::same_answer)?;
                audit.key(&record.id, Some(version.version));
                let wanted = sizes[this..].iter().sum();
                let data_key = pool.take(len, wanted, |amount| {
                    self.hsm.random_pool(amount).map_err(KmsError::from)
                })?;
                let encrypted = self.encrypt_with(record, version, &data_key, &context)?;
                Ok(DataKey {
                    plaintext: Some(data_key),
                    encrypted,
                })
            },
        )
    }

    /// Re-encrypts each item as ReEncrypt does (the same domain path, so the
    /// same checks, authorization and pair of audit records per item), all
    /// records in one audit group. `destination_key` `None`: each item goes
    /// to the primary version of the key named inside its own blob. An item
    /// already under the destination's primary version with an unchanged
    /// context comes back with its own blob and `already_current` set.
    ///
    /// # Errors
    /// The whole call: INVALID_ARGUMENT for an empty batch or one above
    /// `limits.max_batch_items`; the audit log unavailable. Each item: what
    /// ReEncrypt would return for it.
    pub fn batch_re_encrypt(
        &self,
        meta: &RequestMeta,
        destination_key: Option<&str>,
        source_key: Option<&str>,
        items: Vec<ReEncryptItem>,
    ) -> Result<Vec<Result<ReEncrypted>>> {
        if let Err(e) = self.check_batch_len(items.len()) {
            return self.audited(meta, Operation::BatchReEncrypt, source_key, |_| Err(e));
        }
        self.audited_batch(
            meta,
            Operation::BatchReEncrypt,
            source_key,
            items,
            |audit, item| {
                let mut destination_audit = AuditFields::default();
                let result = self.re_encrypt_item(
                    meta,
                    audit,
                    &mut destination_audit,
                    destination_key,
                    source_key,
                    item,
                );
                audit.destination = Some(Box::new(destination_audit));
                result
            },
        )
    }

    fn re_encrypt_item(
        &self,
        meta: &RequestMeta,
        audit: &mut AuditFields,
        destination_audit: &mut AuditFields,
        destination_key: Option<&str>,
        source_key: Option<&str>,
        item: ReEncryptItem,
    ) -> Result<ReEncrypted> {
        let destination = match destination_key {
            Some(key) => key.to_owned(),
            // Only the header is read here; the blob is authenticated by
            // the decryption in re_encrypt_inner like any other.
            None => ciphertext::parse_blob(&item.blob)
                .map(|parsed| parsed.header().key_id().to_owned())
                .map_err(|_| KmsError::InvalidCiphertext)?,
        };
        self.re_encrypt_inner(
            meta,
            audit,
            destination_audit,
            item.blob,
            item.source_context,
            source_key,
            &destination,
            item.destination_context,
            WhenCurrent::KeepBlob,
        )
    }
}
