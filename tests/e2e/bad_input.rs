//! Bad input never panics, never leaks plaintext and never changes anything:
//! malformed protobuf, oversized messages, empty and huge encryption
//! contexts, unknown and malformed key names, corrupted and truncated blobs,
//! out-of-range sizes. Afterwards the server still serves and the audit chain
//! verifies.

use bytes::{Buf, BufMut};
use kms_proto::v1 as pb;
use kms_tests::{TestEnv, TestServer};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};

use super::{create_key, ctx, encrypt};

/// Sends raw bytes as the request message: lets the test put malformed
/// protobuf on the wire.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

#[derive(Debug, Clone, Copy, Default)]
struct RawEncoder;

#[derive(Debug, Clone, Copy, Default)]
struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let bytes = src.chunk().to_vec();
        src.advance(bytes.len());
        Ok(Some(bytes))
    }
}

async fn raw_call(
    server: &TestServer,
    path: &'static str,
    body: Vec<u8>,
) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(server.channel.clone());
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    grpc.unary(
        tonic::Request::new(body),
        http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(tonic::Response::into_inner)
}

fn audit_records(server: &TestServer) -> u64 {
    let mut export = Vec::new();
    server
        .service()
        .export_audit(&Default::default(), &mut export)
        .expect("export")
}

const SECRET: &[u8] = b"BAD-INPUT-SECRET-PLAINTEXT-7c1e";

fn assert_refused<T: std::fmt::Debug>(result: Result<T, Status>, codes: &[Code], what: &str) {
    match result {
        Ok(v) => panic!("{what}: accepted: {v:?}"),
        Err(status) => {
            assert!(codes.contains(&status.code()), "{what}: {status:?}");
            let message = status.message().as_bytes();
            assert!(
                !message.windows(SECRET.len()).any(|w| w == SECRET),
                "{what}: the plaintext is in the error"
            );
        }
    }
}

#[tokio::test]
async fn malformed_protobuf_is_refused_before_any_key_is_touched() {
    let env = TestEnv::new();
    let server = env.start().await;
    let key = create_key(&server, "bad input").await;
    let before = audit_records(&server);
    let malformed: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", vec![0xff; 16]),
        ("truncated varint", vec![0x0a, 0xff]),
        ("length past the end", vec![0x0a, 0x7f, 0x01]),
        ("wrong wire type", vec![0x0d, 1, 2, 3, 4]),
        (
            "invalid utf-8 in a string field",
            vec![0x0a, 0x02, 0xc3, 0x28],
        ),
        ("field number zero", vec![0x00, 0x01]),
        ("group wire type", vec![0x0b, 0x0c]),
    ];
    for path in [
        "/kms.v1.Crypto/Encrypt",
        "/kms.v1.Crypto/Decrypt",
        "/kms.v1.Crypto/GenerateDataKey",
        "/kms.v1.Crypto/ReEncrypt",
        "/kms.v1.Crypto/BatchEncrypt",
        "/kms.v1.KeyManagement/CreateKey",
        "/kms.v1.KeyManagement/PutKeyPolicy",
    ] {
        for (what, body) in &malformed {
            let result = raw_call(&server, path, body.clone()).await;
            assert_refused(
                result,
                // The caller's bytes are wrong, not the server: never INTERNAL.
                &[Code::InvalidArgument],
                &format!("{path}: {what}"),
            );
        }
    }
    // Most never reached the domain. The few that prost decodes leniently
    // (an empty message) were refused there, and audited as refusals:
    // nothing was created, changed or used.
    let mut export = Vec::new();
    server
        .service()
        .export_audit(&Default::default(), &mut export)
        .expect("export");
    let records: Vec<serde_json::Value> = String::from_utf8(export)
        .expect("utf8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert!(records.len() as u64 >= before);
    for record in &records[usize::try_from(before).expect("count")..] {
        assert_ne!(record["result"], "OK", "{record}");
    }
    // A well-formed raw message works through the same path.
    let good = prost::Message::encode_to_vec(&pb::EncryptRequest {
        key_id: key.clone(),
        plaintext: b"still fine".to_vec(),
        encryption_context: ctx(&[]),
    });
    raw_call(&server, "/kms.v1.Crypto/Encrypt", good)
        .await
        .expect("well-formed raw request");
    server.stop().await;
}

#[tokio::test]
async fn oversized_and_out_of_range_requests_get_clear_errors() {
    let env = TestEnv::new();
    let mut config = env.config();
    config.server.max_message_bytes = 64 * 1024;
    let server = env.start_with(config).await;
    let key = create_key(&server, "limits").await;
    let mut crypto = server.crypto();
    let encrypt_with = |plaintext: Vec<u8>, context: Vec<(String, String)>| pb::EncryptRequest {
        key_id: key.clone(),
        plaintext,
        encryption_context: context.into_iter().collect(),
    };

    // A message above the transport limit is refused before it is decoded.
    let mut huge = SECRET.to_vec();
    huge.resize(1 << 20, b'x');
    assert_refused(
        crypto.encrypt(encrypt_with(huge, Vec::new())).await,
        &[Code::ResourceExhausted, Code::OutOfRange],
        "1 MiB message",
    );
    // Plaintext size: 1 to 4096 bytes.
    let mut big = SECRET.to_vec();
    big.resize(4097, b'y');
    assert_refused(
        crypto.encrypt(encrypt_with(big, Vec::new())).await,
        &[Code::InvalidArgument],
        "4097-byte plaintext",
    );
    assert_refused(
        crypto.encrypt(encrypt_with(Vec::new(), Vec::new())).await,
        &[Code::InvalidArgument],
        "empty plaintext",
    );
    // Contexts: empty is fine; oversized, empty keys are not.
    crypto
        .encrypt(encrypt_with(SECRET.to_vec(), Vec::new()))
        .await
        .expect("empty context");
    let oversized: Vec<(String, String)> = (0..200)
        .map(|i| (format!("key-{i:04}"), "v".repeat(64)))
        .collect();
    assert_refused(
        crypto
            .encrypt(encrypt_with(SECRET.to_vec(), oversized))
            .await,
        &[Code::InvalidArgument],
        "oversized context",
    );
    assert_refused(
        crypto
            .encrypt(encrypt_with(
                SECRET.to_vec(),
                vec![(String::new(), "v".into())],
            ))
            .await,
        &[Code::InvalidArgument],
        "empty context key",
    );
    // Key names: unknown ones are NOT_FOUND, malformed ones INVALID_ARGUMENT.
    for (name, code) in [
        (format!("key-{}", "0".repeat(32)), Code::NotFound),
        ("alias/does-not-exist".to_owned(), Code::NotFound),
        (String::new(), Code::InvalidArgument),
        ("not-a-key".to_owned(), Code::InvalidArgument),
        ("alias/".to_owned(), Code::InvalidArgument),
        ("alias/bad name!".to_owned(), Code::InvalidArgument),
        (format!("key-{}", "g".repeat(32)), Code::InvalidArgument),
        ("k".repeat(10_000), Code::InvalidArgument),
    ] {
        let request = pb::EncryptRequest {
            key_id: name.clone(),
            plaintext: SECRET.to_vec(),
            encryption_context: ctx(&[]),
        };
        assert_refused(
            crypto.encrypt(request).await,
            &[code],
            &format!("key name {:.40}", name),
        );
    }
    // Data key sizes and batch sizes.
    for bytes in [0, 1025, u32::MAX] {
        assert_refused(
            crypto
                .generate_data_key(pb::GenerateDataKeyRequest {
                    key_id: key.clone(),
                    length: Some(pb::generate_data_key_request::Length::NumberOfBytes(bytes)),
                    ..Default::default()
                })
                .await,
            &[Code::InvalidArgument],
            &format!("data key of {bytes} bytes"),
        );
    }
    assert_refused(
        crypto
            .generate_data_key(pb::GenerateDataKeyRequest {
                key_id: key.clone(),
                length: None,
                ..Default::default()
            })
            .await,
        &[Code::InvalidArgument],
        "data key without a length",
    );
    assert_refused(
        crypto
            .batch_encrypt(pb::BatchEncryptRequest {
                key_id: key.clone(),
                entries: Vec::new(),
            })
            .await,
        &[Code::InvalidArgument],
        "empty batch",
    );
    assert_refused(
        crypto
            .generate_random(pb::GenerateRandomRequest { number_of_bytes: 0 })
            .await,
        &[Code::InvalidArgument],
        "zero random bytes",
    );

    // The server still serves and the log is intact.
    encrypt(&server, &key, b"after the abuse", &[]).await;
    let report = server.service().verify_chain(None).expect("verify");
    assert!(report.is_ok(), "{report:?}");
    server.stop().await;
}

#[tokio::test]
async fn every_byte_corruption_truncation_and_extension_of_real_blobs_is_the_same_error() {
    let env = TestEnv::new();
    let server = env.start().await;
    let key = create_key(&server, "corruption").await;
    let context = [("tenant", "acme")];
    let mut crypto = server.crypto();
    let mut blobs = Vec::new();
    for plaintext in [&SECRET[..1], SECRET, &[0u8; 4096][..]] {
        blobs.push(
            encrypt(&server, &key, plaintext, &context)
                .await
                .ciphertext_blob,
        );
    }
    let data_key = crypto
        .generate_data_key(pb::GenerateDataKeyRequest {
            key_id: key.clone(),
            length: Some(pb::generate_data_key_request::Length::NumberOfBytes(32)),
            encryption_context: ctx(&context),
        })
        .await
        .expect("data key")
        .into_inner();
    blobs.push(data_key.ciphertext_blob);

    let mut expected: Option<(Code, String)> = None;
    let mut check = |status: Status, what: String| {
        let seen = (status.code(), status.message().to_owned());
        assert_eq!(seen.0, Code::InvalidArgument, "{what}: {status:?}");
        match &expected {
            None => expected = Some(seen),
            Some(first) => assert_eq!(&seen, first, "{what}: a different error"),
        }
    };
    let mut attempts = 0u64;
    for (b, blob) in blobs.iter().enumerate() {
        // Every byte replaced by its complement (a short blob is checked
        // exhaustively; the 4 KiB one at its header, the edges and a stride).
        let positions: Vec<usize> = if blob.len() <= 256 {
            (0..blob.len()).collect()
        } else {
            (0..128)
                .chain((128..blob.len() - 64).step_by(97))
                .chain(blob.len() - 64..blob.len())
                .collect()
        };
        let mut variants: Vec<(String, Vec<u8>)> = Vec::new();
        for i in positions {
            let mut bad = blob.clone();
            bad[i] ^= 0xff;
            variants.push((format!("blob {b}: byte {i} complemented"), bad));
        }
        for len in (0..blob.len()).step_by(if blob.len() > 256 { 61 } else { 1 }) {
            variants.push((
                format!("blob {b}: truncated to {len}"),
                blob[..len].to_vec(),
            ));
        }
        let mut longer = blob.clone();
        longer.push(0);
        variants.push((format!("blob {b}: one byte appended"), longer));
        for (what, bad) in variants {
            attempts += 1;
            let status = crypto
                .decrypt(pb::DecryptRequest {
                    ciphertext_blob: bad,
                    encryption_context: ctx(&context),
                    key_id: String::new(),
                })
                .await
                .expect_err(&what);
            check(status, what);
        }
    }
    assert!(attempts > 500, "{attempts}");
    assert_eq!(
        expected.map(|(_, m)| m).as_deref(),
        Some("invalid ciphertext")
    );
    // The originals still decrypt.
    for blob in &blobs {
        crypto
            .decrypt(pb::DecryptRequest {
                ciphertext_blob: blob.clone(),
                encryption_context: ctx(&context),
                key_id: String::new(),
            })
            .await
            .expect("original blob");
    }
    server.stop().await;
}
