//! kms: an HSM-backed key management service and encryption-as-a-service.
//!
//! Layout: `auth` (who is calling, what they may do, admission limits),
//! `config` (TOML → typed config), `dev` (the embedded default),
//! `ciphertext` and `encryption_context` (the ciphertext blob format; "envelope"
//! means client-side envelope encryption only, in kms-client), `service`
//! (the domain: keys, encryption, audit; no gRPC), `grpc` (thin handlers and
//! the only place errors become `tonic::Status`), `server` (tonic server,
//! health that follows the HSM and the audit log, reflection, limits,
//! metrics), `operator` (the server-side operator commands `kms hsm` and
//! `kms token`; every other command of the `kms` binary is a client, in the
//! kms-cli crate), `aws` (the AWS KMS JSON API door with SigV4, thin over
//! the same domain service).

pub mod auth;
pub mod aws;
mod background;
pub mod backup;
pub mod ciphertext;
pub mod cluster;
pub mod config;
pub mod dev;
pub mod encryption_context;
pub mod error;
pub mod grpc;
pub mod hardening;
pub mod metrics;
pub mod operator;
pub mod server;
pub mod service;
