//! The ledger of a restore (design note §1.6 rule 1): audit records written
//! after the backup, read from the audit log of the data directory being
//! replaced or from an audit export (`kms audit export`, JSON lines). The
//! destructions among them are replayed on the restored catalogue; the
//! version numbers they name are never allocated again.

use std::io::BufRead;
use std::path::Path;

use kms_storage::{AuditFilter, ResultCode, Storage};

use super::BackupError;

/// The audit operations a restore treats as destructions (their key is made
/// a tombstone again, its versions destroyed and their blobs erased): today
/// `DeleteKeyMaterial`, the scheduler's execution of a key deletion, the
/// only operation that destroys key material (design note §1.6 names the
/// family `DestroyKeyVersion`/`Delete*`; no RPC destroys a single version
/// yet). Only records whose result is OK count.
pub const DESTRUCTION_OPERATIONS: &[&str] = &["DeleteKeyMaterial"];

/// One audit record of the ledger, as much of it as a restore needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    /// Sequence number in the chain it comes from.
    pub seq: u64,
    /// The record's chain hash, hex, when known.
    pub hash: Option<String>,
    /// The operation's audit name (`"DeleteKeyMaterial"`).
    pub operation: String,
    /// The key it names, if any.
    pub key_id: Option<String>,
    /// The key version it names, if any.
    pub key_version: Option<u32>,
    /// Whether it succeeded.
    pub ok: bool,
}

impl LedgerEntry {
    /// Whether this record is a destruction to replay.
    pub fn is_destruction(&self) -> bool {
        self.ok && DESTRUCTION_OPERATIONS.contains(&self.operation.as_str())
    }
}

/// Keeps the entries after the backup's head when the ledger holds the
/// head itself (same sequence number and hash: the same chain), else all
/// of them: a ledger that does not contain the backup's head (another
/// chain, or an export starting later) cannot be placed relative to it,
/// and replaying a destruction twice is harmless (a tombstone stays one).
fn after_head(entries: Vec<LedgerEntry>, head_seq: u64, head_hash: &str) -> Vec<LedgerEntry> {
    let holds_head = head_seq > 0
        && entries
            .iter()
            .any(|e| e.seq == head_seq && e.hash.as_deref() == Some(head_hash));
    if holds_head {
        entries.into_iter().filter(|e| e.seq > head_seq).collect()
    } else {
        entries
    }
}

/// The ledger in the audit log of `storage` (the data directory being
/// replaced).
///
/// # Errors
/// [`BackupError::Storage`] if the log cannot be read.
pub(crate) fn from_storage(
    storage: &Storage,
    head_seq: u64,
    head_hash: &str,
) -> Result<Vec<LedgerEntry>, BackupError> {
    let reader = storage.audit_reader();
    let what = "cannot read the audit log of the data directory being replaced";
    let until = reader.last_seq().map_err(BackupError::storage(what))?;
    // Start at the head itself, so that `after_head` can check its hash.
    let mut after = head_seq.checked_sub(1).filter(|_| head_seq > 0);
    let mut entries = Vec::new();
    loop {
        let page = reader
            .query_range(
                &AuditFilter::default(),
                after,
                until,
                kms_storage::MAX_PAGE_SIZE,
            )
            .map_err(BackupError::storage(what))?;
        entries.extend(page.records.into_iter().map(|r| LedgerEntry {
            seq: r.seq,
            hash: Some(hex::encode(r.hash)),
            operation: r.event.operation,
            key_id: r.event.key_id,
            key_version: r.event.key_version,
            ok: r.event.result == ResultCode::Ok,
        }));
        match page.next_after {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    Ok(after_head(entries, head_seq, head_hash))
}

/// The ledger in an audit export (`kms audit export`: one JSON object per
/// line with `sequence`, `operation`, `key_id`, `key_version`,
/// `result_code`, `hash`; the storage layer's export, with `seq` and
/// `result`, is read too). Blank lines are skipped.
///
/// # Errors
/// [`BackupError::Io`] if the file cannot be read;
/// [`BackupError::LedgerInvalid`] naming the line that is not such an object.
pub(crate) fn from_export(
    path: &Path,
    head_seq: u64,
    head_hash: &str,
) -> Result<Vec<LedgerEntry>, BackupError> {
    let file = std::fs::File::open(path).map_err(BackupError::io("cannot open", path))?;
    let mut entries = Vec::new();
    for (index, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(BackupError::io("cannot read", path))?;
        if line.trim().is_empty() {
            continue;
        }
        let invalid = |reason: &str| BackupError::LedgerInvalid {
            path: path.to_owned(),
            line: index + 1,
            reason: reason.to_owned(),
        };
        let value: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| invalid(&e.to_string()))?;
        let seq = value
            .get("sequence")
            .or_else(|| value.get("seq"))
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| invalid("no sequence number"))?;
        let operation = value
            .get("operation")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| invalid("no operation"))?
            .to_owned();
        let key_id = value
            .get("key_id")
            .and_then(serde_json::Value::as_str)
            .filter(|k| !k.is_empty())
            .map(str::to_owned);
        // The export writes 0 for "no version" (versions start at 1).
        let key_version = value
            .get("key_version")
            .and_then(serde_json::Value::as_u64)
            .and_then(|v| u32::try_from(v).ok())
            .filter(|&v| v > 0);
        let ok = match value.get("result_code").and_then(serde_json::Value::as_u64) {
            Some(code) => code == 0,
            None => matches!(
                value.get("result").and_then(serde_json::Value::as_str),
                Some("OK" | "Ok")
            ),
        };
        entries.push(LedgerEntry {
            seq,
            hash: value
                .get("hash")
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned),
            operation,
            key_id,
            key_version,
            ok,
        });
    }
    Ok(after_head(entries, head_seq, head_hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64, hash: &str, operation: &str) -> LedgerEntry {
        LedgerEntry {
            seq,
            hash: Some(hash.to_owned()),
            operation: operation.to_owned(),
            key_id: Some("k".to_owned()),
            key_version: None,
            ok: true,
        }
    }

    #[test]
    fn entries_after_the_head_when_the_ledger_holds_it_else_all() {
        let entries = vec![
            entry(4, "aa", "Encrypt"),
            entry(5, "bb", "DeleteKeyMaterial"),
            entry(6, "cc", "DeleteKeyMaterial"),
        ];
        let after = after_head(entries.clone(), 5, "bb");
        assert_eq!(after.iter().map(|e| e.seq).collect::<Vec<_>>(), [6]);
        // Same sequence number, another hash: another chain.
        assert_eq!(after_head(entries.clone(), 5, "zz").len(), 3);
        assert_eq!(after_head(entries, 0, "").len(), 3);
    }

    #[test]
    fn only_successful_deletions_are_destructions() {
        let mut e = entry(1, "aa", "DeleteKeyMaterial");
        assert!(e.is_destruction());
        e.ok = false;
        assert!(!e.is_destruction());
        assert!(!entry(1, "aa", "ScheduleKeyDeletion").is_destruction());
    }

    #[test]
    fn reads_the_cli_export_format() {
        let path = std::env::temp_dir().join(format!(
            "kms-ledger-test-{}-{:?}.jsonl",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(
            &path,
            concat!(
                r#"{"sequence":7,"operation":"DeleteKeyMaterial","key_id":"k1","key_version":0,"result_code":0,"result":"OK","hash":"ab"}"#,
                "\n\n",
                r#"{"sequence":8,"operation":"RotateKey","key_id":"k2","key_version":3,"result_code":9,"result":"FAILED_PRECONDITION","hash":"cd"}"#,
                "\n"
            ),
        )
        .expect("write");
        let entries = from_export(&path, 0, "").expect("read");
        assert_eq!(entries.len(), 2);
        assert!(entries[0].is_destruction());
        assert_eq!(entries[0].key_version, None);
        assert_eq!(entries[1].key_version, Some(3));
        assert!(!entries[1].ok);
        std::fs::write(&path, "{\"operation\":\"x\"}\n").expect("write");
        assert!(matches!(
            from_export(&path, 0, ""),
            Err(BackupError::LedgerInvalid { line: 1, .. })
        ));
        let _ = std::fs::remove_file(&path);
    }
}
