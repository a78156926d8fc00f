//! Shared helpers for the end-to-end tests: a real kms server on
//! 127.0.0.1:<random port>, backed by a fresh SoftHSM2 token and a fresh
//! RocksDB directory, with typed clients; and (`cluster`, `cluster_nodes`)
//! a real etcd cluster, a partitioning TCP proxy and N `kms` node processes
//! sharing one test root.

pub mod cluster;
pub mod cluster_nodes;
pub mod pki;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kms::auth::admission::PrincipalLimits;
use kms::config::{AuditSettings, AuthSettings, Config, Limits, RotationSettings, ServerConfig};
use kms::server::RunningServer;
use kms::service::KmsService;
use kms_hsm::testing::TestToken;
use kms_proto::v1::audit_client::AuditClient;
use kms_proto::v1::crypto_client::CryptoClient;
use kms_proto::v1::key_management_client::KeyManagementClient;
use tonic::transport::Channel;

/// A token and data directory that outlive server restarts.
#[derive(Debug)]
pub struct TestEnv {
    pub token: TestToken,
    pub data: tempfile::TempDir,
}

impl TestEnv {
    pub fn new() -> TestEnv {
        TestEnv {
            token: TestToken::new(),
            data: tempfile::tempdir().expect("temp data dir"),
        }
    }

    pub fn db_dir(&self) -> PathBuf {
        self.data.path().join("db")
    }

    /// The configuration tests run with: loopback, port 0, small limits
    /// where a test needs them, a fast scheduler.
    pub fn config(&self) -> Config {
        Config {
            server: ServerConfig {
                listen: "127.0.0.1:0".parse().expect("addr"),
                metrics_listen: Some("127.0.0.1:0".parse().expect("addr")),
                request_timeout: Duration::from_secs(30),
                max_concurrent_requests: 256,
                max_message_bytes: 8 << 20,
                max_connections: 1024,
                max_concurrent_streams: 256,
                shutdown_grace: Duration::from_secs(10),
                tls: None,
            },
            limits: Limits {
                max_plaintext_bytes: 4096,
                max_context_bytes: 8192,
                max_batch_items: 1000,
                per_principal: PrincipalLimits::default(),
            },
            hsm: self.token.config(4),
            working_key_cache: kms::config::DEFAULT_WORKING_KEY_CACHE,
            wrapped_versions: None,
            data_dir: self.db_dir(),
            audit: AuditSettings {
                sync: true,
                checkpoint_every_records: 50,
                checkpoint_interval: Duration::from_secs(60),
                usage_flush_interval: Duration::from_millis(
                    kms::config::DEFAULT_USAGE_FLUSH_INTERVAL_MS,
                ),
            },
            rotation: RotationSettings {
                default_period: None,
                gcm_invocation_limit: kms::config::DEFAULT_GCM_INVOCATION_LIMIT,
                gcm_invocation_hard_limit: kms::config::DEFAULT_GCM_INVOCATION_HARD_LIMIT,
                scheduler_interval: Duration::from_secs(3600),
                root_rewrap_batch: kms::config::DEFAULT_ROOT_REWRAP_BATCH,
                root_rewrap_pause: Duration::from_millis(kms::config::DEFAULT_ROOT_REWRAP_PAUSE_MS),
            },
            auth: AuthSettings::local_development("anonymous"),
            kubernetes: Vec::new(),
            aws_api: None,
            cluster: None,
            backup_dir: None,
            lifecycle: kms::config::LifecycleSettings::default(),
        }
    }

    /// Opens the service (blocking work on a blocking thread) and starts a server.
    pub async fn start(&self) -> TestServer {
        self.start_with(self.config()).await
    }

    pub async fn start_with(&self, config: Config) -> TestServer {
        let open = config.clone();
        let service = tokio::task::spawn_blocking(move || KmsService::open(&open))
            .await
            .expect("join")
            .expect("open service");
        let server = kms::server::start(&config, Arc::new(service))
            .await
            .expect("start server");
        let tls = config.server.tls.is_some();
        let scheme = if tls { "https" } else { "http" };
        let endpoint = format!("{scheme}://{}", server.addr);
        let builder = Channel::from_shared(endpoint.clone()).expect("endpoint");
        // A TLS server needs per-test client credentials (see e2e::authz);
        // this default channel is then never used, so do not dial it.
        let channel = if tls {
            builder.connect_lazy()
        } else {
            builder.connect().await.expect("connect")
        };
        TestServer {
            server: Some(server),
            endpoint,
            channel,
        }
    }

    pub fn token_dir(&self) -> &Path {
        self.token.token_dir()
    }
}

impl Default for TestEnv {
    fn default() -> Self {
        TestEnv::new()
    }
}

/// A running server and a channel to it.
#[derive(Debug)]
pub struct TestServer {
    server: Option<RunningServer>,
    pub endpoint: String,
    pub channel: Channel,
}

impl TestServer {
    pub fn keys(&self) -> KeyManagementClient<Channel> {
        KeyManagementClient::new(self.channel.clone())
    }

    pub fn crypto(&self) -> CryptoClient<Channel> {
        CryptoClient::new(self.channel.clone())
    }

    pub fn audit(&self) -> AuditClient<Channel> {
        AuditClient::new(self.channel.clone())
    }

    pub fn service(&self) -> &Arc<KmsService> {
        self.server.as_ref().expect("running").service()
    }

    pub fn metrics_addr(&self) -> std::net::SocketAddr {
        self.server
            .as_ref()
            .and_then(|s| s.metrics_addr)
            .expect("metrics address")
    }

    /// Where the AWS KMS API listens (`[aws_api]` configured).
    pub fn aws_addr(&self) -> std::net::SocketAddr {
        self.server
            .as_ref()
            .and_then(|s| s.aws_addr)
            .expect("AWS KMS API address")
    }

    /// Stops the server and waits until the service (and its audit log and
    /// database) is closed, so the same directories can be reopened.
    pub async fn stop(mut self) {
        let server = self.server.take().expect("running");
        let service = Arc::clone(server.service());
        server.shutdown().await.expect("shutdown");
        drop(self.channel);
        // In-flight handler tasks may still hold the service briefly.
        let mut service = Some(service);
        for _ in 0..500 {
            match Arc::try_unwrap(service.take().expect("service")) {
                Ok(service) => {
                    tokio::task::spawn_blocking(move || drop(service))
                        .await
                        .expect("close service");
                    return;
                }
                Err(still_shared) => {
                    service = Some(still_shared);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        panic!("the service is still referenced after shutdown");
    }
}

/// The `kms` binary of this build (built by `cargo build/nextest --workspace`),
/// next to the test executable's `deps/` directory.
pub fn kms_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let binary = dir.join("kms");
    assert!(
        binary.is_file(),
        "{} not found: build the workspace first (cargo build --workspace)",
        binary.display()
    );
    binary
}

/// A `kms serve --dev` child process on 127.0.0.1 with a random port.
#[derive(Debug)]
pub struct DevServerProcess {
    pub child: std::process::Child,
    pub addr: std::net::SocketAddr,
    pub banner: String,
    stdout_rest: Option<std::thread::JoinHandle<Vec<u8>>>,
}

impl DevServerProcess {
    /// Starts `kms serve --dev` on `data_dir` and waits for its
    /// "kms listening on ADDR (…)" line.
    pub fn start(data_dir: &Path) -> DevServerProcess {
        Self::spawn(
            data_dir,
            "127.0.0.1:0",
            "warn",
            std::process::Stdio::inherit(),
        )
    }

    /// Like `start`, listening on `listen` (e.g. the same address again after
    /// a restart, so that a client can reconnect).
    pub fn start_at(data_dir: &Path, listen: std::net::SocketAddr) -> DevServerProcess {
        Self::spawn(
            data_dir,
            &listen.to_string(),
            "warn",
            std::process::Stdio::inherit(),
        )
    }

    /// Like `start`, with log filter `log` and the server's stderr (its log)
    /// written to `log_file`.
    pub fn start_logged(data_dir: &Path, log: &str, log_file: &Path) -> DevServerProcess {
        let file = std::fs::File::create(log_file).expect("log file");
        Self::spawn(
            data_dir,
            "127.0.0.1:0",
            log,
            std::process::Stdio::from(file),
        )
    }

    /// Like `start_logged`, with `--aws-api-listen 127.0.0.1:0` (dev mode's
    /// access key in `<data_dir>/aws-credentials`); [`Self::aws_endpoint`]
    /// is its address.
    pub fn start_logged_with_aws_api(
        data_dir: &Path,
        log: &str,
        log_file: &Path,
    ) -> DevServerProcess {
        let file = std::fs::File::create(log_file).expect("log file");
        Self::spawn_with(
            data_dir,
            "127.0.0.1:0",
            log,
            std::process::Stdio::from(file),
            &["--aws-api-listen", "127.0.0.1:0"],
        )
    }

    /// The AWS KMS API's URL the banner names (`http://ADDR`), if any.
    pub fn aws_endpoint(&self) -> Option<String> {
        self.banner
            .split("AWS KMS API on ")
            .nth(1)
            .and_then(|rest| rest.split([',', ')']).next())
            .map(str::to_owned)
    }

    /// Everything the server printed on stdout after its banner (read until
    /// it exits: call after `terminate`).
    pub fn take_stdout_rest(&mut self) -> Vec<u8> {
        self.stdout_rest
            .take()
            .map(|reader| reader.join().expect("stdout reader"))
            .unwrap_or_default()
    }

    /// SIGTERM, then wait for the graceful exit.
    pub fn terminate(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }

    fn spawn(
        data_dir: &Path,
        listen: &str,
        log: &str,
        stderr: std::process::Stdio,
    ) -> DevServerProcess {
        Self::spawn_with(data_dir, listen, log, stderr, &[])
    }

    fn spawn_with(
        data_dir: &Path,
        listen: &str,
        log: &str,
        stderr: std::process::Stdio,
        extra_args: &[&str],
    ) -> DevServerProcess {
        use std::io::{BufRead, Read};
        let mut child = std::process::Command::new(kms_binary())
            .args(["serve", "--dev", "--listen", listen])
            .args(extra_args)
            .arg("--data-dir")
            .arg(data_dir)
            .env("KMS_LOG", log)
            .stdout(std::process::Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn kms serve --dev");
        let stdout = child.stdout.take().expect("stdout");
        let mut reader = std::io::BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line).expect("read banner");
        // Keep draining stdout so the server never blocks on a full pipe.
        let stdout_rest = std::thread::spawn(move || {
            let mut rest = Vec::new();
            let _ = reader.read_to_end(&mut rest);
            rest
        });
        let addr = line
            .strip_prefix("kms listening on ")
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| {
                let _ = child.kill();
                panic!("unexpected first line from kms serve: {line:?}")
            });
        DevServerProcess {
            child,
            addr,
            banner: line.trim_end().to_owned(),
            stdout_rest: Some(stdout_rest),
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// SIGKILL: no shutdown, no flush, no final checkpoint.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for DevServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the `kms` CLI against `endpoint` with `args`, feeding `stdin`.
/// Returns (success, stdout, stderr).
pub fn run_cli(endpoint: &str, args: &[&str], stdin: &[u8]) -> (bool, Vec<u8>, String) {
    use std::io::Write;
    let mut child = std::process::Command::new(kms_binary())
        .arg("--endpoint")
        .arg(endpoint)
        .args(args)
        .env("KMS_LOG", "warn")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn kms");
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin).expect("write stdin");
    }
    let output = child.wait_with_output().expect("kms output");
    (
        output.status.success(),
        output.stdout,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The labels of every secret-key token object of the SoftHSM2 token
/// `label`, as another process sees them: `pkcs11-tool` (OpenSC) logs in on
/// a PKCS#11 session of its own, so the session objects of any kms process
/// are invisible to it and only what is stored in the token counts.
/// `softhsm_conf` is the SoftHSM2 configuration to use (`None`: this
/// process's `SOFTHSM2_CONF`). Sorted.
pub fn token_object_labels(
    softhsm_conf: Option<&Path>,
    module: &Path,
    label: &str,
    pin_file: &Path,
) -> Vec<String> {
    let pin = std::fs::read_to_string(pin_file).expect("read PIN file");
    let mut command = std::process::Command::new("pkcs11-tool");
    command
        .arg("--module")
        .arg(module)
        .args(["--token-label", label, "--login", "--pin", pin.trim()])
        .args(["--list-objects", "--type", "secrkey"]);
    if let Some(conf) = softhsm_conf {
        command.env("SOFTHSM2_CONF", conf);
    }
    let output = command
        .output()
        .expect("run pkcs11-tool (apt-get install opensc)");
    assert!(
        output.status.success(),
        "pkcs11-tool failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let objects = stdout
        .lines()
        .filter(|line| line.starts_with("Secret Key Object"))
        .count();
    let mut labels: Vec<String> = stdout
        .lines()
        .filter_map(|line| line.trim().strip_prefix("label:"))
        .map(|l| l.trim().to_owned())
        .collect();
    assert_eq!(labels.len(), objects, "every object has a label: {stdout}");
    labels.sort();
    labels
}

/// `token_object_labels` of the dev-mode token under `data_dir`
/// (`kms serve --dev --data-dir`).
pub fn dev_token_object_labels(data_dir: &Path) -> Vec<String> {
    token_object_labels(
        Some(&data_dir.join("softhsm").join("softhsm2.conf")),
        &kms_hsm::softhsm2_module_path(),
        kms::dev::DEV_TOKEN_LABEL,
        &data_dir.join("softhsm").join("user.pin"),
    )
}
