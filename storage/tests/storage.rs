//! Integration tests of kms-storage on real RocksDB directories (one binary).
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod audit;
mod backup;
mod catalogue;
mod catalogue_fixture;
mod crash;
mod golden;
mod invariants;
mod rewrap;
mod witness;
mod wrapped_fixture;

use std::path::Path;

use hmac::{Hmac, Mac};
use kms_storage::{
    AuditConfig, AuditEvent, CallbackError, MacFn, ResultCode, Storage, StorageOptions,
};
use sha2::Sha256;

pub const MAC_KEY: &[u8] = b"test checkpoint key, stands in for the HSM";

pub fn open(dir: &Path) -> Storage {
    Storage::open(dir, &StorageOptions::default()).unwrap()
}

fn hmac(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).unwrap();
    m.update(msg);
    m.finalize().into_bytes().to_vec()
}

/// The checkpoint MAC the tests' "HSM" computes.
pub fn mac_fn(key: &'static [u8]) -> MacFn {
    Box::new(move |msg: &[u8]| -> Result<Vec<u8>, CallbackError> { Ok(hmac(key, msg)) })
}

/// Verifies with [`MAC_KEY`].
pub fn verify_mac(msg: &[u8], mac: &[u8]) -> Result<bool, CallbackError> {
    let mut m = Hmac::<Sha256>::new_from_slice(MAC_KEY).unwrap();
    m.update(msg);
    Ok(m.verify_slice(mac).is_ok())
}

pub fn config(every: u64) -> AuditConfig {
    AuditConfig {
        checkpoint_every_records: every,
        checkpoint_interval: None,
        ..AuditConfig::default()
    }
}

pub fn event(i: u64) -> AuditEvent {
    AuditEvent {
        principal: format!("svc-{}", i % 3),
        peer: "127.0.0.1:5000".into(),
        request_id: format!("req-{i}"),
        operation: if i.is_multiple_of(2) {
            "Encrypt"
        } else {
            "Decrypt"
        }
        .into(),
        key_id: Some(format!("key-{:032x}", i % 4)),
        key_version: Some(1),
        context_digest: Some([i as u8; 32]),
        result: ResultCode::Ok,
        latency_micros: 100 + i,
    }
}

/// Opens the database directly with RocksDB, to tamper with it as an attacker could.
pub fn raw_db(dir: &Path) -> rocksdb::DB {
    let opts = rocksdb::Options::default();
    let cfs = rocksdb::DB::list_cf(&opts, dir).unwrap();
    rocksdb::DB::open_cf(&opts, dir, cfs).unwrap()
}
