//! kms-proto: generated in a later step.
