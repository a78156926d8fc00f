//! Golden vectors for the ciphertext blob, format v1 (tests/golden/envelope_v1.json).
//!
//! The vectors were produced by an independent implementation of the README's
//! "Ciphertext format" (tests/golden/generate_envelope_v1.py, Python `cryptography`)
//! with a fixed test KEK. This test pins, byte for byte, the header layout, the
//! canonical encryption-context encoding, the AAD construction and the context
//! digest, and checks with software AES-GCM that each golden blob decrypts under
//! exactly that AAD. If it fails, the wire format changed: existing ciphertexts
//! would no longer decrypt. Bump the format version instead of editing the vectors.

use std::collections::BTreeMap;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use kms::ciphertext::{Algorithm, Header, parse_blob, seal_blob};
use kms::encryption_context::{DEFAULT_MAX_ENCODED_LEN, EncryptionContext, context_digest};
use serde::Deserialize;

const GOLDEN: &str = include_str!("golden/envelope_v1.json");

#[derive(Deserialize)]
struct Golden {
    kek_hex: String,
    vectors: Vec<Vector>,
    invalid_blobs: Vec<InvalidBlob>,
}

#[derive(Deserialize)]
struct Vector {
    name: String,
    key_id: String,
    key_version: u32,
    algorithm: u8,
    encryption_context: BTreeMap<String, String>,
    plaintext_hex: String,
    iv_hex: String,
    header_hex: String,
    context_encoding_hex: String,
    context_digest_hex: String,
    aad_hex: String,
    ciphertext_and_tag_hex: String,
    blob_hex: String,
}

#[derive(Deserialize)]
struct InvalidBlob {
    name: String,
    blob_hex: String,
}

fn golden() -> Golden {
    serde_json::from_str(GOLDEN).expect("golden file is valid JSON")
}

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s).expect("valid hex in golden file")
}

fn cipher(g: &Golden) -> Aes256Gcm {
    Aes256Gcm::new_from_slice(&unhex(&g.kek_hex)).expect("32-byte KEK")
}

fn context(v: &Vector) -> EncryptionContext {
    EncryptionContext::new(v.encryption_context.clone(), DEFAULT_MAX_ENCODED_LEN)
        .expect("golden context is valid")
}

/// What the service's decrypt path does, with software AES-GCM in place of the HSM.
fn open(cipher: &Aes256Gcm, blob: &[u8], ctx: &EncryptionContext) -> Option<Vec<u8>> {
    let parsed = parse_blob(blob).ok()?;
    let aad = parsed.aad(ctx);
    cipher
        .decrypt(
            Nonce::from_slice(parsed.iv()),
            Payload {
                msg: parsed.ct_and_tag(),
                aad: &aad,
            },
        )
        .ok()
}

#[test]
fn golden_file_is_not_empty() {
    let g = golden();
    assert!(g.vectors.len() >= 4);
    assert!(g.invalid_blobs.len() >= 10);
}

#[test]
fn encoding_matches_golden_bytes() {
    for v in golden().vectors {
        let name = &v.name;
        assert_eq!(v.algorithm, Algorithm::Aes256Gcm.id(), "{name}");
        let ctx = context(&v);
        let header = Header::new(v.key_id.clone(), v.key_version, Algorithm::Aes256Gcm)
            .expect("golden header is valid");
        let iv: [u8; 12] = unhex(&v.iv_hex).try_into().expect("12-byte IV");

        assert_eq!(hex::encode(header.encode()), v.header_hex, "{name}: header");
        assert_eq!(
            hex::encode(ctx.canonical_bytes()),
            v.context_encoding_hex,
            "{name}: context encoding"
        );
        assert_eq!(
            hex::encode(context_digest(&ctx)),
            v.context_digest_hex,
            "{name}: context digest"
        );
        assert_eq!(hex::encode(header.aad(&ctx)), v.aad_hex, "{name}: AAD");
        let blob = seal_blob(&header, &iv, &unhex(&v.ciphertext_and_tag_hex));
        assert_eq!(hex::encode(&blob), v.blob_hex, "{name}: blob");
    }
}

/// The encoding exists once, in kms-client: the client's own constructor and
/// parser agree with the server's golden bytes, so an envelope header and a
/// ciphertext blob bind a context identically.
#[test]
fn client_context_encoding_matches_golden_bytes() {
    for v in golden().vectors {
        let name = &v.name;
        let client = kms_client::EncryptionContext::new(v.encryption_context.clone())
            .expect("golden context is valid");
        assert_eq!(
            hex::encode(client.canonical_bytes()),
            v.context_encoding_hex,
            "{name}: client context encoding"
        );
        let parsed =
            kms_client::EncryptionContext::from_canonical_bytes(&unhex(&v.context_encoding_hex))
                .expect("golden encoding parses");
        assert_eq!(parsed, client, "{name}: parsed back");
        assert_eq!(context(&v).as_client(), &client, "{name}: server type");
    }
}

#[test]
fn parsing_golden_blobs_recovers_every_field() {
    for v in golden().vectors {
        let name = &v.name;
        let blob = unhex(&v.blob_hex);
        let parsed = parse_blob(&blob).expect("golden blob parses");
        assert_eq!(parsed.header().key_id(), v.key_id, "{name}");
        assert_eq!(parsed.header().key_version(), v.key_version, "{name}");
        assert_eq!(parsed.header().algorithm(), Algorithm::Aes256Gcm, "{name}");
        assert_eq!(hex::encode(parsed.header_bytes()), v.header_hex, "{name}");
        assert_eq!(hex::encode(parsed.iv()), v.iv_hex, "{name}");
        assert_eq!(
            hex::encode(parsed.ct_and_tag()),
            v.ciphertext_and_tag_hex,
            "{name}"
        );
        assert_eq!(hex::encode(parsed.aad(&context(&v))), v.aad_hex, "{name}");
        assert_eq!(parsed.plaintext_len() * 2, v.plaintext_hex.len(), "{name}");
    }
}

#[test]
fn software_aes_gcm_agrees_with_the_golden_ciphertexts() {
    let g = golden();
    let cipher = cipher(&g);
    for v in &g.vectors {
        let name = &v.name;
        let plaintext = unhex(&v.plaintext_hex);
        let aad = unhex(&v.aad_hex);
        let iv = unhex(&v.iv_hex);
        // Decrypts with the stored AAD and IV...
        let opened = open(&cipher, &unhex(&v.blob_hex), &context(v));
        assert_eq!(opened.as_deref(), Some(plaintext.as_slice()), "{name}");
        // ...and the stored ciphertext is what AES-GCM makes from them.
        let sealed = cipher
            .encrypt(
                Nonce::from_slice(&iv),
                Payload {
                    msg: &plaintext,
                    aad: &aad,
                },
            )
            .expect("encrypt");
        assert_eq!(hex::encode(sealed), v.ciphertext_and_tag_hex, "{name}");
    }
}

#[test]
fn golden_blobs_do_not_decrypt_under_another_context() {
    let g = golden();
    let cipher = cipher(&g);
    for v in &g.vectors {
        let blob = unhex(&v.blob_hex);
        for other in &g.vectors {
            if other.encryption_context == v.encryption_context {
                continue;
            }
            assert!(
                open(&cipher, &blob, &context(other)).is_none(),
                "{} opened with the context of {}",
                v.name,
                other.name
            );
        }
    }
    // The injectivity pair: {"a": "bc"} and {"ab": "c"} share key, IV and plaintext.
    let pair: Vec<&Vector> = g
        .vectors
        .iter()
        .filter(|v| v.name.starts_with("context boundaries"))
        .collect();
    assert_eq!(pair.len(), 2);
    assert_ne!(pair[0].aad_hex, pair[1].aad_hex);
    assert_ne!(pair[0].blob_hex, pair[1].blob_hex);
}

#[test]
fn every_bit_flip_and_truncation_of_a_golden_blob_is_rejected() {
    let g = golden();
    let cipher = cipher(&g);
    for v in &g.vectors {
        let blob = unhex(&v.blob_hex);
        let ctx = context(v);
        assert!(open(&cipher, &blob, &ctx).is_some());
        for pos in 0..blob.len() {
            for bit in 0..8 {
                let mut tampered = blob.clone();
                tampered[pos] ^= 1 << bit;
                assert!(
                    open(&cipher, &tampered, &ctx).is_none(),
                    "{}: flipping bit {bit} of byte {pos} went unnoticed",
                    v.name
                );
            }
        }
        for len in 0..blob.len() {
            assert!(
                open(&cipher, &blob[..len], &ctx).is_none(),
                "{}: truncation to {len} bytes went unnoticed",
                v.name
            );
        }
    }
}

#[test]
fn invalid_golden_blobs_fail_with_the_generic_error() {
    for b in golden().invalid_blobs {
        let err = parse_blob(&unhex(&b.blob_hex)).expect_err(&b.name);
        assert_eq!(err.to_string(), "invalid ciphertext", "{}", b.name);
    }
}
