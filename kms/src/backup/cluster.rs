//! Cluster backups (issue 15 item 4; design note `hierarchy-and-cluster.md`
//! §1.6): the catalogue is in etcd, each node's audit log in its own
//! RocksDB. A cluster backup directory holds
//!
//! - `nodes/<node id>/`: each node's own backup (`Admin.CreateBackup`: its
//!   audit log as of one instant, with its `manifest.json`), taken first;
//! - `etcd/snapshot.db`: an etcd snapshot (`kms_storage_etcd::save_snapshot`),
//!   taken after every node's copy, so that every destruction the snapshot
//!   lacks is recorded after some node's backed-up audit head (the ledger
//!   of the restore starts there);
//! - `cluster-manifest.json` ([`ClusterManifest`]): the etcd revision, the
//!   nodes and their audit heads, the root epochs referenced, and the
//!   SHA-256 of every other file.
//!
//! Restoring is two steps: the etcd part with etcd's own tool
//! (`etcdctl snapshot restore` into fresh member data directories:
//! `scripts/etcd-snapshot-restore.sh`), then [`restore_cluster`] on the
//! restored keyspace with every node stopped.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use kms_storage::{Catalogue, Storage, StorageOptions};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::BackupError;
use super::create::{prepare_target, sync_dir, sync_dir_tree, write_synced};
use super::ledger::{self, LedgerEntry};
use super::manifest::{self, FileEntry};
use super::restore::{OldCatalogue, apply_ledger, check_roots};
use super::{RestoreMarker, create::referenced_epochs};

/// The cluster manifest's file name, in the backup directory.
pub const CLUSTER_MANIFEST_FILE: &str = "cluster-manifest.json";

/// The cluster manifest format this build writes and reads.
pub const CLUSTER_MANIFEST_FORMAT: u32 = 1;

/// The etcd snapshot's path in the backup directory.
pub const ETCD_SNAPSHOT: &str = "etcd/snapshot.db";

const ETCD_DIR: &str = "etcd";
const NODES_DIR: &str = "nodes";

/// What a cluster backup holds (`cluster-manifest.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterManifest {
    /// [`CLUSTER_MANIFEST_FORMAT`].
    pub format: u32,
    /// When the backup started (before the first node's copy), unix ms.
    pub created_unix_ms: u64,
    /// When the etcd snapshot was taken (after every node's copy), unix ms.
    pub snapshot_unix_ms: u64,
    /// etcd's revision just before the snapshot (`SnapshotInfo::revision`;
    /// approximate, for operators).
    pub etcd_revision: i64,
    /// The catalogue's key prefix in etcd (`[cluster] etcd_prefix`).
    pub etcd_prefix: String,
    /// The etcd snapshot, relative to the backup directory ([`ETCD_SNAPSHOT`]).
    pub etcd_snapshot: String,
    /// Each node's part, in the order they were taken.
    pub nodes: Vec<NodeEntry>,
    /// Root epochs the catalogue references (the union of what each node
    /// read from etcd at its copy), ascending.
    pub root_epochs: Vec<u32>,
    /// Every file of the backup but this manifest, by path relative to the
    /// backup directory (`/`-separated), sorted.
    pub files: Vec<FileEntry>,
}

/// One node's part of a cluster backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeEntry {
    /// The node's id (`[cluster] node_id`).
    pub node_id: String,
    /// The gRPC endpoint it was asked at.
    pub endpoint: String,
    /// Its backup directory, relative to the cluster backup (`nodes/<id>`).
    pub dir: String,
    /// That backup's id (SHA-256 of its `manifest.json`, hex).
    pub backup_id: String,
    /// The node's audit head at its copy: sequence number (0: empty log).
    pub audit_head_seq: u64,
    /// That record's chain hash, hex (empty when none).
    pub audit_head_hash: String,
}

/// A cluster backup whose every file matched its manifest.
#[derive(Debug, Clone)]
pub struct VerifiedClusterBackup {
    /// The backup directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: ClusterManifest,
    /// SHA-256 of `cluster-manifest.json`, lowercase hex: the backup's id.
    pub id: String,
}

/// What [`create_cluster_backup`] wrote.
#[derive(Debug, Clone)]
pub struct CreatedClusterBackup {
    /// The backup directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: ClusterManifest,
    /// SHA-256 of `cluster-manifest.json`, lowercase hex: the backup's id.
    pub id: String,
}

/// Writes a cluster backup to `out` (created, or an existing empty
/// directory) while the cluster serves: asks every node in `endpoints` for
/// its backup into `out/nodes/<i>` through `ask(endpoint, dir)` (the caller
/// sends `Admin.CreateBackup`), moves each to `out/nodes/<node id>`, then
/// takes the etcd snapshot with `etcd` and writes the manifest.
///
/// `out` must be on a file system this process and every node share, at
/// the same absolute path, inside every node's `[backup] dir`: the nodes
/// write there and this process reads what they wrote. On error whatever
/// was written under `out` is removed again.
///
/// # Errors
/// [`BackupError::TargetNotEmpty`]; [`BackupError::NodeBackup`] naming the
/// node that refused or whose copy is not visible here;
/// [`BackupError::DuplicateNode`]; [`BackupError::Storage`] if the etcd
/// snapshot fails; [`BackupError::Io`]; a node's copy failing its own
/// manifest ([`BackupError::FileMismatch`]).
pub fn create_cluster_backup(
    out: &Path,
    etcd: &kms_storage_etcd::EtcdConfig,
    endpoints: &[String],
    ask: impl FnMut(&str, &Path) -> Result<(), String>,
) -> Result<CreatedClusterBackup, BackupError> {
    let created_dir = prepare_target(out)?;
    let result = write_cluster_backup(out, etcd, endpoints, ask);
    if result.is_err() {
        for sub in [NODES_DIR, ETCD_DIR] {
            let _ = std::fs::remove_dir_all(out.join(sub));
        }
        let _ = std::fs::remove_file(out.join(CLUSTER_MANIFEST_FILE));
        if created_dir {
            let _ = std::fs::remove_dir(out);
        }
    }
    result
}

fn write_cluster_backup(
    out: &Path,
    etcd: &kms_storage_etcd::EtcdConfig,
    endpoints: &[String],
    mut ask: impl FnMut(&str, &Path) -> Result<(), String>,
) -> Result<CreatedClusterBackup, BackupError> {
    let created_unix_ms = crate::service::now_ms();
    let nodes_dir = out.join(NODES_DIR);
    std::fs::create_dir(&nodes_dir).map_err(BackupError::io("cannot create", &nodes_dir))?;
    let mut nodes: Vec<NodeEntry> = Vec::new();
    let mut epochs: BTreeSet<u32> = BTreeSet::new();
    // Every node first, the snapshot last: see the module docs.
    for (i, endpoint) in endpoints.iter().enumerate() {
        let staging = nodes_dir.join(format!("{}", i + 1));
        ask(endpoint, &staging).map_err(|reason| BackupError::NodeBackup {
            endpoint: endpoint.clone(),
            reason,
        })?;
        let copy = manifest::verify(&staging).map_err(|e| BackupError::NodeBackup {
            endpoint: endpoint.clone(),
            reason: format!(
                "its backup is not readable here at {} ({e}); the cluster backup directory \
                 must be on a file system shared by every node and this command",
                staging.display()
            ),
        })?;
        let node_id = copy.manifest.node_id.clone();
        if nodes.iter().any(|n| n.node_id == node_id) || !is_plain_name(&node_id) {
            return Err(BackupError::DuplicateNode { node: node_id });
        }
        let dir = format!("{NODES_DIR}/{node_id}");
        std::fs::rename(&staging, out.join(&dir))
            .map_err(BackupError::io("cannot rename", &staging))?;
        epochs.extend(copy.manifest.root_epochs.iter().copied());
        nodes.push(NodeEntry {
            node_id,
            endpoint: endpoint.clone(),
            dir,
            backup_id: copy.id,
            audit_head_seq: copy.manifest.audit_head_seq,
            audit_head_hash: copy.manifest.audit_head_hash,
        });
    }
    let etcd_dir = out.join(ETCD_DIR);
    std::fs::create_dir(&etcd_dir).map_err(BackupError::io("cannot create", &etcd_dir))?;
    let snapshot_unix_ms = crate::service::now_ms();
    let snapshot = kms_storage_etcd::save_snapshot(etcd, &out.join(ETCD_SNAPSHOT))
        .map_err(BackupError::storage("cannot take the etcd snapshot"))?;
    sync_dir_tree(out)?;
    let manifest = ClusterManifest {
        format: CLUSTER_MANIFEST_FORMAT,
        created_unix_ms,
        snapshot_unix_ms,
        etcd_revision: snapshot.revision,
        etcd_prefix: etcd.prefix.clone(),
        etcd_snapshot: ETCD_SNAPSHOT.to_owned(),
        nodes,
        root_epochs: epochs.into_iter().collect(),
        files: describe(out)?,
    };
    let mut bytes = serde_json::to_vec_pretty(&manifest).map_err(|e| BackupError::Io {
        what: "cannot encode the manifest for",
        path: out.join(CLUSTER_MANIFEST_FILE),
        source: std::io::Error::other(e),
    })?;
    bytes.push(b'\n');
    write_synced(&out.join(CLUSTER_MANIFEST_FILE), &bytes)?;
    sync_dir(out)?;
    Ok(CreatedClusterBackup {
        dir: out.to_owned(),
        manifest,
        id: hex::encode(Sha256::digest(&bytes)),
    })
}

/// A node id usable as a directory name (what `[cluster] node_id` allows).
fn is_plain_name(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Every file under `root/etcd` and `root/nodes`, described.
fn describe(root: &Path) -> Result<Vec<FileEntry>, BackupError> {
    let mut files = Vec::new();
    for path in all_files(root)? {
        let (sha256, size) = manifest::hash_file(&root.join(&path))?;
        files.push(FileEntry { path, size, sha256 });
    }
    Ok(files)
}

fn all_files(root: &Path) -> Result<Vec<String>, BackupError> {
    let mut files = Vec::new();
    for sub in [ETCD_DIR, NODES_DIR] {
        if root.join(sub).is_dir() {
            files.extend(manifest::list_files(root, sub)?);
        }
    }
    files.sort();
    Ok(files)
}

/// Reads `dir/cluster-manifest.json` and checks every file under
/// `dir/etcd` and `dir/nodes` against it (same set, sizes, SHA-256), and
/// each node's part against its own manifest.
///
/// # Errors
/// [`BackupError::ManifestInvalid`] for a missing, malformed or newer
/// manifest; [`BackupError::FileMismatch`] naming the first file changed,
/// missing or not listed; [`BackupError::Io`].
pub fn verify_cluster(dir: &Path) -> Result<VerifiedClusterBackup, BackupError> {
    let path = dir.join(CLUSTER_MANIFEST_FILE);
    let invalid = |reason: String| BackupError::ManifestInvalid {
        path: path.clone(),
        reason,
    };
    let bytes = std::fs::read(&path).map_err(|e| invalid(e.to_string()))?;
    let manifest: ClusterManifest =
        serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
    if manifest.format != CLUSTER_MANIFEST_FORMAT {
        return Err(invalid(format!(
            "format {} (this build reads {CLUSTER_MANIFEST_FORMAT})",
            manifest.format
        )));
    }
    let present = all_files(dir)?;
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
        let (sha256, size) = manifest::hash_file(&dir.join(file))?;
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
    if !present.contains(&manifest.etcd_snapshot) {
        return Err(BackupError::FileMismatch {
            file: manifest.etcd_snapshot.clone(),
            reason: "missing",
        });
    }
    for node in &manifest.nodes {
        let copy = manifest::verify(&dir.join(&node.dir))?;
        if copy.id != node.backup_id {
            return Err(BackupError::FileMismatch {
                file: format!("{}/{}", node.dir, manifest::MANIFEST_FILE),
                reason: "its SHA-256 differs from the cluster manifest's backup id",
            });
        }
    }
    Ok(VerifiedClusterBackup {
        dir: dir.to_owned(),
        manifest,
        id: hex::encode(Sha256::digest(&bytes)),
    })
}

/// Where a node's ledger (its audit records after its backed-up head)
/// comes from.
#[derive(Debug, Clone)]
pub enum NodeLedger {
    /// The node's current data directory (`[storage] data_dir`; the node
    /// stopped): its audit log is local and survives an etcd restore.
    DataDir(PathBuf),
    /// An audit export of the node (`kms audit export`), when its data
    /// directory is lost.
    Export(PathBuf),
}

/// What a cluster restore needs.
#[derive(Debug)]
pub struct ClusterRestoreOptions<'a> {
    /// The cluster backup directory.
    pub from: PathBuf,
    /// The restored catalogue: etcd members restored from the backup's
    /// snapshot (`etcdctl snapshot restore`), running, no kms node yet.
    pub catalogue: &'a Catalogue,
    /// The catalogue being replaced (the old etcd cluster, still readable),
    /// to put back keys and versions created after the backup; `None` when
    /// it is lost (they are then lost with it; their numbers still are
    /// never reused).
    pub replaced: Option<&'a Catalogue>,
    /// Every node's ledger, by node id: every node of the backup must have
    /// one; nodes added since may.
    pub ledgers: BTreeMap<String, NodeLedger>,
    /// The HSM (this host's node's) the roots are checked against.
    pub hsm: kms_hsm::HsmConfig,
}

/// What a cluster restore did.
#[derive(Debug, Clone)]
pub struct ClusterRestoreReport {
    /// The backup's id (SHA-256 of `cluster-manifest.json`, hex).
    pub backup_id: String,
    /// Its manifest.
    pub manifest: ClusterManifest,
    /// Ledger records read, every node together.
    pub ledger_records: usize,
    /// Keys whose destruction, recorded after the backup, was replayed.
    pub replayed_destructions: Vec<String>,
    /// Keys put back from the replaced catalogue.
    pub keys_put_back: Vec<String>,
    /// Versions put back from the replaced catalogue: (key id, version).
    pub versions_put_back: Vec<(String, u32)>,
}

/// Applies the §1.6 rules to a catalogue restored from a cluster backup's
/// etcd snapshot, every kms node stopped: verifies the backup, checks that
/// the HSM holds every root epoch the backup and the restored catalogue
/// reference, reads every node's ledger, then (nothing written before
/// this point) replays the destructions recorded after the backup, puts
/// back what was created after it (from `replaced`), and leaves the marker
/// on which the first node to start that leads the `restore` job rotates
/// every enabled key once, the other nodes waiting for it before serving.
///
/// # Errors
/// [`BackupError::ManifestInvalid`]/[`BackupError::FileMismatch`] for a
/// damaged or altered backup; [`BackupError::RootEpochMissing`];
/// [`BackupError::NodeLedgerMissing`] for a node of the backup without a
/// ledger; [`BackupError::Storage`] if a node's data directory cannot be
/// opened (a node still running) or a catalogue fails; [`BackupError::Hsm`];
/// [`BackupError::LedgerInvalid`]; [`BackupError::Io`].
pub fn restore_cluster(
    options: &ClusterRestoreOptions<'_>,
) -> Result<ClusterRestoreReport, BackupError> {
    let backup = verify_cluster(&options.from)?;
    let mut epochs: BTreeSet<u32> = backup.manifest.root_epochs.iter().copied().collect();
    epochs.extend(referenced_epochs(options.catalogue)?);
    check_roots(&options.hsm, &epochs.into_iter().collect::<Vec<_>>())?;
    if let Some(node) = backup
        .manifest
        .nodes
        .iter()
        .find(|n| !options.ledgers.contains_key(&n.node_id))
    {
        return Err(BackupError::NodeLedgerMissing {
            node: node.node_id.clone(),
        });
    }
    let mut entries: Vec<LedgerEntry> = Vec::new();
    for (node_id, source) in &options.ledgers {
        let (head_seq, head_hash) = backup
            .manifest
            .nodes
            .iter()
            .find(|n| &n.node_id == node_id)
            .map(|n| (n.audit_head_seq, n.audit_head_hash.clone()))
            .unwrap_or_default();
        match source {
            NodeLedger::DataDir(dir) => {
                let storage = Storage::open(
                    dir,
                    &StorageOptions {
                        create_if_missing: false,
                        ..StorageOptions::default()
                    },
                )
                .map_err(BackupError::storage(
                    "cannot open a node's data directory (is the node stopped?)",
                ))?;
                entries.extend(ledger::from_storage(&storage, head_seq, &head_hash)?);
            }
            NodeLedger::Export(path) => {
                entries.extend(ledger::from_export(path, head_seq, &head_hash)?);
            }
        }
    }
    let old = match options.replaced {
        Some(replaced) => OldCatalogue::read(replaced)?,
        None => OldCatalogue::default(),
    };
    let now = crate::service::now_ms();
    let applied = apply_ledger(options.catalogue, &entries, &old, now)?;
    options
        .catalogue
        .set_restore_marker(&RestoreMarker {
            backup_id: backup.id.clone(),
            backup_dir: backup.dir.display().to_string(),
            backup_created_unix_ms: backup.manifest.created_unix_ms,
            audit_head_seq: 0,
            restored_unix_ms: now,
            replayed_destructions: applied.replayed_destructions.clone(),
        })
        .map_err(BackupError::storage("cannot update the restored catalogue"))?;
    Ok(ClusterRestoreReport {
        backup_id: backup.id,
        manifest: backup.manifest,
        ledger_records: entries.len(),
        replayed_destructions: applied.replayed_destructions,
        keys_put_back: applied.keys_put_back,
        versions_put_back: applied.versions_put_back,
    })
}
