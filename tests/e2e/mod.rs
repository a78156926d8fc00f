mod audit;
mod audit_cluster;
mod audit_stream;
mod authz;
mod aws_api;
mod backup;
mod backup_cluster;
mod bad_input;
mod batch_re_encrypt;
mod cli;
mod cluster;
mod cluster_bench;
mod cluster_roots;
mod cluster_usage;
mod configured;
mod contracts;
mod crash;
mod crash_wrapped;
mod crypto;
mod drain;
mod emergency_path;
mod envelope;
mod envelope_rewrap;
mod etcd_harness;
mod faults;
mod gcm_limit;
mod health;
mod import;
mod keys;
mod kubernetes;
mod lifecycle_races;
mod listing_bounds;
mod pre_wrapped;
mod re_encrypt_audit;
mod re_encrypt_job;
mod reflection;
mod reload;
mod restart;
mod root_rotation;
mod scale;
mod secrets;
mod service_keys;
mod tls_walkthrough;
mod usage;
mod version_destruction;
mod wrapped;

use std::collections::HashMap;

use kms_proto::v1 as pb;
use kms_tests::TestServer;

pub(crate) fn ctx(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Creates a key and returns its id.
pub(crate) async fn create_key(server: &TestServer, description: &str) -> String {
    server
        .keys()
        .create_key(pb::CreateKeyRequest {
            description: description.to_owned(),
            ..Default::default()
        })
        .await
        .expect("CreateKey")
        .into_inner()
        .key_metadata
        .expect("metadata")
        .key_id
}

pub(crate) async fn encrypt(
    server: &TestServer,
    key: &str,
    plaintext: &[u8],
    context: &[(&str, &str)],
) -> pb::EncryptResponse {
    server
        .crypto()
        .encrypt(pb::EncryptRequest {
            key_id: key.to_owned(),
            plaintext: plaintext.to_vec(),
            encryption_context: ctx(context),
        })
        .await
        .expect("Encrypt")
        .into_inner()
}

pub(crate) async fn decrypt(
    server: &TestServer,
    blob: &[u8],
    context: &[(&str, &str)],
) -> Result<pb::DecryptResponse, tonic::Status> {
    server
        .crypto()
        .decrypt(pb::DecryptRequest {
            ciphertext_blob: blob.to_vec(),
            encryption_context: ctx(context),
            key_id: String::new(),
        })
        .await
        .map(tonic::Response::into_inner)
}
