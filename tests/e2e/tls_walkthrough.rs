//! The README's TLS/mTLS walkthrough, step by step, through the real `kms`
//! binary and `scripts/tls-demo.sh` (openssl certificates, a SoftHSM2 token):
//! an administrator creates a key and gives one service encrypt-only rights;
//! that service encrypts; another service is denied; a caller without a
//! certificate cannot connect; the denial is in the audit log with the
//! principal.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use kms_tests::kms_binary;

const BILLING: &str = "spiffe://example.org/ns/prod/sa/billing";
const REPORTS: &str = "spiffe://example.org/ns/prod/sa/reports";

struct ServerProcess(std::process::Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `kms` with the demo's TLS settings as `who` (a client certificate
/// name in DIR/pki, or None for no certificate).
fn kms(
    dir: &Path,
    endpoint: &str,
    who: Option<&str>,
    args: &[&str],
    stdin: &[u8],
) -> (bool, Vec<u8>, String) {
    use std::io::Write;
    let pki = dir.join("pki");
    let mut command = Command::new(kms_binary());
    command
        .arg("--endpoint")
        .arg(endpoint)
        .arg("--ca-cert")
        .arg(pki.join("ca.pem"));
    if let Some(who) = who {
        command
            .arg("--client-cert")
            .arg(pki.join(format!("{who}.pem")))
            .arg("--client-key")
            .arg(pki.join(format!("{who}.key")));
    }
    let mut child = command
        .args(args)
        .env("KMS_LOG", "warn,cryptoki::mechanism=off")
        .env_remove("KMS_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kms");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("stdin");
    let output = child.wait_with_output().expect("kms");
    (
        output.status.success(),
        output.stdout,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn the_readme_tls_walkthrough_works_as_written() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir: PathBuf = tmp.path().join("demo");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/tls-demo.sh");
    let status = Command::new("bash")
        .arg(&script)
        .arg(&dir)
        .arg("127.0.0.1:0")
        .env("KMS", kms_binary())
        .env("KMS_LOG", "warn,cryptoki::mechanism=off")
        .stderr(Stdio::null())
        .status()
        .expect("run tls-demo.sh");
    assert!(status.success(), "scripts/tls-demo.sh failed");

    let mut child = Command::new(kms_binary())
        .args(["serve", "--config"])
        .arg(dir.join("kms.toml"))
        .env("SOFTHSM2_CONF", dir.join("softhsm2.conf"))
        .env("KMS_LOG", "warn,cryptoki::mechanism=off")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("kms serve");
    let mut banner = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut banner)
        .expect("banner");
    let _server = ServerProcess(child);
    let addr = banner
        .strip_prefix("kms listening on ")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected banner {banner:?}"));
    let endpoint = format!("https://{addr}");

    // The administrator creates a key and grants billing encrypt only.
    let (ok, _, err) = kms(
        &dir,
        &endpoint,
        Some("admin"),
        &[
            "key",
            "create",
            "--description",
            "billing records",
            "--alias",
            "alias/billing",
        ],
        b"",
    );
    assert!(ok, "{err}");
    let (ok, out, err) = kms(
        &dir,
        &endpoint,
        Some("admin"),
        &[
            "key",
            "policy",
            "grant",
            "alias/billing",
            "--principal",
            BILLING,
            "--permission",
            "encrypt",
        ],
        b"",
    );
    assert!(ok, "{err}");
    assert!(String::from_utf8_lossy(&out).contains(BILLING));

    // billing encrypts; it may not decrypt (encrypt-only).
    let (ok, blob, err) = kms(
        &dir,
        &endpoint,
        Some("billing"),
        &["encrypt", "--key", "alias/billing"],
        b"card 4111 1111 1111 1111",
    );
    assert!(ok, "{err}");
    assert!(!blob.is_empty());
    let (ok, _, err) = kms(&dir, &endpoint, Some("billing"), &["decrypt"], &blob);
    assert!(!ok);
    assert!(err.contains("PERMISSION_DENIED"), "{err}");

    // reports is denied; a caller without a certificate never gets in.
    let (ok, _, err) = kms(
        &dir,
        &endpoint,
        Some("reports"),
        &["encrypt", "--key", "alias/billing"],
        b"not allowed",
    );
    assert!(!ok);
    assert!(
        err.contains("PERMISSION_DENIED") && err.contains(REPORTS),
        "{err}"
    );
    let (ok, _, err) = kms(
        &dir,
        &endpoint,
        None,
        &["encrypt", "--key", "alias/billing"],
        b"x",
    );
    assert!(!ok);
    // (The server's CertificateRequired alert may reach the client as a
    // reset connection, depending on timing.)
    assert!(
        err.contains("CertificateRequired") || err.contains("transport error"),
        "{err}"
    );

    // The administrator sees the denial, with the principal, in the audit log.
    let (ok, out, err) = kms(
        &dir,
        &endpoint,
        Some("admin"),
        &["--json", "audit", "list", "--key", "alias/billing"],
        b"",
    );
    assert!(ok, "{err}");
    let text = String::from_utf8_lossy(&out);
    let denied: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("PERMISSION_DENIED"))
        .collect();
    assert!(
        text.contains(REPORTS) && !denied.is_empty(),
        "denial not in the audit list: {text}"
    );
}
