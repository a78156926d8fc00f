//! Golden vectors of the per-version use record (`UsageRecord`): the bytes
//! a node stores in the `usage` table (RocksDB column family, etcd prefix).
//! A change to the encoding fails here, so it is a deliberate, visible act
//! (stored records must keep decoding, or need a migration).

use kms_catalogue::UsageRecord;

const FULL: &[u8] = include_bytes!("golden/usage_v1.bin");
const NO_ENCRYPT: &[u8] = include_bytes!("golden/usage_v1_no_encrypt.bin");

#[test]
fn usage_record_v1_golden_vectors_decode_and_encode_byte_for_byte() {
    let full = UsageRecord {
        encrypt_count: 3,
        decrypt_count: 5,
        last_encrypt_ms: Some(1_767_225_600_123),
        last_decrypt_ms: Some(1_767_225_601_456),
        through_seq: 42,
    };
    assert_eq!(UsageRecord::decode(b"k", FULL).expect("decode"), full);
    assert_eq!(full.encode().expect("encode"), FULL);

    // A side never used has no time field at all.
    let no_encrypt = UsageRecord {
        encrypt_count: 0,
        decrypt_count: 1,
        last_encrypt_ms: None,
        last_decrypt_ms: Some(7),
        through_seq: 9,
    };
    assert_eq!(
        UsageRecord::decode(b"k", NO_ENCRYPT).expect("decode"),
        no_encrypt
    );
    assert_eq!(no_encrypt.encode().expect("encode"), NO_ENCRYPT);
}
