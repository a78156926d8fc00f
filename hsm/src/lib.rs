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
//!
//! Layout: `hsm/` is the `Hsm` facade with its recovery policy and
//! object-handle cache; `session_pool` the logged-in sessions; `module` the
//! process-wide PKCS#11 module registry; `objects` the key attribute table;
//! `error`/`return_code` the typed errors; `softhsm` SoftHSM2's
//! configuration; `token` finding and initializing tokens; `token_info`
//! reading a token's label and flags tolerantly.

#![warn(missing_docs)]

mod config;
mod error;
mod hsm;
mod module;
mod objects;
mod return_code;
mod session_pool;
pub mod softhsm;
mod token;
mod token_info;
mod token_sync;

#[cfg(feature = "bench")]
pub mod baseline;
#[cfg(feature = "testing")]
pub mod testing;

pub use config::{HsmConfig, Pin, PinSource};
pub use error::{ExaminedSlot, HsmError, Operation, Result, ReturnCode, RngSource, SlotRejection};
pub use hsm::{
    GCM_IV_LEN, GCM_TAG_LEN, GcmSealed, Hsm, HsmCounters, KeyObjectInfo, MAX_GCM_INPUT,
    MAX_RANDOM_LEN, OperationStats, PoolUsage,
};
pub use objects::{KeyPurpose, ObjectId};
pub use softhsm::{DEBIAN_SOFTHSM2_MODULE, softhsm2_module_path};
pub use token::{initialize_token, token_exists};
