//! `kms envelope rewrap` (issue 18, item 4) against a real server: envelope
//! files written, the key rotated, the files rewrapped — every one decrypts,
//! its body (the bytes after the header) is byte-identical, its wrapped key
//! is now under the new version (kms Decrypt says which version unwrapped
//! it); a second run finds everything current and changes nothing; a rewrap
//! to another key; per-file failures (not an envelope, truncated header,
//! missing file, a directory, a version 1 envelope) reported while the other
//! files are done; the CLI killed with SIGKILL at random points and run
//! again until done, every file rewrapped once and decrypting; the
//! independent Python decryptor on a rewrapped file.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kms_client::envelope::rewrap::{FileFailure, HeaderOutcome, TEMP_SUFFIX};
use kms_client::envelope::{self, EnvelopeError, FormatVersion, Header};
use kms_client::{ClientConfig, EncryptionContext, Envelope, KmsClient, Rewrapper, proto as pb};
use kms_tests::{TestEnv, TestServer, kms_binary, run_cli};

use super::create_key;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/envelope_check.py");

async fn client(server: &TestServer) -> KmsClient {
    KmsClient::connect(ClientConfig::new(server.endpoint.clone()))
        .await
        .expect("connect kms-client")
}

fn context_of(name: &str) -> EncryptionContext {
    EncryptionContext::new([("file", name), ("tenant", "acme")]).expect("context")
}

fn data(seed: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 31 + seed * 7) % 253) as u8)
        .collect()
}

/// Writes `name` in `dir`: an envelope of `plain` under `key`.
async fn write_envelope(envelope: &Envelope, key: &str, dir: &Path, name: &str, plain: &[u8]) {
    let mut out = Vec::new();
    envelope
        .encrypt(key, &context_of(name), &mut &plain[..], &mut out)
        .await
        .expect("envelope encrypt");
    std::fs::write(dir.join(name), out).expect("write envelope");
}

/// (header, body) of an envelope file.
async fn split(path: &Path) -> (envelope::Header, Vec<u8>) {
    let bytes = std::fs::read(path).expect("read envelope");
    let header = envelope::read_header(&mut &bytes[..])
        .await
        .expect("header");
    let body = bytes[header.as_bytes().len()..].to_vec();
    (header, body)
}

/// The key id and version kms unwraps the file's data key with.
async fn unwrapped_by(kms: &KmsClient, path: &Path, name: &str) -> (String, u32) {
    let (header, _) = split(path).await;
    let reply = kms
        .decrypt(pb::DecryptRequest {
            ciphertext_blob: header.wrapped_data_key().to_vec(),
            encryption_context: context_of(name).to_proto_map(),
            key_id: String::new(),
        })
        .await
        .expect("unwrap the data key");
    (reply.key_id, reply.key_version)
}

async fn open(envelope: &Envelope, path: &Path, name: &str, key: Option<&str>) -> Vec<u8> {
    let bytes = std::fs::read(path).expect("read envelope");
    let mut out = Vec::new();
    envelope
        .decrypt(key, &context_of(name), &mut &bytes[..], &mut out)
        .await
        .expect("envelope decrypt");
    out
}

/// Runs `kms envelope rewrap --json ARGS`; returns (success, summary, stderr).
async fn rewrap_cli(endpoint: &str, args: Vec<String>) -> (bool, serde_json::Value, String) {
    let endpoint = endpoint.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut full = vec!["--json".to_owned(), "envelope".into(), "rewrap".into()];
        full.extend(args);
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        let (ok, stdout, stderr) = run_cli(&endpoint, &refs, b"");
        let summary = serde_json::from_slice(&stdout)
            .unwrap_or_else(|e| panic!("JSON summary ({e}): {stderr}"));
        (ok, summary, stderr)
    })
    .await
    .expect("join")
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("list")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(TEMP_SUFFIX))
        .collect()
}

#[tokio::test]
async fn rewrap_moves_envelopes_to_the_new_version_and_keeps_their_bodies() {
    let env = TestEnv::new();
    let server = env.start().await;
    let key = create_key(&server, "files").await;
    let other = create_key(&server, "other").await;
    let kms = client(&server).await;
    let envelope = Envelope::new(kms.clone())
        .with_chunk_size(4096)
        .expect("chunk");
    let work = tempfile::tempdir().expect("work dir");
    let dir = work.path();

    // Nine v2 envelopes of 0 B to 200 kB (empty, one chunk, exact chunks, many).
    let sizes = [0, 1, 4095, 4096, 4097, 12_288, 50_000, 100_001, 200_000];
    let names: Vec<String> = (0..sizes.len()).map(|i| format!("f{i}.kmse")).collect();
    let mut plain = HashMap::new();
    for (i, (name, len)) in names.iter().zip(sizes).enumerate() {
        let bytes = data(i, len);
        write_envelope(&envelope, &key, dir, name, &bytes).await;
        plain.insert(name.clone(), bytes);
    }
    // Permission bits are kept by the replacement, and so is the owner
    // (changed only where the test runs as root and so may chown).
    let f0 = dir.join(&names[0]);
    std::fs::set_permissions(&f0, std::os::unix::fs::PermissionsExt::from_mode(0o640))
        .expect("chmod");
    let f1 = dir.join(&names[1]);
    let may_chown = std::os::unix::fs::chown(&f1, Some(4321), Some(4322)).is_ok();
    let owner = |path: &Path| {
        let meta = std::fs::metadata(path).expect("stat");
        (
            std::os::unix::fs::MetadataExt::uid(&meta),
            std::os::unix::fs::MetadataExt::gid(&meta),
        )
    };
    let f1_owner = owner(&f1);
    // A v1 envelope (still written for old readers), and files that fail.
    let v1 = Envelope::new(kms.clone()).with_format_version(FormatVersion::V1);
    write_envelope(&v1, &key, dir, "old.kmse", b"version one").await;
    std::fs::write(dir.join("plain.txt"), b"just some text, not an envelope").expect("write");
    let whole = std::fs::read(dir.join(&names[3])).expect("read");
    std::fs::write(dir.join("truncated.kmse"), &whole[..60]).expect("write");
    std::fs::create_dir(dir.join("a-directory.kmse")).expect("mkdir");
    let before: HashMap<String, Vec<u8>> = names
        .iter()
        .chain(["old.kmse".to_owned()].iter())
        .map(|n| (n.clone(), std::fs::read(dir.join(n)).expect("read")))
        .collect();
    for name in &names {
        assert_eq!(unwrapped_by(&kms, &dir.join(name), name).await.1, 1);
    }

    kms.rotate_key(pb::RotateKeyRequest {
        key_id: key.clone(),
    })
    .await
    .expect("rotate to version 2");

    // A crashed run's leftover beside a file to rewrap: replaced, then gone.
    std::fs::write(dir.join(format!("{}{TEMP_SUFFIX}", names[3])), b"junk").expect("stale");

    // The good files interleaved with the bad ones, in batches of 4.
    let path = |n: &str| dir.join(n).to_str().expect("utf8").to_owned();
    let mut args: Vec<String> = vec!["--batch-size".into(), "4".into()];
    let bad = [
        "plain.txt",
        "old.kmse",
        "truncated.kmse",
        "missing.kmse",
        "a-directory.kmse",
    ];
    for (i, name) in names.iter().enumerate() {
        args.push(path(name));
        if let Some(b) = bad.get(i) {
            args.push(path(b));
        }
    }
    let (ok, summary, stderr) = rewrap_cli(&server.endpoint, args).await;
    assert!(!ok, "failed files make the command fail");
    assert!(stderr.contains("5 of 14 files failed"), "{stderr}");
    assert_eq!(summary["files"], 14, "{summary}");
    assert_eq!(summary["rewrapped"], 9, "{summary}");
    assert_eq!(summary["already_current"], 0, "{summary}");
    assert_eq!(summary["failed"], 5, "{summary}");
    let codes: HashMap<String, (String, String)> = summary["failures"]
        .as_array()
        .expect("failures")
        .iter()
        .map(|f| {
            let name = Path::new(f["path"].as_str().expect("path"))
                .file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned();
            let code = f["code"].as_str().expect("code").to_owned();
            (name, (code, f["message"].as_str().expect("msg").to_owned()))
        })
        .collect();
    assert_eq!(codes["plain.txt"].0, "NOT_AN_ENVELOPE");
    assert_eq!(codes["truncated.kmse"].0, "NOT_AN_ENVELOPE");
    assert_eq!(codes["old.kmse"].0, "ENVELOPE_V1");
    assert!(
        codes["old.kmse"].1.contains("kms envelope decrypt"),
        "the v1 refusal names the fix: {}",
        codes["old.kmse"].1
    );
    assert_eq!(codes["missing.kmse"].0, "IO");
    assert!(codes["missing.kmse"].1.contains("cannot open"), "{codes:?}");
    assert_eq!(codes["a-directory.kmse"].0, "IO");
    // The failed files are untouched.
    assert_eq!(
        std::fs::read(dir.join("old.kmse")).expect("read"),
        before["old.kmse"]
    );
    assert_eq!(
        std::fs::read(dir.join("truncated.kmse")).expect("read"),
        &whole[..60]
    );

    for name in &names {
        let file = dir.join(name);
        let (old_header, old_body) = split_bytes(&before[name]).await;
        let (header, body) = split(&file).await;
        assert!(body == old_body, "{name}: the body is byte-identical");
        assert_eq!(header.version(), FormatVersion::V2);
        assert_eq!(header.message_id(), old_header.message_id());
        assert_eq!(header.chunk_size(), old_header.chunk_size());
        assert_eq!(header.context(), old_header.context());
        assert_ne!(header.wrapped_data_key(), old_header.wrapped_data_key());
        assert_eq!(
            unwrapped_by(&kms, &file, name).await,
            (key.clone(), 2),
            "{name}: the data key is now under version 2"
        );
        assert!(open(&envelope, &file, name, Some(&key)).await == plain[name]);
    }
    let mode = std::fs::metadata(&f0).expect("stat").permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o640
    );
    assert_eq!(owner(&f1), f1_owner, "the owner is kept");
    if may_chown {
        assert_eq!(f1_owner, (4321, 4322));
    }
    // The v1 file still decrypts as it was.
    assert_eq!(
        open(&envelope, &dir.join("old.kmse"), "old.kmse", None).await,
        b"version one"
    );
    assert!(leftovers(dir).is_empty(), "{:?}", leftovers(dir));

    // Python, from the README alone, decrypts a rewrapped v2 file.
    python_decrypts(&kms, &dir.join(&names[6]), &names[6], &plain[&names[6]]).await;

    // Again, from a list (with a blank line), plus a stale temporary file of
    // a crashed run: everything is current, nothing changes, the leftover goes.
    let list = dir.join("list.txt");
    let mut text: String = names.iter().map(|n| format!("{}\n", path(n))).collect();
    text.push('\n');
    std::fs::write(&list, text).expect("list");
    std::fs::write(dir.join(format!("{}{TEMP_SUFFIX}", names[2])), b"junk").expect("stale");
    let rewrapped: HashMap<String, Vec<u8>> = names
        .iter()
        .map(|n| (n.clone(), std::fs::read(dir.join(n)).expect("read")))
        .collect();
    let (ok, summary, stderr) =
        rewrap_cli(&server.endpoint, vec!["--in".into(), path("list.txt")]).await;
    assert!(ok, "{stderr}");
    assert_eq!(
        (
            &summary["files"],
            &summary["already_current"],
            &summary["rewrapped"]
        ),
        (&9.into(), &9.into(), &0.into()),
        "{summary}"
    );
    for name in &names {
        assert!(
            std::fs::read(dir.join(name)).expect("read") == rewrapped[name],
            "{name} unchanged by the second run"
        );
    }
    assert!(leftovers(dir).is_empty(), "{:?}", leftovers(dir));

    // To another key: the data key moves to `other`, the body stays.
    let (ok, summary, stderr) = rewrap_cli(
        &server.endpoint,
        vec![
            "--destination-key".into(),
            other.clone(),
            "--in".into(),
            path("list.txt"),
        ],
    )
    .await;
    assert!(ok, "{stderr}");
    assert_eq!(summary["rewrapped"], 9, "{summary}");
    for name in &names {
        let file = dir.join(name);
        let (_, body) = split(&file).await;
        let (_, old_body) = split_bytes(&before[name]).await;
        assert!(body == old_body, "{name}: the body is byte-identical");
        assert_eq!(unwrapped_by(&kms, &file, name).await, (other.clone(), 1));
        assert!(open(&envelope, &file, name, Some(&other)).await == plain[name]);
        // Pinned to the old key, it is refused.
        let bytes = std::fs::read(&file).expect("read");
        let refused = envelope
            .decrypt(
                Some(&key),
                &context_of(name),
                &mut &bytes[..],
                &mut Vec::new(),
            )
            .await;
        assert!(
            matches!(refused, Err(EnvelopeError::Invalid)),
            "{refused:?}"
        );
    }
    server.stop().await;
}

async fn split_bytes(bytes: &[u8]) -> (envelope::Header, Vec<u8>) {
    let header = envelope::read_header(&mut &bytes[..])
        .await
        .expect("header");
    (header.clone(), bytes[header.as_bytes().len()..].to_vec())
}

async fn python_decrypts(kms: &KmsClient, file: &Path, name: &str, plain: &[u8]) {
    let (header, _) = split(file).await;
    let data_key = kms
        .decrypt(pb::DecryptRequest {
            ciphertext_blob: header.wrapped_data_key().to_vec(),
            encryption_context: context_of(name).to_proto_map(),
            key_id: String::new(),
        })
        .await
        .expect("unwrap")
        .plaintext;
    let out = file.with_extension("python");
    let (file, out_path) = (file.to_owned(), out.clone());
    let name = name.to_owned();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(SCRIPT)
            .args(["decrypt", "--data-key", &hex::encode(data_key), "--in"])
            .arg(&file)
            .arg("--out")
            .arg(&out_path)
            .args([
                "--context",
                &format!("file={name}"),
                "--context",
                "tenant=acme",
            ])
            .output()
            .expect("run python3")
    })
    .await
    .expect("join");
    assert!(
        output.status.success(),
        "python: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(std::fs::read(&out).expect("python output") == plain);
    let _ = std::fs::remove_file(out);
}

#[tokio::test]
async fn the_library_rewraps_headers_and_kms_authenticates_the_v2_wrapped_key() {
    let env = TestEnv::new();
    let server = env.start().await;
    let key = create_key(&server, "lib").await;
    let kms = client(&server).await;
    let envelope = Envelope::new(kms.clone());
    let mut sealed = Vec::new();
    envelope
        .encrypt(
            &key,
            &context_of("x"),
            &mut &b"attack at dawn"[..],
            &mut sealed,
        )
        .await
        .expect("encrypt");
    let header = envelope::read_header(&mut &sealed[..])
        .await
        .expect("header");
    let body = sealed[header.as_bytes().len()..].to_vec();

    // Every byte of the wrapped key flipped: kms refuses the unwrap, so the
    // envelope is invalid although the message key does not cover it.
    let at = header.as_bytes().len() - header.context().canonical_bytes().len() - 4;
    let wrapped = at - header.wrapped_data_key().len()..at;
    for byte in wrapped {
        let mut bad = sealed.clone();
        bad[byte] ^= 0x01;
        let result = envelope
            .decrypt(None, &context_of("x"), &mut &bad[..], &mut Vec::new())
            .await;
        assert!(
            matches!(result, Err(EnvelopeError::Invalid)),
            "byte {byte}: {result:?}"
        );
    }

    let rewrapper = Rewrapper::new(kms.clone());
    let current = rewrapper.rewrap_header(&header).await.expect("call");
    assert!(
        matches!(&current, HeaderOutcome::AlreadyCurrent { current } if current.version == 1),
        "{current:?}"
    );
    kms.rotate_key(pb::RotateKeyRequest {
        key_id: key.clone(),
    })
    .await
    .expect("rotate");
    let HeaderOutcome::Rewrapped {
        header: new_header,
        from,
        to,
    } = rewrapper.rewrap_header(&header).await.expect("call")
    else {
        panic!("not rewrapped");
    };
    assert_eq!((from.version, to.version), (1, 2));
    assert_eq!(
        (from.key_id.as_str(), to.key_id.as_str()),
        (key.as_str(), key.as_str())
    );
    let mut moved = new_header.as_bytes().to_vec();
    moved.extend_from_slice(&body);
    let mut out = Vec::new();
    envelope
        .decrypt(Some(&key), &context_of("x"), &mut &moved[..], &mut out)
        .await
        .expect("the old body under the new header");
    assert_eq!(out, b"attack at dawn");

    // A v1 header is refused without a call, naming the fix.
    let v1 = Header::new_with_version(
        FormatVersion::V1,
        4096,
        header.wrapped_data_key().to_vec(),
        context_of("x"),
    )
    .expect("v1 header");
    let refused = rewrapper.rewrap_header(&v1).await.expect("no call");
    assert!(
        matches!(refused, HeaderOutcome::Failed(FileFailure::Version1)),
        "{refused:?}"
    );
    // A wrong context: the server refuses the item.
    let foreign =
        Header::new(4096, header.wrapped_data_key().to_vec(), context_of("y")).expect("header");
    let refused = rewrapper.rewrap_header(&foreign).await.expect("call");
    assert!(
        matches!(&refused, HeaderOutcome::Failed(FileFailure::Refused { code, .. }) if code == "INVALID_ARGUMENT"),
        "{refused:?}"
    );
    server.stop().await;
}

/// Successful BatchReEncrypt audit records of `key` naming `version` (the
/// source record of each item).
async fn re_encrypts_from(server: &TestServer, key: &str, version: u32) -> usize {
    let mut count = 0;
    let mut page_token = String::new();
    loop {
        let page = server
            .audit()
            .list_audit_events(pb::ListAuditEventsRequest {
                key_id: key.to_owned(),
                operation: pb::Operation::BatchReEncrypt as i32,
                page_size: 1000,
                page_token,
                ..Default::default()
            })
            .await
            .expect("list audit events")
            .into_inner();
        count += page
            .events
            .iter()
            .filter(|e| e.key_version == version && e.result_code == 0)
            .count();
        if page.next_page_token.is_empty() {
            return count;
        }
        page_token = page.next_page_token;
    }
}

/// A small xorshift generator: kill points reproducible from the printed seed.
struct Random(u64);

impl Random {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

const KILL_FILES: usize = 300;

#[tokio::test(flavor = "multi_thread")]
async fn the_rewrap_command_survives_sigkills_and_rewraps_each_file_once() {
    let env = TestEnv::new();
    let server = env.start().await;
    let key = create_key(&server, "killed").await;
    let kms = client(&server).await;
    let envelope = Envelope::new(kms.clone())
        .with_chunk_size(1024)
        .expect("chunk");
    let work = tempfile::tempdir().expect("work dir");
    let dir = work.path().join("files");
    std::fs::create_dir(&dir).expect("mkdir");
    let names: Vec<String> = (0..KILL_FILES).map(|i| format!("e{i:03}.kmse")).collect();
    let mut before = HashMap::new();
    for (i, name) in names.iter().enumerate() {
        write_envelope(&envelope, &key, &dir, name, &data(i, 500 + 37 * i)).await;
        before.insert(name.clone(), std::fs::read(dir.join(name)).expect("read"));
    }
    let list = work.path().join("list");
    let text: String = names
        .iter()
        .map(|n| format!("{}\n", dir.join(n).display()))
        .collect();
    std::fs::write(&list, text).expect("list");
    kms.rotate_key(pb::RotateKeyRequest {
        key_id: key.clone(),
    })
    .await
    .expect("rotate");

    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as u64
        | 1;
    eprintln!("kill schedule seed {seed}");
    let endpoint = server.endpoint.clone();
    let (list_path, dir_path) = (list.clone(), dir.clone());
    let names_copy = names.clone();
    let before_copy = before.clone();
    // Progress: files whose header (first 160 bytes: the wrapped key is
    // within) differs from the original's.
    let done = move || {
        names_copy
            .iter()
            .filter(|n| {
                let head = |bytes: &[u8]| bytes[..160.min(bytes.len())].to_vec();
                let now = std::fs::read(dir_path.join(n)).map(|b| head(&b)).ok();
                now != before_copy.get(*n).map(|b| head(b))
            })
            .count()
    };
    let (kills, summary, seen_rewrapped) = tokio::task::spawn_blocking(move || {
        let mut random = Random(seed);
        let run = || {
            Command::new(kms_binary())
                .args(["--endpoint", &endpoint, "--json", "envelope", "rewrap"])
                .args(["--batch-size", "7", "--in"])
                .arg(&list_path)
                .env("KMS_LOG", "error")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn kms envelope rewrap")
        };
        // 8 kills, each once a random number of further files is done, then a
        // random 0-30 ms later, so that they land in every phase (call in
        // flight, temporary file half written, rename, directory sync).
        let mut kills = 0;
        let mut child = run();
        for _ in 0..8 {
            let target = (done() + 1 + random.below(30) as usize).min(KILL_FILES - 1);
            while done() < target && child.try_wait().expect("try_wait").is_none() {
                std::thread::sleep(Duration::from_millis(10));
            }
            std::thread::sleep(Duration::from_millis(random.below(30)));
            if child.try_wait().expect("try_wait").is_some() {
                break;
            }
            child.kill().expect("SIGKILL");
            child.wait().expect("reap");
            kills += 1;
            child = run();
        }
        let finished = child.wait_with_output().expect("wait");
        assert!(
            finished.status.success(),
            "{}",
            String::from_utf8_lossy(&finished.stderr)
        );
        let summary: serde_json::Value =
            serde_json::from_slice(&finished.stdout).expect("JSON summary");
        (kills, summary, done())
    })
    .await
    .expect("kill loop");
    eprintln!("killed {kills} times; last run {summary}");
    assert!(kills >= 5, "the run finished after only {kills} kills");
    assert_eq!(seen_rewrapped, KILL_FILES);
    // The last run finished what the killed ones left: together, every file.
    assert_eq!(summary["files"], KILL_FILES);
    assert_eq!(summary["failed"], 0, "{summary}");
    let last_rewrapped = summary["rewrapped"].as_u64().expect("count");
    assert!(last_rewrapped < KILL_FILES as u64, "{summary}");
    assert!(leftovers(&dir).is_empty(), "{:?}", leftovers(&dir));

    // Every file: version 2, the same body, decrypts.
    let mut after = HashMap::new();
    for (i, name) in names.iter().enumerate() {
        let file = dir.join(name);
        let (_, body) = split(&file).await;
        let (_, old_body) = split_bytes(&before[name]).await;
        assert!(body == old_body, "{name}: the body is byte-identical");
        assert_eq!(unwrapped_by(&kms, &file, name).await, (key.clone(), 2));
        assert!(open(&envelope, &file, name, None).await == data(i, 500 + 37 * i));
        after.insert(name.clone(), std::fs::read(&file).expect("read"));
    }
    // Re-encrypted out of version 1 at least once per file, and again only
    // for the batch (7 files) in flight at each kill.
    let from_v1 = re_encrypts_from(&server, &key, 1).await;
    eprintln!("{from_v1} items re-encrypted out of version 1");
    assert!(
        (KILL_FILES..=KILL_FILES + 7 * kills).contains(&from_v1),
        "{from_v1} BatchReEncrypt items out of version 1 for {KILL_FILES} files and {kills} kills"
    );
    // Rewrapped once: another run changes no byte of any file.
    let (ok, summary, stderr) = rewrap_cli(
        &server.endpoint,
        vec!["--in".into(), list.to_str().expect("utf8").into()],
    )
    .await;
    assert!(ok, "{stderr}");
    assert_eq!(summary["already_current"], KILL_FILES, "{summary}");
    for name in &names {
        assert!(
            std::fs::read(dir.join(name)).expect("read") == after[name],
            "{name} changed on the re-run"
        );
    }
    server.stop().await;
}
