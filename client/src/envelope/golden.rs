//! Golden vectors for envelope format v1 (client/tests/golden/): produced by
//! the deterministic [`vectors`] below (fixed data key, message ids, wrapped
//! key and contexts), checked in, and verified byte for byte here and, by an
//! independent implementation, by tests/scripts/envelope_check.py. A change to
//! the format is a new format version, never an edit of these files.
//!
//! Regenerate (only for a new vector): `KMS_WRITE_GOLDEN=1 cargo test -p
//! kms-client golden`.

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

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// The plaintext of every vector: byte i is i mod 251.
fn plaintext(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

fn wrapped_data_key() -> Vec<u8> {
    (0..104u32).map(|i| ((i * 7 + 1) % 256) as u8).collect()
}

fn context(pairs: &[(&str, &str)]) -> EncryptionContext {
    EncryptionContext::new(pairs.iter().copied()).expect("valid context")
}

async fn seal(index: usize, vector: &Vector) -> Vec<u8> {
    let message_id: [u8; 32] = core::array::from_fn(|i| (0x40 * index + i) as u8);
    let header = Header::with_message_id(
        vector.chunk_size,
        message_id,
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

/// Every file of the golden directory, as the deterministic function makes it.
async fn expected_files() -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    let mut valid = Vec::new();
    let mut multi = Vec::new();
    for (index, vector) in VECTORS.iter().enumerate() {
        let envelope = seal(index, vector).await;
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
    let invalid_files: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", multi[..multi.len() - 1].to_vec()),
        ("dropped-final-chunk", multi[..chunk(2).end].to_vec()),
        ("swapped-chunks", swapped),
        ("appended-byte", appended),
        ("flipped-message-id", flipped_id),
        ("flipped-tag", flipped_tag),
    ];
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
    let manifest = json!({
        "format": "kms envelope v1 (README: Client library and envelope format)",
        "data_key": hex::encode(DATA_KEY),
        "wrapped_data_key": hex::encode(wrapped_data_key()),
        "plaintext": "byte i is i mod 251",
        "message_id": "byte i of vector n (0-based, in this order) is (64 n + i) mod 256",
        "valid": valid,
        "invalid": invalid,
    });
    let mut text = serde_json::to_string_pretty(&manifest).expect("json");
    text.push('\n');
    files.push(("vectors.json".to_owned(), text.into_bytes()));
    files
}

#[tokio::test]
async fn golden_files_match_the_deterministic_function_and_decrypt() {
    let dir = golden_dir();
    let files = expected_files().await;
    if std::env::var_os("KMS_WRITE_GOLDEN").is_some() {
        std::fs::create_dir_all(&dir).expect("mkdir");
        for (name, bytes) in &files {
            std::fs::write(dir.join(name), bytes).expect("write golden file");
        }
    }
    for (name, bytes) in &files {
        let on_disk = std::fs::read(dir.join(name))
            .unwrap_or_else(|e| panic!("{name}: {e} (KMS_WRITE_GOLDEN=1 creates it)"));
        assert!(
            on_disk == *bytes,
            "{name} differs from the deterministic function"
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
    for vector in manifest["valid"].as_array().expect("valid") {
        let bytes = std::fs::read(dir.join(vector["file"].as_str().expect("file"))).expect("read");
        let mut out = Vec::new();
        decrypt_with_data_key(&key, &context_of(vector), &mut bytes.as_slice(), &mut out)
            .await
            .expect("golden vector decrypts");
        assert_eq!(
            hex::encode(Sha256::digest(&out)),
            vector["plaintext_sha256"]
        );
    }
    for vector in manifest["invalid"].as_array().expect("invalid") {
        let bytes = std::fs::read(dir.join(vector["file"].as_str().expect("file"))).expect("read");
        let mut out = Vec::new();
        let result =
            decrypt_with_data_key(&key, &context_of(vector), &mut bytes.as_slice(), &mut out).await;
        assert!(
            matches!(result, Err(EnvelopeError::Invalid)),
            "{}",
            vector["name"]
        );
    }
}
