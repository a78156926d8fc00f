//! The AWS KMS API (issue 17), end to end with the real AWS clients: boto3
//! over every offered operation and its error codes, the AWS Encryption
//! SDK, hand-signed requests with bad signatures, moto as the reference for
//! response shapes, and the AWS CLI against `kms serve --dev
//! --aws-api-listen` (tests/scripts/aws_kms_clients.py; scripts/setup.sh
//! installs boto3, aws-encryption-sdk, awscli and moto[server]).

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use kms::config::{AwsApiConfig, AwsCredentialConfig};
use kms_proto::v1 as pb;
use kms_tests::{TestEnv, TestServer};
use serde_json::Value;

const CLIENTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/aws_kms_clients.py");
const REGION: &str = "us-east-1";
const ACCOUNT: &str = "111122223333";
/// The access key of the principal the tests act as (an administrator).
const APP_KEY: &str = "AKIATESTAPPKEY000001";
const APP_SECRET: &str = "test/app/secret+0123456789abcdefghijklmnop";
const APP_PRINCIPAL: &str = "aws-app";
/// A second key, for a principal that is not an administrator.
const OUTSIDER_KEY: &str = "AKIATESTOUTSIDER0001";
const OUTSIDER_SECRET: &str = "outsider-secret-0123456789abcdefghijklmnop";

/// A server with `[aws_api]` on 127.0.0.1:0 and the two access keys (their
/// secrets in 0600 files under the test's data directory).
async fn start(env: &TestEnv) -> TestServer {
    let dir = env.data.path().join("aws");
    std::fs::create_dir_all(&dir).expect("aws dir");
    let mut credentials = Vec::new();
    for (key, secret, principal) in [
        (APP_KEY, APP_SECRET, APP_PRINCIPAL),
        (OUTSIDER_KEY, OUTSIDER_SECRET, "outsider"),
    ] {
        let path = dir.join(key);
        std::fs::write(&path, format!("{secret}\n")).expect("secret file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        credentials.push(AwsCredentialConfig {
            access_key_id: key.to_owned(),
            secret_file: path,
            principal: principal.to_owned(),
        });
    }
    let mut config = env.config();
    config.auth.admins.push(APP_PRINCIPAL.to_owned());
    config.aws_api = Some(AwsApiConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        tls: None,
        region: REGION.to_owned(),
        account_id: ACCOUNT.to_owned(),
        credentials,
    });
    env.start_with(config).await
}

/// Runs the client script in `mode` against `endpoint` with `env` added
/// (and no AWS settings of this machine) and returns its JSON output.
pub(crate) async fn clients(mode: &str, endpoint: &str, env: &[(&str, &str)]) -> Value {
    let mut command = tokio::process::Command::new("python3");
    command.arg(CLIENTS).arg(mode).arg(endpoint);
    for var in [
        "AWS_PROFILE",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_KMS",
        "AWS_SESSION_TOKEN",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    ] {
        command.env_remove(var);
    }
    command
        .env("AWS_CONFIG_FILE", "/nonexistent/aws-config")
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/aws-credentials",
        )
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_DEFAULT_REGION", REGION)
        .envs(env.iter().copied())
        .kill_on_drop(true);
    let output = command
        .output()
        .await
        .expect("run python3 (scripts/setup.sh installs boto3 and friends)");
    assert!(
        output.status.success(),
        "{mode} client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "{mode}: not JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

fn app_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("AWS_ACCESS_KEY_ID", APP_KEY),
        ("AWS_SECRET_ACCESS_KEY", APP_SECRET),
        ("OUTSIDER_ACCESS_KEY_ID", OUTSIDER_KEY),
        ("OUTSIDER_SECRET_ACCESS_KEY", OUTSIDER_SECRET),
    ]
}

async fn audit_events(server: &TestServer, principal: &str) -> Vec<pb::AuditEvent> {
    server
        .audit()
        .list_audit_events(pb::ListAuditEventsRequest {
            principal: principal.to_owned(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("list audit events")
        .into_inner()
        .events
}

fn operation_names(events: &[pb::AuditEvent]) -> BTreeSet<&'static str> {
    events
        .iter()
        .filter_map(|e| pb::Operation::try_from(e.operation).ok())
        .map(kms::service::operation::name)
        .collect()
}

#[tokio::test]
async fn boto3_drives_every_operation_with_aws_error_codes_and_every_call_is_audited() {
    let env = TestEnv::new();
    // A root key, so that key material can be imported.
    super::wrapped::init_root(&env);
    let server = start(&env).await;
    let endpoint = format!("http://{}", server.aws_addr());
    let out = clients("boto3", &endpoint, &app_env()).await;

    let key_id = out["key_id"].as_str().expect("key id");
    assert_eq!(
        out["key_arn"],
        format!("arn:aws:kms:{REGION}:{ACCOUNT}:key/{key_id}")
    );
    let errors: BTreeMap<String, String> =
        serde_json::from_value(out["errors"].clone()).expect("errors");
    let expected: BTreeMap<String, String> = [
        ("Decrypt/wrong-context", "InvalidCiphertextException"),
        ("Decrypt/garbage", "InvalidCiphertextException"),
        ("GenerateDataKey/no-size", "ValidationException"),
        ("GenerateDataKey/both-sizes", "ValidationException"),
        ("GenerateRandom/too-many", "ValidationException"),
        ("CreateAlias/exists", "AlreadyExistsException"),
        ("DescribeKey/deleted-alias", "NotFoundException"),
        ("EnableKeyRotation/period", "ValidationException"),
        ("Encrypt/disabled", "DisabledException"),
        ("Encrypt/pending-deletion", "KMSInvalidStateException"),
        ("ScheduleKeyDeletion/window", "ValidationException"),
        ("DescribeKey/unknown", "NotFoundException"),
        ("DescribeKey/other-account-arn", "NotFoundException"),
        ("CreateKey/sign-verify", "ValidationException"),
        ("GetKeyPolicy", "UnsupportedOperationException"),
        ("CreateGrant", "UnsupportedOperationException"),
        ("ListKeys/not-admin", "AccessDeniedException"),
        ("Encrypt/pending-import", "KMSInvalidStateException"),
        (
            "GetParametersForImport/kms-origin",
            "UnsupportedOperationException",
        ),
        ("ImportKeyMaterial/expiring", "ValidationException"),
        (
            "ImportKeyMaterial/token-used",
            "InvalidImportTokenException",
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(errors, expected);

    // Every call is in the audit log under the principal its access key
    // maps to, as the gRPC operation it corresponds to.
    let events = audit_events(&server, APP_PRINCIPAL).await;
    let seen = operation_names(&events);
    for operation in [
        "CreateKey",
        "DescribeKey",
        "ListKeys",
        "Encrypt",
        "Decrypt",
        "ReEncrypt",
        "GenerateDataKey",
        "GenerateDataKeyWithoutPlaintext",
        "GenerateRandom",
        "CreateAlias",
        "UpdateAlias",
        "DeleteAlias",
        "ListAliases",
        "UpdateKeyDescription",
        "TagKey",
        "UntagKey",
        "SetRotationPolicy",
        "RotateKey",
        "ListKeyVersions",
        "EnableKey",
        "DisableKey",
        "ScheduleKeyDeletion",
        "CancelKeyDeletion",
        "GetParametersForImport",
        "ImportKeyMaterial",
    ] {
        assert!(
            seen.contains(operation),
            "{operation} not audited: {seen:?}"
        );
    }
    assert!(events.iter().all(|e| e.principal == APP_PRINCIPAL));
    // Refusals are audited too, with their codes: a disabled key
    // (FAILED_PRECONDITION, 9), a malformed request (INVALID_ARGUMENT, 3).
    assert!(
        events
            .iter()
            .any(|e| e.operation == pb::Operation::Encrypt as i32
                && e.result_code == 9
                && e.key_id == key_id)
    );
    assert!(
        events
            .iter()
            .any(|e| e.operation == pb::Operation::GenerateDataKey as i32 && e.result_code == 3)
    );
    let outsider = audit_events(&server, "outsider").await;
    assert!(
        outsider
            .iter()
            .any(|e| e.operation == pb::Operation::ListKeys as i32 && e.result_code == 7),
        "{outsider:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn the_aws_encryption_sdk_encrypts_and_decrypts_and_decrypts_again_after_rotation() {
    let env = TestEnv::new();
    let server = start(&env).await;
    let endpoint = format!("http://{}", server.aws_addr());
    let out = clients("esdk", &endpoint, &app_env()).await;
    let arn = out["key_arn"].as_str().expect("arn");
    let key_id = arn.rsplit('/').next().expect("id");
    // The SDK's calls reached kms: data keys generated and decrypted under
    // the key, and the rotation between.
    let events = audit_events(&server, APP_PRINCIPAL).await;
    let on_key = |operation: pb::Operation| {
        events
            .iter()
            .filter(|e| e.operation == operation as i32 && e.key_id == key_id && e.result_code == 0)
            .count()
    };
    assert_eq!(on_key(pb::Operation::GenerateDataKey), 2);
    assert_eq!(on_key(pb::Operation::Decrypt), 3);
    assert_eq!(on_key(pb::Operation::RotateKey), 1);
    let decrypted_versions: BTreeSet<u32> = events
        .iter()
        .filter(|e| e.operation == pb::Operation::Decrypt as i32 && e.key_id == key_id)
        .map(|e| e.key_version)
        .collect();
    assert_eq!(decrypted_versions, BTreeSet::from([1, 2]));
    server.stop().await;
}

#[tokio::test]
async fn bad_signatures_are_refused_alike_and_audited_as_denials() {
    let env = TestEnv::new();
    let server = start(&env).await;
    let endpoint = format!("http://{}", server.aws_addr());
    let out = clients("signatures", &endpoint, &app_env()).await;
    let results = &out["results"];
    assert_eq!(results["good"][0], 200);
    assert_eq!(results["replayed-within-skew"][0], 200);
    let refusal = &results["wrong-secret"];
    assert_eq!(refusal[0], 400);
    assert_eq!(refusal[1]["__type"], "InvalidSignatureException");
    for case in ["outside-skew", "changed-body", "unsigned", "unknown-key"] {
        // The same answer whatever failed: nothing tells which part.
        assert_eq!(&results[case], refusal, "{case}");
    }
    // The refusals under our access key are denials in the audit log; the
    // unsigned and unknown-key requests have no principal to record.
    let events = audit_events(&server, APP_PRINCIPAL).await;
    let describes: Vec<_> = events
        .iter()
        .filter(|e| e.operation == pb::Operation::DescribeKey as i32)
        .collect();
    let denied = describes.iter().filter(|e| e.result_code == 7).count();
    let served = describes.iter().filter(|e| e.result_code == 0).count();
    assert_eq!((denied, served), (3, 2), "{describes:?}");
    assert!(
        describes
            .iter()
            .filter(|e| e.result_code == 7)
            .all(|e| e.key_id.is_empty())
    );
    server.stop().await;
}

/// The JSON type names of the shape the script reports.
fn fields(shape: &Value) -> BTreeMap<String, Value> {
    shape
        .as_object()
        .map(|o| o.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default()
}

/// Fields kms returns that moto leaves out, all in the AWS KMS API
/// Reference's response syntax of the operation (moto is the reference for
/// shapes, AWS's documentation for completeness).
const DOCUMENTED_EXTRAS: &[&str] = &[
    "KeyUsage",
    "MultiRegion",
    "EncryptionAlgorithm",
    "SourceEncryptionAlgorithm",
    "DestinationEncryptionAlgorithm",
    "KeyId",
    "RotationPeriodInDays",
    "NextRotationDate",
    "KeyState",
    "PendingWindowInDays",
];

/// Deliberate differences in outcome: moto does not enforce key states on
/// Encrypt; AWS (and kms) refuse a disabled key with DisabledException and
/// a key pending deletion with KMSInvalidStateException.
const DELIBERATE_OUTCOMES: &[(&str, &str)] = &[
    ("Encrypt/disabled", "error:DisabledException"),
    ("Encrypt/pending-deletion", "error:KMSInvalidStateException"),
];

/// Compares one response shape: every field moto returns, kms returns with
/// the same type (nested objects recursively), except `SigningAlgorithms`
/// (moto lists none for symmetric keys, AWS omits it); kms's extra fields
/// are documented ones.
fn compare_shape(call: &str, moto: &Value, ours: &Value) {
    let (moto, ours) = (fields(moto), fields(ours));
    for (name, kind) in &moto {
        if name == "SigningAlgorithms" {
            continue;
        }
        let mine = ours
            .get(name)
            .unwrap_or_else(|| panic!("{call}: kms lacks {name}"));
        if kind.is_object() {
            compare_shape(&format!("{call}.{name}"), kind, mine);
        } else {
            assert_eq!(mine, kind, "{call}: type of {name}");
        }
    }
    for name in ours.keys().filter(|n| !moto.contains_key(*n)) {
        assert!(
            DOCUMENTED_EXTRAS.contains(&name.as_str()),
            "{call}: kms adds {name}"
        );
    }
}

#[tokio::test]
async fn responses_have_the_fields_and_types_moto_gives_and_the_same_error_codes() {
    let env = TestEnv::new();
    let server = start(&env).await;
    let endpoint = format!("http://{}", server.aws_addr());
    let out = clients("moto", &endpoint, &app_env()).await;
    let moto = out["moto"].as_array().expect("moto");
    let ours = out["kms"].as_array().expect("kms");
    assert_eq!(moto.len(), ours.len());
    assert!(moto.len() >= 30, "{} calls", moto.len());
    for (reference, mine) in moto.iter().zip(ours) {
        let call = reference[0].as_str().expect("call");
        assert_eq!(mine[0], call);
        if let Some((_, outcome)) = DELIBERATE_OUTCOMES.iter().find(|(c, _)| *c == call) {
            assert_eq!(mine[1], *outcome, "{call}");
            continue;
        }
        match (&reference[1], &mine[1]) {
            (Value::String(a), b) => assert_eq!(b.as_str(), Some(a.as_str()), "{call}"),
            (a, b) => compare_shape(call, a, b),
        }
    }
    server.stop().await;
}

/// `kms serve --dev --aws-api-listen 127.0.0.1:0` in `data_dir`: the
/// process and the two addresses its banner names (gRPC, AWS KMS API).
fn dev_server(data_dir: &Path) -> (std::process::Child, String, String) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(kms_tests::kms_binary())
        .args(["serve", "--dev", "--listen", "127.0.0.1:0"])
        .args(["--aws-api-listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .env("KMS_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn kms serve --dev");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("banner");
    let grpc = line
        .strip_prefix("kms listening on ")
        .and_then(|r| r.split_whitespace().next())
        .map(|a| format!("http://{a}"));
    let aws = line
        .split("AWS KMS API on ")
        .nth(1)
        .and_then(|r| r.split([',', ')']).next())
        .map(str::to_owned);
    match (grpc, aws) {
        (Some(grpc), Some(aws)) => (child, grpc, aws),
        _ => {
            let _ = child.kill();
            panic!("unexpected banner: {line:?}");
        }
    }
}

fn aws_cli(credentials: &Path, endpoint: &str, args: &[&str]) -> Value {
    let output = std::process::Command::new("aws")
        .args(["kms", "--endpoint-url", endpoint, "--output", "json"])
        .args(args)
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env("AWS_SHARED_CREDENTIALS_FILE", credentials)
        .env("AWS_CONFIG_FILE", "/nonexistent/aws-config")
        .env("AWS_DEFAULT_REGION", REGION)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .expect("run aws (scripts/setup.sh installs awscli)");
    assert!(
        output.status.success(),
        "aws kms {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("aws output JSON")
}

#[tokio::test]
async fn the_aws_cli_encrypts_against_dev_mode_with_its_generated_credentials() {
    let data = tempfile::tempdir().expect("data dir");
    let (mut child, grpc, aws) = dev_server(data.path());
    let credentials = data.path().join("aws-credentials");
    let meta = std::fs::metadata(&credentials).expect("aws-credentials");
    assert_eq!(meta.mode() & 0o777, 0o600);

    let key = aws_cli(&credentials, &aws, &["create-key", "--description", "cli"]);
    let key_id = key["KeyMetadata"]["KeyId"]
        .as_str()
        .expect("key id")
        .to_owned();
    let plaintext = data.path().join("plaintext");
    std::fs::write(&plaintext, b"from the AWS CLI").expect("plaintext");
    let encrypted = aws_cli(
        &credentials,
        &aws,
        &[
            "encrypt",
            "--key-id",
            &key_id,
            "--plaintext",
            &format!("fileb://{}", plaintext.display()),
            "--encryption-context",
            "app=cli",
        ],
    );
    assert!(encrypted["KeyId"].as_str().expect("arn").ends_with(&key_id));
    let blob = data.path().join("blob");
    {
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encrypted["CiphertextBlob"].as_str().expect("blob"))
            .expect("base64");
        std::fs::write(&blob, bytes).expect("blob");
    }
    let decrypted = aws_cli(
        &credentials,
        &aws,
        &[
            "decrypt",
            "--ciphertext-blob",
            &format!("fileb://{}", blob.display()),
            "--encryption-context",
            "app=cli",
        ],
    );
    assert_eq!(decrypted["Plaintext"], "ZnJvbSB0aGUgQVdTIENMSQ==");

    // Audited under the dev principal the generated key maps to.
    let channel = tonic::transport::Channel::from_shared(grpc)
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let events = kms_proto::v1::audit_client::AuditClient::new(channel)
        .list_audit_events(pb::ListAuditEventsRequest {
            principal: kms::dev::DEV_PRINCIPAL.to_owned(),
            key_id: key_id.clone(),
            page_size: 100,
            ..Default::default()
        })
        .await
        .expect("audit")
        .into_inner()
        .events;
    let names = operation_names(&events);
    assert_eq!(
        names,
        BTreeSet::from(["CreateKey", "Encrypt", "Decrypt"]),
        "{events:?}"
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// A demanding user's edge cases (tests/scripts/aws_kms_clients.py
/// `edges`, botocore's own validation off), each answered as AWS answers
/// it: the AWS KMS API Reference's length, range and enum constraints
/// (Plaintext 1 to 4096 bytes, NumberOfBytes 1 to 1024, KeySpec AES_128 or
/// AES_256, Limit 1 to 1000, PendingWindowInDays 7 to 30 → ValidationException),
/// the exceptions each operation's "Errors" section names (a Marker not
/// issued by the server → InvalidMarkerException; a key identifier that
/// names no key, whatever its form → NotFoundException, as AWS's "Invalid
/// keyId"; CancelKeyDeletion of a key not pending deletion →
/// KMSInvalidStateException; an `aws:` tag key → TagException), a
/// `DryRun` refused rather than performed (UnsupportedOperationException:
/// kms cannot check without doing), and the
/// reserved `alias/aws/` prefix (NotAuthorizedException, as moto answers
/// it). Pagination with Limit=1 visits every key and alias once (checked by
/// the script).
#[tokio::test]
async fn odd_inputs_get_the_answers_aws_gives() {
    let env = TestEnv::new();
    let server = start(&env).await;
    let endpoint = format!("http://{}", server.aws_addr());
    let out = clients("edges", &endpoint, &app_env()).await;
    let outcomes: BTreeMap<String, Value> =
        serde_json::from_value(out["outcomes"].clone()).expect("outcomes");
    let ok = || Value::from("ok");
    let error = |code: &str| Value::from(format!("error:{code}"));
    let http = |status: u16, kind: &str| serde_json::json!([status, kind]);
    let validation = || error("ValidationException");
    let expected: BTreeMap<String, Value> = [
        ("Encrypt/empty-context", ok()),
        ("Encrypt/6KiB-context", ok()),
        ("Encrypt/4096", ok()),
        ("Encrypt/4097", validation()),
        ("Encrypt/0", validation()),
        ("GenerateDataKey/1", ok()),
        ("GenerateDataKey/1024", ok()),
        ("GenerateDataKey/1025", validation()),
        ("GenerateDataKey/0", validation()),
        ("GenerateRandom/1", ok()),
        ("GenerateRandom/1024", ok()),
        ("GenerateRandom/1025", validation()),
        ("GenerateRandom/0", validation()),
        ("GenerateDataKey/AES_128", ok()),
        ("GenerateDataKey/AES_256", ok()),
        ("GenerateDataKey/AES_512", validation()),
        ("GenerateDataKeyWithoutPlaintext/AES_128", ok()),
        ("GenerateDataKeyWithoutPlaintext/AES_256", ok()),
        ("GenerateDataKeyWithoutPlaintext/AES_512", validation()),
        ("ListKeys/Limit-0", validation()),
        ("ListKeys/Limit-1001", validation()),
        ("ListKeys/foreign-marker", error("InvalidMarkerException")),
        (
            "ListAliases/foreign-marker",
            error("InvalidMarkerException"),
        ),
        (
            "ListKeyRotations/foreign-marker",
            error("InvalidMarkerException"),
        ),
        ("CreateAlias/alias-aws-x", error("NotAuthorizedException")),
        ("UpdateAlias/alias-aws-x", error("NotAuthorizedException")),
        ("CreateAlias/alias-awsome", ok()),
        ("CreateAlias/256-chars", ok()),
        ("CreateAlias/257-chars", validation()),
        ("CreateAlias/colon", validation()),
        ("CreateAlias/no-prefix", validation()),
        ("DescribeKey/uuid", error("NotFoundException")),
        ("DescribeKey/nonsense", error("NotFoundException")),
        ("Encrypt/nonsense-key", error("NotFoundException")),
        ("ListAliases/nonsense-key", error("NotFoundException")),
        ("ScheduleKeyDeletion/6", validation()),
        ("ScheduleKeyDeletion/7", ok()),
        ("ScheduleKeyDeletion/30", ok()),
        ("ScheduleKeyDeletion/31", validation()),
        (
            "ScheduleKeyDeletion/again",
            error("KMSInvalidStateException"),
        ),
        ("CancelKeyDeletion/first", ok()),
        (
            "CancelKeyDeletion/second",
            error("KMSInvalidStateException"),
        ),
        ("ReEncrypt/other-key-other-context", ok()),
        (
            "ReEncrypt/wrong-source-context",
            error("InvalidCiphertextException"),
        ),
        ("Encrypt/DryRun", error("UnsupportedOperationException")),
        (
            "GenerateDataKey/DryRun",
            error("UnsupportedOperationException"),
        ),
        ("Encrypt/DryRun-false", ok()),
        ("TagResource/aws-prefix", error("TagException")),
        ("CreateKey/aws-prefix-tag", error("TagException")),
        ("http/array-body", http(400, "SerializationException")),
        ("http/garbage-body", http(400, "SerializationException")),
        ("http/no-target", http(400, "UnknownOperationException")),
        ("http/GET", http(404, "UnknownOperationException")),
        ("http/other-path", http(404, "UnknownOperationException")),
        ("http/bad-base64", http(400, "ValidationException")),
        (
            "http/9MiB-body",
            http(413, "RequestEntityTooLargeException"),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let differences: Vec<String> = expected
        .keys()
        .chain(outcomes.keys())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter(|case| expected.get(*case) != outcomes.get(*case))
        .map(|case| {
            format!(
                "{case}: expected {:?}, got {:?}",
                expected.get(case),
                outcomes.get(case)
            )
        })
        .collect();
    assert!(differences.is_empty(), "{differences:#?}");
    // The refusals are audited like any other: the reserved alias and the
    // reserved tag as INVALID_ARGUMENT (3), under the caller's principal.
    let events = audit_events(&server, APP_PRINCIPAL).await;
    for operation in [pb::Operation::CreateAlias, pb::Operation::TagKey] {
        assert!(
            events
                .iter()
                .any(|e| e.operation == operation as i32 && e.result_code == 3),
            "{operation:?} refusal not audited"
        );
    }
    server.stop().await;
}
