//! Service configuration: a TOML file parsed strictly (unknown fields are
//! errors) into a raw form, then validated into the typed `Config` the rest
//! of the service trusts. Every error names the offending field.
//!
//! The HSM PIN is never in this file: it comes from a file (`hsm.pin_file`)
//! or an environment variable (`hsm.pin_env`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kms_hsm::{HsmConfig, PinSource};
use serde::Deserialize;

mod aws;
mod cluster;
mod kubernetes;
mod lifecycle;
mod security;

pub use aws::{
    AwsApiConfig, AwsCredentialConfig, DEFAULT_AWS_ACCOUNT_ID, DEFAULT_AWS_REGION,
    is_valid_access_key_id,
};
pub use cluster::{
    ClusterConfig, DEFAULT_ETCD_PREFIX, DEFAULT_STALENESS_BOUND, MAX_STALENESS_BOUND,
    MIN_STALENESS_BOUND, is_valid_node_id,
};
pub use kubernetes::{DEFAULT_SOCKET_MODE, KubernetesListener, MAX_SOCKET_PATH_BYTES};
pub use lifecycle::{
    DEFAULT_VERSION_DESTRUCTION_QUIET_PERIOD_DAYS, LifecycleSettings,
    MAX_VERSION_DESTRUCTION_QUIET_PERIOD_DAYS,
};
pub use security::{AuthSettings, TlsSettings, grant};

use crate::auth::admission::PrincipalLimits;

/// A configuration error, naming the field (e.g. `limits.max_plaintext_bytes`).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("configuration file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("configuration field {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    limits: RawLimits,
    hsm: Option<RawHsm>,
    #[serde(default)]
    storage: RawStorage,
    #[serde(default)]
    audit: RawAudit,
    #[serde(default)]
    rotation: RawRotation,
    #[serde(default)]
    auth: security::RawAuth,
    #[serde(default)]
    kubernetes: Vec<kubernetes::RawKubernetes>,
    aws_api: Option<aws::RawAwsApi>,
    cluster: Option<cluster::RawCluster>,
    #[serde(default)]
    backup: RawBackup,
    #[serde(default)]
    lifecycle: lifecycle::RawLifecycle,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBackup {
    dir: Option<PathBuf>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    metrics_listen: Option<String>,
    request_timeout_ms: Option<u64>,
    max_concurrent_requests: Option<usize>,
    max_message_bytes: Option<usize>,
    max_connections: Option<usize>,
    max_concurrent_streams: Option<u32>,
    shutdown_grace_ms: Option<u64>,
    tls: Option<security::RawTls>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_plaintext_bytes: Option<usize>,
    max_context_bytes: Option<usize>,
    max_batch_items: Option<usize>,
    #[serde(default)]
    per_principal: security::RawPrincipalLimits,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHsm {
    module: PathBuf,
    token_label: String,
    pin_file: Option<PathBuf>,
    pin_env: Option<String>,
    pool_size: Option<usize>,
    sync_token_dir: Option<PathBuf>,
    working_key_cache: Option<usize>,
    wrapped_versions: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStorage {
    data_dir: Option<PathBuf>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    sync: Option<bool>,
    checkpoint_every_records: Option<u64>,
    checkpoint_interval_secs: Option<u64>,
    usage_flush_interval_ms: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRotation {
    default_period_days: Option<u32>,
    gcm_invocation_limit: Option<u64>,
    gcm_invocation_hard_limit: Option<u64>,
    scheduler_interval_secs: Option<u64>,
    root_rewrap_batch: Option<usize>,
    root_rewrap_pause_ms: Option<u64>,
}

/// Network-facing settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    pub request_timeout: Duration,
    /// Requests in flight across all callers; beyond it, RESOURCE_EXHAUSTED.
    pub max_concurrent_requests: usize,
    pub max_message_bytes: usize,
    /// Open client connections; further connections wait in the accept queue.
    pub max_connections: usize,
    /// HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// On SIGTERM/SIGINT: how long requests in flight may take to finish
    /// before the server closes their connections and exits anyway
    /// (`server.shutdown_grace_ms`, default 10 s, 0 to 600 s).
    pub shutdown_grace: Duration,
    pub tls: Option<TlsSettings>,
}

/// Request limits.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_plaintext_bytes: usize,
    pub max_context_bytes: usize,
    pub max_batch_items: usize,
    pub per_principal: PrincipalLimits,
}

/// Audit log settings.
#[derive(Debug, Clone)]
pub struct AuditSettings {
    pub sync: bool,
    pub checkpoint_every_records: u64,
    pub checkpoint_interval: Duration,
    /// `audit.usage_flush_interval_ms` (default [`DEFAULT_USAGE_FLUSH_INTERVAL_MS`],
    /// 100 ms to 10 min): how often the key version uses counted from the
    /// audit log are stored. In a cluster, how late another node's uses
    /// may show; a crash loses none (they are replayed from the audit log).
    pub usage_flush_interval: Duration,
}

/// `audit.usage_flush_interval_ms` unless configured (5 s).
pub const DEFAULT_USAGE_FLUSH_INTERVAL_MS: u64 = 5_000;
/// The accepted range of `audit.usage_flush_interval_ms`: below 100 ms the
/// store is written nearly per request; above 10 min a cluster's view of
/// other nodes' uses would be too stale for the destruction guard.
pub const USAGE_FLUSH_INTERVAL_MS_RANGE: std::ops::RangeInclusive<u64> = 100..=600_000;

/// Rotation defaults and the scheduler.
#[derive(Debug, Clone)]
pub struct RotationSettings {
    /// Period given to new keys that do not name one (None = no automatic rotation).
    pub default_period: Option<Duration>,
    /// The soft limit (`rotation.gcm_invocation_limit`): a version is rotated
    /// automatically (by the scheduler) once it has done this many AES-GCM
    /// encryptions with random IVs. At most `gcm_invocation_hard_limit`.
    pub gcm_invocation_limit: u64,
    /// The hard limit (`rotation.gcm_invocation_hard_limit`): encrypt-side
    /// use of a version (Encrypt, GenerateDataKey, ReEncrypt's destination,
    /// the batch forms) that would make it pass this many AES-GCM
    /// encryptions is refused with FAILED_PRECONDITION
    /// ([`crate::error::KmsError::GcmInvocationLimit`]), whether or not the
    /// rotation at the soft limit happened. Below 2^32, the bound NIST SP
    /// 800-38D §8.3 sets for random 96-bit IVs; counts only ever over-count
    /// (by at most one reservation block per restart), never under-count.
    pub gcm_invocation_hard_limit: u64,
    pub scheduler_interval: Duration,
    /// `rotation.root_rewrap_batch`: how many key versions the root
    /// re-wrap job (`service::root_rotation`) re-wraps in one step, 1 to
    /// [`MAX_ROOT_REWRAP_BATCH`] (default [`DEFAULT_ROOT_REWRAP_BATCH`]).
    pub root_rewrap_batch: usize,
    /// `rotation.root_rewrap_pause_ms`: pause between two steps of the
    /// re-wrap job while work remains (default
    /// [`DEFAULT_ROOT_REWRAP_PAUSE_MS`]), so that it never starves requests:
    /// at most `root_rewrap_batch` re-wraps per pause. When no work is left
    /// the job checks for a new root every `scheduler_interval`.
    pub root_rewrap_pause: Duration,
}

/// `rotation.root_rewrap_batch` unless configured: with the default pause,
/// 64 versions a second, i.e. 10,000 versions in under 3 minutes, each
/// re-wrap costing a few HSM calls and one synced catalogue write.
pub const DEFAULT_ROOT_REWRAP_BATCH: usize = 64;
/// The largest `rotation.root_rewrap_batch` accepted (one catalogue page).
pub const MAX_ROOT_REWRAP_BATCH: usize = 1000;
/// `rotation.root_rewrap_pause_ms` unless configured.
pub const DEFAULT_ROOT_REWRAP_PAUSE_MS: u64 = 1000;

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub limits: Limits,
    pub hsm: HsmConfig,
    /// `hsm.working_key_cache`: how many working keys (wrapped key versions
    /// unwrapped into the HSM as session objects) are kept, 1 to
    /// [`MAX_WORKING_KEY_CACHE`]; the least recently used is destroyed
    /// beyond that. Bounds the HSM objects kms holds (real HSMs cap them;
    /// design note `hierarchy-and-cluster.md` §1.7 item 9).
    pub working_key_cache: usize,
    /// `hsm.wrapped_versions`: whether new key versions are stored wrapped
    /// under the HSM's root key (`KekHandle::Wrapped`) instead of as token
    /// objects (issue 14). `None` (unset): yes if the token holds a root
    /// (`kms hsm init-root`), else token objects. `Some(true)`: start-up
    /// is refused without a root. `Some(false)`: token objects, though
    /// existing wrapped versions keep working if a root exists. Either
    /// way, versions held as token objects keep working.
    pub wrapped_versions: Option<bool>,
    pub data_dir: PathBuf,
    pub audit: AuditSettings,
    pub rotation: RotationSettings,
    pub auth: AuthSettings,
    /// `[[kubernetes]]`: Kubernetes KMS v2 plugin listeners (Unix sockets),
    /// none unless configured.
    pub kubernetes: Vec<KubernetesListener>,
    /// `[aws_api]`: the AWS KMS JSON API listener (`crate::aws`), none
    /// unless configured.
    pub aws_api: Option<AwsApiConfig>,
    /// `[cluster]`: this node's place in an etcd-backed cluster; `None`
    /// for a single node (catalogue in RocksDB under `data_dir`).
    pub cluster: Option<ClusterConfig>,
    /// `[backup] dir`: the directory (absolute, on the server's host) under
    /// which `Admin.CreateBackup` may write backups; `None` (the default)
    /// refuses CreateBackup. The offline `kms backup create --data-dir`
    /// does not need it.
    pub backup_dir: Option<PathBuf>,
    /// `[lifecycle]`: key-version retirement (the destruction guard).
    pub lifecycle: LifecycleSettings,
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7443";
/// `server.shutdown_grace_ms` unless configured.
pub const DEFAULT_SHUTDOWN_GRACE_MS: u64 = 10_000;
pub const DEFAULT_MAX_PLAINTEXT: usize = 4096;
pub const DEFAULT_MAX_CONTEXT: usize = 8192;
pub const DEFAULT_MAX_BATCH: usize = 1000;
/// `hsm.working_key_cache` unless configured: working keys kept in the HSM.
pub const DEFAULT_WORKING_KEY_CACHE: usize = 1024;
/// The largest `hsm.working_key_cache` accepted (real HSMs hold a few
/// thousand objects at most).
pub const MAX_WORKING_KEY_CACHE: usize = 100_000;
/// Far below 2^32 so that rotation happens with a wide margin.
pub const DEFAULT_GCM_INVOCATION_LIMIT: u64 = 1 << 30;
/// 3 × 2^30: two soft limits' worth of encryptions after rotation is due
/// (time for an operator to mend a failing scheduler), and still 2^30
/// below the NIST SP 800-38D §8.3 bound of 2^32.
pub const DEFAULT_GCM_INVOCATION_HARD_LIMIT: u64 = 3 << 30;
/// The largest hard limit accepted: below 2^32 (NIST SP 800-38D §8.3).
pub const MAX_GCM_INVOCATION_HARD_LIMIT: u64 = (1 << 32) - 1;
// The defaults satisfy the rules `validate` enforces (soft <= hard < 2^32).
const _: () = assert!(
    DEFAULT_GCM_INVOCATION_LIMIT <= DEFAULT_GCM_INVOCATION_HARD_LIMIT
        && DEFAULT_GCM_INVOCATION_HARD_LIMIT <= MAX_GCM_INVOCATION_HARD_LIMIT
);

impl Config {
    /// The settings a reload cannot change (they are read once, at start)
    /// whose value in `new` differs from `self`, by their configuration
    /// names: what a reload should warn about instead of ignoring silently.
    /// Reloadable settings (TLS files, `[auth]`, `server.max_concurrent_requests`,
    /// `limits.per_principal`) are not compared.
    pub fn restart_only_changes(&self, new: &Config) -> Vec<&'static str> {
        // Compared by their Debug rendering, which is never shown: every
        // field type here derives Debug, and none holds a secret (the PIN is
        // a source, not a value).
        macro_rules! changed {
            ($($name:literal => $($field:ident).+),+ $(,)?) => {{
                let mut names = Vec::new();
                $(
                    if format!("{:?}", self.$($field).+) != format!("{:?}", new.$($field).+) {
                        names.push($name);
                    }
                )+
                names
            }};
        }
        changed! {
            "server.listen" => server.listen,
            "server.metrics_listen" => server.metrics_listen,
            "server.request_timeout_ms" => server.request_timeout,
            "server.max_message_bytes" => server.max_message_bytes,
            "server.max_connections" => server.max_connections,
            "server.max_concurrent_streams" => server.max_concurrent_streams,
            "server.shutdown_grace_ms" => server.shutdown_grace,
            "limits.max_plaintext_bytes" => limits.max_plaintext_bytes,
            "limits.max_context_bytes" => limits.max_context_bytes,
            "limits.max_batch_items" => limits.max_batch_items,
            "[hsm]" => hsm,
            "hsm.working_key_cache" => working_key_cache,
            "hsm.wrapped_versions" => wrapped_versions,
            "storage.data_dir" => data_dir,
            "[audit]" => audit,
            "[rotation]" => rotation,
            "[[kubernetes]]" => kubernetes,
            "[aws_api]" => aws_api,
            "[cluster]" => cluster,
            "backup.dir" => backup_dir,
            "[lifecycle]" => lifecycle,
        }
    }

    /// Reads and validates a TOML configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        // toml's Display quotes the offending source line, which could hold a
        // secret someone pasted by mistake: report the message and line only.
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|span| text[..span.start.min(text.len())].lines().count().max(1));
            ConfigError::Parse {
                path: PathBuf::new(),
                message: match line {
                    Some(line) => format!("line {line}: {}", e.message()),
                    None => e.message().to_owned(),
                },
            }
        })?;
        let hsm = raw
            .hsm
            .ok_or_else(|| invalid("hsm", "missing [hsm] section"))?;
        let data_dir = raw
            .storage
            .data_dir
            .ok_or_else(|| invalid("storage.data_dir", "missing"))?;
        let mut config = Config::validate(
            raw.server,
            raw.limits,
            hsm,
            data_dir,
            raw.audit,
            raw.rotation,
            raw.auth,
        )?;
        config.kubernetes = kubernetes::validate(raw.kubernetes)?;
        config.aws_api = aws::validate(raw.aws_api)?;
        config.cluster = cluster::validate(raw.cluster)?;
        // Versions in a shared catalogue must be wrapped blobs: a token
        // object exists only in the HSM of the node that made it (issue 15).
        if config.cluster.is_some() && config.wrapped_versions == Some(false) {
            return Err(invalid(
                "hsm.wrapped_versions",
                "must not be false on a cluster node ([cluster]): every node must be able to use every key version, so versions are blobs wrapped under the root",
            ));
        }
        config.lifecycle = lifecycle::validate(raw.lifecycle)?;
        if let Some(dir) = raw.backup.dir {
            if !dir.is_absolute() {
                return Err(invalid("backup.dir", "must be an absolute path"));
            }
            config.backup_dir = Some(dir);
        }
        Ok(config)
    }

    fn validate(
        server: RawServer,
        limits: RawLimits,
        hsm: RawHsm,
        data_dir: PathBuf,
        audit: RawAudit,
        rotation: RawRotation,
        auth: security::RawAuth,
    ) -> Result<Config, ConfigError> {
        let listen = parse_addr(
            "server.listen",
            server.listen.as_deref().unwrap_or(DEFAULT_LISTEN),
        )?;
        let tls = security::validate_tls(server.tls)?;
        let auth = security::validate_auth(auth, listen, tls.as_ref())?;
        let max_connections = server.max_connections.unwrap_or(4096);
        if !(1..=1_000_000).contains(&max_connections) {
            return Err(invalid("server.max_connections", "must be 1 to 1000000"));
        }
        let max_concurrent_streams = server.max_concurrent_streams.unwrap_or(256);
        if !(1..=10_000).contains(&max_concurrent_streams) {
            return Err(invalid(
                "server.max_concurrent_streams",
                "must be 1 to 10000",
            ));
        }
        let metrics_listen = server
            .metrics_listen
            .as_deref()
            .map(|a| parse_addr("server.metrics_listen", a))
            .transpose()?;
        let request_timeout_ms = server.request_timeout_ms.unwrap_or(10_000);
        if !(1..=600_000).contains(&request_timeout_ms) {
            return Err(invalid("server.request_timeout_ms", "must be 1 to 600000"));
        }
        let shutdown_grace_ms = server
            .shutdown_grace_ms
            .unwrap_or(DEFAULT_SHUTDOWN_GRACE_MS);
        if shutdown_grace_ms > 600_000 {
            return Err(invalid("server.shutdown_grace_ms", "must be 0 to 600000"));
        }
        let max_concurrent_requests = server.max_concurrent_requests.unwrap_or(1024);
        if !(1..=100_000).contains(&max_concurrent_requests) {
            return Err(invalid(
                "server.max_concurrent_requests",
                "must be 1 to 100000",
            ));
        }
        let limits = Limits {
            max_plaintext_bytes: limits.max_plaintext_bytes.unwrap_or(DEFAULT_MAX_PLAINTEXT),
            max_context_bytes: limits.max_context_bytes.unwrap_or(DEFAULT_MAX_CONTEXT),
            max_batch_items: limits.max_batch_items.unwrap_or(DEFAULT_MAX_BATCH),
            per_principal: security::validate_principal_limits(limits.per_principal)?,
        };
        if !(1..=65_536).contains(&limits.max_plaintext_bytes) {
            return Err(invalid("limits.max_plaintext_bytes", "must be 1 to 65536"));
        }
        if !(64..=65_536).contains(&limits.max_context_bytes) {
            return Err(invalid("limits.max_context_bytes", "must be 64 to 65536"));
        }
        if !(1..=10_000).contains(&limits.max_batch_items) {
            return Err(invalid("limits.max_batch_items", "must be 1 to 10000"));
        }
        // A message must fit the largest legitimate batch; default generously above it.
        let needed =
            limits.max_batch_items * (limits.max_plaintext_bytes + 512) + limits.max_context_bytes;
        let max_message_bytes = server.max_message_bytes.unwrap_or(needed.max(4 << 20));
        if max_message_bytes < limits.max_plaintext_bytes + limits.max_context_bytes + 1024 {
            return Err(invalid(
                "server.max_message_bytes",
                "must exceed limits.max_plaintext_bytes + limits.max_context_bytes",
            ));
        }

        let pin = match (hsm.pin_file, hsm.pin_env) {
            (Some(file), None) => PinSource::File(file),
            (None, Some(var)) if !var.is_empty() => PinSource::Env(var),
            (None, None) | (None, Some(_)) => {
                return Err(invalid(
                    "hsm.pin_file",
                    "set exactly one of hsm.pin_file or hsm.pin_env",
                ));
            }
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "hsm.pin_env",
                    "set only one of hsm.pin_file or hsm.pin_env",
                ));
            }
        };
        if hsm.token_label.is_empty() || hsm.token_label.len() > 32 {
            return Err(invalid("hsm.token_label", "must be 1 to 32 bytes"));
        }
        let mut hsm_config = HsmConfig::new(hsm.module, hsm.token_label, pin);
        if let Some(pool) = hsm.pool_size {
            if !(1..=1024).contains(&pool) {
                return Err(invalid("hsm.pool_size", "must be 1 to 1024"));
            }
            hsm_config.pool_size = pool;
        }
        hsm_config.sync_token_dir = hsm.sync_token_dir;
        let working_key_cache = hsm.working_key_cache.unwrap_or(DEFAULT_WORKING_KEY_CACHE);
        if !(1..=MAX_WORKING_KEY_CACHE).contains(&working_key_cache) {
            return Err(invalid("hsm.working_key_cache", "must be 1 to 100000"));
        }

        let audit = AuditSettings {
            sync: audit.sync.unwrap_or(true),
            checkpoint_every_records: audit.checkpoint_every_records.unwrap_or(1000),
            checkpoint_interval: Duration::from_secs(audit.checkpoint_interval_secs.unwrap_or(60)),
            usage_flush_interval: Duration::from_millis(
                audit
                    .usage_flush_interval_ms
                    .unwrap_or(DEFAULT_USAGE_FLUSH_INTERVAL_MS),
            ),
        };
        if !USAGE_FLUSH_INTERVAL_MS_RANGE.contains(
            &audit
                .usage_flush_interval
                .as_millis()
                .try_into()
                .unwrap_or(u64::MAX),
        ) {
            return Err(invalid(
                "audit.usage_flush_interval_ms",
                "must be 100 to 600000",
            ));
        }
        if audit.checkpoint_every_records == 0 {
            return Err(invalid(
                "audit.checkpoint_every_records",
                "must be at least 1",
            ));
        }
        if audit.checkpoint_interval.is_zero() {
            return Err(invalid(
                "audit.checkpoint_interval_secs",
                "must be at least 1",
            ));
        }

        let default_period = match rotation.default_period_days.unwrap_or(0) {
            0 => None,
            days if days <= 3650 => Some(Duration::from_secs(u64::from(days) * 86_400)),
            _ => {
                return Err(invalid(
                    "rotation.default_period_days",
                    "must be 0 (none) to 3650",
                ));
            }
        };
        let gcm_invocation_hard_limit = rotation
            .gcm_invocation_hard_limit
            .unwrap_or(DEFAULT_GCM_INVOCATION_HARD_LIMIT);
        if !(1..=MAX_GCM_INVOCATION_HARD_LIMIT).contains(&gcm_invocation_hard_limit) {
            return Err(invalid(
                "rotation.gcm_invocation_hard_limit",
                "must be 1 to 2^32 - 1 (NIST SP 800-38D)",
            ));
        }
        let gcm_invocation_limit = rotation
            .gcm_invocation_limit
            .unwrap_or_else(|| DEFAULT_GCM_INVOCATION_LIMIT.min(gcm_invocation_hard_limit));
        if gcm_invocation_limit == 0 || gcm_invocation_limit > gcm_invocation_hard_limit {
            return Err(invalid(
                "rotation.gcm_invocation_limit",
                "must be 1 to rotation.gcm_invocation_hard_limit",
            ));
        }
        let scheduler_interval =
            Duration::from_secs(rotation.scheduler_interval_secs.unwrap_or(60));
        if scheduler_interval.is_zero() {
            return Err(invalid(
                "rotation.scheduler_interval_secs",
                "must be at least 1",
            ));
        }

        let root_rewrap_batch = rotation
            .root_rewrap_batch
            .unwrap_or(DEFAULT_ROOT_REWRAP_BATCH);
        if !(1..=MAX_ROOT_REWRAP_BATCH).contains(&root_rewrap_batch) {
            return Err(invalid("rotation.root_rewrap_batch", "must be 1 to 1000"));
        }
        let root_rewrap_pause = Duration::from_millis(
            rotation
                .root_rewrap_pause_ms
                .unwrap_or(DEFAULT_ROOT_REWRAP_PAUSE_MS),
        );
        if root_rewrap_pause > Duration::from_secs(3600) {
            return Err(invalid(
                "rotation.root_rewrap_pause_ms",
                "must be at most 3600000 (one hour)",
            ));
        }

        Ok(Config {
            server: ServerConfig {
                listen,
                metrics_listen,
                request_timeout: Duration::from_millis(request_timeout_ms),
                max_concurrent_requests,
                max_message_bytes,
                max_connections,
                max_concurrent_streams,
                shutdown_grace: Duration::from_millis(shutdown_grace_ms),
                tls,
            },
            limits,
            hsm: hsm_config,
            working_key_cache,
            wrapped_versions: hsm.wrapped_versions,
            data_dir,
            audit,
            rotation: RotationSettings {
                default_period,
                gcm_invocation_limit,
                gcm_invocation_hard_limit,
                scheduler_interval,
                root_rewrap_batch,
                root_rewrap_pause,
            },
            auth,
            kubernetes: Vec::new(),
            aws_api: None,
            cluster: None,
            backup_dir: None,
            lifecycle: LifecycleSettings::default(),
        })
    }
}

fn parse_addr(field: &'static str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse()
        .map_err(|_| invalid(field, format!("{text:?} is not an IP:port address")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[hsm]
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "kms"
pin_file = "/etc/kms/pin"

[storage]
data_dir = "/var/lib/kms"
"#;

    #[test]
    fn minimal_config_gets_safe_defaults() {
        let config = Config::parse(MINIMAL).expect("valid");
        assert_eq!(config.server.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(config.limits.max_plaintext_bytes, 4096);
        assert!(config.audit.sync);
        assert_eq!(config.hsm.pin, PinSource::File("/etc/kms/pin".into()));
        assert!(config.rotation.default_period.is_none());
        assert_eq!(
            config.rotation.gcm_invocation_limit,
            DEFAULT_GCM_INVOCATION_LIMIT
        );
        assert_eq!(
            config.rotation.gcm_invocation_hard_limit,
            DEFAULT_GCM_INVOCATION_HARD_LIMIT
        );
        assert_eq!(config.server.shutdown_grace, Duration::from_secs(10));
    }

    #[test]
    fn backup_dir_is_optional_and_must_be_absolute() {
        assert_eq!(Config::parse(MINIMAL).expect("valid").backup_dir, None);
        let config = Config::parse(&format!(
            "{MINIMAL}\n[backup]\ndir = \"/var/backups/kms\"\n"
        ))
        .expect("valid");
        assert_eq!(config.backup_dir, Some(PathBuf::from("/var/backups/kms")));
        let err = Config::parse(&format!("{MINIMAL}\n[backup]\ndir = \"backups\"\n"))
            .expect_err("relative");
        assert!(err.to_string().contains("backup.dir"), "{err}");
        assert!(Config::parse(&format!("{MINIMAL}\n[backup]\npath = \"/x\"\n")).is_err());
    }

    #[test]
    fn shutdown_grace_and_crl_files_are_read_and_checked() {
        let config = Config::parse(&format!(
            "{MINIMAL}\n[server]\nshutdown_grace_ms = 2500\n{TLS}crl_files = [\"/etc/kms/tls/a.crl\", \"/etc/kms/tls/b.crl\"]\n[auth]\nadmins = [\"ops\"]\n"
        ))
        .expect("valid");
        assert_eq!(config.server.shutdown_grace, Duration::from_millis(2500));
        let tls = config.server.tls.expect("tls");
        assert_eq!(tls.crl_files.len(), 2);
        let cases = [
            (
                format!("{MINIMAL}\n[server]\nshutdown_grace_ms = 600001\n"),
                "server.shutdown_grace_ms",
            ),
            (
                format!(
                    "{MINIMAL}\n[server.tls]\ncert_file = \"a\"\nkey_file = \"b\"\ncrl_files = [\"c\"]\n"
                ),
                "server.tls.crl_files",
            ),
        ];
        for (text, field) in cases {
            let err = Config::parse(&text).expect_err(field);
            assert!(err.to_string().contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn the_example_configuration_in_the_repository_is_valid() {
        let config =
            Config::parse(include_str!("../../../kms.example.toml")).expect("kms.example.toml");
        assert_eq!(config.server.metrics_listen.map(|a| a.port()), Some(9464));
        assert_eq!(config.hsm.pin, PinSource::File("/etc/kms/hsm.pin".into()));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                format!("{MINIMAL}\n[limits]\nmax_plaintext_bytes = 0\n"),
                "limits.max_plaintext_bytes",
            ),
            (
                format!("{MINIMAL}\n[server]\nlisten = \"nowhere\"\n"),
                "server.listen",
            ),
            (
                MINIMAL.replace("pin_file = \"/etc/kms/pin\"", ""),
                "hsm.pin_file",
            ),
            (
                MINIMAL.replace("token_label = \"kms\"", "token_label = \"\""),
                "hsm.token_label",
            ),
            (
                format!("{MINIMAL}\n[rotation]\ngcm_invocation_limit = 0\n"),
                "rotation.gcm_invocation_limit",
            ),
            (
                format!("{MINIMAL}\n[rotation]\ngcm_invocation_hard_limit = 4294967296\n"),
                "rotation.gcm_invocation_hard_limit",
            ),
            (
                format!(
                    "{MINIMAL}\n[rotation]\ngcm_invocation_limit = 11\ngcm_invocation_hard_limit = 10\n"
                ),
                "rotation.gcm_invocation_limit",
            ),
        ];
        for (text, field) in cases {
            let err = Config::parse(&text).expect_err(field);
            assert!(err.to_string().contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn the_version_destruction_quiet_period_is_defaulted_read_and_bounded() {
        let config = Config::parse(MINIMAL).expect("valid");
        assert_eq!(
            config.lifecycle.version_destruction_quiet_period_days,
            DEFAULT_VERSION_DESTRUCTION_QUIET_PERIOD_DAYS
        );
        for days in [0, 1, 3650] {
            let text =
                format!("{MINIMAL}\n[lifecycle]\nversion_destruction_quiet_period_days = {days}\n");
            let config = Config::parse(&text).expect("valid");
            assert_eq!(config.lifecycle.version_destruction_quiet_period_days, days);
        }
        let text =
            format!("{MINIMAL}\n[lifecycle]\nversion_destruction_quiet_period_days = 3651\n");
        let err = Config::parse(&text).expect_err("out of range");
        assert!(
            err.to_string()
                .contains("lifecycle.version_destruction_quiet_period_days"),
            "{err}"
        );
    }

    #[test]
    fn wrapped_versions_is_unset_unless_configured() {
        let config = Config::parse(MINIMAL).expect("valid");
        assert_eq!(config.wrapped_versions, None);
        for (value, expected) in [("true", Some(true)), ("false", Some(false))] {
            let text = MINIMAL.replace(
                "[storage]",
                &format!("wrapped_versions = {value}\n\n[storage]"),
            );
            assert_eq!(
                Config::parse(&text).expect(value).wrapped_versions,
                expected
            );
        }
    }

    #[test]
    fn working_key_cache_is_defaulted_read_and_bounded() {
        let config = Config::parse(MINIMAL).expect("valid");
        assert_eq!(config.working_key_cache, DEFAULT_WORKING_KEY_CACHE);
        let with = |n: &str| {
            MINIMAL.replace(
                "[storage]",
                &format!("working_key_cache = {n}\n\n[storage]"),
            )
        };
        for (n, expected) in [("1", 1), ("250", 250), ("100000", MAX_WORKING_KEY_CACHE)] {
            let config = Config::parse(&with(n)).expect(n);
            assert_eq!(config.working_key_cache, expected);
        }
        for bad in ["0", "100001"] {
            let err = Config::parse(&with(bad)).expect_err(bad);
            assert!(err.to_string().contains("hsm.working_key_cache"), "{err}");
        }
    }

    const TLS: &str = r#"
[server.tls]
cert_file = "/etc/kms/tls/server.pem"
key_file = "/etc/kms/tls/server.key"
client_ca_file = "/etc/kms/tls/clients-ca.pem"
"#;

    #[test]
    fn a_tls_listener_may_face_the_network() {
        let config = Config::parse(&format!(
            "{MINIMAL}\n[server]\nlisten = \"0.0.0.0:7443\"\n{TLS}\n[auth]\nadmins = [\"spiffe://example.org/ops/*\"]\n"
        ))
        .expect("public TLS listener");
        let tls = config.server.tls.expect("tls");
        assert!(tls.client_cert_required, "mTLS is required by default");
        assert_eq!(config.auth.admins, ["spiffe://example.org/ops/*"]);
        assert!(config.auth.anonymous_principal.is_none());
        assert!(config.auth.default_policy.grants.is_empty(), "default deny");
    }

    #[test]
    fn security_settings_are_validated() {
        let digest = "ab".repeat(32);
        let cases = [
            // Anonymous callers only on plaintext loopback.
            (
                format!("{MINIMAL}\n{TLS}\n[auth]\nanonymous_principal = \"dev\"\n"),
                "auth.anonymous_principal",
            ),
            // TLS without client certificates needs tokens.
            (
                format!("{MINIMAL}\n[server.tls]\ncert_file = \"a\"\nkey_file = \"b\"\n"),
                "auth.tokens",
            ),
            // A token is configured by its digest, never in clear.
            (
                format!(
                    "{MINIMAL}\n[[auth.tokens]]\nprincipal = \"job\"\nsha256 = \"kms_plaintext-token\"\n"
                ),
                "auth.tokens.sha256",
            ),
            (
                format!(
                    "{MINIMAL}\n[[auth.tokens]]\nprincipal = \"a\"\nsha256 = \"{digest}\"\n[[auth.tokens]]\nprincipal = \"b\"\nsha256 = \"{digest}\"\n"
                ),
                "auth.tokens.sha256",
            ),
            (
                format!(
                    "{MINIMAL}\n[[auth.default_grants]]\nprincipal = \"*\"\npermissions = [\"encrpyt\"]\n"
                ),
                "auth.default_grants",
            ),
            (
                format!("{MINIMAL}\n[auth]\nadmins = [\"two words\"]\n"),
                "auth.admins",
            ),
            (
                format!("{MINIMAL}\n[limits.per_principal]\nrequests_per_second = 0\n"),
                "limits.per_principal.requests_per_second",
            ),
            (
                format!(
                    "{MINIMAL}\n[server.tls]\ncert_file = \"a\"\nkey_file = \"b\"\nclient_ca_file = \"c\"\nclient_cert = \"sometimes\"\n"
                ),
                "server.tls.client_cert",
            ),
        ];
        for (text, field) in cases {
            let err = Config::parse(&text).expect_err(field);
            assert!(err.to_string().contains(field), "{field}: {err}");
        }
        let ok = Config::parse(&format!(
            "{MINIMAL}\n[[auth.tokens]]\nprincipal = \"job\"\nsha256 = \"{digest}\"\n[limits.per_principal]\nrequests_per_second = 100\nmax_in_flight = 8\n"
        ))
        .expect("tokens on loopback");
        assert_eq!(ok.auth.tokens.len(), 1);
        assert_eq!(ok.limits.per_principal.requests_per_second, Some(100.0));
        assert_eq!(ok.limits.per_principal.burst, 100.0);
        assert_eq!(ok.limits.per_principal.max_in_flight, Some(8));
    }

    #[test]
    fn a_non_loopback_listen_address_is_refused_without_tls() {
        let err = Config::parse(&format!("{MINIMAL}\n[server]\nlisten = \"0.0.0.0:7443\"\n"))
            .expect_err("public address");
        assert!(err.to_string().contains("server.listen"), "{err}");
        assert!(err.to_string().contains("loopback"), "{err}");
        let ok = Config::parse(&format!("{MINIMAL}\n[server]\nlisten = \"[::1]:7443\"\n"))
            .expect("IPv6 loopback");
        assert!(ok.server.listen.ip().is_loopback());
    }

    #[test]
    fn kubernetes_listeners_are_read_with_safe_defaults_and_checked() {
        let config = Config::parse(MINIMAL).expect("valid");
        assert!(config.kubernetes.is_empty());
        let config = Config::parse(&format!(
            "{MINIMAL}\n[[kubernetes]]\nsocket = \"/run/kms/k8s.sock\"\nkey = \"alias/kubernetes\"\n\n[[kubernetes]]\nsocket = \"/run/kms/other.sock\"\nkey = \"alias/other\"\nowner_uid = 0\ngroup_gid = 998\nmode = 0o660\n"
        ))
        .expect("two listeners");
        assert_eq!(
            config.kubernetes,
            [
                KubernetesListener {
                    socket: "/run/kms/k8s.sock".into(),
                    key: "alias/kubernetes".into(),
                    owner_uid: None,
                    group_gid: None,
                    mode: 0o600,
                },
                KubernetesListener {
                    socket: "/run/kms/other.sock".into(),
                    key: "alias/other".into(),
                    owner_uid: Some(0),
                    group_gid: Some(998),
                    mode: 0o660,
                },
            ]
        );
        let entry = |body: &str| format!("{MINIMAL}\n[[kubernetes]]\n{body}\n");
        let long = format!("/{}", "s".repeat(MAX_SOCKET_PATH_BYTES));
        let cases = [
            (
                entry("socket = \"k8s.sock\"\nkey = \"k\""),
                "kubernetes.socket",
            ),
            (
                entry(&format!("socket = \"{long}\"\nkey = \"k\"")),
                "kubernetes.socket",
            ),
            (
                format!(
                    "{}[[kubernetes]]\nsocket = \"/a.sock\"\nkey = \"k2\"\n",
                    entry("socket = \"/a.sock\"\nkey = \"k\"")
                ),
                "kubernetes.socket",
            ),
            (entry("socket = \"/a.sock\"\nkey = \"\""), "kubernetes.key"),
            (
                entry("socket = \"/a.sock\"\nkey = \"k\"\nmode = 0o4755"),
                "kubernetes.mode",
            ),
            (
                entry("socket = \"/a.sock\"\nkey = \"k\"\nowner = 0"),
                "owner",
            ),
            (entry("socket = \"/a.sock\""), "key"),
        ];
        for (text, field) in cases {
            let err = Config::parse(&text).expect_err(field);
            assert!(err.to_string().contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn unknown_fields_are_rejected_with_their_name() {
        let err = Config::parse(&format!("{MINIMAL}\n[server]\nlisten_adress = \"x\"\n"))
            .expect_err("typo");
        assert!(err.to_string().contains("listen_adress"), "{err}");
    }

    #[test]
    fn a_pin_is_never_accepted_inline() {
        let err = Config::parse(&MINIMAL.replace("pin_file = \"/etc/kms/pin\"", "pin = \"1234\""))
            .expect_err("inline PIN");
        assert!(err.to_string().contains("pin"), "{err}");
        assert!(!err.to_string().contains("1234"), "{err}");
    }
}
