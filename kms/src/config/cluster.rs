//! `[cluster]`: run as one node of a cluster whose key catalogue lives in
//! etcd (issue 15; design note part 2). Without it kms is a single node
//! with its catalogue in RocksDB, the embedded default.
//!
//! ```toml
//! [cluster]
//! node_id = "node-1"                              # unique per node: [A-Za-z0-9_-]{1,64}
//! etcd_endpoints = ["https://10.0.0.1:2379", "https://10.0.0.2:2379", "https://10.0.0.3:2379"]
//! etcd_prefix = "/kms/v1/"                        # every key kms writes lies under it
//! staleness_bound_ms = 5000                       # Δ: revocation reaches every node within it
//! etcd_ca_file = "/etc/kms/etcd-ca.pem"           # TLS to etcd (https endpoints)
//! etcd_cert_file = "/etc/kms/etcd-client.pem"     # client certificate (etcd --client-cert-auth)
//! etcd_key_file = "/etc/kms/etcd-client.key"
//! etcd_user = "kms"                               # etcd authentication (an RBAC role on the prefix)
//! etcd_password_file = "/etc/kms/etcd.password"   # mode 0600; never in this file or argv
//! ```
//!
//! With `[cluster]`, `[storage] data_dir` holds only this node's audit log.
//! The password file is read when the node connects, never here: this
//! configuration holds paths only, so its Debug is safe.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, invalid};

/// The default prefix of every etcd key kms writes (design note §2.3.2).
pub const DEFAULT_ETCD_PREFIX: &str = "/kms/v1/";
/// The default staleness bound Δ (design note §2.3.3, I3): 5 s, above
/// etcd's default 1 s election timeout so that a leader election does not
/// stop key use.
pub const DEFAULT_STALENESS_BOUND: Duration = Duration::from_secs(5);
/// The smallest Δ accepted: below it, the freshness poll (every Δ/4) and
/// a loaded etcd would flap nodes in and out of service.
pub const MIN_STALENESS_BOUND: Duration = Duration::from_millis(500);
/// The largest Δ accepted: revocation takes up to Δ to reach every node.
pub const MAX_STALENESS_BOUND: Duration = Duration::from_secs(60);

/// The `[cluster]` section, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// This node's id: 1 to 64 of `[A-Za-z0-9_-]`, unique in the cluster
    /// (two live nodes with one id are refused at start).
    pub node_id: String,
    /// etcd client URLs (`http://` or `https://` host:port), at least one.
    pub etcd_endpoints: Vec<String>,
    /// Prefix of every key kms writes: starts and ends with `/`.
    pub etcd_prefix: String,
    /// Δ: a node uses a key only if a linearizable read started within Δ
    /// matched its view; revocations return once every node holds them or
    /// Δ has passed.
    pub staleness_bound: Duration,
    /// CA certificate(s) that sign etcd's server certificates (PEM).
    pub etcd_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's `--client-cert-auth`; with `etcd_key_file`.
    pub etcd_cert_file: Option<PathBuf>,
    /// Client private key (PEM); with `etcd_cert_file`.
    pub etcd_key_file: Option<PathBuf>,
    /// etcd user (etcd authentication); with `etcd_password_file`.
    pub etcd_user: Option<String>,
    /// File (mode 0600) holding the etcd user's password.
    pub etcd_password_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    node_id: String,
    etcd_endpoints: Vec<String>,
    etcd_prefix: Option<String>,
    staleness_bound_ms: Option<u64>,
    etcd_ca_file: Option<PathBuf>,
    etcd_cert_file: Option<PathBuf>,
    etcd_key_file: Option<PathBuf>,
    etcd_user: Option<String>,
    etcd_password_file: Option<PathBuf>,
}

/// Whether `id` is a valid node id: 1 to 64 of `[A-Za-z0-9_-]` (it is an
/// etcd key segment and an audit record field).
pub fn is_valid_node_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Validates `[cluster]`.
pub(super) fn validate(raw: Option<RawCluster>) -> Result<Option<ClusterConfig>, ConfigError> {
    let Some(raw) = raw else { return Ok(None) };
    if !is_valid_node_id(&raw.node_id) {
        return Err(invalid(
            "cluster.node_id",
            "must be 1 to 64 letters, digits, '-' or '_'",
        ));
    }
    if raw.etcd_endpoints.is_empty() {
        return Err(invalid(
            "cluster.etcd_endpoints",
            "needs at least one etcd client URL",
        ));
    }
    let mut tls_endpoints = 0;
    for endpoint in &raw.etcd_endpoints {
        let rest = if let Some(rest) = endpoint.strip_prefix("https://") {
            tls_endpoints += 1;
            rest
        } else if let Some(rest) = endpoint.strip_prefix("http://") {
            rest
        } else {
            return Err(invalid(
                "cluster.etcd_endpoints",
                format!("{endpoint:?} is not an http:// or https:// URL"),
            ));
        };
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') || !authority.contains(':') {
            return Err(invalid(
                "cluster.etcd_endpoints",
                format!("{endpoint:?} must be scheme://host:port"),
            ));
        }
    }
    if tls_endpoints != 0 && tls_endpoints != raw.etcd_endpoints.len() {
        return Err(invalid(
            "cluster.etcd_endpoints",
            "mixes http:// and https:// endpoints",
        ));
    }
    let prefix = raw
        .etcd_prefix
        .unwrap_or_else(|| DEFAULT_ETCD_PREFIX.to_owned());
    if prefix.len() < 2
        || !prefix.starts_with('/')
        || !prefix.ends_with('/')
        || !prefix.is_ascii()
        || prefix.bytes().any(|b| b.is_ascii_control())
    {
        return Err(invalid(
            "cluster.etcd_prefix",
            "must start and end with '/' (e.g. /kms/v1/), printable ASCII",
        ));
    }
    let staleness_bound = raw
        .staleness_bound_ms
        .map_or(DEFAULT_STALENESS_BOUND, Duration::from_millis);
    if !(MIN_STALENESS_BOUND..=MAX_STALENESS_BOUND).contains(&staleness_bound) {
        return Err(invalid(
            "cluster.staleness_bound_ms",
            format!(
                "must be {} to {} ms",
                MIN_STALENESS_BOUND.as_millis(),
                MAX_STALENESS_BOUND.as_millis()
            ),
        ));
    }
    if raw.etcd_cert_file.is_some() != raw.etcd_key_file.is_some() {
        return Err(invalid(
            "cluster.etcd_cert_file",
            "etcd_cert_file and etcd_key_file go together",
        ));
    }
    if (raw.etcd_ca_file.is_some() || raw.etcd_cert_file.is_some()) && tls_endpoints == 0 {
        return Err(invalid(
            "cluster.etcd_ca_file",
            "TLS files are set but the etcd endpoints are http://",
        ));
    }
    if raw.etcd_user.is_some() != raw.etcd_password_file.is_some() {
        return Err(invalid(
            "cluster.etcd_user",
            "etcd_user and etcd_password_file go together",
        ));
    }
    if let Some(user) = &raw.etcd_user
        && (user.is_empty() || user.len() > 128 || user.bytes().any(|b| b.is_ascii_control()))
    {
        return Err(invalid(
            "cluster.etcd_user",
            "must be 1 to 128 printable characters",
        ));
    }
    Ok(Some(ClusterConfig {
        node_id: raw.node_id,
        etcd_endpoints: raw.etcd_endpoints,
        etcd_prefix: prefix,
        staleness_bound,
        etcd_ca_file: raw.etcd_ca_file,
        etcd_cert_file: raw.etcd_cert_file,
        etcd_key_file: raw.etcd_key_file,
        etcd_user: raw.etcd_user,
        etcd_password_file: raw.etcd_password_file,
    }))
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use super::*;

    const MINIMAL: &str = "[hsm]\nmodule = \"/usr/lib/softhsm/libsofthsm2.so\"\ntoken_label = \"kms\"\npin_file = \"/etc/kms/pin\"\n\n[storage]\ndata_dir = \"/var/lib/kms\"\n";

    fn parse(cluster: &str) -> Result<Config, ConfigError> {
        Config::parse(&format!("{MINIMAL}\n[cluster]\n{cluster}\n"))
    }

    fn refused_field(cluster: &str) -> &'static str {
        match parse(cluster) {
            Err(ConfigError::Invalid { field, .. }) => field,
            other => panic!("expected a refusal of {cluster:?}, got {other:?}"),
        }
    }

    #[test]
    fn no_cluster_section_is_a_single_node() {
        assert_eq!(Config::parse(MINIMAL).expect("valid").cluster, None);
    }

    #[test]
    fn a_cluster_section_gets_safe_defaults() {
        let config = parse("node_id = \"node-1\"\netcd_endpoints = [\"http://127.0.0.1:2379\"]")
            .expect("valid");
        let cluster = config.cluster.expect("cluster");
        assert_eq!(cluster.node_id, "node-1");
        assert_eq!(cluster.etcd_prefix, DEFAULT_ETCD_PREFIX);
        assert_eq!(cluster.staleness_bound, DEFAULT_STALENESS_BOUND);
        assert_eq!(cluster.etcd_user, None);
    }

    #[test]
    fn a_cluster_node_cannot_turn_wrapped_versions_off() {
        let section = "[cluster]\nnode_id = \"n\"\netcd_endpoints = [\"http://127.0.0.1:2379\"]\n";
        let with = |value: &str| {
            let hsm = MINIMAL.replace(
                "[storage]",
                &format!("wrapped_versions = {value}\n\n[storage]"),
            );
            Config::parse(&format!("{hsm}\n{section}"))
        };
        match with("false") {
            Err(ConfigError::Invalid { field, reason }) => {
                assert_eq!(field, "hsm.wrapped_versions");
                assert!(reason.contains("cluster node"), "{reason}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(with("true").is_ok());
        // A single node may keep token-object versions.
        let single = MINIMAL.replace("[storage]", "wrapped_versions = false\n\n[storage]");
        assert!(Config::parse(&single).is_ok());
    }

    #[test]
    fn a_full_cluster_section_is_read() {
        let config = parse(
            "node_id = \"b_2\"\netcd_endpoints = [\"https://10.0.0.1:2379\", \"https://10.0.0.2:2379/\"]\netcd_prefix = \"/prod/kms/\"\nstaleness_bound_ms = 2000\netcd_ca_file = \"/ca.pem\"\netcd_cert_file = \"/c.pem\"\netcd_key_file = \"/c.key\"\netcd_user = \"kms\"\netcd_password_file = \"/pw\"",
        )
        .expect("valid");
        let cluster = config.cluster.expect("cluster");
        assert_eq!(cluster.staleness_bound, Duration::from_secs(2));
        assert_eq!(cluster.etcd_prefix, "/prod/kms/");
        assert_eq!(cluster.etcd_user.as_deref(), Some("kms"));
        assert_eq!(cluster.etcd_key_file, Some(PathBuf::from("/c.key")));
    }

    #[test]
    fn bad_cluster_sections_are_refused_naming_the_field() {
        let ok = "etcd_endpoints = [\"http://127.0.0.1:2379\"]";
        for (body, field) in [
            (format!("node_id = \"\"\n{ok}"), "cluster.node_id"),
            (format!("node_id = \"a b\"\n{ok}"), "cluster.node_id"),
            (
                format!("node_id = \"{}\"\n{ok}", "n".repeat(65)),
                "cluster.node_id",
            ),
            (
                "node_id = \"n\"\netcd_endpoints = []".to_owned(),
                "cluster.etcd_endpoints",
            ),
            (
                "node_id = \"n\"\netcd_endpoints = [\"127.0.0.1:2379\"]".to_owned(),
                "cluster.etcd_endpoints",
            ),
            (
                "node_id = \"n\"\netcd_endpoints = [\"http://127.0.0.1\"]".to_owned(),
                "cluster.etcd_endpoints",
            ),
            (
                "node_id = \"n\"\netcd_endpoints = [\"http://a:1\", \"https://b:2\"]".to_owned(),
                "cluster.etcd_endpoints",
            ),
            (
                format!("node_id = \"n\"\n{ok}\netcd_prefix = \"kms\""),
                "cluster.etcd_prefix",
            ),
            (
                format!("node_id = \"n\"\n{ok}\netcd_prefix = \"/\""),
                "cluster.etcd_prefix",
            ),
            (
                format!("node_id = \"n\"\n{ok}\nstaleness_bound_ms = 10"),
                "cluster.staleness_bound_ms",
            ),
            (
                format!("node_id = \"n\"\n{ok}\nstaleness_bound_ms = 600000"),
                "cluster.staleness_bound_ms",
            ),
            (
                format!("node_id = \"n\"\n{ok}\netcd_ca_file = \"/ca\""),
                "cluster.etcd_ca_file",
            ),
            (
                "node_id = \"n\"\netcd_endpoints = [\"https://a:1\"]\netcd_cert_file = \"/c\""
                    .to_owned(),
                "cluster.etcd_cert_file",
            ),
            (
                format!("node_id = \"n\"\n{ok}\netcd_user = \"kms\""),
                "cluster.etcd_user",
            ),
        ] {
            assert_eq!(refused_field(&body), field, "{body}");
        }
        assert!(matches!(
            parse("node_id = \"n\"\netcd_endpoints = [\"http://a:1\"]\netcd_password = \"x\""),
            Err(ConfigError::Parse { .. })
        ));
    }
}
