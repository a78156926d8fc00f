//! kms-hsm: the HSM layer of kms, and the only crate that talks PKCS#11.
//!
//! Master keys (KEKs) are generated inside a PKCS#11 token and never leave
//! it; this crate gives the rest of kms a small blocking API over them:
//! generate/find/destroy key objects, AES-256-GCM with HSM-resident KEKs,
//! HMAC-SHA256 with an HSM-resident key, and random bytes. No cryptoki type
//! appears in its public API.
//!
//! What it must never do: log or display a PIN or key material, share a
//! session between threads, search the token or open a session on the hot
//! path once warm, or fall back to software keys when the HSM is gone.

mod config;
mod error;
mod hsm;
mod module;
mod objects;
mod session_pool;
mod token;
mod token_sync;

#[cfg(feature = "bench")]
pub mod baseline;
#[cfg(feature = "testing")]
pub mod testing;

pub use config::{HsmConfig, Pin, PinSource};
pub use error::{HsmError, Operation, ReturnCode};
pub use hsm::{
    GCM_IV_LEN, GCM_TAG_LEN, GcmSealed, Hsm, HsmCounters, KeyObjectInfo, MAX_GCM_INPUT,
    MAX_RANDOM_LEN, OperationStats, PoolUsage,
};
pub use objects::{KeyPurpose, ObjectId};
pub use token::{initialize_token, token_exists};

/// Where Debian's softhsm2 package installs the module.
pub const DEBIAN_SOFTHSM2_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// The SoftHSM2 module path: `$KMS_SOFTHSM2_MODULE` if set, else Debian's.
pub fn softhsm2_module_path() -> std::path::PathBuf {
    std::env::var_os("KMS_SOFTHSM2_MODULE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(DEBIAN_SOFTHSM2_MODULE))
}
