//! Graceful shutdown of a real `kms serve --config` process on SIGTERM: a
//! request in flight when the signal arrives completes and is audited, a
//! later request is answered UNAVAILABLE, and the process exits 0 at the
//! end of the grace period although one request never finishes, one client
//! holds an idle HTTP/2 connection and another a silent TCP connection.
//!
//! The in-flight requests are raw HTTP/2 streams (the `h2` crate) whose
//! headers are sent before the signal and whose body is sent after it (or
//! never): in flight for certain, without relying on timing.

use std::time::Duration;

use bytes::Bytes;
use kms_proto::v1 as pb;
use kms_proto::v1::audit_client::AuditClient;
use kms_proto::v1::crypto_client::CryptoClient;
use kms_proto::v1::key_management_client::KeyManagementClient;
use prost::Message as _;
use tonic::Code;

use super::configured::{Deployment, Settings, connect};

/// A gRPC unary call opened on an HTTP/2 connection: headers sent, body not yet.
struct OpenCall {
    response: h2::client::ResponseFuture,
    body: h2::SendStream<Bytes>,
}

async fn open_encrypt(
    sender: &mut h2::client::SendRequest<Bytes>,
    addr: std::net::SocketAddr,
    request_id: &str,
) -> OpenCall {
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/kms.v1.Crypto/Encrypt"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-request-id", request_id)
        .body(())
        .expect("request");
    let mut ready = sender.clone().ready().await.expect("h2 ready");
    let (response, body) = ready.send_request(request, false).expect("send headers");
    *sender = ready;
    OpenCall { response, body }
}

/// Sends the (length-prefixed) message and reads the reply: its message and
/// its grpc-status.
async fn finish_encrypt(mut call: OpenCall, key: &str) -> (Option<pb::EncryptResponse>, String) {
    let message = pb::EncryptRequest {
        key_id: key.to_owned(),
        plaintext: b"in flight at SIGTERM".to_vec(),
        encryption_context: Default::default(),
    }
    .encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(message.len()).expect("len").to_be_bytes());
    frame.extend_from_slice(&message);
    call.body
        .send_data(Bytes::from(frame), true)
        .expect("send body");
    let response = call.response.await.expect("response headers");
    let mut status = response
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().expect("ascii").to_owned());
    let mut body = response.into_body();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("body");
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    if let Some(trailers) = body.trailers().await.expect("trailers") {
        status = trailers
            .get("grpc-status")
            .map(|v| v.to_str().expect("ascii").to_owned());
    }
    let reply =
        (data.len() > 5).then(|| pb::EncryptResponse::decode(&data[5..]).expect("decode reply"));
    (reply, status.unwrap_or_default())
}

/// Whether the server has already answered a call whose body was never sent
/// (it can only have refused it).
async fn answered(response: &mut h2::client::ResponseFuture) -> bool {
    tokio::time::timeout(Duration::from_millis(1), response)
        .await
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_requests_in_flight_then_exits_within_the_grace_period() {
    let deployment = Deployment::new();
    let settings = Settings {
        admins: vec!["dev".to_owned()],
        anonymous_principal: Some("dev".to_owned()),
        shutdown_grace_ms: 3_000,
        // Far beyond the wait below: only the grace period can end the
        // stalled request in time.
        request_timeout_ms: 600_000,
        // Two requests in flight fill the server: how the test knows they are.
        max_concurrent_requests: 2,
        ..Settings::default()
    };
    deployment.write_config(&settings);
    let mut server = deployment.start();
    let addr = server.addr;

    // A client with an idle keep-alive connection (one call, then nothing).
    let idle = connect(&server.plain_endpoint()).await.expect("connect");
    let key = KeyManagementClient::new(idle.clone())
        .create_key(pb::CreateKeyRequest::default())
        .await
        .expect("CreateKey")
        .into_inner()
        .key_metadata
        .expect("metadata")
        .key_id;
    // A client that connected and never said anything.
    let _silent = std::net::TcpStream::connect(addr).expect("tcp");

    // Two calls in flight: one will finish after SIGTERM, one never will.
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("tcp");
    let (mut sender, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut in_flight = open_encrypt(&mut sender, addr, "drain-in-flight").await;
    let mut stalled = open_encrypt(&mut sender, addr, "drain-stalled").await;
    let probe = connect(&server.plain_endpoint()).await.expect("probe");
    let mut full = false;
    let mut last_probe = String::new();
    // Up to 60 s: on a loaded 2-core machine the headers may take a while to
    // reach the admission layer; the loop ends as soon as they have.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        let result = CryptoClient::new(probe.clone())
            .encrypt(pb::EncryptRequest {
                key_id: key.clone(),
                plaintext: b"probe".to_vec(),
                encryption_context: Default::default(),
            })
            .await;
        match result {
            Err(s) if s.code() == Code::ResourceExhausted => {
                full = true;
                break;
            }
            other => last_probe = format!("{other:?}"),
        }
        // A call whose headers arrived while the server still counted the
        // CreateKey before it (the permit is released after the client has
        // its reply) was refused at admission and is already answered:
        // open it again.
        if answered(&mut in_flight.response).await {
            in_flight = open_encrypt(&mut sender, addr, "drain-in-flight").await;
        }
        if answered(&mut stalled.response).await {
            stalled = open_encrypt(&mut sender, addr, "drain-stalled").await;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        full,
        "the two calls never were in flight together; last probe: {last_probe}; log:\n{}",
        deployment.log()
    );
    drop(probe);

    server.signal("TERM");
    let signalled = std::time::Instant::now();
    let mut draining = false;
    for _ in 0..1000 {
        if deployment.log().contains("shutting down") {
            draining = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(draining, "no shutdown in the log:\n{}", deployment.log());

    // The call in flight completes after the signal.
    let (reply, status) = finish_encrypt(in_flight, &key).await;
    assert_eq!(status, "0", "the in-flight call failed");
    assert!(
        reply.is_some_and(|r| !r.ciphertext_blob.is_empty()),
        "no ciphertext"
    );
    // A new call is refused UNAVAILABLE (by the draining server, or by the
    // client after the server's GOAWAY): never left hanging.
    let later = CryptoClient::new(idle.clone())
        .encrypt(pb::EncryptRequest {
            key_id: key.clone(),
            plaintext: b"too late".to_vec(),
            encryption_context: Default::default(),
        })
        .await
        .expect_err("after SIGTERM");
    assert_eq!(later.code(), Code::Unavailable, "{later:?}");

    // The stalled call, the idle and the silent connection do not hold the
    // process past the grace period (3 s; the request timeout is 600 s).
    let exit = server
        .wait_for_exit(Duration::from_secs(60))
        .expect("the server is still running a minute after SIGTERM");
    assert!(exit.success(), "exit status {exit:?}");
    // The grace period bounds the whole shutdown, not only the drain: the
    // silent connection's task may keep the service referenced, and the
    // process must not wait for it beyond the deadline (it used to wait 5 s
    // more). 3 s grace + 0.25 s margin; the rest is slack for a loaded machine.
    let took = signalled.elapsed();
    assert!(
        took < Duration::from_millis(6_500),
        "exit {took:?} after SIGTERM with a 3 s grace period:\n{}",
        deployment.log()
    );
    assert!(
        deployment.log().contains("grace period over"),
        "{}",
        deployment.log()
    );
    drop(stalled);

    // After a restart: the completed call is in the audit log, which verifies.
    let server = deployment.start();
    let channel = connect(&server.plain_endpoint()).await.expect("connect");
    let events = AuditClient::new(channel.clone())
        .list_audit_events(pb::ListAuditEventsRequest {
            key_id: key.clone(),
            operation: pb::Operation::Encrypt as i32,
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("ListAuditEvents")
        .into_inner()
        .events;
    let completed: Vec<_> = events
        .iter()
        .filter(|e| e.request_id == "drain-in-flight")
        .collect();
    assert_eq!(completed.len(), 1, "{events:?}");
    assert_eq!(completed[0].result_code, 0);
    assert!(
        events.iter().all(|e| e.request_id != "drain-stalled"),
        "the stalled call never reached the service"
    );
    let verified = AuditClient::new(channel)
        .verify_audit_log(pb::VerifyAuditLogRequest::default())
        .await
        .expect("VerifyAuditLog")
        .into_inner();
    assert!(verified.valid, "{verified:?}");
}
