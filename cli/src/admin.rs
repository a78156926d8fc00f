//! `kms admin reload`: operator actions on the running server through the
//! Admin service (administrators only).

use kms_proto::v1 as pb;
use serde_json::json;

use super::output;
use super::{ClientOptions, connect};

/// `kms admin` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum AdminCommand {
    /// Make the server re-read its configuration file: TLS certificate, key,
    /// client CA and CRLs, bearer tokens, administrators and admission limits
    /// (as SIGHUP does). An invalid file changes nothing; the error says why.
    Reload,
}

pub(crate) async fn run(command: AdminCommand, options: &ClientOptions) -> anyhow::Result<()> {
    let client = connect(options).await?;
    match command {
        AdminCommand::Reload => {
            let reply = client.reload(pb::ReloadRequest {}).await?;
            if options.json {
                output::emit_json(&json!({
                    "config_file": reply.config_file,
                    "tls": reply.tls,
                    "crl_count": reply.crl_count,
                    "token_count": reply.token_count,
                    "admin_count": reply.admin_count,
                    "restart_required": reply.restart_required,
                    "active_root_epoch": reply.active_root_epoch,
                    "root_refused": (!reply.root_refused.is_empty()).then_some(&reply.root_refused),
                }))
            } else {
                let mut text = format!(
                    "Reloaded {}: TLS {}, {} CRL(s), {} token(s), {} administrator pattern(s).\n",
                    reply.config_file,
                    if reply.tls { "on" } else { "off" },
                    reply.crl_count,
                    reply.token_count,
                    reply.admin_count,
                );
                if !reply.restart_required.is_empty() {
                    text.push_str(&format!(
                        "Not in force until the server restarts (changed in the file): {}.\n",
                        reply.restart_required.join(", ")
                    ));
                }
                if reply.active_root_epoch > 0 {
                    text.push_str(&format!(
                        "New key versions are wrapped under root kms-root/{}.\n",
                        reply.active_root_epoch
                    ));
                }
                if !reply.root_refused.is_empty() {
                    text.push_str(&format!(
                        "A newer root key was NOT adopted: {}\n",
                        output::sanitize(&reply.root_refused)
                    ));
                }
                output::emit(&text)
            }
        }
    }
}
