//! `[[kubernetes]]`: Kubernetes KMS v2 plugin listeners, one Unix socket per
//! entry, each serving one key (`server::kubernetes`, `grpc::kubernetes`).
//!
//! ```toml
//! [[kubernetes]]
//! socket = "/run/kms/kubernetes.sock"   # absolute; what the apiserver's endpoint names
//! key = "alias/kubernetes"              # key id or alias
//! owner_uid = 0                         # optional: chown the socket (default: kms's uid)
//! group_gid = 0                         # optional: chgrp the socket (default: kms's gid)
//! mode = 0o600                          # optional, default 0o600
//! ```

use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, invalid};

/// The socket file's mode unless configured: owner read/write only.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

/// Longest socket path, in bytes: `sun_path` holds 108 bytes on Linux,
/// including the terminating NUL (unix(7)).
pub const MAX_SOCKET_PATH_BYTES: usize = 107;

/// One Kubernetes KMS v2 plugin listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesListener {
    /// Where the socket is created (absolute).
    pub socket: PathBuf,
    /// The key (id or `alias/<name>`) Encrypt uses and Status reports.
    pub key: String,
    /// Owner of the socket file, if not kms's own uid.
    pub owner_uid: Option<u32>,
    /// Group of the socket file, if not kms's own gid.
    pub group_gid: Option<u32>,
    /// Permission bits of the socket file (at most 0o777; default
    /// [`DEFAULT_SOCKET_MODE`]). Connecting needs write permission.
    pub mode: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKubernetes {
    socket: PathBuf,
    key: String,
    owner_uid: Option<u32>,
    group_gid: Option<u32>,
    mode: Option<u32>,
}

/// Validates the `[[kubernetes]]` entries: absolute socket paths that fit
/// `sun_path`, each used once; a key named; a mode of permission bits only.
pub(super) fn validate(raw: Vec<RawKubernetes>) -> Result<Vec<KubernetesListener>, ConfigError> {
    let mut listeners: Vec<KubernetesListener> = Vec::with_capacity(raw.len());
    for entry in raw {
        if !entry.socket.is_absolute() {
            return Err(invalid(
                "kubernetes.socket",
                format!("{} must be an absolute path", entry.socket.display()),
            ));
        }
        if entry.socket.as_os_str().len() > MAX_SOCKET_PATH_BYTES {
            return Err(invalid(
                "kubernetes.socket",
                format!(
                    "{} is longer than {MAX_SOCKET_PATH_BYTES} bytes (the Unix socket address limit)",
                    entry.socket.display()
                ),
            ));
        }
        if listeners.iter().any(|l| l.socket == entry.socket) {
            return Err(invalid(
                "kubernetes.socket",
                format!("{} is configured twice", entry.socket.display()),
            ));
        }
        if entry.key.is_empty() || entry.key.len() > 256 {
            return Err(invalid(
                "kubernetes.key",
                "must name a key id or alias/<name> (1 to 256 bytes)",
            ));
        }
        let mode = entry.mode.unwrap_or(DEFAULT_SOCKET_MODE);
        if mode > 0o777 {
            return Err(invalid(
                "kubernetes.mode",
                format!("{mode:#o} has bits beyond 0o777 (permission bits only)"),
            ));
        }
        listeners.push(KubernetesListener {
            socket: entry.socket,
            key: entry.key,
            owner_uid: entry.owner_uid,
            group_gid: entry.group_gid,
            mode,
        });
    }
    Ok(listeners)
}
