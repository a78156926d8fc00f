//! Bring your own key (issue 14 item 6) against a real `kms serve --dev`
//! (SoftHSM2 with a root key) through the CLI, with Python `cryptography`
//! as the external party: it reads the import public key, wraps 32 random
//! bytes with RSA-OAEP; after the import it decrypts a kms Encrypt
//! ciphertext with AES-256-GCM under those bytes (README "Ciphertext
//! format"), which proves the imported material is the key in use. Plus
//! every refusal (nothing stored), rotation refused, restart loses the
//! import parameters with a clear error, and the audit records.

use std::path::Path;
use std::process::Command;

use kms_tests::{DevServerProcess, run_cli};

fn cli_ok(endpoint: &str, args: &[&str], stdin: &[u8]) -> Vec<u8> {
    let (ok, stdout, stderr) = run_cli(endpoint, args, stdin);
    assert!(ok, "kms {args:?} failed: {stderr}");
    stdout
}

/// Runs a CLI command that must fail; returns its stderr.
fn cli_err(endpoint: &str, args: &[&str]) -> String {
    let (ok, stdout, stderr) = run_cli(endpoint, args, b"some plaintext");
    assert!(
        !ok,
        "kms {args:?} succeeded: {}",
        String::from_utf8_lossy(&stdout)
    );
    stderr
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).expect("json")
}

/// The external party: `python3 -c SCRIPT ARGS...`, stdout.
fn python(script: &str, args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("run python3 (scripts/setup.sh installs cryptography)");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// Reads the DER public key at argv[1], draws argv[3] random bytes (or
/// takes hex argv[5] if given), RSA-OAEP-wraps them with hash argv[4]
/// (sha1|sha256) into argv[2]; prints the bytes in hex.
const WRAP: &str = r#"
import os, sys
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
public = serialization.load_der_public_key(open(sys.argv[1], "rb").read())
material = bytes.fromhex(sys.argv[5]) if len(sys.argv) > 5 else os.urandom(int(sys.argv[3]))
h = hashes.SHA1() if sys.argv[4] == "sha1" else hashes.SHA256()
wrapped = public.encrypt(material, padding.OAEP(mgf=padding.MGF1(algorithm=h), algorithm=h, label=None))
open(sys.argv[2], "wb").write(wrapped)
print(material.hex())
"#;

/// Decrypts the kms ciphertext blob at argv[1] (README "Ciphertext
/// format", empty encryption context) with AES-256-GCM under hex key
/// argv[2]; prints the plaintext.
const DECRYPT: &str = r#"
import sys
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
blob = open(sys.argv[1], "rb").read()
assert blob[0:3] == b"K\x01\x01", blob[0:3]
l = blob[3]
header = blob[: 8 + l]
iv = blob[8 + l : 20 + l]
aad = header + (0).to_bytes(4, "big")
sys.stdout.write(AESGCM(bytes.fromhex(sys.argv[2])).decrypt(iv, blob[20 + l :], aad).decode())
"#;

fn wrap(dir: &Path, wrapped: &str, len: usize, hash: &str) -> String {
    python(
        WRAP,
        &[
            dir.join("public_key.der").to_str().expect("path"),
            dir.join(wrapped).to_str().expect("path"),
            &len.to_string(),
            hash,
        ],
    )
    .trim()
    .to_owned()
}

fn create_external(ep: &str) -> String {
    let created = json(&cli_ok(
        ep,
        &["--json", "key", "create", "--origin", "external"],
        b"",
    ));
    assert_eq!(created["state"], "PENDING_IMPORT", "{created}");
    assert_eq!(created["origin"], "EXTERNAL", "{created}");
    assert_eq!(created["primary_version"], 0, "{created}");
    created["key_id"].as_str().expect("key id").to_owned()
}

fn params(ep: &str, key: &str, dir: &Path, extra: &[&str]) {
    let mut args = vec!["key", "import-parameters", key, "--out-dir"];
    args.push(dir.to_str().expect("path"));
    args.extend_from_slice(extra);
    cli_ok(ep, &args, b"");
}

fn import_files(ep: &str, key: &str, dir: &Path, wrapped: &str, extra: &[&str]) -> (bool, String) {
    let wrapped = dir.join(wrapped);
    let token = dir.join("import_token.bin");
    let mut args = vec![
        "key",
        "import",
        key,
        "--wrapped-material",
        wrapped.to_str().expect("path"),
        "--import-token",
        token.to_str().expect("path"),
    ];
    args.extend_from_slice(extra);
    let (ok, _, stderr) = run_cli(ep, &args, b"");
    (ok, stderr)
}

fn version_count(ep: &str, key: &str) -> usize {
    json(&cli_ok(ep, &["--json", "key", "versions", key], b""))
        .as_array()
        .expect("array")
        .len()
}

/// Decrypts a kms ciphertext in Python under the known material.
fn python_decrypt(dir: &Path, blob: &[u8], material_hex: &str) -> String {
    let path = dir.join("blob.bin");
    std::fs::write(&path, blob).expect("write blob");
    python(DECRYPT, &[path.to_str().expect("path"), material_hex])
}

#[test]
fn imported_material_is_the_key_in_use_offline_and_in_one_step() {
    let data = tempfile::tempdir().expect("data dir");
    let work = tempfile::tempdir().expect("work dir");
    let server = DevServerProcess::start(data.path());
    let ep = server.endpoint();
    let key = create_external(&ep);

    // No material yet: every use is refused and says why; so is rotation.
    let refused = cli_err(&ep, &["encrypt", "--key", &key]);
    assert!(refused.contains("awaits its key material"), "{refused}");
    let refused = cli_err(&ep, &["key", "rotate", &key]);
    assert!(
        refused.contains("origin EXTERNAL") && refused.contains("cannot generate"),
        "{refused}"
    );

    let refused = cli_err(
        &ep,
        &["key", "rotation-policy", &key, "--period-days", "30"],
    );
    assert!(
        refused.contains("FAILED_PRECONDITION") && refused.contains("origin EXTERNAL"),
        "{refused}"
    );
    let refused = cli_err(
        &ep,
        &[
            "key",
            "create",
            "--origin",
            "external",
            "--rotation-period-days",
            "30",
        ],
    );
    assert!(
        refused.contains("INVALID_ARGUMENT") && refused.contains("rotation_period"),
        "{refused}"
    );

    // Offline: the external party wraps with the files the CLI wrote.
    let offline = work.path().join("offline");
    params(&ep, &key, &offline, &["--wrapping-key-spec", "RSA_2048"]);
    assert!(
        std::fs::read_to_string(offline.join("public_key.pem"))
            .expect("pem")
            .starts_with("-----BEGIN PUBLIC KEY-----\n")
    );
    let material = wrap(&offline, "wrapped.bin", 32, "sha1");
    let (ok, stderr) = import_files(&ep, &key, &offline, "wrapped.bin", &[]);
    assert!(ok, "{stderr}");
    let described = json(&cli_ok(&ep, &["--json", "key", "describe", &key], b""));
    assert_eq!(described["state"], "ENABLED");
    assert_eq!(described["primary_version"], 1);
    let versions = json(&cli_ok(&ep, &["--json", "key", "versions", &key], b""));
    assert_eq!(versions[0]["origin"], "EXTERNAL");
    assert_eq!(versions[0]["held_as"], "WRAPPED");

    // The strongest check: kms encrypts, the known bytes decrypt.
    let blob = cli_ok(&ep, &["encrypt", "--key", &key], b"bring your own key");
    assert_eq!(
        python_decrypt(work.path(), &blob, &material),
        "bring your own key"
    );
    assert_eq!(cli_ok(&ep, &["decrypt"], &blob), b"bring your own key");

    // The token was spent: a second import with it is refused, nothing stored.
    let (ok, stderr) = import_files(&ep, &key, &offline, "wrapped.bin", &[]);
    assert!(!ok && stderr.contains("already used"), "{stderr}");
    assert_eq!(version_count(&ep, &key), 1);

    // One step: the CLI wraps locally; the new version becomes primary.
    let second_material: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(37) ^ 0x5c);
    let material_file = work.path().join("material.bin");
    std::fs::write(&material_file, second_material).expect("write material");
    cli_ok(
        &ep,
        &[
            "key",
            "import",
            &key,
            "--key-material-file",
            material_file.to_str().expect("path"),
        ],
        b"",
    );
    let described = json(&cli_ok(&ep, &["--json", "key", "describe", &key], b""));
    assert_eq!(described["primary_version"], 2);
    let second_blob = cli_ok(&ep, &["encrypt", "--key", &key], b"second material");
    assert_eq!(
        python_decrypt(work.path(), &second_blob, &hex::encode(second_material)),
        "second material"
    );
    // The first version still decrypts its ciphertexts.
    assert_eq!(cli_ok(&ep, &["decrypt"], &blob), b"bring your own key");

    // A material file of the wrong size is refused before anything is sent.
    std::fs::write(&material_file, [1u8; 31]).expect("write material");
    let refused = cli_err(
        &ep,
        &[
            "key",
            "import",
            &key,
            "--key-material-file",
            material_file.to_str().expect("path"),
        ],
    );
    assert!(refused.contains("exactly 32 raw bytes"), "{refused}");

    // Both RPCs are audited with their own operation names.
    let events = json(&cli_ok(
        &ep,
        &["--json", "audit", "list", "--key", &key],
        b"",
    ));
    let seen: Vec<(String, String)> = events
        .as_array()
        .expect("array")
        .iter()
        .map(|e| {
            (
                e["operation"].as_str().expect("op").to_owned(),
                e["result"].as_str().expect("result").to_owned(),
            )
        })
        .collect();
    for expected in [
        ("GetParametersForImport", "OK"),
        ("ImportKeyMaterial", "OK"),
        ("ImportKeyMaterial", "FAILED_PRECONDITION"),
    ] {
        assert!(
            seen.contains(&(expected.0.to_owned(), expected.1.to_owned())),
            "{expected:?} not in {seen:?}"
        );
    }
}

#[test]
fn every_bad_import_is_refused_clearly_and_stores_nothing() {
    let data = tempfile::tempdir().expect("data dir");
    let work = tempfile::tempdir().expect("work dir");
    let mut server = DevServerProcess::start(data.path());
    let ep = server.endpoint();
    let key = create_external(&ep);
    let other = create_external(&ep);
    let dir = |name: &str| work.path().join(name);

    // SoftHSM2 2.6.1 has no OAEP with SHA-256: the error names the algorithm.
    params(
        &ep,
        &key,
        &dir("sha256"),
        &[
            "--wrapping-algorithm",
            "RSAES_OAEP_SHA_256",
            "--wrapping-key-spec",
            "RSA_2048",
        ],
    );
    wrap(&dir("sha256"), "wrapped.bin", 32, "sha256");
    let (ok, stderr) = import_files(
        &ep,
        &key,
        &dir("sha256"),
        "wrapped.bin",
        &["--wrapping-algorithm", "RSAES_OAEP_SHA_256"],
    );
    assert!(
        !ok && stderr.contains(
                "FAILED_PRECONDITION: the HSM does not support the wrapping algorithm RSAES_OAEP_SHA_256"
            ),
        "{stderr}"
    );

    // Garbage, and material of the wrong size (16 and 31 bytes).
    for (name, len) in [("garbage", 0usize), ("short", 16), ("odd", 31)] {
        params(&ep, &key, &dir(name), &["--wrapping-key-spec", "RSA_2048"]);
        if len == 0 {
            std::fs::write(dir(name).join("wrapped.bin"), [0x42u8; 256]).expect("write");
        } else {
            wrap(&dir(name), "wrapped.bin", len, "sha1");
        }
        let (ok, stderr) = import_files(&ep, &key, &dir(name), "wrapped.bin", &[]);
        assert!(
            !ok && stderr.contains("does not decrypt to a 32-byte AES key")
                && stderr.contains("INVALID_ARGUMENT"),
            "{name}: {stderr}"
        );
    }

    // A token for another key, and for another algorithm: refused before
    // the HSM, so the token stays usable.
    params(
        &ep,
        &key,
        &dir("good"),
        &["--wrapping-key-spec", "RSA_2048"],
    );
    let material = wrap(&dir("good"), "wrapped.bin", 32, "sha1");
    let (ok, stderr) = import_files(&ep, &other, &dir("good"), "wrapped.bin", &[]);
    assert!(
        !ok && stderr.contains(&format!("issued for key {key}")),
        "{stderr}"
    );
    let (ok, stderr) = import_files(
        &ep,
        &key,
        &dir("good"),
        "wrapped.bin",
        &["--wrapping-algorithm", "RSAES_OAEP_SHA_256"],
    );
    assert!(
        !ok && stderr.contains("issued for RSAES_OAEP_SHA_1"),
        "{stderr}"
    );

    // Asking again into a directory that already holds parameters is
    // refused before any request, so the outstanding token is not
    // superseded (it is still refused for its algorithm, not as superseded).
    let refused = cli_err(
        &ep,
        &[
            "key",
            "import-parameters",
            &key,
            "--out-dir",
            dir("good").to_str().expect("path"),
        ],
    );
    assert!(
        refused.contains("exists") && refused.contains("nothing was requested"),
        "{refused}"
    );
    let (ok, stderr) = import_files(
        &ep,
        &key,
        &dir("good"),
        "wrapped.bin",
        &["--wrapping-algorithm", "RSAES_OAEP_SHA_256"],
    );
    assert!(
        !ok && stderr.contains("issued for RSAES_OAEP_SHA_1"),
        "{stderr}"
    );

    // Superseded by newer parameters for the same key.
    params(
        &ep,
        &key,
        &dir("newer"),
        &["--wrapping-key-spec", "RSA_2048"],
    );
    let (ok, stderr) = import_files(&ep, &key, &dir("good"), "wrapped.bin", &[]);
    assert!(!ok && stderr.contains("superseded"), "{stderr}");

    // Expired (valid for 1 s; the sleep only guarantees the expiry).
    params(
        &ep,
        &key,
        &dir("expired"),
        &["--wrapping-key-spec", "RSA_2048", "--valid-for-secs", "1"],
    );
    wrap(&dir("expired"), "wrapped.bin", 32, "sha1");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let (ok, stderr) = import_files(&ep, &key, &dir("expired"), "wrapped.bin", &[]);
    assert!(
        !ok && stderr.contains("FAILED_PRECONDITION: import token expired"),
        "{stderr}"
    );

    // A key of origin KMS takes no import.
    let generated = json(&cli_ok(&ep, &["--json", "key", "create"], b""))["key_id"]
        .as_str()
        .expect("key id")
        .to_owned();
    let refused = cli_err(
        &ep,
        &[
            "key",
            "import-parameters",
            &generated,
            "--out-dir",
            dir("kms").to_str().expect("path"),
        ],
    );
    assert!(refused.contains("origin KMS"), "{refused}");

    // Nothing of the above stored a version.
    assert_eq!(version_count(&ep, &key), 0);
    assert_eq!(version_count(&ep, &other), 0);

    // Import key pairs are HSM session objects: a restart loses them, and
    // the token says so.
    params(
        &ep,
        &key,
        &dir("restart"),
        &["--wrapping-key-spec", "RSA_2048"],
    );
    wrap(&dir("restart"), "wrapped.bin", 32, "sha1");
    server.terminate();
    let server = DevServerProcess::start(data.path());
    let ep = server.endpoint();
    let (ok, stderr) = import_files(&ep, &key, &dir("restart"), "wrapped.bin", &[]);
    assert!(
        !ok && stderr.contains("unknown import token") && stderr.contains("restarted"),
        "{stderr}"
    );
    assert_eq!(version_count(&ep, &key), 0);

    // Fresh parameters after the restart work, with the same material.
    params(
        &ep,
        &key,
        &dir("after"),
        &["--wrapping-key-spec", "RSA_2048"],
    );
    python(
        WRAP,
        &[
            dir("after").join("public_key.der").to_str().expect("path"),
            dir("after").join("wrapped.bin").to_str().expect("path"),
            "32",
            "sha1",
            &material,
        ],
    );
    let (ok, stderr) = import_files(&ep, &key, &dir("after"), "wrapped.bin", &[]);
    assert!(ok, "{stderr}");
    let blob = cli_ok(&ep, &["encrypt", "--key", &key], b"after restart");
    assert_eq!(
        python_decrypt(work.path(), &blob, &material),
        "after restart"
    );
}
