//! Authorization inside the domain operations: every check runs inside the
//! operation's `audited` closure, so a denial is an audit record with the
//! principal, the operation and the key, like any other outcome.
//!
//! Decrypt and ReEncrypt authorize against the key named inside the blob,
//! never the one the caller names (see `crypto.rs`).

use kms_storage::{Grant, KeyPolicy, KeyRecord, Permission};

use super::operation::Operation;
use super::{KmsService, RequestMeta, now_ms};
use crate::auth::is_valid_principal;
use crate::encryption_context::EncryptionContext;
use crate::error::{KmsError, Result};

/// The policy that governs a key: its own, or the service default.
#[derive(Debug, Clone)]
pub enum EffectivePolicy {
    /// The key has its own policy.
    Own(KeyPolicy),
    /// The key has none; the service default (configuration) applies.
    Default(KeyPolicy),
}

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

    fn effective_policy(&self, own: Option<KeyPolicy>) -> EffectivePolicy {
        match own {
            Some(policy) => EffectivePolicy::Own(policy),
            None => EffectivePolicy::Default(self.access.default_policy()),
        }
    }

    /// The key's policy, or the service default if it has none.
    pub fn get_key_policy(&self, meta: &RequestMeta, key: &str) -> Result<EffectivePolicy> {
        self.audited(meta, Operation::GetKeyPolicy, Some(key), |audit| {
            let record = self.resolve_for(meta, audit, key, Permission::Describe)?;
            audit.key(&record.id, None);
            Ok(self.effective_policy(record.policy))
        })
    }

    /// Replaces the key's policy (administrators only). An empty policy
    /// returns the key to the service default.
    pub fn put_key_policy(
        &self,
        meta: &RequestMeta,
        key: &str,
        policy: KeyPolicy,
    ) -> Result<EffectivePolicy> {
        self.audited(meta, Operation::PutKeyPolicy, Some(key), |audit| {
            let record = self.resolve(key)?;
            audit.key(&record.id, None);
            self.require_admin(meta, &format!("change the policy of key {}", record.id))?;
            validate_policy(&policy)?;
            let _guard = self.key_locks.lock(&record.id);
            let stored = (!policy.grants.is_empty()).then_some(policy);
            let updated = self
                .catalogue()
                .update_key::<KmsError>(&record.id, now_ms(), |k| {
                    k.policy.clone_from(&stored);
                    Ok(())
                })?;
            Ok(self.effective_policy(updated.policy))
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
