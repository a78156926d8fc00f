//! The gRPC server: KeyManagement, Crypto and Audit, plus grpc.health.v1 and
//! server reflection (v1 and v1alpha, so grpcurl and other generic clients
//! discover the API); TLS/mTLS, authentication and admission limits
//! (`grpc::auth_layer`); limits on connections, streams, message size and
//! request time; the background scheduler; the metrics endpoint; and the
//! Kubernetes KMS v2 plugin sockets of `[[kubernetes]]` entries
//! ([`kubernetes`]) and the AWS KMS API listener of `[aws_api]`
//! (`crate::aws`), which share the drain, admission limits and shutdown.
//! Configuration reload ([`reload`]) and graceful shutdown with a deadline
//! ([`RunningServer::serve_until`]).

pub(crate) mod drain;
pub mod health;
pub(crate) mod incoming;
pub mod kubernetes;
pub mod reload;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kms_proto::kubernetes_v2::key_management_service_server::KeyManagementServiceServer;
use kms_proto::v1::admin_server::AdminServer;

use kms_proto::v1::audit_server::AuditServer;
use kms_proto::v1::crypto_server::CryptoServer;
use kms_proto::v1::key_management_server::KeyManagementServer;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::auth::Authenticator;
use crate::auth::admission::Admission;
use crate::auth::tokens::TokenStore;
use crate::config::Config;
use crate::grpc::auth_layer::AuthLayer;
use crate::grpc::{AdminApi, AuditApi, CryptoApi, KeyManagementApi, KubernetesApi, PeerCredLayer};
use crate::metrics::{Metrics, MetricsLayer};
use crate::service::{KmsService, scheduler};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr} ({setting})")]
    Bind {
        /// The configuration setting that names the address.
        setting: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot build the reflection service: {0}")]
    Reflection(String),
    #[error("the gRPC server failed")]
    Transport(#[from] tonic::transport::Error),
    #[error("the server task failed")]
    Task,
    #[error("cannot start the health probe thread")]
    HealthThread(#[source] std::io::Error),
    #[error("cannot start the root re-wrap thread")]
    RootRewrapThread(#[source] std::io::Error),
    #[error("cannot serve the Kubernetes plugin socket (kubernetes.socket)")]
    Kubernetes(#[source] kubernetes::SocketError),
    #[error("cannot load the AWS KMS API access keys (aws_api.credentials)")]
    AwsCredentials(#[source] crate::aws::credentials::CredentialError),
}

/// After the grace period, how long a shutdown still waits for blocking
/// work (HSM and database calls, which are short) to release the service.
const LAST_REFERENCE_MARGIN: Duration = Duration::from_millis(250);

/// A running server. Drop or call `shutdown` to stop it.
#[derive(Debug)]
pub struct RunningServer {
    pub addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    /// Where the AWS KMS API (`[aws_api]`) listens, if configured.
    pub aws_addr: Option<SocketAddr>,
    service: Arc<KmsService>,
    reloader: Arc<reload::Reloader>,
    drain: drain::Drain,
    /// How long requests in flight may take once shutdown begins.
    grace: Duration,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>>,
    metrics_task: Option<tokio::task::JoinHandle<()>>,
    sighup_task: Option<tokio::task::JoinHandle<()>>,
    background_stop: Arc<AtomicBool>,
    scheduler: Option<std::thread::JoinHandle<()>>,
    health: Option<std::thread::JoinHandle<()>>,
    /// Root rotation's re-wrap job (`service::root_rotation`); none without a root.
    root_rewrap: Option<std::thread::JoinHandle<()>>,
}

impl RunningServer {
    pub fn service(&self) -> &Arc<KmsService> {
        &self.service
    }

    /// What reloads this server's configuration (SIGHUP, `Admin.Reload`).
    pub fn reloader(&self) -> &Arc<reload::Reloader> {
        &self.reloader
    }

    /// From now on, SIGHUP reloads the configuration (the process's own
    /// signal: call once, from the `kms serve` process only).
    pub fn reload_on_sighup(&mut self) {
        if self.sighup_task.is_none() {
            self.sighup_task = Some(tokio::spawn(reload::reload_on_sighup(
                Arc::clone(&self.reloader),
                Arc::clone(&self.service),
            )));
        }
    }

    /// Shuts down as on SIGTERM (see [`RunningServer::serve_until`]).
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
        match self.task.take() {
            Some(task) => self.drain_and_stop(task).await,
            None => {
                self.stop_background();
                Ok(())
            }
        }
    }

    /// Serves until `signal` completes or the server fails. On the signal:
    /// stops accepting connections, answers new requests on open
    /// connections UNAVAILABLE, lets the requests in flight finish for up
    /// to the configured grace period (`server.shutdown_grace_ms`), then
    /// closes every connection that is still open (idle keep-alive
    /// connections included), stops the background threads and returns; the
    /// audit log is flushed when the service is dropped.
    pub async fn serve_until(
        mut self,
        signal: impl std::future::Future<Output = ()>,
    ) -> Result<(), ServerError> {
        let Some(mut task) = self.task.take() else {
            return Ok(());
        };
        tokio::select! {
            result = &mut task => {
                self.stop_background();
                result.map_err(|_| ServerError::Task)?.map_err(ServerError::from)
            }
            () = signal => {
                // One deadline for the whole shutdown: the grace period
                // bounds the drain *and* the wait for work to release the
                // service (plus a short margin for blocking threads), so the
                // process exits within it even when a connection that never
                // sent a request keeps a connection task alive.
                let deadline = tokio::time::Instant::now() + self.grace;
                let result = self.drain_and_stop(task).await;
                let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
                self.wait_for_last_reference(remaining.max(LAST_REFERENCE_MARGIN))
                    .await;
                result
            }
        }
    }

    async fn drain_and_stop(
        &mut self,
        mut task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    ) -> Result<(), ServerError> {
        tracing::info!(
            grace_ms = self.grace.as_millis(),
            "shutting down: no new connections, finishing requests in flight"
        );
        self.drain.start();
        // Tonic stops accepting, sends GOAWAY and waits for every connection
        // to close; that wait is what the grace period bounds.
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let result = match tokio::time::timeout(self.grace, &mut task).await {
            Ok(joined) => joined
                .map_err(|_| ServerError::Task)?
                .map_err(ServerError::from),
            Err(_) => {
                tracing::warn!(
                    grace_ms = self.grace.as_millis(),
                    "grace period over: closing the connections still open"
                );
                task.abort();
                // Aborting drops every connection and the calls on them.
                let _ = task.await;
                Ok(())
            }
        };
        self.stop_background();
        result
    }

    /// Waits (at most `limit`) until this server holds the last reference
    /// to the service, so that dropping it closes the database and flushes
    /// the audit log. Work handed to blocking threads holds the service
    /// until it ends: HSM and database calls, which are short.
    async fn wait_for_last_reference(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while Arc::strong_count(&self.service) > 1 {
            if tokio::time::Instant::now() >= deadline {
                // Every acknowledged request's audit record is durable
                // already (synced before its reply); what is skipped is
                // the final checkpoint (as after a crash, which `kms audit
                // verify` handles).
                tracing::warn!(
                    "connections or work still hold the service at the shutdown deadline; exiting without the final audit checkpoint (every acknowledged record is durable already)"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the scheduler and health threads and waits for them: they hold
    /// the service, so until they have stopped the database and audit log
    /// stay open. (A process that exits with them still running races
    /// RocksDB's static destructors.)
    fn stop_background(&mut self) {
        self.background_stop.store(true, Ordering::Release);
        for task in [self.metrics_task.take(), self.sighup_task.take()]
            .into_iter()
            .flatten()
        {
            task.abort();
        }
        for thread in [
            self.scheduler.take(),
            self.health.take(),
            self.root_rewrap.take(),
        ]
        .into_iter()
        .flatten()
        {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        // Prompt: the scheduler is woken, and a pass in progress is short.
        self.stop_background();
    }
}

/// Binds the listeners and starts serving, without a configuration file to
/// reload (dev mode, tests). Port 0 picks a free port; the chosen address is
/// in `RunningServer::addr`.
pub async fn start(
    config: &Config,
    service: Arc<KmsService>,
) -> Result<RunningServer, ServerError> {
    start_with(config, service, None).await
}

/// Like [`start`]; `config_file` is what a reload re-reads (the file
/// `config` came from).
pub async fn start_with(
    config: &Config,
    service: Arc<KmsService>,
    config_file: Option<PathBuf>,
) -> Result<RunningServer, ServerError> {
    // TLS files are read first: a bad one stops the start before anything
    // listens.
    let shared_tls = match &config.server.tls {
        Some(settings) => Some(tls::SharedTls::new(tls::server_config(settings)?)),
        None => None,
    };
    let listener = TcpListener::bind(config.server.listen)
        .await
        .map_err(|source| ServerError::Bind {
            setting: "server.listen",
            addr: config.server.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServerError::Bind {
        setting: "server.listen",
        addr: config.server.listen,
        source,
    })?;

    // The Kubernetes plugin sockets, before anything that holds the service
    // starts: an occupied path stops the start with nothing left running.
    let plugin_sockets = config
        .kubernetes
        .iter()
        .map(kubernetes::bind)
        .collect::<Result<Vec<_>, _>>()
        .map_err(ServerError::Kubernetes)?;

    // The AWS KMS API: its secrets, TLS files and port, before anything
    // that holds the service starts.
    let aws_listener = match &config.aws_api {
        Some(settings) => {
            let credentials = crate::aws::AwsCredentials::load(&settings.credentials)
                .map_err(ServerError::AwsCredentials)?;
            let aws_tls = match &settings.tls {
                Some(tls_settings) => Some(tls::SharedTls::new(tls::server_config(tls_settings)?)),
                None => None,
            };
            let listener =
                TcpListener::bind(settings.listen)
                    .await
                    .map_err(|source| ServerError::Bind {
                        setting: "aws_api.listen",
                        addr: settings.listen,
                        source,
                    })?;
            let aws_addr = listener.local_addr().map_err(|source| ServerError::Bind {
                setting: "aws_api.listen",
                addr: settings.listen,
                source,
            })?;
            Some((settings, credentials, aws_tls, listener, aws_addr))
        }
        None => None,
    };
    let aws_addr = aws_listener.as_ref().map(|(_, _, _, _, addr)| *addr);

    let metrics = Arc::new(Metrics::new());
    let (metrics_addr, metrics_task) = match config.server.metrics_listen {
        Some(metrics_listen) => {
            let metrics_listener =
                TcpListener::bind(metrics_listen)
                    .await
                    .map_err(|source| ServerError::Bind {
                        setting: "server.metrics_listen",
                        addr: metrics_listen,
                        source,
                    })?;
            let metrics_addr =
                metrics_listener
                    .local_addr()
                    .map_err(|source| ServerError::Bind {
                        setting: "server.metrics_listen",
                        addr: metrics_listen,
                        source,
                    })?;
            let task = tokio::spawn(crate::metrics::serve(
                metrics_listener,
                Arc::clone(&metrics),
                Arc::clone(&service),
            ));
            (Some(metrics_addr), Some(task))
        }
        None => (None, None),
    };

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let first_probe = health::report_first(&health_reporter, &service).await;

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(kms_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServerError::Reflection(e.to_string()))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(kms_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| ServerError::Reflection(e.to_string()))?;

    let max_message = config.server.max_message_bytes;
    let key_management = KeyManagementServer::new(KeyManagementApi::new(Arc::clone(&service)))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let crypto = CryptoServer::new(CryptoApi::new(Arc::clone(&service)))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let audit_api = AuditApi::new(Arc::clone(&service));
    // Audit followers' streams would hold a graceful shutdown open forever.
    let watch_stop = audit_api.watch_stop();
    let watch_revoke = audit_api.watch_revoke();
    let audit = AuditServer::new(audit_api)
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);

    let authenticator = Arc::new(Authenticator::new(
        TokenStore::new(config.auth.tokens.clone()),
        config.auth.anonymous_principal.clone(),
    ));
    let admission = Arc::new(Admission::new(
        config.server.max_concurrent_requests,
        config.limits.per_principal,
    ));

    let reloader = Arc::new(reload::Reloader::new(
        config_file,
        Some(config.clone()),
        shared_tls.clone(),
        Arc::clone(&authenticator),
        Arc::clone(&admission),
        service.access().clone(),
        watch_revoke,
    ));
    let admin = AdminServer::new(AdminApi::new(Arc::clone(&service), Arc::clone(&reloader)))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let drain = drain::Drain::default();

    let builder = tonic::transport::Server::builder()
        .timeout(config.server.request_timeout)
        .max_concurrent_streams(Some(config.server.max_concurrent_streams))
        // Bounded headers; dead peers are noticed and their streams freed.
        .http2_max_header_list_size(Some(16 * 1024))
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)));

    // The Kubernetes plugin servers: each stops when the main listener
    // does, and removes its socket file as it ends.
    let plugin_stop = Arc::new(tokio::sync::watch::channel(false).0);
    let mut plugin_servers = Vec::with_capacity(config.kubernetes.len());
    for (entry, (listener, socket)) in config.kubernetes.iter().zip(plugin_sockets) {
        let listener = tokio::net::UnixListener::from_std(listener).map_err(|source| {
            ServerError::Kubernetes(kubernetes::SocketError::Io {
                action: "listen on",
                path: entry.socket.clone(),
                source,
            })
        })?;
        let api =
            KeyManagementServiceServer::new(KubernetesApi::new(Arc::clone(&service), &entry.key))
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message);
        let router = tonic::transport::Server::builder()
            .timeout(config.server.request_timeout)
            .max_concurrent_streams(Some(config.server.max_concurrent_streams))
            .http2_max_header_list_size(Some(16 * 1024))
            .layer(drain.clone())
            .layer(PeerCredLayer::new(Arc::clone(&admission)))
            .add_service(api);
        let mut stop = plugin_stop.subscribe();
        tracing::info!(
            socket = %socket.path().display(),
            key = %entry.key,
            "serving the Kubernetes KMS v2 plugin API"
        );
        plugin_servers.push(async move {
            let result = router
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::UnixListenerStream::new(listener),
                    async move {
                        let _ = stop.wait_for(|stopped| *stopped).await;
                    },
                )
                .await;
            drop(socket);
            result
        });
    }

    // The AWS KMS API server: stops with the plugin servers.
    let aws_server = aws_listener.map(|(settings, credentials, aws_tls, listener, aws_addr)| {
        let api = Arc::new(crate::aws::AwsApi::new(
            Arc::clone(&service),
            settings,
            credentials,
            Arc::clone(&admission),
            drain.clone(),
            max_message,
            config.server.request_timeout,
        ));
        tracing::info!(
            address = %crate::aws::describe(aws_addr, aws_tls.is_some()),
            region = %settings.region,
            "serving the AWS KMS API"
        );
        let incoming = incoming::limited_incoming(listener, config.server.max_connections, aws_tls);
        crate::aws::serve(api, incoming, plugin_stop.subscribe())
    });

    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let mut builder = builder
        .layer(incoming::PeerLayer)
        .layer(drain.clone())
        .layer(MetricsLayer::new(Arc::clone(&metrics)))
        .layer(AuthLayer::new(authenticator, admission));
    let router = builder
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(key_management)
        .add_service(crypto)
        .add_service(audit)
        .add_service(admin);
    let stop_plugins = Arc::clone(&plugin_stop);
    let main = router.serve_with_incoming_shutdown(
        incoming::limited_incoming(listener, config.server.max_connections, shared_tls),
        async move {
            let _ = shutdown_rx.await;
            watch_stop.stop();
            let _ = stop_plugins.send(true);
        },
    );
    let task = tokio::spawn(async move {
        // Aborting this task (the grace period is over) drops the set, which
        // aborts the plugin servers too (and their socket files go).
        let mut plugins = tokio::task::JoinSet::new();
        for server in plugin_servers {
            plugins.spawn(server);
        }
        if let Some(aws_server) = aws_server {
            plugins.spawn(async move {
                aws_server.await;
                Ok(())
            });
        }
        let result = main.await;
        // However the main listener ended, the plugin sockets follow it.
        let _ = plugin_stop.send(true);
        while let Some(joined) = plugins.join_next().await {
            if let Ok(Err(e)) = joined {
                tracing::error!(error = %e, "a Kubernetes plugin listener failed");
            }
        }
        result
    });

    // Stops the scheduler and the health probe (see `stop_background`).
    let background_stop = Arc::new(AtomicBool::new(false));
    let scheduler = scheduler::spawn(
        Arc::clone(&service),
        config.rotation.scheduler_interval,
        Arc::clone(&background_stop),
    );

    let mut running = RunningServer {
        addr,
        metrics_addr,
        aws_addr,
        service: Arc::clone(&service),
        reloader,
        drain,
        grace: config.server.shutdown_grace,
        shutdown: Some(shutdown_tx),
        task: Some(task),
        metrics_task,
        sighup_task: None,
        background_stop: Arc::clone(&background_stop),
        scheduler: Some(scheduler),
        health: None,
        root_rewrap: None,
    };
    running.root_rewrap = crate::service::root_rotation::spawn(
        Arc::clone(&service),
        crate::service::root_rotation::RewrapPace {
            batch: config.rotation.root_rewrap_batch,
            pause: config.rotation.root_rewrap_pause,
            check_interval: config.rotation.scheduler_interval,
        },
        Arc::clone(&background_stop),
    )
    .map_err(ServerError::RootRewrapThread)?;
    // If the thread cannot start, dropping `running` stops everything else.
    running.health = Some(
        health::spawn(
            health_reporter,
            service,
            first_probe,
            health::PROBE_INTERVAL,
            background_stop,
            tokio::runtime::Handle::current(),
        )
        .map_err(ServerError::HealthThread)?,
    );
    Ok(running)
}
