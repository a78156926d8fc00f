//! Real etcd members for the tests: `etcd` processes on random loopback
//! ports, data on tmpfs (`/dev/shm`), default heartbeat/election timings
//! (design note §2.4). Killed when the guard drops, even on panic.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kms_storage_etcd::{EtcdConfig, EtcdEngine};

/// The staleness bound Δ of the tests.
pub const DELTA: Duration = Duration::from_secs(1);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Etcd {
    children: Vec<Child>,
    pub endpoints: Vec<String>,
    dir: tempfile::TempDir,
    tls: Option<Tls>,
}

/// PEM files of a throwaway PKI: a CA, etcd's certificate (server and
/// client usages: etcd's gateway dials its own listener with it) and a
/// client certificate for kms.
#[derive(Clone)]
pub struct Tls {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Tls {
    fn generate(dir: &Path) -> Tls {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair, KeyUsagePurpose, SanType,
        };
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "test etcd CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let issuer = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
        let write = |name: &str, params: CertificateParams| {
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &issuer).unwrap();
            let (c, k) = (
                dir.join(format!("{name}.pem")),
                dir.join(format!("{name}.key")),
            );
            std::fs::write(&c, cert.pem()).unwrap();
            std::fs::write(&k, key.serialize_pem()).unwrap();
            (c, k)
        };
        let mut server = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        server
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        server.distinguished_name.push(DnType::CommonName, "etcd");
        server.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let (server_cert, server_key) = write("server", server);
        let mut client = CertificateParams::new(Vec::<String>::new()).unwrap();
        client.distinguished_name.push(DnType::CommonName, "kms");
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let (client_cert, client_key) = write("client", client);
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, issuer.pem()).unwrap();
        Tls {
            ca: ca_file,
            server_cert,
            server_key,
            client_cert,
            client_key,
        }
    }
}

impl Etcd {
    /// Starts a cluster of `members` members and waits until all are healthy.
    pub fn start(members: usize) -> Etcd {
        Self::start_with(members, false)
    }

    /// One member whose clients must use mutual TLS (https).
    pub fn start_tls() -> Etcd {
        Self::start_with(1, true)
    }

    fn start_with(members: usize, tls: bool) -> Etcd {
        let dir = tempfile::Builder::new()
            .prefix("kms-etcd-test-")
            .tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .unwrap();
        let tls = tls.then(|| Tls::generate(dir.path()));
        let scheme = if tls.is_some() { "https" } else { "http" };
        let ports: Vec<(u16, u16)> = (0..members).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, p))| format!("n{i}=http://127.0.0.1:{p}"))
            .collect();
        let token = format!("kms-test-{}-{}", std::process::id(), ports[0].0);
        let mut children = Vec::new();
        let mut endpoints = Vec::new();
        for (i, (c, p)) in ports.iter().enumerate() {
            let client = format!("{scheme}://127.0.0.1:{c}");
            let peer = format!("http://127.0.0.1:{p}");
            let log = std::fs::File::create(dir.path().join(format!("n{i}.log"))).unwrap();
            let mut cmd = Command::new("etcd");
            if let Some(t) = &tls {
                cmd.arg("--cert-file")
                    .arg(&t.server_cert)
                    .arg("--key-file")
                    .arg(&t.server_key)
                    .arg("--trusted-ca-file")
                    .arg(&t.ca)
                    .arg("--client-cert-auth");
            }
            let child = cmd
                .args(["--name", &format!("n{i}")])
                .arg("--data-dir")
                .arg(dir.path().join(format!("n{i}")))
                .args(["--listen-client-urls", &client])
                .args(["--advertise-client-urls", &client])
                .args(["--listen-peer-urls", &peer])
                .args(["--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &initial.join(",")])
                .args(["--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", &token])
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("start etcd (apt-get install etcd-server)");
            children.push(child);
            endpoints.push(client);
        }
        let etcd = Etcd {
            children,
            endpoints,
            dir,
            tls,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ok = etcd
                .etcdctl(&["endpoint", "health"], &etcd.endpoints)
                .status
                .success();
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "etcd did not become healthy");
            std::thread::sleep(Duration::from_millis(200));
        }
        etcd
    }

    pub fn etcdctl(&self, args: &[&str], endpoints: &[String]) -> std::process::Output {
        let mut cmd = Command::new("etcdctl");
        if let Some(t) = &self.tls {
            cmd.arg("--cacert")
                .arg(&t.ca)
                .arg("--cert")
                .arg(&t.client_cert)
                .arg("--key")
                .arg(&t.client_key);
        }
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", endpoints.join(",")))
            .args(["--dial-timeout=2s", "--command-timeout=5s"])
            .args(args)
            .output()
            .expect("run etcdctl (apt-get install etcd-client)")
    }

    /// Runs etcdctl against every member; panics on failure.
    pub fn ctl(&self, args: &[&str]) -> String {
        let out = self.etcdctl(args, &self.endpoints);
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn signal(&self, member: usize, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.children[member].id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    }

    /// Freezes member `member` (SIGSTOP).
    pub fn stop(&self, member: usize) {
        self.signal(member, "-STOP");
    }

    /// Resumes member `member` (SIGCONT).
    pub fn cont(&self, member: usize) {
        self.signal(member, "-CONT");
    }

    /// The index of the current leader (waits up to 10 s for one).
    pub fn leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // `endpoint status -w simple`: one line per member, the fifth
            // comma-separated field is IS LEADER.
            let out = self.etcdctl(&["endpoint", "status", "-w", "simple"], &self.endpoints);
            let text = String::from_utf8_lossy(&out.stdout);
            let leader = text.lines().find_map(|line| {
                let fields: Vec<&str> = line.split(',').map(str::trim).collect();
                (fields.get(4) == Some(&"true"))
                    .then(|| self.endpoints.iter().position(|e| e == fields[0]))
                    .flatten()
            });
            if let Some(l) = leader {
                return l;
            }
            assert!(Instant::now() < deadline, "no etcd leader: {text}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Puts `n` keys `<prefix><i>` (i zero-padded to 6 digits) with value
    /// `i` as u32 BE, 100 per transaction.
    pub fn put_many(&self, prefix: &str, n: u32) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut c = etcd_client::Client::connect(&self.endpoints, None)
                .await
                .unwrap();
            let keys: Vec<u32> = (0..n).collect();
            for chunk in keys.chunks(100) {
                let ops: Vec<etcd_client::TxnOp> = chunk
                    .iter()
                    .map(|i| {
                        etcd_client::TxnOp::put(
                            format!("{prefix}{i:06}"),
                            i.to_be_bytes().to_vec(),
                            None,
                        )
                    })
                    .collect();
                c.txn(etcd_client::Txn::new().and_then(ops)).await.unwrap();
            }
        });
    }

    /// Puts raw bytes (etcdctl cannot pass a NUL byte on its command line).
    pub fn put_raw(&self, key: &str, value: &[u8]) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut c = etcd_client::Client::connect(&self.endpoints, None)
                .await
                .unwrap();
            c.put(key, value, None).await.unwrap();
        });
    }

    /// A configuration for node `node` on the members `members`, Δ = 1 s.
    pub fn config(&self, node: &str, members: &[usize]) -> EtcdConfig {
        let endpoints = members.iter().map(|m| self.endpoints[*m].clone()).collect();
        let mut c = EtcdConfig::new(node, endpoints);
        c.staleness_bound = DELTA;
        if let Some(t) = &self.tls {
            c.ca_file = Some(t.ca.clone());
            c.cert_file = Some(t.client_cert.clone());
            c.key_file = Some(t.client_key.clone());
        }
        c
    }

    pub fn engine(&self, node: &str, members: &[usize]) -> EtcdEngine {
        EtcdEngine::connect(self.config(node, members)).unwrap()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for c in &mut self.children {
            // A stopped member ignores SIGKILL until... it does not: SIGKILL
            // ends a stopped process too. Continue it anyway for tidiness.
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = &self.dir;
    }
}

/// Polls `f` until it returns true or `limit` passes.
pub fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A TCP proxy in front of an etcd member that can cut a node off (close
/// its connections and refuse new ones) and let it back: a partition
/// between one node and etcd (design note §2.4).
pub struct Proxy {
    pub endpoint: String,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Proxy {
    /// Proxies to `endpoint` (`http://host:port`).
    pub fn start(endpoint: &str) -> Proxy {
        use std::sync::atomic::Ordering;
        let target = endpoint.trim_start_matches("http://").to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c, cs) = (cut.clone(), conns.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if c.load(Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                let Ok(upstream) = std::net::TcpStream::connect(&target) else {
                    continue;
                };
                {
                    let mut cs = cs.lock().unwrap();
                    cs.push(client.try_clone().unwrap());
                    cs.push(upstream.try_clone().unwrap());
                }
                let pipe = |mut from: std::net::TcpStream, mut to: std::net::TcpStream| {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                };
                pipe(client.try_clone().unwrap(), upstream.try_clone().unwrap());
                pipe(upstream, client);
            }
        });
        Proxy {
            endpoint: format!("http://127.0.0.1:{port}"),
            cut,
            conns,
        }
    }

    /// Cuts the node off: closes every connection, refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Lets the node reach etcd again.
    pub fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}
