//! Golden vectors of the audit record and checkpoint formats. If this test
//! fails, the on-disk format changed: that must be a deliberate act (bump
//! RECORD_FORMAT_V1 / the schema format version), never an accident.

use kms_storage::{
    AuditEvent, AuditRecord, Checkpoint, GENESIS_HASH, RECORD_FORMAT_WITNESS, ResultCode,
    WitnessedHead,
};

const GOLDEN_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/audit_v1.json");
const WITNESS_GOLDEN_PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/golden/audit_witness_v2.json"
);

fn expected() -> (AuditRecord, AuditRecord) {
    let e1 = AuditEvent {
        principal: "spiffe://prod/payments".into(),
        peer: "10.0.0.7:51234".into(),
        request_id: "0f8e9a1c-req".into(),
        operation: "Encrypt".into(),
        key_id: Some("key-00112233445566778899aabbccddeeff".into()),
        key_version: Some(3),
        context_digest: Some([0x5a; 32]),
        result: ResultCode::Ok,
        latency_micros: 412,
    };
    let (r1, _) = AuditRecord::seal(1, 1_760_000_000_000_001, e1, GENESIS_HASH).unwrap();
    let e2 = AuditEvent {
        principal: "opérateur".into(),
        peer: "[::1]:9000".into(),
        request_id: String::new(),
        operation: "ScheduleKeyDeletion".into(),
        key_id: None,
        key_version: None,
        context_digest: None,
        result: ResultCode::PermissionDenied,
        latency_micros: 0,
    };
    let (r2, _) = AuditRecord::seal(2, 1_760_000_000_000_002, e2, r1.hash).unwrap();
    (r1, r2)
}

fn golden() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(GOLDEN_PATH).unwrap()).unwrap()
}

fn hex_field(v: &serde_json::Value, name: &str) -> Vec<u8> {
    hex::decode(v[name].as_str().unwrap()).unwrap()
}

#[test]
fn audit_records_match_golden_vectors() {
    let g = golden();
    let (r1, r2) = expected();
    let vectors = g["records"].as_array().unwrap();
    assert_eq!(vectors.len(), 2);
    for (v, want) in vectors.iter().zip([&r1, &r2]) {
        let bytes = hex_field(v, "encoded");
        let decoded = AuditRecord::decode(&bytes).unwrap();
        assert_eq!(&decoded, want);
        assert_eq!(decoded.encode().unwrap(), bytes, "re-encodes byte for byte");
        assert_eq!(decoded.hash.to_vec(), hex_field(v, "hash"));
        assert!(decoded.hash_is_valid().unwrap());
    }
    assert_eq!(r2.prev_hash, r1.hash);
}

#[test]
fn checkpoint_matches_golden_vector() {
    let g = golden();
    let (_, r2) = expected();
    let v = &g["checkpoint"];
    let msg = Checkpoint::mac_message(2, 1_760_000_000_000_003, &r2.hash);
    assert_eq!(msg, hex_field(v, "mac_message"));
    let cp = Checkpoint {
        seq: 2,
        time_micros: 1_760_000_000_000_003,
        head_hash: r2.hash,
        mac: (crate::mac_fn(crate::MAC_KEY))(&msg).unwrap(),
    };
    let bytes = hex_field(v, "encoded");
    assert_eq!(Checkpoint::decode(&bytes).unwrap(), cp);
    assert_eq!(cp.encode().unwrap(), bytes);
}

/// Rewrites the golden file. Run only to change the format on purpose:
/// `cargo test -p kms-storage --test storage -- --ignored golden::regenerate`.
#[test]
#[ignore = "rewrites the golden vectors"]
fn regenerate() {
    let (r1, r2) = expected();
    let msg = Checkpoint::mac_message(2, 1_760_000_000_000_003, &r2.hash);
    let cp = Checkpoint {
        seq: 2,
        time_micros: 1_760_000_000_000_003,
        head_hash: r2.hash,
        mac: (crate::mac_fn(crate::MAC_KEY))(&msg).unwrap(),
    };
    let rec = |r: &AuditRecord| {
        serde_json::json!({
            "encoded": hex::encode(r.encode().unwrap()),
            "hash": hex::encode(r.hash),
        })
    };
    let doc = serde_json::json!({
        "comment": "kms audit record format 1 and checkpoint format 1; see storage/src/audit/record.rs. MAC key: the tests' MAC_KEY, HMAC-SHA256.",
        "records": [rec(&r1), rec(&r2)],
        "checkpoint": {
            "mac_message": hex::encode(&msg),
            "encoded": hex::encode(cp.encode().unwrap()),
        },
    });
    std::fs::write(
        GOLDEN_PATH,
        serde_json::to_string_pretty(&doc).unwrap() + "\n",
    )
    .unwrap();
}

/// The witness record (format 2) that follows the two format-1 records.
fn expected_witness() -> AuditRecord {
    let (_, r2) = expected();
    let heads = vec![
        WitnessedHead {
            node: "node-2".into(),
            seq: 41,
            hash: [0x11; 32],
            published_ms: 1_760_000_000_123,
            checkpoint_mac: vec![0x22; 32],
        },
        WitnessedHead {
            node: "node-3".into(),
            seq: 7,
            hash: [0x33; 32],
            published_ms: 1_760_000_000_456,
            checkpoint_mac: vec![0x44; 32],
        },
    ];
    let (w, _) = AuditRecord::seal_with_witness(
        3,
        1_760_000_000_000_003,
        AuditEvent::witness(),
        heads,
        r2.hash,
    )
    .unwrap();
    w
}

#[test]
fn witness_record_matches_golden_vector() {
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(WITNESS_GOLDEN_PATH).unwrap()).unwrap();
    let want = expected_witness();
    let v = &g["witness_record"];
    let bytes = hex_field(v, "encoded");
    assert_eq!(bytes[0], RECORD_FORMAT_WITNESS);
    let decoded = AuditRecord::decode(&bytes).unwrap();
    assert_eq!(decoded, want);
    assert_eq!(decoded.encode().unwrap(), bytes, "re-encodes byte for byte");
    assert_eq!(decoded.hash.to_vec(), hex_field(v, "hash"));
    assert!(decoded.hash_is_valid().unwrap());
    assert_eq!(decoded.event.operation, kms_storage::WITNESS_OPERATION);
    // It chains onto the format-1 records of the other golden file.
    let (_, r2) = expected();
    assert_eq!(decoded.prev_hash, r2.hash);
    // A record without heads is format 1, byte for byte as before: the
    // witness field changes nothing for the records older builds wrote.
    let (plain, plain_bytes) = AuditRecord::seal_with_witness(
        2,
        r2.time_micros,
        r2.event.clone(),
        Vec::new(),
        r2.prev_hash,
    )
    .unwrap();
    assert_eq!(plain, r2);
    assert_eq!(plain_bytes, r2.encode().unwrap());
    assert_eq!(plain_bytes[0], kms_storage::RECORD_FORMAT_V1);
}

/// Rewrites the witness golden file. Run only to change the format on purpose:
/// `cargo test -p kms-storage --test storage -- --ignored golden::regenerate_witness`.
#[test]
#[ignore = "rewrites the golden vectors"]
fn regenerate_witness() {
    let w = expected_witness();
    let doc = serde_json::json!({
        "comment": "kms audit witness record (record format 2), chained after the two records of audit_v1.json; see storage/src/audit/record.rs.",
        "witness_record": {
            "encoded": hex::encode(w.encode().unwrap()),
            "hash": hex::encode(w.hash),
        },
    });
    std::fs::write(
        WITNESS_GOLDEN_PATH,
        serde_json::to_string_pretty(&doc).unwrap() + "\n",
    )
    .unwrap();
}
