//! Admin handlers: operator actions on the running server (configuration
//! reload). Administrators only; every call is audited (see
//! `server::reload::Reloader::reload_audited`).

use std::sync::Arc;

use kms_proto::v1 as pb;
use kms_proto::v1::admin_server::Admin;
use tonic::{Request, Response, Status};

use super::Rpc;
use crate::server::reload::{Reloader, Trigger};
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
        })
    }
}
