//! The server-side operator commands of the `kms` binary, which act on this
//! machine rather than through a running server: `kms hsm ...` (token
//! provisioning through the PKCS#11 module) and `kms token new` (bearer tokens
//! for the server's configuration). Every other client command lives in the
//! kms-cli crate.

pub mod hsm;
pub mod token;
