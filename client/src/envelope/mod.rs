//! Envelope encryption of streams of any size: a fresh data key from
//! GenerateDataKey per message (or a cached one, see [`crate::cache`]), a
//! versioned header carrying the wrapped data key, the encryption context and
//! the chunk size, then the data in AES-256-GCM chunks under a per-message key
//! (format in [`mod@format`] and the README). Writers write format version 2;
//! readers read versions 1 and 2. [`rewrap`] replaces the wrapped data key of
//! version 2 envelopes (after a rotation) and keeps their bodies.
//!
//! Decryption reads the header, unwraps the data key with the kms Decrypt RPC
//! (passing the same context, which the KMS checks too) and streams the chunks
//! back in constant memory, releasing each chunk only after its tag verified.
//!
//! Never: return a different error for different tampering (one generic
//! [`EnvelopeError::Invalid`]), or log keys, plaintext or context values.

pub mod format;
pub mod rewrap;
mod stream;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use kms_proto::v1 as pb;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::cache::{DataKeyCache, DecryptSlot, EncryptSlot};
use crate::context::{ContextError, EncryptionContext};
use crate::data_key::{DataKey, DataKeyLengthError};
use crate::{Error, KmsClient};
pub use format::{
    DEFAULT_CHUNK_SIZE, FormatVersion, Header, HeaderError, MAX_CHUNK_SIZE, MAX_CHUNKS,
};
use stream::ChunkCipher;

/// Why an envelope operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// Not an envelope, or tampered, truncated, extended, reordered, made with
    /// another data key or for another encryption context: deliberately one
    /// error with no hint of which check failed.
    #[error("invalid envelope")]
    Invalid,
    /// The message would need more than 2^32 chunks.
    #[error("message too long: more than 2^32 chunks (use a larger chunk size)")]
    TooManyChunks,
    /// The input was not as long as the declared plaintext length.
    #[error("the input length differs from the declared plaintext length")]
    LengthMismatch,
    /// A header could not be built with these parameters.
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// The encryption context was refused.
    #[error(transparent)]
    Context(#[from] ContextError),
    /// The KMS returned a data key of the wrong size.
    #[error(transparent)]
    DataKey(#[from] DataKeyLengthError),
    /// A KMS call failed (the KMS refusing to unwrap the data key, e.g. for
    /// another context, is reported as [`EnvelopeError::Invalid`]).
    #[error("KMS call failed")]
    Kms(#[source] Error),
    /// Reading the input failed.
    #[error("reading the input")]
    Read(#[source] std::io::Error),
    /// Writing the output failed.
    #[error("writing the output")]
    Write(#[source] std::io::Error),
}

/// What an encryption produced.
#[derive(Debug, Clone)]
pub struct EncryptSummary {
    /// Plaintext bytes encrypted.
    pub plaintext_len: u64,
    /// The header written (its wrapped key names the kms key and version).
    pub header: Header,
    /// Whether the data key came from the cache.
    pub cache_hit: bool,
}

/// What a decryption produced.
#[derive(Debug, Clone)]
pub struct DecryptSummary {
    /// Plaintext bytes written.
    pub plaintext_len: u64,
    /// The header read.
    pub header: Header,
    /// Whether the data key came from the cache.
    pub cache_hit: bool,
}

/// KMS calls made by an [`Envelope`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EnvelopeStats {
    /// GenerateDataKey calls.
    pub generate_data_key_calls: u64,
    /// Decrypt calls (data-key unwraps).
    pub decrypt_calls: u64,
}

/// Envelope encryption through a kms server. Cheap to clone; clones share the
/// connection, the cache and the counters.
#[derive(Clone)]
pub struct Envelope {
    kms: KmsClient,
    chunk_size: u32,
    format: FormatVersion,
    cache: Option<Arc<DataKeyCache>>,
    generate_calls: Arc<AtomicU64>,
    decrypt_calls: Arc<AtomicU64>,
}

impl fmt::Debug for Envelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Envelope")
            .field("kms", &self.kms)
            .field("chunk_size", &self.chunk_size)
            .field("format", &self.format)
            .field("cache", &self.cache)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Envelope {
    /// Envelope encryption with the default chunk size, format version 2 and
    /// no cache.
    pub fn new(kms: KmsClient) -> Self {
        Envelope {
            kms,
            chunk_size: DEFAULT_CHUNK_SIZE,
            format: FormatVersion::V2,
            cache: None,
            generate_calls: Arc::new(AtomicU64::new(0)),
            decrypt_calls: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Plaintext bytes per chunk (1 ..= 16 MiB; 64 KiB by default). Decryption
    /// uses whatever the header says.
    ///
    /// # Errors
    /// [`EnvelopeError::Header`] ([`HeaderError::ChunkSize`]) if `chunk_size` is
    /// outside 1 ..= [`MAX_CHUNK_SIZE`].
    pub fn with_chunk_size(mut self, chunk_size: u32) -> Result<Self, EnvelopeError> {
        if !(format::MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
            return Err(HeaderError::ChunkSize(chunk_size).into());
        }
        self.chunk_size = chunk_size;
        Ok(self)
    }

    /// The format version written ([`FormatVersion::V2`] by default).
    /// [`FormatVersion::V1`] only while some reader predates version 2: a
    /// version 1 envelope cannot be rewrapped (its wrapped key is bound into
    /// the message key). Decryption reads both whatever this says.
    pub fn with_format_version(mut self, format: FormatVersion) -> Self {
        self.format = format;
        self
    }

    /// Reuse data keys within `cache`'s limits (off unless set).
    pub fn with_cache(mut self, cache: Arc<DataKeyCache>) -> Self {
        self.cache = Some(cache);
        self
    }

    /// The cache, if any.
    pub fn cache(&self) -> Option<&Arc<DataKeyCache>> {
        self.cache.as_ref()
    }

    /// KMS calls made so far.
    pub fn stats(&self) -> EnvelopeStats {
        EnvelopeStats {
            generate_data_key_calls: self.generate_calls.load(Ordering::Relaxed),
            decrypt_calls: self.decrypt_calls.load(Ordering::Relaxed),
        }
    }

    /// Encrypts everything `reader` yields under a fresh data key of `key_id`
    /// (id or alias) and `context`. The length is unknown, so the cache is not
    /// used (its byte budget could not be charged first).
    ///
    /// # Errors
    /// [`EnvelopeError::Kms`] if GenerateDataKey fails (unknown key, denied,
    /// unavailable after retries); [`EnvelopeError::DataKey`] if it returns a key
    /// that is not 32 bytes; [`EnvelopeError::Header`] if the wrapped key is
    /// empty or over 4096 bytes; [`EnvelopeError::TooManyChunks`] past 2^32
    /// chunks; [`EnvelopeError::Read`] / [`EnvelopeError::Write`] for I/O
    /// errors. On error, discard whatever was written.
    pub async fn encrypt<R, W>(
        &self,
        key_id: &str,
        context: &EncryptionContext,
        reader: &mut R,
        writer: &mut W,
    ) -> Result<EncryptSummary, EnvelopeError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        self.encrypt_inner(key_id, context, None, reader, writer)
            .await
    }

    /// Encrypts exactly `plaintext_len` bytes from `reader` (a different length
    /// is an error), using the cache if one is set and the limits allow.
    ///
    /// # Errors
    /// As [`Envelope::encrypt`], and [`EnvelopeError::LengthMismatch`] if
    /// `reader` yields more or fewer than `plaintext_len` bytes.
    pub async fn encrypt_sized<R, W>(
        &self,
        key_id: &str,
        context: &EncryptionContext,
        plaintext_len: u64,
        reader: &mut R,
        writer: &mut W,
    ) -> Result<EncryptSummary, EnvelopeError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        self.encrypt_inner(key_id, context, Some(plaintext_len), reader, writer)
            .await
    }

    async fn encrypt_inner<R, W>(
        &self,
        key_id: &str,
        context: &EncryptionContext,
        plaintext_len: Option<u64>,
        reader: &mut R,
        writer: &mut W,
    ) -> Result<EncryptSummary, EnvelopeError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let slot = EncryptSlot {
            key_id: key_id.to_owned(),
            context: context.canonical_bytes(),
        };
        let cache = self
            .cache
            .as_ref()
            .zip(plaintext_len)
            .filter(|(cache, len)| cache.accepts(*len));
        if let Some((cache, len)) = cache {
            let cached = cache.use_for_encrypt(&slot, len, Instant::now(), |data_key, wrapped| {
                Header::new_with_version(
                    self.format,
                    self.chunk_size,
                    wrapped.to_vec(),
                    context.clone(),
                )
                .map(|header| (ChunkCipher::new(&header, data_key), header))
            });
            if let Some(prepared) = cached {
                let (cipher, header) = prepared?;
                let plaintext_len =
                    stream::encrypt(&header, cipher, reader, writer, plaintext_len).await?;
                return Ok(EncryptSummary {
                    plaintext_len,
                    header,
                    cache_hit: true,
                });
            }
        }
        let (data_key, wrapped) = self.generate_data_key(key_id, context).await?;
        let header = Header::new_with_version(
            self.format,
            self.chunk_size,
            wrapped.clone(),
            context.clone(),
        )?;
        let cipher = ChunkCipher::new(&header, &data_key);
        if let Some((cache, len)) = cache {
            // Cached before the data is encrypted: the budget is charged now,
            // whether or not this message completes.
            cache.insert_for_encrypt(slot, data_key, wrapped, len, Instant::now());
        }
        let plaintext_len = stream::encrypt(&header, cipher, reader, writer, plaintext_len).await?;
        Ok(EncryptSummary {
            plaintext_len,
            header,
            cache_hit: false,
        })
    }

    /// Decrypts an envelope from `reader` to `writer`. `context` must be the one
    /// given to encrypt (it is compared with the header and passed to the kms
    /// Decrypt). With `expected_key` (id or alias), the data key must have been
    /// wrapped by that key. On error, discard whatever was written.
    ///
    /// # Errors
    /// [`EnvelopeError::Invalid`] for anything wrong with the envelope (not an
    /// envelope, tampered, truncated, another context, a wrapped key the KMS
    /// refuses as invalid ciphertext); [`EnvelopeError::Kms`] if Decrypt fails
    /// otherwise (denied, key disabled, unavailable after retries);
    /// [`EnvelopeError::Read`] / [`EnvelopeError::Write`] for I/O errors.
    pub async fn decrypt<R, W>(
        &self,
        expected_key: Option<&str>,
        context: &EncryptionContext,
        reader: &mut R,
        writer: &mut W,
    ) -> Result<DecryptSummary, EnvelopeError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let header = stream::read_header(reader).await?;
        if header.context() != context {
            return Err(EnvelopeError::Invalid);
        }
        let slot = DecryptSlot {
            wrapped: header.wrapped_data_key().to_vec(),
            context: context.canonical_bytes(),
            expected_key: expected_key.unwrap_or_default().to_owned(),
        };
        let cached = self.cache.as_ref().and_then(|cache| {
            cache.use_for_decrypt(&slot, Instant::now(), |data_key| {
                ChunkCipher::new(&header, data_key)
            })
        });
        let cache_hit = cached.is_some();
        let cipher = match cached {
            Some(cipher) => cipher,
            None => {
                let data_key = self
                    .unwrap_data_key(header.wrapped_data_key(), context, expected_key)
                    .await?;
                let cipher = ChunkCipher::new(&header, &data_key);
                if let Some(cache) = &self.cache {
                    cache.insert_for_decrypt(slot, data_key, Instant::now());
                }
                cipher
            }
        };
        let plaintext_len = stream::decrypt(&header, cipher, reader, writer).await?;
        Ok(DecryptSummary {
            plaintext_len,
            header,
            cache_hit,
        })
    }

    async fn generate_data_key(
        &self,
        key_id: &str,
        context: &EncryptionContext,
    ) -> Result<(DataKey, Vec<u8>), EnvelopeError> {
        self.generate_calls.fetch_add(1, Ordering::Relaxed);
        let mut reply = self
            .kms
            .generate_data_key(pb::GenerateDataKeyRequest {
                key_id: key_id.to_owned(),
                encryption_context: context.to_proto_map(),
                length: Some(pb::generate_data_key_request::Length::KeySpec(
                    pb::DataKeySpec::Aes256.into(),
                )),
            })
            .await
            .map_err(EnvelopeError::Kms)?;
        let data_key = DataKey::from_vec(std::mem::take(&mut reply.plaintext))?;
        Ok((data_key, std::mem::take(&mut reply.ciphertext_blob)))
    }

    async fn unwrap_data_key(
        &self,
        wrapped: &[u8],
        context: &EncryptionContext,
        expected_key: Option<&str>,
    ) -> Result<DataKey, EnvelopeError> {
        self.decrypt_calls.fetch_add(1, Ordering::Relaxed);
        let reply = self
            .kms
            .decrypt(pb::DecryptRequest {
                ciphertext_blob: wrapped.to_vec(),
                encryption_context: context.to_proto_map(),
                key_id: expected_key.unwrap_or_default().to_owned(),
            })
            .await;
        let mut reply = match reply {
            Ok(reply) => reply,
            // The KMS's own "invalid ciphertext": a foreign or tampered wrapped key.
            Err(error) if error.code() == Some(tonic::Code::InvalidArgument) => {
                return Err(EnvelopeError::Invalid);
            }
            Err(error) => return Err(EnvelopeError::Kms(error)),
        };
        DataKey::from_vec(std::mem::take(&mut reply.plaintext)).map_err(|_| EnvelopeError::Invalid)
    }
}

/// Reads just the header of an envelope (to see its context, chunk size or
/// wrapped key) without decrypting anything.
///
/// # Errors
/// [`EnvelopeError::Invalid`] if the bytes are not a well-formed version 1 or
/// 2 header; [`EnvelopeError::Read`] if reading fails.
pub async fn read_header<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Header, EnvelopeError> {
    stream::read_header(reader).await
}

/// Encrypts with a data key the caller already holds (and its wrapped form),
/// without calling a KMS: for callers that manage data keys themselves, tests
/// and benchmarks. Writes format version 2. A fresh random message id keeps
/// messages apart even when the same data key is used for many of them.
///
/// # Errors
/// [`EnvelopeError::Header`] for a chunk size outside 1 ..= 16 MiB or a wrapped
/// key that is empty or over 4096 bytes; [`EnvelopeError::TooManyChunks`] past
/// 2^32 chunks; [`EnvelopeError::Read`] / [`EnvelopeError::Write`] for I/O errors.
pub async fn encrypt_with_data_key<R, W>(
    data_key: &DataKey,
    wrapped_data_key: Vec<u8>,
    context: &EncryptionContext,
    chunk_size: u32,
    reader: &mut R,
    writer: &mut W,
) -> Result<EncryptSummary, EnvelopeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let header = Header::new(chunk_size, wrapped_data_key, context.clone())?;
    encrypt_with_header(data_key, header, reader, writer).await
}

pub(crate) async fn encrypt_with_header<R, W>(
    data_key: &DataKey,
    header: Header,
    reader: &mut R,
    writer: &mut W,
) -> Result<EncryptSummary, EnvelopeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let cipher = ChunkCipher::new(&header, data_key);
    let plaintext_len = stream::encrypt(&header, cipher, reader, writer, None).await?;
    Ok(EncryptSummary {
        plaintext_len,
        header,
        cache_hit: false,
    })
}

/// Decrypts with a data key the caller already holds (see
/// [`encrypt_with_data_key`]); `context` must equal the header's. Reads
/// versions 1 and 2. Nothing here checks a version 2 header's wrapped data key
/// (it is not part of the message key, so that it can be rewrapped; the kms
/// Decrypt RPC authenticates it when the data key is unwrapped): the caller
/// vouches for the data key.
///
/// # Errors
/// [`EnvelopeError::Invalid`] for a malformed or tampered envelope, another
/// context or another data key; [`EnvelopeError::Read`] /
/// [`EnvelopeError::Write`] for I/O errors. On error, discard whatever was
/// written.
pub async fn decrypt_with_data_key<R, W>(
    data_key: &DataKey,
    context: &EncryptionContext,
    reader: &mut R,
    writer: &mut W,
) -> Result<DecryptSummary, EnvelopeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let header = stream::read_header(reader).await?;
    if header.context() != context {
        return Err(EnvelopeError::Invalid);
    }
    let cipher = ChunkCipher::new(&header, data_key);
    let plaintext_len = stream::decrypt(&header, cipher, reader, writer).await?;
    Ok(DecryptSummary {
        plaintext_len,
        header,
        cache_hit: false,
    })
}

#[cfg(test)]
mod golden;
#[cfg(test)]
mod tests;
