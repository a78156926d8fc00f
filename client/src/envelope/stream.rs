//! Chunked AES-256-GCM over async streams (the STREAM construction of
//! Hoang, Reyhanitabar, Rogaway and Vizár): every chunk is sealed under the
//! per-message key with nonce = 11-byte big-endian chunk index ‖ final flag and
//! AAD = SHA-256(header). Reordering, dropping, duplicating or swapping chunks
//! (within or between messages), truncation and appended data all fail a tag.
//!
//! Memory is one chunk buffer (chunk size + 16 bytes) whatever the message size.
//! Never: write a chunk's plaintext before its tag has been verified, or leave
//! plaintext in a buffer that is not erased.

use aes_gcm::aead::{AeadInPlace as _, KeyInit as _};
use aes_gcm::{Aes256Gcm, Key, Nonce, Tag};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use zeroize::Zeroizing;

use super::EnvelopeError;
use super::format::{self, FIXED_PREFIX_LEN, Header, MAX_CHUNKS, TAG_LEN};
use crate::data_key::DataKey;

/// The AEAD state of one message: its key, its AAD and the next chunk index.
pub(crate) struct ChunkCipher {
    aead: Aes256Gcm,
    aad: [u8; 32],
    next_index: u64,
}

impl ChunkCipher {
    /// The cipher for the message that `header` starts, keyed from `data_key`.
    pub(crate) fn new(header: &Header, data_key: &DataKey) -> Self {
        let message_key = header.message_key(data_key);
        ChunkCipher {
            aead: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(message_key.as_slice())),
            aad: header.chunk_aad(),
            next_index: 0,
        }
    }

    /// The index the next chunk gets, refusing one that would break the limit:
    /// a non-final chunk needs room for the final one after it.
    fn take_index(&mut self, last: bool) -> Result<u64, EnvelopeError> {
        let index = self.next_index;
        let limit = if last { MAX_CHUNKS } else { MAX_CHUNKS - 1 };
        if index >= limit {
            return Err(EnvelopeError::TooManyChunks);
        }
        self.next_index = index + 1;
        Ok(index)
    }

    /// Encrypts `buf` (one chunk of plaintext) in place and appends its tag.
    pub(crate) fn seal(&mut self, buf: &mut Vec<u8>, last: bool) -> Result<(), EnvelopeError> {
        let nonce = format::chunk_nonce(self.take_index(last)?, last);
        let tag = self
            .aead
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), &self.aad, buf)
            // Only a chunk beyond GCM's 64 GiB limit fails; chunks are ≤ 16 MiB.
            .map_err(|_| EnvelopeError::Invalid)?;
        buf.extend_from_slice(&tag);
        Ok(())
    }

    /// Verifies and decrypts `buf` (ciphertext ‖ tag) in place, leaving the
    /// plaintext. On failure the buffer holds no plaintext (GCM decrypts only
    /// after the tag matched).
    pub(crate) fn open(&mut self, buf: &mut Vec<u8>, last: bool) -> Result<(), EnvelopeError> {
        let body_len = buf
            .len()
            .checked_sub(TAG_LEN)
            .ok_or(EnvelopeError::Invalid)?;
        let index = self.take_index(last).map_err(|_| EnvelopeError::Invalid)?;
        let nonce = format::chunk_nonce(index, last);
        let tag = *Tag::from_slice(&buf[body_len..]);
        buf.truncate(body_len);
        self.aead
            .decrypt_in_place_detached(Nonce::from_slice(&nonce), &self.aad, buf, &tag)
            .map_err(|_| EnvelopeError::Invalid)
    }

    #[cfg(test)]
    pub(crate) fn set_next_index(&mut self, index: u64) {
        self.next_index = index;
    }
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
async fn read_full<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut [u8],
) -> Result<usize, std::io::Error> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]).await? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Writes `header`, then the chunks of everything `reader` yields. With
/// `expected_len`, the input must be exactly that long (a cached data key's byte
/// budget was charged for it). Returns the plaintext length.
pub(crate) async fn encrypt<R, W>(
    header: &Header,
    mut cipher: ChunkCipher,
    reader: &mut R,
    writer: &mut W,
    expected_len: Option<u64>,
) -> Result<u64, EnvelopeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    writer
        .write_all(header.as_bytes())
        .await
        .map_err(EnvelopeError::Write)?;
    let chunk_size = usize::try_from(header.chunk_size()).map_err(|_| EnvelopeError::Invalid)?;
    // Allocated once at its final capacity: no reallocation leaves plaintext behind.
    let mut buf = Zeroizing::new(Vec::with_capacity(chunk_size + TAG_LEN));
    let mut total: u64 = 0;
    loop {
        buf.resize(chunk_size, 0);
        let n = read_full(reader, &mut buf)
            .await
            .map_err(EnvelopeError::Read)?;
        buf.truncate(n);
        total += n as u64;
        if expected_len.is_some_and(|expected| total > expected) {
            return Err(EnvelopeError::LengthMismatch);
        }
        // A short chunk is the final one; a message whose length is a multiple
        // of the chunk size ends with an empty final chunk.
        let last = n < chunk_size;
        cipher.seal(&mut buf, last)?;
        writer.write_all(&buf).await.map_err(EnvelopeError::Write)?;
        if last {
            break;
        }
    }
    if expected_len.is_some_and(|expected| total != expected) {
        return Err(EnvelopeError::LengthMismatch);
    }
    writer.flush().await.map_err(EnvelopeError::Write)?;
    Ok(total)
}

/// Reads exactly one envelope header from `reader` (nothing after it).
pub(crate) async fn read_header<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<Header, EnvelopeError> {
    let mut prefix = [0u8; FIXED_PREFIX_LEN];
    read_exact(reader, &mut prefix).await?;
    let (chunk_size, message_id, wrapped_len) =
        format::parse_prefix(&prefix).ok_or(EnvelopeError::Invalid)?;
    let mut wrapped = vec![0u8; wrapped_len];
    read_exact(reader, &mut wrapped).await?;
    let mut context_len = [0u8; 4];
    read_exact(reader, &mut context_len).await?;
    let context_len = format::parse_context_len(context_len).ok_or(EnvelopeError::Invalid)?;
    let mut context = vec![0u8; context_len];
    read_exact(reader, &mut context).await?;
    format::assemble(chunk_size, message_id, wrapped, &context).ok_or(EnvelopeError::Invalid)
}

/// `read_exact`, with a short input reported as an invalid envelope.
async fn read_exact<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut [u8],
) -> Result<(), EnvelopeError> {
    let n = read_full(reader, buf).await.map_err(EnvelopeError::Read)?;
    if n == buf.len() {
        Ok(())
    } else {
        Err(EnvelopeError::Invalid)
    }
}

/// Decrypts the chunks that follow `header` (already read from `reader`),
/// writing each chunk's plaintext only after its tag verified. Returns the
/// plaintext length. On error, the output holds a prefix of the plaintext made
/// of authenticated chunks: callers must discard it.
pub(crate) async fn decrypt<R, W>(
    header: &Header,
    mut cipher: ChunkCipher,
    reader: &mut R,
    writer: &mut W,
) -> Result<u64, EnvelopeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let chunk_size = usize::try_from(header.chunk_size()).map_err(|_| EnvelopeError::Invalid)?;
    let full = chunk_size + TAG_LEN;
    let mut buf = Zeroizing::new(Vec::with_capacity(full));
    let mut total: u64 = 0;
    loop {
        buf.resize(full, 0);
        let n = read_full(reader, &mut buf)
            .await
            .map_err(EnvelopeError::Read)?;
        buf.truncate(n);
        // Only the final chunk is short; a full-length one is never final.
        let last = n < full;
        cipher.open(&mut buf, last)?;
        total += buf.len() as u64;
        writer.write_all(&buf).await.map_err(EnvelopeError::Write)?;
        if last {
            break;
        }
    }
    // The short read above was the end of the input; a reader that yields more
    // after reporting its end is not trusted.
    let mut probe = [0u8; 1];
    if read_full(reader, &mut probe)
        .await
        .map_err(EnvelopeError::Read)?
        != 0
    {
        return Err(EnvelopeError::Invalid);
    }
    writer.flush().await.map_err(EnvelopeError::Write)?;
    Ok(total)
}
