//! The tamper-evident audit log: record and checkpoint formats (`record`),
//! the group-commit writer (`writer`, `group_commit`, `checkpoint`),
//! queries and export (`reader`) and verification (`verify`).
//!
//! Records are appended, never changed: nothing here updates or deletes an
//! audit record. No record holds a secret (see `record`).

pub(crate) mod checkpoint;
pub(crate) mod group_commit;
pub(crate) mod reader;
pub(crate) mod record;
pub(crate) mod verify;
pub(crate) mod writer;

pub use group_commit::{AuditConfig, DurableFn, MacFn, WitnessBoard, Witnessing};
pub use reader::{AuditFilter, AuditPage, AuditReader, MAX_SCAN_PER_PAGE};
pub use record::{
    AuditEvent, AuditRecord, CHECKPOINT_FORMAT_V1, Checkpoint, GENESIS_HASH, MAX_FIELD_LEN,
    MAX_WITNESSED_HEADS, RECORD_FORMAT_V1, RECORD_FORMAT_WITNESS, ResultCode, WITNESS_OPERATION,
    WitnessedHead,
};
pub use verify::{
    VerifyFailure, VerifyFailureReason, VerifyMacFn, VerifyOptions, VerifyReport, VerifyStart,
    WitnessCheck, WitnessOutcome,
};
pub use writer::{AppendHandle, AuditLog, AuditStats};
