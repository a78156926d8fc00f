//! [`Rewrapper`]: moves envelope files to the primary version of a key (after
//! a rotation, or to another key) by replacing only the wrapped data key in
//! their headers; the body — every byte after the header — is copied
//! unchanged, never decrypted or encrypted again.
//!
//! # Which envelopes
//! Format version 2 only: its message key and chunk AAD cover the header
//! without the wrapped data key (see [`super::format`]), so the same data key
//! under a new wrapped key opens the same body. A version 1 envelope binds the
//! wrapped key into its message key: its body cannot be kept, and it is
//! **refused** ([`FileFailure::Version1`], file untouched) with the fix in the
//! message: decrypt it and encrypt it again (`kms envelope decrypt … | kms
//! envelope encrypt …` writes version 2), then it can be rewrapped. No
//! conversion happens behind the caller's back: converting means handling the
//! plaintext, which a rewrap never does.
//!
//! # How
//! Files go in batches of [`Rewrapper::batch_size`]: each file's header is
//! read, the batch's wrapped keys go to the kms in one BatchReEncrypt call
//! (source and destination context = the header's context; destination key
//! = the key named in each wrapped key, or [`Rewrapper::destination_key`]),
//! and for each result:
//! - `already_current` (the wrapped key is under the destination's primary
//!   version already): the file is not touched;
//! - a new wrapped key: the file is replaced atomically — `<file>.rewrap.tmp`
//!   is written in the same directory (new header, then the old body; the
//!   original's owner, group and permission bits), fsynced, renamed over the
//!   original, and the directory fsynced. The file gets a new inode: hard
//!   links to it keep the old envelope, and a symbolic link given as the path
//!   is replaced by the new file. The header is read again just before and must be the
//!   one that was sent (else [`FileFailure::Changed`]);
//! - an error for that item (bad wrapped key, wrong context, disabled version,
//!   no permission): the file is not touched and the failure is reported.
//!
//! A file that cannot be read, is not an envelope or has a truncated header
//! fails alone; the others are still done.
//!
//! # Crashes and resuming
//! At any instant each file is either the old envelope or the new one, both
//! decryptable (the old wrapped key's version stays decryptable until it is
//! disabled or destroyed). A `.rewrap.tmp` left by a crash is overwritten
//! when its file is rewrapped again, or removed when its file turns out to be
//! current or fails. So a re-run over the same list is the resume: files
//! already replaced come back `already_current` from the server and are not
//! touched; no file is replaced twice. Only the BatchReEncrypt of the batch
//! in flight at the crash may be made again (its results were never
//! written); that costs audit records and GCM invocations, not correctness.
//! No checkpoint is needed. Run one rewrap at a time over a given file.
//!
//! # Errors that stop the run
//! UNAVAILABLE (and UNKNOWN / CANCELLED: a connection broken under the call)
//! is retried with capped backoff for [`Rewrapper::unavailable_patience`];
//! any other failure of a whole BatchReEncrypt call stops the run
//! ([`RewrapError`]), every file done so far staying done.
//!
//! Never: read or write plaintext, hold a data key, or put wrapped keys or
//! context values in an error or a log.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kms_proto::v1 as pb;
use serde::Serialize;
use tokio::io::{AsyncWriteExt as _, BufReader, BufWriter};

use super::format::{FormatVersion, Header, HeaderError};
use super::{EnvelopeError, stream};
use crate::KmsClient;
use crate::reencrypt::{BatchCallError, batch_re_encrypt_patiently};

/// Default number of files per BatchReEncrypt call (the server's default
/// limit is 1000 items).
pub const DEFAULT_BATCH_SIZE: usize = 100;

/// Suffix of the temporary file written beside each file being replaced.
pub const TEMP_SUFFIX: &str = ".rewrap.tmp";

/// Rewraps envelope files (see the module doc). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Rewrapper {
    kms: KmsClient,
    destination_key: Option<String>,
    batch_size: usize,
    unavailable_patience: Duration,
}

/// A key version a wrapped data key is under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyVersion {
    /// Canonical key id.
    pub key_id: String,
    /// Version number.
    pub version: u32,
}

/// What happened to one header.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum HeaderOutcome {
    /// A new header: the same fields, the new wrapped data key.
    Rewrapped {
        /// The new header (the body that followed the old one follows it).
        header: Header,
        /// Where the wrapped key was.
        from: KeyVersion,
        /// Where it is now (the destination's primary version).
        to: KeyVersion,
    },
    /// The wrapped key is already under the destination's primary version.
    AlreadyCurrent {
        /// That version.
        current: KeyVersion,
    },
    /// Refused (see the reason).
    Failed(FileFailure),
}

/// What happened to one file.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FileOutcome {
    /// Replaced with a new header and the same body.
    Rewrapped {
        /// Where the wrapped key was.
        from: KeyVersion,
        /// Where it is now.
        to: KeyVersion,
    },
    /// Not touched: already under the destination's primary version.
    AlreadyCurrent {
        /// That version.
        current: KeyVersion,
    },
    /// Not touched (or, for [`FileFailure::Io`] after the rename, replaced
    /// but not confirmed durable): see the reason.
    Failed(FileFailure),
}

/// Why one file was not rewrapped. Messages name no wrapped-key bytes and no
/// context values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FileFailure {
    /// Reading or replacing the file failed (missing, no permission, a
    /// directory, disk full).
    #[error("{what}: {message}")]
    Io {
        /// What was being done ("cannot open the file").
        what: &'static str,
        /// The operating system's message.
        message: String,
    },
    /// Not an envelope, or a header that is truncated or malformed.
    #[error("not an envelope (or its header is truncated or malformed)")]
    NotAnEnvelope,
    /// A format version 1 envelope: its body cannot be kept.
    #[error(
        "envelope format version 1 binds the wrapped data key into the message key, so its \
         body cannot be kept; decrypt it and encrypt it again (kms envelope decrypt … | kms \
         envelope encrypt … writes version 2), then rewrap that"
    )]
    Version1,
    /// The server refused this item (its code and message).
    #[error("{code}: {message}")]
    Refused {
        /// gRPC code name (`INVALID_ARGUMENT`, `FAILED_PRECONDITION`,
        /// `PERMISSION_DENIED`, ...).
        code: String,
        /// The server's message for the item.
        message: String,
    },
    /// The new wrapped key does not fit a header (over 4096 bytes).
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// The file's header changed between reading and replacing it.
    #[error("the file changed while it was being rewrapped; run again")]
    Changed,
}

impl FileFailure {
    /// A short stable name: `IO`, `NOT_AN_ENVELOPE`, `ENVELOPE_V1`,
    /// `HEADER`, `CHANGED`, or the server's gRPC code name.
    pub fn code(&self) -> &str {
        match self {
            FileFailure::Io { .. } => "IO",
            FileFailure::NotAnEnvelope => "NOT_AN_ENVELOPE",
            FileFailure::Version1 => "ENVELOPE_V1",
            FileFailure::Refused { code, .. } => code,
            FileFailure::Header(_) => "HEADER",
            FileFailure::Changed => "CHANGED",
        }
    }
}

/// One file and its outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileResult {
    /// The file, as given.
    pub path: PathBuf,
    /// What happened to it.
    pub outcome: FileOutcome,
}

/// One failed file in a [`RewrapSummary`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailedFile {
    /// The file, as given (lossily as UTF-8).
    pub path: String,
    /// [`FileFailure::code`].
    pub code: String,
    /// [`FileFailure`]'s message.
    pub message: String,
}

/// The outcome of [`Rewrapper::rewrap_files`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RewrapSummary {
    /// Files given.
    pub files: u64,
    /// Files replaced with a new wrapped key.
    pub rewrapped: u64,
    /// Files already under the destination's primary version (untouched).
    pub already_current: u64,
    /// Files that failed.
    pub failed: u64,
    /// Every failure, in the order of the files.
    pub failures: Vec<FailedFile>,
}

/// Why a run stopped before the end (files done so far stay done).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RewrapError {
    /// The batch size is 0.
    #[error("the batch size must be at least 1")]
    BatchSize,
    /// A BatchReEncrypt call failed as a whole (after retries for
    /// UNAVAILABLE): the batch starting at `first_file` was not done.
    #[error("BatchReEncrypt failed for the batch starting at {first_file}")]
    Rpc {
        /// The batch's first file.
        first_file: String,
        /// The client error.
        #[source]
        source: crate::Error,
    },
    /// The server answered with a different number of results than entries.
    #[error("the server answered {got} results for {sent} entries")]
    ShortReply {
        /// Entries sent.
        sent: usize,
        /// Results received.
        got: usize,
    },
}

/// A header read from a file, or why not.
type HeaderRead = Result<Header, FileFailure>;

impl Rewrapper {
    /// Rewraps to the primary version of the key named in each wrapped key,
    /// [`DEFAULT_BATCH_SIZE`] files per call, waiting up to 5 minutes for an
    /// unavailable server.
    pub fn new(kms: KmsClient) -> Self {
        Rewrapper {
            kms,
            destination_key: None,
            batch_size: DEFAULT_BATCH_SIZE,
            unavailable_patience: Duration::from_secs(300),
        }
    }

    /// Rewraps to the primary version of `key` (id or alias) instead; the
    /// caller needs ReEncrypt rights out of the source key and into `key`.
    pub fn destination_key(mut self, key: impl Into<String>) -> Self {
        self.destination_key = Some(key.into()).filter(|k: &String| !k.is_empty());
        self
    }

    /// Files per BatchReEncrypt call (1 ..= the server's
    /// `limits.max_batch_items`, 1000 by default).
    pub fn batch_size(mut self, files: usize) -> Self {
        self.batch_size = files;
        self
    }

    /// How long a call is retried while the server answers UNAVAILABLE.
    pub fn unavailable_patience(mut self, patience: Duration) -> Self {
        self.unavailable_patience = patience;
        self
    }

    /// Rewraps one header (no file is read or written): the new header, or
    /// why not. A version 1 header is refused without a call.
    ///
    /// # Errors
    /// [`RewrapError`] if the call fails as a whole.
    pub async fn rewrap_header(&self, header: &Header) -> Result<HeaderOutcome, RewrapError> {
        let mut outcomes = self
            .rewrap_headers(vec![Ok(header.clone())], "header")
            .await?;
        outcomes
            .pop()
            .ok_or(RewrapError::ShortReply { sent: 1, got: 0 })
    }

    /// Rewraps one file (see the module doc).
    ///
    /// # Errors
    /// [`RewrapError`] if the call fails as a whole; anything about the file
    /// itself is its [`FileOutcome::Failed`].
    pub async fn rewrap_file(&self, path: &Path) -> Result<FileResult, RewrapError> {
        let mut last = None;
        self.rewrap_files([path.to_owned()], |result| last = Some(result.clone()))
            .await?;
        last.ok_or(RewrapError::ShortReply { sent: 1, got: 0 })
    }

    /// Rewraps every file of `paths`, in batches, calling `on_file` with each
    /// file's outcome as soon as it is known (in the order of `paths`).
    ///
    /// # Errors
    /// [`RewrapError`] if a call fails as a whole: the run stops there (the
    /// files reported to `on_file` are done; run again to finish).
    pub async fn rewrap_files(
        &self,
        paths: impl IntoIterator<Item = PathBuf>,
        mut on_file: impl FnMut(&FileResult),
    ) -> Result<RewrapSummary, RewrapError> {
        if self.batch_size == 0 {
            return Err(RewrapError::BatchSize);
        }
        let mut summary = RewrapSummary::default();
        let mut paths = paths.into_iter().peekable();
        while paths.peek().is_some() {
            let batch: Vec<PathBuf> = paths.by_ref().take(self.batch_size).collect();
            let mut reads = Vec::with_capacity(batch.len());
            for path in &batch {
                reads.push(read_file_header(path).await);
            }
            let first = batch
                .first()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            let outcomes = self.rewrap_headers(reads.clone(), &first).await?;
            for ((path, read), outcome) in batch.into_iter().zip(reads).zip(outcomes) {
                let outcome = match (outcome, read) {
                    (HeaderOutcome::Rewrapped { header, from, to }, Ok(old)) => {
                        match replace(&path, &old, &header).await {
                            Ok(()) => FileOutcome::Rewrapped { from, to },
                            Err(failure) => FileOutcome::Failed(failure),
                        }
                    }
                    (HeaderOutcome::AlreadyCurrent { current }, _) => {
                        FileOutcome::AlreadyCurrent { current }
                    }
                    (HeaderOutcome::Failed(failure), _) => FileOutcome::Failed(failure),
                    // rewrap_headers never rewraps a header that was not read.
                    (HeaderOutcome::Rewrapped { .. }, Err(failure)) => FileOutcome::Failed(failure),
                };
                if !matches!(outcome, FileOutcome::Rewrapped { .. }) {
                    // A leftover of a crashed run; the file itself is as it was.
                    let _ = tokio::fs::remove_file(temp_path(&path)).await;
                }
                summary.files += 1;
                match &outcome {
                    FileOutcome::Rewrapped { .. } => summary.rewrapped += 1,
                    FileOutcome::AlreadyCurrent { .. } => summary.already_current += 1,
                    FileOutcome::Failed(failure) => {
                        summary.failed += 1;
                        summary.failures.push(FailedFile {
                            path: path.display().to_string(),
                            code: failure.code().to_owned(),
                            message: failure.to_string(),
                        });
                    }
                }
                on_file(&FileResult { path, outcome });
            }
        }
        Ok(summary)
    }

    /// One BatchReEncrypt for the headers that were read (and are version
    /// 2); one outcome per input, in order.
    async fn rewrap_headers(
        &self,
        reads: Vec<HeaderRead>,
        first: &str,
    ) -> Result<Vec<HeaderOutcome>, RewrapError> {
        let mut entries = Vec::new();
        for header in reads.iter().flatten() {
            if header.version() != FormatVersion::V1 {
                let context = header.context().to_proto_map();
                entries.push(pb::BatchReEncryptEntry {
                    ciphertext_blob: header.wrapped_data_key().to_vec(),
                    source_encryption_context: context.clone(),
                    destination_encryption_context: context,
                });
            }
        }
        let mut results = if entries.is_empty() {
            Vec::new()
        } else {
            self.call(entries, first).await?
        }
        .into_iter();
        let mut outcomes = Vec::with_capacity(reads.len());
        for read in reads {
            let header = match read {
                Err(failure) => {
                    outcomes.push(HeaderOutcome::Failed(failure));
                    continue;
                }
                Ok(header) if header.version() == FormatVersion::V1 => {
                    outcomes.push(HeaderOutcome::Failed(FileFailure::Version1));
                    continue;
                }
                Ok(header) => header,
            };
            let outcome = match results.next() {
                Some(pb::batch_re_encrypt_result::Outcome::Result(item)) => {
                    let to = KeyVersion {
                        key_id: item.key_id,
                        version: item.key_version,
                    };
                    if item.already_current {
                        HeaderOutcome::AlreadyCurrent { current: to }
                    } else {
                        match header.with_wrapped_data_key(item.ciphertext_blob) {
                            Ok(header) => HeaderOutcome::Rewrapped {
                                header,
                                from: KeyVersion {
                                    key_id: item.source_key_id,
                                    version: item.source_key_version,
                                },
                                to,
                            },
                            Err(e) => HeaderOutcome::Failed(e.into()),
                        }
                    }
                }
                Some(pb::batch_re_encrypt_result::Outcome::Error(status)) => {
                    HeaderOutcome::Failed(FileFailure::Refused {
                        code: kms_proto::code_name(tonic::Code::from(status.code)).to_owned(),
                        message: status.message,
                    })
                }
                None => HeaderOutcome::Failed(FileFailure::Refused {
                    code: "INTERNAL".to_owned(),
                    message: "the server's result for this item has no outcome".to_owned(),
                }),
            };
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }

    /// One BatchReEncrypt call, retried with capped backoff while the server
    /// is unavailable (as the re-encrypt job does).
    async fn call(
        &self,
        entries: Vec<pb::BatchReEncryptEntry>,
        first: &str,
    ) -> Result<Vec<pb::batch_re_encrypt_result::Outcome>, RewrapError> {
        let sent = entries.len();
        let request = pb::BatchReEncryptRequest {
            destination_key_id: self.destination_key.clone().unwrap_or_default(),
            source_key_id: String::new(),
            entries,
        };
        batch_re_encrypt_patiently(&self.kms, request, self.unavailable_patience)
            .await
            .map_err(|e| match e {
                BatchCallError::Rpc(source) => RewrapError::Rpc {
                    first_file: first.to_owned(),
                    source,
                },
                BatchCallError::ShortReply { got } => RewrapError::ShortReply { sent, got },
            })
    }
}

/// `<path>.rewrap.tmp`, in the same directory (so the rename is atomic).
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(TEMP_SUFFIX);
    PathBuf::from(name)
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> FileFailure {
    move |e| FileFailure::Io {
        what,
        message: e.to_string(),
    }
}

async fn read_file_header(path: &Path) -> HeaderRead {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(io("cannot open the file"))?;
    // Just the header: a small buffer, whatever the file's size.
    let mut reader = BufReader::with_capacity(4096, file);
    stream::read_header(&mut reader).await.map_err(|e| match e {
        EnvelopeError::Read(e) => io("cannot read the file")(e),
        _ => FileFailure::NotAnEnvelope,
    })
}

/// Replaces `path` (whose header must still be `old`) with `new` followed by
/// the body, atomically (see the module doc).
async fn replace(path: &Path, old: &Header, new: &Header) -> Result<(), FileFailure> {
    let temp = temp_path(path);
    let result = write_and_rename(path, &temp, old, new).await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&temp).await;
    }
    result
}

async fn write_and_rename(
    path: &Path,
    temp: &Path,
    old: &Header,
    new: &Header,
) -> Result<(), FileFailure> {
    let source = tokio::fs::File::open(path)
        .await
        .map_err(io("cannot open the file"))?;
    let metadata = source
        .metadata()
        .await
        .map_err(io("cannot read the file's metadata"))?;
    let mut reader = BufReader::with_capacity(1 << 16, source);
    let again = stream::read_header(&mut reader)
        .await
        .map_err(|_| FileFailure::Changed)?;
    if again.as_bytes() != old.as_bytes() {
        return Err(FileFailure::Changed);
    }
    // A leftover of a crashed run is removed, and the temporary file is then
    // created new: never written through whatever else sits at that name (a
    // symbolic link planted in a shared directory).
    match tokio::fs::remove_file(temp).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(io("cannot remove an old temporary file")(e));
        }
        _ => {}
    }
    let mut options = tokio::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    options.mode(0o600);
    let temp_file = options
        .open(temp)
        .await
        .map_err(io("cannot create the temporary file"))?;
    // The original's owner and permission bits, before any byte is written.
    let temp_file = keep_owner(temp_file, &metadata).await?;
    temp_file
        .set_permissions(metadata.permissions())
        .await
        .map_err(io("cannot set the temporary file's permissions"))?;
    let mut writer = BufWriter::with_capacity(1 << 16, temp_file);
    let write = "cannot write the temporary file";
    writer.write_all(new.as_bytes()).await.map_err(io(write))?;
    tokio::io::copy(&mut reader, &mut writer)
        .await
        .map_err(io(write))?;
    writer.flush().await.map_err(io(write))?;
    writer
        .into_inner()
        .sync_all()
        .await
        .map_err(io("cannot sync the temporary file"))?;
    tokio::fs::rename(temp, path)
        .await
        .map_err(io("cannot rename the temporary file over the file"))?;
    sync_parent(path).await
}

/// Gives `file` the owner and group of `original` when they differ (a rewrap
/// run by root over other users' files must not hand them to root); a caller
/// not allowed to do so gets a failure and the original stays as it was.
#[cfg(unix)]
async fn keep_owner(
    file: tokio::fs::File,
    original: &std::fs::Metadata,
) -> Result<tokio::fs::File, FileFailure> {
    use std::os::unix::fs::MetadataExt as _;
    let what = "cannot give the temporary file the original's owner";
    let current = file.metadata().await.map_err(io(what))?;
    if (current.uid(), current.gid()) == (original.uid(), original.gid()) {
        return Ok(file);
    }
    let file = file.into_std().await;
    std::os::unix::fs::fchown(&file, Some(original.uid()), Some(original.gid()))
        .map_err(io(what))?;
    Ok(tokio::fs::File::from_std(file))
}

#[cfg(not(unix))]
async fn keep_owner(
    file: tokio::fs::File,
    _original: &std::fs::Metadata,
) -> Result<tokio::fs::File, FileFailure> {
    Ok(file)
}

/// fsync of the directory holding `path`, so that the rename survives a
/// crash.
async fn sync_parent(path: &Path) -> Result<(), FileFailure> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let dir = tokio::fs::File::open(&parent)
        .await
        .map_err(io("cannot open the directory to sync it"))?;
    dir.sync_all()
        .await
        .map_err(io("cannot sync the directory"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_files_sit_beside_their_file_and_failures_have_stable_codes() {
        assert_eq!(
            temp_path(Path::new("dir/a.kmse")),
            PathBuf::from("dir/a.kmse.rewrap.tmp")
        );
        assert_eq!(FileFailure::Version1.code(), "ENVELOPE_V1");
        assert!(
            FileFailure::Version1
                .to_string()
                .contains("kms envelope decrypt")
        );
        let refused = FileFailure::Refused {
            code: "FAILED_PRECONDITION".to_owned(),
            message: "key version disabled".to_owned(),
        };
        assert_eq!(refused.code(), "FAILED_PRECONDITION");
    }

    #[tokio::test]
    async fn headers_of_bad_files_are_failures_of_their_own() {
        let dir = std::env::temp_dir().join(format!("kms-rewrap-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let not_envelope = dir.join("plain.txt");
        std::fs::write(&not_envelope, b"hello, not an envelope").expect("write");
        assert_eq!(
            read_file_header(&not_envelope).await,
            Err(FileFailure::NotAnEnvelope)
        );
        let missing = read_file_header(&dir.join("missing")).await;
        assert!(
            matches!(&missing, Err(FileFailure::Io { what, .. }) if *what == "cannot open the file"),
            "{missing:?}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
