//! kms-hsm
