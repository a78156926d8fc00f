//! The embedded default (`kms serve --dev`): everything under one local data
//! directory, created on first run and reused afterwards.
//!
//! ```text
//! <data_dir>/softhsm/softhsm2.conf   SoftHSM2 configuration (token directory below)
//! <data_dir>/softhsm/tokens/         the SoftHSM2 token "kms-dev"
//! <data_dir>/softhsm/user.pin        random user PIN, mode 0600
//! <data_dir>/softhsm/so.pin          random security-officer PIN, mode 0600
//!                                    (also creates the root key kms-root/1)
//! <data_dir>/db/                     RocksDB: key catalogue and audit log
//! <data_dir>/aws-credentials         with --aws-api-listen: the dev principal's AWS
//!                                    access key (shared-credentials format, 0600)
//! ```
//!
//! Dev mode listens on loopback only. The PINs are random and stay in 0600
//! files; they are never printed.

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use kms_hsm::{HsmConfig, Pin, PinSource};

use crate::config::{
    AuditSettings, AuthSettings, AwsApiConfig, AwsCredentialConfig, Config, KubernetesListener,
    Limits, RotationSettings, ServerConfig,
};
use crate::error::KmsError;
use crate::service::{CreateKeyInput, KmsService, RequestMeta};

/// Label of the dev-mode SoftHSM2 token.
pub const DEV_TOKEN_LABEL: &str = "kms-dev";

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("dev mode listens on loopback only; {0} is not a loopback address")]
    NotLoopback(SocketAddr),
    #[error("cannot prepare {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up the SoftHSM2 token")]
    Hsm(#[from] kms_hsm::HsmError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DevError + '_ {
    move |source| DevError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Paths of the dev layout under `data_dir`.
#[derive(Debug, Clone)]
pub struct DevLayout {
    pub data_dir: PathBuf,
    pub softhsm_dir: PathBuf,
    pub tokens_dir: PathBuf,
    pub softhsm_conf: PathBuf,
    pub user_pin: PathBuf,
    pub so_pin: PathBuf,
    pub db_dir: PathBuf,
}

impl DevLayout {
    pub fn new(data_dir: &Path) -> DevLayout {
        let softhsm_dir = data_dir.join("softhsm");
        let softhsm = kms_hsm::softhsm::SoftHsmHome::new(&softhsm_dir);
        DevLayout {
            data_dir: data_dir.to_owned(),
            tokens_dir: softhsm.tokens_dir(),
            softhsm_conf: softhsm.conf_path(),
            user_pin: softhsm_dir.join("user.pin"),
            so_pin: softhsm_dir.join("so.pin"),
            db_dir: data_dir.join("db"),
            softhsm_dir,
        }
    }
}

/// Creates the directories, configuration and PIN files if missing and
/// points SoftHSM2 at them. Must run before any other thread exists (it sets
/// `SOFTHSM2_CONF` in the process environment, which SoftHSM2 reads at
/// C_Initialize). Returns the layout; `initialize_dev_token` follows.
pub fn prepare_environment(data_dir: &Path) -> Result<DevLayout, DevError> {
    let data_dir: PathBuf = if data_dir.is_absolute() {
        data_dir.to_owned()
    } else {
        std::env::current_dir()
            .map_err(io(data_dir))?
            .join(data_dir)
    }
    // Drops "." components: messages show /work/.kms-data, not /work/./.kms-data.
    .components()
    .collect();
    let layout = DevLayout::new(&data_dir);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&layout.data_dir)
        .map_err(io(&layout.data_dir))?;
    let softhsm = kms_hsm::softhsm::SoftHsmHome::new(&layout.softhsm_dir);
    softhsm.create("`kms serve --dev`")?;
    for pin_file in [&layout.user_pin, &layout.so_pin] {
        if !pin_file.exists() {
            write_new_pin(pin_file)?;
        }
    }
    softhsm.use_config()?;
    Ok(layout)
}

fn write_new_pin(path: &Path) -> Result<(), DevError> {
    use ring::rand::SecureRandom;
    let mut bytes = zeroize::Zeroizing::new([0u8; 16]);
    ring::rand::SystemRandom::new()
        .fill(bytes.as_mut())
        .map_err(|_| DevError::Io {
            path: path.to_owned(),
            source: std::io::Error::other("system random generator failed"),
        })?;
    let pin = zeroize::Zeroizing::new(hex::encode(bytes.as_ref()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    file.write_all(pin.as_bytes()).map_err(io(path))?;
    file.sync_all().map_err(io(path))
}

/// Initializes the dev token on first run (a no-op afterwards).
/// Returns true when the token was created now.
pub fn initialize_dev_token(layout: &DevLayout, module: &Path) -> Result<bool, DevError> {
    if kms_hsm::token_exists(module, DEV_TOKEN_LABEL)? {
        return Ok(false);
    }
    let so = PinSource::File(layout.so_pin.clone()).read()?;
    let user = PinSource::File(layout.user_pin.clone()).read()?;
    kms_hsm::initialize_token(module, DEV_TOKEN_LABEL, &so, &user)?;
    drop::<(Pin, Pin)>((so, user));
    Ok(true)
}

/// The root key epoch dev mode creates on first run.
pub const DEV_ROOT_EPOCH: u32 = 1;

/// Creates the dev token's root key (epoch [`DEV_ROOT_EPOCH`], variant T:
/// trusted, created by the security officer with the PIN from `so.pin`) if
/// it does not exist yet, so that new key versions are stored wrapped
/// (issue 14). Must run before the service opens the token in this process:
/// PKCS#11 allows one user type logged in per application, and this logs in
/// as the security officer (then out again). Returns true when the root was
/// created now; a token that holds any root already is left alone.
///
/// # Errors
/// `Hsm` if the SO PIN file cannot be read or the ceremony fails.
pub fn ensure_dev_root(layout: &DevLayout, module: &Path) -> Result<bool, DevError> {
    let so = PinSource::File(layout.so_pin.clone()).read()?;
    let spec = kms_hsm::RootSpec::for_softhsm(DEV_ROOT_EPOCH, kms_hsm::RootVariant::Trusted);
    // Only the first root: once any exists (epoch 1, or later ones after a
    // root rotation destroyed epoch 1), dev mode leaves the roots alone.
    match kms_hsm::init_root(module, DEV_TOKEN_LABEL, &so, &spec) {
        Ok(()) => Ok(true),
        Err(kms_hsm::HsmError::ObjectExists { .. } | kms_hsm::HsmError::RootExists { .. }) => {
            Ok(false)
        }
        Err(e) => Err(DevError::Hsm(e)),
    }
}

/// The principal of dev-mode callers (no credentials on loopback).
pub const DEV_PRINCIPAL: &str = "dev";

/// The configuration dev mode runs with.
pub fn dev_config(
    layout: &DevLayout,
    module: &Path,
    listen: SocketAddr,
) -> Result<Config, DevError> {
    if !listen.ip().is_loopback() {
        return Err(DevError::NotLoopback(listen));
    }
    let mut hsm = HsmConfig::new(
        module,
        DEV_TOKEN_LABEL,
        PinSource::File(layout.user_pin.clone()),
    );
    hsm.sync_token_dir = Some(layout.tokens_dir.clone());
    let limits = Limits {
        max_plaintext_bytes: crate::config::DEFAULT_MAX_PLAINTEXT,
        max_context_bytes: crate::config::DEFAULT_MAX_CONTEXT,
        max_batch_items: crate::config::DEFAULT_MAX_BATCH,
        per_principal: crate::auth::admission::PrincipalLimits::default(),
    };
    Ok(Config {
        server: ServerConfig {
            listen,
            metrics_listen: None,
            request_timeout: std::time::Duration::from_secs(10),
            max_concurrent_requests: 1024,
            max_message_bytes: 8 << 20,
            max_connections: 1024,
            max_concurrent_streams: 256,
            shutdown_grace: std::time::Duration::from_millis(
                crate::config::DEFAULT_SHUTDOWN_GRACE_MS,
            ),
            tls: None,
        },
        limits,
        hsm,
        working_key_cache: crate::config::DEFAULT_WORKING_KEY_CACHE,
        wrapped_versions: Some(true),
        data_dir: layout.db_dir.clone(),
        audit: AuditSettings {
            sync: true,
            checkpoint_every_records: 1000,
            checkpoint_interval: std::time::Duration::from_secs(60),
            usage_flush_interval: std::time::Duration::from_millis(
                crate::config::DEFAULT_USAGE_FLUSH_INTERVAL_MS,
            ),
        },
        rotation: RotationSettings {
            default_period: None,
            gcm_invocation_limit: crate::config::DEFAULT_GCM_INVOCATION_LIMIT,
            gcm_invocation_hard_limit: crate::config::DEFAULT_GCM_INVOCATION_HARD_LIMIT,
            scheduler_interval: std::time::Duration::from_secs(60),
            root_rewrap_batch: crate::config::DEFAULT_ROOT_REWRAP_BATCH,
            root_rewrap_pause: std::time::Duration::from_millis(
                crate::config::DEFAULT_ROOT_REWRAP_PAUSE_MS,
            ),
        },
        // Loopback only (checked above), so the local user is trusted.
        auth: AuthSettings::local_development(DEV_PRINCIPAL),
        // `--kubernetes-socket` adds one ([`kubernetes_listener`]).
        kubernetes: Vec::new(),
        // `--aws-api-listen` adds one ([`aws_api_config`]).
        aws_api: None,
        cluster: None,
        // Dev mode has no configuration file to name one: CreateBackup is
        // refused; `kms backup create --data-dir` works on a stopped server.
        backup_dir: None,
        lifecycle: crate::config::LifecycleSettings::default(),
    })
}

/// The key dev mode's Kubernetes plugin socket serves (created on first use
/// by [`ensure_kubernetes_key`]).
pub const DEV_KUBERNETES_KEY: &str = "alias/kubernetes";

/// The plugin listener of `kms serve --dev --kubernetes-socket PATH`: the key
/// [`DEV_KUBERNETES_KEY`], the socket mode 0600, owned by whoever runs kms.
pub fn kubernetes_listener(socket: &Path) -> KubernetesListener {
    KubernetesListener {
        socket: socket.to_owned(),
        key: DEV_KUBERNETES_KEY.to_owned(),
        owner_uid: None,
        group_gid: None,
        mode: crate::config::DEFAULT_SOCKET_MODE,
    }
}

/// Creates the key [`DEV_KUBERNETES_KEY`] names, if the alias does not exist
/// yet, as the dev principal (an administrator; audited as CreateKey).
/// Blocking. Returns true when the key was created now.
///
/// # Errors
/// The catalogue cannot be read, or the key cannot be created (the HSM).
pub fn ensure_kubernetes_key(service: &KmsService) -> Result<bool, KmsError> {
    match service.resolve(DEV_KUBERNETES_KEY) {
        Ok(_) => return Ok(false),
        Err(KmsError::KeyNotFound { .. }) => {}
        Err(e) => return Err(e),
    }
    let meta = RequestMeta {
        principal: DEV_PRINCIPAL.to_owned(),
        ..RequestMeta::internal("dev-kubernetes-key")
    };
    service.create_key(
        &meta,
        CreateKeyInput {
            description: "Kubernetes KMS v2 plugin key (kms serve --dev --kubernetes-socket)"
                .to_owned(),
            tags: Default::default(),
            aliases: vec![DEV_KUBERNETES_KEY.to_owned()],
            rotation_period: None,
            origin: kms_storage::KeyOrigin::Kms,
        },
    )?;
    Ok(true)
}

/// The AWS shared-credentials file of `kms serve --dev --aws-api-listen`.
pub fn aws_credentials_path(layout: &DevLayout) -> PathBuf {
    layout.data_dir.join("aws-credentials")
}

/// The `[aws_api]` of `kms serve --dev --aws-api-listen ADDR`: loopback
/// only, region and account the defaults, one access key mapped to
/// [`DEV_PRINCIPAL`], generated on first use into
/// [`aws_credentials_path`] (mode 0600, AWS shared-credentials format, so
/// `AWS_SHARED_CREDENTIALS_FILE` can point clients at it).
///
/// # Errors
/// [`DevError::NotLoopback`]; [`DevError::Io`] if the file cannot be
/// created or read.
pub fn aws_api_config(layout: &DevLayout, listen: SocketAddr) -> Result<AwsApiConfig, DevError> {
    if !listen.ip().is_loopback() {
        return Err(DevError::NotLoopback(listen));
    }
    let path = aws_credentials_path(layout);
    let access_key_id =
        crate::aws::credentials::ensure_dev_credentials(&path).map_err(io(&path))?;
    Ok(AwsApiConfig {
        listen,
        tls: None,
        region: crate::config::DEFAULT_AWS_REGION.to_owned(),
        account_id: crate::config::DEFAULT_AWS_ACCOUNT_ID.to_owned(),
        credentials: vec![AwsCredentialConfig {
            access_key_id,
            secret_file: path,
            principal: DEV_PRINCIPAL.to_owned(),
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dev_aws_api_is_loopback_only_and_maps_its_generated_key_to_the_dev_principal() {
        let dir = std::env::temp_dir().join(format!("kms-dev-aws-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let layout = DevLayout::new(&dir);
        let public: SocketAddr = "0.0.0.0:4599".parse().expect("addr");
        assert!(matches!(
            aws_api_config(&layout, public),
            Err(DevError::NotLoopback(_))
        ));
        assert!(!aws_credentials_path(&layout).exists());
        let config = aws_api_config(&layout, "127.0.0.1:0".parse().expect("addr")).expect("dev");
        assert_eq!(config.credentials.len(), 1);
        assert_eq!(config.credentials[0].principal, DEV_PRINCIPAL);
        assert_eq!(
            config.credentials[0].secret_file,
            aws_credentials_path(&layout)
        );
        // The same key on the next start.
        let again = aws_api_config(&layout, "127.0.0.1:0".parse().expect("addr")).expect("dev");
        assert_eq!(
            again.credentials[0].access_key_id,
            config.credentials[0].access_key_id
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
