//! [`ReEncryptJob`]: moves a file of ciphertext blobs to the primary version
//! of a key with BatchReEncrypt, in order, resumably.
//!
//! # Input and output lines
//! Each input line is one of:
//! - a JSON object `{"ciphertext_blob": "<base64>", "encryption_context":
//!   {"k": "v", ...}}` (the field names of `kms encrypt --json`;
//!   `encryption_context` is optional, other fields are kept as they are), or
//! - one standard base64 blob (no context).
//!
//! The output has exactly one line per input line, in the same order and the
//! same form: a JSON line comes back as a compact JSON object with
//! `ciphertext_blob` replaced (and `key_id`, `key_version` updated if the
//! line has them); a base64 line as the
//! new blob in base64. The context of the new blob is the line's own context.
//! A blank line is copied as a blank line. A line that fails (malformed, or
//! refused by the server for that item: bad blob, wrong context, no
//! permission, disabled version) is **copied unchanged** and listed in the
//! summary's failures with its line number and reason; the run goes on. A
//! blob already under the destination's primary version is copied unchanged
//! too and counted as already current (the server checked it; see
//! BatchReEncryptItem.already_current).
//!
//! # Checkpoint and resume
//! Before the first output byte the job writes a checkpoint file (JSON).
//! After each batch it writes the batch's output lines, fsyncs the output,
//! and then replaces the checkpoint atomically (write a temporary file,
//! fsync, rename, fsync the directory) with: input lines done, output length
//! in bytes, the SHA-256 of the input lines done, the destination key and the
//! counts so far. A run that finds a checkpoint resumes: it truncates the
//! output to the recorded length (dropping a batch written after the last
//! checkpoint), reads and hashes the lines already done and refuses to go on
//! if they differ from the recorded hash (another input), and carries on from
//! the next line. So an interrupted run (Ctrl-C, SIGKILL, crash, power loss)
//! loses and duplicates no output line; at most the one batch in flight is
//! re-encrypted again (its first result was never written). When the run
//! ends the checkpoint is removed; without a checkpoint the job refuses to
//! write into a non-empty output file.
//!
//! # Errors that stop the run
//! UNAVAILABLE (the server restarting, the network gone; also UNKNOWN and
//! CANCELLED, which is how tonic reports a connection that broke under a
//! call) is retried with capped exponential backoff for up to [`ReEncryptJob::unavailable_patience`];
//! any other failure of a whole call (INVALID_ARGUMENT for a batch larger than
//! the server's `limits.max_batch_items`, PERMISSION_DENIED, ...) stops the
//! run with the checkpoint intact, to be resumed after the cause is fixed.
//!
//! The input is read with blocking I/O between batches (as a CLI does).
//! Never: put blob bytes, contexts' values or plaintext in an error or a log.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use kms_proto::v1 as pb;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::KmsClient;

/// Default number of lines per BatchReEncrypt call (the server's default
/// limit is 1000 items; 500 blobs of up to 4 KiB stay below gRPC's default
/// 4 MiB message size).
pub const DEFAULT_BATCH_SIZE: usize = 500;

/// At most this many failures are kept with their reasons (the count is exact).
pub const MAX_LISTED_FAILURES: usize = 1000;

/// The checkpoint's format version.
const CHECKPOINT_FORMAT: u32 = 1;

/// A resumable re-encryption of a file of blobs (see the module doc).
#[derive(Debug, Clone)]
pub struct ReEncryptJob {
    output: PathBuf,
    checkpoint: PathBuf,
    destination_key: Option<String>,
    batch_size: usize,
    unavailable_patience: Duration,
}

/// Where a run is, given to the progress callback after each batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct JobProgress {
    /// Input lines done so far (including those done before a resume).
    pub lines_done: u64,
    /// Input lines that were already done when this run started (0 for a
    /// fresh run).
    pub resumed_from: u64,
    /// Lines whose blob was re-encrypted.
    pub moved: u64,
    /// Lines whose blob was already under the destination's primary version.
    pub already_current: u64,
    /// Lines that failed (copied unchanged).
    pub failed: u64,
    /// Blank lines (copied as they are).
    pub blank: u64,
}

/// One failed input line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineFailure {
    /// 1-based input line number.
    pub line: u64,
    /// The gRPC code name of the server's refusal (`INVALID_ARGUMENT`, ...),
    /// or `MALFORMED_LINE` for a line the job could not read.
    pub code: String,
    /// The server's message for the item, or what is wrong with the line.
    pub message: String,
}

/// The outcome of a finished run (counts include lines done before a resume).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ReEncryptSummary {
    /// Input lines (= output lines).
    pub lines: u64,
    /// Lines already done when this run started (0 for a fresh run).
    pub resumed_from: u64,
    /// Lines whose blob was re-encrypted.
    pub moved: u64,
    /// Lines whose blob was already under the destination's primary version.
    pub already_current: u64,
    /// Lines that failed (copied unchanged to the output).
    pub failed: u64,
    /// Blank lines (copied as they are).
    pub blank: u64,
    /// The first [`MAX_LISTED_FAILURES`] failures, by line.
    pub failures: Vec<LineFailure>,
}

/// Why a run stopped. The checkpoint (if any) is left as it was after the
/// last complete batch, so the run can be resumed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JobError {
    /// Reading or writing a file failed.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done ("cannot write the output").
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading the input failed.
    #[error("cannot read input line {line}")]
    Input {
        /// 1-based line number.
        line: u64,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The checkpoint file is not one this job wrote.
    #[error("the checkpoint {} is unreadable: {reason}", path.display())]
    BadCheckpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The input's first lines are not those the checkpoint records.
    #[error(
        "the input is not the one the checkpoint {} was made for (its first {lines} lines differ); \
         give the same input, or remove the checkpoint and the output to start over",
        path.display()
    )]
    InputChanged {
        /// The checkpoint file.
        path: PathBuf,
        /// Lines the checkpoint says are done.
        lines: u64,
    },
    /// The checkpoint was made for another destination key.
    #[error(
        "the checkpoint {} was made for destination {}, not {}",
        path.display(), destination_name(recorded), destination_name(given)
    )]
    DestinationChanged {
        /// The checkpoint file.
        path: PathBuf,
        /// The destination in the checkpoint ("" = each blob's own key).
        recorded: String,
        /// The destination of this run.
        given: String,
    },
    /// The output is shorter than the checkpoint says it was.
    #[error(
        "the output {} holds {actual} bytes, fewer than the {expected} the checkpoint records",
        path.display()
    )]
    OutputTruncated {
        /// The output file.
        path: PathBuf,
        /// Bytes in the output.
        actual: u64,
        /// Bytes the checkpoint records.
        expected: u64,
    },
    /// A non-empty output file without a checkpoint: refusing to overwrite it.
    #[error(
        "the output {} exists and is not empty, and there is no checkpoint {} to resume from; \
         remove the output or choose another",
        output.display(), checkpoint.display()
    )]
    OutputExists {
        /// The output file.
        output: PathBuf,
        /// The checkpoint file looked for.
        checkpoint: PathBuf,
    },
    /// The batch size is 0.
    #[error("the batch size must be at least 1")]
    BatchSize,
    /// A BatchReEncrypt call failed as a whole (after retries for UNAVAILABLE).
    #[error("BatchReEncrypt failed at input line {line}")]
    Rpc {
        /// 1-based number of the batch's first input line.
        line: u64,
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

impl JobError {
    /// Whether running the same job again can continue from the checkpoint
    /// once the cause is gone (a failed call, an I/O error), as opposed to
    /// a refusal that the same command will meet again (another input or
    /// destination, an existing output, a bad batch size or checkpoint).
    pub fn is_resumable(&self) -> bool {
        matches!(
            self,
            JobError::Io { .. }
                | JobError::Input { .. }
                | JobError::Rpc { .. }
                | JobError::ShortReply { .. }
        )
    }
}

/// A destination key as messages name it ("" is each blob's own key).
fn destination_name(key: &str) -> String {
    if key.is_empty() {
        "(each blob's own key)".to_owned()
    } else {
        format!("{key:?}")
    }
}

/// What the checkpoint file holds.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Checkpoint {
    format: u32,
    /// "" = each blob's own key.
    destination_key: String,
    lines_done: u64,
    output_len: u64,
    /// SHA-256 (hex) of the raw bytes of the first `lines_done` input lines,
    /// line ends included.
    input_sha256: String,
    moved: u64,
    already_current: u64,
    failed: u64,
    blank: u64,
    failures: Vec<LineFailure>,
}

/// How one input line was written.
enum Form {
    Base64,
    Json(serde_json::Map<String, serde_json::Value>),
}

/// A line the job can send.
struct ParsedLine {
    form: Form,
    blob: Vec<u8>,
    context: HashMap<String, String>,
}

/// One line of the current batch.
enum Line {
    /// Copied as it is (blank line).
    Blank(Vec<u8>),
    /// Copied unchanged, counted as failed.
    Malformed { raw: Vec<u8>, reason: String },
    /// Sent to the server as entry `entry` of the batch.
    Blob {
        raw: Vec<u8>,
        form: Form,
        entry: usize,
    },
}

impl ReEncryptJob {
    /// A job writing to `output`, with its checkpoint at `checkpoint`, moving
    /// each blob to the primary version of the key named inside it (set
    /// [`ReEncryptJob::destination_key`] to move to another key), in batches
    /// of [`DEFAULT_BATCH_SIZE`], waiting up to 5 minutes for an unavailable
    /// server.
    pub fn new(output: impl Into<PathBuf>, checkpoint: impl Into<PathBuf>) -> Self {
        ReEncryptJob {
            output: output.into(),
            checkpoint: checkpoint.into(),
            destination_key: None,
            batch_size: DEFAULT_BATCH_SIZE,
            unavailable_patience: Duration::from_secs(300),
        }
    }

    /// The checkpoint path the CLI uses for `output`: `<output>.checkpoint`.
    pub fn default_checkpoint(output: &Path) -> PathBuf {
        let mut name = output.as_os_str().to_owned();
        name.push(".checkpoint");
        PathBuf::from(name)
    }

    /// Moves every blob to the primary version of `key` (id or alias)
    /// instead of its own key's.
    pub fn destination_key(mut self, key: impl Into<String>) -> Self {
        self.destination_key = Some(key.into()).filter(|k: &String| !k.is_empty());
        self
    }

    /// Lines per BatchReEncrypt call (at most the server's
    /// `limits.max_batch_items`, 1000 by default).
    pub fn batch_size(mut self, lines: usize) -> Self {
        self.batch_size = lines;
        self
    }

    /// How long a batch is retried while the server answers UNAVAILABLE.
    pub fn unavailable_patience(mut self, patience: Duration) -> Self {
        self.unavailable_patience = patience;
        self
    }

    /// Runs (or resumes) the job over `input`, calling `progress` when it
    /// starts and after each batch.
    ///
    /// # Errors
    /// See [`JobError`]; the checkpoint then allows a resume.
    pub async fn run<R: BufRead>(
        &self,
        client: &KmsClient,
        mut input: R,
        mut progress: impl FnMut(&JobProgress),
    ) -> Result<ReEncryptSummary, JobError> {
        if self.batch_size == 0 {
            return Err(JobError::BatchSize);
        }
        let destination = self.destination_key.clone().unwrap_or_default();
        let mut hasher = Sha256::new();
        let mut state = match self.load_checkpoint()? {
            Some(checkpoint) => {
                if checkpoint.destination_key != destination {
                    return Err(JobError::DestinationChanged {
                        path: self.checkpoint.clone(),
                        recorded: checkpoint.destination_key,
                        given: destination,
                    });
                }
                self.skip_done(&mut input, &mut hasher, &checkpoint)?;
                checkpoint
            }
            None => {
                let len = std::fs::metadata(&self.output).map_or(0, |m| m.len());
                if len > 0 {
                    return Err(JobError::OutputExists {
                        output: self.output.clone(),
                        checkpoint: self.checkpoint.clone(),
                    });
                }
                let fresh = Checkpoint {
                    format: CHECKPOINT_FORMAT,
                    destination_key: destination.clone(),
                    lines_done: 0,
                    output_len: 0,
                    input_sha256: hex(&hasher.clone().finalize()),
                    moved: 0,
                    already_current: 0,
                    failed: 0,
                    blank: 0,
                    failures: Vec::new(),
                };
                // The checkpoint exists before any output byte does.
                self.save_checkpoint(&fresh)?;
                fresh
            }
        };
        let resumed_from = state.lines_done;
        let mut output = self.open_output(state.output_len)?;
        let snapshot = |s: &Checkpoint| JobProgress {
            lines_done: s.lines_done,
            resumed_from,
            moved: s.moved,
            already_current: s.already_current,
            failed: s.failed,
            blank: s.blank,
        };
        progress(&snapshot(&state));
        loop {
            let first_line = state.lines_done + 1;
            let (lines, entries, raw_len) = self.read_batch(&mut input, &mut hasher, first_line)?;
            if lines.is_empty() {
                break;
            }
            let results = if entries.is_empty() {
                Vec::new()
            } else {
                self.call(client, entries, first_line).await?
            };
            let mut text = Vec::with_capacity(raw_len + lines.len());
            for (offset, line) in lines.into_iter().enumerate() {
                let number = first_line + offset as u64;
                match line {
                    Line::Blank(raw) => {
                        state.blank += 1;
                        text.extend_from_slice(&raw);
                    }
                    Line::Malformed { raw, reason } => {
                        fail(&mut state, number, "MALFORMED_LINE".to_owned(), reason);
                        text.extend_from_slice(&raw);
                    }
                    Line::Blob { raw, form, entry } => match results.get(entry) {
                        Some(pb::batch_re_encrypt_result::Outcome::Result(item)) => {
                            if item.already_current {
                                state.already_current += 1;
                                text.extend_from_slice(&raw);
                            } else {
                                state.moved += 1;
                                write_form(&mut text, form, item);
                            }
                        }
                        Some(pb::batch_re_encrypt_result::Outcome::Error(status)) => {
                            let code = kms_proto::code_name(tonic::Code::from(status.code));
                            fail(&mut state, number, code.to_owned(), status.message.clone());
                            text.extend_from_slice(&raw);
                        }
                        None => {
                            fail(
                                &mut state,
                                number,
                                "INTERNAL".to_owned(),
                                "the server's result for this line has no outcome".to_owned(),
                            );
                            text.extend_from_slice(&raw);
                        }
                    },
                }
                text.push(b'\n');
                state.lines_done += 1;
            }
            // Output first, durable; only then the checkpoint that counts it.
            self.append(&mut output, &text)?;
            state.output_len += text.len() as u64;
            state.input_sha256 = hex(&hasher.clone().finalize());
            self.save_checkpoint(&state)?;
            progress(&snapshot(&state));
        }
        output.sync_all().map_err(|source| JobError::Io {
            what: "cannot sync the output",
            path: self.output.clone(),
            source,
        })?;
        std::fs::remove_file(&self.checkpoint).map_err(|source| JobError::Io {
            what: "cannot remove the checkpoint",
            path: self.checkpoint.clone(),
            source,
        })?;
        sync_parent(&self.checkpoint)?;
        Ok(ReEncryptSummary {
            lines: state.lines_done,
            resumed_from,
            moved: state.moved,
            already_current: state.already_current,
            failed: state.failed,
            blank: state.blank,
            failures: state.failures,
        })
    }

    fn load_checkpoint(&self) -> Result<Option<Checkpoint>, JobError> {
        let bytes = match std::fs::read(&self.checkpoint) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(JobError::Io {
                    what: "cannot read the checkpoint",
                    path: self.checkpoint.clone(),
                    source,
                });
            }
        };
        let checkpoint: Checkpoint =
            serde_json::from_slice(&bytes).map_err(|e| JobError::BadCheckpoint {
                path: self.checkpoint.clone(),
                reason: e.to_string(),
            })?;
        if checkpoint.format != CHECKPOINT_FORMAT {
            return Err(JobError::BadCheckpoint {
                path: self.checkpoint.clone(),
                reason: format!("format {} is not {CHECKPOINT_FORMAT}", checkpoint.format),
            });
        }
        Ok(Some(checkpoint))
    }

    /// Replaces the checkpoint atomically: temporary file, fsync, rename,
    /// fsync of the directory.
    fn save_checkpoint(&self, checkpoint: &Checkpoint) -> Result<(), JobError> {
        let io = |what| {
            let path = self.checkpoint.clone();
            move |source| JobError::Io { what, path, source }
        };
        let mut temporary = self.checkpoint.as_os_str().to_owned();
        temporary.push(".tmp");
        let temporary = PathBuf::from(temporary);
        let bytes = serde_json::to_vec(checkpoint).map_err(|e| JobError::BadCheckpoint {
            path: self.checkpoint.clone(),
            reason: e.to_string(),
        })?;
        let mut file = File::create(&temporary).map_err(io("cannot write the checkpoint"))?;
        file.write_all(&bytes)
            .and_then(|()| file.sync_all())
            .map_err(io("cannot write the checkpoint"))?;
        drop(file);
        std::fs::rename(&temporary, &self.checkpoint)
            .map_err(io("cannot replace the checkpoint"))?;
        sync_parent(&self.checkpoint)
    }

    /// Reads the lines the checkpoint says are done, checking their hash.
    fn skip_done(
        &self,
        input: &mut impl BufRead,
        hasher: &mut Sha256,
        checkpoint: &Checkpoint,
    ) -> Result<(), JobError> {
        let mut line = Vec::new();
        for number in 1..=checkpoint.lines_done {
            line.clear();
            let read = input
                .read_until(b'\n', &mut line)
                .map_err(|source| JobError::Input {
                    line: number,
                    source,
                })?;
            if read == 0 {
                return Err(JobError::InputChanged {
                    path: self.checkpoint.clone(),
                    lines: checkpoint.lines_done,
                });
            }
            hasher.update(&line);
        }
        if hex(&hasher.clone().finalize()) != checkpoint.input_sha256 {
            return Err(JobError::InputChanged {
                path: self.checkpoint.clone(),
                lines: checkpoint.lines_done,
            });
        }
        Ok(())
    }

    /// Opens the output for appending after truncating it to `len` bytes
    /// (what the last checkpoint counted).
    fn open_output(&self, len: u64) -> Result<File, JobError> {
        let io = |what| {
            let path = self.output.clone();
            move |source| JobError::Io { what, path, source }
        };
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.output)
            .map_err(io("cannot open the output"))?;
        let actual = file.metadata().map_err(io("cannot open the output"))?.len();
        if actual < len {
            return Err(JobError::OutputTruncated {
                path: self.output.clone(),
                actual,
                expected: len,
            });
        }
        file.set_len(len)
            .and_then(|()| file.sync_all())
            .map_err(io("cannot truncate the output"))?;
        drop(file);
        sync_parent(&self.output)?;
        OpenOptions::new()
            .append(true)
            .open(&self.output)
            .map_err(io("cannot open the output"))
    }

    fn append(&self, output: &mut File, text: &[u8]) -> Result<(), JobError> {
        output
            .write_all(text)
            .and_then(|()| output.sync_data())
            .map_err(|source| JobError::Io {
                what: "cannot write the output",
                path: self.output.clone(),
                source,
            })
    }

    /// Reads up to `batch_size` lines; returns them, the entries to send and
    /// the bytes read.
    fn read_batch(
        &self,
        input: &mut impl BufRead,
        hasher: &mut Sha256,
        first_line: u64,
    ) -> Result<(Vec<Line>, Vec<pb::BatchReEncryptEntry>, usize), JobError> {
        let mut lines = Vec::new();
        let mut entries = Vec::new();
        let mut bytes = 0;
        while lines.len() < self.batch_size {
            let mut raw = Vec::new();
            let read = input
                .read_until(b'\n', &mut raw)
                .map_err(|source| JobError::Input {
                    line: first_line + lines.len() as u64,
                    source,
                })?;
            if read == 0 {
                break;
            }
            hasher.update(&raw);
            bytes += raw.len();
            while raw.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                raw.pop();
            }
            if raw.iter().all(u8::is_ascii_whitespace) {
                lines.push(Line::Blank(raw));
                continue;
            }
            match parse_line(&raw) {
                Ok(ParsedLine {
                    form,
                    blob,
                    context,
                }) => {
                    lines.push(Line::Blob {
                        raw,
                        form,
                        entry: entries.len(),
                    });
                    entries.push(pb::BatchReEncryptEntry {
                        ciphertext_blob: blob,
                        source_encryption_context: context.clone(),
                        destination_encryption_context: context,
                    });
                }
                Err(reason) => lines.push(Line::Malformed { raw, reason }),
            }
        }
        Ok((lines, entries, bytes))
    }

    /// One BatchReEncrypt call, retried with capped backoff while the server
    /// is UNAVAILABLE (for up to `unavailable_patience`).
    async fn call(
        &self,
        client: &KmsClient,
        entries: Vec<pb::BatchReEncryptEntry>,
        first_line: u64,
    ) -> Result<Vec<pb::batch_re_encrypt_result::Outcome>, JobError> {
        let sent = entries.len();
        let request = pb::BatchReEncryptRequest {
            destination_key_id: self.destination_key.clone().unwrap_or_default(),
            source_key_id: String::new(),
            entries,
        };
        batch_re_encrypt_patiently(client, request, self.unavailable_patience)
            .await
            .map_err(|e| match e {
                BatchCallError::Rpc(source) => JobError::Rpc {
                    line: first_line,
                    source,
                },
                BatchCallError::ShortReply { got } => JobError::ShortReply { sent, got },
            })
    }
}

/// Why [`batch_re_encrypt_patiently`] gave up.
pub(crate) enum BatchCallError {
    /// The call failed (after retries while the server was unavailable).
    Rpc(crate::Error),
    /// The reply had `got` results, not one per entry.
    ShortReply { got: usize },
}

/// One BatchReEncrypt call, retried with capped exponential backoff (0.2 s
/// to 5 s) while the connection is lost (see [`lost_connection`]), for up
/// to `patience`. Returns one outcome per entry, in order; an item the
/// server answered without an outcome becomes an INTERNAL item error.
/// Shared by the re-encrypt job and the envelope rewrapper.
pub(crate) async fn batch_re_encrypt_patiently(
    client: &KmsClient,
    request: pb::BatchReEncryptRequest,
    patience: Duration,
) -> Result<Vec<pb::batch_re_encrypt_result::Outcome>, BatchCallError> {
    let sent = request.entries.len();
    let started = Instant::now();
    let mut pause = Duration::from_millis(200);
    let reply = loop {
        match client.batch_re_encrypt(request.clone()).await {
            Ok(reply) => break reply,
            Err(e) if lost_connection(&e) && started.elapsed() < patience => {
                tracing::warn!(error = %e, "BatchReEncrypt unavailable; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            Err(source) => return Err(BatchCallError::Rpc(source)),
        }
    };
    if reply.results.len() != sent {
        return Err(BatchCallError::ShortReply {
            got: reply.results.len(),
        });
    }
    Ok(reply
        .results
        .into_iter()
        .map(|r| {
            r.outcome.unwrap_or_else(|| {
                pb::batch_re_encrypt_result::Outcome::Error(pb::ItemStatus {
                    code: tonic::Code::Internal as i32,
                    message: "the server's result has no outcome".to_owned(),
                })
            })
        })
        .collect())
}

/// Whether a failed call is worth sending again: UNAVAILABLE, or the
/// connection breaking under the call (a server killed mid-call), which tonic
/// reports as UNKNOWN ("transport error: ... broken pipe") or CANCELLED; the
/// kms server itself never answers either (as `kms audit tail`'s
/// reconnection, cli/src/audit.rs). Repeating a BatchReEncrypt is safe: its
/// first answer was never written.
pub(crate) fn lost_connection(error: &crate::Error) -> bool {
    matches!(
        error.code(),
        Some(tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled)
    )
}

fn fail(state: &mut Checkpoint, line: u64, code: String, message: String) {
    state.failed += 1;
    if state.failures.len() < MAX_LISTED_FAILURES {
        state.failures.push(LineFailure {
            line,
            code,
            message,
        });
    }
}

/// A line's form, blob and context, or what is wrong with it (never quoting
/// the line: it may hold context values).
fn parse_line(raw: &[u8]) -> Result<ParsedLine, String> {
    let text = std::str::from_utf8(raw).map_err(|_| "not UTF-8".to_owned())?;
    let text = text.trim();
    if !text.starts_with('{') {
        let blob = BASE64
            .decode(text)
            .map_err(|_| "not a JSON object nor a base64 blob".to_owned())?;
        return Ok(ParsedLine {
            form: Form::Base64,
            blob,
            context: HashMap::new(),
        });
    }
    let object: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(text).map_err(|e| format!("not a JSON object: {e}"))?;
    let blob = object
        .get("ciphertext_blob")
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| "no \"ciphertext_blob\" string".to_owned())?;
    let blob = BASE64
        .decode(blob)
        .map_err(|_| "\"ciphertext_blob\" is not base64".to_owned())?;
    let mut context = HashMap::new();
    match object.get("encryption_context") {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::Object(map)) => {
            for (key, value) in map {
                let value = value
                    .as_str()
                    .ok_or_else(|| "\"encryption_context\" values must be strings".to_owned())?;
                context.insert(key.clone(), value.to_owned());
            }
        }
        Some(_) => return Err("\"encryption_context\" is not an object".to_owned()),
    }
    Ok(ParsedLine {
        form: Form::Json(object),
        blob,
        context,
    })
}

/// Writes a moved line in its input form. A JSON line gets the new blob,
/// and its `key_id` and `key_version` fields (as `kms encrypt --json`
/// prints them), if it has them, now name where the blob went: left alone
/// they would describe the new blob wrongly.
fn write_form(text: &mut Vec<u8>, form: Form, moved: &pb::BatchReEncryptItem) {
    let encoded = BASE64.encode(&moved.ciphertext_blob);
    match form {
        Form::Base64 => text.extend_from_slice(encoded.as_bytes()),
        Form::Json(mut object) => {
            object.insert(
                "ciphertext_blob".to_owned(),
                serde_json::Value::String(encoded),
            );
            if object.contains_key("key_id") {
                object.insert(
                    "key_id".to_owned(),
                    serde_json::Value::String(moved.key_id.clone()),
                );
            }
            if object.contains_key("key_version") {
                object.insert(
                    "key_version".to_owned(),
                    serde_json::Value::from(moved.key_version),
                );
            }
            // Serializing a map of JSON values cannot fail.
            let line = serde_json::to_string(&object).unwrap_or_default();
            text.extend_from_slice(line.as_bytes());
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// fsync of the directory holding `path`, so that a rename or a removal in it
/// survives a crash.
fn sync_parent(path: &Path) -> Result<(), JobError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)
        .and_then(|dir| dir.sync_all())
        .map_err(|source| JobError::Io {
            what: "cannot sync the directory",
            path: parent.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_in_both_forms_and_json_keeps_its_other_fields() {
        let line = parse_line(b"AQID").expect("base64");
        assert!(matches!(line.form, Form::Base64));
        assert_eq!((line.blob, line.context.len()), (vec![1, 2, 3], 0));
        let ParsedLine {
            form,
            blob,
            context,
        } = parse_line(br#"{"id":7,"ciphertext_blob":"AQID","encryption_context":{"tenant":"a"}}"#)
            .expect("json");
        assert_eq!(blob, vec![1, 2, 3]);
        assert_eq!(context.get("tenant").map(String::as_str), Some("a"));
        let moved = pb::BatchReEncryptItem {
            ciphertext_blob: vec![4, 5],
            key_id: "key-new".to_owned(),
            key_version: 3,
            ..Default::default()
        };
        let mut text = Vec::new();
        write_form(&mut text, form, &moved);
        let written: serde_json::Value = serde_json::from_slice(&text).expect("json out");
        assert_eq!(
            written,
            serde_json::json!({"ciphertext_blob": "BAU=", "encryption_context": {"tenant": "a"}, "id": 7})
        );
        // The fields `kms encrypt --json` prints follow the blob.
        let ParsedLine { form, .. } =
            parse_line(br#"{"ciphertext_blob":"AQID","key_id":"key-old","key_version":1}"#)
                .expect("json");
        let mut text = Vec::new();
        write_form(&mut text, form, &moved);
        let written: serde_json::Value = serde_json::from_slice(&text).expect("json out");
        assert_eq!(
            written,
            serde_json::json!({"ciphertext_blob": "BAU=", "key_id": "key-new", "key_version": 3})
        );
        for bad in [
            &b"not base64!"[..],
            br#"{"ciphertext_blob":1}"#,
            br#"{"ciphertext_blob":"AQID","encryption_context":{"a":1}}"#,
            br#"{"ciphertext_blob":"AQID""#,
        ] {
            assert!(parse_line(bad).is_err());
        }
    }
}
