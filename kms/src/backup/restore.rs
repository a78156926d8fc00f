//! `kms backup restore` (server stopped): verify, check the roots, install,
//! replay, and leave the marker the next start acts on (design note
//! `hierarchy-and-cluster.md` §1.6).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use kms_storage::{
    Catalogue, KeyId, KeyRecord, KeyState, Storage, StorageOptions, VersionRecord, VersionState,
};
use serde::{Deserialize, Serialize};

use super::BackupError;
use super::create::{sync_dir, sync_dir_tree};
use super::ledger::{self, LedgerEntry};
use super::manifest::{self, DB_DIR, Manifest};

/// What a restore needs.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// The backup directory (`manifest.json`, `db/`).
    pub from: PathBuf,
    /// The server's data directory (`[storage] data_dir`).
    pub data_dir: PathBuf,
    /// Keep a non-empty data directory aside (renamed to
    /// `<data_dir>.replaced-<unix ms>`) instead of refusing.
    pub force_replace: bool,
    /// An audit export (`kms audit export`) to use as ledger too.
    pub audit_since: Option<PathBuf>,
    /// The HSM the restored catalogue will be served with.
    pub hsm: kms_hsm::HsmConfig,
}

/// What a restore did.
#[derive(Debug, Clone)]
pub struct RestoreReport {
    /// The backup's id (SHA-256 of its manifest, hex).
    pub backup_id: String,
    /// Its manifest.
    pub manifest: Manifest,
    /// Where the replaced data directory was kept, if there was one.
    pub replaced_dir: Option<PathBuf>,
    /// Ledger records read (after the backup's head when placeable).
    pub ledger_records: usize,
    /// Keys whose destruction, recorded after the backup, was replayed.
    pub replayed_destructions: Vec<String>,
    /// Keys created after the backup, put back from the replaced catalogue.
    pub keys_put_back: Vec<String>,
    /// Versions created after the backup, put back from the replaced
    /// catalogue: (key id, version).
    pub versions_put_back: Vec<(String, u32)>,
}

/// The catalogue's pending-restore marker (meta record `restore_pending`):
/// while present, the next start checks the roots, records the restore in
/// the audit log and rotates every key before it serves
/// (`KmsService::finish_restore`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreMarker {
    /// The backup's id (SHA-256 of its manifest, hex).
    pub backup_id: String,
    /// The backup directory restored from.
    pub backup_dir: String,
    /// When the backup was taken, unix milliseconds.
    pub backup_created_unix_ms: u64,
    /// The backup's audit head sequence number.
    pub audit_head_seq: u64,
    /// When the restore ran, unix milliseconds.
    pub restored_unix_ms: u64,
    /// Keys whose destruction was replayed.
    pub replayed_destructions: Vec<String>,
}

/// The short form of a backup id the audit records of its restore carry.
pub fn short_id(backup_id: &str) -> &str {
    backup_id.get(..16).unwrap_or(backup_id)
}

/// Restores a backup into the data directory of a stopped server (see the
/// module docs and `kms backup restore --help` for the steps).
///
/// # Errors
/// [`BackupError::ManifestInvalid`]/[`BackupError::FileMismatch`] for a
/// damaged or altered backup and [`BackupError::RootEpochMissing`] for a
/// root the HSM lacks (both before anything is touched);
/// [`BackupError::DataDirNotEmpty`]; [`BackupError::Hsm`];
/// [`BackupError::LedgerInvalid`]; [`BackupError::Io`];
/// [`BackupError::Storage`] (e.g. the data directory being replaced is
/// locked by a running server).
pub fn restore_backup(options: &RestoreOptions) -> Result<RestoreReport, BackupError> {
    let backup = manifest::verify(&options.from)?;
    let head_seq = backup.manifest.audit_head_seq;
    let head_hash = backup.manifest.audit_head_hash.clone();
    check_roots(&options.hsm, &backup.manifest.root_epochs)?;

    let mut entries: Vec<LedgerEntry> = Vec::new();
    if let Some(export) = &options.audit_since {
        entries.extend(ledger::from_export(export, head_seq, &head_hash)?);
    }
    let mut replaced = None;
    let mut old = OldCatalogue::default();
    if !is_empty_or_missing(&options.data_dir)? {
        if !options.force_replace {
            return Err(BackupError::DataDirNotEmpty {
                path: options.data_dir.clone(),
            });
        }
        {
            let storage = Storage::open(
                &options.data_dir,
                &StorageOptions {
                    create_if_missing: false,
                    ..StorageOptions::default()
                },
            )
            .map_err(BackupError::storage(
                "cannot open the data directory being replaced (is the server stopped?); \
                 to restore without it, move it away and pass its audit export as --audit-since",
            ))?;
            entries.extend(ledger::from_storage(&storage, head_seq, &head_hash)?);
            old = OldCatalogue::read(storage.catalogue())?;
        }
        let aside = aside_path(&options.data_dir);
        std::fs::rename(&options.data_dir, &aside)
            .map_err(BackupError::io("cannot move aside", &options.data_dir))?;
        replaced = Some(aside);
    }

    install(&backup.db_dir(), &options.data_dir, &backup.manifest)?;
    let storage = Storage::open(
        &options.data_dir,
        &StorageOptions {
            create_if_missing: false,
            ..StorageOptions::default()
        },
    )
    .map_err(BackupError::storage("cannot open the restored database"))?;
    let catalogue = storage.catalogue();
    let now = crate::service::now_ms();
    let applied = apply_ledger(catalogue, &entries, &old, now)?;

    // Rules 2 and 3 need the HSM and the audit log: the next start.
    catalogue
        .set_restore_marker(&RestoreMarker {
            backup_id: backup.id.clone(),
            backup_dir: backup.dir.display().to_string(),
            backup_created_unix_ms: backup.manifest.created_unix_ms,
            audit_head_seq: head_seq,
            restored_unix_ms: now,
            replayed_destructions: applied.replayed_destructions.clone(),
        })
        .map_err(BackupError::storage("cannot update the restored catalogue"))?;
    Ok(RestoreReport {
        backup_id: backup.id,
        manifest: backup.manifest,
        replaced_dir: replaced,
        ledger_records: entries.len(),
        replayed_destructions: applied.replayed_destructions,
        keys_put_back: applied.keys_put_back,
        versions_put_back: applied.versions_put_back,
    })
}

/// What [`apply_ledger`] changed.
#[derive(Debug, Clone, Default)]
pub(crate) struct Applied {
    /// Keys whose destruction was replayed.
    pub replayed_destructions: Vec<String>,
    /// Keys put back from the replaced catalogue.
    pub keys_put_back: Vec<String>,
    /// Versions put back from the replaced catalogue: (key id, version).
    pub versions_put_back: Vec<(String, u32)>,
}

/// The catalogue part of a restore, on any engine (the restored RocksDB
/// database of a single node, or the restored etcd keyspace of a cluster):
/// replays every destruction the ledger `entries` records (rule 1, before
/// anything else), puts back keys and versions created after the backup
/// from `old` (the catalogue being replaced; empty when it is lost) unless
/// the ledger destroyed them, and raises every key's `latest_version` past
/// every version number the ledger or `old` names, so that none is
/// allocated twice.
///
/// # Errors
/// [`BackupError::Storage`] if the catalogue cannot be read or written.
pub(crate) fn apply_ledger(
    catalogue: &Catalogue,
    entries: &[LedgerEntry],
    old: &OldCatalogue,
    now: u64,
) -> Result<Applied, BackupError> {
    let what = "cannot update the restored catalogue";

    // Rule 1: destructions recorded after the backup, before anything else
    // can read the restored catalogue.
    let mut replayed = Vec::new();
    let destroyed: BTreeSet<&str> = entries
        .iter()
        .filter(|e| e.is_destruction())
        .filter_map(|e| e.key_id.as_deref())
        .collect();
    for key in destroyed {
        let Ok(id) = KeyId::parse(key) else {
            continue;
        };
        if catalogue
            .replay_key_destruction(&id, now)
            .map_err(BackupError::storage(what))?
        {
            replayed.push(id.to_string());
        }
    }

    // What was created after the backup: put back from the replaced
    // catalogue, and never reuse a version number the ledger names.
    let mut reserved: BTreeMap<String, u32> = BTreeMap::new();
    for entry in entries {
        if let (Some(key), Some(version)) = (&entry.key_id, entry.key_version) {
            let slot = reserved.entry(key.clone()).or_default();
            *slot = (*slot).max(version);
        }
    }
    let mut keys_put_back = Vec::new();
    let mut versions_put_back = Vec::new();
    for (id, (record, versions)) in &old.keys {
        if destroyed_in(entries, id) {
            continue;
        }
        match catalogue.get_key(id).map_err(BackupError::storage(what))? {
            None => {
                if matches!(record.state, KeyState::Deleted { .. }) {
                    continue;
                }
                let live: Vec<VersionRecord> = versions
                    .iter()
                    .filter(|v| !matches!(v.state, VersionState::Destroyed { .. }))
                    .cloned()
                    .collect();
                if catalogue
                    .restore_key(record, &live)
                    .map_err(BackupError::storage(what))?
                {
                    keys_put_back.push(id.to_string());
                }
            }
            Some(restored) => {
                let newer: Vec<VersionRecord> = versions
                    .iter()
                    .filter(|v| v.version > restored.latest_version)
                    .filter(|v| !matches!(v.state, VersionState::Destroyed { .. }))
                    .cloned()
                    .collect();
                let reserve = versions
                    .iter()
                    .map(|v| v.version)
                    .max()
                    .unwrap_or(0)
                    .max(record.latest_version);
                let slot = reserved.entry(id.to_string()).or_default();
                *slot = (*slot).max(reserve);
                let put = catalogue
                    .restore_versions(id, &newer, *slot, now)
                    .map_err(BackupError::storage(what))?;
                versions_put_back.extend(put.into_iter().map(|v| (id.to_string(), v)));
                reserved.remove(id.as_str());
            }
        }
    }
    for (key, through) in reserved {
        let Ok(id) = KeyId::parse(&key) else {
            continue;
        };
        match catalogue.restore_versions(&id, &[], through, now) {
            Ok(_) | Err(kms_storage::StorageError::KeyNotFound { .. }) => {}
            Err(e) => return Err(BackupError::storage(what)(e)),
        }
    }

    Ok(Applied {
        replayed_destructions: replayed,
        keys_put_back,
        versions_put_back,
    })
}

/// Whether the ledger records the destruction of key `id`.
fn destroyed_in(entries: &[LedgerEntry], id: &KeyId) -> bool {
    entries
        .iter()
        .any(|e| e.is_destruction() && e.key_id.as_deref() == Some(id.as_str()))
}

/// Every key and version record of the catalogue being replaced.
#[derive(Default)]
pub(crate) struct OldCatalogue {
    keys: BTreeMap<KeyId, (KeyRecord, Vec<VersionRecord>)>,
}

impl OldCatalogue {
    pub(crate) fn read(catalogue: &Catalogue) -> Result<OldCatalogue, BackupError> {
        let what = "cannot read the catalogue of the data directory being replaced";
        let mut keys = BTreeMap::new();
        let mut token: Option<String> = None;
        loop {
            let page = catalogue
                .list_keys(token.as_deref(), kms_storage::MAX_PAGE_SIZE)
                .map_err(BackupError::storage(what))?;
            for key in page.items {
                let versions = catalogue
                    .list_versions(&key.id)
                    .map_err(BackupError::storage(what))?;
                keys.insert(key.id.clone(), (key, versions));
            }
            match page.next_page_token {
                Some(next) => token = Some(next),
                None => break,
            }
        }
        Ok(OldCatalogue { keys })
    }
}

/// Rule 3: every root epoch the backup references must be in the HSM.
pub(crate) fn check_roots(hsm: &kms_hsm::HsmConfig, epochs: &[u32]) -> Result<(), BackupError> {
    if epochs.is_empty() {
        return Ok(());
    }
    let hsm = kms_hsm::Hsm::open(hsm.clone()).map_err(BackupError::Hsm)?;
    let present = hsm
        .key_holder()
        .and_then(|holder| holder.root_epochs())
        .map_err(BackupError::Hsm)?;
    match epochs.iter().find(|e| !present.contains(e)) {
        Some(&epoch) => Err(BackupError::RootEpochMissing { epoch }),
        None => Ok(()),
    }
}

fn is_empty_or_missing(dir: &Path) -> Result<bool, BackupError> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(BackupError::io("cannot read", dir)(e)),
    }
}

/// `<data_dir>.replaced-<unix ms>`, next to the data directory.
fn aside_path(data_dir: &Path) -> PathBuf {
    let mut name = data_dir
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "data".into());
    name.push(format!(".replaced-{}", crate::service::now_ms()));
    data_dir.with_file_name(name)
}

/// Copies the database files of the backup into `data_dir` (created),
/// checks each copy against the manifest again (the backup could have
/// changed since it was verified) and syncs them.
fn install(db_copy: &Path, data_dir: &Path, manifest: &Manifest) -> Result<(), BackupError> {
    std::fs::create_dir_all(data_dir).map_err(BackupError::io("cannot create", data_dir))?;
    let root = db_copy.parent().unwrap_or(db_copy);
    for rel in manifest::list_files(root, DB_DIR)? {
        let inner = rel
            .strip_prefix(DB_DIR)
            .map(|r| r.trim_start_matches('/'))
            .unwrap_or(&rel);
        let target = data_dir.join(inner);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(BackupError::io("cannot create", parent))?;
        }
        std::fs::copy(root.join(&rel), &target)
            .map_err(BackupError::io("cannot copy to", &target))?;
        let (sha256, _) = manifest::hash_file(&target)?;
        if !manifest
            .files
            .iter()
            .any(|f| f.path == rel && f.sha256 == sha256)
        {
            return Err(BackupError::FileMismatch {
                file: rel,
                reason: "it changed during the restore",
            });
        }
    }
    sync_dir_tree(data_dir)?;
    if let Some(parent) = data_dir.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}
