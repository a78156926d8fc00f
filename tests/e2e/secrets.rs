//! Secrets never reach the disk: after real traffic, no file of the database
//! or of the SoftHSM2 token contains a plaintext or data key that was sent or
//! received, nor does the audit export.

use std::path::Path;

use kms_proto::v1 as pb;
use kms_tests::TestEnv;

use super::{create_key, ctx, decrypt, encrypt};

fn files_under(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

#[tokio::test]
async fn no_plaintext_or_data_key_is_written_to_disk_or_the_audit_log() {
    let env = TestEnv::new();
    let server = env.start().await;
    let key = create_key(&server, "leak check").await;
    let mut secrets: Vec<Vec<u8>> = Vec::new();
    for i in 0..20u8 {
        let plaintext: Vec<u8> = format!("SECRET-PLAINTEXT-{i:02}-q8Zr7vKx").into_bytes();
        let sealed = encrypt(&server, &key, &plaintext, &[("tenant", "acme")]).await;
        let opened = decrypt(&server, &sealed.ciphertext_blob, &[("tenant", "acme")])
            .await
            .expect("decrypt");
        assert_eq!(opened.plaintext, plaintext);
        secrets.push(plaintext);
        let dk = server
            .crypto()
            .generate_data_key(pb::GenerateDataKeyRequest {
                key_id: key.clone(),
                encryption_context: ctx(&[]),
                length: Some(pb::generate_data_key_request::Length::KeySpec(
                    pb::DataKeySpec::Aes256 as i32,
                )),
            })
            .await
            .expect("data key")
            .into_inner();
        secrets.push(dk.plaintext);
    }
    let mut export = Vec::new();
    let exported = server
        .service()
        .export_audit(&Default::default(), &mut export)
        .expect("export");
    assert!(exported >= 60);
    server.stop().await;

    let mut files = Vec::new();
    files_under(&env.db_dir(), &mut files);
    files_under(env.token_dir(), &mut files);
    assert!(files.len() > 3, "nothing to scan?");
    let mut haystacks: Vec<(String, Vec<u8>)> = files
        .iter()
        .map(|f| {
            (
                f.display().to_string(),
                std::fs::read(f).unwrap_or_default(),
            )
        })
        .collect();
    haystacks.push(("audit export".into(), export));
    for (name, bytes) in &haystacks {
        for secret in &secrets {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_slice()),
                "a secret of {} bytes was found in {name}",
                secret.len()
            );
        }
    }
}

/// Every textual form a secret could take in a log line or a file.
fn encodings(secret: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    use base64::Engine as _;
    let debug_prefix = format!("{:?}", &secret[..secret.len().min(8)]);
    vec![
        ("raw", secret.to_vec()),
        ("hex", hex::encode(secret).into_bytes()),
        ("HEX", hex::encode_upper(secret).into_bytes()),
        (
            "base64",
            base64::engine::general_purpose::STANDARD
                .encode(secret)
                .into_bytes(),
        ),
        (
            "base64url",
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(secret)
                .into_bytes(),
        ),
        // `{:?}` of a byte slice, cut before the closing bracket.
        (
            "debug list",
            debug_prefix.trim_end_matches(']').as_bytes().to_vec(),
        ),
    ]
}

fn find_secrets(haystacks: &[(String, Vec<u8>)], secrets: &[Vec<u8>]) -> Vec<String> {
    let mut hits = Vec::new();
    for secret in secrets {
        for (form, needle) in encodings(secret) {
            for (name, bytes) in haystacks {
                // memchr is built optimised (a dependency); a naive window
                // scan of megabytes of logs is slow in a debug test build.
                if memchr::memmem::find(bytes, &needle).is_some() {
                    hits.push(format!("a {}-byte secret ({form}) in {name}", secret.len()));
                }
            }
        }
    }
    hits
}

#[tokio::test]
async fn secrets_never_reach_debug_logs_stdout_the_disk_or_the_audit_export_of_a_real_server() {
    use kms_tests::{DevServerProcess, run_cli};
    let data = tempfile::tempdir().expect("data dir");
    let log_file = data.path().join("server.log");
    let server = DevServerProcess::start_logged(
        &data.path().join("kms"),
        "debug,kms=trace,kms_hsm=trace,kms_storage=trace",
        &log_file,
    );
    // Process hardening: no core dumps (a crash must not write secrets to disk).
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.child.id()))
        .expect("limits of the server process");
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("core limit line");
    assert_eq!(
        core.split_whitespace().skip(4).take(2).collect::<Vec<_>>(),
        ["0", "0"],
        "{core}"
    );
    let channel = tonic::transport::Channel::from_shared(server.endpoint())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut keys = kms_proto::v1::key_management_client::KeyManagementClient::new(channel.clone());
    let mut crypto = kms_proto::v1::crypto_client::CryptoClient::new(channel);
    let mut new_key = async || {
        keys.create_key(pb::CreateKeyRequest::default())
            .await
            .expect("create")
            .into_inner()
            .key_metadata
            .expect("metadata")
            .key_id
    };
    let key = new_key().await;
    let other = new_key().await;

    // Every plaintext and data key sent or received.
    let mut secrets: Vec<Vec<u8>> = Vec::new();
    let context = ctx(&[("tenant", "acme")]);
    for i in 0..10u8 {
        let plaintext = format!("LOG-LEAK-PLAINTEXT-{i:02}-Hq3vP9sZ").into_bytes();
        secrets.push(plaintext.clone());
        let blob = crypto
            .encrypt(pb::EncryptRequest {
                key_id: key.clone(),
                plaintext,
                encryption_context: context.clone(),
            })
            .await
            .expect("encrypt")
            .into_inner()
            .ciphertext_blob;
        let opened = crypto
            .decrypt(pb::DecryptRequest {
                ciphertext_blob: blob.clone(),
                encryption_context: context.clone(),
                key_id: String::new(),
            })
            .await
            .expect("decrypt")
            .into_inner();
        secrets.push(opened.plaintext.to_vec());
        // A failing decrypt (wrong context) must not log what it tried either.
        let _ = crypto
            .decrypt(pb::DecryptRequest {
                ciphertext_blob: blob.clone(),
                encryption_context: ctx(&[("tenant", "other")]),
                key_id: String::new(),
            })
            .await
            .expect_err("wrong context");
        crypto
            .re_encrypt(pb::ReEncryptRequest {
                ciphertext_blob: blob,
                source_encryption_context: context.clone(),
                destination_key_id: other.clone(),
                destination_encryption_context: context.clone(),
                ..Default::default()
            })
            .await
            .expect("re-encrypt");
        let data_key = crypto
            .generate_data_key(pb::GenerateDataKeyRequest {
                key_id: key.clone(),
                encryption_context: context.clone(),
                length: Some(pb::generate_data_key_request::Length::KeySpec(
                    pb::DataKeySpec::Aes256 as i32,
                )),
            })
            .await
            .expect("data key")
            .into_inner();
        secrets.push(data_key.plaintext.to_vec());
        let random = crypto
            .generate_random(pb::GenerateRandomRequest {
                number_of_bytes: 32,
            })
            .await
            .expect("random")
            .into_inner();
        secrets.push(random.random_bytes.to_vec());
    }
    let batch = crypto
        .batch_generate_data_key(pb::BatchGenerateDataKeyRequest {
            key_id: key.clone(),
            entries: (0..20)
                .map(|_| pb::BatchGenerateDataKeyEntry {
                    encryption_context: context.clone(),
                    length: Some(pb::batch_generate_data_key_entry::Length::KeySpec(
                        pb::DataKeySpec::Aes256 as i32,
                    )),
                })
                .collect(),
        })
        .await
        .expect("batch data keys")
        .into_inner();
    for result in batch.results {
        if let Some(pb::batch_generate_data_key_result::Outcome::Result(dk)) = result.outcome {
            secrets.push(dk.plaintext.to_vec());
        }
    }
    assert!(secrets.len() >= 60, "{}", secrets.len());

    let (ok, export, stderr) = run_cli(&server.endpoint(), &["audit", "export"], b"");
    assert!(ok, "{stderr}");
    // A graceful shutdown waits for open connections: close ours and keep
    // the runtime free to do so while the server exits.
    drop((keys, crypto));
    let mut server = tokio::task::spawn_blocking(move || {
        let mut server = server;
        server.terminate();
        server
    })
    .await
    .expect("terminate");
    let stdout = server.take_stdout_rest();
    let log = std::fs::read(&log_file).expect("log");
    assert!(
        log.len() > 1000,
        "the server logged almost nothing at debug level: is the filter applied?"
    );
    // Every log line about a request carries the request's span (rpc, request
    // id, principal), which joins it to the request's audit record: here the
    // refused decrypts (wrong context), logged once each at debug level.
    let text = String::from_utf8_lossy(&log);
    let refused: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("request refused"))
        .collect();
    assert!(refused.len() >= 10, "refusals not logged:\n{text}");
    for line in &refused {
        assert!(
            line.contains("rpc{") && line.contains("request_id=") && line.contains("principal=dev"),
            "a request's log line without its span: {line}"
        );
    }
    assert!(
        refused.iter().any(|line| line.contains("rpc=\"Decrypt\"")),
        "{refused:#?}"
    );

    let mut haystacks = vec![
        ("server log (debug)".to_owned(), log),
        ("server stdout".to_owned(), stdout),
        ("audit export".to_owned(), export),
        ("CLI stderr".to_owned(), stderr.into_bytes()),
    ];
    let mut files = Vec::new();
    files_under(&data.path().join("kms"), &mut files);
    assert!(files.len() > 5, "nothing to scan?");
    for file in files {
        haystacks.push((
            file.display().to_string(),
            std::fs::read(&file).unwrap_or_default(),
        ));
    }
    // The scanner itself finds a planted secret in every form.
    for (form, needle) in encodings(&secrets[0]) {
        let planted = [(
            "control".to_owned(),
            [b"..".as_slice(), &needle, b".."].concat(),
        )];
        assert!(!find_secrets(&planted, &secrets[..1]).is_empty(), "{form}");
    }
    let hits = find_secrets(&haystacks, &secrets);
    assert!(hits.is_empty(), "secrets leaked: {hits:#?}");
}

/// The AWS KMS API door (issue 17): a real `kms serve --dev
/// --aws-api-listen` at debug/trace, driven by boto3 and hand-signed
/// requests (good signatures, a wrong secret, a changed body, a stale date,
/// refused and malformed requests carrying plaintext;
/// tests/scripts/aws_kms_clients.py `secrets`). Neither the secret access
/// key (raw, hex, base64, ...), nor `AWS4<secret>`, nor the SigV4 signing
/// keys derived from it, nor any plaintext, data key or random bytes that
/// crossed the AWS port, appears in the log, stdout, the data directory
/// (but for the credentials file dev mode writes for the clients) or the
/// audit export.
#[tokio::test]
async fn aws_api_secret_keys_plaintexts_and_data_keys_never_reach_logs_stdout_disk_or_audit() {
    use base64::Engine as _;
    use kms_tests::{DevServerProcess, run_cli};
    let data = tempfile::tempdir().expect("data dir");
    let data_dir = data.path().join("kms");
    let log_file = data.path().join("server.log");
    let server = DevServerProcess::start_logged_with_aws_api(
        &data_dir,
        "debug,kms=trace,kms_hsm=trace,kms_storage=trace",
        &log_file,
    );
    let aws = server.aws_endpoint().expect("AWS KMS API in the banner");
    let credentials_file = data_dir.join("aws-credentials");
    let credentials = std::fs::read_to_string(&credentials_file).expect("aws-credentials");
    let secret_key = credentials
        .lines()
        .find_map(|l| l.strip_prefix("aws_secret_access_key = "))
        .expect("aws_secret_access_key")
        .trim()
        .to_owned();
    assert_eq!(secret_key.len(), 40);

    let out = super::aws_api::clients(
        "secrets",
        &aws,
        &[(
            "AWS_SHARED_CREDENTIALS_FILE",
            credentials_file.to_str().expect("utf-8 path"),
        )],
    )
    .await;
    let b64 = base64::engine::general_purpose::STANDARD;
    let decode = |v: &serde_json::Value| b64.decode(v.as_str().expect("string")).expect("base64");
    let mut secrets: Vec<Vec<u8>> = out["secrets"]
        .as_array()
        .expect("secrets")
        .iter()
        .map(decode)
        .collect();
    assert!(secrets.len() >= 45, "{}", secrets.len());
    let key_material: Vec<Vec<u8>> = [
        secret_key.clone().into_bytes(),
        format!("AWS4{secret_key}").into_bytes(),
    ]
    .into_iter()
    .chain(
        out["signing_keys"]
            .as_array()
            .expect("signing keys")
            .iter()
            .map(decode),
    )
    .collect();
    secrets.extend(key_material.iter().cloned());

    let (ok, export, stderr) = run_cli(&server.endpoint(), &["audit", "export"], b"");
    assert!(ok, "{stderr}");
    let mut server = tokio::task::spawn_blocking(move || {
        let mut server = server;
        server.terminate();
        server
    })
    .await
    .expect("terminate");
    let stdout = server.take_stdout_rest();
    let log = std::fs::read(&log_file).expect("log");
    let text = String::from_utf8_lossy(&log);
    // The refused signatures reached the server and were logged (without
    // what they were signed with).
    assert!(
        text.lines()
            .filter(|l| l.contains("signature not accepted"))
            .count()
            >= 3,
        "signature refusals not logged:\n{text}"
    );

    let mut haystacks = vec![
        ("server log (debug/trace)".to_owned(), log),
        ("server stdout".to_owned(), stdout),
        ("audit export".to_owned(), export),
        ("CLI stderr".to_owned(), stderr.into_bytes()),
    ];
    let mut files = Vec::new();
    files_under(&data_dir, &mut files);
    assert!(files.len() > 5, "nothing to scan?");
    let mut credentials_bytes = Vec::new();
    for file in files {
        let bytes = std::fs::read(&file).unwrap_or_default();
        if file == credentials_file {
            // Where the secret belongs (the clients' file): the control.
            credentials_bytes = bytes;
        } else {
            haystacks.push((file.display().to_string(), bytes));
        }
    }
    let control = [("aws-credentials".to_owned(), credentials_bytes)];
    assert!(
        !find_secrets(&control, &key_material[..1]).is_empty(),
        "the scanner does not find the secret where it is"
    );
    let hits = find_secrets(&haystacks, &secrets);
    assert!(hits.is_empty(), "secrets leaked: {hits:#?}");
}
