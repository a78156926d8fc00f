//! The engine's configuration and its validation.

use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;

/// Default key prefix of the catalogue in etcd (design note §2.3.2).
pub const DEFAULT_PREFIX: &str = "/kms/v1/";

/// Default staleness bound Δ (design note §2.3.3, I3): 5 s.
pub const DEFAULT_STALENESS_BOUND: Duration = Duration::from_secs(5);

/// etcd user and password (etcd's own authentication, `etcdctl user add`).
#[derive(Debug, Clone)]
pub struct EtcdAuth {
    /// The etcd user name.
    pub user: String,
    /// The user's password. `Debug` shows `[REDACTED]`; zeroized on drop.
    /// (etcd-client keeps its own copy for token refreshes, which this
    /// crate cannot zeroize.)
    pub password: SecretString,
}

/// How an [`crate::EtcdEngine`] reaches etcd and identifies itself.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// This node's id, unique in the cluster: `[A-Za-z0-9_-]{1,64}`.
    pub node_id: String,
    /// etcd client URLs (`http://host:port`, or `https://` with TLS).
    pub endpoints: Vec<String>,
    /// Key prefix of the catalogue: starts and ends with `/`, at most 128
    /// bytes of `[A-Za-z0-9/_.-]`, no empty segment. Default `/kms/v1/`.
    pub prefix: String,
    /// The staleness bound Δ of I3: a node refuses key use once its last
    /// successful linearizable read of the generation started Δ ago or more.
    /// Also every etcd call's deadline. At least 100 ms; default 5 s.
    pub staleness_bound: Duration,
    /// PEM CA certificate to verify etcd's server certificate (TLS).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (mutual TLS); requires `key_file`.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// etcd authentication, if etcd has it enabled.
    pub auth: Option<EtcdAuth>,
    /// The address this node serves on, published in `nodes/<node_id>` for
    /// operators (never used for routing).
    pub address: Option<String>,
}

impl EtcdConfig {
    /// A configuration with the defaults: prefix `/kms/v1/`, Δ = 5 s, no
    /// TLS, no authentication.
    pub fn new(node_id: impl Into<String>, endpoints: Vec<String>) -> Self {
        EtcdConfig {
            node_id: node_id.into(),
            endpoints,
            prefix: DEFAULT_PREFIX.to_owned(),
            staleness_bound: DEFAULT_STALENESS_BOUND,
            ca_file: None,
            cert_file: None,
            key_file: None,
            auth: None,
            address: None,
        }
    }

    /// Checks the configuration without contacting etcd.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the first field that is malformed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let id_ok = !self.node_id.is_empty()
            && self.node_id.len() <= 64
            && self
                .node_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !id_ok {
            return Err(ConfigError::NodeId(self.node_id.clone()));
        }
        let p = &self.prefix;
        let prefix_ok = p.len() >= 2
            && p.len() <= 128
            && p.starts_with('/')
            && p.ends_with('/')
            && !p.contains("//")
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/_.-".contains(&b));
        if !prefix_ok {
            return Err(ConfigError::Prefix(p.clone()));
        }
        if self.endpoints.is_empty() {
            return Err(ConfigError::NoEndpoints);
        }
        if self.staleness_bound < Duration::from_millis(100) {
            return Err(ConfigError::StalenessBound(self.staleness_bound));
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(ConfigError::ClientCertificate);
        }
        Ok(())
    }
}

/// A malformed [`EtcdConfig`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The node id is not `[A-Za-z0-9_-]{1,64}`.
    #[error("invalid cluster node id {0:?}: expected 1 to 64 of [A-Za-z0-9_-]")]
    NodeId(String),
    /// The prefix is malformed.
    #[error(
        "invalid etcd prefix {0:?}: expected /…/, at most 128 bytes of [A-Za-z0-9/_.-], no empty segment"
    )]
    Prefix(String),
    /// No endpoint was given.
    #[error("no etcd endpoint configured")]
    NoEndpoints,
    /// Δ is below 100 ms.
    #[error("staleness bound {0:?} is below the minimum of 100 ms")]
    StalenessBound(std::time::Duration),
    /// Only one of the client certificate and its key was given.
    #[error("etcd client certificate and key must be given together")]
    ClientCertificate,
    /// A TLS file could not be read.
    #[error("cannot read {what} file {path}")]
    ReadFile {
        /// Which file (`"CA"`, `"client certificate"`, `"client key"`).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        let ok = EtcdConfig::new("node-1", vec!["http://127.0.0.1:2379".into()]);
        assert!(ok.validate().is_ok());
        for id in ["", "a/b", "node 1", &"x".repeat(65)] {
            let mut c = ok.clone();
            c.node_id = id.to_owned();
            assert!(matches!(c.validate(), Err(ConfigError::NodeId(_))), "{id}");
        }
        for p in [
            "",
            "/",
            "kms/",
            "/kms",
            "/kms//v1/",
            "/kms v1/",
            "/kms/\u{e9}/",
        ] {
            let mut c = ok.clone();
            c.prefix = p.to_owned();
            assert!(matches!(c.validate(), Err(ConfigError::Prefix(_))), "{p}");
        }
        let mut c = ok.clone();
        c.endpoints.clear();
        assert!(matches!(c.validate(), Err(ConfigError::NoEndpoints)));
        let mut c = ok;
        c.cert_file = Some("/x".into());
        assert!(matches!(c.validate(), Err(ConfigError::ClientCertificate)));
    }
}
