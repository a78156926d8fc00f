//! The server-side operator commands of the `kms` binary, which act on this
//! machine rather than through a running server: `kms hsm ...` (token
//! provisioning through the PKCS#11 module), `kms token new` (bearer tokens
//! for the server's configuration) and `kms backup ...` (backups of the
//! catalogue and audit log, and their restore on a stopped server). Every other client command lives in the
//! kms-cli crate.

pub mod backup;
pub mod hsm;
pub mod token;
