//! Crash safety: the server process is SIGKILLed at random moments while a
//! client encrypts and rotates. After each restart every ciphertext that was
//! returned still decrypts to its plaintext, every acknowledged request has
//! its audit record, and the audit chain verifies.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kms_proto::v1 as pb;
use kms_proto::v1::audit_client::AuditClient;
use kms_proto::v1::crypto_client::CryptoClient;
use kms_proto::v1::key_management_client::KeyManagementClient;
use kms_tests::DevServerProcess;
use tonic::transport::Channel;

/// A tiny deterministic generator for kill moments (xorshift), seeded by the clock.
struct Moments(u64);

impl Moments {
    fn next_ms(&mut self, lo: u64, hi: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        lo + self.0 % (hi - lo)
    }
}

async fn connect(server: &DevServerProcess) -> Channel {
    Channel::from_shared(server.endpoint())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect")
}

#[tokio::test]
async fn sigkill_at_random_moments_loses_nothing_acknowledged() {
    let data = tempfile::tempdir().expect("data dir");
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as u64
        | 1;
    eprintln!("crash test seed {seed}");
    let mut moments = Moments(seed);
    let mut acknowledged: Vec<(Vec<u8>, Vec<u8>)> = Vec::new(); // (plaintext, blob)
    let mut key: Option<String> = None;
    let mut acked_requests = 0u64;

    for round in 0..12 {
        let server = DevServerProcess::start(data.path());
        let channel = connect(&server).await;
        let mut keys = KeyManagementClient::new(channel.clone());
        let mut crypto = CryptoClient::new(channel.clone());

        // Everything acknowledged before survives the crash.
        acked_requests += acknowledged.len() as u64; // the decrypts below, recorded before the verify
        for (plaintext, blob) in &acknowledged {
            let opened = crypto
                .decrypt(pb::DecryptRequest {
                    ciphertext_blob: blob.clone(),
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|e| {
                    panic!("round {round}: an acknowledged ciphertext no longer decrypts: {e:?}")
                })
                .into_inner();
            assert_eq!(&opened.plaintext, plaintext, "round {round}");
        }
        let verified = AuditClient::new(channel.clone())
            .verify_audit_log(pb::VerifyAuditLogRequest::default())
            .await
            .expect("verify")
            .into_inner();
        assert!(
            verified.valid,
            "round {round}: audit chain broken: {verified:?}"
        );
        assert!(
            verified.events_verified >= acked_requests,
            "round {round}: {} records for {acked_requests} acknowledged requests",
            verified.events_verified
        );
        acked_requests += 1; // the verify itself

        let key_id = match &key {
            Some(k) => k.clone(),
            None => {
                let created = keys
                    .create_key(pb::CreateKeyRequest {
                        description: "crash".into(),
                        ..Default::default()
                    })
                    .await
                    .expect("create")
                    .into_inner()
                    .key_metadata
                    .expect("metadata")
                    .key_id;
                acked_requests += 1;
                key = Some(created.clone());
                created
            }
        };

        // Load, then a kill at a random moment while requests are in flight.
        let kill_after = Duration::from_millis(moments.next_ms(150, 900));
        let started = Instant::now();
        let load = {
            let mut crypto = crypto.clone();
            let mut keys = keys.clone();
            let key_id = key_id.clone();
            tokio::spawn(async move {
                let mut acked = Vec::new();
                let mut requests = 0u64;
                for i in 0u32.. {
                    if i % 25 == 24 {
                        if keys
                            .rotate_key(pb::RotateKeyRequest {
                                key_id: key_id.clone(),
                            })
                            .await
                            .is_err()
                        {
                            break;
                        }
                        requests += 1;
                        continue;
                    }
                    if i % 10 == 5 {
                        // A data key: after any crash, its wrapped form must
                        // still unwrap to exactly the key the caller got.
                        match crypto
                            .generate_data_key(pb::GenerateDataKeyRequest {
                                key_id: key_id.clone(),
                                length: Some(pb::generate_data_key_request::Length::KeySpec(
                                    pb::DataKeySpec::Aes256 as i32,
                                )),
                                ..Default::default()
                            })
                            .await
                        {
                            Ok(reply) => {
                                let reply = reply.into_inner();
                                acked.push((reply.plaintext.to_vec(), reply.ciphertext_blob));
                                requests += 1;
                                continue;
                            }
                            Err(_) => break,
                        }
                    }
                    let plaintext = format!("round {round} message {i}").into_bytes();
                    match crypto
                        .encrypt(pb::EncryptRequest {
                            key_id: key_id.clone(),
                            plaintext: plaintext.clone(),
                            encryption_context: Default::default(),
                        })
                        .await
                    {
                        Ok(reply) => {
                            acked.push((plaintext, reply.into_inner().ciphertext_blob));
                            requests += 1;
                        }
                        Err(_) => break,
                    }
                }
                (acked, requests)
            })
        };
        tokio::time::sleep(kill_after.saturating_sub(started.elapsed())).await;
        server.kill();
        let (acked, requests) = tokio::time::timeout(Duration::from_secs(30), load)
            .await
            .expect("load stops after the kill")
            .expect("load task");
        acknowledged.extend(acked);
        acked_requests += requests;
    }
    assert!(
        acknowledged.len() > 20,
        "too little load to mean anything: {}",
        acknowledged.len()
    );
}
