//! `kms hsm roots` and `kms hsm destroy-root`: root keys of the wrapped-key
//! hierarchy, through the Admin service of the running server (which holds
//! the catalogue's lock, so it is the one that can count what each root
//! still holds). Administrators only. The ceremonies (`kms hsm init-root`,
//! `kms hsm rotate-root`) act on the token directly and live in the `kms`
//! crate.

use kms_proto::v1 as pb;
use serde_json::json;

use super::output::{self, Table};
use super::{ClientOptions, connect};

/// The `kms hsm` subcommands that talk to the running server.
#[derive(Debug, clap::Subcommand)]
pub enum HsmCommand {
    /// List the root key epochs: present in the HSM, which is active (new
    /// key versions are wrapped under it), and how many key versions and
    /// service keys each still holds (the re-wrap job after a root rotation
    /// brings the older epochs to 0).
    Roots,
    /// Destroy the root key of an epoch in the HSM, the last step of a root
    /// rotation: blobs wrapped under it (also in old backups) become unusable
    /// for good. Refused while it is the active epoch or still referenced.
    DestroyRoot(DestroyRootArgs),
}

/// Arguments of `kms hsm destroy-root`.
#[derive(Debug, clap::Args)]
pub struct DestroyRootArgs {
    /// The epoch of the root to destroy (`kms-root/<epoch>`).
    #[arg(long)]
    pub epoch: u32,
}

/// Runs a server-side `kms hsm` command.
///
/// # Errors
/// The server cannot be reached or refuses (PERMISSION_DENIED,
/// FAILED_PRECONDITION with the reason, NOT_FOUND), or output fails.
pub async fn run_hsm(command: HsmCommand, options: &ClientOptions) -> anyhow::Result<()> {
    let client = connect(options).await?;
    match command {
        HsmCommand::Roots => {
            let reply = client.list_roots(pb::ListRootsRequest {}).await?;
            if options.json {
                let roots: Vec<_> = reply
                    .roots
                    .iter()
                    .map(|r| {
                        json!({
                            "epoch": r.epoch,
                            "present_in_hsm": r.present_in_hsm,
                            "active": r.active,
                            "versions": r.versions,
                            "destroyed_versions": r.destroyed_versions,
                            "service_keys": r.service_keys,
                        })
                    })
                    .collect();
                output::emit_json(&json!({
                    "active_epoch": reply.active_epoch,
                    "variant": reply.variant,
                    "roots": roots,
                }))
            } else {
                let mut table = Table::new(&[
                    "EPOCH",
                    "IN HSM",
                    "ACTIVE",
                    "VERSIONS",
                    "DESTROYED VERSIONS",
                    "SERVICE KEYS",
                ]);
                let yes = |b: bool| if b { "yes" } else { "no" }.to_owned();
                for r in &reply.roots {
                    table.row(vec![
                        r.epoch.to_string(),
                        yes(r.present_in_hsm),
                        yes(r.active),
                        r.versions.to_string(),
                        r.destroyed_versions.to_string(),
                        r.service_keys.to_string(),
                    ]);
                }
                output::emit(&format!(
                    "Root variant: {}\n{}",
                    output::sanitize(&reply.variant),
                    table.render()
                ))
            }
        }
        HsmCommand::DestroyRoot(args) => {
            let reply = client
                .destroy_root(pb::DestroyRootRequest { epoch: args.epoch })
                .await?;
            if options.json {
                output::emit_json(&json!({
                    "epoch": reply.epoch,
                    "active_epoch": reply.active_epoch,
                }))
            } else {
                output::emit(&format!(
                    "Destroyed root kms-root/{} (active root: kms-root/{}).\n",
                    reply.epoch, reply.active_epoch
                ))
            }
        }
    }
}
