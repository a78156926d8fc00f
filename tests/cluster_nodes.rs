//! N `kms serve --config` processes for the cluster tests (design note
//! `hierarchy-and-cluster.md` §2.4): each node is a separate process with
//! its own SoftHSM2 token, its own data directory (its audit log), its own
//! configuration file and a fixed loopback gRPC port, so a restarted node
//! comes back on the same address. Every token holds the SAME test root
//! `kms-root/1` (SO-imported with `kms_hsm::testing::import_test_root`),
//! so a version wrapped on one node unwraps on every other.
//!
//! Separate processes on purpose: inside one process SoftHSM2 object
//! handles and session objects are process-wide, so node B could silently
//! use a working key node A unwrapped and hide a cache bug.
//!
//! With etcd settings, every configuration gets the `[cluster]` section of
//! the issue-15 configuration; without them (`ClusterNodes::new(n, None, …)`)
//! the nodes are N independent single-node servers on the same root, which
//! is what the harness can check before kms has `[cluster]`.
//!
//! Every process started here is killed when `ClusterNodes` is dropped,
//! also when a test panics.

use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kms_hsm::testing::TestToken;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::cluster::{EtcdClientSettings, free_ports};
use crate::kms_binary;

/// The principal every loopback caller of a test node is: an
/// administrator, and granted cryptography on every key by the default
/// policy, so tests need no credentials.
pub const CLUSTER_PRINCIPAL: &str = "cluster-test";

/// The root epoch every node's token holds.
pub const TEST_ROOT_EPOCH: u32 = 1;

/// How long `start` waits for a node's banner and `wait_serving` for SERVING.
const START_WITHIN: Duration = Duration::from_secs(60);

/// One node: token, directory, port, etcd settings and (while running) process.
#[derive(Debug)]
pub struct ClusterNode {
    id: String,
    token: TestToken,
    dir: PathBuf,
    port: u16,
    etcd: Option<EtcdClientSettings>,
    child: Option<Child>,
}

impl ClusterNode {
    /// The node id (`node-1`, …), its `[cluster] node_id`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The node's SoftHSM2 token.
    pub fn token(&self) -> &TestToken {
        &self.token
    }

    /// The node's directory: `kms.toml`, `kms.log`, `data/`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// N kms nodes over one etcd cluster (or none). Dropping it kills them.
#[derive(Debug)]
pub struct ClusterNodes {
    nodes: Vec<ClusterNode>,
    staleness_bound: Duration,
    _dir: tempfile::TempDir,
}

impl ClusterNodes {
    /// Prepares `count` nodes: a fresh token each holding the same random
    /// test root, a data directory, a free port and a configuration file
    /// with `[cluster]` (`etcd` settings, `staleness_bound_ms`) when
    /// `etcd` is given. Starts nothing (`start`, `start_all`).
    pub fn new(
        count: usize,
        etcd: Option<&EtcdClientSettings>,
        staleness_bound: Duration,
    ) -> ClusterNodes {
        let dir = tempfile::Builder::new()
            .prefix("kms-cluster-")
            .tempdir()
            .expect("cluster dir");
        let root_value = random_root_value();
        let ports = free_ports(count);
        let nodes = (0..count)
            .map(|i| {
                let token = TestToken::new();
                kms_hsm::testing::import_test_root(
                    token.module_path(),
                    token.label(),
                    &token.so_pin_source().read().expect("SO PIN"),
                    &token.pin_source().read().expect("user PIN"),
                    TEST_ROOT_EPOCH,
                    &root_value,
                )
                .expect("import the test root");
                let node_dir = dir.path().join(format!("node-{}", i + 1));
                std::fs::create_dir_all(node_dir.join("data")).expect("node dir");
                ClusterNode {
                    id: format!("node-{}", i + 1),
                    token,
                    dir: node_dir,
                    port: ports[i],
                    etcd: etcd.cloned(),
                    child: None,
                }
            })
            .collect();
        std::fs::create_dir_all(dir.path().join("backups")).expect("backup dir");
        let cluster = ClusterNodes {
            nodes,
            staleness_bound,
            _dir: dir,
        };
        for i in 0..count {
            cluster.write_config(i);
        }
        cluster
    }

    /// The number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there is no node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &ClusterNode {
        &self.nodes[i]
    }

    /// Δ, the `staleness_bound_ms` every node is configured with.
    pub fn staleness_bound(&self) -> Duration {
        self.staleness_bound
    }

    /// Node `i`'s gRPC endpoint, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.nodes[i].port)
    }

    /// Node `i`'s gRPC address.
    pub fn addr(&self, i: usize) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.nodes[i].port))
    }

    /// A lazily connecting channel to node `i` (survives its restarts).
    pub fn channel(&self, i: usize) -> Channel {
        Channel::from_shared(self.endpoint(i))
            .expect("endpoint")
            .connect_timeout(Duration::from_secs(2))
            .connect_lazy()
    }

    /// The `[backup] dir` every node is configured with: one directory
    /// all nodes share (they run on this host), so that a cluster backup
    /// under it holds every node's part.
    pub fn backup_dir(&self) -> PathBuf {
        self._dir.path().join("backups")
    }

    /// Node `i`'s data directory (`[storage] data_dir`).
    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.nodes[i].dir.join("data")
    }

    /// Node `i`'s configuration file.
    pub fn config_file(&self, i: usize) -> PathBuf {
        self.nodes[i].dir.join("kms.toml")
    }

    /// Node `i`'s log so far (every start appends).
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.nodes[i].dir.join("kms.log")).unwrap_or_default()
    }

    /// Points node `i` at other etcd settings (e.g. a `TcpProxy`); takes
    /// effect at its next start.
    pub fn set_etcd(&mut self, i: usize, etcd: EtcdClientSettings) {
        self.nodes[i].etcd = Some(etcd);
        self.write_config(i);
    }

    /// Writes node `i`'s `kms.toml` (atomically).
    fn write_config(&self, i: usize) {
        let node = &self.nodes[i];
        let quoted = |p: &Path| format!("{:?}", p.display().to_string());
        let mut text = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nrequest_timeout_ms = 30000\nshutdown_grace_ms = 5000\n\
             \n[auth]\nadmins = [{principal:?}]\nanonymous_principal = {principal:?}\n\
             \n[[auth.default_grants]]\nprincipal = \"*\"\npermissions = [\"encrypt\", \"decrypt\", \"generate-data-key\", \"describe\"]\n\
             \n[hsm]\nmodule = {module}\ntoken_label = {label:?}\npin_file = {pin}\nsync_token_dir = {token_dir}\nwrapped_versions = true\n\
             \n[storage]\ndata_dir = {data}\n\
             \n[backup]\ndir = {backups}\n\
             \n[audit]\ncheckpoint_every_records = 100\ncheckpoint_interval_secs = 2\n",
            port = node.port,
            principal = CLUSTER_PRINCIPAL,
            module = quoted(node.token.module_path()),
            label = node.token.label(),
            pin = quoted(&pin_file(&node.token)),
            token_dir = quoted(node.token.token_dir()),
            data = quoted(&node.dir.join("data")),
            backups = quoted(&self.backup_dir()),
        );
        if let Some(etcd) = &node.etcd {
            text += &format!(
                "\n[cluster]\nnode_id = {id:?}\netcd_endpoints = [{endpoints}]\netcd_prefix = {prefix:?}\nstaleness_bound_ms = {bound}\n",
                id = node.id,
                endpoints = etcd
                    .endpoints
                    .iter()
                    .map(|e| format!("{e:?}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                prefix = crate::cluster::KMS_PREFIX,
                bound = self.staleness_bound.as_millis(),
            );
            if let Some(tls) = &etcd.tls {
                text += &format!(
                    "etcd_ca_file = {}\netcd_cert_file = {}\netcd_key_file = {}\n",
                    quoted(&tls.ca_file),
                    quoted(&tls.cert_file),
                    quoted(&tls.key_file)
                );
            }
            if let Some((user, password_file)) = &etcd.user {
                text += &format!(
                    "etcd_user = {user:?}\netcd_password_file = {}\n",
                    quoted(password_file)
                );
            }
        }
        let temporary = node.dir.join("kms.toml.new");
        std::fs::write(&temporary, text).expect("write kms.toml");
        std::fs::rename(&temporary, self.config_file(i)).expect("replace kms.toml");
    }

    /// Starts node `i` (`kms serve --config`, log appended to `kms.log`)
    /// and waits for its "kms listening on" banner. Panics with the log if
    /// it exits first.
    pub fn start(&mut self, i: usize) {
        let pending = self.spawn(i);
        self.await_banner(i, pending);
    }

    /// Starts every node in `which` at once (none waits for another's
    /// start-up, e.g. so that they all see a pending restore together), then
    /// waits for every banner. Panics as `start`.
    pub fn start_together(&mut self, which: &[usize]) {
        let pending: Vec<_> = which.iter().map(|&i| (i, self.spawn(i))).collect();
        for (i, p) in pending {
            self.await_banner(i, p);
        }
    }

    fn spawn(&mut self, i: usize) -> (Child, std::sync::mpsc::Receiver<String>) {
        assert!(self.nodes[i].child.is_none(), "node {i} already runs");
        let node = &self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join("kms.log"))
            .expect("log file");
        let mut child = Command::new(kms_binary())
            .args(["serve", "--config"])
            .arg(self.config_file(i))
            .env("SOFTHSM2_CONF", node.token.softhsm_conf())
            .env("KMS_LOG", "info,cryptoki::mechanism=off")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn kms serve --config");
        let stdout = child.stdout.take().expect("stdout");
        let (banner_tx, banner_rx) = std::sync::mpsc::channel();
        // Read the banner on a thread, then keep draining stdout so the node
        // never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut reader = std::io::BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = banner_tx.send(line);
            let mut rest = Vec::new();
            let _ = reader.read_to_end(&mut rest);
        });
        (child, banner_rx)
    }

    fn await_banner(
        &mut self,
        i: usize,
        (mut child, banner_rx): (Child, std::sync::mpsc::Receiver<String>),
    ) {
        let banner = banner_rx.recv_timeout(START_WITHIN).unwrap_or_default();
        if !banner.starts_with("kms listening on ") {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "node {i} did not start (banner {banner:?}); log:\n{}",
                self.log(i)
            );
        }
        self.nodes[i].child = Some(child);
    }

    /// Starts every node that is not running.
    pub fn start_all(&mut self) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].child.is_none() {
                self.start(i);
            }
        }
    }

    /// Whether node `i`'s process runs.
    pub fn is_running(&mut self, i: usize) -> bool {
        match self.nodes[i].child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGTERM to node `i` and wait for its graceful exit; its exit status.
    pub fn stop(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        let mut child = self.nodes[i].child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        child.wait().ok()
    }

    /// Sends `signal` (a `kill` name: "STOP", "CONT", ...) to node `i`'s
    /// process; a no-op if it is not running. SIGSTOP freezes a node as a
    /// stalled process would: its etcd lease lives on until its TTL.
    pub fn signal(&self, i: usize, signal: &str) {
        if let Some(child) = self.nodes[i].child.as_ref() {
            let _ = Command::new("kill")
                .args([&format!("-{signal}"), &child.id().to_string()])
                .status();
        }
    }

    /// SIGKILL of node `i`: no shutdown, no flush.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGKILL (if running) and start again on the same token, directory
    /// and port.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.start(i);
    }

    /// Node `i`'s overall gRPC health status (service ""), or `None` when
    /// it does not answer.
    pub async fn health(&self, i: usize) -> Option<ServingStatus> {
        let mut client = HealthClient::new(self.channel(i));
        let reply = tokio::time::timeout(
            Duration::from_secs(2),
            client.check(HealthCheckRequest {
                service: String::new(),
            }),
        )
        .await
        .ok()?
        .ok()?;
        ServingStatus::try_from(reply.into_inner().status).ok()
    }

    /// Polls node `i`'s health until it is `wanted`; the time it took.
    /// Panics with the node's log after `limit`.
    pub async fn wait_health(&self, i: usize, wanted: ServingStatus, limit: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let now = self.health(i).await;
            if now == Some(wanted) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < limit,
                "node {i} is {now:?} after {limit:?}, expected {wanted:?}; log:\n{}",
                self.log(i)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (60 s at most) until node `i` reports SERVING.
    pub async fn wait_serving(&self, i: usize) -> Duration {
        self.wait_health(i, ServingStatus::Serving, START_WITHIN)
            .await
    }

    /// Waits until every node reports SERVING.
    pub async fn wait_all_serving(&self) {
        for i in 0..self.nodes.len() {
            self.wait_serving(i).await;
        }
    }
}

impl Drop for ClusterNodes {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// The user PIN file of a test token (what `[hsm] pin_file` names).
fn pin_file(token: &TestToken) -> PathBuf {
    match token.pin_source() {
        kms_hsm::PinSource::File(path) => path,
        other => panic!("test tokens keep their PIN in a file, not {other}"),
    }
}

/// 32 random bytes for one cluster's test root (from the kernel: no secret
/// worth more than the test that uses it).
fn random_root_value() -> [u8; 32] {
    let mut value = [0u8; 32];
    let mut urandom = std::fs::File::open("/dev/urandom").expect("/dev/urandom");
    urandom.read_exact(&mut value).expect("read /dev/urandom");
    value
}
