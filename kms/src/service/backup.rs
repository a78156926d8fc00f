//! `Admin.CreateBackup`: a backup of the running server's catalogue and
//! audit log (`crate::backup`), written under `[backup] dir` only.
//! Administrators only; audited.

use std::path::{Component, Path, PathBuf};

use super::{KmsService, Operation, RequestMeta};
use crate::backup::{BackupError, CreatedBackup};
use crate::error::{KmsError, Result};

/// The longest `out_dir` accepted, bytes (PATH_MAX on Linux).
const MAX_OUT_DIR_LEN: usize = 4096;

impl KmsService {
    /// `Admin.CreateBackup`, audited: writes a backup to `out_dir` (see
    /// `admin.proto` for the rules on the path).
    ///
    /// # Errors
    /// `PermissionDenied`; `BackupNotConfigured` without `[backup] dir`;
    /// `InvalidArgument` (field `out_dir`) for a path that is not absolute,
    /// outside the backup directory, or an existing non-empty target;
    /// `Backup` if writing fails.
    pub fn create_backup(&self, meta: &RequestMeta, out_dir: &str) -> Result<CreatedBackup> {
        self.audited(meta, Operation::CreateBackup, None, |_| {
            self.require_admin(meta, "create a backup")?;
            // A cluster node's database holds only its audit log (the
            // catalogue is in etcd, backed up by an etcd snapshot: `kms
            // backup create --cluster`): its copy is this node's part of a
            // cluster backup, with the root epochs read from etcd.
            let cluster = self.catalogue.engine().cluster_view().is_some();
            let root = self
                .backup_dir
                .as_deref()
                .ok_or(KmsError::BackupNotConfigured)?;
            let out = resolve_target(root, out_dir)?;
            let node_id = self.node_id.clone().unwrap_or_else(crate::backup::node_id);
            let shared = cluster.then_some(&self.catalogue);
            let created = crate::backup::create_backup(&self.storage, &out, &node_id, shared)
                .map_err(|e| match e {
                    BackupError::TargetNotEmpty { path } => KmsError::invalid(
                        "out_dir",
                        format!("{} exists and is not an empty directory", path.display()),
                    ),
                    source => KmsError::Backup { source },
                })?;
            tracing::info!(
                dir = %created.dir.display(),
                backup_id = %created.id,
                audit_head = created.manifest.audit_head_seq,
                files = created.manifest.files.len(),
                "backup written"
            );
            Ok(created)
        })
    }
}

/// `out_dir` resolved (its parent's symbolic links followed) and checked
/// to lie strictly inside the backup directory `root`.
fn resolve_target(root: &Path, out_dir: &str) -> Result<PathBuf> {
    if out_dir.is_empty() || out_dir.len() > MAX_OUT_DIR_LEN {
        return Err(KmsError::invalid("out_dir", "must be 1 to 4096 bytes"));
    }
    let out = Path::new(out_dir);
    if !out.is_absolute() {
        return Err(KmsError::invalid("out_dir", "must be an absolute path"));
    }
    let (Some(parent), Some(Component::Normal(name))) =
        (out.parent(), out.components().next_back())
    else {
        return Err(KmsError::invalid("out_dir", "must name a directory"));
    };
    let outside = || {
        KmsError::invalid(
            "out_dir",
            format!("must be inside the backup directory {}", root.display()),
        )
    };
    let root = std::fs::canonicalize(root).map_err(|source| KmsError::Backup {
        source: BackupError::Io {
            what: "cannot resolve [backup] dir",
            path: root.to_owned(),
            source,
        },
    })?;
    let parent = std::fs::canonicalize(parent)
        .map_err(|_| KmsError::invalid("out_dir", "its parent directory does not exist"))?;
    if !parent.starts_with(&root) {
        return Err(outside());
    }
    let target = parent.join(name);
    // The target itself must not lead elsewhere either.
    if std::fs::symlink_metadata(&target).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(outside());
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_outside_the_backup_directory_are_refused() {
        let base = std::env::temp_dir().join(format!("kms-backup-target-{}", std::process::id()));
        let root = base.join("backups");
        std::fs::create_dir_all(root.join("sub")).expect("dirs");
        std::fs::create_dir_all(base.join("elsewhere")).expect("dirs");
        let inside = resolve_target(&root, &root.join("b1").display().to_string()).expect("inside");
        assert!(inside.ends_with("backups/b1"));
        assert!(resolve_target(&root, &root.join("sub/b2").display().to_string()).is_ok());
        for refused in [
            base.join("elsewhere/b").display().to_string(),
            format!("{}/../elsewhere/b", root.display()),
            format!("{}/..", root.display()),
            root.display().to_string(),
            "relative/b".to_owned(),
            String::new(),
            format!("{}/missing/b", root.display()),
        ] {
            assert!(
                matches!(
                    resolve_target(&root, &refused),
                    Err(KmsError::InvalidArgument {
                        field: "out_dir",
                        ..
                    })
                ),
                "{refused:?} was accepted"
            );
        }
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(base.join("elsewhere"), root.join("link")).expect("link");
            assert!(resolve_target(&root, &root.join("link/b").display().to_string()).is_err());
            assert!(resolve_target(&root, &root.join("link").display().to_string()).is_err());
        }
        let _ = std::fs::remove_dir_all(&base);
    }
}
