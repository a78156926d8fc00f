//! Generates the kms.v1 prost messages and tonic clients/servers into OUT_DIR.
//!
//! protox compiles the .proto files in pure Rust, so no `protoc` is needed and the
//! output depends only on the sources and the locked crate versions. The encoded
//! file descriptor set (with comments) is written beside the code so the server can
//! register gRPC reflection.
//!
//! The Kubernetes KMS v2 plugin API (`k8s.io/kms/apis/v2/api.proto`, package
//! `v2`, vendored verbatim) is compiled the same way, separately: it is not
//! part of the kms.v1 descriptor set (the TCP listener neither serves nor
//! advertises it; only the `[[kubernetes]]` Unix sockets do).

use std::error::Error;
use std::path::PathBuf;

use protox::prost::Message as _;

/// The API, relative to this crate's root (which is also the include root).
const PROTOS: &[&str] = &[
    "kms/v1/resources.proto",
    "kms/v1/key_management.proto",
    "kms/v1/crypto.proto",
    "kms/v1/audit.proto",
    "kms/v1/admin.proto",
];

/// Messages that carry plaintext, data keys or other secret bytes: no derived
/// `Debug`; src/redacted_debug.rs implements it by hand. Containers of these
/// (BatchEncryptRequest, BatchDecryptResult, ...) keep a derived `Debug`, which
/// delegates to the redacted one.
const SECRET_MESSAGES: &[&str] = &[
    ".kms.v1.EncryptRequest",
    ".kms.v1.DecryptResponse",
    ".kms.v1.GenerateDataKeyResponse",
    ".kms.v1.GenerateRandomResponse",
    ".kms.v1.BatchEncryptEntry",
];

/// The Kubernetes KMS v2 plugin API, relative to this crate's root.
const KUBERNETES_PROTOS: &[&str] = &["k8s.io/kms/apis/v2/api.proto"];

/// Kubernetes messages that carry the DEK seed kube-apiserver wraps: no
/// derived `Debug` (src/redacted_debug.rs).
const KUBERNETES_SECRET_MESSAGES: &[&str] = &[".v2.EncryptRequest", ".v2.DecryptResponse"];

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=kms");
    println!("cargo:rerun-if-changed=k8s.io");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    let fds = protox::compile(PROTOS, ["."])?;
    std::fs::write(out_dir.join("kms_v1_descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .skip_debug(SECRET_MESSAGES)
        // Malformed requests are INVALID_ARGUMENT, not INTERNAL (src/codec.rs).
        .codec_path("crate::codec::KmsCodec")
        .compile_fds(fds)?;

    let kubernetes = protox::compile(KUBERNETES_PROTOS, ["."])?;
    tonic_prost_build::configure()
        // kms serves this API; the client is for tests (a stand-in for
        // kube-apiserver).
        .build_client(true)
        .build_server(true)
        .skip_debug(KUBERNETES_SECRET_MESSAGES)
        .codec_path("crate::codec::KmsCodec")
        .compile_fds(kubernetes)?;
    Ok(())
}
