//! Golden vectors for envelope formats v1 (client/tests/golden/) and v2
//! (client/tests/golden/v2/): produced by the deterministic functions below
//! (fixed data key, message ids, wrapped keys and contexts), checked in, and
//! verified byte for byte here and, by an independent implementation, by
//! tests/scripts/envelope_check.py. A change to the format is a new format
//! version, never an edit of these files: the v1 files predate v2 and must
//! stay as they are.
//!
//! Add a vector: `KMS_WRITE_GOLDEN=1 cargo test -p kms-client golden` writes
//! only the files that are missing (to change a set's vectors.json, delete it
//! first and review `git diff`); the test then compares every file, so a
//! checked-in vector is never rewritten silently.

use std::path::PathBuf;

use serde_json::json;
use sha2::{Digest as _, Sha256};

use super::format::Header;
use super::*;

const DATA_KEY: [u8; 32] = {
    let mut key = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        key[i] = i as u8;
        i += 1;
    }
    key
};

struct Vector {
    name: &'static str,
    chunk_size: u32,
    plaintext_len: usize,
    context: &'static [(&'static str, &'static str)],
}

const VECTORS: &[Vector] = &[
    Vector {
        name: "empty",
        chunk_size: 16,
        plaintext_len: 0,
        context: &[],
    },
    Vector {
        name: "one-byte",
        chunk_size: 16,
        plaintext_len: 1,
        context: &[("tenant", "acme")],
    },
    Vector {
        name: "exact-chunk",
        chunk_size: 16,
        plaintext_len: 16,
        context: &[("tenant", "acme")],
    },
    Vector {
        name: "multi-chunk",
        chunk_size: 16,
        plaintext_len: 53,
        context: &[("tenant", "acme"), ("purpose", "backup")],
    },
    Vector {
        name: "utf8-context",
        chunk_size: 7,
        plaintext_len: 20,
        context: &[("name", "Zoë"), ("emoji", "🔑"), ("empty", "")],
    },
    Vector {
        name: "default-chunk",
        chunk_size: DEFAULT_CHUNK_SIZE,
        plaintext_len: 2 * 65536 + 100,
        context: &[("tenant", "acme")],
    },
];

fn golden_dir(version: FormatVersion) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    match version {
        FormatVersion::V1 => dir,
        _ => dir.join("v2"),
    }
}

/// Byte i of vector n's message id: (64 n + i) mod 256 in v1, that xor 0x80
/// in v2 (so no message id is shared between the two sets).
fn message_id(version: FormatVersion, index: usize) -> [u8; 32] {
    let flip = if version == FormatVersion::V1 {
        0
    } else {
        0x80
    };
    core::array::from_fn(|i| ((0x40 * index + i) as u8) ^ flip)
}

/// The plaintext of every vector: byte i is i mod 251.
fn plaintext(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

fn wrapped_data_key() -> Vec<u8> {
    (0..104u32).map(|i| ((i * 7 + 1) % 256) as u8).collect()
}

/// The wrapped key of the v2 "rewrapped" vector: another length, other bytes.
fn other_wrapped_data_key() -> Vec<u8> {
    (0..117u32).map(|i| ((i * 13 + 5) % 256) as u8).collect()
}

fn context(pairs: &[(&str, &str)]) -> EncryptionContext {
    EncryptionContext::new(pairs.iter().copied()).expect("valid context")
}

async fn seal(version: FormatVersion, index: usize, vector: &Vector) -> Vec<u8> {
    let header = Header::with_message_id(
        version,
        vector.chunk_size,
        message_id(version, index),
        wrapped_data_key(),
        context(vector.context),
    )
    .expect("header");
    let mut out = Vec::new();
    let data = plaintext(vector.plaintext_len);
    encrypt_with_header(
        &DataKey::from_bytes(DATA_KEY),
        header,
        &mut data.as_slice(),
        &mut out,
    )
    .await
    .expect("encrypt");
    out
}

fn context_json(pairs: &[(&str, &str)]) -> serde_json::Value {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), json!(v)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// Every file of the golden directory of `version`, as the deterministic
/// function makes it.
async fn expected_files(version: FormatVersion) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    let mut valid = Vec::new();
    let mut multi = Vec::new();
    for (index, vector) in VECTORS.iter().enumerate() {
        let envelope = seal(version, index, vector).await;
        let file = format!("{}.kmse", vector.name);
        valid.push(json!({
            "name": vector.name,
            "file": file,
            "chunk_size": vector.chunk_size,
            "context": context_json(vector.context),
            "plaintext_len": vector.plaintext_len,
            "plaintext_sha256": hex::encode(Sha256::digest(plaintext(vector.plaintext_len))),
            "envelope_sha256": hex::encode(Sha256::digest(&envelope)),
        }));
        if vector.name == "multi-chunk" {
            multi = envelope.clone();
        }
        files.push((file, envelope));
    }
    // Invalid envelopes derived from multi-chunk (header 195 bytes, then chunks
    // of 32 bytes: 3 full, one final with 5 bytes of plaintext).
    let header_len = multi.len() - (3 * 32 + 5 + 16);
    let chunk = |i: usize| header_len + 32 * i..header_len + 32 * (i + 1);
    if version == FormatVersion::V2 {
        // multi-chunk rewrapped: another wrapped key, the body byte for byte.
        let header = read_header(&mut &multi[..]).await.expect("header");
        let mut rewrapped = header
            .with_wrapped_data_key(other_wrapped_data_key())
            .expect("rewrap")
            .as_bytes()
            .to_vec();
        rewrapped.extend_from_slice(&multi[header_len..]);
        let multi_vector = &VECTORS[3];
        valid.push(json!({
            "name": "rewrapped",
            "file": "rewrapped.kmse",
            "chunk_size": multi_vector.chunk_size,
            "context": context_json(multi_vector.context),
            "plaintext_len": multi_vector.plaintext_len,
            "plaintext_sha256": hex::encode(Sha256::digest(plaintext(multi_vector.plaintext_len))),
            "envelope_sha256": hex::encode(Sha256::digest(&rewrapped)),
            "wrapped_data_key": hex::encode(other_wrapped_data_key()),
            "body_of": "multi-chunk.kmse",
        }));
        files.push(("rewrapped.kmse".to_owned(), rewrapped));
    }
    let mut swapped = multi[..header_len].to_vec();
    swapped.extend_from_slice(&multi[chunk(1)]);
    swapped.extend_from_slice(&multi[chunk(0)]);
    swapped.extend_from_slice(&multi[chunk(2).start..]);
    let mut appended = multi.clone();
    appended.push(0);
    let mut flipped_id = multi.clone();
    flipped_id[20] ^= 0x01;
    let mut flipped_tag = multi.clone();
    flipped_tag[chunk(1).end - 1] ^= 0x80;
    let mut invalid_files: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", multi[..multi.len() - 1].to_vec()),
        ("dropped-final-chunk", multi[..chunk(2).end].to_vec()),
        ("swapped-chunks", swapped),
        ("appended-byte", appended),
        ("flipped-message-id", flipped_id),
        ("flipped-tag", flipped_tag),
    ];
    if version == FormatVersion::V2 {
        // The v2 envelope relabelled v1: the v1 derivation does not open it.
        let mut downgraded = multi.clone();
        downgraded[4] = format::VERSION_1;
        invalid_files.push(("version-downgrade", downgraded));
        // A changed context byte (another value of the same length).
        let mut flipped_context = multi.clone();
        let last = header_len - 1;
        flipped_context[last] ^= 0x01;
        invalid_files.push(("flipped-context", flipped_context));
    }
    let multi_context = VECTORS[3].context;
    let mut invalid: Vec<serde_json::Value> = invalid_files
        .iter()
        .map(|(name, _)| {
            json!({
                "name": name,
                "file": format!("invalid-{name}.kmse"),
                "context": context_json(multi_context),
            })
        })
        .collect();
    invalid.push(json!({
        "name": "wrong-context",
        "file": "multi-chunk.kmse",
        "context": context_json(&[("tenant", "evil"), ("purpose", "backup")]),
    }));
    for (name, bytes) in invalid_files {
        files.push((format!("invalid-{name}.kmse"), bytes));
    }
    let manifest = match version {
        FormatVersion::V1 => json!({
            "format": "kms envelope v1 (README: Client library and envelope format)",
            "data_key": hex::encode(DATA_KEY),
            "wrapped_data_key": hex::encode(wrapped_data_key()),
            "plaintext": "byte i is i mod 251",
            "message_id": "byte i of vector n (0-based, in this order) is (64 n + i) mod 256",
            "valid": valid,
            "invalid": invalid,
        }),
        _ => json!({
            "format": "kms envelope v2 (README: Envelope format, version 2)",
            "version": 2,
            "data_key": hex::encode(DATA_KEY),
            "wrapped_data_key": hex::encode(wrapped_data_key()),
            "plaintext": "byte i is i mod 251",
            "message_id": "byte i of vector n (0-based, in this order) is ((64 n + i) mod 256) xor 0x80",
            "rewrapped": "rewrapped.kmse is multi-chunk.kmse with the header's wrapped data key replaced (wrapped_data_key of its entry) and the body (every byte after the header) unchanged",
            "valid": valid,
            "invalid": invalid,
        }),
    };
    let mut text = serde_json::to_string_pretty(&manifest).expect("json");
    text.push('\n');
    files.push(("vectors.json".to_owned(), text.into_bytes()));
    files
}

#[tokio::test]
async fn golden_files_match_the_deterministic_function_and_decrypt() {
    let mut counts = Vec::new();
    for version in [FormatVersion::V1, FormatVersion::V2] {
        counts.push(check_golden(version).await);
    }
    // v1: 6 valid, 7 invalid; v2: those plus rewrapped, version-downgrade and
    // flipped-context.
    assert_eq!(counts, [(6, 7), (7, 9)]);
}

/// Checks the golden directory of `version`; returns (valid, invalid) counts.
async fn check_golden(version: FormatVersion) -> (usize, usize) {
    let dir = golden_dir(version);
    let files = expected_files(version).await;
    if std::env::var_os("KMS_WRITE_GOLDEN").is_some() {
        std::fs::create_dir_all(&dir).expect("mkdir");
        for (name, bytes) in &files {
            // Only missing files are written: a checked-in vector is never
            // rewritten, so a format change shows up as a failure below.
            let path = dir.join(name);
            if !path.exists() {
                std::fs::write(path, bytes).expect("write golden file");
            }
        }
    }
    for (name, bytes) in &files {
        let on_disk = std::fs::read(dir.join(name))
            .unwrap_or_else(|e| panic!("{name}: {e} (KMS_WRITE_GOLDEN=1 creates it)"));
        assert!(
            on_disk == *bytes,
            "{version:?} {name} differs from the deterministic function"
        );
    }
    // And the checked-in bytes decrypt (or fail) as the manifest says.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("vectors.json")).expect("manifest"))
            .expect("json");
    let key = DataKey::from_bytes(DATA_KEY);
    let context_of = |v: &serde_json::Value| {
        let map = v["context"].as_object().expect("context object");
        EncryptionContext::new(
            map.iter()
                .map(|(k, v)| (k.clone(), v.as_str().expect("str").to_owned())),
        )
        .expect("context")
    };
    let valid = manifest["valid"].as_array().expect("valid");
    for vector in valid {
        let bytes = std::fs::read(dir.join(vector["file"].as_str().expect("file"))).expect("read");
        let mut out = Vec::new();
        let summary =
            decrypt_with_data_key(&key, &context_of(vector), &mut bytes.as_slice(), &mut out)
                .await
                .expect("golden vector decrypts");
        assert_eq!(summary.header.version(), version);
        assert_eq!(
            hex::encode(Sha256::digest(&out)),
            vector["plaintext_sha256"]
        );
        if let Some(source) = vector["body_of"].as_str() {
            // A rewrap: another wrapped key, the same body byte for byte.
            let original = std::fs::read(dir.join(source)).expect("read");
            let original_header = read_header(&mut &original[..]).await.expect("header");
            let body = &original[original_header.as_bytes().len()..];
            let header_len = summary.header.as_bytes().len();
            assert_eq!(&bytes[header_len..], body);
            assert_ne!(
                summary.header.wrapped_data_key(),
                original_header.wrapped_data_key()
            );
            assert_eq!(
                hex::encode(summary.header.wrapped_data_key()),
                vector["wrapped_data_key"]
            );
        }
    }
    let invalid = manifest["invalid"].as_array().expect("invalid");
    for vector in invalid {
        let bytes = std::fs::read(dir.join(vector["file"].as_str().expect("file"))).expect("read");
        let mut out = Vec::new();
        let result =
            decrypt_with_data_key(&key, &context_of(vector), &mut bytes.as_slice(), &mut out).await;
        assert!(
            matches!(result, Err(EnvelopeError::Invalid)),
            "{version:?} {}",
            vector["name"]
        );
    }
    (valid.len(), invalid.len())
}
