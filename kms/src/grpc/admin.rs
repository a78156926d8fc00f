//! Admin handlers: operator actions on the running server (configuration
//! reload, root keys, backups). Administrators only; every call is audited (see
//! `server::reload::Reloader::reload_audited`, `service::root_rotation`).

use std::sync::Arc;

use kms_proto::v1 as pb;
use kms_proto::v1::admin_server::Admin;
use tonic::{Request, Response, Status};

use super::Rpc;
use crate::server::reload::{Reloader, Trigger};
use crate::service::root_rotation::RootsReport;
use crate::service::{KmsService, Operation};

/// The Admin service.
#[derive(Debug, Clone)]
pub struct AdminApi {
    service: Arc<KmsService>,
    reloader: Arc<Reloader>,
}

impl AdminApi {
    pub fn new(service: Arc<KmsService>, reloader: Arc<Reloader>) -> Self {
        AdminApi { service, reloader }
    }
}

/// A count for the reply (saturating: counts are small in practice).
fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[tonic::async_trait]
impl Admin for AdminApi {
    async fn reload(
        &self,
        request: Request<pb::ReloadRequest>,
    ) -> Result<Response<pb::ReloadResponse>, Status> {
        let rpc = Rpc::start(Operation::Reload, &request)?;
        let reloader = Arc::clone(&self.reloader);
        let summary = rpc
            .blocking(&self.service, move |service, meta| {
                reloader.reload_audited(service, meta, Trigger::Request)
            })
            .await?;
        rpc.respond(pb::ReloadResponse {
            config_file: summary.config_file.display().to_string(),
            tls: summary.tls,
            crl_count: count(summary.crl_count),
            token_count: count(summary.token_count),
            admin_count: count(summary.admin_count),
            restart_required: summary
                .restart_required
                .iter()
                .map(|name| (*name).to_owned())
                .collect(),
            active_root_epoch: summary.active_root_epoch.unwrap_or(0),
            root_refused: summary.root_refused.unwrap_or_default(),
        })
    }

    async fn list_roots(
        &self,
        request: Request<pb::ListRootsRequest>,
    ) -> Result<Response<pb::ListRootsResponse>, Status> {
        let rpc = Rpc::start(Operation::ListRoots, &request)?;
        let report = rpc
            .blocking(&self.service, |service, meta| service.list_roots(meta))
            .await?;
        rpc.respond(roots_response(report))
    }

    async fn destroy_root(
        &self,
        request: Request<pb::DestroyRootRequest>,
    ) -> Result<Response<pb::DestroyRootResponse>, Status> {
        let rpc = Rpc::start(Operation::DestroyRoot, &request)?;
        let epoch = request.get_ref().epoch;
        let active_epoch = rpc
            .blocking(&self.service, move |service, meta| {
                service.destroy_root(meta, epoch)
            })
            .await?;
        rpc.respond(pb::DestroyRootResponse {
            epoch,
            active_epoch,
        })
    }

    async fn create_backup(
        &self,
        request: Request<pb::CreateBackupRequest>,
    ) -> Result<Response<pb::CreateBackupResponse>, Status> {
        let rpc = Rpc::start(Operation::CreateBackup, &request)?;
        let out_dir = request.into_inner().out_dir;
        let created = rpc
            .blocking(&self.service, move |service, meta| {
                service.create_backup(meta, &out_dir)
            })
            .await?;
        let manifest = &created.manifest;
        rpc.respond(pb::CreateBackupResponse {
            out_dir: created.dir.display().to_string(),
            backup_id: created.id.clone(),
            created_unix_ms: manifest.created_unix_ms,
            audit_head_sequence: manifest.audit_head_seq,
            audit_head_hash: hex::decode(&manifest.audit_head_hash).unwrap_or_default(),
            root_epochs: manifest.root_epochs.clone(),
            files: manifest.files.len() as u64,
            bytes: created.bytes(),
        })
    }
}

/// The wire form of the roots report.
fn roots_response(report: RootsReport) -> pb::ListRootsResponse {
    pb::ListRootsResponse {
        active_epoch: report.active_epoch,
        variant: match report.variant {
            kms_hsm::RootVariant::Trusted => "trusted",
            kms_hsm::RootVariant::NonExtractable => "non-extractable",
            _ => "unknown",
        }
        .to_owned(),
        roots: report
            .roots
            .into_iter()
            .map(|r| pb::RootEpoch {
                epoch: r.epoch,
                present_in_hsm: r.present_in_hsm,
                active: r.active,
                versions: r.versions,
                destroyed_versions: r.destroyed_versions,
                service_keys: r.service_keys,
            })
            .collect(),
    }
}
