//! kms-proto: the kms gRPC API (protobuf package `kms.v1`).
//!
//! The `.proto` files under `kms/v1/` are the source of truth; the Rust code is
//! generated at build time into OUT_DIR (never checked in). This crate depends on
//! prost/tonic only and holds no logic beyond the redacted `Debug` impls for
//! messages that carry secret bytes: those must never print their contents.

/// Generated messages, enums, clients (`*_client`) and servers (`*_server`) of
/// package `kms.v1`.
pub mod v1 {
    #![allow(missing_docs)]
    #![allow(clippy::all, clippy::pedantic)]
    // Proto comments are written for proto readers ("alias/<name>"), not rustdoc.
    #![allow(
        rustdoc::invalid_html_tags,
        rustdoc::bare_urls,
        rustdoc::broken_intra_doc_links
    )]
    tonic::include_proto!("kms.v1");
}

/// The Kubernetes KMS v2 plugin API (protobuf package `v2`, vendored verbatim
/// from `k8s.io/kms/apis/v2/api.proto`): what kube-apiserver calls on a KMS
/// plugin's Unix socket. Its `EncryptRequest` and `DecryptResponse` carry the
/// apiserver's DEK seed and have a redacted `Debug`.
pub mod kubernetes_v2 {
    #![allow(missing_docs)]
    #![allow(clippy::all, clippy::pedantic)]
    #![allow(
        rustdoc::invalid_html_tags,
        rustdoc::bare_urls,
        rustdoc::broken_intra_doc_links
    )]
    tonic::include_proto!("v2");
}

pub mod codec;
mod redacted_debug;
mod status;

pub use status::{code_name, numeric_code_name};

/// Encoded `google.protobuf.FileDescriptorSet` of the kms.v1 API and everything it
/// imports, with source comments; register it with tonic-reflection so that
/// generic tools (grpcurl, grpcio-reflection) can discover the API.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/kms_v1_descriptor.bin"));

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::FILE_DESCRIPTOR_SET;

    #[test]
    fn descriptor_set_has_the_three_services_and_their_imports() {
        let fds = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET)
            .expect("descriptor set decodes");
        let services: Vec<String> = fds
            .file
            .iter()
            .filter(|f| f.package() == "kms.v1")
            .flat_map(|f| f.service.iter().map(|s| s.name().to_owned()))
            .collect();
        for expected in ["KeyManagement", "Crypto", "Audit"] {
            assert!(services.iter().any(|s| s == expected), "{expected} missing");
        }
        // Reflection clients must be able to resolve every import from this set alone.
        for name in [
            "google/protobuf/timestamp.proto",
            "google/protobuf/duration.proto",
        ] {
            assert!(fds.file.iter().any(|f| f.name() == name), "{name} missing");
        }
    }
}
