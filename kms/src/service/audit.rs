//! Reading and verifying the audit log. Listing and verifying are themselves
//! audited (who looked at the log is part of the log).

use kms_storage::{AuditFilter, AuditPage, VerifyOptions, VerifyReport, VerifyStart};

use super::operation::Operation;
use super::{KmsService, RequestMeta, audit_mac_key};
use crate::error::{KmsError, Result};

/// Filters of ListAuditEvents.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub filter: AuditFilter,
    /// Continue after this sequence number (from the previous page).
    pub after: Option<u64>,
    pub limit: usize,
}

/// The outcome of VerifyAuditLog.
#[derive(Debug, Clone)]
pub struct AuditVerification {
    pub report: VerifyReport,
}

impl KmsService {
    pub fn list_audit_events(&self, meta: &RequestMeta, query: &AuditQuery) -> Result<AuditPage> {
        self.audited(
            meta,
            Operation::ListAuditEvents,
            query.filter.key_id.as_deref(),
            |_| {
                self.require_audit_reader(meta, "read the audit log")?;
                // Records name keys canonically: a filter by alias means the
                // key the alias points to now. (An unknown alias filters
                // literally, so refused requests that named it can be found.)
                let mut filter = query.filter.clone();
                if let Some(named) = filter.key_id.as_deref()
                    && named.starts_with("alias/")
                    && let Ok(Some(record)) = self.storage.catalogue().resolve_key(named)
                {
                    filter.key_id = Some(record.id.to_string());
                }
                Ok(self
                    .storage
                    .audit_reader()
                    .query(&filter, query.after, query.limit.max(1))?)
            },
        )
    }

    /// Walks the whole chain and checks every checkpoint MAC in the HSM.
    pub fn verify_audit_log(
        &self,
        meta: &RequestMeta,
        from_checkpoint: Option<u64>,
    ) -> Result<AuditVerification> {
        self.audited(meta, Operation::VerifyAuditLog, None, |_| {
            self.require_audit_reader(meta, "verify the audit log")?;
            let report = self.verify_chain(from_checkpoint)?;
            Ok(AuditVerification { report })
        })
    }

    /// Verification without an audit record (for `kms audit verify` on a
    /// stopped service and for tests).
    pub fn verify_chain(&self, from_checkpoint: Option<u64>) -> Result<VerifyReport> {
        let options = VerifyOptions {
            start: from_checkpoint.map_or(VerifyStart::Genesis, VerifyStart::Checkpoint),
            max_records_between_checkpoints: None,
        };
        let hsm = &self.hsm;
        let key = audit_mac_key();
        let verifier = |message: &[u8], mac: &[u8]| {
            hsm.hmac_verify(&key, message, mac)
                .map_err(|e| Box::new(e) as kms_storage::CallbackError)
        };
        self.storage
            .audit_reader()
            .verify(&options, &verifier)
            .map_err(|e| match e {
                kms_storage::StorageError::CheckpointVerifier { source, .. } => {
                    KmsError::HsmUnavailable {
                        source: source.downcast::<kms_hsm::HsmError>().ok().map(|e| *e),
                    }
                }
                other => other.into(),
            })
    }

    /// Writes the audit log as JSON lines.
    pub fn export_audit(&self, filter: &AuditFilter, out: &mut dyn std::io::Write) -> Result<u64> {
        Ok(self.storage.audit_reader().export_jsonl(filter, out)?)
    }
}
