//! SoftHSM2 test harness (feature `testing`): one fresh, initialized token
//! per test, all in one process, so tests run in parallel without being
//! serialised.
//!
//! SoftHSM2 reads its configuration once, at C_Initialize, from
//! `$SOFTHSM2_CONF`. The harness makes a SoftHSM2 home (`crate::softhsm`) in
//! a per-process temporary directory and points the variable at it before
//! the module is first loaded. Every token is created
//! under one mutex (SoftHSM2 offers a new empty slot each time slots are
//! listed); the tests themselves then run concurrently.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::config::{HsmConfig, Pin, PinSource};
use crate::hsm::Hsm;
use crate::softhsm::SoftHsmHome;

struct Harness {
    root: PathBuf,
    conf: PathBuf,
    tokens_dir: PathBuf,
    module_path: PathBuf,
    create_lock: Mutex<()>,
    counter: AtomicU64,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let module_path = crate::softhsm2_module_path();
        assert!(
            module_path.is_file(),
            "SoftHSM2 module not found at {} (apt-get install softhsm2, or set KMS_SOFTHSM2_MODULE)",
            module_path.display()
        );
        remove_stale_harness_dirs();
        let root = std::env::temp_dir().join(format!("kms-softhsm-{}", std::process::id()));
        let home = SoftHsmHome::new(&root);
        home.create("the kms-hsm test harness")
            .expect("create the SoftHSM2 home");
        home.use_config().expect("point SoftHSM2 at the harness configuration");
        Harness {
            tokens_dir: home.tokens_dir(),
            conf: home.conf_path(),
            root,
            module_path,
            create_lock: Mutex::new(()),
            counter: AtomicU64::new(0),
        }
    })
}

/// Removes the token directories of earlier test processes that are gone.
fn remove_stale_harness_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("kms-softhsm-"))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// One freshly initialized SoftHSM2 token, private to one test.
#[derive(Debug)]
pub struct TestToken {
    label: String,
    pin_file: PathBuf,
    so_pin_file: PathBuf,
    token_dir: PathBuf,
    module_path: PathBuf,
    tokens_root: PathBuf,
    softhsm_conf: PathBuf,
}

impl TestToken {
    /// Creates and initializes a new token with random PINs. Panics on
    /// failure: this is test code, and a broken harness must be loud.
    pub fn new() -> TestToken {
        let harness = harness();
        let n = harness.counter.fetch_add(1, Ordering::Relaxed);
        let label = format!("t{}-{n}", std::process::id());
        let secrets = harness.root.join(format!("{label}.secrets"));
        std::fs::create_dir_all(&secrets).expect("create secrets dir");
        let user_pin = random_pin();
        let so_pin = random_pin();
        let pin_file = secrets.join("user.pin");
        write_private(&pin_file, &user_pin);
        let so_pin_file = secrets.join("so.pin");
        write_private(&so_pin_file, &so_pin);

        let _guard = harness.create_lock.lock();
        let before = list_dirs(&harness.tokens_dir);
        crate::token::initialize_token(
            &harness.module_path,
            &label,
            &Pin::new(&so_pin),
            &Pin::new(&user_pin),
        )
        .expect("initialize SoftHSM2 token");
        let token_dir = list_dirs(&harness.tokens_dir)
            .into_iter()
            .find(|d| !before.contains(d))
            .expect("SoftHSM2 created no token directory");
        TestToken {
            label,
            pin_file,
            so_pin_file,
            token_dir,
            module_path: harness.module_path.clone(),
            tokens_root: harness.tokens_dir.clone(),
            softhsm_conf: harness.conf.clone(),
        }
    }

    /// The token's label (unique per test process and test).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The directory SoftHSM2 keeps this token's files in (for fault tests).
    pub fn token_dir(&self) -> &Path {
        &self.token_dir
    }

    /// The SoftHSM2 token root directory of this process.
    pub fn tokens_root(&self) -> &Path {
        &self.tokens_root
    }

    /// The SoftHSM2 configuration file naming this token's directory (the
    /// `SOFTHSM2_CONF` a child process, e.g. a `kms` node, needs to see it).
    pub fn softhsm_conf(&self) -> &Path {
        &self.softhsm_conf
    }

    /// The SoftHSM2 module the token lives in.
    pub fn module_path(&self) -> &Path {
        &self.module_path
    }

    /// The PIN source (a 0600 file) of this token's user PIN.
    pub fn pin_source(&self) -> PinSource {
        PinSource::File(self.pin_file.clone())
    }

    /// The PIN source (a 0600 file) of this token's security-officer PIN,
    /// for root-key ceremonies (`create_root`).
    pub fn so_pin_source(&self) -> PinSource {
        PinSource::File(self.so_pin_file.clone())
    }

    /// A configuration for this token with `pool_size` sessions and a short
    /// reconnect backoff, so recovery tests run quickly.
    pub fn config(&self, pool_size: usize) -> HsmConfig {
        let mut config = HsmConfig::new(&self.module_path, &self.label, self.pin_source());
        config.pool_size = pool_size;
        config.reconnect_backoff_min = std::time::Duration::from_millis(10);
        config.reconnect_backoff_max = std::time::Duration::from_millis(200);
        config.sync_token_dir = Some(self.token_dir.clone());
        config
    }

    /// Opens the token with a pool of 4 sessions.
    pub fn open(&self) -> Hsm {
        Hsm::open(self.config(4)).expect("open test token")
    }
}

impl Default for TestToken {
    fn default() -> Self {
        TestToken::new()
    }
}

fn list_dirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default()
}

fn random_pin() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 12];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("system RNG");
    hex::encode(bytes)
}

fn write_private(path: &Path, contents: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .expect("create PIN file");
    file.write_all(contents.as_bytes()).expect("write PIN file");
}

/// Creates, on the token labelled `token_label`, the variant-T root
/// `kms-root/<epoch>` holding the known 32-byte `value` (an SO import with
/// `C_CreateObject`), so that several SoftHSM2 tokens, one per kms node of a
/// test cluster, hold the SAME root: a version wrapped on one node unwraps
/// on every other. SoftHSM2 cannot clone a trusted root from token to token
/// (design note `hierarchy-and-cluster.md` §1.5.1 note *2), so tests import
/// the same test value on each instead.
///
/// The root is built from the same attribute table as [`crate::create_root`]
/// (`CKA_VALUE` in place of `CKA_VALUE_LEN`), read back row by row, and then
/// put through the server's start-up probe as the user, so a kms server
/// accepts it exactly as a generated root. Test and development use only:
/// a root whose value is known outside the HSM protects nothing. It is not
/// reachable from the `kms` binary or from any configuration.
///
/// Logs in as the security officer (`so_pin`), then as the user
/// (`user_pin`), and logs out after each: run it before this process opens
/// an `Hsm` on the token, or from another process.
///
/// # Errors
/// `ObjectExists` if the epoch is taken; `TokenNotFound`; `PinRejected`;
/// `TemplateViolation` naming the row that did not read back, or
/// `RootCheckFailed` from the probe (the object is destroyed again in both
/// cases); `ModuleLoad`; or the PKCS#11 error of the call that failed.
pub fn import_test_root(
    module_path: &Path,
    token_label: &str,
    so_pin: &Pin,
    user_pin: &Pin,
    epoch: u32,
    value: &[u8; 32],
) -> crate::Result<()> {
    crate::root::import_root_for_tests(module_path, token_label, so_pin, user_pin, epoch, value)
}
