//! `kms alias ...`: named pointers to keys, through the KeyManagement service.
#![allow(clippy::print_stdout)]

use kms_proto::v1 as pb;
use serde_json::{Value, json};

use super::output::{self, Table};
use super::{ClientOptions, connect, next_page_token, required};

/// `kms alias` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum AliasCommand {
    /// Create an alias pointing to a key.
    Create(AliasTargetArgs),
    /// Point an existing alias at another key.
    Update(AliasTargetArgs),
    /// Delete an alias (the key is unaffected).
    Delete(AliasNameArg),
    /// List aliases (all pages).
    List(ListAliasesArgs),
}

/// An alias and the key it points to.
#[derive(Debug, clap::Args)]
pub struct AliasTargetArgs {
    /// Alias name, "alias/<name>".
    #[arg(value_name = "alias/NAME")]
    pub alias: String,
    /// Key id ("key-...") the alias points to.
    #[arg(value_name = "KEY")]
    pub key: String,
}

/// An alias named on the command line.
#[derive(Debug, clap::Args)]
pub struct AliasNameArg {
    /// Alias name, "alias/<name>".
    #[arg(value_name = "alias/NAME")]
    pub alias: String,
}

/// Arguments of `kms alias list`.
#[derive(Debug, clap::Args)]
pub struct ListAliasesArgs {
    /// Only aliases pointing to this key (key id or alias).
    #[arg(long, value_name = "KEY")]
    pub key: Option<String>,
}

pub(crate) async fn run(command: AliasCommand, options: &ClientOptions) -> anyhow::Result<()> {
    let client = connect(options).await?;
    match command {
        AliasCommand::Create(AliasTargetArgs { alias, key }) => {
            let reply = client
                .create_alias(pb::CreateAliasRequest {
                    alias_name: alias,
                    target_key_id: key,
                })
                .await?;
            show_alias(&required(reply.alias, "alias")?, options)
        }
        AliasCommand::Update(AliasTargetArgs { alias, key }) => {
            let reply = client
                .update_alias(pb::UpdateAliasRequest {
                    alias_name: alias,
                    target_key_id: key,
                })
                .await?;
            show_alias(&required(reply.alias, "alias")?, options)
        }
        AliasCommand::Delete(AliasNameArg { alias }) => {
            client
                .delete_alias(pb::DeleteAliasRequest {
                    alias_name: alias.clone(),
                })
                .await?;
            if options.json {
                output::emit_json(&json!({ "deleted": alias }))
            } else {
                output::emit(&format!("Deleted {}\n", output::sanitize(&alias)))
            }
        }
        AliasCommand::List(ListAliasesArgs { key }) => {
            let key_id = key.unwrap_or_default();
            let mut aliases = Vec::new();
            let mut page_token = String::new();
            loop {
                let reply = client
                    .list_aliases(pb::ListAliasesRequest {
                        key_id: key_id.clone(),
                        page_size: 0,
                        page_token: page_token.clone(),
                    })
                    .await?;
                aliases.extend(reply.aliases);
                match next_page_token(&page_token, reply.next_page_token)? {
                    Some(next) => page_token = next,
                    None => break,
                }
            }
            if options.json {
                output::emit_json(&Value::Array(aliases.iter().map(alias_json).collect()))
            } else if aliases.is_empty() {
                output::emit("No aliases.\n")
            } else {
                output::emit(&aliases_table(&aliases).render())
            }
        }
    }
}

fn show_alias(alias: &pb::Alias, options: &ClientOptions) -> anyhow::Result<()> {
    if options.json {
        output::emit_json(&alias_json(alias))
    } else {
        output::emit(&aliases_table(std::slice::from_ref(alias)).render())
    }
}

fn aliases_table(aliases: &[pb::Alias]) -> Table {
    let mut table = Table::new(&["ALIAS", "KEY ID", "CREATED", "UPDATED"]);
    for alias in aliases {
        table.row(vec![
            alias.alias_name.clone(),
            alias.target_key_id.clone(),
            output::time_cell(alias.create_time.as_ref()),
            output::time_cell(alias.update_time.as_ref()),
        ]);
    }
    table
}

fn alias_json(alias: &pb::Alias) -> Value {
    json!({
        "alias_name": alias.alias_name,
        "target_key_id": alias.target_key_id,
        "create_time": output::time_json(alias.create_time.as_ref()),
        "update_time": output::time_json(alias.update_time.as_ref()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alias(name: &str, seconds: i64) -> pb::Alias {
        pb::Alias {
            alias_name: name.into(),
            target_key_id: "key-0123456789abcdef0123456789abcdef".into(),
            create_time: Some(prost_types::Timestamp { seconds, nanos: 0 }),
            update_time: None,
        }
    }

    #[test]
    fn alias_table_is_aligned() {
        let text = aliases_table(&[alias("alias/a", 0), alias("alias/payments", 60)]).render();
        assert_eq!(
            text,
            "ALIAS           KEY ID                                CREATED               UPDATED\n\
             alias/a         key-0123456789abcdef0123456789abcdef  1970-01-01T00:00:00Z  -\n\
             alias/payments  key-0123456789abcdef0123456789abcdef  1970-01-01T00:01:00Z  -\n"
        );
    }

    #[test]
    fn alias_json_has_null_for_unset_times() {
        let value = alias_json(&alias("alias/a", 0));
        assert_eq!(value["alias_name"], "alias/a");
        assert_eq!(value["create_time"], "1970-01-01T00:00:00Z");
        assert_eq!(value["update_time"], Value::Null);
    }
}
