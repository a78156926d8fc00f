//! The gRPC rows: what each call sends, the keys and ciphertexts it needs
//! (created once per server), and the channels the client tasks share.
//!
//! Requests are built once and cloned per call (tonic takes them by value),
//! so the client spends as little as possible besides the RPC itself. Every
//! response is checked just enough that a failing server cannot look fast.

use std::collections::HashMap;
use std::sync::Arc;

use kms_proto::v1 as pb;
use kms_proto::v1::crypto_client::CryptoClient;
use kms_proto::v1::key_management_client::KeyManagementClient;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

use crate::load::AsyncCall;

/// Plaintext sizes of the Encrypt rows.
pub const ENCRYPT_SIZES: [usize; 3] = [32, 1024, 4096];
/// Plaintext size of the Decrypt, ReEncrypt and batch rows.
pub const SMALL: usize = 32;

/// One kind of gRPC call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// grpc.health.v1.Health/Check: the transport's ceiling.
    HealthCheck,
    Encrypt {
        bytes: usize,
    },
    Decrypt,
    GenerateDataKey,
    ReEncrypt,
    BatchEncrypt,
    BatchDecrypt,
    BatchGenerateDataKey,
}

impl Workload {
    /// The service rows, in table order (the health check is a baseline).
    pub fn service_rows() -> Vec<Workload> {
        let mut rows: Vec<Workload> = ENCRYPT_SIZES
            .iter()
            .map(|&bytes| Workload::Encrypt { bytes })
            .collect();
        rows.extend([
            Workload::Decrypt,
            Workload::GenerateDataKey,
            Workload::ReEncrypt,
            Workload::BatchEncrypt,
            Workload::BatchDecrypt,
            Workload::BatchGenerateDataKey,
        ]);
        rows
    }

    pub fn is_batch(&self) -> bool {
        matches!(
            self,
            Workload::BatchEncrypt | Workload::BatchDecrypt | Workload::BatchGenerateDataKey
        )
    }

    /// The row name, stable across versions (it keys `--compare`).
    pub fn name(&self, batch: usize) -> String {
        match self {
            Workload::HealthCheck => "grpc-noop".into(),
            Workload::Encrypt { bytes } => format!("Encrypt {}", size_label(*bytes)),
            Workload::Decrypt => format!("Decrypt {}", size_label(SMALL)),
            Workload::GenerateDataKey => "GenerateDataKey AES-256".into(),
            Workload::ReEncrypt => format!("ReEncrypt {}", size_label(SMALL)),
            Workload::BatchEncrypt => format!("BatchEncrypt {batch}x{}", size_label(SMALL)),
            Workload::BatchDecrypt => format!("BatchDecrypt {batch}x{}", size_label(SMALL)),
            Workload::BatchGenerateDataKey => format!("BatchGenerateDataKey {batch}xAES-256"),
        }
    }
}

pub fn size_label(bytes: usize) -> String {
    if bytes >= 1024 && bytes.is_multiple_of(1024) {
        format!("{}KiB", bytes / 1024)
    } else {
        format!("{bytes}B")
    }
}

/// Opens `count` HTTP/2 connections to `endpoint` (each tonic `Channel` made
/// by `Endpoint::connect` is one connection, multiplexing many streams).
pub async fn connect(endpoint: &str, count: usize) -> anyhow::Result<Vec<Channel>> {
    let mut channels = Vec::with_capacity(count);
    for _ in 0..count.max(1) {
        let channel = Endpoint::from_shared(endpoint.to_owned())?
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| anyhow::anyhow!("connecting to {endpoint}: {e}"))?;
        channels.push(channel);
    }
    Ok(channels)
}

/// Keys, a ciphertext and the prebuilt requests of every row, for one server.
#[derive(Debug)]
pub struct Fixture {
    batch: usize,
    encrypt: HashMap<usize, pb::EncryptRequest>,
    decrypt: pb::DecryptRequest,
    generate_data_key: pb::GenerateDataKeyRequest,
    re_encrypt: pb::ReEncryptRequest,
    batch_encrypt: pb::BatchEncryptRequest,
    batch_decrypt: pb::BatchDecryptRequest,
    batch_generate_data_key: pb::BatchGenerateDataKeyRequest,
}

fn context() -> HashMap<String, String> {
    // A small, typical encryption context: the service canonicalizes and
    // binds it on every call, so a benchmark without one would flatter it.
    HashMap::from([("app".to_owned(), "kms-bench".to_owned())])
}

fn plaintext(bytes: usize) -> Vec<u8> {
    vec![0xa5; bytes]
}

impl Fixture {
    /// Creates two keys (source and destination of ReEncrypt) and one
    /// 32-byte ciphertext, and builds every request.
    pub async fn create(channel: &Channel, batch: usize) -> anyhow::Result<Fixture> {
        let mut keys = KeyManagementClient::new(channel.clone());
        let mut key_ids = Vec::new();
        for description in ["kms-bench source", "kms-bench destination"] {
            let key = keys
                .create_key(pb::CreateKeyRequest {
                    description: description.to_owned(),
                    ..Default::default()
                })
                .await
                .map_err(|s| anyhow::anyhow!("CreateKey: {s}"))?
                .into_inner()
                .key_metadata
                .ok_or_else(|| anyhow::anyhow!("CreateKey returned no metadata"))?;
            key_ids.push(key.key_id);
        }
        let (source, destination) = (key_ids[0].clone(), key_ids[1].clone());
        let encrypt: HashMap<usize, pb::EncryptRequest> = ENCRYPT_SIZES
            .iter()
            .map(|&bytes| {
                let request = pb::EncryptRequest {
                    key_id: source.clone(),
                    plaintext: plaintext(bytes),
                    encryption_context: context(),
                };
                (bytes, request)
            })
            .collect();
        let blob = CryptoClient::new(channel.clone())
            .encrypt(pb::EncryptRequest {
                key_id: source.clone(),
                plaintext: plaintext(SMALL),
                encryption_context: context(),
            })
            .await
            .map_err(|s| anyhow::anyhow!("Encrypt: {s}"))?
            .into_inner()
            .ciphertext_blob;
        let data_key_spec = pb::DataKeySpec::Aes256 as i32;
        Ok(Fixture {
            batch,
            encrypt,
            decrypt: pb::DecryptRequest {
                ciphertext_blob: blob.clone(),
                encryption_context: context(),
                key_id: String::new(),
            },
            generate_data_key: pb::GenerateDataKeyRequest {
                key_id: source.clone(),
                encryption_context: context(),
                length: Some(pb::generate_data_key_request::Length::KeySpec(
                    data_key_spec,
                )),
            },
            re_encrypt: pb::ReEncryptRequest {
                ciphertext_blob: blob.clone(),
                source_encryption_context: context(),
                source_key_id: String::new(),
                destination_key_id: destination,
                destination_encryption_context: context(),
            },
            batch_encrypt: pb::BatchEncryptRequest {
                key_id: source.clone(),
                entries: (0..batch)
                    .map(|_| pb::BatchEncryptEntry {
                        plaintext: plaintext(SMALL),
                        encryption_context: context(),
                    })
                    .collect(),
            },
            batch_decrypt: pb::BatchDecryptRequest {
                key_id: String::new(),
                entries: (0..batch)
                    .map(|_| pb::BatchDecryptEntry {
                        ciphertext_blob: blob.clone(),
                        encryption_context: context(),
                    })
                    .collect(),
            },
            batch_generate_data_key: pb::BatchGenerateDataKeyRequest {
                key_id: source,
                entries: (0..batch)
                    .map(|_| pb::BatchGenerateDataKeyEntry {
                        encryption_context: context(),
                        length: Some(pb::batch_generate_data_key_entry::Length::KeySpec(
                            data_key_spec,
                        )),
                    })
                    .collect(),
            },
        })
    }

    /// One call per client task: task `i` uses channel `i mod channels`.
    pub fn calls(
        self: &Arc<Self>,
        workload: Workload,
        channels: &[Channel],
        tasks: usize,
    ) -> Vec<ServiceCall> {
        (0..tasks)
            .map(|i| {
                let channel = channels[i % channels.len()].clone();
                ServiceCall {
                    workload,
                    fixture: Arc::clone(self),
                    crypto: CryptoClient::new(channel.clone()),
                    health: HealthClient::new(channel),
                }
            })
            .collect()
    }
}

/// One client task's call of one row.
#[derive(Debug)]
pub struct ServiceCall {
    workload: Workload,
    fixture: Arc<Fixture>,
    crypto: CryptoClient<Channel>,
    health: HealthClient<Channel>,
}

fn status(rpc: &str) -> impl FnOnce(tonic::Status) -> String + '_ {
    move |s| format!("{rpc}: {:?}: {}", s.code(), s.message())
}

fn expect(ok: bool, rpc: &str, what: &str) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(format!("{rpc}: {what}"))
    }
}

/// Checks that a batch returned one successful result per entry.
fn batch_items<T>(
    rpc: &str,
    expected: usize,
    results: &[T],
    ok: impl Fn(&T) -> bool,
) -> Result<u64, String> {
    expect(results.len() == expected, rpc, "wrong number of results")?;
    expect(results.iter().all(ok), rpc, "an item failed")?;
    Ok(expected as u64)
}

impl ServiceCall {
    async fn run(&mut self) -> Result<u64, String> {
        let f = &self.fixture;
        match self.workload {
            Workload::HealthCheck => {
                let r = self
                    .health
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .map_err(status("Health/Check"))?
                    .into_inner();
                expect(
                    r.status == ServingStatus::Serving as i32,
                    "Health/Check",
                    "not SERVING",
                )?;
                Ok(1)
            }
            Workload::Encrypt { bytes } => {
                let request = f
                    .encrypt
                    .get(&bytes)
                    .cloned()
                    .ok_or_else(|| format!("no Encrypt request of {bytes} bytes"))?;
                let r = self
                    .crypto
                    .encrypt(request)
                    .await
                    .map_err(status("Encrypt"))?
                    .into_inner();
                expect(r.ciphertext_blob.len() > bytes, "Encrypt", "short blob")?;
                Ok(1)
            }
            Workload::Decrypt => {
                let r = self
                    .crypto
                    .decrypt(f.decrypt.clone())
                    .await
                    .map_err(status("Decrypt"))?
                    .into_inner();
                expect(r.plaintext.len() == SMALL, "Decrypt", "wrong plaintext")?;
                Ok(1)
            }
            Workload::GenerateDataKey => {
                let r = self
                    .crypto
                    .generate_data_key(f.generate_data_key.clone())
                    .await
                    .map_err(status("GenerateDataKey"))?
                    .into_inner();
                expect(r.plaintext.len() == 32, "GenerateDataKey", "not 32 bytes")?;
                Ok(1)
            }
            Workload::ReEncrypt => {
                let r = self
                    .crypto
                    .re_encrypt(f.re_encrypt.clone())
                    .await
                    .map_err(status("ReEncrypt"))?
                    .into_inner();
                expect(!r.ciphertext_blob.is_empty(), "ReEncrypt", "empty blob")?;
                Ok(1)
            }
            Workload::BatchEncrypt => {
                let r = self
                    .crypto
                    .batch_encrypt(f.batch_encrypt.clone())
                    .await
                    .map_err(status("BatchEncrypt"))?
                    .into_inner();
                batch_items("BatchEncrypt", f.batch, &r.results, |item| {
                    matches!(
                        item.outcome,
                        Some(pb::batch_encrypt_result::Outcome::Result(_))
                    )
                })
            }
            Workload::BatchDecrypt => {
                let r = self
                    .crypto
                    .batch_decrypt(f.batch_decrypt.clone())
                    .await
                    .map_err(status("BatchDecrypt"))?
                    .into_inner();
                batch_items("BatchDecrypt", f.batch, &r.results, |item| {
                    matches!(
                        item.outcome,
                        Some(pb::batch_decrypt_result::Outcome::Result(_))
                    )
                })
            }
            Workload::BatchGenerateDataKey => {
                let r = self
                    .crypto
                    .batch_generate_data_key(f.batch_generate_data_key.clone())
                    .await
                    .map_err(status("BatchGenerateDataKey"))?
                    .into_inner();
                batch_items("BatchGenerateDataKey", f.batch, &r.results, |item| {
                    matches!(
                        item.outcome,
                        Some(pb::batch_generate_data_key_result::Outcome::Result(_))
                    )
                })
            }
        }
    }
}

impl AsyncCall for ServiceCall {
    fn call(&mut self) -> impl Future<Output = Result<u64, String>> + Send + '_ {
        self.run()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_names_are_stable() {
        let names: Vec<String> = Workload::service_rows()
            .iter()
            .map(|w| w.name(100))
            .collect();
        assert_eq!(
            names,
            [
                "Encrypt 32B",
                "Encrypt 1KiB",
                "Encrypt 4KiB",
                "Decrypt 32B",
                "GenerateDataKey AES-256",
                "ReEncrypt 32B",
                "BatchEncrypt 100x32B",
                "BatchDecrypt 100x32B",
                "BatchGenerateDataKey 100xAES-256",
            ]
        );
        assert_eq!(Workload::HealthCheck.name(100), "grpc-noop");
    }
}
