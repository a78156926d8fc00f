//! The README's path as a user walks it: `kms serve --dev` as a real process,
//! the CLI against it, a restart that reuses the dev token and database.

use kms_tests::{DevServerProcess, run_cli};

fn cli_ok(endpoint: &str, args: &[&str], stdin: &[u8]) -> Vec<u8> {
    let (ok, stdout, stderr) = run_cli(endpoint, args, stdin);
    assert!(ok, "kms {args:?} failed: {stderr}");
    stdout
}

#[tokio::test]
async fn dev_mode_and_the_cli_round_trip_and_survive_a_restart() {
    let data = tempfile::tempdir().expect("data dir");
    let work = tempfile::tempdir().expect("work dir");
    let secret_file = work.path().join("secret.bin");
    let secret_path = secret_file.to_str().expect("utf8 path").to_owned();

    let server = DevServerProcess::start(data.path());
    assert!(
        server.banner.contains("dev mode, data created"),
        "{}",
        server.banner
    );
    let endpoint = server.endpoint();
    let ep = endpoint.clone();
    let secret = secret_path.clone();
    let key_id = tokio::task::spawn_blocking(move || {
        let created = cli_ok(
            &ep,
            &[
                "--json",
                "key",
                "create",
                "--description",
                "cli test",
                "--alias",
                "alias/cli",
            ],
            b"",
        );
        let json: serde_json::Value = serde_json::from_slice(&created).expect("json");
        let key_id = json
            .pointer("/key_metadata/key_id")
            .or_else(|| json.pointer("/key_id"))
            .and_then(|v| v.as_str())
            .unwrap_or_else(|| panic!("no key id in {json}"))
            .to_owned();
        assert!(key_id.starts_with("key-"), "{key_id}");

        // A first rotation at a chosen time (SetRotationPolicy.next_rotation_time).
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let next = prost_types::Timestamp {
            seconds: i64::try_from(now).expect("seconds") + 3600,
            nanos: 0,
        }
        .to_string();
        let policy = cli_ok(
            &ep,
            &[
                "--json",
                "key",
                "rotation-policy",
                "alias/cli",
                "--period-days",
                "30",
                "--next-rotation",
                &next,
            ],
            b"",
        );
        let policy: serde_json::Value = serde_json::from_slice(&policy).expect("json");
        let shown = policy
            .pointer("/key_metadata/next_rotation_time")
            .or_else(|| policy.pointer("/next_rotation_time"))
            .and_then(|v| v.as_str())
            .unwrap_or_else(|| panic!("no next rotation in {policy}"));
        assert_eq!(shown, next, "{policy}");

        cli_ok(
            &ep,
            &[
                "encrypt",
                "--key",
                "alias/cli",
                "--context",
                "tenant=acme",
                "--out",
                &secret,
            ],
            b"the quick brown fox",
        );
        let opened = cli_ok(
            &ep,
            &["decrypt", "--in", &secret, "--context", "tenant=acme"],
            b"",
        );
        assert_eq!(opened, b"the quick brown fox");
        // Wrong context: non-zero exit, generic message, no plaintext.
        let (ok, out, err) = run_cli(
            &ep,
            &["decrypt", "--in", &secret, "--context", "tenant=evil"],
            b"",
        );
        assert!(!ok);
        assert!(out.is_empty());
        assert!(
            err.contains("INVALID_ARGUMENT") && err.contains("invalid ciphertext"),
            "{err}"
        );

        cli_ok(&ep, &["key", "rotate", "alias/cli"], b"");
        let versions =
            String::from_utf8(cli_ok(&ep, &["key", "versions", "alias/cli"], b"")).expect("utf8");
        assert!(versions.lines().count() >= 3, "{versions}");
        assert_eq!(
            cli_ok(
                &ep,
                &["decrypt", "--in", &secret, "--context", "tenant=acme"],
                b""
            ),
            b"the quick brown fox"
        );

        let data_key = cli_ok(
            &ep,
            &[
                "--json",
                "data-key",
                "--key",
                "alias/cli",
                "--spec",
                "aes-256",
            ],
            b"",
        );
        let json: serde_json::Value = serde_json::from_slice(&data_key).expect("json");
        assert!(json.to_string().contains("plaintext"), "{json}");

        let listed = String::from_utf8(cli_ok(&ep, &["key", "list"], b"")).expect("utf8");
        assert!(listed.contains(&key_id), "{listed}");
        let audit = String::from_utf8(cli_ok(&ep, &["audit", "list", "--key", &key_id], b""))
            .expect("utf8");
        assert!(
            audit.contains("Encrypt") && audit.contains("Decrypt"),
            "{audit}"
        );
        cli_ok(&ep, &["audit", "verify"], b"");
        key_id
    })
    .await
    .expect("cli steps");
    server.kill();

    // Second run reuses the token and the database.
    let server = DevServerProcess::start(data.path());
    assert!(
        server.banner.contains("dev mode, data reused"),
        "{}",
        server.banner
    );
    let endpoint = server.endpoint();
    tokio::task::spawn_blocking(move || {
        assert_eq!(
            cli_ok(
                &endpoint,
                &["decrypt", "--in", &secret_path, "--context", "tenant=acme"],
                b""
            ),
            b"the quick brown fox"
        );
        let described =
            String::from_utf8(cli_ok(&endpoint, &["key", "describe", "alias/cli"], b""))
                .expect("utf8");
        assert!(described.contains(&key_id), "{described}");
        cli_ok(&endpoint, &["audit", "verify"], b"");
    })
    .await
    .expect("after restart");
    drop(server);

    // The PIN files are private.
    use std::os::unix::fs::PermissionsExt;
    for pin in ["softhsm/user.pin", "softhsm/so.pin"] {
        let mode = std::fs::metadata(data.path().join(pin))
            .expect("pin file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{pin} is readable by others: {mode:o}");
    }
}

#[test]
fn dev_mode_refuses_a_non_loopback_address() {
    let data = tempfile::tempdir().expect("data dir");
    let output = std::process::Command::new(kms_tests::kms_binary())
        .args(["serve", "--dev", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(data.path())
        .output()
        .expect("run");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("loopback"), "{stderr}");
}

/// `kms audit export | head -1`: the reader closes the pipe early. The CLI
/// ends quietly with success, like any Unix filter, instead of printing
/// "Broken pipe" as an error.
#[test]
fn a_closed_output_pipe_is_not_an_error() {
    let data = tempfile::tempdir().expect("data dir");
    let server = DevServerProcess::start(data.path());
    let endpoint = server.endpoint();
    for _ in 0..3 {
        cli_ok(&endpoint, &["key", "create"], b"");
    }
    for args in [&["audit", "export"][..], &["--json", "key", "list"][..]] {
        let mut child = std::process::Command::new(kms_tests::kms_binary())
            .arg("--endpoint")
            .arg(&endpoint)
            .args(args)
            .env("KMS_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn kms");
        // The reader is gone before the CLI writes anything: every write
        // fails with EPIPE (Rust ignores SIGPIPE).
        drop(child.stdout.take());
        let output = child.wait_with_output().expect("kms output");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "kms {args:?}: {stderr}");
        assert!(stderr.is_empty(), "kms {args:?}: {stderr}");
    }
}

/// `kms key create --alias` with an alias already in use (or malformed)
/// creates nothing: before, the key was made and left without its alias.
#[tokio::test]
async fn key_create_with_a_taken_or_bad_alias_creates_nothing() {
    use kms_proto::v1 as pb;
    let env = kms_tests::TestEnv::new();
    let server = env.start().await;
    let endpoint = server.endpoint.clone();
    let (first, taken, bad) = tokio::task::spawn_blocking(move || {
        let first = run_cli(
            &endpoint,
            &["--json", "key", "create", "--alias", "alias/taken"],
            b"",
        );
        let taken = run_cli(&endpoint, &["key", "create", "--alias", "alias/taken"], b"");
        let bad = run_cli(&endpoint, &["key", "create", "--alias", "no-prefix"], b"");
        (first, taken, bad)
    })
    .await
    .expect("join");
    assert!(first.0, "{}", first.2);
    assert!(!taken.0, "a taken alias is refused");
    assert!(
        taken.2.contains("ALREADY_EXISTS")
            && taken.2.contains("alias/taken already names key key-")
            && taken.2.contains("nothing was created"),
        "{}",
        taken.2
    );
    assert!(!bad.0, "a malformed alias is refused");
    assert!(
        bad.2.contains("INVALID_ARGUMENT") && bad.2.contains("nothing was created"),
        "{}",
        bad.2
    );
    let keys = server
        .keys()
        .list_keys(pb::ListKeysRequest::default())
        .await
        .expect("ListKeys")
        .into_inner()
        .keys;
    assert_eq!(keys.len(), 1, "only the first key exists: {keys:?}");
    server.stop().await;
}
