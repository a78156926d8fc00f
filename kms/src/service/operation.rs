//! The operations the service performs, defined once: the proto
//! `kms.v1.Operation` enum (what ListAuditEvents filters by and returns) is
//! the domain's type too. Handlers name their RPC with it, the audit record
//! stores its name, and the request span carries it.
//!
//! The names below are the audit log's on-disk spelling of each operation
//! (records store the name, not the proto number): changing one is a format
//! change, so a test pins them to the proto names.

pub use kms_proto::v1::Operation;

/// The audit log's name of `operation` (`Operation::GenerateDataKey` →
/// `"GenerateDataKey"`); `"Unspecified"` for the proto's zero value, which
/// the service never records.
pub fn name(operation: Operation) -> &'static str {
    match operation {
        Operation::Unspecified => "Unspecified",
        Operation::CreateKey => "CreateKey",
        Operation::DescribeKey => "DescribeKey",
        Operation::ListKeys => "ListKeys",
        Operation::UpdateKeyDescription => "UpdateKeyDescription",
        Operation::TagKey => "TagKey",
        Operation::UntagKey => "UntagKey",
        Operation::EnableKey => "EnableKey",
        Operation::DisableKey => "DisableKey",
        Operation::ScheduleKeyDeletion => "ScheduleKeyDeletion",
        Operation::CancelKeyDeletion => "CancelKeyDeletion",
        Operation::RotateKey => "RotateKey",
        Operation::SetRotationPolicy => "SetRotationPolicy",
        Operation::ListKeyVersions => "ListKeyVersions",
        Operation::EnableKeyVersion => "EnableKeyVersion",
        Operation::DisableKeyVersion => "DisableKeyVersion",
        Operation::SetPrimaryVersion => "SetPrimaryVersion",
        Operation::CreateAlias => "CreateAlias",
        Operation::UpdateAlias => "UpdateAlias",
        Operation::DeleteAlias => "DeleteAlias",
        Operation::ListAliases => "ListAliases",
        Operation::GetKeyPolicy => "GetKeyPolicy",
        Operation::PutKeyPolicy => "PutKeyPolicy",
        Operation::GetParametersForImport => "GetParametersForImport",
        Operation::ImportKeyMaterial => "ImportKeyMaterial",
        Operation::ScheduleKeyVersionDestruction => "ScheduleKeyVersionDestruction",
        Operation::RestoreKeyVersion => "RestoreKeyVersion",
        Operation::SetKeyVersionReEncryptOnly => "SetKeyVersionReEncryptOnly",
        Operation::ScheduleKeyVersionDestructionOverrideRecentUse => {
            "ScheduleKeyVersionDestructionOverrideRecentUse"
        }
        Operation::GetKeyLastUsage => "GetKeyLastUsage",
        Operation::Encrypt => "Encrypt",
        Operation::Decrypt => "Decrypt",
        Operation::GenerateDataKey => "GenerateDataKey",
        Operation::GenerateDataKeyWithoutPlaintext => "GenerateDataKeyWithoutPlaintext",
        Operation::ReEncrypt => "ReEncrypt",
        Operation::GenerateRandom => "GenerateRandom",
        Operation::BatchEncrypt => "BatchEncrypt",
        Operation::BatchDecrypt => "BatchDecrypt",
        Operation::BatchGenerateDataKey => "BatchGenerateDataKey",
        Operation::BatchReEncrypt => "BatchReEncrypt",
        Operation::ListAuditEvents => "ListAuditEvents",
        Operation::VerifyAuditLog => "VerifyAuditLog",
        Operation::Reload => "Reload",
        Operation::WatchAuditEvents => "WatchAuditEvents",
        Operation::AutomaticRotation => "AutomaticRotation",
        Operation::DeleteKeyMaterial => "DeleteKeyMaterial",
        Operation::ReconcileKeyVersion => "ReconcileKeyVersion",
        Operation::ListRoots => "ListRoots",
        Operation::DestroyRoot => "DestroyRoot",
        Operation::CreateBackup => "CreateBackup",
        Operation::RewrapKeyVersion => "RewrapKeyVersion",
        // The audit writer's own spelling (kms_storage::WITNESS_OPERATION).
        Operation::AuditWitness => "AuditWitness",
        Operation::Restore => "Restore",
        Operation::DestroyKeyVersion => "DestroyKeyVersion",
        Operation::KubernetesStatus => "KubernetesStatus",
        Operation::KubernetesEncrypt => "KubernetesEncrypt",
        Operation::KubernetesDecrypt => "KubernetesDecrypt",
    }
}

/// The operation an audit record names, if it is one this build knows.
pub fn parse(name_in_record: &str) -> Option<Operation> {
    (1..=i32::from(u8::MAX))
        .filter_map(|number| Operation::try_from(number).ok())
        .find(|&operation| name(operation) == name_in_record)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `OPERATION_GENERATE_DATA_KEY` → `GenerateDataKey`.
    fn camel_case_of_proto_name(operation: Operation) -> String {
        operation
            .as_str_name()
            .trim_start_matches("OPERATION_")
            .split('_')
            .map(|word| {
                let mut chars = word.chars();
                chars.next().map_or_else(String::new, |first| {
                    first.to_string() + &chars.as_str().to_ascii_lowercase()
                })
            })
            .collect()
    }

    #[test]
    fn every_operation_has_its_proto_name_and_parses_back() {
        let mut seen = 0;
        for number in 1..=i32::from(u8::MAX) {
            let Ok(operation) = Operation::try_from(number) else {
                continue;
            };
            seen += 1;
            assert_eq!(name(operation), camel_case_of_proto_name(operation));
            assert_eq!(parse(name(operation)), Some(operation));
        }
        assert_eq!(seen, 56);
        assert_eq!(
            name(Operation::AuditWitness),
            kms_storage::WITNESS_OPERATION
        );
        assert_eq!(parse("Unspecified"), None);
        assert_eq!(parse("NoSuchOperation"), None);
    }
}
