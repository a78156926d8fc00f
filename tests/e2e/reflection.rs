//! Server reflection works for a generic client that is not ours
//! (Python grpcio-reflection), so grpcurl-style tools discover the API.

use std::process::Command;

use kms_tests::TestEnv;

#[tokio::test]
async fn a_python_reflection_client_lists_the_services() {
    let env = TestEnv::new();
    let server = env.start().await;
    let target = server.endpoint.trim_start_matches("http://").to_owned();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/reflection_probe.py");
    let output = tokio::task::spawn_blocking(move || {
        Command::new("python3").arg(script).arg(&target).output()
    })
    .await
    .expect("join")
    .expect("run python3 (scripts/setup.sh installs grpcio and grpcio-reflection)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "probe failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    for service in [
        "kms.v1.KeyManagement",
        "kms.v1.Crypto",
        "kms.v1.Audit",
        "grpc.health.v1.Health",
    ] {
        assert!(
            stdout.lines().any(|l| l == service),
            "{service} missing from:\n{stdout}"
        );
    }
    assert!(
        stdout.contains("method-input kms.v1.Crypto.Encrypt kms.v1.EncryptRequest"),
        "{stdout}"
    );
    assert!(
        stdout.contains("fields encryption_context,key_id,plaintext"),
        "{stdout}"
    );
}

#[tokio::test]
async fn health_and_metrics_endpoints_answer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = TestEnv::new();
    let server = env.start().await;
    let mut health = tonic_health_client(&server).await;
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "kms.v1.Crypto".into(),
        })
        .await
        .expect("health")
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    super::create_key(&server, "for metrics").await;
    let mut stream = tokio::net::TcpStream::connect(server.metrics_addr())
        .await
        .expect("connect metrics");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut body = String::new();
    stream.read_to_string(&mut body).await.expect("read");
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(
        body.contains("kms_requests_total{rpc=\"/kms.v1.KeyManagement/CreateKey\",code=\"OK\"} 1"),
        "{body}"
    );
    assert!(body.contains("kms_hsm_pool_size 4"), "{body}");
    assert!(
        body.contains("kms_hsm_operations_total{op=\"C_GenerateKey\"} 2"),
        "{body}"
    );
    assert!(body.contains("kms_audit_batches_total"), "{body}");
    assert!(
        !body.contains("kms_audit_batches_total 0\n"),
        "no audit batch counted: {body}"
    );
}

async fn tonic_health_client(
    server: &kms_tests::TestServer,
) -> tonic_health::pb::health_client::HealthClient<tonic::transport::Channel> {
    tonic_health::pb::health_client::HealthClient::new(server.channel.clone())
}
