//! kms
pub mod encryption_context;
pub mod envelope;
