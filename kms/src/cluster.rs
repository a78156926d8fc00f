//! Cluster mode (`[cluster]`, issue 15): the key catalogue in etcd through
//! `kms-storage-etcd`, shared by every node.

use kms_storage::{Catalogue, StorageError};

use crate::config::ClusterConfig;

/// Opens the shared catalogue of the cluster `config` describes.
///
/// # Errors
///
/// `StorageError::Unavailable` if etcd cannot be reached.
pub fn open_catalogue(config: &ClusterConfig) -> Result<Catalogue, StorageError> {
    Err(StorageError::Unavailable {
        reason: format!(
            "node {}: the etcd catalogue engine is not part of this build yet",
            config.node_id
        ),
    })
}
