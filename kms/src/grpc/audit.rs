//! Audit handlers: list, follow (WatchAuditEvents) and verify the audit log.
//! Followers are tasks that end when their client goes away or the server
//! stops (see [`WatchStop`]), never holding a shutdown open.

use std::sync::Arc;

use kms_proto::v1 as pb;
use kms_proto::v1::audit_server::Audit;
use kms_storage::AuditFilter;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::convert::{audit_event, micros_of, witness_check, witnessed_head, witnessed_head_of};
use super::{Rpc, page_size, page_token};
use crate::error::KmsError;
use crate::service::{AuditFollower, AuditQuery, KmsService, Operation, operation};

/// Events a follower reads from the log at a time.
const WATCH_BATCH: usize = 256;
/// Events buffered per follower stream before it waits for its client.
const WATCH_BUFFER: usize = 256;

/// ListAuditEventsRequest as a query.
///
/// # Errors
/// INVALID_ARGUMENT for an unknown operation, a negative page size or a
/// malformed time. (The page token and the sequence range are checked by the
/// service.)
fn audit_query(req: &pb::ListAuditEventsRequest) -> Result<AuditQuery, KmsError> {
    let operation = match pb::Operation::try_from(req.operation) {
        Ok(pb::Operation::Unspecified) => None,
        Ok(op) => Some(operation::name(op).to_owned()),
        Err(_) => return Err(KmsError::invalid("operation", "not a known operation")),
    };
    Ok(AuditQuery {
        filter: AuditFilter {
            from_micros: req.start_time.as_ref().map(micros_of).transpose()?,
            to_micros: req.end_time.as_ref().map(micros_of).transpose()?,
            key_id: page_token(&req.key_id).map(str::to_owned),
            principal: page_token(&req.principal).map(str::to_owned),
            operation,
        },
        from_sequence: (req.from_sequence != 0).then_some(req.from_sequence),
        to_sequence: (req.to_sequence != 0).then_some(req.to_sequence),
        // Decoded and checked by the service, inside the audited path.
        page_token: page_token(&req.page_token).map(str::to_owned),
        limit: page_size(req.page_size)?,
    })
}

/// The Audit service.
#[derive(Debug, Clone)]
pub struct AuditApi {
    service: Arc<KmsService>,
    stop: Arc<watch::Sender<bool>>,
    /// Bumped on every reload that may have revoked a credential or a role.
    reloads: Arc<watch::Sender<u64>>,
}

/// Ends every WatchAuditEvents stream of one [`AuditApi`] (with UNAVAILABLE,
/// so that clients reconnect and resume): the server calls it when it starts
/// to shut down, since a graceful shutdown waits for open streams and a
/// follower's stream would otherwise never end.
#[derive(Debug, Clone)]
pub struct WatchStop(Arc<watch::Sender<bool>>);

impl WatchStop {
    /// Ends the streams (now and any opened later).
    pub fn stop(&self) {
        self.0.send_replace(true);
    }
}

/// Ends every open WatchAuditEvents stream of one [`AuditApi`] (with
/// UNAVAILABLE, so that clients reconnect, are authenticated and authorized
/// again, and resume): a stream is authorized once, when it opens, and must
/// not outlive a bearer token, certificate (CRL) or auditor role that a
/// reload took away. The reloader calls it after every successful reload.
#[derive(Debug, Clone)]
pub struct WatchRevoke(Arc<watch::Sender<u64>>);

impl WatchRevoke {
    /// Ends the streams open now (streams opened later are not affected).
    pub fn revoke(&self) {
        self.0
            .send_modify(|generation| *generation = generation.wrapping_add(1));
    }
}

/// Completes when `reloads` changes (never, if its sender is gone).
async fn reloaded(mut reloads: watch::Receiver<u64>) {
    if reloads.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

impl AuditApi {
    pub fn new(service: Arc<KmsService>) -> Self {
        AuditApi {
            service,
            stop: Arc::new(watch::Sender::new(false)),
            reloads: Arc::new(watch::Sender::new(0)),
        }
    }

    /// The handle that ends this service's open WatchAuditEvents streams
    /// after a reload.
    pub fn watch_revoke(&self) -> WatchRevoke {
        WatchRevoke(Arc::clone(&self.reloads))
    }

    /// The handle that ends this service's WatchAuditEvents streams.
    pub fn watch_stop(&self) -> WatchStop {
        WatchStop(Arc::clone(&self.stop))
    }
}

/// Completes once `stop` says so (or its sender is gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    loop {
        let now = *stop.borrow_and_update();
        if now || stop.changed().await.is_err() {
            return;
        }
    }
}

/// Feeds one WatchAuditEvents stream until its client goes away, the server
/// stops, or reading fails (then the stream ends with that status).
async fn follow(
    rpc: Rpc,
    mut follower: AuditFollower,
    tx: mpsc::Sender<Result<pb::WatchAuditEventsResponse, Status>>,
    stop: watch::Receiver<bool>,
    reloads: watch::Receiver<u64>,
) {
    let stopped = stopped(stop);
    tokio::pin!(stopped);
    let reloaded = reloaded(reloads);
    tokio::pin!(reloaded);
    let revoked = || {
        Status::unavailable(
            "the server's credentials and roles were reloaded: reconnect and resume",
        )
    };
    let shutting_down = || Status::unavailable("the server is shutting down: reconnect and resume");
    loop {
        let batch = tokio::select! {
            batch = follower.next_batch(WATCH_BATCH) => batch,
            () = &mut stopped => {
                let _ = tx.try_send(Err(shutting_down()));
                return;
            }
            () = &mut reloaded => {
                let _ = tx.try_send(Err(revoked()));
                return;
            }
            () = tx.closed() => return,
        };
        let records = match batch {
            Ok(records) => records,
            Err(e) => {
                let _ = tx.try_send(Err(rpc.fail(e)));
                return;
            }
        };
        for record in &records {
            let message = pb::WatchAuditEventsResponse {
                event: Some(audit_event(record)),
            };
            tokio::select! {
                sent = tx.send(Ok(message)) => if sent.is_err() { return },
                () = &mut stopped => {
                    let _ = tx.try_send(Err(shutting_down()));
                    return;
                }
                () = &mut reloaded => {
                    let _ = tx.try_send(Err(revoked()));
                    return;
                }
            }
        }
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
        let converted = audit_query(&req);
        let query = rpc.valid(&self.service, &req.key_id, converted).await?;
        let page = rpc
            .blocking(&self.service, move |s, m| s.list_audit_events(m, &query))
            .await?;
        rpc.respond(pb::ListAuditEventsResponse {
            events: page.records.iter().map(audit_event).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
            node_id: self.service.node_id().unwrap_or_default().to_owned(),
        })
    }

    type WatchAuditEventsStream =
        tokio_stream::wrappers::ReceiverStream<Result<pb::WatchAuditEventsResponse, Status>>;

    async fn watch_audit_events(
        &self,
        request: Request<pb::WatchAuditEventsRequest>,
    ) -> Result<Response<Self::WatchAuditEventsStream>, Status> {
        let rpc = Rpc::start(Operation::WatchAuditEvents, &request)?;
        let from = request.into_inner().from_sequence;
        let follower = rpc
            .blocking(&self.service, move |s, m| s.watch_audit_events(m, from))
            .await?;
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let response = rpc.respond(ReceiverStream::new(rx))?;
        let span = rpc.span();
        tokio::spawn(
            follow(
                rpc,
                follower,
                tx,
                self.stop.subscribe(),
                self.reloads.subscribe(),
            )
            .instrument(span),
        );
        Ok(response)
    }

    async fn verify_audit_log(
        &self,
        request: Request<pb::VerifyAuditLogRequest>,
    ) -> Result<Response<pb::VerifyAuditLogResponse>, Status> {
        let rpc = Rpc::start(Operation::VerifyAuditLog, &request)?;
        let req = request.into_inner();
        let converted = req
            .witnessed_for_node
            .iter()
            .map(witnessed_head_of)
            .collect::<Result<Vec<_>, _>>();
        let heads = rpc.valid(&self.service, "", converted).await?;
        let verification = rpc
            .blocking(&self.service, move |s, m| {
                s.verify_audit_log(m, None, &heads)
            })
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
            node_id: verification.node_id.unwrap_or_default(),
            witnessed_heads: report.witnessed.iter().map(witnessed_head).collect(),
            witness_checks: verification
                .witness_checks
                .iter()
                .map(witness_check)
                .collect(),
        })
    }
}
