//! A `kms serve --config FILE` child process on its own SoftHSM2 token, for
//! the tests of what only a configured server does: reload the file
//! (SIGHUP, `Admin.Reload`) and shut down on SIGTERM. The configuration is
//! written from [`Settings`], so a test can change it and reload.

use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kms_tests::kms_binary;
use kms_tests::pki::CertFiles;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

pub(crate) const ADMIN: &str = "spiffe://example.org/ops/admin";

/// TLS files of `[server.tls]`.
#[derive(Debug, Clone)]
pub(crate) struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    pub crl_files: Vec<PathBuf>,
}

/// What the configuration file says.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub tls: Option<TlsFiles>,
    pub admins: Vec<String>,
    /// (principal, token) pairs; the file gets their SHA-256.
    pub tokens: Vec<(String, String)>,
    /// Plaintext loopback only.
    pub anonymous_principal: Option<String>,
    pub shutdown_grace_ms: u64,
    pub request_timeout_ms: u64,
    pub max_concurrent_requests: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            tls: None,
            admins: vec![ADMIN.to_owned()],
            tokens: Vec::new(),
            anonymous_principal: None,
            shutdown_grace_ms: 10_000,
            request_timeout_ms: 30_000,
            max_concurrent_requests: 256,
        }
    }
}

/// A deployment directory: token, PIN, database, configuration file, log.
pub(crate) struct Deployment {
    pub dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Deployment {
    /// A fresh directory with an initialized SoftHSM2 token.
    pub fn new() -> Deployment {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().to_owned();
        std::fs::create_dir_all(dir.join("tokens")).expect("tokens dir");
        std::fs::write(
            dir.join("softhsm2.conf"),
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                dir.join("tokens").display()
            ),
        )
        .expect("softhsm2.conf");
        std::fs::write(dir.join("hsm.pin"), "user-pin-4321").expect("pin");
        std::fs::write(dir.join("so.pin"), "so-pin-8765").expect("so pin");
        let status = Command::new(kms_binary())
            .args(["hsm", "init-token", "--module"])
            .arg(kms_hsm::softhsm2_module_path())
            .args(["--label", "kms-e2e", "--pin-file"])
            .arg(dir.join("hsm.pin"))
            .arg("--so-pin-file")
            .arg(dir.join("so.pin"))
            .env("SOFTHSM2_CONF", dir.join("softhsm2.conf"))
            .env("KMS_LOG", "warn,cryptoki::mechanism=off")
            .stderr(Stdio::null())
            .status()
            .expect("kms hsm init-token");
        assert!(status.success(), "kms hsm init-token failed");
        Deployment { dir, _tmp: tmp }
    }

    pub fn config_file(&self) -> PathBuf {
        self.dir.join("kms.toml")
    }

    pub fn log_file(&self) -> PathBuf {
        self.dir.join("kms.log")
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_file()).unwrap_or_default()
    }

    /// Writes the configuration file (atomically: a reload never reads half).
    pub fn write_config(&self, settings: &Settings) {
        let mut text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace_ms = {}\nrequest_timeout_ms = {}\nmax_concurrent_requests = {}\n",
            settings.shutdown_grace_ms,
            settings.request_timeout_ms,
            settings.max_concurrent_requests
        );
        if let Some(tls) = &settings.tls {
            text += &format!(
                "\n[server.tls]\ncert_file = {:?}\nkey_file = {:?}\nclient_ca_file = {:?}\nclient_cert = \"optional\"\ncrl_files = [{}]\n",
                tls.cert.display().to_string(),
                tls.key.display().to_string(),
                tls.client_ca.display().to_string(),
                tls.crl_files
                    .iter()
                    .map(|p| format!("{:?}", p.display().to_string()))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        text += &format!(
            "\n[auth]\nadmins = [{}]\n",
            settings
                .admins
                .iter()
                .map(|a| format!("{a:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        if let Some(anonymous) = &settings.anonymous_principal {
            text += &format!("anonymous_principal = {anonymous:?}\n");
        }
        for (principal, token) in &settings.tokens {
            text += &format!(
                "\n[[auth.tokens]]\nprincipal = {principal:?}\nsha256 = \"{}\"\n",
                hex::encode(kms::auth::tokens::token_digest(token.as_bytes()))
            );
        }
        text += "\n[[auth.default_grants]]\nprincipal = \"*\"\npermissions = [\"encrypt\", \"decrypt\", \"generate-data-key\", \"describe\"]\n";
        text += &format!(
            "\n[hsm]\nmodule = {:?}\ntoken_label = \"kms-e2e\"\npin_file = {:?}\nsync_token_dir = {:?}\n\n[storage]\ndata_dir = {:?}\n",
            kms_hsm::softhsm2_module_path().display().to_string(),
            self.dir.join("hsm.pin").display().to_string(),
            self.dir.join("tokens").display().to_string(),
            self.dir.join("db").display().to_string(),
        );
        let temporary = self.dir.join("kms.toml.new");
        std::fs::write(&temporary, text).expect("write config");
        std::fs::rename(&temporary, self.config_file()).expect("replace config");
    }

    /// Starts `kms serve --config` and waits for its banner. The log
    /// (level `info`) is appended to [`Deployment::log_file`].
    pub fn start(&self) -> ServerProcess {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_file())
            .expect("log file");
        let mut child = Command::new(kms_binary())
            .args(["serve", "--config"])
            .arg(self.config_file())
            .env("SOFTHSM2_CONF", self.dir.join("softhsm2.conf"))
            .env("KMS_LOG", "info,cryptoki::mechanism=off")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("kms serve --config");
        let mut reader = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut banner = String::new();
        reader.read_line(&mut banner).expect("banner");
        std::thread::spawn(move || {
            let mut rest = Vec::new();
            let _ = reader.read_to_end(&mut rest);
        });
        let addr = banner
            .strip_prefix("kms listening on ")
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| {
                let _ = child.kill();
                panic!("unexpected banner {banner:?}; log:\n{}", self.log())
            });
        ServerProcess { child, addr }
    }
}

/// A running `kms serve --config`; killed if still running when dropped.
pub(crate) struct ServerProcess {
    pub child: Child,
    pub addr: std::net::SocketAddr,
}

impl ServerProcess {
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{name}");
    }

    /// Waits up to `limit` for the process to exit; its exit status, or
    /// None if it is still running.
    pub fn wait_for_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn plain_endpoint(&self) -> Endpoint {
        Endpoint::from_shared(format!("http://{}", self.addr)).expect("endpoint")
    }

    /// An endpoint trusting the CAs in `trusted` (PEM files), presenting
    /// `client` if given.
    pub fn tls_endpoint(&self, trusted: &[&Path], client: Option<&CertFiles>) -> Endpoint {
        let mut tls = ClientTlsConfig::new().domain_name("localhost");
        for ca in trusted {
            tls = tls.ca_certificate(Certificate::from_pem(std::fs::read(ca).expect("ca")));
        }
        if let Some(client) = client {
            tls = tls.identity(Identity::from_pem(
                std::fs::read(&client.cert).expect("cert"),
                std::fs::read(&client.key).expect("key"),
            ));
        }
        Endpoint::from_shared(format!("https://{}", self.addr))
            .expect("endpoint")
            .tls_config(tls)
            .expect("tls config")
            .connect_timeout(Duration::from_secs(10))
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A request with a bearer token.
pub(crate) fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    request
}

/// Connects a fresh channel (a new TCP and TLS connection).
pub(crate) async fn connect(endpoint: &Endpoint) -> Result<Channel, tonic::transport::Error> {
    endpoint.connect().await
}
