//! KeyManagement handlers.

use std::sync::Arc;

use kms_proto::v1 as pb;
use kms_proto::v1::key_management_server::KeyManagement;
use tonic::{Request, Response, Status};

use kms_hsm::{ImportKeySpec, OaepHash};
use kms_storage::KeyOrigin;

use super::convert::{
    alias, duration_of, key_metadata, key_policy, key_policy_from, key_usage, key_version,
    key_version_state, micros_of, timestamp_ms,
};
use super::{Rpc, page_size, page_token};
use crate::error::KmsError;
use crate::service::Operation;
use crate::service::page_token::{self as tokens, Listing};
use crate::service::{CreateKeyInput, KmsService, RotationPolicyInput};

/// The KeyManagement service.
#[derive(Debug, Clone)]
pub struct KeyManagementApi {
    service: Arc<KmsService>,
}

impl KeyManagementApi {
    pub fn new(service: Arc<KmsService>) -> Self {
        KeyManagementApi { service }
    }
}

type Reply<T> = Result<Response<T>, Status>;

/// CreateKeyRequest.key_spec: UNSPECIFIED means AES-256-GCM, the only spec.
fn key_spec(spec: i32) -> Result<(), KmsError> {
    match pb::KeySpec::try_from(spec) {
        Ok(pb::KeySpec::Unspecified | pb::KeySpec::Aes256Gcm) => Ok(()),
        _ => Err(KmsError::invalid(
            "key_spec",
            "only KEY_SPEC_AES_256_GCM is supported",
        )),
    }
}

/// CreateKeyRequest.origin: UNSPECIFIED means KMS.
fn key_origin(origin: i32) -> Result<KeyOrigin, KmsError> {
    match pb::KeyOrigin::try_from(origin) {
        Ok(pb::KeyOrigin::Unspecified | pb::KeyOrigin::Kms) => Ok(KeyOrigin::Kms),
        Ok(pb::KeyOrigin::External) => Ok(KeyOrigin::External),
        Err(_) => Err(KmsError::invalid(
            "origin",
            "must be KEY_ORIGIN_KMS or KEY_ORIGIN_EXTERNAL",
        )),
    }
}

/// A wrapping algorithm from a request; UNSPECIFIED is `None`.
fn wrapping_algorithm(algorithm: i32) -> Result<Option<OaepHash>, KmsError> {
    match pb::WrappingAlgorithm::try_from(algorithm) {
        Ok(pb::WrappingAlgorithm::Unspecified) => Ok(None),
        Ok(pb::WrappingAlgorithm::RsaesOaepSha1) => Ok(Some(OaepHash::Sha1)),
        Ok(pb::WrappingAlgorithm::RsaesOaepSha256) => Ok(Some(OaepHash::Sha256)),
        Err(_) => Err(KmsError::invalid(
            "wrapping_algorithm",
            "must be WRAPPING_ALGORITHM_RSAES_OAEP_SHA_1 or WRAPPING_ALGORITHM_RSAES_OAEP_SHA_256",
        )),
    }
}

fn wrapping_algorithm_of(algorithm: OaepHash) -> pb::WrappingAlgorithm {
    match algorithm {
        OaepHash::Sha256 => pb::WrappingAlgorithm::RsaesOaepSha256,
        _ => pb::WrappingAlgorithm::RsaesOaepSha1,
    }
}

/// A wrapping key spec from a request (required).
fn wrapping_key_spec(spec: i32) -> Result<ImportKeySpec, KmsError> {
    match pb::WrappingKeySpec::try_from(spec) {
        Ok(pb::WrappingKeySpec::Rsa2048) => Ok(ImportKeySpec::Rsa2048),
        Ok(pb::WrappingKeySpec::Rsa3072) => Ok(ImportKeySpec::Rsa3072),
        Ok(pb::WrappingKeySpec::Rsa4096) => Ok(ImportKeySpec::Rsa4096),
        _ => Err(KmsError::invalid(
            "wrapping_key_spec",
            "must be WRAPPING_KEY_SPEC_RSA_2048, _3072 or _4096",
        )),
    }
}

fn wrapping_key_spec_of(spec: ImportKeySpec) -> pb::WrappingKeySpec {
    match spec {
        ImportKeySpec::Rsa3072 => pb::WrappingKeySpec::Rsa3072,
        ImportKeySpec::Rsa4096 => pb::WrappingKeySpec::Rsa4096,
        _ => pb::WrappingKeySpec::Rsa2048,
    }
}

/// A version number from a request: proto3's 0 is "unset", and versions
/// start at 1.
fn version_number(version: u32) -> Result<u32, KmsError> {
    if version == 0 {
        return Err(KmsError::invalid("version", "must be at least 1"));
    }
    Ok(version)
}

/// SetRotationPolicyRequest's two fields, as the proto documents them: an
/// unset period turns periodic rotation off (and then next_rotation_time
/// must be unset too); a set period, including 0 s, must be within the
/// bounds (checked by the service, as for CreateKey).
fn rotation_policy(
    period: Option<&prost_types::Duration>,
    next: Option<&prost_types::Timestamp>,
) -> Result<RotationPolicyInput, KmsError> {
    let period = period
        .map(|d| duration_of(d, "rotation_period"))
        .transpose()?;
    let next_rotation_at_ms = next
        .map(|t| {
            micros_of(t).map_err(|_| {
                KmsError::invalid(
                    "next_rotation_time",
                    "must be after 1970 with nanos in range",
                )
            })
        })
        .transpose()?
        .map(|micros| micros / 1000);
    Ok(RotationPolicyInput {
        period,
        next_rotation_at_ms,
    })
}

#[tonic::async_trait]
impl KeyManagement for KeyManagementApi {
    async fn create_key(
        &self,
        request: Request<pb::CreateKeyRequest>,
    ) -> Reply<pb::CreateKeyResponse> {
        let rpc = Rpc::start(Operation::CreateKey, &request)?;
        let req = request.into_inner();
        let converted = key_spec(req.key_spec).and_then(|()| {
            let period = req
                .rotation_period
                .as_ref()
                .map(|d| duration_of(d, "rotation_period"))
                .transpose()?;
            Ok((period, key_origin(req.origin)?))
        });
        let (rotation_period, origin) = rpc.valid(&self.service, "", converted).await?;
        let input = CreateKeyInput {
            description: req.description,
            tags: req.tags.into_iter().collect(),
            aliases: Vec::new(),
            rotation_period,
            origin,
        };
        let view = rpc
            .blocking(&self.service, move |s, m| s.create_key(m, input))
            .await?;
        rpc.respond(pb::CreateKeyResponse {
            key_metadata: Some(key_metadata(&view)),
        })
    }

    async fn describe_key(
        &self,
        request: Request<pb::DescribeKeyRequest>,
    ) -> Reply<pb::DescribeKeyResponse> {
        let rpc = Rpc::start(Operation::DescribeKey, &request)?;
        let key = request.into_inner().key_id;
        let (view, total) = rpc
            .blocking(&self.service, move |s, m| {
                let view = s.describe_key(m, &key)?;
                let mut total = crate::service::VersionUsage::default();
                for usage in s.key_usage(&view.record.id)?.values() {
                    total.merge(usage);
                }
                Ok((view, total))
            })
            .await?;
        let mut metadata = key_metadata(&view);
        metadata.usage = Some(key_usage(&total));
        rpc.respond(pb::DescribeKeyResponse {
            key_metadata: Some(metadata),
        })
    }

    async fn list_keys(
        &self,
        request: Request<pb::ListKeysRequest>,
    ) -> Reply<pb::ListKeysResponse> {
        let rpc = Rpc::start(Operation::ListKeys, &request)?;
        let req = request.into_inner();
        let limit = rpc
            .valid(&self.service, "", page_size(req.page_size))
            .await?;
        let (token, include_deleted) = (req.page_token, req.include_deleted);
        let page = rpc
            .blocking(&self.service, move |s, m| {
                s.list_keys(m, page_token(&token), limit, include_deleted)
            })
            .await?;
        let keys = page.items.iter().map(key_metadata).collect();
        rpc.respond(pb::ListKeysResponse {
            keys,
            next_page_token: page.next_page_token.unwrap_or_default(),
        })
    }

    async fn update_key_description(
        &self,
        request: Request<pb::UpdateKeyDescriptionRequest>,
    ) -> Reply<pb::UpdateKeyDescriptionResponse> {
        let rpc = Rpc::start(Operation::UpdateKeyDescription, &request)?;
        let req = request.into_inner();
        let view = rpc
            .blocking(&self.service, move |s, m| {
                s.update_description(m, &req.key_id, req.description)
            })
            .await?;
        rpc.respond(pb::UpdateKeyDescriptionResponse {
            key_metadata: Some(key_metadata(&view)),
        })
    }

    async fn tag_key(&self, request: Request<pb::TagKeyRequest>) -> Reply<pb::TagKeyResponse> {
        let rpc = Rpc::start(Operation::TagKey, &request)?;
        let req = request.into_inner();
        let view = rpc
            .blocking(&self.service, move |s, m| {
                s.tag_key(m, &req.key_id, req.tags.into_iter().collect())
            })
            .await?;
        rpc.respond(pb::TagKeyResponse {
            key_metadata: Some(key_metadata(&view)),
        })
    }

    async fn untag_key(
        &self,
        request: Request<pb::UntagKeyRequest>,
    ) -> Reply<pb::UntagKeyResponse> {
        let rpc = Rpc::start(Operation::UntagKey, &request)?;
        let req = request.into_inner();
        let view = rpc
            .blocking(&self.service, move |s, m| {
                s.untag_key(m, &req.key_id, req.tag_keys)
            })
            .await?;
        rpc.respond(pb::UntagKeyResponse {
            key_metadata: Some(key_metadata(&view)),
        })
    }

    async fn enable_key(
        &self,
        request: Request<pb::EnableKeyRequest>,
    ) -> Reply<pb::EnableKeyResponse> {
        let rpc = Rpc::start(Operation::EnableKey, &request)?;
        let key = request.into_inner().key_id;
        let view = rpc
            .blocking(&self.service, move |s, m| s.enable_key(m, &key))
            .await?;
        rpc.respond(pb::EnableKeyResponse {
            key_metadata: Some(key_metadata(&view)),
        })
    }

    async fn disable_key(
        &self,
        request: Request<pb::DisableKeyRequest>,
    ) -> Reply<pb::DisableKeyResponse> {
        let rpc = Rpc::start(Operation::DisableKey, &request)?;
        let key = request.into_inner().key_id;
        let view = rpc
            .blocking(&self.service, move |s, m| s.disable_key(m, &key))
            .await?;
        rpc.respond(pb::DisableKeyResponse {
            key_metadata: Some(key_metadata(&view)),
        })
    }

    async fn schedule_key_deletion(
        &self,
        request: Request<pb::ScheduleKeyDeletionRequest>,
    ) -> Reply<pb::ScheduleKeyDeletionResponse> {
        let rpc = Rpc::start(Operation::ScheduleKeyDeletion, &request)?;
        let req = request.into_inner();
        let days = req.pending_window_days;
        let view = rpc
            .blocking(&self.service, move |s, m| {
                s.schedule_key_deletion(m, &req.key_id, days)
            })
            .await?;
        rpc.respond(pb::ScheduleKeyDeletionResponse {
            key_metadata: Some(key_metadata(&view)),
            pending_window_days: days.unwrap_or(crate::service::DEFAULT_DELETION_DAYS),
        })
    }

    async fn cancel_key_deletion(
        &self,
        request: Request<pb::CancelKeyDeletionRequest>,
    ) -> Reply<pb::CancelKeyDeletionResponse> {
        let rpc = Rpc::start(Operation::CancelKeyDeletion, &request)?;
        let key = request.into_inner().key_id;
        let view = rpc
            .blocking(&self.service, move |s, m| s.cancel_key_deletion(m, &key))
            .await?;
        rpc.respond(pb::CancelKeyDeletionResponse {
            key_metadata: Some(key_metadata(&view)),
        })
    }

    async fn rotate_key(
        &self,
        request: Request<pb::RotateKeyRequest>,
    ) -> Reply<pb::RotateKeyResponse> {
        let rpc = Rpc::start(Operation::RotateKey, &request)?;
        let key = request.into_inner().key_id;
        let (view, version) = rpc
            .blocking(&self.service, move |s, m| {
                let version = s.rotate_key(m, &key)?;
                let view = s.key_view(&version.key_id)?;
                Ok((view, version))
            })
            .await?;
        rpc.respond(pb::RotateKeyResponse {
            new_version: Some(key_version(&version, view.record.primary_version)),
            key_metadata: Some(key_metadata(&view)),
        })
    }

    async fn get_parameters_for_import(
        &self,
        request: Request<pb::GetParametersForImportRequest>,
    ) -> Reply<pb::GetParametersForImportResponse> {
        let rpc = Rpc::start(Operation::GetParametersForImport, &request)?;
        let req = request.into_inner();
        let converted = (|| {
            let algorithm = wrapping_algorithm(req.wrapping_algorithm)?
                .ok_or_else(|| KmsError::invalid("wrapping_algorithm", "required"))?;
            let spec = wrapping_key_spec(req.wrapping_key_spec)?;
            let valid_for = req
                .valid_for
                .as_ref()
                .map(|d| duration_of(d, "valid_for"))
                .transpose()?;
            Ok((algorithm, spec, valid_for))
        })();
        let (algorithm, spec, valid_for) = rpc.valid(&self.service, &req.key_id, converted).await?;
        let key = req.key_id;
        let params = rpc
            .blocking(&self.service, move |s, m| {
                s.get_parameters_for_import(m, &key, algorithm, spec, valid_for)
            })
            .await?;
        rpc.respond(pb::GetParametersForImportResponse {
            key_id: params.key_id.to_string(),
            public_key: params.public_key,
            import_token: params.import_token,
            parameters_valid_to: Some(timestamp_ms(params.valid_to_ms)),
            wrapping_algorithm: wrapping_algorithm_of(params.algorithm) as i32,
            wrapping_key_spec: wrapping_key_spec_of(params.spec) as i32,
        })
    }

    async fn get_key_last_usage(
        &self,
        request: Request<pb::GetKeyLastUsageRequest>,
    ) -> Reply<pb::GetKeyLastUsageResponse> {
        let rpc = Rpc::start(Operation::GetKeyLastUsage, &request)?;
        let req = request.into_inner();
        let version = (req.version != 0).then_some(req.version);
        let usage = rpc
            .blocking(&self.service, move |s, m| {
                s.get_key_last_usage(m, &req.key_id, version)
            })
            .await?;
        rpc.respond(pb::GetKeyLastUsageResponse {
            key_id: usage.key_id.to_string(),
            usage: Some(key_usage(&usage.total)),
            versions: usage
                .versions
                .iter()
                .map(|v| pb::KeyVersionUsage {
                    version: v.version,
                    state: key_version_state(v.state) as i32,
                    usage: Some(key_usage(&v.usage)),
                })
                .collect(),
        })
    }

    async fn import_key_material(
        &self,
        request: Request<pb::ImportKeyMaterialRequest>,
    ) -> Reply<pb::ImportKeyMaterialResponse> {
        let rpc = Rpc::start(Operation::ImportKeyMaterial, &request)?;
        let req = request.into_inner();
        let algorithm = rpc
            .valid(
                &self.service,
                &req.key_id,
                wrapping_algorithm(req.wrapping_algorithm),
            )
            .await?;
        let (view, version) = rpc
            .blocking(&self.service, move |s, m| {
                let version = s.import_key_material(
                    m,
                    &req.key_id,
                    &req.import_token,
                    &req.encrypted_key_material,
                    algorithm,
                )?;
                let view = s.key_view(&version.key_id)?;
                Ok((view, version))
            })
            .await?;
        rpc.respond(pb::ImportKeyMaterialResponse {
            new_version: Some(key_version(&version, view.record.primary_version)),
            key_metadata: Some(key_metadata(&view)),
        })
    }

    async fn set_rotation_policy(
        &self,
        request: Request<pb::SetRotationPolicyRequest>,
    ) -> Reply<pb::SetRotationPolicyResponse> {
        let rpc = Rpc::start(Operation::SetRotationPolicy, &request)?;
        let req = request.into_inner();
        let converted = rotation_policy(
            req.rotation_period.as_ref(),
            req.next_rotation_time.as_ref(),
        );
        let policy = rpc.valid(&self.service, &req.key_id, converted).await?;
        let view = rpc
            .blocking(&self.service, move |s, m| {
                s.set_rotation_policy(m, &req.key_id, policy)
            })
            .await?;
        rpc.respond(pb::SetRotationPolicyResponse {
            key_metadata: Some(key_metadata(&view)),
        })
    }

    async fn list_key_versions(
        &self,
        request: Request<pb::ListKeyVersionsRequest>,
    ) -> Reply<pb::ListKeyVersionsResponse> {
        let rpc = Rpc::start(Operation::ListKeyVersions, &request)?;
        let req = request.into_inner();
        // (after, until): bounded at the first page by the highest version
        // then, since rotations add versions while a listing pages.
        let converted = page_size(req.page_size).and_then(|limit| {
            let bound = match page_token(&req.page_token) {
                None => None,
                Some(t) => Some(tokens::decode(
                    t,
                    Listing::KeyVersions,
                    &[req.key_id.as_bytes()],
                    |r| Some((r.u32()?, r.u32()?)),
                )?),
            };
            Ok((limit, bound))
        });
        let (limit, bound) = rpc.valid(&self.service, &req.key_id, converted).await?;
        let key_id = req.key_id.clone();
        let (record, versions, mut uses) = rpc
            .blocking(&self.service, move |s, m| {
                let (record, versions) = s.list_key_versions(m, &req.key_id)?;
                let uses = s.key_usage(&record.id)?;
                Ok((record, versions, uses))
            })
            .await?;
        let (after, until) =
            bound.unwrap_or_else(|| (0, versions.iter().map(|v| v.version).max().unwrap_or(0)));
        let mut page: Vec<_> = versions
            .iter()
            .filter(|v| v.version > after && v.version <= until)
            .take(limit + 1)
            .collect();
        let next_page_token = if page.len() > limit {
            page.truncate(limit);
            page.last()
                .map(|v| {
                    tokens::encode(Listing::KeyVersions, &[key_id.as_bytes()], |w| {
                        w.u32(v.version).u32(until);
                    })
                })
                .unwrap_or_default()
        } else {
            String::new()
        };
        rpc.respond(pb::ListKeyVersionsResponse {
            versions: page
                .into_iter()
                .map(|v| pb::KeyVersion {
                    usage: Some(key_usage(&uses.remove(&v.version).unwrap_or_default())),
                    ..key_version(v, record.primary_version)
                })
                .collect(),
            next_page_token,
        })
    }

    async fn enable_key_version(
        &self,
        request: Request<pb::EnableKeyVersionRequest>,
    ) -> Reply<pb::EnableKeyVersionResponse> {
        let rpc = Rpc::start(Operation::EnableKeyVersion, &request)?;
        let req = request.into_inner();
        let number = rpc
            .valid(&self.service, &req.key_id, version_number(req.version))
            .await?;
        let (version, primary) = rpc
            .blocking(&self.service, move |s, m| {
                let version = s.enable_key_version(m, &req.key_id, number)?;
                let primary = s.key_view(&version.key_id)?.record.primary_version;
                Ok((version, primary))
            })
            .await?;
        rpc.respond(pb::EnableKeyVersionResponse {
            key_version: Some(key_version(&version, primary)),
        })
    }

    async fn disable_key_version(
        &self,
        request: Request<pb::DisableKeyVersionRequest>,
    ) -> Reply<pb::DisableKeyVersionResponse> {
        let rpc = Rpc::start(Operation::DisableKeyVersion, &request)?;
        let req = request.into_inner();
        let number = rpc
            .valid(&self.service, &req.key_id, version_number(req.version))
            .await?;
        let (version, primary) = rpc
            .blocking(&self.service, move |s, m| {
                let version = s.disable_key_version(m, &req.key_id, number)?;
                let primary = s.key_view(&version.key_id)?.record.primary_version;
                Ok((version, primary))
            })
            .await?;
        rpc.respond(pb::DisableKeyVersionResponse {
            key_version: Some(key_version(&version, primary)),
        })
    }

    async fn schedule_key_version_destruction(
        &self,
        request: Request<pb::ScheduleKeyVersionDestructionRequest>,
    ) -> Reply<pb::ScheduleKeyVersionDestructionResponse> {
        // An override is audited under its own operation (see the proto).
        let operation = if request.get_ref().override_recent_use {
            Operation::ScheduleKeyVersionDestructionOverrideRecentUse
        } else {
            Operation::ScheduleKeyVersionDestruction
        };
        let rpc = Rpc::start(operation, &request)?;
        let req = request.into_inner();
        let number = rpc
            .valid(&self.service, &req.key_id, version_number(req.version))
            .await?;
        let days = req.pending_window_days;
        let (version, primary) = rpc
            .blocking(&self.service, move |s, m| {
                let version = s.schedule_key_version_destruction(
                    m,
                    &req.key_id,
                    number,
                    days,
                    req.override_recent_use,
                )?;
                let primary = s.key_view(&version.key_id)?.record.primary_version;
                Ok((version, primary))
            })
            .await?;
        rpc.respond(pb::ScheduleKeyVersionDestructionResponse {
            key_version: Some(key_version(&version, primary)),
            pending_window_days: days.unwrap_or(crate::service::DEFAULT_VERSION_DESTRUCTION_DAYS),
        })
    }

    async fn restore_key_version(
        &self,
        request: Request<pb::RestoreKeyVersionRequest>,
    ) -> Reply<pb::RestoreKeyVersionResponse> {
        let rpc = Rpc::start(Operation::RestoreKeyVersion, &request)?;
        let req = request.into_inner();
        let number = rpc
            .valid(&self.service, &req.key_id, version_number(req.version))
            .await?;
        let (version, primary) = rpc
            .blocking(&self.service, move |s, m| {
                let version = s.restore_key_version(m, &req.key_id, number)?;
                let primary = s.key_view(&version.key_id)?.record.primary_version;
                Ok((version, primary))
            })
            .await?;
        rpc.respond(pb::RestoreKeyVersionResponse {
            key_version: Some(key_version(&version, primary)),
        })
    }

    async fn set_key_version_re_encrypt_only(
        &self,
        request: Request<pb::SetKeyVersionReEncryptOnlyRequest>,
    ) -> Reply<pb::SetKeyVersionReEncryptOnlyResponse> {
        let rpc = Rpc::start(Operation::SetKeyVersionReEncryptOnly, &request)?;
        let req = request.into_inner();
        let number = rpc
            .valid(&self.service, &req.key_id, version_number(req.version))
            .await?;
        let (version, primary) = rpc
            .blocking(&self.service, move |s, m| {
                let version = s.set_key_version_reencrypt_only(m, &req.key_id, number)?;
                let primary = s.key_view(&version.key_id)?.record.primary_version;
                Ok((version, primary))
            })
            .await?;
        rpc.respond(pb::SetKeyVersionReEncryptOnlyResponse {
            key_version: Some(key_version(&version, primary)),
        })
    }

    async fn set_primary_version(
        &self,
        request: Request<pb::SetPrimaryVersionRequest>,
    ) -> Reply<pb::SetPrimaryVersionResponse> {
        let rpc = Rpc::start(Operation::SetPrimaryVersion, &request)?;
        let req = request.into_inner();
        let number = rpc
            .valid(&self.service, &req.key_id, version_number(req.version))
            .await?;
        let view = rpc
            .blocking(&self.service, move |s, m| {
                s.set_primary_version(m, &req.key_id, number)
            })
            .await?;
        rpc.respond(pb::SetPrimaryVersionResponse {
            key_metadata: Some(key_metadata(&view)),
        })
    }

    async fn create_alias(
        &self,
        request: Request<pb::CreateAliasRequest>,
    ) -> Reply<pb::CreateAliasResponse> {
        let rpc = Rpc::start(Operation::CreateAlias, &request)?;
        let req = request.into_inner();
        let entry = rpc
            .blocking(&self.service, move |s, m| {
                s.create_alias(m, &req.alias_name, &req.target_key_id)
            })
            .await?;
        rpc.respond(pb::CreateAliasResponse {
            alias: Some(alias(&entry)),
        })
    }

    async fn update_alias(
        &self,
        request: Request<pb::UpdateAliasRequest>,
    ) -> Reply<pb::UpdateAliasResponse> {
        let rpc = Rpc::start(Operation::UpdateAlias, &request)?;
        let req = request.into_inner();
        let entry = rpc
            .blocking(&self.service, move |s, m| {
                s.update_alias(m, &req.alias_name, &req.target_key_id)
            })
            .await?;
        rpc.respond(pb::UpdateAliasResponse {
            alias: Some(alias(&entry)),
        })
    }

    async fn delete_alias(
        &self,
        request: Request<pb::DeleteAliasRequest>,
    ) -> Reply<pb::DeleteAliasResponse> {
        let rpc = Rpc::start(Operation::DeleteAlias, &request)?;
        let name = request.into_inner().alias_name;
        rpc.blocking(&self.service, move |s, m| s.delete_alias(m, &name))
            .await?;
        rpc.respond(pb::DeleteAliasResponse {})
    }

    async fn list_aliases(
        &self,
        request: Request<pb::ListAliasesRequest>,
    ) -> Reply<pb::ListAliasesResponse> {
        let rpc = Rpc::start(Operation::ListAliases, &request)?;
        let req = request.into_inner();
        let limit = rpc
            .valid(&self.service, &req.key_id, page_size(req.page_size))
            .await?;
        let page = rpc
            .blocking(&self.service, move |s, m| {
                s.list_aliases(
                    m,
                    page_token(&req.key_id),
                    page_token(&req.page_token),
                    limit,
                )
            })
            .await?;
        rpc.respond(pb::ListAliasesResponse {
            aliases: page.items.iter().map(alias).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        })
    }

    async fn get_key_policy(
        &self,
        request: Request<pb::GetKeyPolicyRequest>,
    ) -> Reply<pb::GetKeyPolicyResponse> {
        let rpc = Rpc::start(Operation::GetKeyPolicy, &request)?;
        let req = request.into_inner();
        let policy = rpc
            .blocking(&self.service, move |s, m| s.get_key_policy(m, &req.key_id))
            .await?;
        rpc.respond(pb::GetKeyPolicyResponse {
            policy: Some(key_policy(&policy)),
        })
    }

    async fn put_key_policy(
        &self,
        request: Request<pb::PutKeyPolicyRequest>,
    ) -> Reply<pb::PutKeyPolicyResponse> {
        let rpc = Rpc::start(Operation::PutKeyPolicy, &request)?;
        let req = request.into_inner();
        // Still audited when malformed: a policy change names a key.
        let converted = req.policy.map(key_policy_from).transpose();
        let policy = rpc
            .valid(&self.service, &req.key_id, converted)
            .await?
            .unwrap_or_default();
        let policy = rpc
            .blocking(&self.service, move |s, m| {
                s.put_key_policy(m, &req.key_id, policy)
            })
            .await?;
        rpc.respond(pb::PutKeyPolicyResponse {
            policy: Some(key_policy(&policy)),
        })
    }
}
