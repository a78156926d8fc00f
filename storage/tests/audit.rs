//! The audit log: appends, reopen, concurrency, tamper detection, forged
//! chains, checkpoint failures, query and export.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kms_storage::{
    AuditConfig, AuditFilter, AuditRecord, CallbackError, Checkpoint, ResultCode, StorageError,
    VerifyFailure, VerifyFailureReason, VerifyOptions, VerifyStart, schema,
};

use crate::{MAC_KEY, config, event, mac_fn, open, raw_db, verify_mac};

fn opts(every: u64) -> VerifyOptions {
    VerifyOptions {
        start: VerifyStart::Genesis,
        max_records_between_checkpoints: Some(every),
    }
}

/// A log of `n` records with a checkpoint every `every`.
fn fill(dir: &Path, n: u64, every: u64) {
    let s = open(dir);
    let log = s.open_audit_log(config(every), mac_fn(MAC_KEY)).unwrap();
    for i in 1..=n {
        assert_eq!(log.append(event(i)).unwrap(), i);
    }
}

#[test]
fn append_round_trip_reopen_and_verify() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = open(dir.path());
        let log = s.open_audit_log(config(4), mac_fn(MAC_KEY)).unwrap();
        for i in 1..=10 {
            assert_eq!(log.append(event(i)).unwrap(), i);
        }
        assert_eq!(log.head().0, 10);
        let r = s.audit_reader().get(3).unwrap().unwrap();
        assert_eq!(r.seq, 3);
        assert_eq!(r.event, event(3));
        assert!(r.hash_is_valid().unwrap());
        assert_eq!(r.prev_hash, s.audit_reader().get(2).unwrap().unwrap().hash);
    }
    let s = open(dir.path());
    {
        // The writer resumes the chain where it stopped.
        let log = s.open_audit_log(config(4), mac_fn(MAC_KEY)).unwrap();
        assert_eq!(log.head().0, 10);
        assert_eq!(log.append(event(11)).unwrap(), 11);
    }
    let report = s.audit_reader().verify(&opts(4), &verify_mac).unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.records, 11);
    assert_eq!(report.last_good_seq, 11);
    // 4, 8 by count; 10 and 11 at the two clean shutdowns.
    let cps: Vec<u64> = s
        .audit_reader()
        .checkpoints(None, 100)
        .unwrap()
        .iter()
        .map(|c| c.seq)
        .collect();
    assert_eq!(cps, vec![4, 8, 10, 11]);
    assert_eq!(report.checkpoints_verified, 4);
    assert_eq!(report.uncheckpointed_tail, 0);
    // Record times never decrease.
    let page = s
        .audit_reader()
        .query(&AuditFilter::default(), None, 100)
        .unwrap();
    assert!(
        page.records
            .windows(2)
            .all(|w| w[0].time_micros <= w[1].time_micros)
    );
}

#[test]
fn one_writer_per_database() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let log = s.open_audit_log(config(10), mac_fn(MAC_KEY)).unwrap();
    assert!(matches!(
        s.open_audit_log(config(10), mac_fn(MAC_KEY)),
        Err(StorageError::AuditAlreadyOpen)
    ));
    drop(log);
    s.open_audit_log(config(10), mac_fn(MAC_KEY)).unwrap();
}

#[test]
fn concurrent_appends_form_a_gapless_verified_chain() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let threads = 16;
    let per_thread = 200u64;
    let seqs = {
        let log = s.open_audit_log(config(50), mac_fn(MAC_KEY)).unwrap();
        let log = &log;
        std::thread::scope(|sc| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    sc.spawn(move || {
                        (0..per_thread)
                            .map(|i| log.append(event(t * 1000 + i)).unwrap())
                            .collect::<Vec<u64>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect::<Vec<u64>>()
        })
    };
    let total = threads * per_thread;
    let unique: BTreeSet<u64> = seqs.iter().copied().collect();
    assert_eq!(
        unique.len() as u64,
        total,
        "every caller got its own sequence"
    );
    assert_eq!(unique, (1..=total).collect());
    let report = s.audit_reader().verify(&opts(50), &verify_mac).unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.records, total);
}

#[test]
fn submit_and_callback_apis() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let log = s.open_audit_log(config(0), mac_fn(MAC_KEY)).unwrap();
    let handles: Vec<_> = (1..=5).map(|i| log.submit(event(i)).unwrap()).collect();
    let seqs: Vec<u64> = handles.into_iter().map(|h| h.wait().unwrap()).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    let (tx, rx) = std::sync::mpsc::channel();
    log.submit_with_callback(event(6), move |r| tx.send(r).unwrap())
        .unwrap();
    assert_eq!(rx.recv().unwrap().unwrap(), 6);
    // Oversized fields are refused up front, without consuming a sequence number.
    let mut big = event(7);
    big.principal = "p".repeat(70_000);
    assert!(matches!(
        log.append(big),
        Err(StorageError::AuditFieldTooLong {
            field: "principal",
            ..
        })
    ));
    assert_eq!(log.append(event(8)).unwrap(), 7);
}

#[test]
fn altered_record_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), 50, 10);
    {
        let db = raw_db(dir.path());
        let cf = db.cf_handle(schema::CF_AUDIT).unwrap();
        let mut v = db.get_cf(cf, 23u64.to_be_bytes()).unwrap().unwrap();
        // Flip a byte inside the principal ("svc-2" -> "svc-3").
        let pos = v.windows(5).position(|w| w == b"svc-2").unwrap() + 4;
        v[pos] = b'3';
        db.put_cf(cf, 23u64.to_be_bytes(), v).unwrap();
    }
    let s = open(dir.path());
    let report = s.audit_reader().verify(&opts(10), &verify_mac).unwrap();
    assert_eq!(
        report.failure,
        Some(VerifyFailure {
            seq: 23,
            reason: VerifyFailureReason::HashMismatch
        })
    );
    assert_eq!(report.last_good_seq, 22);
}

#[test]
fn undecodable_record_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), 12, 10);
    {
        let db = raw_db(dir.path());
        let cf = db.cf_handle(schema::CF_AUDIT).unwrap();
        db.put_cf(cf, 7u64.to_be_bytes(), b"\x01garbage").unwrap();
    }
    let s = open(dir.path());
    let report = s.audit_reader().verify(&opts(10), &verify_mac).unwrap();
    let f = report.failure.unwrap();
    assert_eq!(f.seq, 7);
    assert!(matches!(f.reason, VerifyFailureReason::Undecodable { .. }));
}

#[test]
fn deleted_records_are_detected() {
    // A record deleted from the middle leaves a gap.
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), 30, 10);
    {
        let db = raw_db(dir.path());
        let cf = db.cf_handle(schema::CF_AUDIT).unwrap();
        db.delete_cf(cf, 17u64.to_be_bytes()).unwrap();
    }
    let s = open(dir.path());
    let report = s.audit_reader().verify(&opts(10), &verify_mac).unwrap();
    assert_eq!(
        report.failure,
        Some(VerifyFailure {
            seq: 17,
            reason: VerifyFailureReason::Gap { found: 18 }
        })
    );
    drop(s);

    // Deleting the first record is a gap at 1.
    {
        let db = raw_db(dir.path());
        let cf = db.cf_handle(schema::CF_AUDIT).unwrap();
        db.delete_cf(cf, 1u64.to_be_bytes()).unwrap();
    }
    let s = open(dir.path());
    let report = s.audit_reader().verify(&opts(10), &verify_mac).unwrap();
    assert_eq!(report.failure.unwrap().seq, 1);
    drop(s);

    // Truncating the tail is caught by the checkpoint that certified it.
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), 30, 10);
    {
        let db = raw_db(dir.path());
        let cf = db.cf_handle(schema::CF_AUDIT).unwrap();
        for seq in 25..=30u64 {
            db.delete_cf(cf, seq.to_be_bytes()).unwrap();
        }
    }
    let s = open(dir.path());
    let report = s.audit_reader().verify(&opts(10), &verify_mac).unwrap();
    assert_eq!(
        report.failure,
        Some(VerifyFailure {
            seq: 30,
            reason: VerifyFailureReason::CheckpointWithoutRecord
        })
    );
}

/// What an attacker with write access but without the MAC key can do: rewrite
/// a record and recompute every later hash (and checkpoint MACs with a key of
/// their own).
fn forge(dir: &Path, from: u64, forge_checkpoints: bool) {
    let db = raw_db(dir);
    let cf = db.cf_handle(schema::CF_AUDIT).unwrap();
    let mut prev = AuditRecord::decode(&db.get_cf(cf, (from - 1).to_be_bytes()).unwrap().unwrap())
        .unwrap()
        .hash;
    let mut heads = Vec::new();
    let mut seq = from;
    while let Some(v) = db.get_cf(cf, seq.to_be_bytes()).unwrap() {
        let mut rec = AuditRecord::decode(&v).unwrap();
        if seq == from {
            rec.event.result = ResultCode::PermissionDenied;
        }
        let (sealed, bytes) = AuditRecord::seal(rec.seq, rec.time_micros, rec.event, prev).unwrap();
        db.put_cf(cf, seq.to_be_bytes(), bytes).unwrap();
        prev = sealed.hash;
        heads.push((seq, sealed.hash));
        seq += 1;
    }
    if forge_checkpoints {
        let cpf = db.cf_handle(schema::CF_AUDIT_CHECKPOINTS).unwrap();
        for (seq, head) in heads {
            if let Some(v) = db.get_cf(cpf, seq.to_be_bytes()).unwrap() {
                let mut cp = Checkpoint::decode(&v).unwrap();
                cp.head_hash = head;
                let msg = Checkpoint::mac_message(cp.seq, cp.time_micros, &head);
                cp.mac = (mac_fn(b"attacker's own key"))(&msg).unwrap();
                db.put_cf(cpf, seq.to_be_bytes(), cp.encode().unwrap())
                    .unwrap();
            }
        }
    }
}

#[test]
fn forged_chain_fails_checkpoint_verification() {
    // Recomputed chain, checkpoints left alone: head hashes no longer match.
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), 40, 10);
    forge(dir.path(), 23, false);
    let s = open(dir.path());
    let report = s.audit_reader().verify(&opts(10), &verify_mac).unwrap();
    assert_eq!(
        report.failure,
        Some(VerifyFailure {
            seq: 30,
            reason: VerifyFailureReason::CheckpointHeadMismatch
        })
    );
    drop(s);

    // Recomputed chain and re-MACed checkpoints without the real key: bad MAC.
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), 40, 10);
    forge(dir.path(), 23, true);
    let s = open(dir.path());
    let report = s.audit_reader().verify(&opts(10), &verify_mac).unwrap();
    assert_eq!(
        report.failure,
        Some(VerifyFailure {
            seq: 30,
            reason: VerifyFailureReason::CheckpointMacInvalid
        })
    );
    // The hash chain alone would not have noticed: only the MAC does.
    let accept_any = |_: &[u8], _: &[u8]| -> Result<bool, CallbackError> { Ok(true) };
    assert!(
        s.audit_reader()
            .verify(&opts(10), &accept_any)
            .unwrap()
            .is_ok()
    );

    // Deleting the checkpoints too is caught by the checkpoint spacing rule.
    drop(s);
    {
        let db = raw_db(dir.path());
        let cpf = db.cf_handle(schema::CF_AUDIT_CHECKPOINTS).unwrap();
        for seq in [30u64, 40] {
            db.delete_cf(cpf, seq.to_be_bytes()).unwrap();
        }
    }
    let s = open(dir.path());
    let report = s.audit_reader().verify(&opts(10), &verify_mac).unwrap();
    assert_eq!(
        report.failure,
        Some(VerifyFailure {
            seq: 31,
            reason: VerifyFailureReason::MissingCheckpoint
        })
    );
}

#[test]
fn verify_from_a_trusted_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), 35, 10);
    {
        let db = raw_db(dir.path());
        let cf = db.cf_handle(schema::CF_AUDIT).unwrap();
        db.delete_cf(cf, 5u64.to_be_bytes()).unwrap();
    }
    let s = open(dir.path());
    let r = s.audit_reader();
    assert_eq!(
        r.verify(&opts(10), &verify_mac)
            .unwrap()
            .failure
            .unwrap()
            .seq,
        5
    );
    let from20 = VerifyOptions {
        start: VerifyStart::Checkpoint(20),
        max_records_between_checkpoints: Some(10),
    };
    let report = r.verify(&from20, &verify_mac).unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.records, 15);
    assert_eq!(report.last_good_seq, 35);
    let missing = VerifyOptions {
        start: VerifyStart::Checkpoint(21),
        max_records_between_checkpoints: None,
    };
    assert_eq!(
        r.verify(&missing, &verify_mac)
            .unwrap()
            .failure
            .unwrap()
            .reason,
        VerifyFailureReason::StartCheckpointMissing
    );
}

#[test]
fn mac_failure_fails_the_batch_without_poisoning() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let hsm_up = Arc::new(AtomicBool::new(true));
    let up = Arc::clone(&hsm_up);
    let mac: kms_storage::MacFn = Box::new(move |msg: &[u8]| -> Result<Vec<u8>, CallbackError> {
        if up.load(Ordering::SeqCst) {
            (mac_fn(MAC_KEY))(msg)
        } else {
            Err("HSM unavailable".into())
        }
    });
    let log = s.open_audit_log(config(3), mac).unwrap();
    assert_eq!(log.append(event(1)).unwrap(), 1);
    assert_eq!(log.append(event(2)).unwrap(), 2);
    hsm_up.store(false, Ordering::SeqCst);
    // Record 3 needs a checkpoint the HSM cannot MAC: it is refused, not written.
    assert!(matches!(
        log.append(event(3)),
        Err(StorageError::CheckpointMac { seq: 3, .. })
    ));
    assert!(!log.is_poisoned());
    assert!(s.audit_reader().get(3).unwrap().is_none());
    hsm_up.store(true, Ordering::SeqCst);
    assert_eq!(log.append(event(4)).unwrap(), 3);
    drop(log);
    let report = s.audit_reader().verify(&opts(3), &verify_mac).unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(s.audit_reader().get(3).unwrap().unwrap().event, event(4));
}

#[test]
fn timed_checkpoint_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let log = s
        .open_audit_log(
            AuditConfig {
                checkpoint_every_records: 0,
                checkpoint_interval: Some(Duration::from_millis(20)),
                ..AuditConfig::default()
            },
            mac_fn(MAC_KEY),
        )
        .unwrap();
    log.append(event(1)).unwrap();
    log.append(event(2)).unwrap();
    // Not a timing assertion: wait (bounded) for the writer's timer to fire.
    let deadline = Instant::now() + Duration::from_secs(20);
    let covers_head = || {
        let cps = s.audit_reader().checkpoints(None, 10).unwrap();
        cps.last().is_some_and(|c| c.seq == 2)
    };
    while !covers_head() {
        assert!(Instant::now() < deadline, "no timed checkpoint was written");
        std::thread::sleep(Duration::from_millis(10));
    }
    let cps = s.audit_reader().checkpoints(None, 10).unwrap();
    assert_eq!(cps.last().unwrap().head_hash, log.head().1);
}

#[test]
fn query_filters_and_pages() {
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), 60, 25);
    let s = open(dir.path());
    let r = s.audit_reader();
    let all = r.query(&AuditFilter::default(), None, 1000).unwrap();
    assert_eq!(all.records.len(), 60);
    assert_eq!(all.next_after, None);

    let f = AuditFilter {
        principal: Some("svc-1".into()),
        operation: Some("Encrypt".into()),
        ..AuditFilter::default()
    };
    let expected: Vec<u64> = (1..=60).filter(|i| i % 3 == 1 && i % 2 == 0).collect();
    let mut got = Vec::new();
    let mut after = None;
    loop {
        let page = r.query(&f, after, 3).unwrap();
        assert!(page.records.len() <= 3);
        got.extend(page.records.iter().map(|x| x.seq));
        match page.next_after {
            Some(a) => after = Some(a),
            None => break,
        }
    }
    assert_eq!(got, expected);

    let key = format!("key-{:032x}", 2);
    let by_key = r
        .query(
            &AuditFilter {
                key_id: Some(key.clone()),
                ..AuditFilter::default()
            },
            None,
            1000,
        )
        .unwrap();
    assert_eq!(
        by_key.records.iter().map(|x| x.seq).collect::<Vec<_>>(),
        (1..=60).filter(|i| i % 4 == 2).collect::<Vec<_>>()
    );

    // Time range [t(10), t(20)) selects records by their commit times.
    let t10 = r.get(10).unwrap().unwrap().time_micros;
    let t20 = r.get(20).unwrap().unwrap().time_micros;
    let ranged = r
        .query(
            &AuditFilter {
                from_micros: Some(t10),
                to_micros: Some(t20),
                ..AuditFilter::default()
            },
            None,
            1000,
        )
        .unwrap();
    let want: Vec<u64> = all
        .records
        .iter()
        .filter(|x| x.time_micros >= t10 && x.time_micros < t20)
        .map(|x| x.seq)
        .collect();
    assert!(!want.is_empty());
    assert_eq!(
        ranged.records.iter().map(|x| x.seq).collect::<Vec<_>>(),
        want
    );
}

#[test]
fn export_writes_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), 9, 5);
    let s = open(dir.path());
    let mut out = Vec::new();
    let f = AuditFilter {
        operation: Some("Decrypt".into()),
        ..AuditFilter::default()
    };
    let n = s.audit_reader().export_jsonl(&f, &mut out).unwrap();
    assert_eq!(n, 5);
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5);
    let first = &lines[0];
    assert_eq!(first["seq"], 1);
    assert_eq!(first["operation"], "Decrypt");
    assert_eq!(first["result"], "OK");
    assert_eq!(first["principal"], "svc-1");
    assert_eq!(first["key_version"], 1);
    assert_eq!(first["context_digest"], hex::encode([1u8; 32]));
    assert_eq!(first["hash"].as_str().unwrap().len(), 64);
    let mut fields: Vec<&str> = first
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        vec![
            "context_digest",
            "hash",
            "key_id",
            "key_version",
            "latency_micros",
            "operation",
            "peer",
            "prev_hash",
            "principal",
            "request_id",
            "result",
            "seq",
            "time_micros"
        ]
    );
}
