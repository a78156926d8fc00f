//! Authorization inside the domain operations: every check runs inside the
//! operation's `audited` closure, so a denial is an audit record with the
//! principal, the operation and the key, like any other outcome.
//!
//! Decrypt and ReEncrypt authorize against the key named inside the blob,
//! never the one the caller names (see `crypto.rs`).

use kms_storage::{Grant, KeyPolicy, KeyRecord, Permission};

use super::{AuditFields, KmsService, RequestMeta, ensure_usable, now_ms};
use crate::auth::is_valid_principal;
use crate::encryption_context::EncryptionContext;
use crate::error::{KmsError, Result};

/// At most this many grants per key policy.
pub const MAX_GRANTS: usize = 100;
/// At most this many required context entries per grant.
pub const MAX_REQUIRED_CONTEXT: usize = 16;

impl KmsService {
    /// `permission` on `record` for the caller, or PERMISSION_DENIED.
    pub(crate) fn authorize(
        &self,
        meta: &RequestMeta,
        record: &KeyRecord,
        permission: Permission,
        context: Option<&EncryptionContext>,
    ) -> Result<()> {
        if self
            .access
            .allows(record.policy.as_ref(), &meta.principal, permission, context)
        {
            return Ok(());
        }
        tracing::info!(principal = %meta.principal, key_id = %record.id, permission = permission.as_str(), "denied");
        Err(KmsError::PermissionDenied {
            principal: meta.principal.clone(),
            action: format!("{} with key {}", permission.as_str(), record.id),
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

    /// Operations not tied to one key: creating keys, listing all keys and
    /// aliases, changing policies.
    pub(crate) fn require_admin(&self, meta: &RequestMeta, action: &str) -> Result<()> {
        if self.access.is_admin(&meta.principal) {
            return Ok(());
        }
        tracing::info!(principal = %meta.principal, action, "denied: not an administrator");
        Err(KmsError::PermissionDenied {
            principal: meta.principal.clone(),
            action: action.to_owned(),
        })
    }

    pub(crate) fn require_audit_reader(&self, meta: &RequestMeta, action: &str) -> Result<()> {
        if self.access.may_read_audit(&meta.principal) {
            return Ok(());
        }
        tracing::info!(principal = %meta.principal, action, "denied: not an auditor");
        Err(KmsError::PermissionDenied {
            principal: meta.principal.clone(),
            action: action.to_owned(),
        })
    }

    /// The key's policy, and whether it is the service default (the key has none).
    pub fn get_key_policy(&self, meta: &RequestMeta, key: &str) -> Result<(KeyPolicy, bool)> {
        self.audited(meta, "GetKeyPolicy", Some(key), |audit| {
            let record = self.resolve_for(meta, audit, key, Permission::Describe)?;
            audit.key(&record.id, None);
            Ok(match record.policy {
                Some(policy) => (policy, false),
                None => (self.access.default_policy.clone(), true),
            })
        })
    }

    /// Replaces the key's policy (administrators only). An empty policy
    /// returns the key to the service default.
    pub fn put_key_policy(
        &self,
        meta: &RequestMeta,
        key: &str,
        policy: KeyPolicy,
    ) -> Result<(KeyPolicy, bool)> {
        self.audited(meta, "PutKeyPolicy", Some(key), |audit| {
            let record = self.resolve(key)?;
            audit.key(&record.id, None);
            self.require_admin(meta, &format!("change the policy of key {}", record.id))?;
            validate_policy(&policy)?;
            let _guard = self.key_locks.lock(&record.id);
            let stored = (!policy.grants.is_empty()).then_some(policy);
            let updated =
                self.storage
                    .catalogue()
                    .update_key::<KmsError>(&record.id, now_ms(), |k| {
                        k.policy = stored;
                        Ok(())
                    })?;
            Ok(match updated.policy {
                Some(policy) => (policy, false),
                None => (self.access.default_policy.clone(), true),
            })
        })
    }
}

fn validate_policy(policy: &KeyPolicy) -> Result<()> {
    if policy.grants.len() > MAX_GRANTS {
        return Err(KmsError::invalid(
            "policy.grants",
            format!("at most {MAX_GRANTS} grants"),
        ));
    }
    for Grant {
        principal,
        permissions,
        required_context,
    } in &policy.grants
    {
        if !is_valid_principal(principal) {
            return Err(KmsError::invalid(
                "policy.grants.principal",
                "1 to 1024 printable ASCII characters without spaces ('*' matches any run)",
            ));
        }
        if permissions.is_empty() {
            return Err(KmsError::invalid(
                "policy.grants.permissions",
                format!("grant for {principal} has no permissions"),
            ));
        }
        if required_context.len() > MAX_REQUIRED_CONTEXT
            || required_context
                .iter()
                .any(|(k, v)| k.is_empty() || k.len() > 256 || v.len() > 1024)
        {
            return Err(KmsError::invalid(
                "policy.grants.required_encryption_context",
                format!(
                    "at most {MAX_REQUIRED_CONTEXT} entries, keys 1 to 256 bytes, values up to 1024 bytes"
                ),
            ));
        }
    }
    Ok(())
}
