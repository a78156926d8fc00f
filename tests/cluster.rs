//! A real etcd cluster for the cluster tests (design note
//! `hierarchy-and-cluster.md` §2.4): N `etcd` processes (Debian's
//! `etcd-server`, 3.4) on 127.0.0.1 random ports with their data on
//! `/dev/shm`, optionally with client TLS, client-certificate auth and an
//! etcd role limited to kms's prefix; fault injection by SIGKILL,
//! SIGSTOP/SIGCONT and compaction; and a small TCP proxy to cut one kms
//! node off from etcd.
//!
//! Every process started here is killed when its owner is dropped, also
//! when a test panics. A test process killed outright (a nextest timeout)
//! cannot run `Drop`: the next harness start removes the data directories
//! of harness processes that are gone and kills the etcd members still
//! running in them (found by their `--data-dir`, never by name).
//!
//! What it must never do: touch an etcd it did not start (the Debian
//! package's service on 2379 included), or use the default ports.

use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::pki::TestCa;

/// How long `start`/`restart` wait for members to report healthy.
const HEALTHY_WITHIN: Duration = Duration::from_secs(30);
/// etcdctl's per-command deadline: an unreachable member fails fast.
const ETCDCTL_TIMEOUT: &str = "--command-timeout=3s";
/// etcdctl's dial deadline.
const ETCDCTL_DIAL_TIMEOUT: &str = "--dial-timeout=2s";
/// The data directory prefix (under /dev/shm), followed by the test process id.
const DIR_PREFIX: &str = "kms-etcd-";
/// The etcd prefix kms uses by default (the common cluster configuration).
pub const KMS_PREFIX: &str = "/kms/v1/";
/// The etcd user (and role) the TLS variant gives kms.
pub const KMS_ETCD_USER: &str = "kms";

/// The `etcd` binary (Debian `etcd-server`; `KMS_ETCD` overrides).
pub fn etcd_binary() -> PathBuf {
    std::env::var_os("KMS_ETCD").map_or_else(|| PathBuf::from("etcd"), PathBuf::from)
}

/// The `etcdctl` binary (Debian `etcd-client`; `KMS_ETCDCTL` overrides).
pub fn etcdctl_binary() -> PathBuf {
    std::env::var_os("KMS_ETCDCTL").map_or_else(|| PathBuf::from("etcdctl"), PathBuf::from)
}

/// Free TCP ports on 127.0.0.1: bound to port 0 together, then released.
/// Another process may take one before it is used; `EtcdCluster::start`
/// retries when a member cannot bind.
pub fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<StdTcpListener> = (0..count)
        .map(|_| StdTcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

/// What a kms node (or etcdctl) needs to reach the cluster: the
/// `[cluster]` settings of the common configuration.
#[derive(Debug, Clone)]
pub struct EtcdClientSettings {
    /// `http://127.0.0.1:PORT` or `https://…` client URLs.
    pub endpoints: Vec<String>,
    /// Client TLS files, for https endpoints.
    pub tls: Option<EtcdClientTls>,
    /// The etcd user and its password file (mode 0600).
    pub user: Option<(String, PathBuf)>,
}

/// PEM files of the TLS variant, as the kms configuration names them.
#[derive(Debug, Clone)]
pub struct EtcdClientTls {
    /// `etcd_ca_file`: the CA that signed the members' certificates.
    pub ca_file: PathBuf,
    /// `etcd_cert_file`: the client certificate (CN = `kms`).
    pub cert_file: PathBuf,
    /// `etcd_key_file`: its private key.
    pub key_file: PathBuf,
}

/// The TLS variant's files: a CA, one certificate for every member
/// (server and client usage), the kms client certificate, and the
/// passwords of `root` and `kms`.
#[derive(Debug)]
struct TlsFiles {
    ca_file: PathBuf,
    member_cert: PathBuf,
    member_key: PathBuf,
    client: EtcdClientTls,
    root_password: String,
    kms_password_file: PathBuf,
}

/// One member: its name, ports, data directory and (while running) process.
#[derive(Debug)]
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log_file: PathBuf,
    child: Option<Child>,
    stopped: bool,
}

/// N real etcd members on loopback. Dropping it kills every member.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Member>,
    token: String,
    tls: Option<TlsFiles>,
    dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `members` etcd processes (plain HTTP) and waits until every
    /// one reports healthy. Panics (after killing what it started) if they
    /// do not within 30 s.
    pub fn start(members: usize) -> EtcdCluster {
        Self::start_with(members, false)
    }

    /// As `start`, with client TLS (`https://` client URLs, a CA and
    /// certificates from rcgen), `--client-cert-auth`, and etcd auth enabled:
    /// user `root` (harness only) and user `kms` whose role `kms` may read
    /// and write only keys under [`KMS_PREFIX`]. `client_settings()` then
    /// names the kms user's certificate and password file.
    pub fn start_tls(members: usize) -> EtcdCluster {
        let cluster = Self::start_with(members, true);
        cluster.enable_auth();
        cluster
    }

    /// Starts `members` NEW etcd processes (plain HTTP) whose data
    /// directories are restored from `snapshot` (an etcd snapshot, e.g. a
    /// cluster backup's `etcd/snapshot.db`) by
    /// `scripts/etcd-snapshot-restore.sh`, the operators' script, under a
    /// new cluster token; waits until every one is healthy. Panics if the
    /// script or a member fails.
    pub fn start_from_snapshot(count: usize, snapshot: &Path) -> EtcdCluster {
        assert!(count > 0, "an etcd cluster needs a member");
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/etcd-snapshot-restore.sh");
        let mut last_failure = String::new();
        for _attempt in 0..3 {
            let mut cluster = Self::prepare(count, false);
            let members: Vec<String> = (0..count)
                .map(|i| format!("{}={}", cluster.members[i].name, cluster.peer_url(i)))
                .collect();
            let output = Command::new("bash")
                .arg(&script)
                .arg(snapshot)
                .arg(cluster.dir.path())
                .arg(&cluster.token)
                .args(&members)
                .env("KMS_ETCDCTL", etcdctl_binary())
                .output()
                .expect("run scripts/etcd-snapshot-restore.sh");
            assert!(
                output.status.success(),
                "etcd-snapshot-restore.sh failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            for i in 0..count {
                assert!(cluster.members[i].data_dir.is_dir(), "no restored data dir");
                cluster.spawn(i);
            }
            match cluster.wait_all_healthy(HEALTHY_WITHIN) {
                Ok(()) => return cluster,
                Err(failure) => last_failure = failure,
            }
        }
        panic!("restored etcd cluster did not start: {last_failure}");
    }

    fn start_with(count: usize, tls: bool) -> EtcdCluster {
        assert!(count > 0, "an etcd cluster needs a member");
        remove_stale_dirs();
        let mut last_failure = String::new();
        for _attempt in 0..3 {
            let mut cluster = Self::prepare(count, tls);
            for i in 0..count {
                cluster.spawn(i);
            }
            match cluster.wait_all_healthy(HEALTHY_WITHIN) {
                Ok(()) => return cluster,
                // A port taken between `free_ports` and etcd's bind: new ports.
                Err(failure) => last_failure = failure,
            }
        }
        panic!("etcd cluster did not start: {last_failure}");
    }

    fn prepare(count: usize, tls: bool) -> EtcdCluster {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{}-", std::process::id()))
            .tempdir_in(base)
            .expect("etcd temp dir");
        let ports = free_ports(2 * count);
        let members = (0..count)
            .map(|i| Member {
                name: format!("n{}", i + 1),
                client_port: ports[2 * i],
                peer_port: ports[2 * i + 1],
                data_dir: dir.path().join(format!("n{}.etcd", i + 1)),
                log_file: dir.path().join(format!("n{}.log", i + 1)),
                child: None,
                stopped: false,
            })
            .collect();
        let tls = tls.then(|| make_tls_files(dir.path()));
        EtcdCluster {
            members,
            token: random_token(),
            tls,
            dir,
        }
    }

    fn client_url(&self, i: usize) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.members[i].client_port)
    }

    fn peer_url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[i].peer_port)
    }

    fn spawn(&mut self, i: usize) {
        let initial_cluster = (0..self.members.len())
            .map(|j| format!("{}={}", self.members[j].name, self.peer_url(j)))
            .collect::<Vec<_>>()
            .join(",");
        let client_url = self.client_url(i);
        let peer_url = self.peer_url(i);
        let member = &self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&member.log_file)
            .expect("etcd log file");
        let mut command = Command::new(etcd_binary());
        command
            .arg("--name")
            .arg(&member.name)
            .arg("--data-dir")
            .arg(&member.data_dir)
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token])
            // Default heartbeat (100 ms) and election (1 s) timeouts on
            // purpose: shorter ones cause spurious elections on a loaded
            // 2-core box (design note §2.4).
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log file")))
            .stderr(Stdio::from(log));
        if let Some(tls) = &self.tls {
            command
                .arg("--trusted-ca-file")
                .arg(&tls.ca_file)
                .arg("--cert-file")
                .arg(&tls.member_cert)
                .arg("--key-file")
                .arg(&tls.member_key)
                .arg("--client-cert-auth");
        }
        let child = command
            .spawn()
            .expect("spawn etcd (apt-get install etcd-server; scripts/setup.sh)");
        let member = &mut self.members[i];
        member.child = Some(child);
        member.stopped = false;
    }

    /// Waits until every running member answers `endpoint health`.
    fn wait_all_healthy(&mut self, limit: Duration) -> Result<(), String> {
        let started = Instant::now();
        let running: Vec<usize> = (0..self.members.len())
            .filter(|&i| self.members[i].child.is_some())
            .collect();
        for i in running {
            loop {
                if let Some(child) = self.members[i].child.as_mut()
                    && let Ok(Some(status)) = child.try_wait()
                {
                    self.members[i].child = None;
                    return Err(format!(
                        "member {} exited ({status}): {}",
                        self.members[i].name,
                        self.log(i)
                    ));
                }
                if self
                    .etcdctl(&[self.client_url(i)], &["endpoint", "health"])
                    .0
                {
                    break;
                }
                if started.elapsed() > limit {
                    return Err(format!(
                        "member {} not healthy after {limit:?}: {}",
                        self.members[i].name,
                        self.log(i)
                    ));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    /// The log of member `i` so far (for failure messages).
    pub fn log(&self, i: usize) -> String {
        let text = std::fs::read_to_string(&self.members[i].log_file).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// The number of members (running or not).
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the cluster has no member (never: `start` needs one).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Every member's client URL, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len())
            .map(|i| self.client_url(i))
            .collect()
    }

    /// Member `i`'s client URL.
    pub fn endpoint(&self, i: usize) -> String {
        self.client_url(i)
    }

    /// Member `i`'s client address (for a `TcpProxy` in front of it).
    pub fn client_addr(&self, i: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.members[i].client_port))
    }

    /// What kms needs to reach every member: the endpoints and, for the
    /// TLS variant, the CA, the `kms` client certificate and key, and the
    /// `kms` user with its 0600 password file.
    pub fn client_settings(&self) -> EtcdClientSettings {
        EtcdClientSettings {
            endpoints: self.endpoints(),
            tls: self.tls.as_ref().map(|t| t.client.clone()),
            user: self
                .tls
                .as_ref()
                .map(|t| (KMS_ETCD_USER.to_owned(), t.kms_password_file.clone())),
        }
    }

    /// The CA file of the TLS variant.
    pub fn ca_file(&self) -> Option<&Path> {
        self.tls.as_ref().map(|t| t.ca_file.as_path())
    }

    /// The directory holding data directories, logs and TLS files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs etcdctl against `endpoints` as the harness (user `root` in the
    /// TLS variant). Returns (success, stdout, stderr).
    pub fn etcdctl(&self, endpoints: &[String], args: &[&str]) -> (bool, String, String) {
        let user = self
            .tls
            .as_ref()
            .map(|t| format!("root:{}", t.root_password));
        let output = self.run_etcdctl(endpoints, user.as_deref(), args);
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// Runs etcdctl against every running member as user `kms` (TLS
    /// variant; plain `etcdctl` otherwise), the way kms itself connects.
    pub fn etcdctl_as_kms(&self, args: &[&str]) -> (bool, String, String) {
        let user = self.tls.as_ref().map(|t| {
            let password = std::fs::read_to_string(&t.kms_password_file).expect("password");
            format!("{KMS_ETCD_USER}:{}", password.trim())
        });
        let output = self.run_etcdctl(&self.running_endpoints(), user.as_deref(), args);
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    fn run_etcdctl(&self, endpoints: &[String], user: Option<&str>, args: &[&str]) -> Output {
        let mut command = Command::new(etcdctl_binary());
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", endpoints.join(",")))
            .args([ETCDCTL_TIMEOUT, ETCDCTL_DIAL_TIMEOUT]);
        if let Some(tls) = &self.tls {
            command
                .arg("--cacert")
                .arg(&tls.ca_file)
                .arg("--cert")
                .arg(&tls.client.cert_file)
                .arg("--key")
                .arg(&tls.client.key_file);
        }
        if let Some(user) = user {
            command.arg(format!("--user={user}"));
        }
        command
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run etcdctl (apt-get install etcd-client; scripts/setup.sh)")
    }

    /// Client URLs of the members that run and are not stopped.
    pub fn running_endpoints(&self) -> Vec<String> {
        (0..self.members.len())
            .filter(|&i| self.is_running(i))
            .map(|i| self.client_url(i))
            .collect()
    }

    /// Whether member `i` runs and is not SIGSTOPped.
    pub fn is_running(&self, i: usize) -> bool {
        self.members[i].child.is_some() && !self.members[i].stopped
    }

    /// The index of the current leader as the running members report it
    /// (`etcdctl endpoint status -w json`: the member whose id is the
    /// leader id it reports), or `None` when no running member names
    /// itself leader (an election in progress, or no quorum).
    pub fn leader(&self) -> Option<usize> {
        (0..self.members.len())
            .filter(|&i| self.is_running(i))
            .find(|&i| {
                self.status(i)
                    .is_some_and(|s| s.member_id == s.leader && s.leader != 0)
            })
    }

    /// Waits up to `limit` for a leader; panics naming the logs otherwise.
    pub fn wait_leader(&self, limit: Duration) -> usize {
        let started = Instant::now();
        loop {
            if let Some(leader) = self.leader() {
                return leader;
            }
            assert!(started.elapsed() < limit, "no etcd leader after {limit:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Member `i`'s `endpoint status`, or `None` if it does not answer.
    pub fn status(&self, i: usize) -> Option<MemberStatus> {
        let (ok, stdout, _) =
            self.etcdctl(&[self.client_url(i)], &["endpoint", "status", "-w", "json"]);
        if !ok {
            return None;
        }
        let value: serde_json::Value = serde_json::from_str(&stdout).ok()?;
        let status = value.as_array()?.first()?.get("Status")?;
        let header = status.get("header")?;
        Some(MemberStatus {
            member_id: header.get("member_id")?.as_u64()?,
            leader: status.get("leader")?.as_u64()?,
            raft_term: status
                .get("raftTerm")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or_default(),
            revision: header.get("revision")?.as_u64()?,
        })
    }

    /// SIGKILL of member `i` (no-op if it is not running).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.members[i].stopped = false;
    }

    /// SIGSTOP of member `i`: it keeps its sockets but answers nothing.
    pub fn stop(&mut self, i: usize) {
        let pid = self.pid(i);
        signal(pid, "STOP");
        self.members[i].stopped = true;
    }

    /// SIGCONT of a member stopped with `stop`.
    pub fn cont(&mut self, i: usize) {
        let pid = self.pid(i);
        signal(pid, "CONT");
        self.members[i].stopped = false;
    }

    fn pid(&self, i: usize) -> u32 {
        self.members[i]
            .child
            .as_ref()
            .map(Child::id)
            .unwrap_or_else(|| panic!("etcd member {i} is not running"))
    }

    /// Kills member `i` (if running) and starts it again on its data
    /// directory and ports; waits until it is healthy.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        if let Err(failure) = self.wait_one_healthy(i, HEALTHY_WITHIN) {
            panic!("etcd member {i} did not come back: {failure}");
        }
    }

    fn wait_one_healthy(&mut self, i: usize, limit: Duration) -> Result<(), String> {
        let started = Instant::now();
        loop {
            if self
                .etcdctl(&[self.client_url(i)], &["endpoint", "health"])
                .0
            {
                return Ok(());
            }
            if started.elapsed() > limit {
                return Err(self.log(i));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Compacts the key-value history up to the current revision (so a
    /// watch from an older revision gets `ErrCompacted`). Returns the
    /// revision compacted at.
    pub fn compact(&self) -> u64 {
        let revision = (0..self.members.len())
            .filter(|&i| self.is_running(i))
            .find_map(|i| self.status(i))
            .expect("a running member answers endpoint status")
            .revision;
        let (ok, _, stderr) = self.etcdctl(
            &self.running_endpoints(),
            &["compact", &revision.to_string(), "--physical"],
        );
        assert!(ok, "etcdctl compact {revision}: {stderr}");
        revision
    }

    /// Sets up auth for the TLS variant: user `root`, role `kms` with
    /// read/write on the `/kms/v1/` prefix only, user `kms` with that role,
    /// then `auth enable`.
    fn enable_auth(&self) {
        let tls = self.tls.as_ref().expect("TLS variant");
        let kms_password = std::fs::read_to_string(&tls.kms_password_file).expect("password");
        let root_user = format!("root:{}", tls.root_password);
        let kms_user = format!("{KMS_ETCD_USER}:{}", kms_password.trim());
        let steps: [&[&str]; 6] = [
            &["user", "add", &root_user],
            &["role", "add", KMS_ETCD_USER],
            &[
                "role",
                "grant-permission",
                KMS_ETCD_USER,
                "--prefix=true",
                "readwrite",
                KMS_PREFIX,
            ],
            &["user", "add", &kms_user],
            &["user", "grant-role", KMS_ETCD_USER, KMS_ETCD_USER],
            &["auth", "enable"],
        ];
        for step in steps {
            // Before `auth enable` the --user flag is ignored by etcd.
            let (ok, _, stderr) = self.etcdctl(&self.endpoints(), step);
            assert!(ok, "etcdctl {step:?}: {stderr}");
        }
    }
}

/// What `etcdctl endpoint status` reports about one member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberStatus {
    /// The member's id.
    pub member_id: u64,
    /// The id of the leader it follows (0: none).
    pub leader: u64,
    /// The Raft term (grows with every election).
    pub raft_term: u64,
    /// The key-value store revision.
    pub revision: u64,
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for member in &mut self.members {
            if let Some(mut child) = member.child.take() {
                // SIGKILL also ends a SIGSTOPped process.
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{name} {pid}");
}

/// A token unique to this cluster (so members of two test clusters can
/// never join each other): process id, time and a counter.
fn random_token() -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "kms-test-{}-{nanos:x}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A password for an etcd test user (not a secret worth protecting beyond
/// the 0600 file: the cluster lives as long as one test).
fn random_password() -> String {
    format!("pw-{}", random_token())
}

fn make_tls_files(dir: &Path) -> TlsFiles {
    let ca = TestCa::new(&dir.join("pki"), "etcd");
    let member = ca.server_and_client("member");
    let client = ca.client_named("kms-client", KMS_ETCD_USER);
    let kms_password_file = dir.join("pki").join("kms-etcd.password");
    write_private(&kms_password_file, &random_password());
    TlsFiles {
        ca_file: ca.ca_file(),
        member_cert: member.cert,
        member_key: member.key,
        client: EtcdClientTls {
            ca_file: ca.ca_file(),
            cert_file: client.cert,
            key_file: client.key,
        },
        root_password: random_password(),
        kms_password_file,
    }
}

/// Writes `contents` to a new file with mode 0600.
pub fn write_private(path: &Path, contents: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .expect("create private file");
    file.write_all(contents.as_bytes())
        .expect("write private file");
}

/// Removes the etcd directories of earlier test processes that are gone,
/// after killing the etcd members still running in them (a test process
/// killed by a timeout cannot run `Drop`). Members are recognised by a
/// `--data-dir` inside such a directory, never by their name.
fn remove_stale_dirs() {
    let base = Path::new("/dev/shm");
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(DIR_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        kill_members_under(&entry.path());
        let _ = std::fs::remove_dir_all(entry.path());
    }
}

fn kill_members_under(dir: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return;
    };
    for process in processes.flatten() {
        let Some(pid) = process
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(process.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let in_dir = args.windows(2).any(|pair| {
            pair[0] == b"--data-dir"
                && Path::new(std::ffi::OsStr::from_bytes(pair[1])).starts_with(dir)
        });
        if in_dir {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

/// A TCP proxy on 127.0.0.1 in front of one upstream address, to partition
/// a kms node from etcd: `cut` drops every open connection and closes each
/// new one right after accepting it (the client sees a reset connection,
/// as with a partition that a firewall rejects); `heal` forwards again.
/// It runs on its own thread with its own tokio runtime, so it keeps
/// forwarding whatever the test's runtime is doing. Dropping it stops it
/// and closes every connection.
#[derive(Debug)]
pub struct TcpProxy {
    addr: SocketAddr,
    cut: Arc<tokio::sync::watch::Sender<bool>>,
    active: Arc<AtomicUsize>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TcpProxy {
    /// Starts a proxy forwarding to `upstream`.
    pub fn start(upstream: SocketAddr) -> TcpProxy {
        // Bound here with std (no runtime needed, so it works from async
        // tests too), served by the proxy's own runtime on its own thread.
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        std_listener
            .set_nonblocking(true)
            .expect("non-blocking proxy listener");
        let addr = std_listener.local_addr().expect("proxy addr");
        let (cut, cut_rx) = tokio::sync::watch::channel(false);
        let active = Arc::new(AtomicUsize::new(0));
        let (shutdown, shutdown_rx) = tokio::sync::oneshot::channel();
        let counter = Arc::clone(&active);
        let thread = std::thread::Builder::new()
            .name(format!("tcp-proxy-{addr}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("proxy runtime");
                runtime.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(std_listener).expect("proxy listener");
                    tokio::select! {
                        () = accept_loop(listener, upstream, cut_rx, counter) => {}
                        _ = shutdown_rx => {}
                    }
                });
                // Dropping the runtime cancels every connection task.
                drop(runtime);
            })
            .expect("proxy thread");
        TcpProxy {
            addr,
            cut: Arc::new(cut),
            active,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`: the proxy as an etcd client URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Drops every open connection and refuses new ones until `heal`.
    /// Returns once no connection is open any more (at most 5 s).
    pub fn cut(&self) {
        self.cut.send_replace(true);
        let started = Instant::now();
        while self.active.load(Ordering::SeqCst) > 0 && started.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            self.active.load(Ordering::SeqCst),
            0,
            "the proxy could not close its connections"
        );
    }

    /// Forwards new connections again.
    pub fn heal(&self) {
        self.cut.send_replace(false);
    }

    /// The number of connections currently forwarded.
    pub fn active_connections(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    upstream: SocketAddr,
    cut: tokio::sync::watch::Receiver<bool>,
    active: Arc<AtomicUsize>,
) {
    loop {
        let Ok((inbound, _)) = listener.accept().await else {
            continue;
        };
        if *cut.borrow() {
            drop(inbound);
            continue;
        }
        let mut cut = cut.clone();
        let active = Arc::clone(&active);
        active.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let mut inbound = inbound;
            if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    _ = cut.wait_for(|cut| *cut) => {}
                }
            }
            // Both sockets close here, before the count says so.
            drop(inbound);
            active.fetch_sub(1, Ordering::SeqCst);
        });
    }
}
