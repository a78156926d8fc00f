//! Generates the kms.v1 prost messages and tonic clients/servers into OUT_DIR.
//!
//! protox compiles the .proto files in pure Rust, so no `protoc` is needed and the
//! output depends only on the sources and the locked crate versions. The encoded
//! file descriptor set (with comments) is written beside the code so the server can
//! register gRPC reflection.

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

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=kms");
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
    Ok(())
}
