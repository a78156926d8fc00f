//! `kms backup create --out DIR` against a running server: the server writes
//! a backup of its catalogue and audit log on its own host, under its
//! `[backup] dir` (Admin.CreateBackup; administrators only). The offline
//! form (`--data-dir`, server stopped) and `kms backup restore` open the
//! database and the HSM themselves and live in the `kms` crate.

use kms_proto::v1 as pb;
use serde_json::json;

use super::output;
use super::{ClientOptions, connect};

/// Asks the server at `options.endpoint` to write a backup to `out_dir` (as
/// [`run_backup_create`]) and returns its answer without printing anything:
/// `kms backup create --cluster` asks every node in turn.
///
/// # Errors
/// As [`run_backup_create`], output aside.
pub async fn request_backup(
    out_dir: &str,
    options: &ClientOptions,
) -> anyhow::Result<pb::CreateBackupResponse> {
    let client = connect(options).await?;
    Ok(client
        .create_backup(pb::CreateBackupRequest {
            out_dir: out_dir.to_owned(),
        })
        .await?)
}

/// Asks the server to write a backup to `out_dir` (an absolute path on the
/// server's host, inside its `[backup] dir`) and prints what it wrote.
///
/// # Errors
/// The server cannot be reached or refuses (PERMISSION_DENIED,
/// FAILED_PRECONDITION without `[backup] dir`, INVALID_ARGUMENT for a path
/// outside it or a non-empty target), or output fails.
pub async fn run_backup_create(out_dir: &str, options: &ClientOptions) -> anyhow::Result<()> {
    let client = connect(options).await?;
    let reply = client
        .create_backup(pb::CreateBackupRequest {
            out_dir: out_dir.to_owned(),
        })
        .await?;
    if options.json {
        output::emit_json(&json!({
            "out_dir": reply.out_dir,
            "backup_id": reply.backup_id,
            "created_unix_ms": reply.created_unix_ms,
            "audit_head_sequence": reply.audit_head_sequence,
            "audit_head_hash": hex::encode(&reply.audit_head_hash),
            "root_epochs": reply.root_epochs,
            "files": reply.files,
            "bytes": reply.bytes,
        }))
    } else {
        let epochs: Vec<String> = reply.root_epochs.iter().map(u32::to_string).collect();
        output::emit(&output::render_pairs(&[
            ("Backup", output::sanitize(&reply.out_dir)),
            ("Backup id", reply.backup_id.clone()),
            ("Audit head", reply.audit_head_sequence.to_string()),
            ("Root epochs", output::dash(&epochs.join(", "))),
            ("Files", format!("{} ({} bytes)", reply.files, reply.bytes)),
        ]))
    }
}
