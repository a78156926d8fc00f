//! The Kubernetes KMS v2 plugin's operations (issue 16): Encrypt, Decrypt
//! and the Status probe kube-apiserver polls, each audited as an operation
//! of its own (`Operation::Kubernetes*`) over the same key uses as
//! Crypto.Encrypt and Crypto.Decrypt (`encrypt_in`, `decrypt_inner`): no key
//! operation exists twice.
//!
//! What the plugin adds to those key uses:
//! - a fixed encryption context, [`PLUGIN_CONTEXT_KEY`] =
//!   [`PLUGIN_CONTEXT_VALUE`], so that a blob made for Kubernetes opens only
//!   through the plugin (Crypto.Decrypt would need that context named) and
//!   key policies can require it;
//! - a key id naming the key *and* the version, `<key id>/v<version>`
//!   ([`PluginKeyId`]): a rotation changes it, which is how kube-apiserver
//!   learns that it must re-seed, and it is never reused for other key
//!   material (versions are never renumbered);
//! - the limits of the Kubernetes documentation
//!   (<https://kubernetes.io/docs/tasks/administer-cluster/kms-provider/>,
//!   "Developing a KMS plugin gRPC server", and `k8s.io/kms/apis/v2/api.proto`),
//!   each refused with INVALID_ARGUMENT naming it.
//!
//! Never logs plaintext (the apiserver's DEK seed), ciphertexts or annotations.

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant};

use kms_storage::{KeyId, Permission};
use parking_lot::Mutex;
use zeroize::Zeroizing;

use super::operation::Operation;
use super::{Decrypted, Deferred, Encrypted, KmsService, RequestMeta};
use crate::ciphertext;
use crate::encryption_context::{EncryptionContext, context_digest};
use crate::error::{KmsError, Result};

/// The encryption-context key every plugin blob is bound to.
pub const PLUGIN_CONTEXT_KEY: &str = "kms.kubernetes.io/plugin";
/// The encryption-context value every plugin blob is bound to (the plugin
/// API's version).
pub const PLUGIN_CONTEXT_VALUE: &str = "v2";

/// Longest ciphertext kube-apiserver accepts from a plugin and sends back,
/// in bytes (`EncryptResponse.ciphertext`: "less than 1 kB";
/// kube-apiserver's `encryptedDEKSourceMaxSize` is 1024).
pub const MAX_CIPHERTEXT_BYTES: usize = 1024;
/// Longest key id, in bytes (`StatusResponse.key_id`: "less than 1 kB";
/// kube-apiserver's `keyIDMaxSize` is 1024).
pub const MAX_KEY_ID_BYTES: usize = 1024;
/// Largest total size of annotation keys and values, in bytes
/// (`EncryptResponse.annotations`: "less than 32 kB"; kube-apiserver's
/// `annotationsMaxSize` is 32 × 1024).
pub const MAX_ANNOTATIONS_BYTES: usize = 32 * 1024;
/// Largest plaintext the plugin encrypts, in bytes: what keeps the blob
/// (header with the longest key id, IV, tag; README "Ciphertext format")
/// within [`MAX_CIPHERTEXT_BYTES`]. kube-apiserver sends a 32-byte seed.
pub const MAX_PLAINTEXT_BYTES: usize = MAX_CIPHERTEXT_BYTES
    - (8 + ciphertext::MAX_KEY_ID_LEN + ciphertext::IV_LEN + ciphertext::TAG_LEN);

/// How long Status reuses the outcome of its HSM round trip: kube-apiserver
/// polls every 10 s while unhealthy (every minute while healthy), so at most
/// one HSM round trip per poll, and a burst of polls costs one.
pub const STATUS_CACHE_TTL: Duration = Duration::from_secs(5);

/// A plugin key id: `<key id>/v<version>`, e.g. `key-0123…/v3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginKeyId {
    pub key_id: KeyId,
    /// The key version, ≥ 1.
    pub version: u32,
}

impl fmt::Display for PluginKeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/v{}", self.key_id, self.version)
    }
}

impl PluginKeyId {
    /// Parses the canonical form only (no leading zeros, no sign, version ≥
    /// 1): one key version has exactly one plugin key id.
    pub fn parse(text: &str) -> Option<PluginKeyId> {
        let (key, version) = text.rsplit_once("/v")?;
        if version.is_empty() || !version.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let parsed = PluginKeyId {
            key_id: KeyId::parse(key).ok()?,
            version: version.parse().ok().filter(|&v| v >= 1)?,
        };
        (parsed.to_string() == text).then_some(parsed)
    }
}

/// Input of the plugin's Decrypt (the fields of `v2.DecryptRequest` but
/// `uid`, which is the request id).
#[derive(Debug)]
pub struct KubernetesDecryptInput {
    pub ciphertext: Vec<u8>,
    pub key_id: String,
    /// Returned by the plugin at Encrypt (kms returns none) and checked
    /// against the limits only.
    pub annotations: HashMap<String, Vec<u8>>,
}

/// What Status remembers between calls, per listener: the outcome of the
/// last HSM round trip (reused for [`STATUS_CACHE_TTL`]) and the last key id
/// it reported.
#[derive(Debug, Default)]
pub struct StatusCache {
    state: Mutex<StatusState>,
}

#[derive(Debug, Default)]
struct StatusState {
    /// When the HSM was last probed, and whether it answered.
    hsm: Option<(Instant, bool)>,
    last_key: Option<PluginKeyId>,
}

impl StatusCache {
    /// The key id Status last found (while healthy or not): what it names
    /// when it cannot determine the key (kube-apiserver wants a key id).
    pub fn last_known(&self) -> Option<PluginKeyId> {
        self.state.lock().last_key.clone()
    }

    fn remember_key(&self, id: &PluginKeyId) {
        self.state.lock().last_key = Some(id.clone());
    }

    /// Whether the HSM answered: `probe`'s answer if none younger than
    /// [`STATUS_CACHE_TTL`] is known (two concurrent callers may both probe).
    fn hsm_available(&self, probe: impl FnOnce() -> bool) -> bool {
        if let Some((at, available)) = self.state.lock().hsm
            && at.elapsed() < STATUS_CACHE_TTL
        {
            return available;
        }
        let available = probe();
        self.state.lock().hsm = Some((Instant::now(), available));
        available
    }
}

impl KmsService {
    /// The plugin's encryption context ([`PLUGIN_CONTEXT_KEY`] =
    /// [`PLUGIN_CONTEXT_VALUE`]).
    fn plugin_context(&self) -> Result<EncryptionContext> {
        self.context(plugin_context_map())
    }

    /// The plugin's Status: the key `key` (id or alias) resolves, `meta`'s
    /// principal may encrypt with it, the key is enabled and its primary
    /// version is enabled (catalogue reads, on every call: the key id is
    /// always current), and the HSM answers a token search (the health
    /// probe's round trip, which reads the token's storage; made at most
    /// once per [`STATUS_CACHE_TTL`]). Every call is audited and its record
    /// must be durable for the answer to be OK, so the audit log is checked
    /// on every call.
    ///
    /// # Errors
    /// What the checks found (PERMISSION_DENIED, NOT_FOUND, a disabled key
    /// or version, the HSM unavailable) or the audit log unavailable.
    pub fn kubernetes_status(
        &self,
        meta: &RequestMeta,
        key: &str,
        cache: &StatusCache,
    ) -> Result<PluginKeyId> {
        self.audited(meta, Operation::KubernetesStatus, Some(key), |audit| {
            let context = self.plugin_context()?;
            let record = self.resolve_for_use(meta, audit, key, Permission::Encrypt, &context)?;
            let version = self.primary_version(&record)?;
            audit.key(&record.id, Some(version.version));
            let id = PluginKeyId {
                key_id: record.id,
                version: version.version,
            };
            cache.remember_key(&id);
            if !cache.hsm_available(|| self.readiness().hsm_available) {
                return Err(KmsError::HsmUnavailable { source: None });
            }
            Ok(id)
        })
    }

    /// The plugin's Encrypt: `plaintext` (kube-apiserver's DEK seed) under
    /// the primary version of `key` (id or alias) with the plugin's
    /// encryption context, as Crypto.Encrypt would, audited as
    /// KubernetesEncrypt. The reply's key id is
    /// `PluginKeyId { key_id, version }` of the result. Released by
    /// [`KmsService::finish_async`] once the record is durable.
    ///
    /// # Errors
    /// INVALID_ARGUMENT for an empty plaintext or one over
    /// [`MAX_PLAINTEXT_BYTES`]; otherwise as Crypto.Encrypt.
    pub fn kubernetes_encrypt(
        &self,
        meta: &RequestMeta,
        key: &str,
        plaintext: Zeroizing<Vec<u8>>,
    ) -> Deferred<Encrypted> {
        self.deferred(meta, Operation::KubernetesEncrypt, Some(key), |audit| {
            let context = self.plugin_context()?;
            audit.context_digest = Some(context_digest(&context));
            if plaintext.is_empty() || plaintext.len() > MAX_PLAINTEXT_BYTES {
                return Err(KmsError::invalid(
                    "plaintext",
                    format!(
                        "must be 1 to {MAX_PLAINTEXT_BYTES} bytes, so that the ciphertext stays within the Kubernetes KMS v2 limit of {MAX_CIPHERTEXT_BYTES} bytes"
                    ),
                ));
            }
            self.encrypt_in(meta, audit, key, &plaintext, &context)
        })
    }

    /// The plugin's Decrypt: any blob this plugin made, under any version of
    /// its key that is still enabled, with the plugin's encryption context,
    /// as Crypto.Decrypt would (authorized and audited against the key the
    /// blob names), audited as KubernetesDecrypt. The request's `key_id`
    /// must be the blob's key and version exactly; any mismatch is the
    /// generic "invalid ciphertext". Released by
    /// [`KmsService::finish_async`] once the record is durable.
    ///
    /// # Errors
    /// INVALID_ARGUMENT naming the limit for a ciphertext over
    /// [`MAX_CIPHERTEXT_BYTES`], a key id over [`MAX_KEY_ID_BYTES`] (or
    /// empty), an annotation key that is not a fully qualified domain name,
    /// annotations over [`MAX_ANNOTATIONS_BYTES`]; "invalid ciphertext" for
    /// a key id mismatch or a blob that does not open; a disabled or
    /// destroyed version as Crypto.Decrypt (FAILED_PRECONDITION, naming it).
    pub fn kubernetes_decrypt(
        &self,
        meta: &RequestMeta,
        input: KubernetesDecryptInput,
    ) -> Deferred<Decrypted> {
        let KubernetesDecryptInput {
            ciphertext,
            key_id,
            annotations,
        } = input;
        // Until the blob parses, the record names the key the request gave,
        // if its key_id is one this plugin issues (`<key id>/v<n>`); a
        // malformed one (up to 1 KiB of anything) is not copied into the log.
        let named = PluginKeyId::parse(&key_id).map(|p| p.key_id.to_string());
        self.deferred(
            meta,
            Operation::KubernetesDecrypt,
            named.as_deref(),
            |audit| {
                check_decrypt_limits(&ciphertext, &key_id, &annotations)?;
                let requested = PluginKeyId::parse(&key_id).ok_or(KmsError::InvalidCiphertext)?;
                let parsed =
                    ciphertext::parse_blob(&ciphertext).map_err(|_| KmsError::InvalidCiphertext)?;
                let header = parsed.header();
                if header.key_id() != requested.key_id.as_str()
                    || header.key_version() != requested.version
                {
                    if let Ok(blob_key) = KeyId::parse(header.key_id()) {
                        audit.key(&blob_key, Some(header.key_version()));
                    }
                    tracing::debug!(
                        "ciphertext names another key version than the request's key_id"
                    );
                    return Err(KmsError::InvalidCiphertext);
                }
                self.decrypt_inner(
                    meta,
                    Permission::Decrypt,
                    audit,
                    &ciphertext,
                    plugin_context_map(),
                    None,
                )
            },
        )
    }
}

fn plugin_context_map() -> HashMap<String, String> {
    HashMap::from([(
        PLUGIN_CONTEXT_KEY.to_owned(),
        PLUGIN_CONTEXT_VALUE.to_owned(),
    )])
}

/// The Kubernetes limits on a Decrypt request (module doc).
fn check_decrypt_limits(
    ciphertext: &[u8],
    key_id: &str,
    annotations: &HashMap<String, Vec<u8>>,
) -> Result<()> {
    if ciphertext.is_empty() || ciphertext.len() > MAX_CIPHERTEXT_BYTES {
        return Err(KmsError::invalid(
            "ciphertext",
            format!("must be 1 to {MAX_CIPHERTEXT_BYTES} bytes (Kubernetes KMS v2 limit)"),
        ));
    }
    if key_id.is_empty() || key_id.len() > MAX_KEY_ID_BYTES {
        return Err(KmsError::invalid(
            "key_id",
            format!("must be 1 to {MAX_KEY_ID_BYTES} bytes (Kubernetes KMS v2 limit)"),
        ));
    }
    let mut total = 0usize;
    for (name, value) in annotations {
        if !is_fully_qualified_domain_name(name) {
            return Err(KmsError::invalid(
                "annotations",
                "every key must be a fully qualified domain name (RFC 1123; Kubernetes KMS v2 limit)",
            ));
        }
        total = total.saturating_add(name.len()).saturating_add(value.len());
    }
    if total > MAX_ANNOTATIONS_BYTES {
        return Err(KmsError::invalid(
            "annotations",
            format!(
                "keys and values must total at most {MAX_ANNOTATIONS_BYTES} bytes (Kubernetes KMS v2 limit)"
            ),
        ));
    }
    Ok(())
}

/// Whether `name` is a fully qualified domain name as kube-apiserver checks
/// annotation keys (`IsFullyQualifiedDomainName` in k8s.io/apimachinery
/// validation): an optional trailing dot; then an RFC 1123 subdomain of at
/// most 253 characters with at least two labels, each 1 to 63 lowercase
/// letters, digits or `-`, starting and ending with a letter or digit.
pub fn is_fully_qualified_domain_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return false;
    }
    let mut labels = 0;
    for label in name.split('.') {
        labels += 1;
        let bytes = label.as_bytes();
        let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        let ok = (1..=63).contains(&bytes.len())
            && bytes.first().is_some_and(alnum)
            && bytes.last().is_some_and(alnum)
            && bytes.iter().all(|b| alnum(b) || *b == b'-');
        if !ok {
            return false;
        }
    }
    labels >= 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_key_ids_name_key_and_version_and_parse_only_their_canonical_form() {
        let key_id = KeyId::from_random([0xab; 16]);
        let id = PluginKeyId {
            key_id: key_id.clone(),
            version: 3,
        };
        let text = id.to_string();
        assert_eq!(text, format!("{key_id}/v3"));
        assert_eq!(PluginKeyId::parse(&text), Some(id));
        for bad in [
            String::new(),
            key_id.to_string(),
            format!("{key_id}/v0"),
            format!("{key_id}/v03"),
            format!("{key_id}/v+3"),
            format!("{key_id}/v"),
            format!("{key_id}/v3 "),
            format!("{key_id}/v4294967296"),
            "alias/kubernetes/v1".to_owned(),
            format!("{key_id}/V3"),
        ] {
            assert_eq!(PluginKeyId::parse(&bad), None, "{bad:?}");
        }
    }

    #[test]
    fn annotation_keys_must_be_fully_qualified_domain_names() {
        for good in [
            "kms.example.org",
            "version.encryption.remote.io",
            "a.b",
            "a-1.b2.",
            "x1.io",
        ] {
            assert!(is_fully_qualified_domain_name(good), "{good}");
        }
        let long_label = format!("{}.io", "a".repeat(64));
        let long_name = format!("{}.io", vec!["a".repeat(60); 5].join("."));
        for bad in [
            "",
            ".",
            "localhost",
            "Upper.case",
            "-a.b",
            "a-.b",
            "a..b",
            "a_b.c",
            "a b.c",
            long_label.as_str(),
            long_name.as_str(),
        ] {
            assert!(!is_fully_qualified_domain_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn decrypt_limits_name_the_limit_and_accept_what_kubernetes_accepts() {
        let none = HashMap::new();
        let at_limit = vec![1u8; MAX_CIPHERTEXT_BYTES];
        assert!(check_decrypt_limits(&at_limit, "k", &none).is_ok());
        type Case = (Vec<u8>, String, HashMap<String, Vec<u8>>, &'static str);
        let cases: [Case; 5] = [
            (
                vec![1; MAX_CIPHERTEXT_BYTES + 1],
                "k".into(),
                none.clone(),
                "ciphertext",
            ),
            (
                vec![1; 10],
                "k".repeat(MAX_KEY_ID_BYTES + 1),
                none.clone(),
                "key_id",
            ),
            (vec![1; 10], String::new(), none.clone(), "key_id"),
            (
                vec![1; 10],
                "k".into(),
                HashMap::from([("Not_A_Domain".to_owned(), vec![])]),
                "fully qualified",
            ),
            (
                vec![1; 10],
                "k".into(),
                HashMap::from([("a.io".to_owned(), vec![0; MAX_ANNOTATIONS_BYTES - 3])]),
                "32768",
            ),
        ];
        for (ciphertext, key_id, annotations, named) in cases {
            let error = check_decrypt_limits(&ciphertext, &key_id, &annotations)
                .expect_err(named)
                .to_string();
            assert!(error.contains(named), "{named}: {error}");
            assert!(error.contains("Kubernetes KMS v2 limit"), "{error}");
        }
        // Exactly at the annotation limit is allowed.
        let full = HashMap::from([("a.io".to_owned(), vec![0; MAX_ANNOTATIONS_BYTES - 4])]);
        assert!(check_decrypt_limits(&[1], "k", &full).is_ok());
    }

    #[test]
    fn the_largest_plaintext_still_fits_the_ciphertext_limit() {
        assert_eq!(MAX_PLAINTEXT_BYTES, 924);
        let header = ciphertext::Header::new(
            "k".repeat(ciphertext::MAX_KEY_ID_LEN),
            u32::MAX,
            ciphertext::Algorithm::Aes256Gcm,
        )
        .expect("longest header");
        let blob = ciphertext::seal_blob(
            &header,
            &[0; ciphertext::IV_LEN],
            &vec![0; MAX_PLAINTEXT_BYTES + ciphertext::TAG_LEN],
        );
        assert_eq!(blob.len(), MAX_CIPHERTEXT_BYTES);
    }
}
