//! The audit record and checkpoint formats (compact, versioned, binary) and
//! the hash chain over them. Golden vectors in `tests/golden/` pin the format.
//!
//! Records hold no secrets by construction: the encryption context appears
//! only as a SHA-256 digest computed by the service, and there is no field
//! for plaintext, ciphertext, data keys or PINs.
//!
//! Record format 1 (all integers big-endian, strings UTF-8 with a u16 length):
//!
//! ```text
//! body  = 0x01 seq:u64 time_micros:u64 result:u8 latency_micros:u64 flags:u8
//!         principal peer request_id operation
//!         [key_id]             if flags & 1
//!         [key_version:u32]    if flags & 2
//!         [context_digest:32]  if flags & 4
//! value = body prev_hash:32 hash:32      hash = SHA-256(prev_hash ‖ body)
//! ```
//!
//! The first record (sequence 1) has a prev_hash of 32 zero bytes.
//!
//! Record format 2, the **witness** record of a cluster node (design note
//! §2.3.6): written by the audit writer itself, just before a checkpoint
//! (which then certifies it), holding the latest audit chain heads this node
//! read for the *other* nodes. It is a format-1 body with the format byte 2
//! and a list of heads appended (the event fields hold principal `"system"`,
//! empty peer and request id, operation [`WITNESS_OPERATION`], result OK):
//!
//! ```text
//! body  = 0x02 <format-1 body after its format byte>
//!         count:u16 { node:str seq:u64 hash:32 published_ms:u64 mac_len:u16 mac }*count
//! ```
//!
//! A single node writes no witness records, so its log holds only format 1;
//! format-1 records written by older builds decode and verify unchanged.
//!
//! Checkpoint format 1: `0x01 seq:u64 time_micros:u64 head_hash:32 mac_len:u16 mac`.
//! The MAC is computed over [`Checkpoint::mac_message`].

use serde::Serialize;
use sha2::{Digest, Sha256};

use kms_catalogue::StorageError;

/// First byte of an encoded audit record.
pub const RECORD_FORMAT_V1: u8 = 1;
/// First byte of an encoded witness record (format 2, see the module docs).
pub const RECORD_FORMAT_WITNESS: u8 = 2;
/// The operation name of a witness record.
pub const WITNESS_OPERATION: &str = "AuditWitness";
/// Most heads one witness record holds (the u16 count of format 2).
pub const MAX_WITNESSED_HEADS: usize = u16::MAX as usize;
/// First byte of an encoded checkpoint.
pub const CHECKPOINT_FORMAT_V1: u8 = 1;
/// The prev_hash of the first record.
pub const GENESIS_HASH: [u8; 32] = [0; 32];
/// Longest string field, in bytes.
pub const MAX_FIELD_LEN: usize = u16::MAX as usize;

const FLAG_KEY_ID: u8 = 1;
const FLAG_KEY_VERSION: u8 = 2;
const FLAG_CONTEXT_DIGEST: u8 = 4;
const CHECKPOINT_DOMAIN: &[u8] = b"kms-audit-checkpoint-v1\0";

/// The outcome of an audited request: the gRPC status codes. The numeric values
/// are stored on disk and must never change; the names are the gRPC names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
#[non_exhaustive]
pub enum ResultCode {
    /// gRPC `OK` (stored as 0).
    Ok = 0,
    /// gRPC `CANCELLED` (stored as 1).
    Cancelled = 1,
    /// gRPC `UNKNOWN` (stored as 2).
    Unknown = 2,
    /// gRPC `INVALID_ARGUMENT` (stored as 3).
    InvalidArgument = 3,
    /// gRPC `DEADLINE_EXCEEDED` (stored as 4).
    DeadlineExceeded = 4,
    /// gRPC `NOT_FOUND` (stored as 5).
    NotFound = 5,
    /// gRPC `ALREADY_EXISTS` (stored as 6).
    AlreadyExists = 6,
    /// gRPC `PERMISSION_DENIED` (stored as 7).
    PermissionDenied = 7,
    /// gRPC `RESOURCE_EXHAUSTED` (stored as 8).
    ResourceExhausted = 8,
    /// gRPC `FAILED_PRECONDITION` (stored as 9).
    FailedPrecondition = 9,
    /// gRPC `ABORTED` (stored as 10).
    Aborted = 10,
    /// gRPC `OUT_OF_RANGE` (stored as 11).
    OutOfRange = 11,
    /// gRPC `UNIMPLEMENTED` (stored as 12).
    Unimplemented = 12,
    /// gRPC `INTERNAL` (stored as 13).
    Internal = 13,
    /// gRPC `UNAVAILABLE` (stored as 14).
    Unavailable = 14,
    /// gRPC `DATA_LOSS` (stored as 15).
    DataLoss = 15,
    /// gRPC `UNAUTHENTICATED` (stored as 16).
    Unauthenticated = 16,
}

const ALL_CODES: [ResultCode; 17] = [
    ResultCode::Ok,
    ResultCode::Cancelled,
    ResultCode::Unknown,
    ResultCode::InvalidArgument,
    ResultCode::DeadlineExceeded,
    ResultCode::NotFound,
    ResultCode::AlreadyExists,
    ResultCode::PermissionDenied,
    ResultCode::ResourceExhausted,
    ResultCode::FailedPrecondition,
    ResultCode::Aborted,
    ResultCode::OutOfRange,
    ResultCode::Unimplemented,
    ResultCode::Internal,
    ResultCode::Unavailable,
    ResultCode::DataLoss,
    ResultCode::Unauthenticated,
];

impl ResultCode {
    /// The code stored as `v`; `None` for a value no code has.
    pub fn from_u8(v: u8) -> Option<ResultCode> {
        ALL_CODES.get(usize::from(v)).copied()
    }

    /// The value stored on disk (the gRPC code number).
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// The gRPC name, e.g. `"OK"`, `"INVALID_ARGUMENT"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ResultCode::Ok => "OK",
            ResultCode::Cancelled => "CANCELLED",
            ResultCode::Unknown => "UNKNOWN",
            ResultCode::InvalidArgument => "INVALID_ARGUMENT",
            ResultCode::DeadlineExceeded => "DEADLINE_EXCEEDED",
            ResultCode::NotFound => "NOT_FOUND",
            ResultCode::AlreadyExists => "ALREADY_EXISTS",
            ResultCode::PermissionDenied => "PERMISSION_DENIED",
            ResultCode::ResourceExhausted => "RESOURCE_EXHAUSTED",
            ResultCode::FailedPrecondition => "FAILED_PRECONDITION",
            ResultCode::Aborted => "ABORTED",
            ResultCode::OutOfRange => "OUT_OF_RANGE",
            ResultCode::Unimplemented => "UNIMPLEMENTED",
            ResultCode::Internal => "INTERNAL",
            ResultCode::Unavailable => "UNAVAILABLE",
            ResultCode::DataLoss => "DATA_LOSS",
            ResultCode::Unauthenticated => "UNAUTHENTICATED",
        }
    }

    /// Parses a gRPC name as printed by [`ResultCode::as_str`].
    pub fn parse(s: &str) -> Option<ResultCode> {
        ALL_CODES.into_iter().find(|c| c.as_str() == s)
    }
}

impl Serialize for ResultCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// What the service hands to the audit log; the log adds sequence, time and hashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditEvent {
    /// Who made the request (the authenticated principal), at most [`MAX_FIELD_LEN`] bytes.
    pub principal: String,
    /// The caller's network address, e.g. `"10.0.0.7:51234"`.
    pub peer: String,
    /// The request id the service assigned (empty if none).
    pub request_id: String,
    /// The operation name, e.g. `"Encrypt"`, `"CreateKey"`.
    pub operation: String,
    /// The key as named in the request (it may not exist, e.g. on a denial).
    pub key_id: Option<String>,
    /// The key version used, if one was.
    pub key_version: Option<u32>,
    /// SHA-256 of the canonical encryption context; never the context itself.
    #[serde(serialize_with = "hex_opt")]
    pub context_digest: Option<[u8; 32]>,
    /// The request's outcome.
    pub result: ResultCode,
    /// Time the request took, microseconds.
    pub latency_micros: u64,
}

fn hex_opt<S: serde::Serializer>(v: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(d) => s.serialize_str(&hex::encode(d)),
        None => s.serialize_none(),
    }
}

fn hex32<S: serde::Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(v))
}

impl AuditEvent {
    /// Checks that every field fits the record format.
    ///
    /// # Errors
    ///
    /// [`StorageError::AuditFieldTooLong`] for a string longer than [`MAX_FIELD_LEN`] bytes.
    pub fn validate(&self) -> Result<(), StorageError> {
        let fields: [(&'static str, usize); 5] = [
            ("principal", self.principal.len()),
            ("peer", self.peer.len()),
            ("request_id", self.request_id.len()),
            ("operation", self.operation.len()),
            ("key_id", self.key_id.as_ref().map_or(0, String::len)),
        ];
        for (field, len) in fields {
            if len > MAX_FIELD_LEN {
                return Err(StorageError::AuditFieldTooLong {
                    field,
                    len,
                    max: MAX_FIELD_LEN,
                });
            }
        }
        Ok(())
    }
}

/// A stored audit record: the event plus its place in the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditRecord {
    /// Sequence number: 1 for the first record, then consecutive.
    pub seq: u64,
    /// Commit time, unix microseconds; never decreases along the chain.
    pub time_micros: u64,
    /// What happened.
    #[serde(flatten)]
    pub event: AuditEvent,
    /// The previous record's hash ([`GENESIS_HASH`] for the first).
    #[serde(serialize_with = "hex32")]
    pub prev_hash: [u8; 32],
    /// SHA-256(prev_hash ‖ body), as stored.
    #[serde(serialize_with = "hex32")]
    pub hash: [u8; 32],
    /// For a witness record (format 2): the other nodes' heads it attests,
    /// at least one. Empty for every other record (format 1).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub witnessed: Vec<WitnessedHead>,
}

/// Another node's audit chain head as a witness record holds it: "node
/// `node`'s record `seq` had chain hash `hash`" (design note §2.3.6).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WitnessedHead {
    /// The node whose head it is (`[cluster] node_id`), at most [`MAX_FIELD_LEN`] bytes.
    pub node: String,
    /// Sequence number of that node's record the head covers (first is 1).
    pub seq: u64,
    /// That record's chain hash.
    #[serde(serialize_with = "hex32")]
    pub hash: [u8; 32],
    /// When the node published it, ms since the Unix epoch (its wall clock;
    /// for display only).
    pub published_ms: u64,
    /// The MAC of the checkpoint that certified it on that node, at most
    /// [`MAX_FIELD_LEN`] bytes.
    #[serde(serialize_with = "hex::serde::serialize")]
    pub checkpoint_mac: Vec<u8>,
}

impl WitnessedHead {
    /// The head as the catalogue engine publishes it ([`kms_catalogue::AuditHead`]).
    ///
    /// # Errors
    ///
    /// A short static description if its hash is not 64 hex digits or its
    /// MAC is not hex.
    pub fn from_published(head: &kms_catalogue::AuditHead) -> Result<WitnessedHead, &'static str> {
        let hash = hex::decode(&head.hash)
            .ok()
            .and_then(|h| <[u8; 32]>::try_from(h).ok())
            .ok_or("head hash is not 64 hex digits")?;
        let checkpoint_mac =
            hex::decode(&head.checkpoint_mac).map_err(|_| "checkpoint MAC is not hex")?;
        Ok(WitnessedHead {
            node: head.node.clone(),
            seq: head.seq,
            hash,
            published_ms: head.published_ms,
            checkpoint_mac,
        })
    }
}

impl AuditEvent {
    /// The event fields of a witness record.
    pub fn witness() -> AuditEvent {
        AuditEvent {
            principal: "system".into(),
            peer: String::new(),
            request_id: String::new(),
            operation: WITNESS_OPERATION.into(),
            key_id: None,
            key_version: None,
            context_digest: None,
            result: ResultCode::Ok,
            latency_micros: 0,
        }
    }
}

fn put_str(out: &mut Vec<u8>, field: &'static str, s: &str) -> Result<(), StorageError> {
    let len = u16::try_from(s.len()).map_err(|_| StorageError::AuditFieldTooLong {
        field,
        len: s.len(),
        max: MAX_FIELD_LEN,
    })?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

/// Why a record or checkpoint did not decode.
pub(crate) type DecodeResult<T> = Result<T, &'static str>;

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> DecodeResult<&'a [u8]> {
        if self.buf.len() < n {
            return Err("truncated");
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u8(&mut self) -> DecodeResult<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> DecodeResult<u16> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> DecodeResult<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> DecodeResult<u64> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    fn array<const N: usize>(&mut self) -> DecodeResult<[u8; N]> {
        self.take(N)?.try_into().map_err(|_| "truncated")
    }
    fn string(&mut self) -> DecodeResult<String> {
        let len = usize::from(self.u16()?);
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| "string is not UTF-8")
    }
}

impl AuditRecord {
    /// Encodes the hashed part of the record (everything but the two hashes).
    ///
    /// # Errors
    ///
    /// [`StorageError::AuditFieldTooLong`] for a string longer than [`MAX_FIELD_LEN`] bytes.
    pub fn encode_body(&self) -> Result<Vec<u8>, StorageError> {
        let e = &self.event;
        let mut out = Vec::with_capacity(
            64 + e.principal.len() + e.peer.len() + e.request_id.len() + e.operation.len(),
        );
        out.push(if self.witnessed.is_empty() {
            RECORD_FORMAT_V1
        } else {
            RECORD_FORMAT_WITNESS
        });
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.time_micros.to_be_bytes());
        out.push(e.result.as_u8());
        out.extend_from_slice(&e.latency_micros.to_be_bytes());
        let mut flags = 0u8;
        if e.key_id.is_some() {
            flags |= FLAG_KEY_ID;
        }
        if e.key_version.is_some() {
            flags |= FLAG_KEY_VERSION;
        }
        if e.context_digest.is_some() {
            flags |= FLAG_CONTEXT_DIGEST;
        }
        out.push(flags);
        put_str(&mut out, "principal", &e.principal)?;
        put_str(&mut out, "peer", &e.peer)?;
        put_str(&mut out, "request_id", &e.request_id)?;
        put_str(&mut out, "operation", &e.operation)?;
        if let Some(k) = &e.key_id {
            put_str(&mut out, "key_id", k)?;
        }
        if let Some(v) = e.key_version {
            out.extend_from_slice(&v.to_be_bytes());
        }
        if let Some(d) = &e.context_digest {
            out.extend_from_slice(d);
        }
        if !self.witnessed.is_empty() {
            let count = u16::try_from(self.witnessed.len()).map_err(|_| {
                StorageError::AuditFieldTooLong {
                    field: "witnessed heads",
                    len: self.witnessed.len(),
                    max: MAX_WITNESSED_HEADS,
                }
            })?;
            out.extend_from_slice(&count.to_be_bytes());
            for w in &self.witnessed {
                put_str(&mut out, "witnessed node", &w.node)?;
                out.extend_from_slice(&w.seq.to_be_bytes());
                out.extend_from_slice(&w.hash);
                out.extend_from_slice(&w.published_ms.to_be_bytes());
                let mac_len = u16::try_from(w.checkpoint_mac.len()).map_err(|_| {
                    StorageError::AuditFieldTooLong {
                        field: "witnessed checkpoint mac",
                        len: w.checkpoint_mac.len(),
                        max: MAX_FIELD_LEN,
                    }
                })?;
                out.extend_from_slice(&mac_len.to_be_bytes());
                out.extend_from_slice(&w.checkpoint_mac);
            }
        }
        Ok(out)
    }

    /// SHA-256(prev_hash ‖ body).
    pub fn chain_hash(prev_hash: &[u8; 32], body: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(prev_hash);
        h.update(body);
        h.finalize().into()
    }

    /// Builds a record chained onto `prev_hash`, computing its hash; returns
    /// the record and its stored bytes.
    ///
    /// # Errors
    ///
    /// [`StorageError::AuditFieldTooLong`] for a string longer than [`MAX_FIELD_LEN`] bytes.
    pub fn seal(
        seq: u64,
        time_micros: u64,
        event: AuditEvent,
        prev_hash: [u8; 32],
    ) -> Result<(AuditRecord, Vec<u8>), StorageError> {
        Self::seal_with_witness(seq, time_micros, event, Vec::new(), prev_hash)
    }

    /// As [`AuditRecord::seal`], for a record that may witness other nodes'
    /// heads: with `witnessed` empty it is exactly [`AuditRecord::seal`]
    /// (format 1); otherwise a witness record (format 2).
    ///
    /// # Errors
    ///
    /// [`StorageError::AuditFieldTooLong`] for a string or MAC longer than
    /// [`MAX_FIELD_LEN`] bytes or more than [`MAX_WITNESSED_HEADS`] heads.
    pub fn seal_with_witness(
        seq: u64,
        time_micros: u64,
        event: AuditEvent,
        witnessed: Vec<WitnessedHead>,
        prev_hash: [u8; 32],
    ) -> Result<(AuditRecord, Vec<u8>), StorageError> {
        let mut rec = AuditRecord {
            seq,
            time_micros,
            event,
            prev_hash,
            hash: [0; 32],
            witnessed,
        };
        let mut bytes = rec.encode_body()?;
        rec.hash = Self::chain_hash(&prev_hash, &bytes);
        bytes.extend_from_slice(&rec.prev_hash);
        bytes.extend_from_slice(&rec.hash);
        Ok((rec, bytes))
    }

    /// The stored form: body ‖ prev_hash ‖ hash (the stored hash, as is).
    ///
    /// # Errors
    ///
    /// [`StorageError::AuditFieldTooLong`] for a string longer than [`MAX_FIELD_LEN`] bytes.
    pub fn encode(&self) -> Result<Vec<u8>, StorageError> {
        let mut bytes = self.encode_body()?;
        bytes.extend_from_slice(&self.prev_hash);
        bytes.extend_from_slice(&self.hash);
        Ok(bytes)
    }

    /// Decodes a stored record. Does not check the hash: see
    /// [`AuditRecord::hash_is_valid`] and the verifier.
    ///
    /// # Errors
    ///
    /// A short static description of what does not decode (unknown format
    /// byte, truncated field, invalid UTF-8, trailing bytes, ...).
    pub fn decode(bytes: &[u8]) -> Result<AuditRecord, &'static str> {
        let mut r = Reader { buf: bytes };
        let format = r.u8()?;
        if format != RECORD_FORMAT_V1 && format != RECORD_FORMAT_WITNESS {
            return Err("unknown record format");
        }
        let seq = r.u64()?;
        let time_micros = r.u64()?;
        let result = ResultCode::from_u8(r.u8()?).ok_or("unknown result code")?;
        let latency_micros = r.u64()?;
        let flags = r.u8()?;
        if flags & !(FLAG_KEY_ID | FLAG_KEY_VERSION | FLAG_CONTEXT_DIGEST) != 0 {
            return Err("unknown flags");
        }
        let principal = r.string()?;
        let peer = r.string()?;
        let request_id = r.string()?;
        let operation = r.string()?;
        let key_id = if flags & FLAG_KEY_ID != 0 {
            Some(r.string()?)
        } else {
            None
        };
        let key_version = if flags & FLAG_KEY_VERSION != 0 {
            Some(r.u32()?)
        } else {
            None
        };
        let context_digest = if flags & FLAG_CONTEXT_DIGEST != 0 {
            Some(r.array()?)
        } else {
            None
        };
        let mut witnessed = Vec::new();
        if format == RECORD_FORMAT_WITNESS {
            let count = r.u16()?;
            if count == 0 {
                // Encoding writes format 1 for no heads: one record, one encoding.
                return Err("witness record without heads");
            }
            for _ in 0..count {
                let node = r.string()?;
                let seq = r.u64()?;
                let hash = r.array()?;
                let published_ms = r.u64()?;
                let mac_len = usize::from(r.u16()?);
                let checkpoint_mac = r.take(mac_len)?.to_vec();
                witnessed.push(WitnessedHead {
                    node,
                    seq,
                    hash,
                    published_ms,
                    checkpoint_mac,
                });
            }
        }
        let prev_hash = r.array()?;
        let hash = r.array()?;
        if !r.buf.is_empty() {
            return Err("trailing bytes");
        }
        Ok(AuditRecord {
            seq,
            time_micros,
            event: AuditEvent {
                principal,
                peer,
                request_id,
                operation,
                key_id,
                key_version,
                context_digest,
                result,
                latency_micros,
            },
            prev_hash,
            hash,
            witnessed,
        })
    }

    /// Whether the stored hash equals SHA-256(prev_hash ‖ body).
    ///
    /// # Errors
    ///
    /// [`StorageError::AuditFieldTooLong`] if the body cannot be encoded.
    pub fn hash_is_valid(&self) -> Result<bool, StorageError> {
        Ok(Self::chain_hash(&self.prev_hash, &self.encode_body()?) == self.hash)
    }
}

/// A MACed statement "the chain up to `seq` has head `head_hash`".
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Checkpoint {
    /// Sequence number of the record it certifies.
    pub seq: u64,
    /// When it was written, unix microseconds.
    pub time_micros: u64,
    /// That record's hash: the head of the chain it certifies.
    #[serde(serialize_with = "hex32")]
    pub head_hash: [u8; 32],
    /// MAC over [`Checkpoint::mac_message`] (HMAC-SHA256 in the service's HSM).
    #[serde(serialize_with = "hex::serde::serialize")]
    pub mac: Vec<u8>,
}

impl Checkpoint {
    /// The bytes the MAC covers: a domain tag, then seq, time and head hash.
    pub fn mac_message(seq: u64, time_micros: u64, head_hash: &[u8; 32]) -> Vec<u8> {
        let mut m = Vec::with_capacity(CHECKPOINT_DOMAIN.len() + 48);
        m.extend_from_slice(CHECKPOINT_DOMAIN);
        m.extend_from_slice(&seq.to_be_bytes());
        m.extend_from_slice(&time_micros.to_be_bytes());
        m.extend_from_slice(head_hash);
        m
    }

    /// The stored form (checkpoint format 1, see the module docs).
    ///
    /// # Errors
    ///
    /// [`StorageError::AuditFieldTooLong`] if the MAC is longer than [`MAX_FIELD_LEN`] bytes.
    pub fn encode(&self) -> Result<Vec<u8>, StorageError> {
        let mac_len =
            u16::try_from(self.mac.len()).map_err(|_| StorageError::AuditFieldTooLong {
                field: "checkpoint mac",
                len: self.mac.len(),
                max: MAX_FIELD_LEN,
            })?;
        let mut out = Vec::with_capacity(53 + self.mac.len());
        out.push(CHECKPOINT_FORMAT_V1);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.time_micros.to_be_bytes());
        out.extend_from_slice(&self.head_hash);
        out.extend_from_slice(&mac_len.to_be_bytes());
        out.extend_from_slice(&self.mac);
        Ok(out)
    }

    /// Decodes a stored checkpoint. Does not check the MAC.
    ///
    /// # Errors
    ///
    /// A short static description of what does not decode.
    pub fn decode(bytes: &[u8]) -> Result<Checkpoint, &'static str> {
        let mut r = Reader { buf: bytes };
        if r.u8()? != CHECKPOINT_FORMAT_V1 {
            return Err("unknown checkpoint format");
        }
        let seq = r.u64()?;
        let time_micros = r.u64()?;
        let head_hash = r.array()?;
        let len = usize::from(r.u16()?);
        let mac = r.take(len)?.to_vec();
        if !r.buf.is_empty() {
            return Err("trailing bytes");
        }
        Ok(Checkpoint {
            seq,
            time_micros,
            head_hash,
            mac,
        })
    }
}
