//! Chunked AES-256-GCM over async streams (the STREAM construction of
//! Hoang, Reyhanitabar, Rogaway and Vizár): every chunk is sealed under the
//! per-message key with nonce = 11-byte big-endian chunk index ‖ final flag and
//! AAD = SHA-256(full header) in format v1, SHA-256(bound header) in v2. Reordering, dropping, duplicating or swapping chunks
//! (within or between messages), truncation and appended data all fail a tag.
//!
//! Memory is one chunk buffer (chunk size + 16 bytes) whatever the message size.
//! Never: write a chunk's plaintext before its tag has been verified, or leave
//! plaintext in a buffer that is not erased.

use aes_gcm::aead::{AeadInPlace as _, KeyInit as _};
use aes_gcm::{Aes256Gcm, Key, Nonce, Tag};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use zeroize::Zeroize as _;

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

    /// Encrypts `chunk` (one chunk of plaintext) in place; returns its tag.
    pub(crate) fn seal(
        &mut self,
        chunk: &mut [u8],
        last: bool,
    ) -> Result<[u8; TAG_LEN], EnvelopeError> {
        let nonce = format::chunk_nonce(self.take_index(last)?, last);
        self.aead
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), &self.aad, chunk)
            .map(Into::into)
            // Only a chunk beyond GCM's 64 GiB limit fails; chunks are ≤ 16 MiB.
            .map_err(|_| EnvelopeError::Invalid)
    }

    /// Verifies `tag` and decrypts `body` in place. On failure `body` holds no
    /// plaintext (GCM decrypts only after the tag matched).
    pub(crate) fn open(
        &mut self,
        body: &mut [u8],
        tag: &[u8; TAG_LEN],
        last: bool,
    ) -> Result<(), EnvelopeError> {
        let index = self.take_index(last).map_err(|_| EnvelopeError::Invalid)?;
        let nonce = format::chunk_nonce(index, last);
        self.aead
            .decrypt_in_place_detached(
                Nonce::from_slice(&nonce),
                &self.aad,
                body,
                Tag::from_slice(tag),
            )
            .map_err(|_| EnvelopeError::Invalid)
    }

    #[cfg(test)]
    pub(crate) fn set_next_index(&mut self, index: u64) {
        self.next_index = index;
    }
}

/// The one chunk buffer of a stream. Erased on drop up to the furthest byte
/// ever written: the rest still holds the allocator's zeros, and a small
/// message in a large-chunk buffer then costs a small erase.
struct ChunkBuffer {
    bytes: Vec<u8>,
    dirty: usize,
}

impl ChunkBuffer {
    fn new(len: usize) -> Self {
        ChunkBuffer {
            bytes: vec![0u8; len],
            dirty: 0,
        }
    }

    /// Fills the buffer from `reader` as far as the input goes; returns the
    /// bytes read.
    async fn fill(&mut self, reader: &mut Reader<'_>) -> Result<usize, std::io::Error> {
        let mut filled = 0;
        while filled < self.bytes.len() {
            match reader.read(&mut self.bytes[filled..]).await {
                Ok(0) => break,
                Ok(n) => {
                    filled += n;
                    self.dirty = self.dirty.max(filled);
                }
                Err(error) => {
                    // A failed read may have written anywhere in what it was given.
                    self.dirty = self.bytes.len();
                    return Err(error);
                }
            }
        }
        Ok(filled)
    }
}

impl Drop for ChunkBuffer {
    fn drop(&mut self) {
        self.bytes[..self.dirty].zeroize();
    }
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
async fn read_full(reader: &mut Reader<'_>, buf: &mut [u8]) -> Result<usize, std::io::Error> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]).await? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

// The loops below take trait objects rather than generic streams so that they
// (and the AES-GCM code they call) are compiled once, here, with this crate's
// optimization level, whatever the caller's build profile.
pub(crate) type Reader<'a> = dyn AsyncRead + Unpin + 'a;
pub(crate) type Writer<'a> = dyn AsyncWrite + Unpin + 'a;

/// Writes `header`, then the chunks of everything `reader` yields. With
/// `expected_len`, the input must be exactly that long (a cached data key's byte
/// budget was charged for it). Returns the plaintext length.
pub(crate) async fn encrypt(
    header: &Header,
    mut cipher: ChunkCipher,
    reader: &mut Reader<'_>,
    writer: &mut Writer<'_>,
    expected_len: Option<u64>,
) -> Result<u64, EnvelopeError> {
    writer
        .write_all(header.as_bytes())
        .await
        .map_err(EnvelopeError::Write)?;
    let chunk_size = usize::try_from(header.chunk_size()).map_err(|_| EnvelopeError::Invalid)?;
    // Allocated once at its final size and erased on drop.
    let mut buf = ChunkBuffer::new(chunk_size);
    let mut total: u64 = 0;
    loop {
        let n = buf.fill(reader).await.map_err(EnvelopeError::Read)?;
        total += n as u64;
        if expected_len.is_some_and(|expected| total > expected) {
            return Err(EnvelopeError::LengthMismatch);
        }
        // A short chunk is the final one; a message whose length is a multiple
        // of the chunk size ends with an empty final chunk.
        let last = n < chunk_size;
        let tag = cipher.seal(&mut buf.bytes[..n], last)?;
        writer
            .write_all(&buf.bytes[..n])
            .await
            .map_err(EnvelopeError::Write)?;
        writer.write_all(&tag).await.map_err(EnvelopeError::Write)?;
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
pub(crate) async fn read_header(reader: &mut Reader<'_>) -> Result<Header, EnvelopeError> {
    let mut prefix = [0u8; FIXED_PREFIX_LEN];
    read_exact(reader, &mut prefix).await?;
    let (version, chunk_size, message_id, wrapped_len) =
        format::parse_prefix(&prefix).ok_or(EnvelopeError::Invalid)?;
    let mut wrapped = vec![0u8; wrapped_len];
    read_exact(reader, &mut wrapped).await?;
    let mut context_len = [0u8; 4];
    read_exact(reader, &mut context_len).await?;
    let context_len = format::parse_context_len(context_len).ok_or(EnvelopeError::Invalid)?;
    let mut context = vec![0u8; context_len];
    read_exact(reader, &mut context).await?;
    format::assemble(version, chunk_size, message_id, wrapped, &context)
        .ok_or(EnvelopeError::Invalid)
}

/// `read_exact`, with a short input reported as an invalid envelope.
async fn read_exact(reader: &mut Reader<'_>, buf: &mut [u8]) -> Result<(), EnvelopeError> {
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
pub(crate) async fn decrypt(
    header: &Header,
    mut cipher: ChunkCipher,
    reader: &mut Reader<'_>,
    writer: &mut Writer<'_>,
) -> Result<u64, EnvelopeError> {
    let chunk_size = usize::try_from(header.chunk_size()).map_err(|_| EnvelopeError::Invalid)?;
    let full = chunk_size + TAG_LEN;
    let mut buf = ChunkBuffer::new(full);
    let mut total: u64 = 0;
    loop {
        let n = buf.fill(reader).await.map_err(EnvelopeError::Read)?;
        let body_len = n.checked_sub(TAG_LEN).ok_or(EnvelopeError::Invalid)?;
        // Only the final chunk is short; a full-length one is never final.
        let last = n < full;
        let (body, rest) = buf.bytes.split_at_mut(body_len);
        let tag: [u8; TAG_LEN] = rest[..TAG_LEN]
            .try_into()
            .map_err(|_| EnvelopeError::Invalid)?;
        cipher.open(body, &tag, last)?;
        total += body_len as u64;
        writer.write_all(body).await.map_err(EnvelopeError::Write)?;
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
