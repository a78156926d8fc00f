//! gRPC health (`grpc.health.v1`) that follows the real dependencies: a
//! thread probes the HSM and the audit log every [`PROBE_INTERVAL`] and
//! updates tonic-health's reporter when the answer changes.
//!
//! What each status means:
//! - `kms.v1.Crypto` and the overall server (`""`) are `NOT_SERVING` while
//!   the HSM is unreachable or the audit log is poisoned: every Crypto call
//!   needs both, and the service exists to do crypto, so a load balancer
//!   checking the server as a whole should route away from it too.
//! - On a cluster node whose key catalogue view cannot be proven recent
//!   (no linearizable etcd read within Δ), everything but `kms.v1.Audit`
//!   is `NOT_SERVING`: key use and key management both fail closed.
//! - `kms.v1.KeyManagement` and `kms.v1.Audit` are `NOT_SERVING` only while
//!   the audit log is poisoned (every one of their calls is audited). While
//!   the HSM alone is down they keep answering reads (describe, list,
//!   audit listing); calls that need the HSM fail with UNAVAILABLE one by one.
//!
//! The probe never logs secrets; it logs each change of status once.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use kms_proto::v1::audit_server::AuditServer;
use kms_proto::v1::crypto_server::CryptoServer;
use kms_proto::v1::key_management_server::KeyManagementServer;
use tonic::server::NamedService;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::grpc::{AuditApi, CryptoApi, KeyManagementApi};
use crate::service::{KmsService, Readiness};

/// How often the dependencies are probed. Each probe is one token search
/// in the HSM (it reads the token's storage, which a cached-handle
/// encryption would not) and one atomic load of the audit writer's state.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// The statuses that follow from one probe, per service name.
fn statuses(readiness: Readiness) -> [(&'static str, ServingStatus); 4] {
    let status = |serving: bool| {
        if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        }
    };
    let everything =
        readiness.hsm_available && readiness.audit_writable && readiness.catalogue_fresh;
    [
        ("", status(everything)),
        (CryptoServer::<CryptoApi>::NAME, status(everything)),
        (
            KeyManagementServer::<KeyManagementApi>::NAME,
            status(readiness.audit_writable && readiness.catalogue_fresh),
        ),
        (
            AuditServer::<AuditApi>::NAME,
            status(readiness.audit_writable),
        ),
    ]
}

/// Probes once and sets every status from the result, so that the server
/// never answers SERVING before anything was checked. Returns what it found,
/// for [`spawn`].
pub async fn report_first(reporter: &HealthReporter, service: &Arc<KmsService>) -> Readiness {
    let probe_service = Arc::clone(service);
    let first = tokio::task::spawn_blocking(move || probe_service.readiness())
        .await
        .unwrap_or(Readiness {
            hsm_available: false,
            audit_writable: false,
            catalogue_fresh: false,
        });
    for (name, status) in statuses(first) {
        reporter.set_service_status(name, status).await;
    }
    log_change(None, first);
    first
}

/// Starts the thread that keeps the statuses current, probing every
/// `interval`, until `stop` is set (unpark the thread to stop it at once).
///
/// The probe is blocking work (an HSM round trip), hence a thread and not a
/// task; the reporter's async setters are driven with the runtime `handle`.
///
/// # Errors
/// The thread could not be started.
pub fn spawn(
    reporter: HealthReporter,
    service: Arc<KmsService>,
    first: Readiness,
    interval: Duration,
    stop: Arc<AtomicBool>,
    handle: tokio::runtime::Handle,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("kms-health".into())
        .spawn(move || {
            let mut last = first;
            loop {
                if crate::background::wait_or_stop(&stop, interval) {
                    return;
                }
                let now = service.readiness();
                if now != last {
                    log_change(Some(last), now);
                    handle.block_on(async {
                        for (name, status) in statuses(now) {
                            reporter.set_service_status(name, status).await;
                        }
                    });
                    last = now;
                }
            }
        })
}

fn log_change(before: Option<Readiness>, now: Readiness) {
    if now.hsm_available && now.audit_writable && now.catalogue_fresh {
        if before.is_some() {
            tracing::info!("dependencies healthy again; health reports SERVING");
        }
    } else {
        tracing::warn!(
            hsm_available = now.hsm_available,
            audit_writable = now.audit_writable,
            catalogue_fresh = now.catalogue_fresh,
            "a dependency is unavailable; health reports NOT_SERVING"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_hsm_outage_takes_crypto_and_the_server_down_and_a_poisoned_log_everything() {
        let hsm_down = statuses(Readiness {
            hsm_available: false,
            audit_writable: true,
            catalogue_fresh: true,
        });
        assert_eq!(
            hsm_down,
            [
                ("", ServingStatus::NotServing),
                ("kms.v1.Crypto", ServingStatus::NotServing),
                ("kms.v1.KeyManagement", ServingStatus::Serving),
                ("kms.v1.Audit", ServingStatus::Serving),
            ]
        );
        let poisoned = statuses(Readiness {
            hsm_available: true,
            audit_writable: false,
            catalogue_fresh: true,
        });
        assert!(
            poisoned
                .iter()
                .all(|(_, s)| *s == ServingStatus::NotServing)
        );
        let healthy = statuses(Readiness {
            hsm_available: true,
            audit_writable: true,
            catalogue_fresh: true,
        });
        assert!(healthy.iter().all(|(_, s)| *s == ServingStatus::Serving));
    }
}
