//! Key lifecycle: create, describe, list, update, enable/disable, rotation,
//! versions, deletion scheduling (aliases: `aliases.rs`). Every operation is
//! audited.
//!
//! Every key and version state change takes the key's lock and validates
//! against the key and version records read *under* that lock (never a
//! record read before it: a racing change would slip between), and the
//! catalogue itself refuses a write that breaks a lifecycle invariant
//! (primary always enabled; no new version or primary for a key pending
//! deletion; version numbers never reused), whoever asks.
//!
//! Creating a version is two-phase so that a crash at any moment loses
//! nothing: record it pending (synced) → generate the KEK in the HSM (synced
//! to disk, confirmed from a fresh session) → mark it enabled and primary
//! (synced). Start-up reconciliation finishes or discards what a crash left.

use std::collections::BTreeMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::time::Duration;

use kms_hsm::{KeyPurpose, WrappedKey};
use kms_storage::{
    Alias, AliasEntry, KekHandle, KeyId, KeyOrigin, KeyRecord, KeySpec, KeyState, NewKey, Page,
    Permission, RotationPolicy, VersionRecord, VersionState,
};
use parking_lot::{Mutex, MutexGuard};

use super::aliases::parse_alias;
use super::lookup::{from_working_key_error, version_unusable};
use super::operation::Operation;
use super::page_token::{self, Listing};
use super::{KmsService, RequestMeta, kek_object_id, new_kek_handle, now_ms};
use crate::error::{KmsError, Result};

/// Serializes lifecycle changes of one key (rotation against disable, two
/// concurrent rotations) without a global lock: 64 stripes by key id. Not
/// reentrant: take it once per operation, and validate against what is
/// read after taking it.
#[derive(Debug)]
pub(crate) struct KeyLocks {
    stripes: Vec<Mutex<()>>,
}

impl Default for KeyLocks {
    fn default() -> Self {
        KeyLocks {
            stripes: (0..64).map(|_| Mutex::new(())).collect(),
        }
    }
}

impl KeyLocks {
    pub(super) fn lock(&self, key: &KeyId) -> MutexGuard<'_, ()> {
        let mut hasher = DefaultHasher::new();
        key.hash(&mut hasher);
        let stripe = (hasher.finish() % self.stripes.len() as u64) as usize;
        self.stripes[stripe].lock()
    }
}

/// Deletion waiting period bounds, in days (as AWS KMS).
pub const MIN_DELETION_DAYS: u32 = 7;
pub const MAX_DELETION_DAYS: u32 = 30;
pub const DEFAULT_DELETION_DAYS: u32 = 30;
/// Automatic rotation period bounds.
pub const MIN_ROTATION_PERIOD: Duration = Duration::from_secs(86_400);
pub const MAX_ROTATION_PERIOD: Duration = Duration::from_secs(3650 * 86_400);

const MAX_DESCRIPTION: usize = 8192;
const MAX_TAGS: usize = 50;
const MAX_TAG_KEY: usize = 128;
const MAX_TAG_VALUE: usize = 256;

/// Input of CreateKey.
#[derive(Debug, Clone, Default)]
pub struct CreateKeyInput {
    pub description: String,
    pub tags: BTreeMap<String, String>,
    pub aliases: Vec<String>,
    /// None: the configured default (which may be no rotation).
    pub rotation_period: Option<Duration>,
    /// Where the material comes from. `External`: no version until
    /// ImportKeyMaterial, never rotated by kms (no rotation period).
    pub origin: KeyOrigin,
}

/// Input of SetRotationPolicy.
#[derive(Debug, Clone, Copy, Default)]
pub struct RotationPolicyInput {
    /// Rotation period; None turns periodic rotation off.
    pub period: Option<Duration>,
    /// First rotation, in milliseconds since the Unix epoch; None means one
    /// period from now.
    pub next_rotation_at_ms: Option<u64>,
}

/// A key with its aliases, as described to callers.
#[derive(Debug, Clone)]
pub struct KeyView {
    pub record: KeyRecord,
    pub aliases: Vec<Alias>,
    /// How the primary version's KEK is held (token object or wrapped
    /// blob), for `KeyMetadata`; `None` when the key has no primary version.
    pub primary_kek: Option<kms_storage::KekHandle>,
}

fn validate_tags(tags: &BTreeMap<String, String>) -> Result<()> {
    if tags.len() > MAX_TAGS {
        return Err(KmsError::invalid(
            "tags",
            format!("at most {MAX_TAGS} tags"),
        ));
    }
    for (k, v) in tags {
        if k.is_empty() || k.len() > MAX_TAG_KEY {
            return Err(KmsError::invalid(
                "tags",
                format!("tag keys must be 1 to {MAX_TAG_KEY} bytes"),
            ));
        }
        if v.len() > MAX_TAG_VALUE {
            return Err(KmsError::invalid(
                "tags",
                format!("tag values must be at most {MAX_TAG_VALUE} bytes"),
            ));
        }
    }
    Ok(())
}

/// CreateKeyRequest.description: "up to 8192 characters" (Unicode scalar
/// values, as the proto says, not bytes).
fn validate_description(description: &str) -> Result<()> {
    if description.chars().count() > MAX_DESCRIPTION {
        return Err(KmsError::invalid(
            "description",
            format!("at most {MAX_DESCRIPTION} characters"),
        ));
    }
    Ok(())
}

fn validate_period(period: Duration) -> Result<()> {
    if !(MIN_ROTATION_PERIOD..=MAX_ROTATION_PERIOD).contains(&period) {
        return Err(KmsError::invalid(
            "rotation_period",
            "must be between 1 day and 3650 days",
        ));
    }
    Ok(())
}

fn period_ms(period: Duration) -> u64 {
    u64::try_from(period.as_millis()).unwrap_or(u64::MAX)
}

impl KmsService {
    pub fn create_key(&self, meta: &RequestMeta, input: CreateKeyInput) -> Result<KeyView> {
        self.audited(meta, Operation::CreateKey, None, |audit| {
            self.require_admin(meta, "create keys")?;
            validate_description(&input.description)?;
            validate_tags(&input.tags)?;
            let aliases = input
                .aliases
                .iter()
                .map(|a| parse_alias(a.as_str()))
                .collect::<Result<Vec<_>>>()?;
            let external = input.origin == KeyOrigin::External;
            if external && input.rotation_period.is_some() {
                return Err(KmsError::invalid(
                    "rotation_period",
                    "must be unset for a key of origin EXTERNAL: kms cannot generate its material",
                ));
            }
            if external && self.wrapped.is_none() {
                return Err(super::ImportRefusal::NeedsWrappedVersions.into());
            }
            // The server's default period is for keys kms can rotate.
            let period = if external {
                None
            } else {
                input.rotation_period.or(self.rotation.default_period)
            };
            if let Some(period) = period {
                validate_period(period)?;
            }
            let now = now_ms();
            let id = KeyId::from_random(random_id_bytes()?);
            audit.key(&id, (!external).then_some(1));
            // Held from the first write: nothing changes the key while its
            // first version is pending.
            let _guard = self.key_locks.lock(&id);
            let (rotation, next_rotation_at_ms) = match period {
                Some(p) => (
                    RotationPolicy::Every {
                        period_secs: p.as_secs(),
                    },
                    Some(now.saturating_add(period_ms(p))),
                ),
                None => (RotationPolicy::Manual, None),
            };
            let catalogue = self.catalogue();
            let new_key = NewKey {
                id: id.clone(),
                description: input.description,
                tags: input.tags,
                spec: KeySpec::Aes256Gcm,
                state: KeyState::Enabled,
                rotation,
                next_rotation_at_ms,
                aliases,
            };
            if external {
                // No version: the owner imports the first one.
                catalogue.create_key_pending_import(new_key, now)?;
                return self.key_view(&id);
            }
            if let Some(wrapped) = self.wrapped.as_ref().filter(|w| w.new_versions) {
                // Wrap, MAC, then one catalogue write: a crash before it
                // leaves nothing behind (no pending state, no HSM object).
                let epoch = wrapped.active_epoch();
                let blob = wrapped
                    .keys
                    .generate_wrapped(*epoch, KeyPurpose::Kek)
                    .map_err(from_working_key_error)?;
                let kek = self.wrapped_kek(&id, 1, &blob)?;
                catalogue.create_key_enabled(new_key, kek, now)?;
                return self.key_view(&id);
            }
            let (_, version) = catalogue.create_key(new_key, new_kek_handle(&id, 1), now)?;
            if let Err(e) = self.make_kek(&version) {
                // The key never became usable: leave a tombstone so its id is
                // never reused, and report the HSM failure.
                let _ = catalogue.discard_version(&id, 1, now_ms());
                let _ = catalogue.finalize_key_deletion(&id, now_ms());
                return Err(e);
            }
            catalogue.commit_version(&id, version.version, now_ms())?;
            self.key_view(&id)
        })
    }

    /// The catalogue handle of version `version` of `id` held as `blob`,
    /// with its MAC made inside the HSM under the catalogue-integrity key.
    pub(super) fn wrapped_kek(
        &self,
        id: &KeyId,
        version: u32,
        blob: &WrappedKey,
    ) -> Result<KekHandle> {
        let wrapped = self.wrapped.as_ref().ok_or(KmsError::Internal {
            what: "wrapped key versions are off",
        })?;
        let mac = wrapped
            .keys
            .mac_record(id, version, blob)
            .map_err(from_working_key_error)?;
        Ok(KekHandle::Wrapped {
            root_epoch: blob.root_epoch,
            mechanism: blob.mechanism.code(),
            blob: blob.blob.clone(),
            mac,
        })
    }

    /// Generates the KEK of a pending version in the HSM.
    fn make_kek(&self, version: &VersionRecord) -> Result<()> {
        let object = kek_object_id(&version.kek)?;
        self.hsm.generate_key(KeyPurpose::Kek, &object)?;
        Ok(())
    }

    pub fn key_view(&self, id: &KeyId) -> Result<KeyView> {
        let catalogue = self.catalogue();
        let record = catalogue
            .get_key(id)?
            .ok_or_else(|| KmsError::KeyNotFound {
                key: id.to_string(),
            })?;
        let aliases = catalogue
            .list_aliases(Some(id), None, kms_storage::MAX_PAGE_SIZE)?
            .items
            .into_iter()
            .map(|entry: AliasEntry| entry.alias)
            .collect();
        let primary_kek = match record.primary_version {
            Some(version) => catalogue.get_version(id, version)?.map(|v| v.kek),
            None => None,
        };
        Ok(KeyView {
            record,
            aliases,
            primary_kek,
        })
    }

    pub fn describe_key(&self, meta: &RequestMeta, key: &str) -> Result<KeyView> {
        self.audited(meta, Operation::DescribeKey, Some(key), |audit| {
            let record = self.resolve_for(meta, audit, key, Permission::Describe)?;
            audit.key(&record.id, record.primary_version);
            self.key_view(&record.id)
        })
    }

    /// One page of keys ordered by key id, at most `limit` records read.
    /// Tombstones (state `Deleted`) are left out unless `include_deleted`,
    /// so a page may hold fewer than `limit` keys, even none, while a next
    /// token is still returned. The token is bound to `include_deleted`: a
    /// token from a listing with the other setting is INVALID_ARGUMENT.
    pub fn list_keys(
        &self,
        meta: &RequestMeta,
        page_token: Option<&str>,
        limit: usize,
        include_deleted: bool,
    ) -> Result<Page<KeyView>> {
        let scope: &[&[u8]] = &[&[u8::from(include_deleted)]];
        self.audited(meta, Operation::ListKeys, None, |_| {
            self.require_admin(meta, "list keys")?;
            // Bounded at the first page by creation time (see
            // `Catalogue::list_keys_created_until`), so paging terminates.
            let (after, created_until_ms) = match page_token {
                Some(token) => page_token::decode(token, Listing::Keys, scope, |r| {
                    let after = KeyId::parse(r.str()?).ok()?;
                    Some((Some(after), r.u64()?))
                })?,
                None => (None, first_page_bound_ms()),
            };
            let page = self.catalogue().list_keys_created_until(
                after.as_ref().map(KeyId::as_str),
                created_until_ms,
                limit,
            )?;
            let items = page
                .items
                .iter()
                .filter(|record| {
                    include_deleted || !matches!(record.state, KeyState::Deleted { .. })
                })
                .map(|record| self.key_view(&record.id))
                .collect::<Result<Vec<_>>>()?;
            Ok(Page {
                items,
                next_page_token: page.next_page_token.map(|last| {
                    page_token::encode(Listing::Keys, scope, |w| {
                        w.str(&last).u64(created_until_ms);
                    })
                }),
            })
        })
    }

    /// The key record as it is now, read under the key's lock (the caller
    /// holds it): what a state change must validate against.
    pub(super) fn locked_record(&self, id: &KeyId) -> Result<KeyRecord> {
        let record = self
            .catalogue()
            .get_key(id)?
            .ok_or_else(|| KmsError::KeyNotFound {
                key: id.to_string(),
            })?;
        if let KeyState::Deleted { .. } = record.state {
            return Err(KmsError::KeyDeleted { key_id: record.id });
        }
        Ok(record)
    }

    /// Applies `change` to a live key under its lock, audited as `operation`.
    /// `change` sees the record read under the lock (and under the
    /// catalogue's write lock), and the catalogue checks the result against
    /// its invariants.
    fn change_key(
        &self,
        meta: &RequestMeta,
        operation: Operation,
        key: &str,
        mut change: impl FnMut(&mut KeyRecord) -> Result<()>,
    ) -> Result<KeyView> {
        self.audited(meta, operation, Some(key), |audit| {
            let resolved = self.resolve_for(meta, audit, key, Permission::Manage)?;
            let _guard = self.key_locks.lock(&resolved.id);
            let record = self.locked_record(&resolved.id)?;
            audit.key(&record.id, record.primary_version);
            let updated =
                self.catalogue()
                    .update_key::<KmsError>(&record.id, now_ms(), &mut change)?;
            if updated.state != KeyState::Enabled {
                self.evict_working_keys(&record.id, None);
            }
            self.key_view(&record.id)
        })
    }

    pub fn update_description(
        &self,
        meta: &RequestMeta,
        key: &str,
        description: String,
    ) -> Result<KeyView> {
        self.change_key(meta, Operation::UpdateKeyDescription, key, |k| {
            validate_description(&description)?;
            k.description.clone_from(&description);
            Ok(())
        })
    }

    pub fn tag_key(
        &self,
        meta: &RequestMeta,
        key: &str,
        tags: BTreeMap<String, String>,
    ) -> Result<KeyView> {
        self.change_key(meta, Operation::TagKey, key, |k| {
            if tags.is_empty() {
                return Err(KmsError::invalid("tags", "must not be empty"));
            }
            let mut merged = k.tags.clone();
            merged.extend(tags.clone());
            validate_tags(&merged)?;
            k.tags = merged;
            Ok(())
        })
    }

    pub fn untag_key(
        &self,
        meta: &RequestMeta,
        key: &str,
        tag_keys: Vec<String>,
    ) -> Result<KeyView> {
        self.change_key(meta, Operation::UntagKey, key, |k| {
            if tag_keys.is_empty() {
                return Err(KmsError::invalid("tag_keys", "must not be empty"));
            }
            for tag in &tag_keys {
                k.tags.remove(tag);
            }
            Ok(())
        })
    }

    pub fn enable_key(&self, meta: &RequestMeta, key: &str) -> Result<KeyView> {
        self.change_key(meta, Operation::EnableKey, key, |k| match k.state {
            KeyState::Enabled | KeyState::Disabled => {
                k.state = KeyState::Enabled;
                Ok(())
            }
            _ => Err(KmsError::KeyPendingDeletion {
                key_id: k.id.clone(),
            }),
        })
    }

    pub fn disable_key(&self, meta: &RequestMeta, key: &str) -> Result<KeyView> {
        self.change_key(meta, Operation::DisableKey, key, |k| match k.state {
            KeyState::Enabled | KeyState::Disabled => {
                k.state = KeyState::Disabled;
                Ok(())
            }
            _ => Err(KmsError::KeyPendingDeletion {
                key_id: k.id.clone(),
            }),
        })
    }

    /// Schedules deletion after `days` (7–30, default 30). Returns the key,
    /// whose state carries the deletion time.
    pub fn schedule_key_deletion(
        &self,
        meta: &RequestMeta,
        key: &str,
        days: Option<u32>,
    ) -> Result<KeyView> {
        let days = days.unwrap_or(DEFAULT_DELETION_DAYS);
        if !(MIN_DELETION_DAYS..=MAX_DELETION_DAYS).contains(&days) {
            // Still audited: an invalid request against a key is a use attempt.
            return self.audited(meta, Operation::ScheduleKeyDeletion, Some(key), |_| {
                Err(KmsError::invalid(
                    "pending_window_days",
                    format!("must be {MIN_DELETION_DAYS} to {MAX_DELETION_DAYS}"),
                ))
            });
        }
        let delete_at_ms = now_ms().saturating_add(u64::from(days) * 86_400_000);
        self.change_key(meta, Operation::ScheduleKeyDeletion, key, |k| {
            match k.state {
                KeyState::PendingDeletion { .. } => Err(KmsError::KeyPendingDeletion {
                    key_id: k.id.clone(),
                }),
                _ => {
                    k.state = KeyState::PendingDeletion { delete_at_ms };
                    Ok(())
                }
            }
        })
    }

    /// Cancels a scheduled deletion; the key comes back disabled (as AWS KMS),
    /// so that an operator re-enables it deliberately.
    pub fn cancel_key_deletion(&self, meta: &RequestMeta, key: &str) -> Result<KeyView> {
        self.change_key(meta, Operation::CancelKeyDeletion, key, |k| match k.state {
            KeyState::PendingDeletion { .. } => {
                k.state = KeyState::Disabled;
                Ok(())
            }
            _ => Err(KmsError::NotPendingDeletion {
                key_id: k.id.clone(),
            }),
        })
    }

    /// Makes a new version primary. Older versions keep decrypting.
    pub fn rotate_key(&self, meta: &RequestMeta, key: &str) -> Result<VersionRecord> {
        self.audited(meta, Operation::RotateKey, Some(key), |audit| {
            let record = self.resolve_for(meta, audit, key, Permission::Rotate)?;
            audit.key(&record.id, None);
            let version = self.rotate_locked(&record.id, None)?;
            audit.key(&record.id, Some(version.version));
            Ok(version)
        })
    }

    /// Rotation under the key's lock. With `due_at: Some(now)`, re-checks
    /// under the lock that the scheduled rotation is still due at `now` (no
    /// double rotation when a scheduler and a manual rotation race).
    pub(crate) fn rotate_locked(&self, id: &KeyId, due_at: Option<u64>) -> Result<VersionRecord> {
        let _guard = self.key_locks.lock(id);
        let catalogue = self.catalogue();
        let record = catalogue
            .get_key(id)?
            .ok_or_else(|| KmsError::KeyNotFound {
                key: id.to_string(),
            })?;
        if record.origin == KeyOrigin::External {
            return Err(super::ImportRefusal::RotateExternal { key_id: record.id }.into());
        }
        super::ensure_usable(&record)?;
        if let Some(now) = due_at
            && !self.rotation_due(&record, now)?
        {
            return Err(KmsError::RotationNotDue);
        }
        let now = now_ms();
        let committed = if let Some(wrapped) = self.wrapped.as_ref().filter(|w| w.new_versions) {
            // One write: the catalogue allocates the number under its lock
            // and the MAC (which covers the number) is made there.
            let epoch = wrapped.active_epoch();
            let blob = wrapped
                .keys
                .generate_wrapped(*epoch, KeyPurpose::Kek)
                .map_err(from_working_key_error)?;
            catalogue
                .add_enabled_version::<KmsError>(id, now, |v| self.wrapped_kek(id, v, &blob))?
                .1
        } else {
            self.rotate_to_token_object(id, now)?
        };
        // The next scheduled rotation counts from now, whatever caused this one.
        if let RotationPolicy::Every { period_secs } = record.rotation {
            let next = due_at
                .unwrap_or_else(now_ms)
                .max(now_ms())
                .saturating_add(period_secs.saturating_mul(1000));
            catalogue.update_key::<KmsError>(id, now_ms(), |k| {
                k.next_rotation_at_ms = Some(next);
                Ok(())
            })?;
        }
        Ok(committed)
    }

    /// A new version held as a token object, two-phase (see the module docs).
    fn rotate_to_token_object(&self, id: &KeyId, now: u64) -> Result<VersionRecord> {
        let catalogue = self.catalogue();
        let pending = catalogue.add_pending_version(id, now, |v| new_kek_handle(id, v))?;
        if let Err(e) = self.make_kek(&pending) {
            let _ = catalogue.discard_version(id, pending.version, now_ms());
            return Err(e);
        }
        let committed = match catalogue.commit_version(id, pending.version, now_ms()) {
            Ok((_, committed)) => committed,
            Err(e) => {
                // Refused (the catalogue's invariants) or failed: the version
                // must not stay pending with a KEK nobody will use.
                if let Ok(object) = kek_object_id(&pending.kek) {
                    let _ = self.hsm.destroy_key(&object);
                }
                let _ = catalogue.discard_version(id, pending.version, now_ms());
                return Err(e.into());
            }
        };
        Ok(committed)
    }

    /// Whether a key is due for rotation by schedule or by GCM usage.
    pub(crate) fn rotation_due(&self, record: &KeyRecord, now: u64) -> Result<bool> {
        if record.origin == KeyOrigin::External {
            // kms cannot make material for it; its owner imports new versions.
            return Ok(false);
        }
        if let (RotationPolicy::Every { .. }, Some(at)) =
            (record.rotation, record.next_rotation_at_ms)
            && at <= now
        {
            return Ok(true);
        }
        let Some(primary) = record.primary_version else {
            return Ok(false);
        };
        let version = self.version(&record.id, primary)?;
        Ok(version.gcm_invocations >= self.rotation.gcm_invocation_limit)
    }

    /// SetRotationPolicy: periodic rotation every `input.period` (within
    /// [`MIN_ROTATION_PERIOD`]..=[`MAX_ROTATION_PERIOD`]), first at
    /// `input.next_rotation_at_ms` or one period from now; no period turns
    /// periodic rotation off.
    ///
    /// # Errors
    /// INVALID_ARGUMENT for a period out of bounds (0 s included: "off" is
    /// an unset period, as the proto documents), a next rotation time
    /// without a period, in the past, or more than one period ahead (it
    /// would postpone the rotation the period promises); the errors of
    /// [`KmsService::change_key`].
    pub fn set_rotation_policy(
        &self,
        meta: &RequestMeta,
        key: &str,
        input: RotationPolicyInput,
    ) -> Result<KeyView> {
        let now = now_ms();
        let schedule = match (input.period, input.next_rotation_at_ms) {
            (None, None) => Ok(None),
            (None, Some(_)) => Err(KmsError::invalid(
                "next_rotation_time",
                "must be unset when rotation_period is unset",
            )),
            (Some(period), next) => validate_period(period).and_then(|()| {
                let latest = now.saturating_add(period_ms(period));
                match next {
                    None => Ok(Some((period, latest))),
                    Some(at) if at <= now => Err(KmsError::invalid(
                        "next_rotation_time",
                        "must be in the future",
                    )),
                    Some(at) if at > latest => Err(KmsError::invalid(
                        "next_rotation_time",
                        "must be at most one rotation_period from now",
                    )),
                    Some(at) => Ok(Some((period, at))),
                }
            }),
        };
        // Refused inside the change, after the key resolved and the caller
        // was authorized, so that the refusal's audit record names the key's
        // id, not only the alias the caller used.
        // The change may run more than once (a cluster write that lost a
        // race re-runs on the fresh record); the refusal, if any, is
        // returned by the first run, which ends the write.
        let (schedule, mut refusal) = match schedule {
            Ok(s) => (s, None),
            Err(e) => (None, Some(e)),
        };
        self.change_key(meta, Operation::SetRotationPolicy, key, |k| {
            if let Some(e) = refusal.take() {
                return Err(e);
            }
            if schedule.is_some() && k.origin == KeyOrigin::External {
                return Err(super::ImportRefusal::RotateExternal {
                    key_id: k.id.clone(),
                }
                .into());
            }
            match schedule {
                Some((period, next)) => {
                    k.rotation = RotationPolicy::Every {
                        period_secs: period.as_secs(),
                    };
                    k.next_rotation_at_ms = Some(next);
                }
                None => {
                    k.rotation = RotationPolicy::Manual;
                    k.next_rotation_at_ms = None;
                }
            }
            Ok(())
        })
    }

    pub fn list_key_versions(
        &self,
        meta: &RequestMeta,
        key: &str,
    ) -> Result<(KeyRecord, Vec<VersionRecord>)> {
        self.audited(meta, Operation::ListKeyVersions, Some(key), |audit| {
            let record = self.resolve_for(meta, audit, key, Permission::Describe)?;
            audit.key(&record.id, record.primary_version);
            let versions = self.catalogue().list_versions(&record.id)?;
            Ok((record, versions))
        })
    }

    /// Applies `change` to a version of a live key under the key's lock.
    /// `change` validates against the key record read under the lock (a
    /// record read before it could name an old primary: issue 13), and the
    /// catalogue re-checks that the primary stays enabled.
    pub(super) fn change_version(
        &self,
        meta: &RequestMeta,
        operation: Operation,
        key: &str,
        version: u32,
        mut change: impl FnMut(&KeyRecord, &mut VersionRecord) -> Result<()>,
    ) -> Result<VersionRecord> {
        self.audited(meta, operation, Some(key), |audit| {
            let resolved = self.resolve_for(meta, audit, key, Permission::Manage)?;
            audit.key(&resolved.id, Some(version));
            let _guard = self.key_locks.lock(&resolved.id);
            let record = self.locked_record(&resolved.id)?;
            let updated = self.catalogue().update_version::<KmsError>(
                &record.id,
                version,
                now_ms(),
                |v| change(&record, v),
            )?;
            if updated.state != VersionState::Enabled {
                self.evict_working_keys(&record.id, Some(version));
            }
            Ok(updated)
        })
    }

    pub fn enable_key_version(
        &self,
        meta: &RequestMeta,
        key: &str,
        version: u32,
    ) -> Result<VersionRecord> {
        self.change_version(
            meta,
            Operation::EnableKeyVersion,
            key,
            version,
            |_, v| match v.state {
                // ReEncryptOnly is left by enabling (or disabling) it.
                VersionState::Enabled | VersionState::Disabled | VersionState::ReEncryptOnly => {
                    v.state = VersionState::Enabled;
                    Ok(())
                }
                _ => Err(version_unusable(v)),
            },
        )
    }

    pub fn disable_key_version(
        &self,
        meta: &RequestMeta,
        key: &str,
        version: u32,
    ) -> Result<VersionRecord> {
        self.set_non_primary_state(
            meta,
            Operation::DisableKeyVersion,
            key,
            version,
            VersionState::Disabled,
        )
    }

    /// Puts a version that is not the primary, and is enabled, disabled or
    /// re-encrypt only, in state `to` (DisableKeyVersion,
    /// SetKeyVersionReEncryptOnly).
    ///
    /// # Errors
    /// FAILED_PRECONDITION for the primary version
    /// ([`KmsError::PrimaryVersionDisable`]) or a version in another state;
    /// the errors of every version change.
    pub(super) fn set_non_primary_state(
        &self,
        meta: &RequestMeta,
        operation: Operation,
        key: &str,
        version: u32,
        to: VersionState,
    ) -> Result<VersionRecord> {
        self.change_version(meta, operation, key, version, |record, v| {
            if record.primary_version == Some(v.version) {
                return Err(KmsError::PrimaryVersionDisable {
                    key_id: record.id.clone(),
                    version: v.version,
                });
            }
            match v.state {
                VersionState::Enabled | VersionState::Disabled | VersionState::ReEncryptOnly => {
                    v.state = to;
                    Ok(())
                }
                _ => Err(version_unusable(v)),
            }
        })
    }

    /// Makes an enabled version the primary one.
    ///
    /// # Errors
    /// FAILED_PRECONDITION if the key is pending deletion (its primary is
    /// frozen) or the version is not enabled; NOT_FOUND for a version that
    /// does not exist; the errors of [`KmsService::change_key`].
    pub fn set_primary_version(
        &self,
        meta: &RequestMeta,
        key: &str,
        version: u32,
    ) -> Result<KeyView> {
        self.change_key(meta, Operation::SetPrimaryVersion, key, |k| {
            if let KeyState::PendingDeletion { .. } = k.state {
                return Err(KmsError::KeyPendingDeletion {
                    key_id: k.id.clone(),
                });
            }
            let target = self.version(&k.id, version)?;
            if target.state != VersionState::Enabled {
                return Err(version_unusable(&target));
            }
            k.primary_version = Some(version);
            Ok(())
        })
    }
}

/// The creation-time bound of a ListKeys that starts now: the current
/// millisecond, returned only once the clock has moved past it, so that a
/// key created after the listing started carries a later creation time and
/// is never listed, while every key created before it is (creation times
/// have millisecond resolution; waiting out the current millisecond costs
/// the first page at most 1 ms).
fn first_page_bound_ms() -> u64 {
    let bound = now_ms();
    // At most ~5 ms, should the wall clock stall or step back meanwhile.
    for _ in 0..50 {
        if now_ms() > bound {
            break;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    bound
}

fn random_id_bytes() -> Result<[u8; 16]> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| KmsError::Internal {
            what: "system random generator failed",
        })?;
    Ok(bytes)
}
