//! A snapshot of the whole etcd keyspace through etcd's maintenance API
//! (`Maintenance.Snapshot`, what `etcdctl snapshot save` uses), for cluster
//! backups (issue 15 item 4; design note `hierarchy-and-cluster.md` §1.6).
//! The file is exactly etcd's stream (a bbolt database followed by etcd's
//! SHA-256 of it), so `etcdctl snapshot restore` reads it unchanged.

use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use etcd_client::Client;
use kms_catalogue::{DbError, StorageError};

use crate::config::EtcdConfig;
use crate::engine::{config_error, connect_options, etcd_error};

/// Longest wait for the next chunk of the snapshot stream, at least: a
/// large keyspace streams for a while, but a stalled stream is a failure.
const MIN_CHUNK_WAIT: Duration = Duration::from_secs(10);

/// What [`save_snapshot`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// etcd's revision as a member reported it (`Status`) just before the
    /// snapshot was requested: for operators, approximately the snapshot's
    /// own revision (`etcdctl snapshot status` prints the exact one).
    pub revision: i64,
    /// Size of the file written, bytes.
    pub bytes: u64,
}

/// Streams a snapshot of etcd's whole keyspace (every prefix, not only
/// kms's: etcd cannot snapshot a prefix) from one of `config.endpoints`
/// into a new file at `path` (which must not exist), synced before
/// returning. Registers no node and takes no lease: it can run while the
/// cluster serves. With etcd authentication on, the user needs the right to
/// take snapshots (etcd's `root` role).
///
/// # Errors
///
/// `Db` (op `"check the etcd configuration"`) for a malformed configuration
/// or an unreadable TLS file; [`StorageError::Unavailable`] if etcd cannot
/// be reached or the stream stalls for more than max(4Δ, 10 s);
/// `Db` (op `"write the etcd snapshot"`) if the file cannot be created or
/// written, or `"take an etcd snapshot"` if etcd refuses. On error a
/// partly written file is removed.
pub fn save_snapshot(config: &EtcdConfig, path: &Path) -> Result<SnapshotInfo, StorageError> {
    config.validate().map_err(config_error)?;
    let options = connect_options(config)?;
    let endpoints = config.endpoints.clone();
    let delta = config.staleness_bound;
    let chunk_wait = (4 * delta).max(MIN_CHUNK_WAIT);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| StorageError::Db {
            op: "start the etcd snapshot's runtime",
            source: DbError::new(source),
        })?;
    let write_error = |source: std::io::Error| StorageError::Db {
        op: "write the etcd snapshot",
        source: DbError::new(source),
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(write_error)?;
    let result = runtime.block_on(async {
        let mut client =
            match tokio::time::timeout(delta, Client::connect(endpoints, Some(options))).await {
                Ok(r) => r.map_err(etcd_error("connect"))?,
                Err(_) => {
                    return Err(StorageError::Unavailable {
                        reason: format!("etcd did not answer within {} ms", delta.as_millis()),
                    });
                }
            };
        let stalled = || StorageError::Unavailable {
            reason: format!(
                "the etcd snapshot stream stalled for {} ms",
                chunk_wait.as_millis()
            ),
        };
        // etcd 3.4 sends no header with the snapshot's messages: the
        // revision is read just before.
        let revision = tokio::time::timeout(chunk_wait, client.status())
            .await
            .map_err(|_| stalled())?
            .map_err(etcd_error("read the etcd status"))?
            .header()
            .map_or(0, |h| h.revision());
        let mut stream = tokio::time::timeout(chunk_wait, client.snapshot())
            .await
            .map_err(|_| stalled())?
            .map_err(etcd_error("take an etcd snapshot"))?;
        let mut info = SnapshotInfo { revision, bytes: 0 };
        while let Some(message) = tokio::time::timeout(chunk_wait, stream.message())
            .await
            .map_err(|_| stalled())?
            .map_err(etcd_error("take an etcd snapshot"))?
        {
            file.write_all(message.blob()).map_err(write_error)?;
            info.bytes += message.blob().len() as u64;
        }
        if info.bytes == 0 {
            return Err(StorageError::Unavailable {
                reason: "etcd sent an empty snapshot".to_owned(),
            });
        }
        file.sync_all().map_err(write_error)?;
        Ok(info)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(path);
    }
    result
}
