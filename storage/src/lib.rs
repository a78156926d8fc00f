//! kms-storage
