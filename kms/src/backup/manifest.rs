//! `manifest.json`: what a backup holds and the SHA-256 of each file, so
//! that a damaged or altered backup is refused before anything is restored.
//! Its own SHA-256 is the backup's id.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::BackupError;

/// The manifest's file name, in the backup directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// The manifest format this build writes and reads.
pub const MANIFEST_FORMAT: u32 = 1;

/// The database copy's directory, in the backup directory.
pub(crate) const DB_DIR: &str = "db";

/// What a backup holds (`manifest.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: u32,
    /// When the copy was taken, unix milliseconds.
    pub created_unix_ms: u64,
    /// The node the copy was taken from (`[cluster] node_id`, else the host name).
    pub node_id: String,
    /// Sequence number of the last audit record in the copy (0: none).
    pub audit_head_seq: u64,
    /// That record's chain hash, lowercase hex (64 digits; empty when none).
    pub audit_head_hash: String,
    /// Root epochs the copied catalogue references (versions not destroyed,
    /// service keys), ascending.
    pub root_epochs: Vec<u32>,
    /// Every file of the copy, by path relative to the backup directory
    /// (`/`-separated), sorted.
    pub files: Vec<FileEntry>,
}

/// One file of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Path relative to the backup directory, `/`-separated (`db/000012.sst`).
    pub path: String,
    /// Size, bytes.
    pub size: u64,
    /// SHA-256 of the contents, lowercase hex.
    pub sha256: String,
}

/// A backup whose every file matched its manifest.
#[derive(Debug, Clone)]
pub struct VerifiedBackup {
    /// The backup directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// SHA-256 of `manifest.json`, lowercase hex: the backup's id.
    pub id: String,
}

impl VerifiedBackup {
    /// The database copy's directory.
    pub fn db_dir(&self) -> PathBuf {
        self.dir.join(DB_DIR)
    }
}

/// SHA-256 and size of the file at `path`.
pub(crate) fn hash_file(path: &Path) -> Result<(String, u64), BackupError> {
    let mut file = std::fs::File::open(path).map_err(BackupError::io("cannot open", path))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 16];
    let mut size = 0u64;
    loop {
        let n = file
            .read(&mut buffer)
            .map_err(BackupError::io("cannot read", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        size += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), size))
}

/// Every regular file under `root/sub`, as `/`-separated paths relative to
/// `root`, sorted. Anything else (a symbolic link, a device) is refused:
/// a backup is plain files.
pub(crate) fn list_files(root: &Path, sub: &str) -> Result<Vec<String>, BackupError> {
    let mut out = Vec::new();
    let mut stack = vec![sub.to_owned()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let entries = std::fs::read_dir(&dir).map_err(BackupError::io("cannot list", &dir))?;
        for entry in entries {
            let entry = entry.map_err(BackupError::io("cannot list", &dir))?;
            let name = entry.file_name();
            let name = name.to_str().ok_or_else(|| BackupError::FileMismatch {
                file: format!("{rel}/{}", name.to_string_lossy()),
                reason: "its name is not UTF-8",
            })?;
            let child = format!("{rel}/{name}");
            let kind = entry
                .file_type()
                .map_err(BackupError::io("cannot stat", entry.path()))?;
            if kind.is_dir() {
                stack.push(child);
            } else if kind.is_file() {
                out.push(child);
            } else {
                return Err(BackupError::FileMismatch {
                    file: child,
                    reason: "not a regular file",
                });
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The manifest entries of every file under `root/db`.
pub(crate) fn describe_files(root: &Path) -> Result<Vec<FileEntry>, BackupError> {
    list_files(root, DB_DIR)?
        .into_iter()
        .map(|path| {
            let (sha256, size) = hash_file(&root.join(&path))?;
            Ok(FileEntry { path, size, sha256 })
        })
        .collect()
}

/// Reads `dir/manifest.json` and checks every file under `dir/db` against
/// it: same set of files, same sizes, same SHA-256.
///
/// # Errors
/// [`BackupError::ManifestInvalid`] for a missing, malformed or newer
/// manifest; [`BackupError::FileMismatch`] naming the first file that is
/// changed, missing or not listed; [`BackupError::Io`].
pub fn verify(dir: &Path) -> Result<VerifiedBackup, BackupError> {
    let path = dir.join(MANIFEST_FILE);
    let invalid = |reason: String| BackupError::ManifestInvalid {
        path: path.clone(),
        reason,
    };
    let bytes = std::fs::read(&path).map_err(|e| invalid(e.to_string()))?;
    let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
    if manifest.format != MANIFEST_FORMAT {
        return Err(invalid(format!(
            "format {} (this build reads {MANIFEST_FORMAT})",
            manifest.format
        )));
    }
    let present = list_files(dir, DB_DIR)?;
    for listed in &manifest.files {
        if !present.contains(&listed.path) {
            return Err(BackupError::FileMismatch {
                file: listed.path.clone(),
                reason: "missing",
            });
        }
    }
    for file in &present {
        let Some(listed) = manifest.files.iter().find(|f| &f.path == file) else {
            return Err(BackupError::FileMismatch {
                file: file.clone(),
                reason: "not listed in the manifest",
            });
        };
        let (sha256, size) = hash_file(&dir.join(file))?;
        if size != listed.size {
            return Err(BackupError::FileMismatch {
                file: file.clone(),
                reason: "its size differs",
            });
        }
        if sha256 != listed.sha256 {
            return Err(BackupError::FileMismatch {
                file: file.clone(),
                reason: "its SHA-256 differs",
            });
        }
    }
    Ok(VerifiedBackup {
        dir: dir.to_owned(),
        manifest,
        id: hex::encode(Sha256::digest(&bytes)),
    })
}
