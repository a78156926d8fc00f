//! Old databases keep working (issue 14 item 4): the checked-in fixture
//! `tests/fixtures/pre_wrapped_v1` (a dev-mode catalogue and SoftHSM2 token
//! written by kms at commit 78847f3, before wrapped versions; see its
//! README) opens with the current `kms serve --dev`, which adds a root on
//! first run. Every recorded ciphertext decrypts (the one under the
//! disabled version is refused), old versions stay token objects, a
//! rotation makes a wrapped version, the old audit chain keeps its token
//! checkpoint key and verifies, and all of it again after a restart.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use kms_tests::{DevServerProcess, dev_token_object_labels, run_cli};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/pre_wrapped_v1")
}

/// Copies `from` into `to` (files and directories), giving directories
/// 0700 and files 0600 as kms and SoftHSM2 create them (a git checkout
/// does not keep those modes).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o700)).expect("chmod dir");
    for entry in std::fs::read_dir(from).expect("read fixture dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600))
                .expect("chmod file");
        }
    }
}

/// The fixture's data directory in a temporary place, with the SoftHSM2
/// configuration's absolute token directory rewritten to the copy's (the
/// fixture names the directory of the machine that made it).
fn fixture_copy(temp: &Path) -> PathBuf {
    let data = temp.join("data");
    copy_tree(&fixture_dir().join("data"), &data);
    let conf = data.join("softhsm").join("softhsm2.conf");
    let text = std::fs::read_to_string(&conf).expect("read softhsm2.conf");
    let tokens = data.join("softhsm").join("tokens");
    let rewritten: Vec<String> = text
        .lines()
        .map(|line| {
            if line.trim_start().starts_with("directories.tokendir") {
                format!("directories.tokendir = {}", tokens.display())
            } else {
                line.to_owned()
            }
        })
        .collect();
    assert!(
        rewritten
            .iter()
            .any(|l| l.contains(&*tokens.to_string_lossy())),
        "softhsm2.conf names no token directory: {text}"
    );
    std::fs::write(&conf, rewritten.join("\n") + "\n").expect("write softhsm2.conf");
    data
}

fn manifest() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture_dir().join("manifest.json")).expect("manifest");
    serde_json::from_str(&text).expect("manifest json")
}

fn cli_ok(endpoint: &str, args: &[&str], stdin: &[u8]) -> Vec<u8> {
    let (ok, stdout, stderr) = run_cli(endpoint, args, stdin);
    assert!(ok, "kms {args:?} failed: {stderr}");
    stdout
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).expect("json")
}

/// Decrypts every ciphertext of the manifest: `ok` ones give their
/// plaintext, the one under the disabled version is refused.
fn decrypt_all(endpoint: &str, manifest: &serde_json::Value) -> usize {
    let mut decrypted = 0;
    for entry in manifest["ciphertexts"].as_array().expect("ciphertexts") {
        let blob = base64::engine::general_purpose::STANDARD
            .decode(entry["ciphertext_base64"].as_str().expect("ciphertext"))
            .expect("base64");
        let context = entry["context"].as_str().expect("context");
        let mut args = vec!["decrypt"];
        if !context.is_empty() {
            args.extend(["--context", context]);
        }
        let (ok, stdout, stderr) = run_cli(endpoint, &args, &blob);
        match entry["expect"].as_str().expect("expect") {
            "ok" => {
                assert!(ok, "{entry}: {stderr}");
                assert_eq!(
                    stdout,
                    entry["plaintext"].as_str().expect("plaintext").as_bytes()
                );
                decrypted += 1;
            }
            "disabled" => {
                assert!(
                    !ok,
                    "a ciphertext under a disabled version decrypted: {entry}"
                );
                assert!(stderr.contains("FAILED_PRECONDITION"), "{entry}: {stderr}");
            }
            other => panic!("unknown expectation {other}"),
        }
    }
    decrypted
}

/// (version, held_as, root_epoch) of every version of `key`, per the CLI.
fn held_as(endpoint: &str, key: &str) -> Vec<(u64, String, u64)> {
    let out = json(&cli_ok(endpoint, &["--json", "key", "versions", key], b""));
    out.as_array()
        .expect("array")
        .iter()
        .map(|v| {
            (
                v["version"].as_u64().expect("version"),
                v["held_as"].as_str().expect("held_as").to_owned(),
                v["root_epoch"].as_u64().expect("root_epoch"),
            )
        })
        .collect()
}

/// (primary_held_as, primary_root_epoch) of `key`, per `kms key describe`.
fn primary_held_as(endpoint: &str, key: &str) -> (String, u64) {
    let out = json(&cli_ok(endpoint, &["--json", "key", "describe", key], b""));
    (
        out["primary_held_as"].as_str().expect("held as").to_owned(),
        out["primary_root_epoch"].as_u64().expect("epoch"),
    )
}

fn audit_verifies(endpoint: &str) {
    let report = json(&cli_ok(endpoint, &["--json", "audit", "verify"], b""));
    assert_eq!(report["valid"], true, "{report}");
    assert!(
        report["checkpoints_verified"].as_u64().expect("count") >= 1,
        "{report}"
    );
}

#[test]
fn a_database_and_token_from_before_wrapped_versions_open_and_decrypt() {
    let temp = tempfile::tempdir().expect("temp dir");
    let data = fixture_copy(temp.path());
    let manifest = manifest();
    let key_a = manifest["key_a"].as_str().expect("key a").to_owned();
    let key_b = manifest["key_b"].as_str().expect("key b").to_owned();
    let token = "TOKEN_OBJECT".to_owned();
    let wrapped = "WRAPPED".to_owned();
    // What the old build left: one token object per version and the audit
    // checkpoint key, no root.
    let before = dev_token_object_labels(&data);
    assert_eq!(before.len(), 5, "{before:?}");
    assert!(before.contains(&"kms-audit-hmac/v1".to_owned()));
    assert!(!before.iter().any(|l| l.starts_with("kms-root/")));

    let mut server = DevServerProcess::start(&data);
    let ep = server.endpoint();
    assert_eq!(decrypt_all(&ep, &manifest), 4);
    assert_eq!(
        held_as(&ep, &key_a),
        vec![
            (1, token.clone(), 0),
            (2, token.clone(), 0),
            (3, token.clone(), 0)
        ]
    );
    let described = json(&cli_ok(
        &ep,
        &["--json", "key", "describe", "alias/fixture-a"],
        b"",
    ));
    assert_eq!(described["key_id"], key_a.as_str());
    assert_eq!(primary_held_as(&ep, &key_a), (token.clone(), 0));
    assert_eq!(primary_held_as(&ep, &key_b), (token.clone(), 0));
    audit_verifies(&ep);

    // A rotation: the new version is wrapped under the root dev mode made.
    cli_ok(&ep, &["key", "rotate", &key_a], b"");
    assert_eq!(
        held_as(&ep, &key_a),
        vec![
            (1, token.clone(), 0),
            (2, token.clone(), 0),
            (3, token.clone(), 0),
            (4, wrapped.clone(), 1)
        ]
    );
    assert_eq!(primary_held_as(&ep, &key_a), (wrapped.clone(), 1));
    let text = String::from_utf8(cli_ok(&ep, &["key", "describe", &key_a], b"")).expect("utf-8");
    assert!(
        text.lines()
            .any(|l| l.starts_with("Primary held as") && l.ends_with("wrapped (root 1)")),
        "{text}"
    );
    let new = cli_ok(
        &ep,
        &["encrypt", "--key", "alias/fixture-a"],
        b"under the wrapped v4",
    );
    assert_eq!(cli_ok(&ep, &["decrypt"], &new), b"under the wrapped v4");
    assert_eq!(decrypt_all(&ep, &manifest), 4);
    server.terminate();

    // The root was added; the old checkpoint key was kept, no migration.
    let after = dev_token_object_labels(&data);
    assert_eq!(after.len(), 6, "{after:?}");
    assert!(after.contains(&"kms-root/1".to_owned()));
    assert!(after.contains(&"kms-audit-hmac/v1".to_owned()));

    // After a restart, everything again.
    let server = DevServerProcess::start(&data);
    let ep = server.endpoint();
    assert_eq!(decrypt_all(&ep, &manifest), 4);
    assert_eq!(cli_ok(&ep, &["decrypt"], &new), b"under the wrapped v4");
    assert_eq!(held_as(&ep, &key_a).len(), 4);
    audit_verifies(&ep);
}
