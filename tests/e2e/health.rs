//! gRPC health follows the real dependencies: the Crypto service (and the
//! server as a whole) reports NOT_SERVING while the HSM token is gone and
//! SERVING again once it is back, without a restart.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use kms_tests::{TestEnv, TestServer};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

pub(crate) async fn status(server: &TestServer, service: &str) -> ServingStatus {
    let status = HealthClient::new(server.channel.clone())
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .expect("health check")
        .into_inner()
        .status;
    ServingStatus::try_from(status).expect("a known serving status")
}

/// Polls until `service` reports `wanted`, failing after `limit`.
pub(crate) async fn wait_for(
    server: &TestServer,
    service: &str,
    wanted: ServingStatus,
    limit: Duration,
) {
    let started = Instant::now();
    loop {
        let now = status(server, service).await;
        if now == wanted {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "{service:?} still {now:?} after {limit:?}, expected {wanted:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_not_serving_while_the_token_is_gone_and_serving_once_it_is_back() {
    let env = TestEnv::new();
    let server = env.start().await;
    for service in ["", "kms.v1.Crypto", "kms.v1.KeyManagement", "kms.v1.Audit"] {
        assert_eq!(
            status(&server, service).await,
            ServingStatus::Serving,
            "{service:?}"
        );
    }

    // The token directory goes away (a pulled HSM), with no traffic at all:
    // the health probe alone has to notice.
    let token_dir = env.token_dir().to_owned();
    let moved: PathBuf = token_dir.with_extension("gone");
    std::fs::rename(&token_dir, &moved).expect("move the token away");
    wait_for(
        &server,
        "kms.v1.Crypto",
        ServingStatus::NotServing,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(status(&server, "").await, ServingStatus::NotServing);
    // Reads of the catalogue and the audit log still work without the HSM.
    assert_eq!(
        status(&server, "kms.v1.KeyManagement").await,
        ServingStatus::Serving
    );
    assert_eq!(
        status(&server, "kms.v1.Audit").await,
        ServingStatus::Serving
    );
    // And the status says the truth: a key use fails closed meanwhile.
    let refused = server
        .keys()
        .create_key(kms_proto::v1::CreateKeyRequest::default())
        .await
        .expect_err("no key can be made without the token");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");

    // The token comes back: the same server reports SERVING again by itself.
    std::fs::rename(&moved, &token_dir).expect("restore the token");
    wait_for(
        &server,
        "kms.v1.Crypto",
        ServingStatus::Serving,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(status(&server, "").await, ServingStatus::Serving);
    super::create_key(&server, "after the outage").await;
    server.stop().await;
}

/// Regression (found with the Kubernetes plugin's Status, issue 16): with a
/// key object on the token before it went away, SoftHSM2 answered the
/// probe's search "not found" instead of failing, so the HSM layer never
/// entered its recovery and health stayed NOT_SERVING after the token came
/// back (and key uses failed INTERNAL) until a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_recovers_when_the_token_held_keys_before_it_went_away() {
    let env = TestEnv::new();
    let server = env.start().await;
    let key = super::create_key(&server, "made before the outage").await;
    let token_dir = env.token_dir().to_owned();
    let moved: PathBuf = token_dir.with_extension("gone");
    std::fs::rename(&token_dir, &moved).expect("move the token away");
    wait_for(
        &server,
        "kms.v1.Crypto",
        ServingStatus::NotServing,
        Duration::from_secs(30),
    )
    .await;
    std::fs::rename(&moved, &token_dir).expect("restore the token");
    wait_for(
        &server,
        "kms.v1.Crypto",
        ServingStatus::Serving,
        Duration::from_secs(30),
    )
    .await;
    // The key made before the outage works again.
    let sealed = super::encrypt(&server, &key, b"after the outage", &[]).await;
    let opened = super::decrypt(&server, &sealed.ciphertext_blob, &[])
        .await
        .expect("decrypt after the outage");
    assert_eq!(opened.plaintext, b"after the outage");
    server.stop().await;
}
