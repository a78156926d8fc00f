//! Forcing SoftHSM2's token files to disk.
//!
//! SoftHSM2 writes object files without fsync: after a power loss a key the
//! service already acknowledged could vanish, and every ciphertext under it
//! with it. When configured, the service fsyncs every file and directory of
//! the token directory after creating or destroying a key object.

use std::fs::File;
use std::path::Path;

use crate::error::{HsmError, Result};

/// fsyncs every regular file and directory under `root` (two levels deep is
/// what SoftHSM2 uses: tokendir/<token-uuid>/<object>.object).
pub(crate) fn sync_tree(root: &Path) -> Result<()> {
    sync_dir_recursive(root, 0)
}

fn sync_dir_recursive(dir: &Path, depth: usize) -> Result<()> {
    let error = |source| HsmError::TokenSync {
        path: dir.to_owned(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(error)? {
        let entry = entry.map_err(error)?;
        let kind = entry.file_type().map_err(error)?;
        if kind.is_dir() && depth < 4 {
            sync_dir_recursive(&entry.path(), depth + 1)?;
        } else if kind.is_file() {
            let path = entry.path();
            // The object files may be being rewritten by SoftHSM2 right now: a
            // file that vanished between listing and opening has nothing to sync.
            match File::open(&path) {
                Ok(file) => file.sync_all().map_err(|source| HsmError::TokenSync {
                    path: path.clone(),
                    source,
                })?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(HsmError::TokenSync { path, source }),
            }
        }
    }
    // The directory entries themselves (new or removed files).
    File::open(dir).and_then(|d| d.sync_all()).map_err(error)
}
