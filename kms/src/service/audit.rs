//! Reading, following and verifying the audit log. Listing, watching and
//! verifying are themselves audited (who looked at the log is part of the
//! log): a listing once per page, a watch once per stream (never per event
//! delivered, or a follower would feed itself forever).

use kms_storage::{
    AuditFilter, AuditReader, AuditRecord, StorageError, VerifyOptions, VerifyReport, VerifyStart,
};

use super::operation::Operation;
use super::page_token::{self, Listing};
use super::{KmsService, RequestMeta};
use crate::error::{KmsError, Result};

/// Filters and position of one ListAuditEvents page.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub filter: AuditFilter,
    /// Only records with this sequence number or a later one (`None`: from 1).
    pub from_sequence: Option<u64>,
    /// Only records with this sequence number or an earlier one (`None`: up
    /// to the last record that exists at the first page).
    pub to_sequence: Option<u64>,
    /// The previous page's `next_page_token`; `None` for the first page.
    pub page_token: Option<String>,
    /// Most records per page (clamped to 1..=[`kms_storage::MAX_PAGE_SIZE`]).
    pub limit: usize,
}

impl AuditQuery {
    /// What a page token is bound to: every filter, as the request named it.
    fn scope(&self) -> [Vec<u8>; 7] {
        let opt = |v: Option<u64>| v.map_or_else(Vec::new, |v| v.to_be_bytes().to_vec());
        let text = |v: &Option<String>| v.as_deref().unwrap_or_default().as_bytes().to_vec();
        [
            text(&self.filter.key_id),
            text(&self.filter.principal),
            text(&self.filter.operation),
            opt(self.filter.from_micros),
            opt(self.filter.to_micros),
            opt(self.from_sequence),
            opt(self.to_sequence),
        ]
    }
}

/// One page of ListAuditEvents.
#[derive(Debug, Clone)]
pub struct AuditListing {
    /// The matching records, in sequence order.
    pub records: Vec<AuditRecord>,
    /// Where the next page starts; `None` on the last page.
    pub next_page_token: Option<String>,
}

/// A follower of the audit log (WatchAuditEvents): yields every record from
/// its starting sequence on, in order, without gaps or duplicates, waiting
/// for the audit writer to commit new ones (it is woken by the writer; it
/// never polls).
#[derive(Debug)]
pub struct AuditFollower {
    reader: AuditReader,
    committed: tokio::sync::watch::Receiver<u64>,
    next: u64,
}

impl AuditFollower {
    /// The sequence number of the next record this follower yields.
    pub fn next_sequence(&self) -> u64 {
        self.next
    }

    /// The next records, at most `limit` (at least one), waiting until the
    /// record with [`AuditFollower::next_sequence`] is durable. Cancel-safe:
    /// dropping the future before it completes loses nothing.
    ///
    /// # Errors
    ///
    /// [`KmsError::AuditUnavailable`] once the audit writer has stopped (the
    /// service is shutting down); [`KmsError::Storage`] if reading the log
    /// fails or it has a hole where a committed record should be.
    pub async fn next_batch(&mut self, limit: usize) -> Result<Vec<AuditRecord>> {
        loop {
            let head = *self.committed.borrow_and_update();
            if head >= self.next {
                let reader = self.reader.clone();
                let after = self.next - 1;
                let page = tokio::task::spawn_blocking(move || {
                    reader.query_range(&AuditFilter::default(), Some(after), head, limit)
                })
                .await
                .map_err(|_| KmsError::AuditUnavailable { source: None })??;
                // Sequence numbers are dense and a batch is written whole, so
                // everything up to `head` is there; a hole is corruption, not
                // something to skip silently.
                let expected = self.next;
                if page.records.first().map(|r| r.seq) != Some(expected)
                    || page
                        .records
                        .windows(2)
                        .any(|pair| pair[1].seq != pair[0].seq + 1)
                {
                    return Err(StorageError::Corrupt {
                        cf: "audit",
                        key_hex: hex::encode(expected.to_be_bytes()),
                        reason: "gap in the audit log",
                    }
                    .into());
                }
                if let Some(last) = page.records.last() {
                    self.next = last.seq + 1;
                }
                return Ok(page.records);
            }
            if self.committed.changed().await.is_err() {
                return Err(KmsError::AuditUnavailable {
                    source: Some(StorageError::AuditClosed),
                });
            }
        }
    }
}

/// The outcome of VerifyAuditLog.
#[derive(Debug, Clone)]
pub struct AuditVerification {
    pub report: VerifyReport,
}

impl KmsService {
    /// One page of the records matching `query`, in sequence order. The
    /// listing is bounded at its first page: it returns only records that
    /// existed then (the token carries the last sequence number that existed),
    /// so paging terminates although each page is itself recorded.
    ///
    /// # Errors
    ///
    /// [`KmsError::PermissionDenied`] unless the caller is an auditor or an
    /// administrator; [`KmsError::InvalidArgument`] for a `to_sequence` below
    /// `from_sequence` or a page token not issued for these filters;
    /// storage errors as [`KmsError::Storage`].
    pub fn list_audit_events(
        &self,
        meta: &RequestMeta,
        query: &AuditQuery,
    ) -> Result<AuditListing> {
        self.audited(
            meta,
            Operation::ListAuditEvents,
            query.filter.key_id.as_deref(),
            |_| {
                self.require_audit_reader(meta, "read the audit log")?;
                if let (Some(from), Some(to)) = (query.from_sequence, query.to_sequence)
                    && to < from
                {
                    return Err(KmsError::invalid(
                        "to_sequence",
                        "smaller than from_sequence",
                    ));
                }
                let reader = self.storage.audit_reader();
                let scope = query.scope();
                let scope: Vec<&[u8]> = scope.iter().map(Vec::as_slice).collect();
                let (after, until) = match query.page_token.as_deref() {
                    Some(token) => {
                        let (after, until) =
                            page_token::decode(token, Listing::AuditEvents, &scope, |r| {
                                Some((r.u64()?, r.u64()?))
                            })?;
                        // A bound beyond the log's end was not written by a
                        // first page: refusing it keeps paging finite.
                        if until > reader.last_seq()? || after > until {
                            return Err(KmsError::invalid(
                                "page_token",
                                "not a token from a previous page",
                            ));
                        }
                        (after, until)
                    }
                    // The records up to here existed before this request;
                    // its own record comes after them.
                    None => (
                        query.from_sequence.unwrap_or(1).saturating_sub(1),
                        query
                            .to_sequence
                            .unwrap_or(u64::MAX)
                            .min(reader.last_seq()?),
                    ),
                };
                // Records name keys canonically: a filter by alias means the
                // key the alias points to now. (An unknown alias filters
                // literally, so refused requests that named it can be found.)
                let mut filter = query.filter.clone();
                if let Some(named) = filter.key_id.as_deref()
                    && named.starts_with("alias/")
                    && let Ok(Some(record)) = self.catalogue().resolve_key(named)
                {
                    filter.key_id = Some(record.id.to_string());
                }
                let page = reader.query_range(&filter, Some(after), until, query.limit.max(1))?;
                Ok(AuditListing {
                    records: page.records,
                    next_page_token: page.next_after.map(|after| {
                        page_token::encode(Listing::AuditEvents, &scope, |w| {
                            w.u64(after).u64(until);
                        })
                    }),
                })
            },
        )
    }

    /// Opens a follower of the audit log from `from_sequence` (0 means 1),
    /// after the same authorization as ListAuditEvents. Audited once, here:
    /// the records the follower then yields are not.
    ///
    /// # Errors
    ///
    /// [`KmsError::PermissionDenied`] unless the caller is an auditor or an
    /// administrator.
    pub fn watch_audit_events(
        &self,
        meta: &RequestMeta,
        from_sequence: u64,
    ) -> Result<AuditFollower> {
        self.audited(meta, Operation::WatchAuditEvents, None, |_| {
            self.require_audit_reader(meta, "watch the audit log")?;
            Ok(AuditFollower {
                reader: self.storage.audit_reader(),
                committed: self.audit_log.subscribe(),
                next: from_sequence.max(1),
            })
        })
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
        let key = &self.checkpoint_key;
        let verifier = |message: &[u8], mac: &[u8]| {
            key.verify(hsm, message, mac)
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
