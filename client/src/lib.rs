//! kms-client: a typed async client for the kms gRPC API, and client-side
//! envelope encryption of streams and files of any size.
//!
//! - [`KmsClient`]: one method per RPC, with endpoint, TLS/mTLS, bearer token,
//!   deadlines and retries (UNAVAILABLE only, idempotent calls only) from a
//!   [`ClientConfig`].
//! - [`Envelope`]: encrypts a stream under a fresh data key from GenerateDataKey
//!   in authenticated AES-256-GCM chunks, and decrypts it in constant memory
//!   (format: README, "Client library and envelope format").
//! - [`Rewrapper`]: moves envelope files (format version 2) to a key's
//!   primary version by replacing only their wrapped data keys, atomically
//!   per file, in BatchReEncrypt batches.
//! - [`ReEncryptJob`]: moves a file of ciphertext blobs to a key's primary
//!   version with BatchReEncrypt, resumably (checkpoint after each batch).
//! - [`DataKeyCache`]: optional reuse of data keys within message, byte and age
//!   limits, and a bounded cache of unwrapped keys for decryption.
//!
//! This crate depends on neither rocksdb nor cryptoki: services can use it
//! cheaply. Data keys, plaintext and tokens live in zeroizing types with
//! redacted `Debug` and never appear in errors or logs.

#![warn(missing_docs)]

pub mod baseline;
pub mod cache;
mod client;
pub mod config;
pub mod context;
pub mod data_key;
pub mod envelope;
mod error;
pub mod reencrypt;
pub mod retry;

pub use cache::{CacheLimits, CacheStats, DataKeyCache};
pub use client::{AuditEventStream, ClientStats, KmsClient};
pub use config::{BearerToken, ClientConfig, ClientIdentity};
pub use context::EncryptionContext;
pub use data_key::DataKey;
pub use envelope::rewrap::{RewrapSummary, Rewrapper};
pub use envelope::{Envelope, EnvelopeError, EnvelopeStats, FormatVersion};
pub use error::{Error, join_causes};
pub use kms_proto::v1 as proto;
pub use reencrypt::{ReEncryptJob, ReEncryptSummary};
pub use retry::RetryPolicy;
