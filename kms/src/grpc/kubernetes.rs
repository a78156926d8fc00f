//! The Kubernetes KMS v2 plugin door (`v2.KeyManagementService`, served on
//! the Unix sockets of `[[kubernetes]]` entries by `server::kubernetes`):
//! authentication by peer credentials ([`PeerCredLayer`]) and thin handlers
//! over the domain service's plugin operations (`service::kubernetes`).
//!
//! Callers are identified by the kernel, not by anything they send: the
//! socket's `SO_PEERCRED` uid becomes the principal `unix:uid=<uid>` (what
//! key policies match), the gid and pid go to the audit record's peer
//! (`unix:gid=<gid>,pid=<pid>`). The request's `uid` is the request id.
//! Requests and replies carrying the DEK seed have a redacted Debug and are
//! never logged.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use kms_proto::kubernetes_v2 as k8s;
use kms_proto::kubernetes_v2::key_management_service_server::KeyManagementService;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use super::Rpc;
use super::auth_layer::{Authenticated, refuse};
use crate::auth::admission::Admission;
use crate::service::kubernetes::{KubernetesDecryptInput, PluginKeyId, StatusCache};
use crate::service::{KmsService, Operation, RequestMeta};

/// The plugin API version Status reports (`StatusResponse.version`).
pub const PLUGIN_API_VERSION: &str = "v2";
/// What Status reports as `healthz` when healthy (kube-apiserver treats any
/// other value as failing and shows it).
pub const HEALTHZ_OK: &str = "ok";

/// The audit principal of a caller with peer uid `uid`.
pub fn unix_principal(uid: u32) -> String {
    format!("unix:uid={uid}")
}

/// The rest of a caller's peer credentials, for the audit record's peer
/// (in the request extensions, set by [`PeerCredLayer`]).
#[derive(Debug, Clone, Copy)]
pub struct UnixPeer {
    pub gid: u32,
    /// None where the platform does not report it.
    pub pid: Option<i32>,
}

impl UnixPeer {
    fn label(self) -> String {
        match self.pid {
            Some(pid) => format!("unix:gid={},pid={pid}", self.gid),
            None => format!("unix:gid={}", self.gid),
        }
    }
}

/// One plugin listener's service: the configured key (id or alias) and its
/// Status cache.
#[derive(Debug, Clone)]
pub struct KubernetesApi {
    service: Arc<KmsService>,
    key: Arc<str>,
    status: Arc<StatusCache>,
}

impl KubernetesApi {
    /// The plugin service of one listener, for `key` (a key id or
    /// `alias/<name>`, resolved on every call).
    pub fn new(service: Arc<KmsService>, key: &str) -> Self {
        KubernetesApi {
            service,
            key: Arc::from(key),
            status: Arc::new(StatusCache::default()),
        }
    }
}

type Reply<T> = Result<Response<T>, Status>;

/// The RPC's audit identity: the principal [`PeerCredLayer`] established,
/// the rest of the peer credentials, and the request's `uid` as its id (if
/// sane; else a generated one).
fn start<T>(operation: Operation, request: &Request<T>, uid: Option<&str>) -> Result<Rpc, Status> {
    let principal = request
        .extensions()
        .get::<Authenticated>()
        .map(|a| a.principal.clone())
        .ok_or_else(|| Status::unauthenticated("missing peer credentials"))?;
    let peer = request
        .extensions()
        .get::<UnixPeer>()
        .map_or_else(|| "unix:unknown".to_owned(), |p| p.label());
    let request_id = uid
        .filter(|uid| super::is_sane_request_id(uid))
        .map_or_else(super::new_request_id, str::to_owned);
    Ok(Rpc::with_meta(
        operation,
        RequestMeta {
            principal,
            peer,
            request_id,
        },
    ))
}

#[tonic::async_trait]
impl KeyManagementService for KubernetesApi {
    async fn status(&self, request: Request<k8s::StatusRequest>) -> Reply<k8s::StatusResponse> {
        let rpc = start(Operation::KubernetesStatus, &request, None)?;
        let key = Arc::clone(&self.key);
        let cache = Arc::clone(&self.status);
        // The probe's failure is the answer (healthz), not an RPC error.
        let outcome = rpc
            .blocking(&self.service, move |s, m| {
                Ok(s.kubernetes_status(m, &key, &cache))
            })
            .await?;
        let (healthz, key_id) = match outcome {
            Ok(id) => (HEALTHZ_OK.to_owned(), id.to_string()),
            // Logged once here; the message is caller-safe (generic for
            // INTERNAL and UNAVAILABLE).
            Err(e) => (
                rpc.fail(e).message().to_owned(),
                self.status
                    .last_known()
                    .map(|id| id.to_string())
                    .unwrap_or_default(),
            ),
        };
        rpc.respond(k8s::StatusResponse {
            version: PLUGIN_API_VERSION.to_owned(),
            healthz,
            key_id,
        })
    }

    async fn decrypt(&self, request: Request<k8s::DecryptRequest>) -> Reply<k8s::DecryptResponse> {
        let rpc = start(
            Operation::KubernetesDecrypt,
            &request,
            Some(&request.get_ref().uid),
        )?;
        let req = request.into_inner();
        let input = KubernetesDecryptInput {
            ciphertext: req.ciphertext,
            key_id: req.key_id,
            annotations: req.annotations,
        };
        let decrypted = rpc
            .key_use(&self.service, move |s, m| s.kubernetes_decrypt(m, input))
            .await?;
        rpc.respond(k8s::DecryptResponse {
            // The message owns the bytes from here (prost cannot hold a
            // zeroizing buffer); tonic encodes and drops it.
            plaintext: decrypted.plaintext.to_vec(),
        })
    }

    async fn encrypt(&self, request: Request<k8s::EncryptRequest>) -> Reply<k8s::EncryptResponse> {
        let rpc = start(
            Operation::KubernetesEncrypt,
            &request,
            Some(&request.get_ref().uid),
        )?;
        let plaintext = Zeroizing::new(request.into_inner().plaintext);
        let key = Arc::clone(&self.key);
        let encrypted = rpc
            .key_use(&self.service, move |s, m| {
                s.kubernetes_encrypt(m, &key, plaintext)
            })
            .await?;
        let key_id = PluginKeyId {
            key_id: encrypted.key_id,
            version: encrypted.key_version,
        };
        rpc.respond(k8s::EncryptResponse {
            ciphertext: encrypted.blob,
            key_id: key_id.to_string(),
            // kms returns no annotations: the blob describes itself.
            annotations: Default::default(),
        })
    }
}

/// Authentication and admission on a plugin socket, before any handler:
/// the connection's peer credentials (read by the kernel when the
/// connection was accepted) become the principal and the [`UnixPeer`], and
/// the server's admission limits apply as on the TCP listener. A
/// connection without peer credentials is refused UNAUTHENTICATED; like the
/// TCP listener's refusals, these are logged, not audited.
#[derive(Debug, Clone)]
pub struct PeerCredLayer {
    admission: Arc<Admission>,
}

impl PeerCredLayer {
    /// Authenticates by peer credentials and admits under `admission` (the
    /// server's limits, shared with the TCP listener).
    pub fn new(admission: Arc<Admission>) -> Self {
        PeerCredLayer { admission }
    }
}

impl<S> tower::Layer<S> for PeerCredLayer {
    type Service = PeerCredService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        PeerCredService {
            inner,
            admission: Arc::clone(&self.admission),
        }
    }
}

/// The service [`PeerCredLayer`] wraps around the plugin router.
#[derive(Debug, Clone)]
pub struct PeerCredService<S> {
    inner: S,
    admission: Arc<Admission>,
}

impl<S, B, R> tower::Service<http::Request<B>> for PeerCredService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default + Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let credentials = request
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|info| info.peer_cred);
        let Some(credentials) = credentials else {
            tracing::info!(
                path = request.uri().path(),
                "plugin socket request without peer credentials refused"
            );
            return refuse(Status::unauthenticated("no peer credentials"));
        };
        let principal = unix_principal(credentials.uid());
        let permit = match self.admission.admit(&principal) {
            Ok(permit) => permit,
            Err(refusal) => {
                tracing::info!(principal = %principal, reason = %refusal, "request not admitted");
                return refuse(Status::resource_exhausted(refusal.to_string()));
            }
        };
        request.extensions_mut().insert(UnixPeer {
            gid: credentials.gid(),
            pid: credentials.pid(),
        });
        request.extensions_mut().insert(Authenticated { principal });
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await;
            drop(permit);
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principals_and_peers_name_the_credentials() {
        assert_eq!(unix_principal(0), "unix:uid=0");
        assert_eq!(unix_principal(65534), "unix:uid=65534");
        let peer = UnixPeer {
            gid: 1000,
            pid: Some(4242),
        };
        assert_eq!(peer.label(), "unix:gid=1000,pid=4242");
        assert_eq!(UnixPeer { gid: 5, pid: None }.label(), "unix:gid=5");
    }
}
