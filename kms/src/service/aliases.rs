//! Aliases (`alias/<name>` pointers to keys): create, move, delete, list.
//! Every operation is audited; moving or deleting an alias needs the Manage
//! permission on every key it points to before and after, so that nobody can
//! redirect another key's callers.

use kms_storage::{Alias, AliasEntry, KeyId, KeyState, Page, Permission};

use super::operation::Operation;
use super::page_token::{self, Listing};
use super::{KmsService, RequestMeta};
use crate::error::{KmsError, Result};

pub(super) fn parse_alias(alias: &str) -> Result<Alias> {
    Ok(Alias::parse(alias)?)
}

impl KmsService {
    pub fn create_alias(&self, meta: &RequestMeta, alias: &str, key: &str) -> Result<AliasEntry> {
        self.point_alias(
            meta,
            Operation::CreateAlias,
            alias,
            key,
            kms_storage::Catalogue::create_alias,
        )
    }

    pub fn update_alias(&self, meta: &RequestMeta, alias: &str, key: &str) -> Result<AliasEntry> {
        self.point_alias(
            meta,
            Operation::UpdateAlias,
            alias,
            key,
            kms_storage::Catalogue::update_alias,
        )
    }

    /// Creates or moves an alias (`write`) to a live key.
    fn point_alias(
        &self,
        meta: &RequestMeta,
        operation: Operation,
        alias: &str,
        key: &str,
        write: fn(&kms_storage::Catalogue, &Alias, &KeyId) -> Result<(), kms_storage::StorageError>,
    ) -> Result<AliasEntry> {
        self.audited(meta, operation, Some(key), |audit| {
            let alias = parse_alias(alias)?;
            // An alias names a key, never another alias (as AWS KMS's
            // TargetKeyId): a chain would silently follow the other alias
            // whenever it moves.
            if KeyId::parse(key).is_err() {
                return Err(KmsError::invalid(
                    "target_key_id",
                    "must be a key id (key-...), not an alias",
                ));
            }
            let record = self.resolve_for(meta, audit, key, Permission::Manage)?;
            audit.key(&record.id, None);
            // Moving an alias also takes it away from its current key: whoever
            // may not manage that key must not redirect its callers.
            if let Some(current) = self.catalogue().get_alias(&alias)?
                && current != record.id
                && let Some(current) = self.catalogue().get_key(&current)?
            {
                self.authorize(meta, &current, Permission::Manage, None)?;
            }
            if let KeyState::Deleted { .. } = record.state {
                return Err(KmsError::KeyDeleted {
                    key_id: record.id.clone(),
                });
            }
            write(self.catalogue(), &alias, &record.id)?;
            Ok(AliasEntry {
                alias,
                key_id: record.id,
            })
        })
    }

    pub fn delete_alias(&self, meta: &RequestMeta, alias: &str) -> Result<()> {
        self.audited(meta, Operation::DeleteAlias, Some(alias), |audit| {
            let parsed = parse_alias(alias)?;
            match self.catalogue().get_alias(&parsed)? {
                Some(id) => {
                    audit.key(&id, None);
                    match self.catalogue().get_key(&id)? {
                        Some(record) => self.authorize(meta, &record, Permission::Manage, None)?,
                        None => self.require_admin(meta, "delete aliases")?,
                    }
                }
                None => self.require_admin(meta, "delete aliases")?,
            }
            self.catalogue().delete_alias(&parsed)?;
            Ok(())
        })
    }

    pub fn list_aliases(
        &self,
        meta: &RequestMeta,
        key: Option<&str>,
        page_token: Option<&str>,
        limit: usize,
    ) -> Result<Page<AliasEntry>> {
        self.audited(meta, Operation::ListAliases, key, |audit| {
            let id = match key {
                Some(k) if !k.is_empty() => {
                    let record = self.resolve_for(meta, audit, k, Permission::Describe)?;
                    audit.key(&record.id, None);
                    Some(record.id)
                }
                _ => {
                    self.require_admin(meta, "list all aliases")?;
                    None
                }
            };
            // Bounded at the first page by the last alias name then (see
            // `Catalogue::list_aliases_until`), so paging terminates.
            let catalogue = self.catalogue();
            let scope = id.as_ref().map_or("", KeyId::as_str);
            let (after, until) = match page_token {
                Some(token) => {
                    page_token::decode(token, Listing::Aliases, &[scope.as_bytes()], |r| {
                        let after = Alias::parse(r.str()?).ok()?;
                        let until = Alias::parse(r.str()?).ok()?;
                        Some((Some(after), until))
                    })?
                }
                None => match catalogue.last_alias(id.as_ref())? {
                    Some(until) => (None, until),
                    None => {
                        return Ok(Page {
                            items: Vec::new(),
                            next_page_token: None,
                        });
                    }
                },
            };
            let page = catalogue.list_aliases_until(
                id.as_ref(),
                after.as_ref().map(Alias::as_str),
                &until,
                limit,
            )?;
            Ok(Page {
                items: page.items,
                next_page_token: page.next_page_token.map(|last| {
                    page_token::encode(Listing::Aliases, &[scope.as_bytes()], |w| {
                        w.str(&last).str(until.as_str());
                    })
                }),
            })
        })
    }
}
