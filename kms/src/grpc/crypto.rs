//! Crypto handlers. Requests and responses carrying plaintext or data keys
//! are never logged (their proto types have a redacted Debug); plaintext
//! moves from zeroizing buffers into the response message only at the end.

use std::sync::Arc;

use kms_proto::v1 as pb;
use kms_proto::v1::crypto_server::Crypto;
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use super::{blocking, key_use, request_meta, respond};
use crate::error::KmsError;
use crate::service::{
    DataKey, DataKeyItem, DataKeySize, DecryptItem, EncryptItem, Encrypted, KmsService,
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

fn data_key_size(spec: Option<i32>, bytes: Option<u32>) -> Result<DataKeySize, KmsError> {
    match (spec, bytes) {
        (Some(spec), None) => match pb::DataKeySpec::try_from(spec) {
            Ok(pb::DataKeySpec::Aes128) => Ok(DataKeySize::Aes128),
            Ok(pb::DataKeySpec::Aes256) => Ok(DataKeySize::Aes256),
            _ => Err(KmsError::invalid(
                "key_spec",
                "must be DATA_KEY_SPEC_AES_128 or DATA_KEY_SPEC_AES_256",
            )),
        },
        (None, Some(n)) => Ok(DataKeySize::Bytes(usize::try_from(n).unwrap_or(usize::MAX))),
        _ => Err(KmsError::invalid(
            "key_spec",
            "set key_spec or number_of_bytes",
        )),
    }
}

fn gdk_length(
    length: Option<pb::generate_data_key_request::Length>,
) -> Result<DataKeySize, KmsError> {
    use pb::generate_data_key_request::Length;
    match length {
        Some(Length::KeySpec(s)) => data_key_size(Some(s), None),
        Some(Length::NumberOfBytes(n)) => data_key_size(None, Some(n)),
        None => data_key_size(None, None),
    }
}

fn item_status(error: &KmsError) -> pb::ItemStatus {
    let status = Status::from(error.clone());
    pb::ItemStatus {
        code: status.code() as i32,
        message: status.message().to_owned(),
    }
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
        let meta = request_meta(&request)?;
        let req = request.into_inner();
        let plaintext = Zeroizing::new(req.plaintext);
        let m = meta.clone();
        let encrypted = key_use(&self.service, move |s| {
            s.encrypt_deferred(&m, &req.key_id, &plaintext, req.encryption_context)
        })
        .await?;
        Ok(respond(encrypt_response(encrypted), &meta))
    }

    async fn decrypt(&self, request: Request<pb::DecryptRequest>) -> Reply<pb::DecryptResponse> {
        let meta = request_meta(&request)?;
        let req = request.into_inner();
        let m = meta.clone();
        let decrypted = key_use(&self.service, move |s| {
            let key = (!req.key_id.is_empty()).then_some(req.key_id.as_str());
            s.decrypt_deferred(&m, &req.ciphertext_blob, req.encryption_context, key)
        })
        .await?;
        Ok(respond(
            pb::DecryptResponse {
                plaintext: decrypted.plaintext.to_vec(),
                key_id: decrypted.key_id.to_string(),
                key_version: decrypted.key_version,
            },
            &meta,
        ))
    }

    async fn generate_data_key(
        &self,
        request: Request<pb::GenerateDataKeyRequest>,
    ) -> Reply<pb::GenerateDataKeyResponse> {
        let meta = request_meta(&request)?;
        let req = request.into_inner();
        let m = meta.clone();
        let data_key = key_use(&self.service, move |s| {
            let size = gdk_length(req.length);
            let size = match size {
                Ok(size) => size,
                Err(e) => return s.refuse_deferred(&m, "GenerateDataKey", &req.key_id, e),
            };
            s.generate_data_key_deferred(&m, &req.key_id, size, req.encryption_context, true)
        })
        .await?;
        Ok(respond(data_key_response(data_key), &meta))
    }

    async fn generate_data_key_without_plaintext(
        &self,
        request: Request<pb::GenerateDataKeyWithoutPlaintextRequest>,
    ) -> Reply<pb::GenerateDataKeyWithoutPlaintextResponse> {
        use pb::generate_data_key_without_plaintext_request::Length;
        let meta = request_meta(&request)?;
        let req = request.into_inner();
        let m = meta.clone();
        let data_key = key_use(&self.service, move |s| {
            let size = match req.length {
                Some(Length::KeySpec(spec)) => data_key_size(Some(spec), None),
                Some(Length::NumberOfBytes(n)) => data_key_size(None, Some(n)),
                None => data_key_size(None, None),
            };
            let size = match size {
                Ok(size) => size,
                Err(e) => {
                    return s.refuse_deferred(
                        &m,
                        "GenerateDataKeyWithoutPlaintext",
                        &req.key_id,
                        e,
                    );
                }
            };
            s.generate_data_key_deferred(&m, &req.key_id, size, req.encryption_context, false)
        })
        .await?;
        Ok(respond(
            pb::GenerateDataKeyWithoutPlaintextResponse {
                ciphertext_blob: data_key.encrypted.blob,
                key_id: data_key.encrypted.key_id.to_string(),
                key_version: data_key.encrypted.key_version,
            },
            &meta,
        ))
    }

    async fn re_encrypt(
        &self,
        request: Request<pb::ReEncryptRequest>,
    ) -> Reply<pb::ReEncryptResponse> {
        let meta = request_meta(&request)?;
        let req = request.into_inner();
        let m = meta.clone();
        let result = key_use(&self.service, move |s| {
            let source = (!req.source_key_id.is_empty()).then_some(req.source_key_id.as_str());
            s.re_encrypt_deferred(
                &m,
                &req.ciphertext_blob,
                req.source_encryption_context,
                source,
                &req.destination_key_id,
                req.destination_encryption_context,
            )
        })
        .await?;
        Ok(respond(
            pb::ReEncryptResponse {
                ciphertext_blob: result.encrypted.blob,
                source_key_id: result.source_key_id.to_string(),
                source_key_version: result.source_key_version,
                key_id: result.encrypted.key_id.to_string(),
                key_version: result.encrypted.key_version,
            },
            &meta,
        ))
    }

    async fn generate_random(
        &self,
        request: Request<pb::GenerateRandomRequest>,
    ) -> Reply<pb::GenerateRandomResponse> {
        let meta = request_meta(&request)?;
        let n = usize::try_from(request.into_inner().number_of_bytes).unwrap_or(usize::MAX);
        let m = meta.clone();
        let bytes = blocking(&self.service, move |s| s.generate_random(&m, n)).await?;
        Ok(respond(
            pb::GenerateRandomResponse {
                random_bytes: bytes.to_vec(),
            },
            &meta,
        ))
    }

    async fn batch_encrypt(
        &self,
        request: Request<pb::BatchEncryptRequest>,
    ) -> Reply<pb::BatchEncryptResponse> {
        let meta = request_meta(&request)?;
        let req = request.into_inner();
        let items: Vec<EncryptItem> = req
            .entries
            .into_iter()
            .map(|e| EncryptItem {
                plaintext: Zeroizing::new(e.plaintext),
                context: e.encryption_context,
            })
            .collect();
        let m = meta.clone();
        let results = blocking(&self.service, move |s| {
            s.batch_encrypt(&m, &req.key_id, items)
        })
        .await?;
        let results = results
            .into_iter()
            .map(|r| pb::BatchEncryptResult {
                outcome: Some(match r {
                    Ok(encrypted) => {
                        pb::batch_encrypt_result::Outcome::Result(encrypt_response(encrypted))
                    }
                    Err(e) => pb::batch_encrypt_result::Outcome::Error(item_status(&e)),
                }),
            })
            .collect();
        Ok(respond(pb::BatchEncryptResponse { results }, &meta))
    }

    async fn batch_decrypt(
        &self,
        request: Request<pb::BatchDecryptRequest>,
    ) -> Reply<pb::BatchDecryptResponse> {
        let meta = request_meta(&request)?;
        let req = request.into_inner();
        let items: Vec<DecryptItem> = req
            .entries
            .into_iter()
            .map(|e| DecryptItem {
                blob: e.ciphertext_blob,
                context: e.encryption_context,
            })
            .collect();
        let m = meta.clone();
        let results = blocking(&self.service, move |s| {
            let key = (!req.key_id.is_empty()).then_some(req.key_id.as_str());
            s.batch_decrypt(&m, key, items)
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
                    Err(e) => pb::batch_decrypt_result::Outcome::Error(item_status(&e)),
                }),
            })
            .collect();
        Ok(respond(pb::BatchDecryptResponse { results }, &meta))
    }

    async fn batch_generate_data_key(
        &self,
        request: Request<pb::BatchGenerateDataKeyRequest>,
    ) -> Reply<pb::BatchGenerateDataKeyResponse> {
        use pb::batch_generate_data_key_entry::Length;
        let meta = request_meta(&request)?;
        let req = request.into_inner();
        let mut items = Vec::with_capacity(req.entries.len());
        let mut refused = None;
        for (i, entry) in req.entries.into_iter().enumerate() {
            let size = match entry.length {
                Some(Length::KeySpec(spec)) => data_key_size(Some(spec), None),
                Some(Length::NumberOfBytes(n)) => data_key_size(None, Some(n)),
                None => data_key_size(None, None),
            };
            match size {
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
        let m = meta.clone();
        let results = blocking(&self.service, move |s| {
            if let Some((i, e)) = refused {
                return s.refuse(
                    &m,
                    "BatchGenerateDataKey",
                    &req.key_id,
                    KmsError::invalid("entries", format!("entry {i}: {e}")),
                );
            }
            s.batch_generate_data_key(&m, &req.key_id, items)
        })
        .await?;
        let results = results
            .into_iter()
            .map(|r| pb::BatchGenerateDataKeyResult {
                outcome: Some(match r {
                    Ok(dk) => {
                        pb::batch_generate_data_key_result::Outcome::Result(data_key_response(dk))
                    }
                    Err(e) => pb::batch_generate_data_key_result::Outcome::Error(item_status(&e)),
                }),
            })
            .collect();
        Ok(respond(pb::BatchGenerateDataKeyResponse { results }, &meta))
    }
}
