//! `kms key ...`: the key catalogue through the KeyManagement service (create,
//! list, describe, lifecycle, versions, rotation policy, tags, description).
//!
//! Key metadata never contains key material, so everything here may be printed.
#![allow(clippy::print_stdout)]

use std::collections::BTreeMap;

use kms_proto::v1 as pb;
use serde_json::{Value, json};

use super::output::{self, Table};
use super::{ClientOptions, connect, next_page_token, parse, required};

const SECONDS_PER_DAY: i64 = 86_400;
/// Longest description shown in `kms key list` (describe shows it whole).
const LIST_DESCRIPTION_WIDTH: usize = 40;

/// `kms key` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum KeyCommand {
    /// Create a key; its first version is generated inside the HSM (with
    /// `--origin external`: no version until `kms key import`).
    Create(CreateKeyArgs),
    /// List keys (all pages).
    List(ListKeysArgs),
    /// Show a key's metadata.
    Describe(KeyArg),
    /// Rotate a key now: a new version becomes primary, older versions still decrypt.
    Rotate(KeyArg),
    /// Enable a disabled key.
    Enable(KeyArg),
    /// Disable a key: every cryptographic operation with it is refused.
    Disable(KeyArg),
    /// Schedule the destruction of a key after a waiting period (7-30 days, default 30).
    ScheduleDeletion(ScheduleDeletionArgs),
    /// Cancel a scheduled deletion.
    CancelDeletion(KeyArg),
    /// List a key's versions, with their last encrypt and decrypt use and counts.
    Versions(KeyArg),
    /// Show how a key and each of its versions have been used: counts and the
    /// last encrypt-side and decrypt-side use ("does anything still use
    /// version N?"). Another node's uses show within its flush interval.
    LastUsage(LastUsageArgs),
    /// Set or clear a key's automatic rotation period.
    RotationPolicy(RotationPolicyArgs),
    /// Enable a disabled key version, so that it decrypts again.
    EnableVersion(VersionArgs),
    /// Disable a key version (not the primary one): its ciphertexts are refused.
    DisableVersion(VersionArgs),
    /// Make an enabled version the primary version (e.g. to roll back a rotation).
    SetPrimary(VersionArgs),
    /// Schedule the destruction of one key version (not the primary) after a
    /// waiting period (1-30 days, default 7); refused while the version decrypted
    /// within the server's quiet period unless --override-recent-use.
    ScheduleVersionDestruction(ScheduleVersionDestructionArgs),
    /// Cancel a key version's scheduled destruction (it becomes disabled).
    RestoreVersion(VersionArgs),
    /// Emergency state for a suspected-compromised version (not the primary): it
    /// decrypts only as the source of a re-encryption (leave it with
    /// enable-version or disable-version).
    ReEncryptOnlyVersion(VersionArgs),
    /// Add tags to a key or change their values.
    Tag(TagArgs),
    /// Remove tags from a key.
    Untag(UntagArgs),
    /// Replace a key's description.
    UpdateDescription(UpdateDescriptionArgs),
    /// Show or change who may use and manage the key.
    #[command(subcommand)]
    Policy(super::policy::PolicyCommand),
    /// Get import parameters (public key, token) for a key of origin external, as
    /// files for an external party that wraps its key material offline.
    ImportParameters(super::import::ImportParametersArgs),
    /// Import key material into a key of origin external: wrapped offline
    /// (--wrapped-material, --import-token) or in one step (--key-material-file).
    /// Each import adds a version that becomes primary.
    Import(super::import::ImportArgs),
}

/// A key named on the command line.
#[derive(Debug, clap::Args)]
pub struct KeyArg {
    /// Key id ("key-...") or alias ("alias/<name>").
    #[arg(value_name = "KEY")]
    pub key: String,
}

/// Arguments of `kms key create`.
#[derive(Debug, clap::Args)]
pub struct CreateKeyArgs {
    /// Free-form description.
    #[arg(long, default_value = "")]
    pub description: String,
    /// A tag; repeat for several.
    #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse::key_value)]
    pub tags: Vec<(String, String)>,
    /// Rotate automatically every N days.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub rotation_period_days: Option<u32>,
    /// Also create this alias for the new key.
    #[arg(long, value_name = "alias/NAME")]
    pub alias: Option<String>,
    /// Where the key material comes from: kms (generated in the HSM) or external
    /// (no version until `kms key import`; never rotated by kms).
    #[arg(long, value_enum, default_value = "kms")]
    pub origin: Origin,
}

/// `--origin` of `kms key create`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Origin {
    /// Generated inside the HSM.
    Kms,
    /// Imported by its owner (`kms key import`).
    External,
}

/// Arguments of `kms key list`.
#[derive(Debug, clap::Args)]
pub struct ListKeysArgs {
    /// Include deleted keys (tombstones).
    #[arg(long)]
    pub all: bool,
    /// Keys per request (the server caps it); every page is fetched.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..))]
    pub page_size: Option<i32>,
}

/// Arguments of `kms key schedule-deletion`.
#[derive(Debug, clap::Args)]
pub struct ScheduleDeletionArgs {
    /// Key id ("key-...") or alias ("alias/<name>").
    #[arg(value_name = "KEY")]
    pub key: String,
    /// Waiting period in days, 7 to 30 (server default 30).
    #[arg(long, value_name = "N")]
    pub days: Option<u32>,
}

/// Arguments of `kms key rotation-policy`.
#[derive(Debug, clap::Args)]
#[command(group(
    clap::ArgGroup::new("policy")
        .required(true)
        .args(["period_days", "none"])
))]
pub struct RotationPolicyArgs {
    /// Key id ("key-...") or alias ("alias/<name>").
    #[arg(value_name = "KEY")]
    pub key: String,
    /// Rotate automatically every N days, the first time N days from now
    /// (or at --next-rotation).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub period_days: Option<u32>,
    /// First rotation at TIME (RFC 3339, e.g. 2026-12-01T02:00:00Z): in the
    /// future and at most one period from now. Needs --period-days.
    #[arg(long, value_name = "TIME", requires = "period_days", value_parser = output::parse_time)]
    pub next_rotation: Option<prost_types::Timestamp>,
    /// Turn periodic rotation off.
    #[arg(long)]
    pub none: bool,
}

/// A key version named on the command line.
#[derive(Debug, clap::Args)]
pub struct VersionArgs {
    /// Key id ("key-...") or alias ("alias/<name>").
    #[arg(value_name = "KEY")]
    pub key: String,
    /// Version number (1, 2, ...).
    #[arg(value_name = "VERSION", value_parser = clap::value_parser!(u32).range(1..))]
    pub version: u32,
}

/// Arguments of `kms key schedule-version-destruction`.
#[derive(Debug, clap::Args)]
pub struct ScheduleVersionDestructionArgs {
    /// Key id ("key-...") or alias ("alias/<name>").
    #[arg(value_name = "KEY")]
    pub key: String,
    /// Version number (1, 2, ...).
    #[arg(value_name = "VERSION", value_parser = clap::value_parser!(u32).range(1..))]
    pub version: u32,
    /// Waiting period in days, 1 to 30 (server default 7).
    #[arg(long, value_name = "N")]
    pub days: Option<u32>,
    /// Schedule even if the version decrypted within the server's quiet period
    /// (the request is audited as an override).
    #[arg(long)]
    pub override_recent_use: bool,
}

/// Arguments of `kms key last-usage`.
#[derive(Debug, clap::Args)]
pub struct LastUsageArgs {
    /// Key id ("key-...") or alias ("alias/<name>").
    #[arg(value_name = "KEY")]
    pub key: String,
    /// Only this version (1, 2, ...).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub version: Option<u32>,
}

/// Arguments of `kms key tag`.
#[derive(Debug, clap::Args)]
pub struct TagArgs {
    /// Key id ("key-...") or alias ("alias/<name>").
    #[arg(value_name = "KEY")]
    pub key: String,
    /// Tags to add or change.
    #[arg(value_name = "KEY=VALUE", required = true, value_parser = parse::key_value)]
    pub tags: Vec<(String, String)>,
}

/// Arguments of `kms key untag`.
#[derive(Debug, clap::Args)]
pub struct UntagArgs {
    /// Key id ("key-...") or alias ("alias/<name>").
    #[arg(value_name = "KEY")]
    pub key: String,
    /// Tag keys to remove.
    #[arg(value_name = "TAG", required = true)]
    pub tag_keys: Vec<String>,
}

/// Arguments of `kms key update-description`.
#[derive(Debug, clap::Args)]
pub struct UpdateDescriptionArgs {
    /// Key id ("key-...") or alias ("alias/<name>").
    #[arg(value_name = "KEY")]
    pub key: String,
    /// The new description (may be "").
    #[arg(value_name = "DESCRIPTION")]
    pub description: String,
}

pub(crate) async fn run(command: KeyCommand, options: &ClientOptions) -> anyhow::Result<()> {
    match command {
        KeyCommand::Create(args) => create(args, options).await,
        KeyCommand::Policy(command) => super::policy::run(command, options).await,
        KeyCommand::ImportParameters(args) => super::import::import_parameters(args, options).await,
        KeyCommand::Import(args) => super::import::import(args, options).await,
        KeyCommand::List(args) => list(args, options).await,
        KeyCommand::Describe(KeyArg { key }) => {
            let reply = connect(options)
                .await?
                .describe_key(pb::DescribeKeyRequest { key_id: key })
                .await?;
            show_key(required(reply.key_metadata, "key metadata")?, options)
        }
        KeyCommand::Rotate(KeyArg { key }) => {
            let reply = connect(options)
                .await?
                .rotate_key(pb::RotateKeyRequest { key_id: key })
                .await?;
            let metadata = required(reply.key_metadata, "key metadata")?;
            let version = required(reply.new_version, "new version")?;
            if options.json {
                output::emit_json(&json!({
                    "key_metadata": key_json(&metadata),
                    "new_version": version_json(&version),
                }))
            } else {
                output::emit(&format!(
                    "Rotated {}: version {} is now primary.\n\n{}",
                    output::sanitize(&metadata.key_id),
                    version.version,
                    output::render_pairs(&key_pairs(&metadata))
                ))
            }
        }
        KeyCommand::Enable(KeyArg { key }) => {
            let reply = connect(options)
                .await?
                .enable_key(pb::EnableKeyRequest { key_id: key })
                .await?;
            show_key(required(reply.key_metadata, "key metadata")?, options)
        }
        KeyCommand::Disable(KeyArg { key }) => {
            let reply = connect(options)
                .await?
                .disable_key(pb::DisableKeyRequest { key_id: key })
                .await?;
            show_key(required(reply.key_metadata, "key metadata")?, options)
        }
        KeyCommand::ScheduleDeletion(args) => schedule_deletion(args, options).await,
        KeyCommand::CancelDeletion(KeyArg { key }) => {
            let reply = connect(options)
                .await?
                .cancel_key_deletion(pb::CancelKeyDeletionRequest { key_id: key })
                .await?;
            show_key(required(reply.key_metadata, "key metadata")?, options)
        }
        KeyCommand::Versions(KeyArg { key }) => versions(key, options).await,
        KeyCommand::LastUsage(args) => last_usage(args, options).await,
        KeyCommand::RotationPolicy(args) => {
            let rotation_period = args.period_days.map(|days| prost_types::Duration {
                seconds: i64::from(days) * SECONDS_PER_DAY,
                nanos: 0,
            });
            let reply = connect(options)
                .await?
                .set_rotation_policy(pb::SetRotationPolicyRequest {
                    key_id: args.key,
                    rotation_period,
                    next_rotation_time: args.next_rotation,
                })
                .await?;
            show_key(required(reply.key_metadata, "key metadata")?, options)
        }
        KeyCommand::EnableVersion(VersionArgs { key, version }) => {
            let reply = connect(options)
                .await?
                .enable_key_version(pb::EnableKeyVersionRequest {
                    key_id: key,
                    version,
                })
                .await?;
            show_version(required(reply.key_version, "key version")?, options)
        }
        KeyCommand::DisableVersion(VersionArgs { key, version }) => {
            let reply = connect(options)
                .await?
                .disable_key_version(pb::DisableKeyVersionRequest {
                    key_id: key,
                    version,
                })
                .await?;
            show_version(required(reply.key_version, "key version")?, options)
        }
        KeyCommand::SetPrimary(VersionArgs { key, version }) => {
            let reply = connect(options)
                .await?
                .set_primary_version(pb::SetPrimaryVersionRequest {
                    key_id: key,
                    version,
                })
                .await?;
            show_key(required(reply.key_metadata, "key metadata")?, options)
        }
        KeyCommand::ScheduleVersionDestruction(args) => {
            let reply = connect(options)
                .await?
                .schedule_key_version_destruction(pb::ScheduleKeyVersionDestructionRequest {
                    key_id: args.key,
                    version: args.version,
                    pending_window_days: args.days,
                    override_recent_use: args.override_recent_use,
                })
                .await?;
            show_version(required(reply.key_version, "key version")?, options)
        }
        KeyCommand::RestoreVersion(VersionArgs { key, version }) => {
            let reply = connect(options)
                .await?
                .restore_key_version(pb::RestoreKeyVersionRequest {
                    key_id: key,
                    version,
                })
                .await?;
            show_version(required(reply.key_version, "key version")?, options)
        }
        KeyCommand::ReEncryptOnlyVersion(VersionArgs { key, version }) => {
            let reply = connect(options)
                .await?
                .set_key_version_re_encrypt_only(pb::SetKeyVersionReEncryptOnlyRequest {
                    key_id: key,
                    version,
                })
                .await?;
            show_version(required(reply.key_version, "key version")?, options)
        }
        KeyCommand::Tag(TagArgs { key, tags }) => {
            let tags = parse::pairs_to_map(tags, "tag")?;
            let reply = connect(options)
                .await?
                .tag_key(pb::TagKeyRequest { key_id: key, tags })
                .await?;
            show_key(required(reply.key_metadata, "key metadata")?, options)
        }
        KeyCommand::Untag(UntagArgs { key, tag_keys }) => {
            let reply = connect(options)
                .await?
                .untag_key(pb::UntagKeyRequest {
                    key_id: key,
                    tag_keys,
                })
                .await?;
            show_key(required(reply.key_metadata, "key metadata")?, options)
        }
        KeyCommand::UpdateDescription(UpdateDescriptionArgs { key, description }) => {
            let reply = connect(options)
                .await?
                .update_key_description(pb::UpdateKeyDescriptionRequest {
                    key_id: key,
                    description,
                })
                .await?;
            show_key(required(reply.key_metadata, "key metadata")?, options)
        }
    }
}

/// CreateKey, then CreateAlias if `--alias` was given.
async fn create(args: CreateKeyArgs, options: &ClientOptions) -> anyhow::Result<()> {
    let tags = parse::pairs_to_map(args.tags, "tag")?;
    let rotation_period = args.rotation_period_days.map(|days| prost_types::Duration {
        seconds: i64::from(days) * SECONDS_PER_DAY,
        nanos: 0,
    });
    let client = connect(options).await?;
    // An alias already in use would leave a new key without it: refuse
    // before creating anything (CreateAlias below still refuses a race).
    if let Some(alias_name) = &args.alias {
        let existing = client
            .describe_key(pb::DescribeKeyRequest {
                key_id: alias_name.clone(),
            })
            .await;
        match existing {
            Ok(reply) => {
                let target = reply.key_metadata.map(|m| m.key_id).unwrap_or_default();
                anyhow::bail!(
                    "ALREADY_EXISTS: {alias_name} already names key {target}; nothing was created (choose another alias, or move it with `kms alias update`)"
                );
            }
            Err(error) if error.code() == Some(tonic::Code::InvalidArgument) => {
                return Err(anyhow::Error::new(error).context("nothing was created"));
            }
            // Free (NOT_FOUND), or not ours to describe: CreateAlias decides.
            Err(_) => {}
        }
    }
    let reply = client
        .create_key(pb::CreateKeyRequest {
            description: args.description,
            key_spec: pb::KeySpec::Aes256Gcm as i32,
            tags,
            rotation_period,
            origin: match args.origin {
                Origin::Kms => pb::KeyOrigin::Kms,
                Origin::External => pb::KeyOrigin::External,
            } as i32,
        })
        .await?;
    let mut metadata = required(reply.key_metadata, "key metadata")?;
    if let Some(alias_name) = args.alias {
        let reply = client
            .create_alias(pb::CreateAliasRequest {
                alias_name: alias_name.clone(),
                target_key_id: metadata.key_id.clone(),
            })
            .await
            .map_err(|error| {
                anyhow::Error::new(error).context(format!(
                    "key {} was created, but alias {alias_name} was not",
                    metadata.key_id
                ))
            })?;
        // The metadata predates the alias; show the key as it is now.
        let name = reply.alias.map_or(alias_name, |a| a.alias_name);
        if !metadata.aliases.contains(&name) {
            metadata.aliases.push(name);
            metadata.aliases.sort();
        }
    }
    show_key(metadata, options)
}

async fn list(args: ListKeysArgs, options: &ClientOptions) -> anyhow::Result<()> {
    let client = connect(options).await?;
    let mut keys = Vec::new();
    let mut page_token = String::new();
    loop {
        let reply = client
            .list_keys(pb::ListKeysRequest {
                page_size: args.page_size.unwrap_or(0),
                page_token: page_token.clone(),
                include_deleted: args.all,
            })
            .await?;
        keys.extend(reply.keys);
        match next_page_token(&page_token, reply.next_page_token)? {
            Some(next) => page_token = next,
            None => break,
        }
    }
    if options.json {
        return output::emit_json(&Value::Array(keys.iter().map(key_json).collect()));
    }
    if keys.is_empty() {
        return output::emit("No keys.\n");
    }
    output::emit(&keys_table(&keys).render())
}

fn keys_table(keys: &[pb::KeyMetadata]) -> Table {
    let mut table = Table::new(&[
        "KEY ID",
        "STATE",
        "PRIMARY",
        "ALIASES",
        "ROTATION",
        "CREATED",
        "DESCRIPTION",
    ]);
    for key in keys {
        table.row(vec![
            key.key_id.clone(),
            output::key_state_name(key.state),
            key.primary_version.to_string(),
            output::dash(&key.aliases.join(",")),
            output::duration_cell(key.rotation_period.as_ref()),
            output::time_cell(key.create_time.as_ref()),
            output::truncate(&key.description, LIST_DESCRIPTION_WIDTH),
        ]);
    }
    table
}

async fn schedule_deletion(
    args: ScheduleDeletionArgs,
    options: &ClientOptions,
) -> anyhow::Result<()> {
    let reply = connect(options)
        .await?
        .schedule_key_deletion(pb::ScheduleKeyDeletionRequest {
            key_id: args.key,
            pending_window_days: args.days,
        })
        .await?;
    let metadata = required(reply.key_metadata, "key metadata")?;
    if options.json {
        return output::emit_json(&json!({
            "key_metadata": key_json(&metadata),
            "pending_window_days": reply.pending_window_days,
        }));
    }
    let key_id = output::sanitize(&metadata.key_id);
    output::emit(&format!(
        "{}\nKey {key_id} will be destroyed at {} (waiting period {} days).\n\
         Cancel with: kms key cancel-deletion {key_id}\n",
        output::render_pairs(&key_pairs(&metadata)),
        output::time_cell(metadata.deletion_time.as_ref()),
        reply.pending_window_days,
    ))
}

async fn versions(key: String, options: &ClientOptions) -> anyhow::Result<()> {
    let client = connect(options).await?;
    let mut versions = Vec::new();
    let mut page_token = String::new();
    loop {
        let reply = client
            .list_key_versions(pb::ListKeyVersionsRequest {
                key_id: key.clone(),
                page_size: 0,
                page_token: page_token.clone(),
            })
            .await?;
        versions.extend(reply.versions);
        match next_page_token(&page_token, reply.next_page_token)? {
            Some(next) => page_token = next,
            None => break,
        }
    }
    if options.json {
        return output::emit_json(&Value::Array(versions.iter().map(version_json).collect()));
    }
    if versions.is_empty() {
        return output::emit("No versions.\n");
    }
    output::emit(&versions_table(&versions).render())
}

async fn last_usage(args: LastUsageArgs, options: &ClientOptions) -> anyhow::Result<()> {
    let client = connect(options).await?;
    let reply = client
        .get_key_last_usage(pb::GetKeyLastUsageRequest {
            key_id: args.key,
            version: args.version.unwrap_or(0),
        })
        .await?;
    if options.json {
        return output::emit_json(&json!({
            "key_id": reply.key_id,
            "usage": usage_json(reply.usage.as_ref()),
            "versions": reply
                .versions
                .iter()
                .map(|v| json!({
                    "version": v.version,
                    "state": output::key_version_state_name(v.state),
                    "usage": usage_json(v.usage.as_ref()),
                }))
                .collect::<Vec<_>>(),
        }));
    }
    let total = reply.usage.unwrap_or_default();
    let mut text = output::render_pairs(&[
        ("Key ID", reply.key_id.clone()),
        (
            "Last encrypt",
            output::time_cell(total.last_encrypt_time.as_ref()),
        ),
        ("Encrypts", total.encrypt_count.to_string()),
        (
            "Last decrypt",
            output::time_cell(total.last_decrypt_time.as_ref()),
        ),
        ("Decrypts", total.decrypt_count.to_string()),
    ]);
    let mut table = Table::new(&[
        "VERSION",
        "STATE",
        "LAST ENCRYPT",
        "ENCRYPTS",
        "LAST DECRYPT",
        "DECRYPTS",
    ]);
    for v in &reply.versions {
        let mut row = vec![
            v.version.to_string(),
            output::key_version_state_name(v.state),
        ];
        row.extend(usage_cells(v.usage.as_ref()));
        table.row(row);
    }
    text.push('\n');
    text.push_str(&table.render());
    output::emit(&text)
}

/// The usage columns of the version tables: last encrypt, encrypts, last
/// decrypt, decrypts (`-` and 0 when unused or from a server that does not say).
fn usage_cells(usage: Option<&pb::KeyUsage>) -> [String; 4] {
    let usage = usage.cloned().unwrap_or_default();
    [
        output::time_cell(usage.last_encrypt_time.as_ref()),
        usage.encrypt_count.to_string(),
        output::time_cell(usage.last_decrypt_time.as_ref()),
        usage.decrypt_count.to_string(),
    ]
}

/// The JSON form of a `KeyUsage` (null when the server did not say).
fn usage_json(usage: Option<&pb::KeyUsage>) -> Value {
    match usage {
        None => Value::Null,
        Some(u) => json!({
            "encrypt_count": u.encrypt_count,
            "decrypt_count": u.decrypt_count,
            "last_encrypt_time": output::time_json(u.last_encrypt_time.as_ref()),
            "last_decrypt_time": output::time_json(u.last_decrypt_time.as_ref()),
        }),
    }
}

fn versions_table(versions: &[pb::KeyVersion]) -> Table {
    let mut table = Table::new(&[
        "VERSION",
        "STATE",
        "PRIMARY",
        "CREATED",
        "UPDATED",
        "DESTROY TIME",
        "GCM INVOCATIONS",
        "HELD AS",
        "ORIGIN",
        "LAST ENCRYPT",
        "ENCRYPTS",
        "LAST DECRYPT",
        "DECRYPTS",
    ]);
    for v in versions {
        let [last_encrypt, encrypts, last_decrypt, decrypts] = usage_cells(v.usage.as_ref());
        table.row(vec![
            v.version.to_string(),
            output::key_version_state_name(v.state),
            if v.primary { "yes" } else { "" }.to_owned(),
            output::time_cell(v.create_time.as_ref()),
            output::time_cell(v.update_time.as_ref()),
            output::time_cell(v.destroy_time.as_ref()),
            v.gcm_invocations.to_string(),
            held_as(v),
            output::key_origin_name(v.origin),
            last_encrypt,
            encrypts,
            last_decrypt,
            decrypts,
        ]);
    }
    table
}

fn show_key(metadata: pb::KeyMetadata, options: &ClientOptions) -> anyhow::Result<()> {
    if options.json {
        output::emit_json(&key_json(&metadata))
    } else {
        output::emit(&output::render_pairs(&key_pairs(&metadata)))
    }
}

fn show_version(version: pb::KeyVersion, options: &ClientOptions) -> anyhow::Result<()> {
    if options.json {
        output::emit_json(&version_json(&version))
    } else {
        output::emit(&output::render_pairs(&version_pairs(&version)))
    }
}

fn key_pairs(m: &pb::KeyMetadata) -> Vec<(&'static str, String)> {
    let mut pairs = vec![
        ("Key ID", m.key_id.clone()),
        ("Aliases", output::dash(&m.aliases.join(", "))),
        ("Description", output::dash(&m.description)),
        ("State", output::key_state_name(m.state)),
        ("Key spec", output::key_spec_name(m.key_spec)),
        (
            "Primary version",
            // 0: no version yet (a key awaiting imported material).
            match m.primary_version {
                0 => "-".to_owned(),
                n => n.to_string(),
            },
        ),
        ("Origin", output::key_origin_name(m.origin)),
        (
            "Primary held as",
            held_as_cell(m.primary_protection, m.primary_root_epoch),
        ),
        (
            "Rotation period",
            output::duration_cell(m.rotation_period.as_ref()),
        ),
        (
            "Next rotation",
            output::time_cell(m.next_rotation_time.as_ref()),
        ),
        ("Deletion time", output::time_cell(m.deletion_time.as_ref())),
        ("Created", output::time_cell(m.create_time.as_ref())),
        ("Updated", output::time_cell(m.update_time.as_ref())),
        ("Tags", output::pairs_cell(&m.tags)),
    ];
    // Only DescribeKey reports the summed uses.
    if m.usage.is_some() {
        pairs.extend(usage_pairs(m.usage.as_ref()));
    }
    pairs
}

fn version_pairs(v: &pb::KeyVersion) -> Vec<(&'static str, String)> {
    vec![
        ("Key ID", v.key_id.clone()),
        ("Version", v.version.to_string()),
        ("State", output::key_version_state_name(v.state)),
        ("Primary", if v.primary { "yes" } else { "no" }.to_owned()),
        ("Created", output::time_cell(v.create_time.as_ref())),
        ("Updated", output::time_cell(v.update_time.as_ref())),
        ("Destroy time", output::time_cell(v.destroy_time.as_ref())),
        ("GCM invocations", v.gcm_invocations.to_string()),
        ("Held as", held_as(v)),
        ("Origin", output::key_origin_name(v.origin)),
    ]
}

/// A key's summed uses in `kms key describe` (DescribeKey sets them).
fn usage_pairs(usage: Option<&pb::KeyUsage>) -> Vec<(&'static str, String)> {
    let [last_encrypt, encrypts, last_decrypt, decrypts] = usage_cells(usage);
    vec![
        ("Last encrypt", last_encrypt),
        ("Encrypts", encrypts),
        ("Last decrypt", last_decrypt),
        ("Decrypts", decrypts),
    ]
}

/// How the version's KEK is held: `token object`, `wrapped (root N)`, or
/// `-` from a server that does not say.
fn held_as(v: &pb::KeyVersion) -> String {
    held_as_cell(v.protection, v.root_epoch)
}

/// `held_as` from a protection value and root epoch (also a key's primary
/// version in `key describe`).
fn held_as_cell(protection: i32, root_epoch: u32) -> String {
    match pb::KeyVersionProtection::try_from(protection) {
        Ok(pb::KeyVersionProtection::TokenObject) => "token object".to_owned(),
        Ok(pb::KeyVersionProtection::Wrapped) => format!("wrapped (root {root_epoch})"),
        _ => "-".to_owned(),
    }
}

/// The JSON name of a protection value (`held_as` fields).
fn held_as_json(protection: i32) -> &'static str {
    match pb::KeyVersionProtection::try_from(protection) {
        Ok(pb::KeyVersionProtection::TokenObject) => "TOKEN_OBJECT",
        Ok(pb::KeyVersionProtection::Wrapped) => "WRAPPED",
        _ => "UNSPECIFIED",
    }
}

/// The JSON form of key metadata: snake_case fields, enum values without their
/// prefix, times in RFC 3339 (null when unset), the rotation period in seconds.
fn key_json(m: &pb::KeyMetadata) -> Value {
    let tags: BTreeMap<&String, &String> = m.tags.iter().collect();
    json!({
        "key_id": m.key_id,
        "aliases": m.aliases,
        "description": m.description,
        "tags": tags,
        "key_spec": output::key_spec_name(m.key_spec),
        "state": output::key_state_name(m.state),
        "primary_version": m.primary_version,
        "origin": output::key_origin_name(m.origin),
        "rotation_period_seconds": output::duration_json(m.rotation_period.as_ref()),
        "next_rotation_time": output::time_json(m.next_rotation_time.as_ref()),
        "deletion_time": output::time_json(m.deletion_time.as_ref()),
        "create_time": output::time_json(m.create_time.as_ref()),
        "update_time": output::time_json(m.update_time.as_ref()),
        "primary_held_as": held_as_json(m.primary_protection),
        "primary_root_epoch": m.primary_root_epoch,
        "usage": usage_json(m.usage.as_ref()),
    })
}

fn version_json(v: &pb::KeyVersion) -> Value {
    json!({
        "key_id": v.key_id,
        "version": v.version,
        "state": output::key_version_state_name(v.state),
        "primary": v.primary,
        "create_time": output::time_json(v.create_time.as_ref()),
        "update_time": output::time_json(v.update_time.as_ref()),
        "destroy_time": output::time_json(v.destroy_time.as_ref()),
        "gcm_invocations": v.gcm_invocations,
        "held_as": held_as_json(v.protection),
        "root_epoch": v.root_epoch,
        "origin": output::key_origin_name(v.origin),
        "usage": usage_json(v.usage.as_ref()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(seconds: i64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds, nanos: 0 })
    }

    fn sample_key() -> pb::KeyMetadata {
        pb::KeyMetadata {
            key_id: "key-0123456789abcdef0123456789abcdef".into(),
            aliases: vec!["alias/a".into(), "alias/b".into()],
            description: "payments".into(),
            tags: [
                ("team".to_owned(), "x".to_owned()),
                ("env".to_owned(), "prod".to_owned()),
            ]
            .into_iter()
            .collect(),
            key_spec: pb::KeySpec::Aes256Gcm as i32,
            state: pb::KeyState::Enabled as i32,
            primary_version: 2,
            rotation_period: Some(prost_types::Duration {
                seconds: 90 * SECONDS_PER_DAY,
                nanos: 0,
            }),
            next_rotation_time: ts(1_775_001_600),
            deletion_time: None,
            create_time: ts(1_767_225_600),
            update_time: ts(1_767_225_601),
            primary_protection: pb::KeyVersionProtection::Wrapped as i32,
            primary_root_epoch: 3,
            origin: pb::KeyOrigin::Kms as i32,
            usage: None,
        }
    }

    #[test]
    fn key_view_shows_every_field() {
        let text = output::render_pairs(&key_pairs(&sample_key()));
        assert_eq!(
            text,
            "Key ID           key-0123456789abcdef0123456789abcdef\n\
             Aliases          alias/a, alias/b\n\
             Description      payments\n\
             State            ENABLED\n\
             Key spec         AES_256_GCM\n\
             Primary version  2\n\
             Origin           KMS\n\
             Primary held as  wrapped (root 3)\n\
             Rotation period  90 days\n\
             Next rotation    2026-04-01T00:00:00Z\n\
             Deletion time    -\n\
             Created          2026-01-01T00:00:00Z\n\
             Updated          2026-01-01T00:00:01Z\n\
             Tags             env=prod, team=x\n"
        );
    }

    #[test]
    fn key_list_table_is_aligned() {
        let mut other = sample_key();
        other.key_id = "key-ffffffffffffffffffffffffffffffff".into();
        other.aliases.clear();
        other.state = pb::KeyState::PendingDeletion as i32;
        other.rotation_period = None;
        other.description = "x".repeat(50);
        let text = keys_table(&[sample_key(), other]).render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(
            lines[0],
            "KEY ID                                STATE             PRIMARY  ALIASES          \
             ROTATION  CREATED               DESCRIPTION"
        );
        assert_eq!(
            lines[1],
            "key-0123456789abcdef0123456789abcdef  ENABLED           2        alias/a,alias/b  \
             90 days   2026-01-01T00:00:00Z  payments"
        );
        assert!(
            lines[2].starts_with(
                "key-ffffffffffffffffffffffffffffffff  PENDING_DELETION  2        -  "
            )
        );
        assert!(lines[2].ends_with(&format!("{}...", "x".repeat(37))));
    }

    #[test]
    fn key_json_uses_short_enum_names_and_rfc3339_times() {
        let value = key_json(&sample_key());
        assert_eq!(value["state"], "ENABLED");
        assert_eq!(value["key_spec"], "AES_256_GCM");
        assert_eq!(value["rotation_period_seconds"], 90 * SECONDS_PER_DAY);
        assert_eq!(value["create_time"], "2026-01-01T00:00:00Z");
        assert_eq!(value["deletion_time"], Value::Null);
        assert_eq!(value["tags"]["env"], "prod");
        assert_eq!(value["aliases"][1], "alias/b");
        assert_eq!(value["primary_held_as"], "WRAPPED");
        assert_eq!(value["primary_root_epoch"], 3);
        let unspecified = key_json(&pb::KeyMetadata {
            primary_protection: 0,
            primary_root_epoch: 0,
            ..sample_key()
        });
        assert_eq!(unspecified["primary_held_as"], "UNSPECIFIED");
    }

    #[test]
    fn key_describe_shows_how_the_primary_version_is_held() {
        let held = |m: &pb::KeyMetadata| {
            key_pairs(m)
                .into_iter()
                .find(|(name, _)| *name == "Primary held as")
                .map(|(_, value)| value)
        };
        assert_eq!(held(&sample_key()).as_deref(), Some("wrapped (root 3)"));
        let token = pb::KeyMetadata {
            primary_protection: pb::KeyVersionProtection::TokenObject as i32,
            primary_root_epoch: 0,
            ..sample_key()
        };
        assert_eq!(held(&token).as_deref(), Some("token object"));
    }

    #[test]
    fn versions_table_marks_the_primary() {
        let version = |n, primary, state: pb::KeyVersionState| pb::KeyVersion {
            key_id: "key-1".into(),
            version: n,
            state: state as i32,
            primary,
            create_time: ts(0),
            update_time: ts(86_400),
            destroy_time: None,
            gcm_invocations: u64::from(n) * 1000,
            protection: if n == 1 {
                pb::KeyVersionProtection::TokenObject
            } else {
                pb::KeyVersionProtection::Wrapped
            } as i32,
            root_epoch: if n == 1 { 0 } else { 1 },
            origin: pb::KeyOrigin::Kms as i32,
            usage: (n == 1).then(|| pb::KeyUsage {
                encrypt_count: 3,
                decrypt_count: 5,
                last_encrypt_time: ts(0),
                last_decrypt_time: ts(86_400),
            }),
        };
        let text = versions_table(&[
            version(1, false, pb::KeyVersionState::Disabled),
            version(2, true, pb::KeyVersionState::Enabled),
        ])
        .render();
        assert_eq!(
            text,
            "VERSION  STATE     PRIMARY  CREATED               UPDATED               DESTROY TIME  GCM INVOCATIONS  HELD AS           ORIGIN  LAST ENCRYPT          ENCRYPTS  LAST DECRYPT          DECRYPTS\n\
             1        DISABLED           1970-01-01T00:00:00Z  1970-01-02T00:00:00Z  -             1000             token object      KMS     1970-01-01T00:00:00Z  3         1970-01-02T00:00:00Z  5\n\
             2        ENABLED   yes      1970-01-01T00:00:00Z  1970-01-02T00:00:00Z  -             2000             wrapped (root 1)  KMS     -                     0         -                     0\n"
        );
    }
}
