//! Conversions between domain records and proto messages.

use std::collections::BTreeSet;
use std::time::Duration;

use kms_proto::v1 as pb;
use kms_storage::{
    AliasEntry, AuditRecord, Grant, KekHandle, KeyOrigin, KeyPolicy, KeyRecord, KeyState,
    Permission, RotationPolicy, VersionRecord, VersionState, WitnessCheck, WitnessOutcome,
    WitnessedHead,
};

use crate::error::KmsError;
use crate::service::{DataKeySize, EffectivePolicy, KeyView, VersionUsage, operation};

pub(crate) fn timestamp_ms(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        nanos: i32::try_from((ms % 1000) * 1_000_000).unwrap_or(0),
    }
}

pub(crate) fn timestamp_micros(us: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: i64::try_from(us / 1_000_000).unwrap_or(i64::MAX),
        nanos: i32::try_from((us % 1_000_000) * 1000).unwrap_or(0),
    }
}

pub(crate) fn micros_of(ts: &prost_types::Timestamp) -> Result<u64, KmsError> {
    if ts.seconds < 0 || !(0..1_000_000_000).contains(&ts.nanos) {
        return Err(KmsError::invalid(
            "timestamp",
            "must be after 1970 with nanos in range",
        ));
    }
    let seconds = u64::try_from(ts.seconds).unwrap_or(0);
    let nanos = u64::try_from(ts.nanos).unwrap_or(0);
    Ok(seconds
        .saturating_mul(1_000_000)
        .saturating_add(nanos / 1000))
}

/// A proto Duration as a whole number of seconds.
///
/// # Errors
/// INVALID_ARGUMENT naming `field` for a negative duration or one with a
/// fractional second (periods are stored in seconds; a fraction would be
/// dropped silently otherwise).
pub(crate) fn duration_of(
    d: &prost_types::Duration,
    field: &'static str,
) -> Result<Duration, KmsError> {
    if d.seconds < 0 || d.nanos < 0 {
        return Err(KmsError::invalid(field, "must not be negative"));
    }
    if d.nanos != 0 {
        return Err(KmsError::invalid(
            field,
            "must be a whole number of seconds",
        ));
    }
    Ok(Duration::from_secs(u64::try_from(d.seconds).unwrap_or(0)))
}

pub(crate) fn key_metadata(view: &KeyView) -> pb::KeyMetadata {
    let record: &KeyRecord = &view.record;
    let (state, deletion_time) = match record.state {
        // An EXTERNAL key before its first import (AWS PendingImport).
        KeyState::Enabled
            if record.origin == KeyOrigin::External && record.primary_version.is_none() =>
        {
            (pb::KeyState::PendingImport, None)
        }
        KeyState::Enabled => (pb::KeyState::Enabled, None),
        KeyState::Disabled => (pb::KeyState::Disabled, None),
        KeyState::PendingDeletion { delete_at_ms } => (
            pb::KeyState::PendingDeletion,
            Some(timestamp_ms(delete_at_ms)),
        ),
        KeyState::Deleted { deleted_at_ms } => {
            (pb::KeyState::Deleted, Some(timestamp_ms(deleted_at_ms)))
        }
        _ => (pb::KeyState::Unspecified, None),
    };
    let rotation_period = match record.rotation {
        RotationPolicy::Every { period_secs } => Some(prost_types::Duration {
            seconds: i64::try_from(period_secs).unwrap_or(i64::MAX),
            nanos: 0,
        }),
        _ => None,
    };
    let (primary_protection, primary_root_epoch) = match &view.primary_kek {
        Some(kek) => protection(kek),
        None => (pb::KeyVersionProtection::Unspecified, 0),
    };
    pb::KeyMetadata {
        key_id: record.id.to_string(),
        aliases: view.aliases.iter().map(|a| a.to_string()).collect(),
        description: record.description.clone(),
        tags: record
            .tags
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        key_spec: pb::KeySpec::Aes256Gcm as i32,
        state: state as i32,
        primary_version: record.primary_version.unwrap_or(0),
        rotation_period,
        next_rotation_time: record.next_rotation_at_ms.map(timestamp_ms),
        deletion_time,
        create_time: Some(timestamp_ms(record.created_at_ms)),
        update_time: Some(timestamp_ms(record.updated_at_ms)),
        primary_protection: primary_protection as i32,
        primary_root_epoch,
        origin: key_origin(record.origin) as i32,
        usage: None,
    }
}

/// How a version's KEK is held, as `KeyVersion.protection`/`root_epoch`
/// and `KeyMetadata.primary_protection`/`primary_root_epoch` report it.
fn protection(kek: &KekHandle) -> (pb::KeyVersionProtection, u32) {
    match kek {
        KekHandle::HsmObject { .. } => (pb::KeyVersionProtection::TokenObject, 0),
        KekHandle::Wrapped { root_epoch, .. } => (pb::KeyVersionProtection::Wrapped, *root_epoch),
        _ => (pb::KeyVersionProtection::Unspecified, 0),
    }
}

/// The proto name of an origin.
pub(crate) fn key_origin(origin: KeyOrigin) -> pb::KeyOrigin {
    match origin {
        KeyOrigin::Kms => pb::KeyOrigin::Kms,
        KeyOrigin::External => pb::KeyOrigin::External,
        _ => pb::KeyOrigin::Unspecified,
    }
}

pub(crate) fn key_version(version: &VersionRecord, primary: Option<u32>) -> pb::KeyVersion {
    let state = key_version_state(version.state);
    let destroy_time = match version.state {
        VersionState::ScheduledDestruction { destroy_at_ms } => Some(timestamp_ms(destroy_at_ms)),
        VersionState::Destroyed { destroyed_at_ms } => Some(timestamp_ms(destroyed_at_ms)),
        _ => None,
    };
    let (protection, root_epoch) = protection(&version.kek);
    pb::KeyVersion {
        key_id: version.key_id.to_string(),
        version: version.version,
        state: state as i32,
        primary: primary == Some(version.version),
        create_time: Some(timestamp_ms(version.created_at_ms)),
        update_time: Some(timestamp_ms(version.updated_at_ms)),
        destroy_time,
        gcm_invocations: version.gcm_invocations,
        protection: protection as i32,
        root_epoch,
        origin: key_origin(version.origin) as i32,
        usage: None,
    }
}

/// A version's (or a key's summed) uses as `KeyUsage`.
pub(crate) fn key_usage(usage: &VersionUsage) -> pb::KeyUsage {
    pb::KeyUsage {
        encrypt_count: usage.encrypt_count,
        decrypt_count: usage.decrypt_count,
        last_encrypt_time: usage.last_encrypt_ms.map(timestamp_ms),
        last_decrypt_time: usage.last_decrypt_ms.map(timestamp_ms),
    }
}

/// The proto state of a version (as `KeyVersion.state`, and in
/// GetKeyLastUsage): the one mapping of every reply.
pub(crate) fn key_version_state(state: VersionState) -> pb::KeyVersionState {
    match state {
        VersionState::Pending => pb::KeyVersionState::PendingCreation,
        VersionState::Enabled => pb::KeyVersionState::Enabled,
        VersionState::Disabled => pb::KeyVersionState::Disabled,
        VersionState::ScheduledDestruction { .. } => pb::KeyVersionState::ScheduledDestruction,
        VersionState::Destroyed { .. } => pb::KeyVersionState::Destroyed,
        VersionState::ReEncryptOnly => pb::KeyVersionState::ReencryptOnly,
        // `VersionState` is non-exhaustive: a state this build cannot name.
        _ => pb::KeyVersionState::Unspecified,
    }
}

pub(crate) fn alias(entry: &AliasEntry) -> pb::Alias {
    pb::Alias {
        alias_name: entry.alias.to_string(),
        target_key_id: entry.key_id.to_string(),
        create_time: None,
        update_time: None,
    }
}

/// The data-key length oneof, which GenerateDataKey, its WithoutPlaintext
/// twin and BatchGenerateDataKey entries each declare as their own type.
/// They all convert to this one, and this one to a [`DataKeySize`] in the
/// one `TryFrom` below, where the validation lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DataKeyLength {
    KeySpec(i32),
    NumberOfBytes(u32),
}

macro_rules! data_key_length_from {
    ($($oneof:ty),+) => {$(
        impl From<$oneof> for DataKeyLength {
            fn from(length: $oneof) -> Self {
                type Length = $oneof;
                match length {
                    Length::KeySpec(spec) => DataKeyLength::KeySpec(spec),
                    Length::NumberOfBytes(n) => DataKeyLength::NumberOfBytes(n),
                }
            }
        }
    )+};
}

data_key_length_from!(
    pb::generate_data_key_request::Length,
    pb::generate_data_key_without_plaintext_request::Length,
    pb::batch_generate_data_key_entry::Length
);

impl TryFrom<Option<DataKeyLength>> for DataKeySize {
    type Error = KmsError;

    /// A key spec (AES-128 or AES-256) or a byte count; the count's range
    /// (1 to 1024) is checked by the service.
    fn try_from(length: Option<DataKeyLength>) -> Result<Self, KmsError> {
        match length {
            Some(DataKeyLength::KeySpec(spec)) => match pb::DataKeySpec::try_from(spec) {
                Ok(pb::DataKeySpec::Aes128) => Ok(DataKeySize::Aes128),
                Ok(pb::DataKeySpec::Aes256) => Ok(DataKeySize::Aes256),
                _ => Err(KmsError::invalid(
                    "key_spec",
                    "must be DATA_KEY_SPEC_AES_128 or DATA_KEY_SPEC_AES_256",
                )),
            },
            Some(DataKeyLength::NumberOfBytes(n)) => {
                Ok(DataKeySize::Bytes(usize::try_from(n).unwrap_or(usize::MAX)))
            }
            None => Err(KmsError::invalid(
                "key_spec",
                "set key_spec or number_of_bytes",
            )),
        }
    }
}

/// The size a request's length oneof asks for.
pub(crate) fn data_key_size<L: Into<DataKeyLength>>(
    length: Option<L>,
) -> Result<DataKeySize, KmsError> {
    DataKeySize::try_from(length.map(Into::into))
}

pub(crate) fn audit_event(record: &AuditRecord) -> pb::AuditEvent {
    pb::AuditEvent {
        sequence: record.seq,
        time: Some(timestamp_micros(record.time_micros)),
        principal: record.event.principal.clone(),
        peer: record.event.peer.clone(),
        request_id: record.event.request_id.clone(),
        operation: operation::parse(&record.event.operation).unwrap_or(pb::Operation::Unspecified)
            as i32,
        key_id: record.event.key_id.clone().unwrap_or_default(),
        key_version: record.event.key_version.unwrap_or(0),
        context_digest: record
            .event
            .context_digest
            .map(|d| d.to_vec())
            .unwrap_or_default(),
        result_code: i32::from(record.event.result.as_u8()),
        latency_us: record.event.latency_micros,
        hash: record.hash.to_vec(),
        witnessed_heads: record.witnessed.iter().map(witnessed_head).collect(),
    }
}

/// A witnessed audit head for the wire.
pub(crate) fn witnessed_head(head: &WitnessedHead) -> pb::WitnessedHead {
    pb::WitnessedHead {
        node: head.node.clone(),
        sequence: head.seq,
        hash: head.hash.to_vec(),
        published_ms: head.published_ms,
        checkpoint_mac: head.checkpoint_mac.clone(),
    }
}

/// A witnessed audit head from the wire.
///
/// # Errors
/// INVALID_ARGUMENT for a malformed node id, a sequence of 0, a hash that is
/// not 32 bytes or a MAC longer than 65535 bytes.
pub(crate) fn witnessed_head_of(head: &pb::WitnessedHead) -> Result<WitnessedHead, KmsError> {
    let field = "witnessed_for_node";
    if !crate::config::is_valid_node_id(&head.node) {
        return Err(KmsError::invalid(field, "node is not a valid node id"));
    }
    if head.sequence == 0 {
        return Err(KmsError::invalid(field, "sequence must be at least 1"));
    }
    let hash = <[u8; 32]>::try_from(head.hash.as_slice())
        .map_err(|_| KmsError::invalid(field, "hash must be 32 bytes"))?;
    if head.checkpoint_mac.len() > kms_storage::MAX_FIELD_LEN {
        return Err(KmsError::invalid(field, "checkpoint_mac is too long"));
    }
    Ok(WitnessedHead {
        node: head.node.clone(),
        seq: head.sequence,
        hash,
        published_ms: head.published_ms,
        checkpoint_mac: head.checkpoint_mac.clone(),
    })
}

/// The check of a witnessed head for the wire.
pub(crate) fn witness_check(check: &WitnessCheck) -> pb::WitnessCheck {
    let (outcome, log_end, found_hash) = match &check.outcome {
        WitnessOutcome::Matches => (pb::WitnessOutcome::Matches, None, Vec::new()),
        WitnessOutcome::LogEndsBefore { log_end } => (
            pb::WitnessOutcome::LogEndsBefore,
            Some(*log_end),
            Vec::new(),
        ),
        WitnessOutcome::HashMismatch { found } => {
            (pb::WitnessOutcome::HashMismatch, None, found.to_vec())
        }
        // A later outcome this build does not name: never "matches".
        _ => (pb::WitnessOutcome::Unspecified, None, Vec::new()),
    };
    pb::WitnessCheck {
        head: Some(witnessed_head(&check.head)),
        outcome: outcome as i32,
        log_end: log_end.unwrap_or(0),
        found_hash,
    }
}

/// A key policy for the wire. A key without its own policy (the service
/// default applies) is shown as an empty policy, as the proto documents.
pub(crate) fn key_policy(effective: &EffectivePolicy) -> pb::KeyPolicy {
    let policy = match effective {
        EffectivePolicy::Own(policy) => policy,
        EffectivePolicy::Default(_) => return pb::KeyPolicy::default(),
    };
    pb::KeyPolicy {
        grants: policy
            .grants
            .iter()
            .map(|grant| pb::Grant {
                principal: grant.principal.clone(),
                permissions: grant
                    .permissions
                    .iter()
                    .map(|p| permission_enum(*p) as i32)
                    .collect(),
                required_encryption_context: grant
                    .required_context
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            })
            .collect(),
    }
}

/// A policy from the wire; unknown or unspecified permissions are refused.
pub(crate) fn key_policy_from(policy: pb::KeyPolicy) -> Result<KeyPolicy, KmsError> {
    let grants = policy
        .grants
        .into_iter()
        .map(|grant| {
            let permissions = grant
                .permissions
                .iter()
                .map(|&p| {
                    pb::Permission::try_from(p)
                        .ok()
                        .and_then(permission_of)
                        .ok_or_else(|| {
                            KmsError::invalid(
                                "policy.grants.permissions",
                                format!("{p} is not a permission"),
                            )
                        })
                })
                .collect::<Result<BTreeSet<_>, _>>()?;
            Ok(Grant {
                principal: grant.principal,
                permissions,
                required_context: grant.required_encryption_context.into_iter().collect(),
            })
        })
        .collect::<Result<Vec<_>, KmsError>>()?;
    Ok(KeyPolicy { grants })
}

fn permission_enum(permission: Permission) -> pb::Permission {
    match permission {
        Permission::Encrypt => pb::Permission::Encrypt,
        Permission::Decrypt => pb::Permission::Decrypt,
        Permission::GenerateDataKey => pb::Permission::GenerateDataKey,
        Permission::ReEncryptFrom => pb::Permission::ReEncryptFrom,
        Permission::ReEncryptTo => pb::Permission::ReEncryptTo,
        Permission::Describe => pb::Permission::Describe,
        Permission::Rotate => pb::Permission::Rotate,
        Permission::Manage => pb::Permission::Manage,
        _ => pb::Permission::Unspecified,
    }
}

fn permission_of(permission: pb::Permission) -> Option<Permission> {
    Some(match permission {
        pb::Permission::Encrypt => Permission::Encrypt,
        pb::Permission::Decrypt => Permission::Decrypt,
        pb::Permission::GenerateDataKey => Permission::GenerateDataKey,
        pb::Permission::ReEncryptFrom => Permission::ReEncryptFrom,
        pb::Permission::ReEncryptTo => Permission::ReEncryptTo,
        pb::Permission::Describe => Permission::Describe,
        pb::Permission::Rotate => Permission::Rotate,
        pb::Permission::Manage => Permission::Manage,
        pb::Permission::Unspecified => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_data_key_length_oneofs_convert_alike() {
        use pb::generate_data_key_request::Length as Gdk;
        use pb::generate_data_key_without_plaintext_request::Length as Wp;
        assert_eq!(
            data_key_size(Some(Gdk::KeySpec(pb::DataKeySpec::Aes128 as i32))).ok(),
            Some(DataKeySize::Aes128)
        );
        assert_eq!(
            data_key_size(Some(Wp::KeySpec(pb::DataKeySpec::Aes256 as i32))).ok(),
            Some(DataKeySize::Aes256)
        );
        assert_eq!(
            data_key_size(Some(Wp::NumberOfBytes(7))).ok(),
            Some(DataKeySize::Bytes(7))
        );
        let unspecified = data_key_size(Some(Gdk::KeySpec(0))).expect_err("unspecified spec");
        assert_eq!(
            unspecified.to_string(),
            "invalid key_spec: must be DATA_KEY_SPEC_AES_128 or DATA_KEY_SPEC_AES_256"
        );
        let missing = data_key_size(None::<Gdk>).expect_err("no length");
        assert_eq!(
            missing.to_string(),
            "invalid key_spec: set key_spec or number_of_bytes"
        );
    }

    #[test]
    fn every_permission_round_trips_through_the_proto_enum() {
        for p in Permission::ALL {
            assert_eq!(permission_of(permission_enum(p)), Some(p));
        }
        assert_eq!(permission_of(pb::Permission::Unspecified), None);
    }
}
