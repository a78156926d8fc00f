//! Configuration reload without restart (SIGHUP or `Admin.Reload`).
//!
//! The file the server was started with is read and validated in full, the
//! new TLS configuration is built (every file read, the key checked against
//! the certificate, every CRL parsed), and only then is anything replaced:
//! the TLS configuration for new connections, the bearer tokens and the
//! anonymous principal, the roles and default grants, the admission limits.
//! A reload that fails at any step changes nothing and says why. Reloads are
//! serialized, so two at once cannot interleave their swaps.
//!
//! A reload also looks for a new root key (root rotation, see
//! `service::root_rotation`) and, once it passes its check, wraps new key
//! versions under it; that happens even when the file cannot be reloaded.
//!
//! What is not reloaded (listen addresses, HSM, storage, audit, request
//! limits, rotation) takes effect at the next restart; adding or removing
//! `[server.tls]` is refused, since the listener's kind is fixed at start.
//!
//! Never logs token digests or file contents.

use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;

use super::tls::{self, SharedTls, TlsError};
use crate::auth::Authenticator;
use crate::auth::admission::Admission;
use crate::auth::policy::{AccessControl, Roles};
use crate::auth::tokens::TokenStore;
use crate::config::{Config, ConfigError};
use crate::error::KmsError;
use crate::grpc::WatchRevoke;
use crate::service::{KmsService, Operation, RequestMeta};

/// Why a reload was refused. The running configuration is unchanged.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReloadError {
    /// The server was started without a configuration file (dev mode or
    /// embedded in a test): there is nothing to re-read.
    #[error("the server was started without a configuration file (dev mode): nothing to reload")]
    NoConfigFile,
    /// The file is unreadable or invalid. (Displayed with its causes: this
    /// error is the end of its chain, see [`KmsError::ReloadRefused`].)
    #[error("{}", with_causes(.0))]
    Config(ConfigError),
    /// A TLS file is unusable (displayed with its causes, as above).
    #[error("{}", with_causes(.0))]
    Tls(TlsError),
    /// `[server.tls]` was added or removed: the listener's kind is fixed at
    /// start.
    #[error(
        "server.tls: TLS cannot be turned {} by a reload; restart the server",
        if *.now_configured { "on" } else { "off" }
    )]
    TlsToggled { now_configured: bool },
    /// `auth.admins` would become empty while administrators are in force:
    /// no one could reload over the API again, manage keys or read the
    /// audit log as an administrator. A server may still be started so.
    #[error(
        "auth.admins: the new file names no administrator; a reload would lock every \
         administrator out (restart the server if that is intended)"
    )]
    NoAdministrators,
}

/// `error: cause: cause`. The reason a reload was refused goes to an
/// administrator and the log as one message: the I/O error behind "cannot
/// read FILE" is the useful part.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// What a successful reload put in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadSummary {
    pub config_file: PathBuf,
    pub tls: bool,
    pub crl_count: usize,
    pub token_count: usize,
    pub admin_count: usize,
    /// Settings whose value in the file differs from the running one but
    /// that only a restart puts in force (configuration names, e.g.
    /// `server.listen`, `[hsm]`); see [`Config::restart_only_changes`].
    pub restart_required: Vec<&'static str>,
    /// The root key epoch new versions are wrapped under after the reload
    /// (`None` without wrapped versions); set by [`Reloader::reload_audited`].
    pub active_root_epoch: Option<u32>,
    /// Why a root key newer than the active one was not adopted (it failed
    /// its check by behaviour); `None` when there was none or it was adopted.
    pub root_refused: Option<String>,
}

/// Who asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// `Admin.Reload`: the caller must be an administrator.
    Request,
    /// SIGHUP, from whoever may signal the process.
    Signal,
}

/// Everything a reload replaces, and the file it reads.
#[derive(Debug)]
pub struct Reloader {
    config_file: Option<PathBuf>,
    /// The configuration the server started with: the restart-only
    /// settings in force until the next start.
    started_with: Option<Config>,
    tls: Option<SharedTls>,
    authenticator: Arc<Authenticator>,
    admission: Arc<Admission>,
    access: AccessControl,
    /// Ends open audit streams once credentials and roles changed.
    watch_revoke: WatchRevoke,
    /// Serializes reloads (held while building and swapping).
    serial: Mutex<()>,
}

impl Reloader {
    pub(super) fn new(
        config_file: Option<PathBuf>,
        started_with: Option<Config>,
        tls: Option<SharedTls>,
        authenticator: Arc<Authenticator>,
        admission: Arc<Admission>,
        access: AccessControl,
        watch_revoke: WatchRevoke,
    ) -> Self {
        Reloader {
            config_file,
            started_with,
            tls,
            authenticator,
            admission,
            access,
            watch_revoke,
            serial: Mutex::new(()),
        }
    }

    /// Re-reads the configuration file and swaps in its reloadable settings
    /// (blocking: file I/O). Logs the outcome.
    ///
    /// # Errors
    /// [`ReloadError`] if there is no file, it is invalid, a TLS file cannot
    /// be used, or TLS would be turned on or off; nothing was changed then.
    pub fn reload(&self) -> Result<ReloadSummary, ReloadError> {
        let result = self.try_reload();
        match &result {
            Ok(summary) => {
                tracing::info!(
                    config_file = %summary.config_file.display(),
                    tls = summary.tls,
                    crl_count = summary.crl_count,
                    token_count = summary.token_count,
                    admin_count = summary.admin_count,
                    "configuration reloaded"
                );
                if !summary.restart_required.is_empty() {
                    tracing::warn!(
                        settings = %summary.restart_required.join(", "),
                        "changed settings are not in force until the server restarts"
                    );
                }
            }
            Err(e) => tracing::warn!(
                error = %e,
                "configuration not reloaded; the running configuration is unchanged"
            ),
        }
        result
    }

    fn try_reload(&self) -> Result<ReloadSummary, ReloadError> {
        let _serial = self.serial.lock();
        let path = self.config_file.as_ref().ok_or(ReloadError::NoConfigFile)?;
        // Everything is built before anything is replaced.
        let config = Config::load(path).map_err(ReloadError::Config)?;
        let new_tls = match (&self.tls, &config.server.tls) {
            (Some(_), Some(settings)) => {
                Some(tls::server_config(settings).map_err(ReloadError::Tls)?)
            }
            (None, None) => None,
            (running, configured) => {
                return Err(ReloadError::TlsToggled {
                    now_configured: running.is_none() && configured.is_some(),
                });
            }
        };
        if config.auth.admins.is_empty() && !self.access.roles().admins.is_empty() {
            return Err(ReloadError::NoAdministrators);
        }
        let restart_required = self
            .started_with
            .as_ref()
            .map(|started| started.restart_only_changes(&config))
            .unwrap_or_default();
        let summary = ReloadSummary {
            config_file: path.clone(),
            tls: new_tls.is_some(),
            crl_count: config.server.tls.as_ref().map_or(0, |t| t.crl_files.len()),
            token_count: config.auth.tokens.len(),
            admin_count: config.auth.admins.len(),
            restart_required,
            active_root_epoch: None,
            root_refused: None,
        };
        let Config {
            server,
            limits,
            auth,
            ..
        } = config;
        if let (Some(shared), Some(new_tls)) = (&self.tls, new_tls) {
            shared.replace(new_tls);
        }
        self.authenticator
            .replace(TokenStore::new(auth.tokens), auth.anonymous_principal);
        self.access.replace(Roles {
            admins: auth.admins,
            auditors: auth.auditors,
            default_policy: auth.default_policy,
        });
        self.admission
            .reconfigure(server.max_concurrent_requests, limits.per_principal);
        // Open audit streams were authorized under the old credentials and
        // roles: make their clients reconnect under the new ones.
        self.watch_revoke.revoke();
        Ok(summary)
    }

    /// A reload as an audited operation of `meta`'s principal, recorded in
    /// the audit log whatever its outcome. Over the API
    /// ([`Trigger::Request`]) only administrators may reload; a signal comes
    /// from someone who controls the process and needs no check.
    ///
    /// # Errors
    /// PERMISSION_DENIED for a non-administrator; [`KmsError::ReloadRefused`]
    /// if the reload failed; in a cluster, [`KmsError::RootNotOnEveryNode`]
    /// (FAILED_PRECONDITION, the rest of the configuration reloaded) if this
    /// node's HSM holds a newer root that some registered nodes lack; an
    /// audit failure as for any operation.
    pub fn reload_audited(
        &self,
        service: &KmsService,
        meta: &RequestMeta,
        trigger: Trigger,
    ) -> Result<ReloadSummary, KmsError> {
        service.audited(meta, Operation::Reload, None, |_| {
            if trigger == Trigger::Request {
                service.require_admin(meta, "reload the configuration")?;
            }
            // Root rotation: a root added by `kms hsm rotate-root` becomes
            // active here (after its probe), whatever the file says.
            let mut cluster_refusal = None;
            let root_refused = match service.check_for_new_root(true) {
                Ok(_) => None,
                Err(error) => {
                    tracing::warn!(error = %error.chain(), "reload: no new root key adopted");
                    let text = error.chain().to_string();
                    // Cluster: a root some nodes lack is the operator's to
                    // fix (clone it), said as FAILED_PRECONDITION naming
                    // them, once the rest of the reload is done (issue 15).
                    if matches!(error, KmsError::RootNotOnEveryNode { .. }) {
                        cluster_refusal = Some(error);
                    }
                    Some(text)
                }
            };
            let mut summary = self
                .reload()
                .map_err(|e| KmsError::ReloadRefused(Arc::new(e)))?;
            if let Some(error) = cluster_refusal {
                return Err(error);
            }
            summary.active_root_epoch = service.active_root_epoch();
            summary.root_refused = root_refused;
            Ok(summary)
        })
    }
}

/// Reloads on every SIGHUP until the process ends (Unix only); each reload
/// is audited as the service's own principal.
pub async fn reload_on_sighup(reloader: Arc<Reloader>, service: Arc<KmsService>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(hangups) => hangups,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; use `kms admin reload`");
                return;
            }
        };
        while hangups.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the configuration");
            let reloader = Arc::clone(&reloader);
            let service = Arc::clone(&service);
            let outcome = tokio::task::spawn_blocking(move || {
                reloader.reload_audited(&service, &RequestMeta::internal("sighup"), Trigger::Signal)
            })
            .await;
            if let Ok(Err(e)) = outcome
                && !matches!(e, KmsError::ReloadRefused(_))
            {
                // A refusal was logged by `reload`; anything else (the
                // audit log) is logged here.
                tracing::warn!(error = %e.chain(), "SIGHUP reload failed");
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (reloader, service);
    }
}
