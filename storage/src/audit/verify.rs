//! Verification of the audit log: walks the hash chain from the first record
//! (or from a trusted checkpoint) and checks every checkpoint's head hash and
//! MAC, reporting the first bad sequence number and why.
//!
//! What it proves: with the MAC key out of an attacker's reach (in the HSM),
//! no record up to the last valid checkpoint can be altered, inserted,
//! reordered or deleted undetected. Records after the last checkpoint are
//! protected by the hash chain only (see `VerifyReport::uncheckpointed_tail`);
//! with `max_records_between_checkpoints` set to the writer's
//! `checkpoint_every_records`, fewer than that many can be silently truncated.

use rocksdb::{Direction, IteratorMode};

use super::reader::AuditReader;
use super::record::{AuditRecord, Checkpoint, GENESIS_HASH, WitnessedHead};
use crate::schema::{self, CF_AUDIT, CF_AUDIT_CHECKPOINTS};
use kms_catalogue::{CallbackError, StorageError};

/// Checks a checkpoint MAC: `(message, mac) -> Ok(true)` if valid. An `Err`
/// means the verifier could not run (e.g. HSM down), not that the MAC is bad.
pub type VerifyMacFn<'a> = &'a dyn Fn(&[u8], &[u8]) -> Result<bool, CallbackError>;

/// Where verification starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyStart {
    /// From sequence 1 with the all-zero genesis hash.
    Genesis,
    /// From the checkpoint at this sequence (its MAC is checked first); the
    /// records up to it are trusted and not read.
    Checkpoint(u64),
}

/// How [`crate::AuditReader::verify`] walks the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyOptions {
    /// Where to start (default: the genesis).
    pub start: VerifyStart,
    /// Fail if more records than this follow a checkpoint (or the start)
    /// without the next one. Set to the writer's `checkpoint_every_records`.
    pub max_records_between_checkpoints: Option<u64>,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            start: VerifyStart::Genesis,
            max_records_between_checkpoints: None,
        }
    }
}

/// Why verification stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum VerifyFailureReason {
    /// The record's key is not an 8-byte sequence number.
    BadKey,
    /// A sequence number is missing (a record was deleted).
    Gap {
        /// The sequence number found instead of the expected one.
        found: u64,
    },
    /// The record does not decode.
    Undecodable {
        /// What does not decode.
        detail: &'static str,
    },
    /// The sequence inside the record differs from its key.
    SequenceMismatch {
        /// The sequence number inside the record.
        stored: u64,
    },
    /// The record's prev_hash is not the previous record's hash.
    PrevHashMismatch,
    /// The record's hash is not SHA-256(prev_hash ‖ body): it was altered.
    HashMismatch,
    /// A checkpoint does not decode or its key and content disagree.
    CheckpointUndecodable,
    /// A checkpoint certifies a different head hash than the chain has.
    CheckpointHeadMismatch,
    /// A checkpoint's MAC does not verify: forged or altered.
    CheckpointMacInvalid,
    /// A checkpoint certifies a record that is not in the log (truncation).
    CheckpointWithoutRecord,
    /// More records than allowed without a checkpoint.
    MissingCheckpoint,
    /// The trusted checkpoint to start from is not in the log.
    StartCheckpointMissing,
}

/// Where and why verification failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyFailure {
    /// The first bad sequence number.
    pub seq: u64,
    /// What was wrong with it.
    pub reason: VerifyFailureReason,
}

/// The outcome of a verification walk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Records checked.
    pub records: u64,
    /// The last sequence number that verified (the start point if none did).
    pub last_good_seq: u64,
    /// Hash of that record.
    pub head_hash: [u8; 32],
    /// Checkpoints whose head hash and MAC verified.
    pub checkpoints_verified: u64,
    /// Sequence number of the last of them.
    pub last_checkpoint_seq: Option<u64>,
    /// Records after the last verified checkpoint (protected by the chain only).
    pub uncheckpointed_tail: u64,
    /// `None` if everything verified.
    pub failure: Option<VerifyFailure>,
    /// The heads of other nodes this chain witnesses (witness records,
    /// design note §2.3.6): per node, the one with the highest sequence
    /// among the records that verified, by node id. Empty on a single node.
    pub witnessed: Vec<WitnessedHead>,
}

/// What this node's log says about a head another node witnessed for it
/// ([`AuditReader::check_witnessed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WitnessCheck {
    /// The witnessed head (its `node` is this node).
    pub head: WitnessedHead,
    /// How this log compares with it.
    pub outcome: WitnessOutcome,
}

/// How a log compares with a head witnessed for it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WitnessOutcome {
    /// The log has the record at the head's sequence, with the head's hash.
    Matches,
    /// The log ends before the head's sequence: its tail was erased
    /// (truncated or rolled back).
    LogEndsBefore {
        /// The log's last sequence number (0 when empty).
        log_end: u64,
    },
    /// The record at the head's sequence has another hash: the log was
    /// rewritten at or before it.
    HashMismatch {
        /// The hash stored at that sequence.
        found: [u8; 32],
    },
}

impl WitnessCheck {
    /// Whether the log matches the head.
    pub fn is_ok(&self) -> bool {
        self.outcome == WitnessOutcome::Matches
    }
}

impl VerifyReport {
    /// Whether everything verified.
    pub fn is_ok(&self) -> bool {
        self.failure.is_none()
    }
}

struct Walk<'a> {
    verifier: VerifyMacFn<'a>,
    report: VerifyReport,
}

impl Walk<'_> {
    fn fail(mut self, seq: u64, reason: VerifyFailureReason) -> VerifyReport {
        self.report.failure = Some(VerifyFailure { seq, reason });
        self.report
    }

    /// Checks one checkpoint against the head it claims; `Ok(Err(reason))` is a bad checkpoint.
    fn check_checkpoint(
        &self,
        key_seq: u64,
        value: &[u8],
        head: &[u8; 32],
    ) -> Result<Result<(), VerifyFailureReason>, StorageError> {
        let cp = match Checkpoint::decode(value) {
            Ok(cp) if cp.seq == key_seq => cp,
            _ => return Ok(Err(VerifyFailureReason::CheckpointUndecodable)),
        };
        if cp.head_hash != *head {
            return Ok(Err(VerifyFailureReason::CheckpointHeadMismatch));
        }
        let msg = Checkpoint::mac_message(cp.seq, cp.time_micros, &cp.head_hash);
        let ok =
            (self.verifier)(&msg, &cp.mac).map_err(|source| StorageError::CheckpointVerifier {
                seq: cp.seq,
                source,
            })?;
        Ok(if ok {
            Ok(())
        } else {
            Err(VerifyFailureReason::CheckpointMacInvalid)
        })
    }
}

impl AuditReader {
    /// Walks the chain and checks the checkpoints; see the module docs. Returns
    /// `Err` only if the walk itself could not be done (I/O, verifier error).
    ///
    /// # Errors
    ///
    /// [`StorageError::Db`] if RocksDB fails and
    /// [`StorageError::CheckpointVerifier`] if `verifier` returns an error.
    /// Tampering is not an error: it is reported in [`VerifyReport::failure`].
    pub fn verify(
        &self,
        options: &VerifyOptions,
        verifier: VerifyMacFn<'_>,
    ) -> Result<VerifyReport, StorageError> {
        let db = &self.db;
        let mut walk = Walk {
            verifier,
            report: VerifyReport {
                records: 0,
                last_good_seq: 0,
                head_hash: GENESIS_HASH,
                checkpoints_verified: 0,
                last_checkpoint_seq: None,
                uncheckpointed_tail: 0,
                failure: None,
                witnessed: Vec::new(),
            },
        };
        let mut witnessed = std::collections::BTreeMap::<String, WitnessedHead>::new();
        let mut expected = 1u64;
        if let VerifyStart::Checkpoint(s) = options.start {
            let Some(v) = db.get(CF_AUDIT_CHECKPOINTS, &schema::seq_key(s))? else {
                return Ok(walk.fail(s, VerifyFailureReason::StartCheckpointMissing));
            };
            let cp = match Checkpoint::decode(&v) {
                Ok(cp) if cp.seq == s => cp,
                _ => return Ok(walk.fail(s, VerifyFailureReason::CheckpointUndecodable)),
            };
            if let Err(reason) = walk.check_checkpoint(s, &v, &cp.head_hash)? {
                return Ok(walk.fail(s, reason));
            }
            walk.report.checkpoints_verified = 1;
            walk.report.last_checkpoint_seq = Some(s);
            walk.report.last_good_seq = s;
            walk.report.head_hash = cp.head_hash;
            expected = s.saturating_add(1);
        }

        let start_key = schema::seq_key(expected);
        let mut cps = db
            .db
            .iterator_cf(
                db.cf(CF_AUDIT_CHECKPOINTS)?,
                IteratorMode::From(&start_key, Direction::Forward),
            )
            .peekable();
        let records = db.db.iterator_cf(
            db.cf(CF_AUDIT)?,
            IteratorMode::From(&start_key, Direction::Forward),
        );
        let mut since_checkpoint = 0u64;
        for item in records {
            let (k, v) = item.map_err(StorageError::db("iterate audit"))?;
            let Some(seq) = schema::decode_seq_key(&k) else {
                return Ok(walk.fail(expected, VerifyFailureReason::BadKey));
            };
            if seq != expected {
                return Ok(walk.fail(expected, VerifyFailureReason::Gap { found: seq }));
            }
            let rec = match AuditRecord::decode(&v) {
                Ok(r) => r,
                Err(detail) => {
                    return Ok(walk.fail(seq, VerifyFailureReason::Undecodable { detail }));
                }
            };
            if rec.seq != seq {
                return Ok(walk.fail(
                    seq,
                    VerifyFailureReason::SequenceMismatch { stored: rec.seq },
                ));
            }
            if rec.prev_hash != walk.report.head_hash {
                return Ok(walk.fail(seq, VerifyFailureReason::PrevHashMismatch));
            }
            if !rec.hash_is_valid()? {
                return Ok(walk.fail(seq, VerifyFailureReason::HashMismatch));
            }
            since_checkpoint += 1;
            // Checkpoints at or before this record.
            while let Some(item) = cps.next_if(|item| match item {
                Ok((ck, _)) => schema::decode_seq_key(ck).is_none_or(|c| c <= seq),
                Err(_) => true,
            }) {
                let (ck, cv) = item.map_err(StorageError::db("iterate audit checkpoints"))?;
                let Some(cseq) = schema::decode_seq_key(&ck) else {
                    return Ok(walk.fail(seq, VerifyFailureReason::CheckpointUndecodable));
                };
                if cseq < seq {
                    return Ok(walk.fail(cseq, VerifyFailureReason::CheckpointWithoutRecord));
                }
                if let Err(reason) = walk.check_checkpoint(cseq, &cv, &rec.hash)? {
                    return Ok(walk.fail(seq, reason));
                }
                walk.report.checkpoints_verified += 1;
                walk.report.last_checkpoint_seq = Some(seq);
                since_checkpoint = 0;
            }
            if options
                .max_records_between_checkpoints
                .is_some_and(|m| since_checkpoint > m)
            {
                return Ok(walk.fail(seq, VerifyFailureReason::MissingCheckpoint));
            }
            for w in &rec.witnessed {
                if witnessed.get(&w.node).is_none_or(|old| old.seq <= w.seq) {
                    witnessed.insert(w.node.clone(), w.clone());
                }
            }
            walk.report.witnessed = witnessed.values().cloned().collect();
            walk.report.records += 1;
            walk.report.last_good_seq = seq;
            walk.report.head_hash = rec.hash;
            walk.report.uncheckpointed_tail = since_checkpoint;
            expected = seq.saturating_add(1);
        }
        if let Some(item) = cps.next() {
            let (ck, _) = item.map_err(StorageError::db("iterate audit checkpoints"))?;
            let cseq = schema::decode_seq_key(&ck).unwrap_or(expected);
            return Ok(walk.fail(cseq, VerifyFailureReason::CheckpointWithoutRecord));
        }
        Ok(walk.report)
    }

    /// Compares this log with heads other nodes witnessed for it (design note
    /// §2.3.6): each must be at or before the log's end and match the hash of
    /// the record at its sequence. Chain validity is [`AuditReader::verify`]'s
    /// business; run both. The heads' `node` fields are not checked (the
    /// caller picks the heads witnessed for this node).
    ///
    /// # Errors
    ///
    /// [`StorageError::Db`] if RocksDB fails; [`StorageError::Corrupt`] if a
    /// record at a witnessed sequence does not decode.
    pub fn check_witnessed(
        &self,
        heads: &[WitnessedHead],
    ) -> Result<Vec<WitnessCheck>, StorageError> {
        let log_end = self.last_seq()?;
        heads
            .iter()
            .map(|head| {
                let outcome = match self.get(head.seq)? {
                    Some(rec) if rec.hash == head.hash => WitnessOutcome::Matches,
                    Some(rec) => WitnessOutcome::HashMismatch { found: rec.hash },
                    // A hole below the end is the chain's failure (a gap);
                    // here it still means the witnessed record is gone.
                    None if head.seq <= log_end => WitnessOutcome::HashMismatch { found: [0; 32] },
                    None => WitnessOutcome::LogEndsBefore { log_end },
                };
                Ok(WitnessCheck {
                    head: head.clone(),
                    outcome,
                })
            })
            .collect()
    }
}
