//! kms-hsm: the HSM layer of kms, and the only crate that talks PKCS#11.
//!
//! Master keys (KEKs) are generated inside a PKCS#11 token and never leave
//! it; this crate gives the rest of kms a small blocking API over them:
//! generate/find/destroy key objects, AES-256-GCM with HSM-resident KEKs,
//! HMAC-SHA256 with an HSM-resident key, and random bytes; and the wrapped-key
//! hierarchy (one root key per HSM, key versions stored as blobs wrapped under
//! it, working keys unwrapped into the HSM as session objects). No cryptoki
//! type appears in its public API (outside the `testing` feature's attack hook).
//!
//! What it must never do: log or display a PIN or key material, share a
//! session between threads, search the token or open a session on the hot
//! path once warm, or fall back to software keys when the HSM is gone.
//!
//! Layout: `hsm/` is the `Hsm` facade with its recovery policy and
//! object-handle cache; `session_pool` the logged-in sessions; `module` the
//! process-wide PKCS#11 module registry; `objects` the key attribute table;
//! `root`, `wrapped` and `hsm/holder` the wrapped-key hierarchy (root keys,
//! wrapped versions, working keys; `raw` is the one module with
//! `unsafe`, for the PKCS#11 calls cryptoki 0.12 cannot express: template
//! attributes and a tolerant `C_GetTokenInfo`);
//! `import` the RSA import key pairs and OAEP unwrap of bring-your-own-key;
//! `error`/`return_code` the typed errors; `softhsm` SoftHSM2's
//! configuration; `token` finding and initializing tokens; `token_info`
//! reading a token's label and flags tolerantly.

#![warn(missing_docs)]

mod config;
mod error;
mod hsm;
mod import;
mod module;
mod objects;
mod raw;
mod return_code;
mod root;
mod session_pool;
pub mod softhsm;
mod token;
mod token_info;
mod token_sync;
mod wrapped;

#[cfg(feature = "bench")]
pub mod baseline;
#[cfg(feature = "testing")]
pub mod testing;

pub use config::{HsmConfig, Pin, PinSource};
pub use error::{ExaminedSlot, HsmError, Operation, Result, ReturnCode, RngSource, SlotRejection};
pub use hsm::ImportKey;
pub use hsm::{
    GCM_IV_LEN, GCM_TAG_LEN, GcmSealed, Hsm, HsmCounters, KeyHolder, KeyObjectInfo, MAX_GCM_INPUT,
    MAX_RANDOM_LEN, OperationStats, PoolUsage, RootInfo, WorkingKey,
};
pub use import::{ImportKeySpec, OaepHash};
pub use objects::{KeyPurpose, ObjectId};
#[cfg(feature = "testing")]
pub use root::{RootDefect, create_defective_root_for_tests};
pub use root::{RootSpec, RootVariant, RotatedRoot, create_root, init_root, root_id, rotate_root};
pub use softhsm::{DEBIAN_SOFTHSM2_MODULE, softhsm2_module_path};
pub use token::{initialize_token, token_exists};
pub use wrapped::{WRAPPED_KEY_LEN, WrapMechanism, WrappedKey};
