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
