//! The envelope's promises, with a data key held locally: round trips across
//! chunk boundaries, and every truncation, every flipped bit, reordered,
//! swapped, duplicated or appended chunks, another context or another key all
//! failing with the one generic error, without releasing unauthenticated
//! plaintext.

use super::format::{FIXED_PREFIX_LEN, Header, MAX_CHUNKS, TAG_LEN};
use super::stream::{self, ChunkCipher};
use super::*;

const CHUNK: u32 = 16;

fn key() -> DataKey {
    DataKey::from_bytes(core::array::from_fn(|i| i as u8))
}

fn ctx() -> EncryptionContext {
    EncryptionContext::new([("tenant", "acme"), ("purpose", "test")]).expect("ctx")
}

fn plaintext(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

async fn seal(data_key: &DataKey, context: &EncryptionContext, chunk: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut input = data;
    encrypt_with_data_key(
        data_key,
        vec![0xAA; 40],
        context,
        chunk,
        &mut input,
        &mut out,
    )
    .await
    .expect("encrypt");
    out
}

/// As [`seal`], in format `version`.
async fn seal_as(version: FormatVersion, chunk: u32, data: &[u8]) -> Vec<u8> {
    let header = Header::new_with_version(version, chunk, vec![0xAA; 40], ctx()).expect("header");
    let mut out = Vec::new();
    encrypt_with_header(&key(), header, &mut &data[..], &mut out)
        .await
        .expect("encrypt");
    out
}

async fn open(
    data_key: &DataKey,
    context: &EncryptionContext,
    envelope: &[u8],
) -> (Result<DecryptSummary, EnvelopeError>, Vec<u8>) {
    let mut out = Vec::new();
    let mut input = envelope;
    let result = decrypt_with_data_key(data_key, context, &mut input, &mut out).await;
    (result, out)
}

async fn assert_invalid(envelope: &[u8], what: &str) {
    let (result, _) = open(&key(), &ctx(), envelope).await;
    assert!(
        matches!(result, Err(EnvelopeError::Invalid)),
        "{what}: expected Invalid, got {result:?}"
    );
}

/// Header length and the byte ranges of each chunk (ciphertext ‖ tag).
fn chunks(envelope: &[u8], chunk: usize) -> (usize, Vec<std::ops::Range<usize>>) {
    let header_len = {
        let w = usize::from(u16::from_be_bytes([envelope[42], envelope[43]]));
        let c_at = FIXED_PREFIX_LEN + w;
        let c = u32::from_be_bytes(envelope[c_at..c_at + 4].try_into().expect("4"));
        c_at + 4 + usize::try_from(c).expect("fits")
    };
    let mut ranges = Vec::new();
    let mut at = header_len;
    while at < envelope.len() {
        let end = (at + chunk + TAG_LEN).min(envelope.len());
        ranges.push(at..end);
        at = end;
    }
    (header_len, ranges)
}

#[tokio::test]
async fn round_trips_across_chunk_boundaries() {
    for len in [0, 1, 15, 16, 17, 31, 32, 33, 47, 48, 49, 100] {
        let data = plaintext(len);
        let envelope = seal(&key(), &ctx(), CHUNK, &data).await;
        let (header_len, ranges) = chunks(&envelope, CHUNK as usize);
        // floor(len / chunk) full chunks, then a short (possibly empty) final one.
        assert_eq!(ranges.len(), len / 16 + 1, "len {len}");
        assert_eq!(envelope.len(), header_len + len + TAG_LEN * (len / 16 + 1));
        let (result, out) = open(&key(), &ctx(), &envelope).await;
        let summary = result.expect("decrypts");
        assert_eq!(out, data, "len {len}");
        assert_eq!(summary.plaintext_len, len as u64);
        assert_eq!(summary.header.context(), &ctx());
    }
}

#[tokio::test]
async fn multi_mebibyte_round_trips_with_several_chunk_sizes() {
    let data = plaintext(3 * 1024 * 1024 + 5);
    for chunk in [DEFAULT_CHUNK_SIZE, 1 << 20, 4096 + 3] {
        let envelope = seal(&key(), &ctx(), chunk, &data).await;
        let (result, out) = open(&key(), &ctx(), &envelope).await;
        result.expect("decrypts");
        assert!(out == data, "chunk {chunk}: plaintext differs");
    }
}

#[tokio::test]
async fn every_truncation_fails() {
    let envelope = seal(&key(), &ctx(), CHUNK, &plaintext(56)).await;
    for len in 0..envelope.len() {
        assert_invalid(&envelope[..len], &format!("truncated to {len}")).await;
    }
    // Also when the data is a multiple of the chunk size (empty final chunk).
    let envelope = seal(&key(), &ctx(), CHUNK, &plaintext(48)).await;
    for len in 0..envelope.len() {
        assert_invalid(&envelope[..len], &format!("truncated to {len}")).await;
    }
}

#[tokio::test]
async fn every_flipped_bit_fails_in_every_region() {
    // Header (magic, version, suite, chunk size, message id, wrapped key, context
    // length, context), full chunks, the final chunk and every tag. In v2 the
    // wrapped key's own bytes are the exception, with a data key held locally:
    // they are left out of the message key (so that a rewrap keeps the body),
    // and the kms Decrypt authenticates them (tests/e2e/envelope_rewrap.rs).
    for version in [FormatVersion::V1, FormatVersion::V2] {
        let envelope = seal_as(version, CHUNK, &plaintext(40)).await;
        let wrapped = FIXED_PREFIX_LEN..FIXED_PREFIX_LEN + 40;
        for byte in 0..envelope.len() {
            for bit in 0..8 {
                let mut bad = envelope.clone();
                bad[byte] ^= 1 << bit;
                if version == FormatVersion::V2 && wrapped.contains(&byte) {
                    let (result, out) = open(&key(), &ctx(), &bad).await;
                    result.expect("v2: another wrapped key, the same data key");
                    assert_eq!(out, plaintext(40));
                } else {
                    assert_invalid(&bad, &format!("{version:?}: bit {bit} of byte {byte}")).await;
                }
            }
        }
    }
}

#[tokio::test]
async fn a_v2_body_survives_a_new_wrapped_key_and_a_v1_body_does_not() {
    let data = plaintext(100);
    for version in [FormatVersion::V1, FormatVersion::V2] {
        let envelope = seal_as(version, CHUNK, &data).await;
        let mut input = envelope.as_slice();
        let header = read_header(&mut input).await.expect("header");
        assert_eq!(header.version(), version);
        let body = input;
        let rewrapped = header
            .with_wrapped_data_key(vec![0x55; 130])
            .expect("new header");
        let mut moved = rewrapped.as_bytes().to_vec();
        moved.extend_from_slice(body);
        let (result, out) = open(&key(), &ctx(), &moved).await;
        match version {
            FormatVersion::V2 => {
                result.expect("the same body under the new header");
                assert_eq!(out, data);
            }
            _ => assert!(matches!(result, Err(EnvelopeError::Invalid)), "{result:?}"),
        }
    }
}

#[tokio::test]
async fn reordered_dropped_duplicated_and_foreign_chunks_fail() {
    let data = plaintext(64 + 5);
    let envelope = seal(&key(), &ctx(), CHUNK, &data).await;
    let (header_len, ranges) = chunks(&envelope, CHUNK as usize);
    assert_eq!(ranges.len(), 5);
    let header = &envelope[..header_len];
    let chunk = |i: usize| &envelope[ranges[i].clone()];
    let build = |order: &[usize]| -> Vec<u8> {
        let mut out = header.to_vec();
        for &i in order {
            out.extend_from_slice(chunk(i));
        }
        out
    };
    assert_eq!(build(&[0, 1, 2, 3, 4]), envelope);
    for (order, what) in [
        (&[1, 0, 2, 3, 4][..], "swapped first two"),
        (&[0, 2, 1, 3, 4], "swapped middle"),
        (&[0, 1, 2, 4], "dropped a middle chunk"),
        (&[0, 1, 2, 3], "dropped the final chunk"),
        (&[0, 0, 1, 2, 3, 4], "duplicated a chunk"),
        (&[0, 1, 2, 3, 4, 4], "final chunk twice"),
        (&[4], "final chunk alone"),
    ] {
        assert_invalid(&build(order), what).await;
    }

    // The same data key (as a cache would reuse it) in another message: its
    // chunks do not fit this one, even at the same position.
    let other = seal(&key(), &ctx(), CHUNK, &data).await;
    let (_, other_ranges) = chunks(&other, CHUNK as usize);
    for i in 0..ranges.len() {
        let mut spliced = envelope.clone();
        spliced[ranges[i].clone()].copy_from_slice(&other[other_ranges[i].clone()]);
        assert_invalid(&spliced, &format!("chunk {i} from another message")).await;
    }
    // The other message's header with this message's chunks.
    let (other_header_len, _) = chunks(&other, CHUNK as usize);
    let mut mixed = other[..other_header_len].to_vec();
    mixed.extend_from_slice(&envelope[header_len..]);
    assert_invalid(&mixed, "header of another message").await;
}

#[tokio::test]
async fn appended_data_fails() {
    for len in [0, 5, 16, 40] {
        let envelope = seal(&key(), &ctx(), CHUNK, &plaintext(len)).await;
        let (_, ranges) = chunks(&envelope, CHUNK as usize);
        let last = ranges.last().expect("a final chunk").clone();
        let mut one_byte = envelope.clone();
        one_byte.push(0);
        assert_invalid(&one_byte, "one byte appended").await;
        let mut tag_sized = envelope.clone();
        tag_sized.extend_from_slice(&[0; TAG_LEN]);
        assert_invalid(&tag_sized, "an empty-chunk-sized tail").await;
        let mut final_again = envelope.clone();
        final_again.extend_from_slice(&envelope[last]);
        assert_invalid(&final_again, "final chunk appended again").await;
        let mut two = envelope.clone();
        two.extend_from_slice(&envelope);
        assert_invalid(&two, "a second envelope appended").await;
    }
}

#[tokio::test]
async fn another_context_or_data_key_fails() {
    let envelope = seal(&key(), &ctx(), CHUNK, b"attack at dawn").await;
    let (result, out) = open(
        &key(),
        &EncryptionContext::new([("tenant", "evil"), ("purpose", "test")]).expect("ctx"),
        &envelope,
    )
    .await;
    assert!(matches!(result, Err(EnvelopeError::Invalid)), "{result:?}");
    assert!(out.is_empty());
    let (result, _) = open(&key(), &EncryptionContext::empty(), &envelope).await;
    assert!(matches!(result, Err(EnvelopeError::Invalid)));
    let (result, out) = open(&DataKey::from_bytes([9; 32]), &ctx(), &envelope).await;
    assert!(matches!(result, Err(EnvelopeError::Invalid)));
    assert!(out.is_empty());
}

#[tokio::test]
async fn only_authenticated_chunks_are_released() {
    let data = plaintext(16 * 4 + 3);
    let envelope = seal(&key(), &ctx(), CHUNK, &data).await;
    let (_, ranges) = chunks(&envelope, CHUNK as usize);
    for bad_chunk in 0..ranges.len() {
        let mut bad = envelope.clone();
        // The first ciphertext byte of the chunk (or its tag, for the empty one).
        bad[ranges[bad_chunk].start] ^= 0x80;
        let (result, out) = open(&key(), &ctx(), &bad).await;
        assert!(matches!(result, Err(EnvelopeError::Invalid)));
        // Exactly the chunks before the bad one, none of it or after it.
        assert_eq!(out, data[..16 * bad_chunk], "bad chunk {bad_chunk}");
    }
}

#[tokio::test]
async fn the_header_is_read_exactly_and_the_input_length_is_enforced() {
    let envelope = seal(&key(), &ctx(), CHUNK, &plaintext(20)).await;
    let mut input = envelope.as_slice();
    let header = read_header(&mut input).await.expect("header");
    assert_eq!(header.chunk_size(), CHUNK);
    assert_eq!(header.wrapped_data_key(), &[0xAA; 40][..]);
    assert_eq!(input.len(), envelope.len() - header.as_bytes().len());

    let header = Header::new(CHUNK, vec![1], ctx()).expect("header");
    assert_eq!(header.version(), FormatVersion::V2);
    for (len, expected) in [(20usize, 21u64), (20, 19), (32, 16)] {
        let data = plaintext(len);
        let mut out = Vec::new();
        let result = stream::encrypt(
            &header,
            ChunkCipher::new(&header, &key()),
            &mut data.as_slice(),
            &mut out,
            Some(expected),
        )
        .await;
        assert!(
            matches!(result, Err(EnvelopeError::LengthMismatch)),
            "{len} vs {expected}: {result:?}"
        );
    }
}

#[test]
fn the_chunk_count_limit_is_enforced() {
    let header = Header::new(CHUNK, vec![1], ctx()).expect("header");
    let mut cipher = ChunkCipher::new(&header, &key());
    cipher.set_next_index(MAX_CHUNKS - 1);
    // The last index can only be the final chunk.
    assert!(matches!(
        cipher.seal(&mut [0; 16], false),
        Err(EnvelopeError::TooManyChunks)
    ));
    let mut sealed = [1, 2, 3];
    let tag = cipher
        .seal(&mut sealed, true)
        .expect("final chunk at the last index");
    assert!(matches!(
        cipher.seal(&mut [0; 3], true),
        Err(EnvelopeError::TooManyChunks)
    ));
    let mut opener = ChunkCipher::new(&header, &key());
    opener.set_next_index(MAX_CHUNKS - 1);
    opener
        .open(&mut sealed, &tag, true)
        .expect("opens at the last index");
    assert_eq!(sealed, [1, 2, 3]);
    let mut beyond = ChunkCipher::new(&header, &key());
    beyond.set_next_index(MAX_CHUNKS);
    assert!(matches!(
        beyond.open(&mut [], &tag, true),
        Err(EnvelopeError::Invalid)
    ));
}

#[test]
fn data_keys_are_zeroized_on_drop() {
    fn zeroized_on_drop<T: zeroize::ZeroizeOnDrop>() {}
    zeroized_on_drop::<DataKey>();
}
