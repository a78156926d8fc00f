//! The AWS KMS operations, each a thin handler: decode the JSON request
//! (unknown members are ignored, as AWS does; a member of the wrong type is
//! a SerializationException) → validate (refusals audited) → call the
//! domain service through the request's [`Rpc`] → encode the AWS response.
//!
//! `GrantTokens` are accepted and ignored (kms has no grants; key policies
//! decide). `EncryptionAlgorithm` must be `SYMMETRIC_DEFAULT` if given.
//! Pagination: `Limit` (1 to 1000, default 100) and `Marker` (our opaque
//! page token); `Truncated` and `NextMarker` in the response.
//! Plaintext and data keys are never logged.
//!
//! Where AWS refuses a request with an exception of its own rather than
//! ValidationException, so do we (the "Errors" of each operation in the AWS
//! KMS API Reference; moto where the reference is silent): a malformed key
//! identifier is NotFoundException and a foreign Marker InvalidMarkerException
//! (both in [`AwsError::from`]); an alias under the reserved `alias/aws/`
//! NotAuthorizedException; a tag key under the reserved `aws:` TagException.
//! `DryRun: true` is refused (UnsupportedOperationException), never performed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use zeroize::Zeroizing;

use kms_hsm::{ImportKeySpec, OaepHash};
use kms_storage::{KeyOrigin, KeyState, RotationPolicy, VersionState};

use super::{Arns, AwsError};
use crate::error::KmsError;
use crate::grpc::Rpc;
use crate::service::{
    CreateKeyInput, DataKeyForm, DataKeyInput, DataKeySize, DecryptInput, EncryptInput, KeyView,
    KmsService, ReEncryptInput, RotationPolicyInput,
};

/// One request's context.
pub(super) struct Call<'a> {
    pub(super) rpc: &'a Rpc,
    pub(super) service: &'a Arc<KmsService>,
    pub(super) arns: &'a Arns,
}

/// The only algorithm of a symmetric key (AWS's name for ours).
const SYMMETRIC_DEFAULT: &str = "SYMMETRIC_DEFAULT";
/// AWS's rotation period bounds and default, in days (EnableKeyRotation).
const MIN_ROTATION_DAYS: u64 = 90;
const MAX_ROTATION_DAYS: u64 = 2560;
const DEFAULT_ROTATION_DAYS: u64 = 365;
/// Alias names AWS reserves for AWS managed keys ("The alias name cannot
/// begin with alias/aws/", AWS KMS Developer Guide, "Create aliases").
const RESERVED_ALIAS_PREFIX: &str = "alias/aws/";
/// Tag keys AWS reserves for its own use (AWS General Reference, "Tagging
/// AWS resources": tag keys cannot begin with `aws:`).
const RESERVED_TAG_PREFIX: &str = "aws:";

impl Call<'_> {
    fn parse<T: DeserializeOwned>(&self, body: &[u8]) -> Result<T, AwsError> {
        let body = if body.is_empty() {
            b"{}".as_slice()
        } else {
            body
        };
        // A request is a JSON object; serde would also read a struct from
        // an array of its members in order, which no AWS client sends.
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(AwsError::new(
                "SerializationException",
                "the request body must be a JSON object",
            ));
        }
        serde_json::from_slice(body).map_err(|e| {
            // The position only: serde's message may quote a value.
            AwsError::new(
                "SerializationException",
                format!(
                    "malformed request body at line {} column {}",
                    e.line(),
                    e.column()
                ),
            )
        })
    }

    /// Logs and converts a domain failure.
    fn fail(&self, error: KmsError) -> AwsError {
        self.rpc.log_failure(&error);
        AwsError::from(error)
    }

    /// A validated value, or its refusal (audited, naming `key`). A `key`
    /// that is still an ARN after [`Arns::key_ref`] names another region's
    /// or account's key: not found here.
    async fn valid<T>(&self, key: &str, converted: Result<T, KmsError>) -> Result<T, AwsError> {
        let converted = converted.and_then(|value| {
            if key.starts_with("arn:") {
                return Err(KmsError::KeyNotFound {
                    key: key.to_owned(),
                });
            }
            Ok(value)
        });
        self.rpc
            .valid_domain(self.service, key, converted)
            .await
            .map_err(|e| self.fail(e))
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&KmsService, &crate::service::RequestMeta) -> Result<T, KmsError>
        + Send
        + 'static,
    ) -> Result<T, AwsError> {
        self.rpc
            .blocking_domain(self.service, work)
            .await
            .map_err(|e| self.fail(e))
    }

    async fn key_use<T: Send + 'static>(
        &self,
        work: impl FnOnce(&KmsService, &crate::service::RequestMeta) -> crate::service::Deferred<T>
        + Send
        + 'static,
    ) -> Result<T, AwsError> {
        self.rpc
            .key_use_domain(self.service, work)
            .await
            .map_err(|e| self.fail(e))
    }

    fn key_ref(&self, key: &str) -> String {
        self.arns.key_ref(key)
    }

    /// Like [`Call::valid`], answering the request's own refusal with the
    /// AWS exception `kind` (a failure to record it keeps its own answer).
    async fn valid_as<T>(
        &self,
        kind: &'static str,
        key: &str,
        converted: Result<T, KmsError>,
    ) -> Result<T, AwsError> {
        self.valid(key, converted).await.map_err(|error| {
            if error.kind == "ValidationException" {
                AwsError { kind, ..error }
            } else {
                error
            }
        })
    }
}

fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

/// A required base64 blob member.
fn blob(value: Option<&str>, field: &'static str) -> Result<Vec<u8>, KmsError> {
    let value = value.ok_or_else(|| KmsError::invalid(field, "is required"))?;
    B64.decode(value)
        .map_err(|_| KmsError::invalid(field, "must be base64"))
}

fn required<'a>(value: &'a Option<String>, field: &'static str) -> Result<&'a str, KmsError> {
    match value.as_deref() {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(KmsError::invalid(field, "is required")),
    }
}

fn algorithm(value: Option<&str>, field: &'static str) -> Result<(), KmsError> {
    match value {
        None | Some(SYMMETRIC_DEFAULT) => Ok(()),
        Some(_) => Err(KmsError::invalid(
            field,
            "must be SYMMETRIC_DEFAULT (the only algorithm of kms keys)",
        )),
    }
}

/// `Limit`: 1 to 1000 (AWS's bounds), default 100.
fn limit(value: Option<i64>) -> Result<usize, KmsError> {
    match value {
        None => Ok(100),
        Some(n) if (1..=1000).contains(&n) => Ok(usize::try_from(n).unwrap_or(100)),
        Some(_) => Err(KmsError::invalid("Limit", "must be 1 to 1000")),
    }
}

fn seconds(ms: u64) -> Value {
    // AWS JSON timestamps are epoch seconds; whole milliseconds are exact in f64.
    json!(ms as f64 / 1000.0)
}

/// AWS's name of a key's state.
fn key_state(view: &KeyView) -> &'static str {
    let record = &view.record;
    match record.state {
        KeyState::Enabled
            if record.origin == KeyOrigin::External && record.primary_version.is_none() =>
        {
            "PendingImport"
        }
        KeyState::Enabled => "Enabled",
        KeyState::Disabled => "Disabled",
        KeyState::PendingDeletion { .. } => "PendingDeletion",
        _ => "Unavailable",
    }
}

/// `KeyMetadata` of a key.
fn key_metadata(arns: &Arns, view: &KeyView) -> Value {
    let record = &view.record;
    let state = key_state(view);
    let mut metadata = json!({
        "AWSAccountId": arns.account_id,
        "KeyId": record.id.to_string(),
        "Arn": arns.key(&record.id),
        "CreationDate": seconds(record.created_at_ms),
        "Enabled": state == "Enabled",
        "Description": record.description,
        "KeyUsage": "ENCRYPT_DECRYPT",
        "KeyState": state,
        "Origin": if record.origin == KeyOrigin::External { "EXTERNAL" } else { "AWS_KMS" },
        "KeyManager": "CUSTOMER",
        "CustomerMasterKeySpec": SYMMETRIC_DEFAULT,
        "KeySpec": SYMMETRIC_DEFAULT,
        "EncryptionAlgorithms": [SYMMETRIC_DEFAULT],
        "MultiRegion": false,
    });
    if let KeyState::PendingDeletion { delete_at_ms } = record.state {
        metadata["DeletionDate"] = seconds(delete_at_ms);
    }
    metadata
}

/// Refuses a tag key under the reserved `aws:` prefix (answered as
/// TagException through [`Call::valid_as`]).
fn unreserved_tags(tags: Option<&Vec<Tag>>) -> Result<(), KmsError> {
    if tags
        .into_iter()
        .flatten()
        .any(|t| t.tag_key.starts_with(RESERVED_TAG_PREFIX))
    {
        return Err(KmsError::invalid(
            "TagKey",
            "tag keys beginning with aws: are reserved for AWS",
        ));
    }
    Ok(())
}

fn tags_in(tags: Option<Vec<Tag>>) -> BTreeMap<String, String> {
    tags.unwrap_or_default()
        .into_iter()
        .map(|t| (t.tag_key, t.tag_value))
        .collect()
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Tag {
    tag_key: String,
    #[serde(default)]
    tag_value: String,
}

/// Requests: the members kms reads (others are ignored).
#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct Request {
    key_id: Option<String>,
    plaintext: Option<String>,
    ciphertext_blob: Option<String>,
    encryption_context: Option<HashMap<String, String>>,
    encryption_algorithm: Option<String>,
    source_encryption_context: Option<HashMap<String, String>>,
    source_key_id: Option<String>,
    destination_key_id: Option<String>,
    destination_encryption_context: Option<HashMap<String, String>>,
    source_encryption_algorithm: Option<String>,
    destination_encryption_algorithm: Option<String>,
    number_of_bytes: Option<i64>,
    key_spec: Option<String>,
    customer_master_key_spec: Option<String>,
    key_usage: Option<String>,
    origin: Option<String>,
    description: Option<String>,
    policy: Option<String>,
    multi_region: Option<bool>,
    tags: Option<Vec<Tag>>,
    tag_keys: Option<Vec<String>>,
    limit: Option<i64>,
    marker: Option<String>,
    pending_window_in_days: Option<i64>,
    alias_name: Option<String>,
    target_key_id: Option<String>,
    rotation_period_in_days: Option<i64>,
    recipient: Option<Value>,
    wrapping_algorithm: Option<String>,
    wrapping_key_spec: Option<String>,
    import_token: Option<String>,
    encrypted_key_material: Option<String>,
    expiration_model: Option<String>,
    valid_to: Option<Value>,
    dry_run: Option<bool>,
}

// Requests carry plaintext: Debug prints the member names present only.
impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("key_id", &self.key_id)
            .field("plaintext", &self.plaintext.as_ref().map(|_| "[REDACTED]"))
            .finish_non_exhaustive()
    }
}

/// Runs operation `name` (an `X-Amz-Target` suffix audit_operation knows).
pub(super) async fn dispatch(call: &Call<'_>, name: &str, body: &[u8]) -> Result<Value, AwsError> {
    let req: Request = call.parse(body)?;
    if req.dry_run == Some(true) {
        // AWS answers a permitted dry run with DryRunOperationException and
        // performs nothing; kms cannot yet check a request without doing
        // it, and must not do it (a data key, an audited use) when asked
        // not to: refused as an unsupported parameter, audited.
        let key = call.key_ref(
            req.key_id
                .as_deref()
                .or(req.destination_key_id.as_deref())
                .unwrap_or(""),
        );
        let refused: Result<(), KmsError> = Err(KmsError::invalid(
            "DryRun",
            "dry runs are not supported by this kms server",
        ));
        call.valid_as("UnsupportedOperationException", &key, refused)
            .await?;
    }
    if req.recipient.is_some() {
        return Err(AwsError::validation(
            "Recipient (Nitro Enclaves attestation) is not supported",
        ));
    }
    match name {
        "Encrypt" => encrypt(call, req).await,
        "Decrypt" => decrypt(call, req).await,
        "ReEncrypt" => re_encrypt(call, req).await,
        "GenerateDataKey" => data_key(call, req, DataKeyForm::WithPlaintext).await,
        "GenerateDataKeyWithoutPlaintext" => {
            data_key(call, req, DataKeyForm::WithoutPlaintext).await
        }
        "GenerateRandom" => generate_random(call, req).await,
        "CreateKey" => create_key(call, req).await,
        "DescribeKey" => describe_key(call, req).await,
        "ListKeys" => list_keys(call, req).await,
        "EnableKey" | "DisableKey" | "CancelKeyDeletion" => key_state_change(call, name, req).await,
        "ScheduleKeyDeletion" => schedule_key_deletion(call, req).await,
        "UpdateKeyDescription" => update_key_description(call, req).await,
        "CreateAlias" | "UpdateAlias" => point_alias(call, name, req).await,
        "DeleteAlias" => delete_alias(call, req).await,
        "ListAliases" => list_aliases(call, req).await,
        "TagResource" => tag_resource(call, req).await,
        "UntagResource" => untag_resource(call, req).await,
        "ListResourceTags" => list_resource_tags(call, req).await,
        "EnableKeyRotation" | "DisableKeyRotation" => set_rotation(call, name, req).await,
        "GetKeyRotationStatus" => get_key_rotation_status(call, req).await,
        "RotateKeyOnDemand" => rotate_key_on_demand(call, req).await,
        "ListKeyRotations" => list_key_rotations(call, req).await,
        "GetParametersForImport" => get_parameters_for_import(call, req).await,
        "ImportKeyMaterial" => import_key_material(call, req).await,
        other => Err(AwsError::unsupported(other)),
    }
}

async fn encrypt(call: &Call<'_>, req: Request) -> Result<Value, AwsError> {
    let key = call.key_ref(req.key_id.as_deref().unwrap_or(""));
    let converted = required(&req.key_id, "KeyId").and_then(|_| {
        algorithm(req.encryption_algorithm.as_deref(), "EncryptionAlgorithm")?;
        blob(req.plaintext.as_deref(), "Plaintext")
    });
    let plaintext = Zeroizing::new(call.valid(&key, converted).await?);
    let input = EncryptInput {
        key,
        plaintext,
        context: req.encryption_context.unwrap_or_default(),
    };
    let encrypted = call.key_use(move |s, m| s.encrypt(m, input)).await?;
    Ok(json!({
        "CiphertextBlob": b64(&encrypted.blob),
        "KeyId": call.arns.key(&encrypted.key_id),
        "EncryptionAlgorithm": SYMMETRIC_DEFAULT,
    }))
}

async fn decrypt(call: &Call<'_>, req: Request) -> Result<Value, AwsError> {
    let expected = req.key_id.as_deref().map(|k| call.key_ref(k));
    let converted = algorithm(req.encryption_algorithm.as_deref(), "EncryptionAlgorithm")
        .and_then(|()| blob(req.ciphertext_blob.as_deref(), "CiphertextBlob"));
    let blob = call
        .valid(expected.as_deref().unwrap_or(""), converted)
        .await?;
    let input = DecryptInput {
        blob,
        context: req.encryption_context.unwrap_or_default(),
        expected_key: expected,
    };
    let decrypted = call.key_use(move |s, m| s.decrypt(m, input)).await?;
    Ok(json!({
        "KeyId": call.arns.key(&decrypted.key_id),
        "Plaintext": b64(&decrypted.plaintext),
        "EncryptionAlgorithm": SYMMETRIC_DEFAULT,
    }))
}

async fn re_encrypt(call: &Call<'_>, req: Request) -> Result<Value, AwsError> {
    let destination = call.key_ref(req.destination_key_id.as_deref().unwrap_or(""));
    let converted = required(&req.destination_key_id, "DestinationKeyId").and_then(|_| {
        algorithm(
            req.source_encryption_algorithm.as_deref(),
            "SourceEncryptionAlgorithm",
        )?;
        algorithm(
            req.destination_encryption_algorithm.as_deref(),
            "DestinationEncryptionAlgorithm",
        )?;
        blob(req.ciphertext_blob.as_deref(), "CiphertextBlob")
    });
    let blob = call.valid(&destination, converted).await?;
    let input = ReEncryptInput {
        blob,
        source_context: req.source_encryption_context.unwrap_or_default(),
        source_key: req.source_key_id.as_deref().map(|k| call.key_ref(k)),
        destination_key: destination,
        destination_context: req.destination_encryption_context.unwrap_or_default(),
    };
    let result = call.key_use(move |s, m| s.re_encrypt(m, input)).await?;
    Ok(json!({
        "CiphertextBlob": b64(&result.encrypted.blob),
        "SourceKeyId": call.arns.key(&result.source_key_id),
        "KeyId": call.arns.key(&result.encrypted.key_id),
        "SourceEncryptionAlgorithm": SYMMETRIC_DEFAULT,
        "DestinationEncryptionAlgorithm": SYMMETRIC_DEFAULT,
    }))
}

/// `KeySpec` (AES_128 | AES_256) or `NumberOfBytes` (1 to 1024), exactly one.
fn data_key_size(req: &Request) -> Result<DataKeySize, KmsError> {
    match (req.key_spec.as_deref(), req.number_of_bytes) {
        (Some("AES_256"), None) => Ok(DataKeySize::Aes256),
        (Some("AES_128"), None) => Ok(DataKeySize::Aes128),
        (Some(_), None) => Err(KmsError::invalid("KeySpec", "must be AES_256 or AES_128")),
        (None, Some(n)) if (1..=1024).contains(&n) => {
            Ok(DataKeySize::Bytes(usize::try_from(n).unwrap_or(32)))
        }
        (None, Some(_)) => Err(KmsError::invalid("NumberOfBytes", "must be 1 to 1024")),
        (None, None) => Err(KmsError::invalid(
            "KeySpec",
            "either KeySpec or NumberOfBytes is required",
        )),
        (Some(_), Some(_)) => Err(KmsError::invalid(
            "KeySpec",
            "give KeySpec or NumberOfBytes, not both",
        )),
    }
}

async fn data_key(call: &Call<'_>, req: Request, form: DataKeyForm) -> Result<Value, AwsError> {
    let key = call.key_ref(req.key_id.as_deref().unwrap_or(""));
    let converted = required(&req.key_id, "KeyId").and_then(|_| data_key_size(&req));
    let size = call.valid(&key, converted).await?;
    let input = DataKeyInput {
        key,
        size,
        context: req.encryption_context.unwrap_or_default(),
        form,
    };
    let data_key = call
        .key_use(move |s, m| s.generate_data_key(m, input))
        .await?;
    let mut reply = json!({
        "CiphertextBlob": b64(&data_key.encrypted.blob),
        "KeyId": call.arns.key(&data_key.encrypted.key_id),
    });
    if let Some(plaintext) = &data_key.plaintext {
        reply["Plaintext"] = json!(b64(plaintext));
    }
    Ok(reply)
}

async fn generate_random(call: &Call<'_>, req: Request) -> Result<Value, AwsError> {
    let converted = match req.number_of_bytes {
        Some(n) if (1..=1024).contains(&n) => Ok(usize::try_from(n).unwrap_or(32)),
        _ => Err(KmsError::invalid("NumberOfBytes", "must be 1 to 1024")),
    };
    let n = call.valid("", converted).await?;
    let bytes = call.blocking(move |s, m| s.generate_random(m, n)).await?;
    Ok(json!({ "Plaintext": b64(&bytes) }))
}

async fn create_key(call: &Call<'_>, req: Request) -> Result<Value, AwsError> {
    let converted = (|| {
        if !matches!(req.key_usage.as_deref(), None | Some("ENCRYPT_DECRYPT")) {
            return Err(KmsError::invalid("KeyUsage", "must be ENCRYPT_DECRYPT"));
        }
        for (spec, field) in [
            (&req.key_spec, "KeySpec"),
            (&req.customer_master_key_spec, "CustomerMasterKeySpec"),
        ] {
            if !matches!(spec.as_deref(), None | Some(SYMMETRIC_DEFAULT)) {
                return Err(KmsError::invalid(field, "must be SYMMETRIC_DEFAULT"));
            }
        }
        if req.policy.is_some() {
            return Err(KmsError::invalid(
                "Policy",
                "IAM policy documents are not supported; set kms key policies with `kms key policy`",
            ));
        }
        if req.multi_region == Some(true) {
            return Err(KmsError::invalid(
                "MultiRegion",
                "multi-Region keys are not supported",
            ));
        }
        match req.origin.as_deref() {
            None | Some("AWS_KMS") => Ok(KeyOrigin::Kms),
            Some("EXTERNAL") => Ok(KeyOrigin::External),
            Some(_) => Err(KmsError::invalid("Origin", "must be AWS_KMS or EXTERNAL")),
        }
    })();
    let origin = call.valid("", converted).await?;
    call.valid_as("TagException", "", unreserved_tags(req.tags.as_ref()))
        .await?;
    let input = CreateKeyInput {
        description: req.description.unwrap_or_default(),
        tags: tags_in(req.tags),
        aliases: Vec::new(),
        rotation_period: None,
        origin,
    };
    let view = call.blocking(move |s, m| s.create_key(m, input)).await?;
    Ok(json!({ "KeyMetadata": key_metadata(call.arns, &view) }))
}

async fn describe_key(call: &Call<'_>, req: Request) -> Result<Value, AwsError> {
    let view = describe(call, &req).await?;
    Ok(json!({ "KeyMetadata": key_metadata(call.arns, &view) }))
}

/// DescribeKey of the request's KeyId (required).
async fn describe(call: &Call<'_>, req: &Request) -> Result<KeyView, AwsError> {
    let key = call.key_ref(req.key_id.as_deref().unwrap_or(""));
    call.valid(&key, required(&req.key_id, "KeyId").map(|_| ()))
        .await?;
    call.blocking(move |s, m| s.describe_key(m, &key)).await
}

async fn list_keys(call: &Call<'_>, req: Request) -> Result<Value, AwsError> {
    let limit = call.valid("", limit(req.limit)).await?;
    let marker = req.marker.filter(|m| !m.is_empty());
    let page = call
        .blocking(move |s, m| s.list_keys(m, marker.as_deref(), limit, false))
        .await?;
    let keys: Vec<Value> = page
        .items
        .iter()
        .map(|v| json!({ "KeyId": v.record.id.to_string(), "KeyArn": call.arns.key(&v.record.id) }))
        .collect();
    Ok(paged(json!({ "Keys": keys }), page.next_page_token))
}

fn paged(mut reply: Value, next: Option<String>) -> Value {
    match next {
        Some(marker) => {
            reply["Truncated"] = json!(true);
            reply["NextMarker"] = json!(marker);
        }
        None => reply["Truncated"] = json!(false),
    }
    reply
}

async fn key_state_change(call: &Call<'_>, name: &str, req: Request) -> Result<Value, AwsError> {
    let key = call.key_ref(req.key_id.as_deref().unwrap_or(""));
    call.valid(&key, required(&req.key_id, "KeyId").map(|_| ()))
        .await?;
    let cancel = name == "CancelKeyDeletion";
    let enable = name == "EnableKey";
    let view = call
        .blocking(move |s, m| {
            if cancel {
                s.cancel_key_deletion(m, &key)
            } else if enable {
                s.enable_key(m, &key)
            } else {
                s.disable_key(m, &key)
            }
        })
        .await?;
    Ok(if cancel {
        json!({ "KeyId": call.arns.key(&view.record.id) })
    } else {
        json!({})
    })
}

async fn schedule_key_deletion(call: &Call<'_>, req: Request) -> Result<Value, AwsError> {
    let key = call.key_ref(req.key_id.as_deref().unwrap_or(""));
    let converted = required(&req.key_id, "KeyId").and_then(|_| {
        req.pending_window_in_days
            .map(|d| {
                u32::try_from(d)
                    .map_err(|_| KmsError::invalid("PendingWindowInDays", "must be 7 to 30"))
            })
            .transpose()
    });
    let days = call.valid(&key, converted).await?;
    let view = call
        .blocking(move |s, m| s.schedule_key_deletion(m, &key, days))
        .await?;
    let mut reply = json!({
        "KeyId": call.arns.key(&view.record.id),
        "KeyState": key_state(&view),
        "PendingWindowInDays": days.unwrap_or(crate::service::DEFAULT_DELETION_DAYS),
    });
    if let KeyState::PendingDeletion { delete_at_ms } = view.record.state {
        reply["DeletionDate"] = seconds(delete_at_ms);
    }
    Ok(reply)
}

async fn update_key_description(call: &Call<'_>, req: Request) -> Result<Value, AwsError> {
    let key = call.key_ref(req.key_id.as_deref().unwrap_or(""));
    let converted = required(&req.key_id, "KeyId").and_then(|_| {
        req.description
            .clone()
            .ok_or_else(|| KmsError::invalid("Description", "is required"))
    });
    let description = call.valid(&key, converted).await?;
    call.blocking(move |s, m| s.update_description(m, &key, description))
        .await?;
    Ok(json!({}))
}

async fn point_alias(call: &Call<'_>, name: &str, req: Request) -> Result<Value, AwsError> {
    let target = call.key_ref(req.target_key_id.as_deref().unwrap_or(""));
    let converted = required(&req.target_key_id, "TargetKeyId")
        .and_then(|_| required(&req.alias_name, "AliasName").map(str::to_owned));
    let alias = call.valid(&target, converted).await?;
    let reserved = if alias.starts_with(RESERVED_ALIAS_PREFIX) {
        Err(KmsError::invalid(
            "AliasName",
            "alias names beginning with alias/aws/ are reserved for AWS managed keys",
        ))
    } else {
        Ok(())
    };
    call.valid_as("NotAuthorizedException", &target, reserved)
        .await?;
    let update = name == "UpdateAlias";
    call.blocking(move |s, m| {
        if update {
            s.update_alias(m, &alias, &target)
        } else {
            s.create_alias(m, &alias, &target)
        }
    })
    .await?;
    Ok(json!({}))
}

async fn delete_alias(call: &Call<'_>, req: Request) -> Result<Value, AwsError> {
    let alias = call
        .valid(
            "",
            required(&req.alias_name, "AliasName").map(str::to_owned),
        )
        .await?;
    call.blocking(move |s, m| s.delete_alias(m, &alias)).await?;
    Ok(json!({}))
}

async fn list_aliases(call: &Call<'_>, req: Request) -> Result<Value, AwsError> {
    let key = req.key_id.as_deref().map(|k| call.key_ref(k));
    let limit = call
        .valid(key.as_deref().unwrap_or(""), limit(req.limit))
        .await?;
    let marker = req.marker.filter(|m| !m.is_empty());
    let page = call
        .blocking(move |s, m| s.list_aliases(m, key.as_deref(), marker.as_deref(), limit))
        .await?;
    let aliases: Vec<Value> = page
        .items
        .iter()
        .map(|entry| {
            json!({
                "AliasName": entry.alias.as_str(),
                "AliasArn": call.arns.alias(entry.alias.as_str()),
                "TargetKeyId": entry.key_id.to_string(),
            })
        })
        .collect();
    Ok(paged(json!({ "Aliases": aliases }), page.next_page_token))
}

async fn tag_resource(call: &Call<'_>, req: Request) -> Result<Value, AwsError> {
    let key = call.key_ref(req.key_id.as_deref().unwrap_or(""));
    let converted = required(&req.key_id, "KeyId").and_then(|_| match &req.tags {
        Some(tags) if !tags.is_empty() => Ok(()),
        _ => Err(KmsError::invalid("Tags", "is required")),
    });
    call.valid(&key, converted).await?;
    call.valid_as("TagException", &key, unreserved_tags(req.tags.as_ref()))
        .await?;
    let tags = tags_in(req.tags);
    call.blocking(move |s, m| s.tag_key(m, &key, tags)).await?;
    Ok(json!({}))
}

async fn untag_resource(call: &Call<'_>, req: Request) -> Result<Value, AwsError> {
    let key = call.key_ref(req.key_id.as_deref().unwrap_or(""));
    let converted = required(&req.key_id, "KeyId").and_then(|_| {
        req.tag_keys
            .clone()
            .filter(|k| !k.is_empty())
            .ok_or_else(|| KmsError::invalid("TagKeys", "is required"))
    });
    let tag_keys = call.valid(&key, converted).await?;
    call.blocking(move |s, m| s.untag_key(m, &key, tag_keys))
        .await?;
    Ok(json!({}))
}

async fn list_resource_tags(call: &Call<'_>, req: Request) -> Result<Value, AwsError> {
    let limit = call.valid("", limit(req.limit)).await?;
    let view = describe(call, &req).await?;
    // Marker: the last tag key of the previous page (tags are few, ≤ 50).
    let after = req.marker.filter(|m| !m.is_empty());
    let mut tags: Vec<(&String, &String)> = view
        .record
        .tags
        .iter()
        .filter(|(k, _)| after.as_ref().is_none_or(|a| *k > a))
        .collect();
    let next = (tags.len() > limit).then(|| {
        tags.truncate(limit);
        tags.last().map(|(k, _)| (*k).clone()).unwrap_or_default()
    });
    let tags: Vec<Value> = tags
        .into_iter()
        .map(|(k, v)| json!({ "TagKey": k, "TagValue": v }))
        .collect();
    Ok(paged(json!({ "Tags": tags }), next))
}

async fn set_rotation(call: &Call<'_>, name: &str, req: Request) -> Result<Value, AwsError> {
    let key = call.key_ref(req.key_id.as_deref().unwrap_or(""));
    let enable = name == "EnableKeyRotation";
    let converted = required(&req.key_id, "KeyId").and_then(|_| {
        if !enable {
            return Ok(None);
        }
        let days = match req.rotation_period_in_days {
            None => DEFAULT_ROTATION_DAYS,
            Some(d) => u64::try_from(d)
                .ok()
                .filter(|d| (MIN_ROTATION_DAYS..=MAX_ROTATION_DAYS).contains(d))
                .ok_or_else(|| KmsError::invalid("RotationPeriodInDays", "must be 90 to 2560"))?,
        };
        Ok(Some(Duration::from_secs(days * 86_400)))
    });
    let period = call.valid(&key, converted).await?;
    let policy = RotationPolicyInput {
        period,
        next_rotation_at_ms: None,
    };
    call.blocking(move |s, m| s.set_rotation_policy(m, &key, policy))
        .await?;
    Ok(json!({}))
}

async fn get_key_rotation_status(call: &Call<'_>, req: Request) -> Result<Value, AwsError> {
    let view = describe(call, &req).await?;
    let mut reply = json!({
        "KeyId": call.arns.key(&view.record.id),
        "KeyRotationEnabled": matches!(view.record.rotation, RotationPolicy::Every { .. }),
    });
    if let RotationPolicy::Every { period_secs } = view.record.rotation {
        reply["RotationPeriodInDays"] = json!(period_secs / 86_400);
        if let Some(next) = view.record.next_rotation_at_ms {
            reply["NextRotationDate"] = seconds(next);
        }
    }
    Ok(reply)
}

async fn rotate_key_on_demand(call: &Call<'_>, req: Request) -> Result<Value, AwsError> {
    let key = call.key_ref(req.key_id.as_deref().unwrap_or(""));
    call.valid(&key, required(&req.key_id, "KeyId").map(|_| ()))
        .await?;
    let version = call.blocking(move |s, m| s.rotate_key(m, &key)).await?;
    Ok(json!({ "KeyId": call.arns.key(&version.key_id) }))
}

async fn list_key_rotations(call: &Call<'_>, req: Request) -> Result<Value, AwsError> {
    let key = call.key_ref(req.key_id.as_deref().unwrap_or(""));
    // Every version after the first is a rotation; Marker is the last
    // version number of the previous page (anything else is not ours:
    // InvalidMarkerException, as a foreign page token).
    let converted = required(&req.key_id, "KeyId").and_then(|_| {
        let after = match req.marker.as_deref().filter(|m| !m.is_empty()) {
            None => 1,
            Some(m) => m.parse::<u32>().ok().filter(|v| *v >= 1).ok_or_else(|| {
                KmsError::invalid("page_token", "not a Marker from a previous page")
            })?,
        };
        Ok((limit(req.limit)?, after))
    });
    let (limit, after) = call.valid(&key, converted).await?;
    let (record, versions) = call
        .blocking(move |s, m| s.list_key_versions(m, &key))
        .await?;
    let mut rotations: Vec<_> = versions
        .iter()
        .filter(|v| v.version > after.max(1) && v.state != VersionState::Pending)
        .collect();
    rotations.sort_by_key(|v| v.version);
    let next = (rotations.len() > limit).then(|| {
        rotations.truncate(limit);
        rotations
            .last()
            .map(|v| v.version.to_string())
            .unwrap_or_default()
    });
    let arn = call.arns.key(&record.id);
    let rotations: Vec<Value> = rotations
        .into_iter()
        .map(|v| {
            json!({
                "KeyId": arn,
                "RotationDate": seconds(v.created_at_ms),
                // kms does not record who asked for a version.
                "RotationType": "ON_DEMAND",
            })
        })
        .collect();
    Ok(paged(json!({ "Rotations": rotations }), next))
}

/// `WrappingAlgorithm`: the RSAES-OAEP ones the HSM offers.
fn wrapping_algorithm(value: Option<&str>) -> Result<OaepHash, KmsError> {
    match value {
        Some("RSAES_OAEP_SHA_1") => Ok(OaepHash::Sha1),
        Some("RSAES_OAEP_SHA_256") => Ok(OaepHash::Sha256),
        Some(_) => Err(KmsError::invalid(
            "WrappingAlgorithm",
            "must be RSAES_OAEP_SHA_1 or RSAES_OAEP_SHA_256",
        )),
        None => Err(KmsError::invalid("WrappingAlgorithm", "is required")),
    }
}

fn wrapping_key_spec(value: Option<&str>) -> Result<ImportKeySpec, KmsError> {
    match value {
        Some("RSA_2048") => Ok(ImportKeySpec::Rsa2048),
        Some("RSA_3072") => Ok(ImportKeySpec::Rsa3072),
        Some("RSA_4096") => Ok(ImportKeySpec::Rsa4096),
        Some(_) => Err(KmsError::invalid(
            "WrappingKeySpec",
            "must be RSA_2048, RSA_3072 or RSA_4096",
        )),
        None => Err(KmsError::invalid("WrappingKeySpec", "is required")),
    }
}

async fn get_parameters_for_import(call: &Call<'_>, req: Request) -> Result<Value, AwsError> {
    let key = call.key_ref(req.key_id.as_deref().unwrap_or(""));
    let converted = required(&req.key_id, "KeyId").and_then(|_| {
        Ok((
            wrapping_algorithm(req.wrapping_algorithm.as_deref())?,
            wrapping_key_spec(req.wrapping_key_spec.as_deref())?,
        ))
    });
    let (algorithm, spec) = call.valid(&key, converted).await?;
    let params = call
        .blocking(move |s, m| s.get_parameters_for_import(m, &key, algorithm, spec, None))
        .await?;
    Ok(json!({
        "KeyId": call.arns.key(&params.key_id),
        "ImportToken": b64(&params.import_token),
        "PublicKey": b64(&params.public_key),
        "ParametersValidTo": seconds(params.valid_to_ms),
    }))
}

/// ImportKeyMaterial: material that does not expire only
/// (`ExpirationModel` KEY_MATERIAL_DOES_NOT_EXPIRE, no `ValidTo`).
async fn import_key_material(call: &Call<'_>, req: Request) -> Result<Value, AwsError> {
    let key = call.key_ref(req.key_id.as_deref().unwrap_or(""));
    let converted = required(&req.key_id, "KeyId").and_then(|_| {
        if !matches!(
            req.expiration_model.as_deref(),
            None | Some("KEY_MATERIAL_DOES_NOT_EXPIRE")
        ) || req.valid_to.is_some()
        {
            return Err(KmsError::invalid(
                "ExpirationModel",
                "imported key material does not expire in kms: use KEY_MATERIAL_DOES_NOT_EXPIRE without ValidTo",
            ));
        }
        Ok((
            blob(req.import_token.as_deref(), "ImportToken")?,
            blob(req.encrypted_key_material.as_deref(), "EncryptedKeyMaterial")?,
        ))
    });
    let (token, material) = call.valid(&key, converted).await?;
    let version = call
        .blocking(move |s, m| s.import_key_material(m, &key, &token, &material, None))
        .await?;
    Ok(json!({ "KeyId": call.arns.key(&version.key_id) }))
}
