//! Audit handlers: list and verify the audit log.

use std::sync::Arc;

use kms_proto::v1 as pb;
use kms_proto::v1::audit_server::Audit;
use kms_storage::AuditFilter;
use tonic::{Request, Response, Status};

use super::convert::{audit_event, micros_of};
use super::{Rpc, page_size, page_token};
use crate::service::{AuditQuery, KmsService, Operation, operation};

/// The Audit service.
#[derive(Debug, Clone)]
pub struct AuditApi {
    service: Arc<KmsService>,
}

impl AuditApi {
    pub fn new(service: Arc<KmsService>) -> Self {
        AuditApi { service }
    }
}

#[tonic::async_trait]
impl Audit for AuditApi {
    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        let rpc = Rpc::start(Operation::ListAuditEvents, &request)?;
        let req = request.into_inner();
        let operation = match pb::Operation::try_from(req.operation) {
            Ok(pb::Operation::Unspecified) => None,
            Ok(op) => Some(operation::name(op).to_owned()),
            Err(_) => return Err(Status::invalid_argument("invalid operation")),
        };
        let after = match page_token(&req.page_token) {
            None => None,
            Some(t) => Some(t.parse::<u64>().map_err(|_| {
                Status::invalid_argument("invalid page_token: not a token from a previous page")
            })?),
        };
        let query = AuditQuery {
            filter: AuditFilter {
                from_micros: req.start_time.as_ref().map(micros_of).transpose()?,
                to_micros: req.end_time.as_ref().map(micros_of).transpose()?,
                key_id: page_token(&req.key_id).map(str::to_owned),
                principal: page_token(&req.principal).map(str::to_owned),
                operation,
            },
            after,
            limit: page_size(req.page_size)?,
        };
        let page = rpc
            .blocking(&self.service, move |s, m| s.list_audit_events(m, &query))
            .await?;
        rpc.respond(pb::ListAuditEventsResponse {
            events: page.records.iter().map(audit_event).collect(),
            next_page_token: page.next_after.map(|a| a.to_string()).unwrap_or_default(),
        })
    }

    type WatchAuditEventsStream = tokio_stream::wrappers::ReceiverStream<
        Result<pb::WatchAuditEventsResponse, Status>,
    >;

    async fn watch_audit_events(
        &self,
        _request: Request<pb::WatchAuditEventsRequest>,
    ) -> Result<Response<Self::WatchAuditEventsStream>, Status> {
        Err(Status::unimplemented("not yet"))
    }

    async fn verify_audit_log(
        &self,
        request: Request<pb::VerifyAuditLogRequest>,
    ) -> Result<Response<pb::VerifyAuditLogResponse>, Status> {
        let rpc = Rpc::start(Operation::VerifyAuditLog, &request)?;
        let verification = rpc
            .blocking(&self.service, move |s, m| s.verify_audit_log(m, None))
            .await?;
        let report = verification.report;
        let (first_invalid_sequence, failure_reason) = match &report.failure {
            Some(f) => (f.seq, format!("{:?}", f.reason)),
            None => (0, String::new()),
        };
        rpc.respond(pb::VerifyAuditLogResponse {
            valid: report.is_ok(),
            events_verified: report.records,
            checkpoints_verified: report.checkpoints_verified,
            last_sequence: report.last_good_seq,
            head_hash: report.head_hash.to_vec(),
            first_invalid_sequence,
            failure_reason,
        })
    }
}
