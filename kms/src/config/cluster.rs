//! `[cluster]`: this node's place in a cluster. Only `node_id` is read here
//! (the audit log's cross-node witnessing, design note §2.3.6); the etcd
//! settings of issue 15 join this section.
//!
//! ```toml
//! [cluster]
//! node_id = "node-1"      # unique per node: [A-Za-z0-9_-]{1,64}
//! ```
//!
//! Without `[cluster]` the node is a single node: it has no id, publishes
//! no audit head and writes no witness records.

use serde::Deserialize;

use super::{ConfigError, invalid};

/// The longest node id, in bytes.
pub const MAX_NODE_ID_LEN: usize = 64;

/// The `[cluster]` section, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// This node's id, unique in the cluster: 1 to [`MAX_NODE_ID_LEN`]
    /// characters of `[A-Za-z0-9_-]`. It names the node's audit head
    /// (`audit/heads/<node_id>`) and the node in cross-node verification.
    pub node_id: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    node_id: Option<String>,
}

/// Validates `[cluster]`.
///
/// # Errors
///
/// [`ConfigError::Invalid`] for a missing or malformed `cluster.node_id`.
pub(super) fn validate(raw: Option<RawCluster>) -> Result<Option<ClusterConfig>, ConfigError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    let node_id = raw
        .node_id
        .ok_or_else(|| invalid("cluster.node_id", "missing"))?;
    if !is_node_id(&node_id) {
        return Err(invalid(
            "cluster.node_id",
            "must be 1 to 64 characters of A-Z, a-z, 0-9, '_' and '-'",
        ));
    }
    Ok(Some(ClusterConfig { node_id }))
}

/// Whether `s` is a valid node id (`[A-Za-z0-9_-]{1,64}`).
pub fn is_node_id(s: &str) -> bool {
    (1..=MAX_NODE_ID_LEN).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn node_ids() {
        assert!(is_node_id("node-1"));
        assert!(is_node_id(&"a".repeat(64)));
        for bad in ["", "node 1", "node/1", "nœud", &"a".repeat(65)] {
            assert!(!is_node_id(bad), "{bad:?}");
        }
        assert_eq!(validate(None).unwrap(), None);
        let raw: RawCluster = toml::from_str("node_id = \"n-2\"").unwrap();
        assert_eq!(validate(Some(raw)).unwrap().unwrap().node_id, "n-2");
        let raw: RawCluster = toml::from_str("").unwrap();
        assert!(validate(Some(raw)).is_err());
        assert!(toml::from_str::<RawCluster>("node_id = \"a\"\nsurprise = 1").is_err());
    }
}
