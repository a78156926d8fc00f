//! Taking a backup: a RocksDB checkpoint of the live database (catalogue and
//! audit log as of one instant; the server keeps serving) and its manifest.
//! Used by `Admin.CreateBackup` (running server) and by the offline
//! `kms backup create --data-dir` (stopped server).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use kms_storage::{Storage, StorageOptions};
use sha2::{Digest, Sha256};

use super::BackupError;
use super::manifest::{DB_DIR, MANIFEST_FILE, MANIFEST_FORMAT, Manifest, describe_files};

/// What [`create_backup`] wrote.
#[derive(Debug, Clone)]
pub struct CreatedBackup {
    /// The backup directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// SHA-256 of `manifest.json`, lowercase hex: the backup's id.
    pub id: String,
}

impl CreatedBackup {
    /// Total size of the backup's files (manifest excluded), bytes.
    pub fn bytes(&self) -> u64 {
        self.manifest.files.iter().map(|f| f.size).sum()
    }
}

/// The node id a single node writes in its manifests: the host name
/// (`/proc/sys/kernel/hostname`), or `"localhost"` if it cannot be read.
pub fn node_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// Writes a backup of `storage` (open, possibly serving) to `out`: the
/// directory is created (its parent must exist) or must be empty. On error
/// whatever was written under `out` is removed again.
///
/// `shared_catalogue` is a cluster node's catalogue (in etcd, not in
/// `storage`, which then holds only the node's audit log): the manifest's
/// root epochs are read from it, at the time of the copy. `None` on a
/// single node: they are read from the copy itself.
///
/// # Errors
/// [`BackupError::TargetNotEmpty`]; [`BackupError::Io`] if `out` cannot be
/// created, read back or written; [`BackupError::Storage`] if the checkpoint
/// fails or the copy cannot be opened and read.
pub fn create_backup(
    storage: &Storage,
    out: &Path,
    node_id: &str,
    shared_catalogue: Option<&kms_storage::Catalogue>,
) -> Result<CreatedBackup, BackupError> {
    let created_dir = prepare_target(out)?;
    let result = write_backup(storage, out, node_id, shared_catalogue);
    if result.is_err() {
        // Leave nothing that looks like a backup.
        let _ = std::fs::remove_dir_all(out.join(DB_DIR));
        let _ = std::fs::remove_file(out.join(MANIFEST_FILE));
        if created_dir {
            let _ = std::fs::remove_dir(out);
        }
    }
    result
}

/// Creates `out` unless it is an existing empty directory; returns whether
/// it created it.
pub(crate) fn prepare_target(out: &Path) -> Result<bool, BackupError> {
    match std::fs::read_dir(out) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(BackupError::TargetNotEmpty {
                    path: out.to_owned(),
                });
            }
            Ok(false)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir(out).map_err(BackupError::io("cannot create", out))?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            Err(BackupError::TargetNotEmpty {
                path: out.to_owned(),
            })
        }
        Err(e) => Err(BackupError::io("cannot read", out)(e)),
    }
}

fn write_backup(
    storage: &Storage,
    out: &Path,
    node_id: &str,
    shared_catalogue: Option<&kms_storage::Catalogue>,
) -> Result<CreatedBackup, BackupError> {
    let db_dir = out.join(DB_DIR);
    let created_unix_ms = crate::service::now_ms();
    storage
        .create_checkpoint(&db_dir)
        .map_err(BackupError::storage("cannot write the database checkpoint"))?;
    // Read what the manifest says from the copy itself (not the live
    // database, which has moved on), then close it before hashing: opening
    // a database writes files of its own.
    let (audit_head_seq, audit_head_hash, root_epochs) = {
        let copy = Storage::open(
            &db_dir,
            &StorageOptions {
                create_if_missing: false,
                ..StorageOptions::default()
            },
        )
        .map_err(BackupError::storage("cannot open the checkpoint"))?;
        let (seq, hash) = audit_head(&copy)?;
        let epochs = referenced_epochs(shared_catalogue.unwrap_or(copy.catalogue()))?;
        (seq, hash, epochs)
    };
    sync_dir_tree(&db_dir)?;
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        created_unix_ms,
        node_id: node_id.to_owned(),
        audit_head_seq,
        audit_head_hash,
        root_epochs,
        files: describe_files(out)?,
    };
    let mut bytes = serde_json::to_vec_pretty(&manifest).map_err(|e| BackupError::Io {
        what: "cannot encode the manifest for",
        path: out.join(MANIFEST_FILE),
        source: std::io::Error::other(e),
    })?;
    bytes.push(b'\n');
    write_synced(&out.join(MANIFEST_FILE), &bytes)?;
    sync_dir(out)?;
    Ok(CreatedBackup {
        dir: out.to_owned(),
        manifest,
        id: hex::encode(Sha256::digest(&bytes)),
    })
}

/// The last audit record's sequence number and hash (hex) of `storage`:
/// (0, "") for an empty log.
pub fn audit_head(storage: &Storage) -> Result<(u64, String), BackupError> {
    let reader = storage.audit_reader();
    let seq = reader
        .last_seq()
        .map_err(BackupError::storage("cannot read the audit head"))?;
    if seq == 0 {
        return Ok((0, String::new()));
    }
    let record = reader
        .get(seq)
        .map_err(BackupError::storage("cannot read the audit head"))?;
    Ok((seq, record.map(|r| hex::encode(r.hash)).unwrap_or_default()))
}

/// Root epochs `catalogue` references: versions not destroyed, and the
/// wrapped service keys.
///
/// # Errors
/// [`BackupError::Storage`] if the catalogue cannot be read.
pub fn referenced_epochs(catalogue: &kms_storage::Catalogue) -> Result<Vec<u32>, BackupError> {
    let what = "cannot read the root epochs the catalogue references";
    let mut epochs: BTreeSet<u32> = catalogue
        .wrapped_versions_per_epoch()
        .map_err(BackupError::storage(what))?
        .into_iter()
        .filter(|(_, refs)| refs.live_versions > 0)
        .map(|(epoch, _)| epoch)
        .collect();
    for key in [
        catalogue
            .integrity_key()
            .map_err(BackupError::storage(what))?,
        catalogue
            .checkpoint_key()
            .map_err(BackupError::storage(what))?,
    ]
    .into_iter()
    .flatten()
    {
        epochs.insert(key.root_epoch);
    }
    Ok(epochs.into_iter().collect())
}

/// Writes `bytes` to a new file at `path` and syncs it.
pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), BackupError> {
    use std::io::Write as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(BackupError::io("cannot create", path))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(BackupError::io("cannot write", path))
}

/// fsync of a directory, so that the names in it survive a crash.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), BackupError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(BackupError::io("cannot sync", dir))
}

/// fsync of every file under `dir` and of `dir` itself.
pub(crate) fn sync_dir_tree(dir: &Path) -> Result<(), BackupError> {
    for entry in std::fs::read_dir(dir).map_err(BackupError::io("cannot list", dir))? {
        let entry = entry.map_err(BackupError::io("cannot list", dir))?;
        let path = entry.path();
        if path.is_dir() {
            sync_dir_tree(&path)?;
        } else {
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(BackupError::io("cannot sync", &path))?;
        }
    }
    sync_dir(dir)
}
