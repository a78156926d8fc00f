//! `kms key policy ...`: who may use and manage a key (GetKeyPolicy and
//! PutKeyPolicy).
//!
//! Grants name principals (patterns with `*`), permissions by the kebab-case
//! form of the proto `Permission` enum's names (encrypt, decrypt,
//! generate-data-key, re-encrypt-from, re-encrypt-to, describe, rotate,
//! manage) and optional required
//! encryption-context entries. Policy files are JSON:
//! `{"grants": [{"principal": "...", "permissions": ["encrypt"],
//!   "required_encryption_context": {"tenant": "acme"}}]}`.
#![allow(clippy::print_stdout)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context as _;
use kms_client::KmsClient;
use kms_proto::v1 as pb;
use serde_json::{Value, json};

use super::output::{self, Table};
use super::{ClientOptions, connect, parse, required};

/// `kms key policy` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum PolicyCommand {
    /// Show a key's policy (empty: the service's default policy applies).
    Get(PolicyKeyArg),
    /// Add a grant to a key's policy (administrators only).
    Grant(GrantArgs),
    /// Remove every grant of one principal pattern from a key's policy.
    Revoke(RevokeArgs),
    /// Replace a key's policy with the grants in a JSON file.
    Set(SetPolicyArgs),
    /// Drop a key's own policy: the service default applies again.
    Reset(PolicyKeyArg),
}

/// Arguments of `kms key policy get` and `reset`.
#[derive(Debug, clap::Args)]
pub struct PolicyKeyArg {
    /// Key id ("key-...") or alias ("alias/<name>").
    #[arg(value_name = "KEY")]
    pub key: String,
}

/// Arguments of `kms key policy grant`.
#[derive(Debug, clap::Args)]
pub struct GrantArgs {
    /// Key id or alias.
    #[arg(value_name = "KEY")]
    pub key: String,
    /// Principal or pattern ("*" matches any run of characters), e.g. a SPIFFE id.
    #[arg(long)]
    pub principal: String,
    /// A permission; repeat for several (encrypt, decrypt, generate-data-key,
    /// re-encrypt-from, re-encrypt-to, describe, rotate, manage).
    #[arg(long = "permission", required = true, value_parser = parse_permission)]
    pub permissions: Vec<pb::Permission>,
    /// An encryption-context entry the request must carry; repeat for several.
    #[arg(long = "require-context", value_name = "KEY=VALUE", value_parser = parse::key_value)]
    pub required_context: Vec<(String, String)>,
}

/// Arguments of `kms key policy revoke`.
#[derive(Debug, clap::Args)]
pub struct RevokeArgs {
    /// Key id or alias.
    #[arg(value_name = "KEY")]
    pub key: String,
    /// The principal pattern exactly as granted.
    #[arg(long)]
    pub principal: String,
}

/// Arguments of `kms key policy set`.
#[derive(Debug, clap::Args)]
pub struct SetPolicyArgs {
    /// Key id or alias.
    #[arg(value_name = "KEY")]
    pub key: String,
    /// JSON policy file ("-" for stdin).
    #[arg(long)]
    pub file: PathBuf,
}

/// Every permission a grant may hold: the proto enum's values after UNSPECIFIED.
fn all_permissions() -> impl Iterator<Item = pb::Permission> {
    (1..).map_while(|value| pb::Permission::try_from(value).ok())
}

/// The command-line name of a permission: `PERMISSION_RE_ENCRYPT_FROM` ->
/// `re-encrypt-from`.
fn cli_name(permission: pb::Permission) -> String {
    permission
        .as_str_name()
        .trim_start_matches("PERMISSION_")
        .to_ascii_lowercase()
        .replace('_', "-")
}

fn parse_permission(name: &str) -> Result<pb::Permission, String> {
    all_permissions()
        .find(|p| cli_name(*p) == name)
        .ok_or_else(|| {
            format!(
                "unknown permission {name:?}; expected one of: {}",
                all_permissions()
                    .map(cli_name)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

/// The name of a permission value in a reply; a value this client does not
/// know keeps its number.
fn permission_name(value: i32) -> String {
    pb::Permission::try_from(value)
        .ok()
        .filter(|p| *p != pb::Permission::Unspecified)
        .map_or_else(|| format!("unknown({value})"), cli_name)
}

pub(crate) async fn run(command: PolicyCommand, options: &ClientOptions) -> anyhow::Result<()> {
    let client = connect(options).await?;
    match command {
        PolicyCommand::Get(PolicyKeyArg { key }) => {
            let policy = get(&client, &key).await?;
            show(&key, &policy, options)
        }
        PolicyCommand::Grant(args) => {
            // Read-modify-write; PutKeyPolicy replaces the policy whole.
            let mut policy = get(&client, &args.key).await?;
            policy.grants.push(pb::Grant {
                principal: args.principal,
                permissions: args.permissions.into_iter().map(i32::from).collect(),
                required_encryption_context: args.required_context.into_iter().collect(),
            });
            let policy = put(&client, &args.key, policy).await?;
            show(&args.key, &policy, options)
        }
        PolicyCommand::Revoke(args) => {
            let mut policy = get(&client, &args.key).await?;
            let before = policy.grants.len();
            policy.grants.retain(|g| g.principal != args.principal);
            if policy.grants.len() == before {
                anyhow::bail!(
                    "the policy of {} has no grant for {}",
                    args.key,
                    args.principal
                );
            }
            let policy = put(&client, &args.key, policy).await?;
            show(&args.key, &policy, options)
        }
        PolicyCommand::Set(args) => {
            let text = if args.file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())
                    .context("reading the policy from stdin")?
            } else {
                std::fs::read_to_string(&args.file)
                    .with_context(|| format!("cannot read {}", args.file.display()))?
            };
            let policy = policy_from_json(&text)?;
            let policy = put(&client, &args.key, policy).await?;
            show(&args.key, &policy, options)
        }
        PolicyCommand::Reset(PolicyKeyArg { key }) => {
            let policy = put(&client, &key, pb::KeyPolicy::default()).await?;
            show(&key, &policy, options)
        }
    }
}

async fn get(client: &KmsClient, key: &str) -> anyhow::Result<pb::KeyPolicy> {
    let reply = client
        .get_key_policy(pb::GetKeyPolicyRequest {
            key_id: key.to_owned(),
        })
        .await?;
    required(reply.policy, "policy")
}

async fn put(
    client: &KmsClient,
    key: &str,
    policy: pb::KeyPolicy,
) -> anyhow::Result<pb::KeyPolicy> {
    let reply = client
        .put_key_policy(pb::PutKeyPolicyRequest {
            key_id: key.to_owned(),
            policy: Some(policy),
        })
        .await?;
    required(reply.policy, "policy")
}

/// Parses a JSON policy file, naming the first problem.
pub(crate) fn policy_from_json(text: &str) -> anyhow::Result<pb::KeyPolicy> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        grants: Vec<GrantFile>,
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct GrantFile {
        principal: String,
        permissions: Vec<String>,
        #[serde(default)]
        required_encryption_context: BTreeMap<String, String>,
    }
    let file: File = serde_json::from_str(text).context("invalid policy JSON")?;
    let grants = file
        .grants
        .into_iter()
        .map(|g| {
            let permissions = g
                .permissions
                .iter()
                .map(|p| parse_permission(p).map(i32::from))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| anyhow::anyhow!("grant for {}: {e}", g.principal))?;
            Ok(pb::Grant {
                principal: g.principal,
                permissions,
                required_encryption_context: g.required_encryption_context.into_iter().collect(),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(pb::KeyPolicy { grants })
}

fn policy_json(policy: &pb::KeyPolicy) -> Value {
    json!({
        "grants": policy.grants.iter().map(|g| json!({
            "principal": g.principal,
            "permissions": g.permissions.iter().map(|p| permission_name(*p)).collect::<Vec<_>>(),
            "required_encryption_context": g.required_encryption_context.iter().collect::<BTreeMap<_, _>>(),
        })).collect::<Vec<_>>()
    })
}

fn show(key: &str, policy: &pb::KeyPolicy, options: &ClientOptions) -> anyhow::Result<()> {
    if options.json {
        return output::emit_json(&policy_json(policy));
    }
    if policy.grants.is_empty() {
        return output::emit(&format!(
            "{} has no policy of its own: the service's default policy applies.\n",
            output::sanitize(key)
        ));
    }
    let mut table = Table::new(&["PRINCIPAL", "PERMISSIONS", "REQUIRED CONTEXT"]);
    for grant in &policy.grants {
        let context = grant
            .required_encryption_context
            .iter()
            .collect::<BTreeMap<_, _>>()
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        table.row(vec![
            output::sanitize(&grant.principal),
            grant
                .permissions
                .iter()
                .map(|p| permission_name(*p))
                .collect::<Vec<_>>()
                .join(","),
            output::sanitize(&output::dash(&context)),
        ]);
    }
    output::emit(&table.render())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_names_come_from_the_proto_enum() {
        let names: Vec<String> = all_permissions().map(cli_name).collect();
        assert_eq!(
            names,
            [
                "encrypt",
                "decrypt",
                "generate-data-key",
                "re-encrypt-from",
                "re-encrypt-to",
                "describe",
                "rotate",
                "manage"
            ]
        );
        for p in all_permissions() {
            assert_eq!(parse_permission(&cli_name(p)), Ok(p));
            assert_eq!(permission_name(p.into()), cli_name(p));
        }
        assert_eq!(permission_name(0), "unknown(0)");
        assert_eq!(permission_name(99), "unknown(99)");
        let error = parse_permission("encrpyt").expect_err("typo");
        assert!(error.contains("re-encrypt-from"), "{error}");
    }

    #[test]
    fn policy_files_name_their_mistakes() {
        let ok = policy_from_json(
            r#"{"grants":[{"principal":"svc-*","permissions":["encrypt","decrypt"],
               "required_encryption_context":{"tenant":"acme"}}]}"#,
        )
        .expect("valid");
        assert_eq!(ok.grants.len(), 1);
        assert_eq!(ok.grants[0].permissions.len(), 2);
        let err = policy_from_json(r#"{"grants":[{"principal":"a","permissions":["encrpyt"]}]}"#)
            .expect_err("typo");
        assert!(err.to_string().contains("encrpyt"), "{err}");
        assert!(policy_from_json(r#"{"grant":[]}"#).is_err());
    }
}
