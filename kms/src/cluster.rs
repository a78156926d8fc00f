//! Cluster mode (`[cluster]`, issue 15): the key catalogue in etcd through
//! `kms-storage-etcd`, shared by every node; this node's audit log stays in
//! its own RocksDB under `[storage] data_dir`.
//!
//! This module only turns the validated `[cluster]` section into the
//! engine's configuration (reading the etcd password file, mode 0600) and
//! opens the catalogue over it; every rule of the catalogue is
//! kms-catalogue's, every etcd detail kms-storage-etcd's.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use kms_storage::{Catalogue, StorageError, StorageOptions};
use kms_storage_etcd::{EtcdAuth, EtcdConfig, EtcdEngine};
use zeroize::Zeroizing;

use crate::config::ClusterConfig;

/// Opens the shared catalogue of the cluster `config` describes, as node
/// `config.node_id`, publishing `address` (this node's gRPC address) for
/// operators.
///
/// # Errors
///
/// `StorageError::Unavailable` if etcd cannot be reached or the password
/// file is unusable (its path and the reason, never its content);
/// `StorageError::Db` if etcd refuses (authentication, permissions);
/// `StorageError::FormatTooNew` if a newer kms wrote the catalogue.
pub fn open_catalogue(config: &ClusterConfig, address: &str) -> Result<Catalogue, StorageError> {
    let engine = EtcdEngine::connect(etcd_config(config, address)?)?;
    Ok(Catalogue::new(
        Arc::new(engine),
        StorageOptions::default().gcm_reservation_block,
    ))
}

/// The etcd engine's configuration for `config` (the password file read),
/// publishing `address`: also what `kms backup create --cluster` takes its
/// etcd snapshot with.
///
/// # Errors
///
/// `StorageError::Unavailable` if the password file is unusable (its path
/// and the reason, never its content).
pub fn etcd_config(config: &ClusterConfig, address: &str) -> Result<EtcdConfig, StorageError> {
    let auth = match (&config.etcd_user, &config.etcd_password_file) {
        (Some(user), Some(file)) => Some(EtcdAuth {
            user: user.clone(),
            password: read_password_file(file)?.into(),
        }),
        _ => None,
    };
    Ok(EtcdConfig {
        node_id: config.node_id.clone(),
        endpoints: config.etcd_endpoints.clone(),
        prefix: config.etcd_prefix.clone(),
        staleness_bound: config.staleness_bound,
        ca_file: config.etcd_ca_file.clone(),
        cert_file: config.etcd_cert_file.clone(),
        key_file: config.etcd_key_file.clone(),
        auth,
        address: Some(address.to_owned()),
    })
}

/// Reads the etcd password: the file's content without its trailing line
/// break; the file must be mode 0600 or stricter (like the HSM PIN file).
fn read_password_file(path: &Path) -> Result<String, StorageError> {
    let unusable = |reason: String| StorageError::Unavailable {
        reason: format!("cluster.etcd_password_file {}: {reason}", path.display()),
    };
    let meta = std::fs::metadata(path).map_err(|e| unusable(e.to_string()))?;
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(unusable(format!(
            "mode {mode:o} lets others read it; chmod 600"
        )));
    }
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| unusable(e.to_string()))?);
    let password = text.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        return Err(unusable("it is empty".to_owned()));
    }
    Ok(password.to_owned())
}
