//! Crypto handlers. Requests and responses carrying plaintext or data keys
//! are never logged (their proto types have a redacted Debug); plaintext
//! moves from zeroizing buffers into the response message only at the end.

use std::sync::Arc;

use kms_proto::v1 as pb;
use kms_proto::v1::crypto_server::Crypto;
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use super::Rpc;
use super::convert::data_key_size;
use crate::error::KmsError;
use crate::service::Operation;
use crate::service::{
    DataKey, DataKeyForm, DataKeyInput, DataKeyItem, DecryptInput, DecryptItem, EncryptInput,
    EncryptItem, Encrypted, KmsService, ReEncryptInput, ReEncryptItem,
};

/// The Crypto service.
#[derive(Debug, Clone)]
pub struct CryptoApi {
    service: Arc<KmsService>,
}

impl CryptoApi {
    pub fn new(service: Arc<KmsService>) -> Self {
        CryptoApi { service }
    }
}

type Reply<T> = Result<Response<T>, Status>;

/// An optional string field: empty means absent.
fn optional(field: String) -> Option<String> {
    (!field.is_empty()).then_some(field)
}

fn encrypt_response(encrypted: Encrypted) -> pb::EncryptResponse {
    pb::EncryptResponse {
        ciphertext_blob: encrypted.blob,
        key_id: encrypted.key_id.to_string(),
        key_version: encrypted.key_version,
    }
}

fn data_key_response(data_key: DataKey) -> pb::GenerateDataKeyResponse {
    pb::GenerateDataKeyResponse {
        ciphertext_blob: data_key.encrypted.blob,
        // The response message owns the bytes from here; tonic encodes and
        // drops it. (prost messages cannot hold zeroizing buffers.)
        plaintext: data_key.plaintext.map(|p| p.to_vec()).unwrap_or_default(),
        key_id: data_key.encrypted.key_id.to_string(),
        key_version: data_key.encrypted.key_version,
    }
}

#[tonic::async_trait]
impl Crypto for CryptoApi {
    async fn encrypt(&self, request: Request<pb::EncryptRequest>) -> Reply<pb::EncryptResponse> {
        let rpc = Rpc::start(Operation::Encrypt, &request)?;
        let req = request.into_inner();
        let input = EncryptInput {
            key: req.key_id,
            plaintext: Zeroizing::new(req.plaintext),
            context: req.encryption_context,
        };
        let encrypted = rpc
            .key_use(&self.service, move |s, m| s.encrypt(m, input))
            .await?;
        rpc.respond(encrypt_response(encrypted))
    }

    async fn decrypt(&self, request: Request<pb::DecryptRequest>) -> Reply<pb::DecryptResponse> {
        let rpc = Rpc::start(Operation::Decrypt, &request)?;
        let req = request.into_inner();
        let input = DecryptInput {
            blob: req.ciphertext_blob,
            context: req.encryption_context,
            expected_key: optional(req.key_id),
        };
        let decrypted = rpc
            .key_use(&self.service, move |s, m| s.decrypt(m, input))
            .await?;
        rpc.respond(pb::DecryptResponse {
            plaintext: decrypted.plaintext.to_vec(),
            key_id: decrypted.key_id.to_string(),
            key_version: decrypted.key_version,
        })
    }

    async fn generate_data_key(
        &self,
        request: Request<pb::GenerateDataKeyRequest>,
    ) -> Reply<pb::GenerateDataKeyResponse> {
        let rpc = Rpc::start(Operation::GenerateDataKey, &request)?;
        let req = request.into_inner();
        let data_key = rpc
            .key_use(&self.service, move |s, m| {
                let size = match data_key_size(req.length) {
                    Ok(size) => size,
                    Err(e) => {
                        return s.refuse_deferred(m, Operation::GenerateDataKey, &req.key_id, e);
                    }
                };
                let input = DataKeyInput {
                    key: req.key_id,
                    size,
                    context: req.encryption_context,
                    form: DataKeyForm::WithPlaintext,
                };
                s.generate_data_key(m, input)
            })
            .await?;
        rpc.respond(data_key_response(data_key))
    }

    async fn generate_data_key_without_plaintext(
        &self,
        request: Request<pb::GenerateDataKeyWithoutPlaintextRequest>,
    ) -> Reply<pb::GenerateDataKeyWithoutPlaintextResponse> {
        let rpc = Rpc::start(Operation::GenerateDataKeyWithoutPlaintext, &request)?;
        let req = request.into_inner();
        let data_key = rpc
            .key_use(&self.service, move |s, m| {
                let size = match data_key_size(req.length) {
                    Ok(size) => size,
                    Err(e) => {
                        return s.refuse_deferred(
                            m,
                            Operation::GenerateDataKeyWithoutPlaintext,
                            &req.key_id,
                            e,
                        );
                    }
                };
                let input = DataKeyInput {
                    key: req.key_id,
                    size,
                    context: req.encryption_context,
                    form: DataKeyForm::WithoutPlaintext,
                };
                s.generate_data_key(m, input)
            })
            .await?;
        rpc.respond(pb::GenerateDataKeyWithoutPlaintextResponse {
            ciphertext_blob: data_key.encrypted.blob,
            key_id: data_key.encrypted.key_id.to_string(),
            key_version: data_key.encrypted.key_version,
        })
    }

    async fn re_encrypt(
        &self,
        request: Request<pb::ReEncryptRequest>,
    ) -> Reply<pb::ReEncryptResponse> {
        let rpc = Rpc::start(Operation::ReEncrypt, &request)?;
        let req = request.into_inner();
        let input = ReEncryptInput {
            blob: req.ciphertext_blob,
            source_context: req.source_encryption_context,
            source_key: optional(req.source_key_id),
            destination_key: req.destination_key_id,
            destination_context: req.destination_encryption_context,
        };
        let result = rpc
            .key_use(&self.service, move |s, m| s.re_encrypt(m, input))
            .await?;
        rpc.respond(pb::ReEncryptResponse {
            ciphertext_blob: result.encrypted.blob,
            source_key_id: result.source_key_id.to_string(),
            source_key_version: result.source_key_version,
            key_id: result.encrypted.key_id.to_string(),
            key_version: result.encrypted.key_version,
        })
    }

    async fn generate_random(
        &self,
        request: Request<pb::GenerateRandomRequest>,
    ) -> Reply<pb::GenerateRandomResponse> {
        let rpc = Rpc::start(Operation::GenerateRandom, &request)?;
        let n = usize::try_from(request.into_inner().number_of_bytes).unwrap_or(usize::MAX);
        let bytes = rpc
            .blocking(&self.service, move |s, m| s.generate_random(m, n))
            .await?;
        rpc.respond(pb::GenerateRandomResponse {
            random_bytes: bytes.to_vec(),
        })
    }

    async fn batch_encrypt(
        &self,
        request: Request<pb::BatchEncryptRequest>,
    ) -> Reply<pb::BatchEncryptResponse> {
        let rpc = Rpc::start(Operation::BatchEncrypt, &request)?;
        let req = request.into_inner();
        let items: Vec<EncryptItem> = req
            .entries
            .into_iter()
            .map(|e| EncryptItem {
                plaintext: Zeroizing::new(e.plaintext),
                context: e.encryption_context,
            })
            .collect();
        let results = rpc
            .blocking(&self.service, move |s, m| {
                s.batch_encrypt(m, &req.key_id, items)
            })
            .await?;
        let results = results
            .into_iter()
            .map(|r| pb::BatchEncryptResult {
                outcome: Some(match r {
                    Ok(encrypted) => {
                        pb::batch_encrypt_result::Outcome::Result(encrypt_response(encrypted))
                    }
                    Err(e) => pb::batch_encrypt_result::Outcome::Error(rpc.item_status(e)),
                }),
            })
            .collect();
        rpc.respond(pb::BatchEncryptResponse { results })
    }

    async fn batch_decrypt(
        &self,
        request: Request<pb::BatchDecryptRequest>,
    ) -> Reply<pb::BatchDecryptResponse> {
        let rpc = Rpc::start(Operation::BatchDecrypt, &request)?;
        let req = request.into_inner();
        let items: Vec<DecryptItem> = req
            .entries
            .into_iter()
            .map(|e| DecryptItem {
                blob: e.ciphertext_blob,
                context: e.encryption_context,
            })
            .collect();
        let results = rpc
            .blocking(&self.service, move |s, m| {
                let key = (!req.key_id.is_empty()).then_some(req.key_id.as_str());
                s.batch_decrypt(m, key, items)
            })
            .await?;
        let results = results
            .into_iter()
            .map(|r| pb::BatchDecryptResult {
                outcome: Some(match r {
                    Ok(d) => pb::batch_decrypt_result::Outcome::Result(pb::DecryptResponse {
                        plaintext: d.plaintext.to_vec(),
                        key_id: d.key_id.to_string(),
                        key_version: d.key_version,
                    }),
                    Err(e) => pb::batch_decrypt_result::Outcome::Error(rpc.item_status(e)),
                }),
            })
            .collect();
        rpc.respond(pb::BatchDecryptResponse { results })
    }

    async fn batch_generate_data_key(
        &self,
        request: Request<pb::BatchGenerateDataKeyRequest>,
    ) -> Reply<pb::BatchGenerateDataKeyResponse> {
        let rpc = Rpc::start(Operation::BatchGenerateDataKey, &request)?;
        let req = request.into_inner();
        let mut items = Vec::with_capacity(req.entries.len());
        let mut refused = None;
        for (i, entry) in req.entries.into_iter().enumerate() {
            match data_key_size(entry.length) {
                Ok(size) => items.push(DataKeyItem {
                    size,
                    context: entry.encryption_context,
                }),
                Err(e) => {
                    refused = Some((i, e));
                    break;
                }
            }
        }
        let results = rpc
            .blocking(&self.service, move |s, m| {
                if let Some((i, e)) = refused {
                    return s.refuse(
                        m,
                        Operation::BatchGenerateDataKey,
                        &req.key_id,
                        KmsError::invalid("entries", format!("entry {i}: {e}")),
                    );
                }
                s.batch_generate_data_key(m, &req.key_id, items)
            })
            .await?;
        let results = results
            .into_iter()
            .map(|r| pb::BatchGenerateDataKeyResult {
                outcome: Some(match r {
                    Ok(dk) => {
                        pb::batch_generate_data_key_result::Outcome::Result(data_key_response(dk))
                    }
                    Err(e) => {
                        pb::batch_generate_data_key_result::Outcome::Error(rpc.item_status(e))
                    }
                }),
            })
            .collect();
        rpc.respond(pb::BatchGenerateDataKeyResponse { results })
    }

    async fn batch_re_encrypt(
        &self,
        request: Request<pb::BatchReEncryptRequest>,
    ) -> Reply<pb::BatchReEncryptResponse> {
        let rpc = Rpc::start(Operation::BatchReEncrypt, &request)?;
        let req = request.into_inner();
        let items: Vec<ReEncryptItem> = req
            .entries
            .into_iter()
            .map(|e| ReEncryptItem {
                blob: e.ciphertext_blob,
                source_context: e.source_encryption_context,
                destination_context: e.destination_encryption_context,
            })
            .collect();
        let destination = optional(req.destination_key_id);
        let source = optional(req.source_key_id);
        let results = rpc
            .blocking(&self.service, move |s, m| {
                s.batch_re_encrypt(m, destination.as_deref(), source.as_deref(), items)
            })
            .await?;
        let results = results
            .into_iter()
            .map(|r| pb::BatchReEncryptResult {
                outcome: Some(match r {
                    Ok(moved) => {
                        pb::batch_re_encrypt_result::Outcome::Result(pb::BatchReEncryptItem {
                            ciphertext_blob: moved.encrypted.blob,
                            source_key_id: moved.source_key_id.to_string(),
                            source_key_version: moved.source_key_version,
                            key_id: moved.encrypted.key_id.to_string(),
                            key_version: moved.encrypted.key_version,
                            already_current: moved.already_current,
                        })
                    }
                    Err(e) => pb::batch_re_encrypt_result::Outcome::Error(rpc.item_status(e)),
                }),
            })
            .collect();
        rpc.respond(pb::BatchReEncryptResponse { results })
    }
}
