//! `kms key policy ...`: who may use and manage a key (GetKeyPolicy and
//! PutKeyPolicy), and `kms token new`: a bearer token and the configuration
//! entry that accepts it.
//!
//! Grants name principals (patterns with `*`), permissions by their
//! kebab-case names (encrypt, decrypt, generate-data-key, re-encrypt-from,
//! re-encrypt-to, describe, rotate, manage) and optional required
//! encryption-context entries. Policy files are JSON:
//! `{"grants": [{"principal": "...", "permissions": ["encrypt"],
//!   "required_encryption_context": {"tenant": "acme"}}]}`.
#![allow(clippy::print_stdout)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context as _;
use kms_proto::v1::{self as pb, key_management_client::KeyManagementClient};
use kms_storage::Permission;
use serde_json::{Value, json};

use super::output::{self, Table};
use super::{ClientOptions, connect, parse, required, rpc_error};

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

#[derive(Debug, clap::Args)]
pub struct PolicyKeyArg {
    /// Key id ("key-...") or alias ("alias/<name>").
    #[arg(value_name = "KEY")]
    pub key: String,
}

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
    pub permissions: Vec<Permission>,
    /// An encryption-context entry the request must carry; repeat for several.
    #[arg(long = "require-context", value_name = "KEY=VALUE", value_parser = parse::key_value)]
    pub required_context: Vec<(String, String)>,
}

#[derive(Debug, clap::Args)]
pub struct RevokeArgs {
    /// Key id or alias.
    #[arg(value_name = "KEY")]
    pub key: String,
    /// The principal pattern exactly as granted.
    #[arg(long)]
    pub principal: String,
}

#[derive(Debug, clap::Args)]
pub struct SetPolicyArgs {
    /// Key id or alias.
    #[arg(value_name = "KEY")]
    pub key: String,
    /// JSON policy file ("-" for stdin).
    #[arg(long)]
    pub file: PathBuf,
}

fn parse_permission(name: &str) -> Result<Permission, String> {
    Permission::parse(name).ok_or_else(|| {
        format!(
            "unknown permission {name:?}; expected one of: {}",
            Permission::ALL.map(Permission::as_str).join(", ")
        )
    })
}

fn permission_name(value: i32) -> String {
    pb::Permission::try_from(value).map_or_else(
        |_| format!("unknown({value})"),
        |p| {
            p.as_str_name()
                .trim_start_matches("PERMISSION_")
                .to_ascii_lowercase()
                .replace('_', "-")
        },
    )
}

fn permission_value(permission: Permission) -> i32 {
    let name = format!(
        "PERMISSION_{}",
        permission.as_str().to_ascii_uppercase().replace('-', "_")
    );
    pb::Permission::from_str_name(&name).map_or(0, |p| p as i32)
}

pub(crate) async fn run(command: PolicyCommand, options: &ClientOptions) -> anyhow::Result<()> {
    let mut client = KeyManagementClient::new(connect(options).await?);
    match command {
        PolicyCommand::Get(PolicyKeyArg { key }) => {
            let policy = get(&mut client, &key).await?;
            show(&key, &policy, options)
        }
        PolicyCommand::Grant(args) => {
            // Read-modify-write; PutKeyPolicy replaces the policy whole.
            let mut policy = get(&mut client, &args.key).await?;
            policy.grants.push(pb::Grant {
                principal: args.principal,
                permissions: args.permissions.into_iter().map(permission_value).collect(),
                required_encryption_context: args.required_context.into_iter().collect(),
            });
            let policy = put(&mut client, &args.key, policy).await?;
            show(&args.key, &policy, options)
        }
        PolicyCommand::Revoke(args) => {
            let mut policy = get(&mut client, &args.key).await?;
            let before = policy.grants.len();
            policy.grants.retain(|g| g.principal != args.principal);
            if policy.grants.len() == before {
                anyhow::bail!(
                    "the policy of {} has no grant for {}",
                    args.key,
                    args.principal
                );
            }
            let policy = put(&mut client, &args.key, policy).await?;
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
            let policy = put(&mut client, &args.key, policy).await?;
            show(&args.key, &policy, options)
        }
        PolicyCommand::Reset(PolicyKeyArg { key }) => {
            let policy = put(&mut client, &key, pb::KeyPolicy::default()).await?;
            show(&key, &policy, options)
        }
    }
}

async fn get(
    client: &mut KeyManagementClient<super::Connection>,
    key: &str,
) -> anyhow::Result<pb::KeyPolicy> {
    let reply = client
        .get_key_policy(pb::GetKeyPolicyRequest {
            key_id: key.to_owned(),
        })
        .await
        .map_err(rpc_error)?
        .into_inner();
    required(reply.policy, "policy")
}

async fn put(
    client: &mut KeyManagementClient<super::Connection>,
    key: &str,
    policy: pb::KeyPolicy,
) -> anyhow::Result<pb::KeyPolicy> {
    let reply = client
        .put_key_policy(pb::PutKeyPolicyRequest {
            key_id: key.to_owned(),
            policy: Some(policy),
        })
        .await
        .map_err(rpc_error)?
        .into_inner();
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
                .map(|p| parse_permission(p).map(permission_value))
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

/// `kms token` subcommands (local: no server involved).
#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Generate a bearer token for a principal and print it with the
    /// [[auth.tokens]] entry (its SHA-256) for the server's configuration.
    New(NewTokenArgs),
}

#[derive(Debug, clap::Args)]
pub struct NewTokenArgs {
    /// The principal callers presenting this token will be.
    #[arg(long)]
    pub principal: String,
}

pub(crate) fn run_token(command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::New(args) => {
            if !crate::auth::is_valid_principal(&args.principal) || args.principal.contains('*') {
                anyhow::bail!(
                    "--principal must be printable ASCII without spaces or '*' (at most 1024 characters)"
                );
            }
            let token = crate::auth::tokens::generate_token()
                .map_err(|_| anyhow::anyhow!("the system random generator failed"))?;
            let digest = hex::encode(crate::auth::tokens::token_digest(token.as_bytes()));
            // The token goes to stdout alone (easy to redirect into a 0600
            // file); the configuration entry goes to stderr.
            println!("{}", token.as_str());
            eprintln!(
                "# Give the token above to {principal} (e.g. in a 0600 file read with \
                 --token-file, or KMS_TOKEN). Add this to the server configuration; the \
                 token itself is never stored there:\n[[auth.tokens]]\nprincipal = \"{principal}\"\nsha256 = \"{digest}\"",
                principal = args.principal
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_names_match_the_proto_enum() {
        for p in Permission::ALL {
            let value = permission_value(p);
            assert_ne!(value, 0, "{p:?}");
            assert_eq!(permission_name(value), p.as_str());
        }
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
