//! The catalogue's record types: key ids, aliases, keys, versions and their
//! states. These types are also the JSON stored on disk (behind a version
//! byte, see `schema`), so renaming a field is a format change.
//!
//! No key material lives here, ever: a version records only *where* its KEK is
//! held ([`KekHandle`]), never the KEK.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::StorageError;

/// A key id: `key-` followed by 32 lowercase hex digits (128 random bits).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KeyId(String);

impl KeyId {
    const PREFIX: &'static str = "key-";
    /// Length in bytes of every key id.
    pub const LEN: usize = 4 + 32;

    /// Parses and validates a key id.
    ///
    /// # Errors
    ///
    /// [`StorageError::InvalidKeyId`] unless `s` is `key-` followed by exactly
    /// 32 lowercase hex digits.
    pub fn parse(s: &str) -> Result<KeyId, StorageError> {
        let ok = s.len() == Self::LEN
            && s.starts_with(Self::PREFIX)
            && s[Self::PREFIX.len()..]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if ok {
            Ok(KeyId(s.to_owned()))
        } else {
            Err(StorageError::InvalidKeyId {
                value: s.to_owned(),
            })
        }
    }

    /// Builds an id from 16 random bytes (the caller supplies the randomness).
    pub fn from_random(bytes: [u8; 16]) -> KeyId {
        KeyId(format!("{}{}", Self::PREFIX, hex::encode(bytes)))
    }

    /// The id as text (`key-…`, [`KeyId::LEN`] ASCII bytes).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for KeyId {
    type Error = StorageError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        KeyId::parse(&s)
    }
}

impl From<KeyId> for String {
    fn from(k: KeyId) -> String {
        k.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.0)
    }
}

/// An alias: `alias/` followed by 1 to 250 characters of `[A-Za-z0-9/_-]`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Alias(String);

impl Alias {
    const PREFIX: &'static str = "alias/";
    const MAX_NAME: usize = 250;

    /// Parses and validates an alias.
    ///
    /// # Errors
    ///
    /// [`StorageError::InvalidAlias`] unless `s` is `alias/` followed by 1 to
    /// 250 characters of `[A-Za-z0-9/_-]`.
    pub fn parse(s: &str) -> Result<Alias, StorageError> {
        let name = s.strip_prefix(Self::PREFIX).unwrap_or("");
        let ok = !name.is_empty()
            && name.len() <= Self::MAX_NAME
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'/' || b == b'_' || b == b'-');
        if ok {
            Ok(Alias(s.to_owned()))
        } else {
            Err(StorageError::InvalidAlias {
                value: s.to_owned(),
            })
        }
    }

    /// The alias as text (`alias/…`, at most 256 ASCII bytes).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Alias {
    type Error = StorageError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Alias::parse(&s)
    }
}

impl From<Alias> for String {
    fn from(a: Alias) -> String {
        a.0
    }
}

impl fmt::Display for Alias {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Alias {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Alias({})", self.0)
    }
}

/// What kind of key this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum KeySpec {
    /// A 256-bit AES key used with GCM (stored as `"AES_256_GCM"`).
    #[serde(rename = "AES_256_GCM")]
    Aes256Gcm,
}

/// A key's lifecycle state. All times are unix milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state")]
#[non_exhaustive]
pub enum KeyState {
    /// Usable for every operation.
    Enabled,
    /// Refuses cryptographic operations; can be enabled again.
    Disabled,
    /// Deletion is scheduled for `delete_at_ms`; cancellable until then.
    PendingDeletion {
        /// When the deletion may be finalized, unix milliseconds.
        delete_at_ms: u64,
    },
    /// A tombstone: the versions are destroyed, the id is never reused and the
    /// record stays so that the audit history remains readable.
    Deleted {
        /// When the key was deleted, unix milliseconds.
        deleted_at_ms: u64,
    },
}

/// Where a key's (or a version's) key material comes from (AWS KMS
/// `Origin`). Stored as `"origin":"EXTERNAL"`; `Kms` is the default and is
/// not written, so records from before origins existed decode as `Kms` and
/// records of generated keys encode byte for byte as before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub enum KeyOrigin {
    /// Generated inside the HSM by kms.
    #[default]
    #[serde(rename = "KMS")]
    Kms,
    /// Imported by its owner (`ImportKeyMaterial`): kms cannot generate
    /// new material for it, so it is never rotated by kms; a key of this
    /// origin has no version until the first import.
    #[serde(rename = "EXTERNAL")]
    External,
}

impl KeyOrigin {
    /// Whether this is the default, `Kms` (serde: not written).
    pub fn is_kms(&self) -> bool {
        *self == KeyOrigin::Kms
    }
}

/// When the service rotates a key on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "policy")]
#[non_exhaustive]
pub enum RotationPolicy {
    /// Rotated only on request.
    Manual,
    /// Rotated every `period_secs` seconds (the next time is `KeyRecord::next_rotation_at_ms`).
    Every {
        /// The rotation period, seconds.
        period_secs: u64,
    },
}

/// A key's catalogue record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// The key's id; never reused, even after deletion.
    pub id: KeyId,
    /// Free text set by the key's managers.
    pub description: String,
    /// Free-form name/value labels.
    pub tags: BTreeMap<String, String>,
    /// What kind of key this is.
    pub spec: KeySpec,
    /// Lifecycle state.
    pub state: KeyState,
    /// The version Encrypt uses; `None` until the first version is committed.
    pub primary_version: Option<u32>,
    /// The highest version number ever allocated (pending, committed or discarded);
    /// the next version is this plus one, so numbers are never reused.
    pub latest_version: u32,
    /// When the service rotates the key on its own.
    pub rotation: RotationPolicy,
    /// The next automatic rotation, unix milliseconds (`None` when manual).
    pub next_rotation_at_ms: Option<u64>,
    /// Creation time, unix milliseconds.
    pub created_at_ms: u64,
    /// Time of the last change to this record, unix milliseconds.
    pub updated_at_ms: u64,
    /// Who may use and manage the key. `None`: the service's default policy.
    /// (Absent in records written before policies existed.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<KeyPolicy>,
    /// Where the key's material comes from. An `External` key with no
    /// primary version awaits its first import (AWS `PendingImport`).
    /// (Absent, meaning `Kms`, in records of generated keys.)
    #[serde(default, skip_serializing_if = "KeyOrigin::is_kms")]
    pub origin: KeyOrigin,
}

/// A key's access policy: a request is allowed when one grant matches it.
/// The catalogue stores it; the service evaluates it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct KeyPolicy {
    /// The grants, in the order they were given (order does not matter).
    pub grants: Vec<Grant>,
}

/// Permission for the principals matching `principal` (`*` matches any run of
/// characters) to perform `permissions`, provided the request's encryption
/// context contains every entry of `required_context`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Principal pattern: `*` matches any run of characters, all else literally.
    pub principal: String,
    /// What the grant allows.
    pub permissions: BTreeSet<Permission>,
    /// Encryption-context entries the request must carry (empty: none).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub required_context: BTreeMap<String, String>,
}

/// What a grant allows on one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Permission {
    /// Encrypt with the key.
    Encrypt,
    /// Decrypt with the key.
    Decrypt,
    /// Generate data keys under the key.
    GenerateDataKey,
    /// Decrypt as the source of a ReEncrypt (the key named in the blob).
    ReEncryptFrom,
    /// Encrypt as the destination of a ReEncrypt.
    ReEncryptTo,
    /// Read the key's metadata, versions and policy.
    Describe,
    /// Rotate the key (add a new primary version).
    Rotate,
    /// Change the key's state, description, tags, rotation policy, versions
    /// and aliases (not its policy: that is for administrators).
    Manage,
}

impl Permission {
    /// Every permission, in declaration order.
    pub const ALL: [Permission; 8] = [
        Permission::Encrypt,
        Permission::Decrypt,
        Permission::GenerateDataKey,
        Permission::ReEncryptFrom,
        Permission::ReEncryptTo,
        Permission::Describe,
        Permission::Rotate,
        Permission::Manage,
    ];

    /// The kebab-case name used in configuration, the CLI and the audit log.
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::Encrypt => "encrypt",
            Permission::Decrypt => "decrypt",
            Permission::GenerateDataKey => "generate-data-key",
            Permission::ReEncryptFrom => "re-encrypt-from",
            Permission::ReEncryptTo => "re-encrypt-to",
            Permission::Describe => "describe",
            Permission::Rotate => "rotate",
            Permission::Manage => "manage",
        }
    }

    /// The permission named `name` (kebab-case, see [`Permission::as_str`]);
    /// `None` for an unknown name.
    pub fn parse(name: &str) -> Option<Permission> {
        Permission::ALL.into_iter().find(|p| p.as_str() == name)
    }
}

/// The fields of a new key; the catalogue fills in the rest.
#[derive(Debug, Clone)]
pub struct NewKey {
    /// The new key's id (the caller draws it at random).
    pub id: KeyId,
    /// Free text.
    pub description: String,
    /// Free-form name/value labels.
    pub tags: BTreeMap<String, String>,
    /// What kind of key this is.
    pub spec: KeySpec,
    /// The state the key starts in once created (normally `Enabled`).
    pub state: KeyState,
    /// When the service rotates the key on its own.
    pub rotation: RotationPolicy,
    /// The first automatic rotation, unix milliseconds (`None` when manual).
    pub next_rotation_at_ms: Option<u64>,
    /// Aliases created together with the key, in the same atomic write.
    pub aliases: Vec<Alias>,
}

/// A version's lifecycle state. All times are unix milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state")]
#[non_exhaustive]
pub enum VersionState {
    /// Recorded before the KEK is created in the HSM; committed or discarded
    /// by the service (at start-up, by reconciliation with the HSM).
    Pending,
    /// Usable for encryption (if primary) and decryption.
    Enabled,
    /// Refuses every operation; can be enabled again.
    Disabled,
    /// Refuses every operation; its KEK is destroyed at `destroy_at_ms`
    /// unless the destruction is cancelled (back to `Disabled`).
    ScheduledDestruction {
        /// When the KEK may be destroyed, unix milliseconds.
        destroy_at_ms: u64,
    },
    /// The KEK is gone (or was never made); final. The record stays as a
    /// tombstone so that blobs under the version are refused by name.
    Destroyed {
        /// When the version was destroyed, unix milliseconds.
        destroyed_at_ms: u64,
    },
    /// The emergency state of a suspected-compromised version (issue 18
    /// item 5): it decrypts only as the source of a ReEncrypt, so that
    /// everything under it can be moved while nobody reads plaintext
    /// through it; it never encrypts and cannot be the primary version.
    /// Left by enabling or disabling the version. Stored as
    /// `{"state":"ReEncryptOnly"}` (pinned by a golden vector below).
    ReEncryptOnly,
}

/// How a version's KEK is held. A field rather than an assumption so that a
/// new form can be added without migrating existing records: records
/// written before `Wrapped` existed are `HsmObject` and decode unchanged.
///
/// Stored as JSON with a `"kind"` tag (`{"kind":"HsmObject",…}`,
/// `{"kind":"Wrapped",…}`); byte strings are lowercase hex. Pinned by the
/// golden files under `tests/golden/`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind")]
#[non_exhaustive]
pub enum KekHandle {
    /// A token object in the HSM, found by its CKA_ID.
    HsmObject {
        /// The object's CKA_ID (stored hex-encoded).
        #[serde(with = "hex::serde")]
        object_id: Vec<u8>,
    },
    /// A key version held only as a blob wrapped under the HSM's root key
    /// of `root_epoch` (design note `hierarchy-and-cluster.md` §1.5.2). The
    /// blob is not secret on its own (only that root, inside the HSM, can
    /// unwrap it, and only into a sensitive session object), but blob and
    /// root together are a usable key for any PIN holder, so `Debug` shows
    /// lengths only and the blob belongs in the catalogue, never in logs.
    ///
    /// AES key wrap carries no associated data, so `mac` binds the blob to
    /// its place: it is HMAC-SHA256, computed inside the HSM with the
    /// catalogue-integrity key, over kms-hsm's `WrappedKey::mac_input(key_id,
    /// version)`, i.e. over the key id, the version number, `root_epoch`,
    /// `mechanism` and `blob` (with a domain-separation prefix and length
    /// fields; the exact layout is pinned in kms-hsm). Someone who can
    /// write the database therefore cannot move a blob to another key or
    /// version. This crate stores the fields and never checks the MAC
    /// (it holds no key); the service verifies it before every unwrap.
    Wrapped {
        /// The epoch of the root key the blob is wrapped under (the HSM
        /// object `kms-root/<epoch>`).
        root_epoch: u32,
        /// The PKCS#11 mechanism number the blob was wrapped with:
        /// `CKM_AES_KEY_WRAP` = 0x2109 (RFC 3394) today; recorded so that
        /// other mechanisms can be added (design note §1.5.4).
        mechanism: u64,
        /// The wrapped key (40 bytes for a 32-byte key under
        /// `CKM_AES_KEY_WRAP`; stored hex-encoded). Its length is checked
        /// by the HSM layer, not here.
        #[serde(with = "hex::serde")]
        blob: Vec<u8>,
        /// HMAC-SHA256 (32 bytes, stored hex-encoded) over the record's
        /// key id, version, `root_epoch`, `mechanism` and `blob`; see above.
        #[serde(with = "hex::serde")]
        mac: [u8; 32],
    },
}

impl fmt::Debug for KekHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KekHandle::HsmObject { object_id } => f
                .debug_struct("HsmObject")
                .field("object_id", &hex::encode(object_id))
                .finish(),
            // Lengths only: a blob plus its root is a usable key for any
            // PIN holder, and the MAC is of no use to a reader of logs.
            KekHandle::Wrapped {
                root_epoch,
                mechanism,
                blob,
                mac,
            } => f
                .debug_struct("Wrapped")
                .field("root_epoch", root_epoch)
                .field("mechanism", &format_args!("{mechanism:#x}"))
                .field("blob", &format_args!("[{} bytes]", blob.len()))
                .field("mac", &format_args!("[{} bytes]", mac.len()))
                .finish(),
        }
    }
}

/// A service key held wrapped under a root (not a customer key version):
/// the catalogue-integrity HMAC key whose MACs authenticate
/// `KekHandle::Wrapped` records (design note `hierarchy-and-cluster.md`
/// §1.5.2). Stored as a metadata record (`schema::META_INTEGRITY_KEY`);
/// JSON with the blob in lowercase hex, pinned by a golden vector. `Debug`
/// shows the blob's length only (blob + root = a usable key for any PIN
/// holder).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedServiceKey {
    /// The epoch of the root key the blob is wrapped under.
    pub root_epoch: u32,
    /// The PKCS#11 wrapping mechanism (`CKM_AES_KEY_WRAP` = 0x2109).
    pub mechanism: u64,
    /// The wrapped key (40 bytes under `CKM_AES_KEY_WRAP`), hex on disk.
    #[serde(with = "hex::serde")]
    pub blob: Vec<u8>,
}

impl fmt::Debug for WrappedServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WrappedServiceKey")
            .field("root_epoch", &self.root_epoch)
            .field("mechanism", &format_args!("{:#x}", self.mechanism))
            .field("blob", &format_args!("[{} bytes]", self.blob.len()))
            .finish()
    }
}

/// A key version's catalogue record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    /// The key this version belongs to.
    pub key_id: KeyId,
    /// The version number: 1 for the first, never reused.
    pub version: u32,
    /// Lifecycle state.
    pub state: VersionState,
    /// Where the version's KEK lives.
    pub kek: KekHandle,
    /// Where the version's material comes from: `External` for a version
    /// made by `ImportKeyMaterial`. (Absent, meaning `Kms`, in records of
    /// generated versions.)
    #[serde(default, skip_serializing_if = "KeyOrigin::is_kms")]
    pub origin: KeyOrigin,
    /// Creation time, unix milliseconds.
    pub created_at_ms: u64,
    /// Time of the last change to this record, unix milliseconds.
    pub updated_at_ms: u64,
    /// AES-GCM invocations counted for this version: an upper bound on the
    /// real count (see `Catalogue::add_gcm_invocations`). Stored apart from the
    /// record, so it is not part of the record's JSON.
    #[serde(skip)]
    pub gcm_invocations: u64,
}

/// Largest page a listing returns, whatever the caller asks for.
pub const MAX_PAGE_SIZE: usize = 1000;

/// One page of a listing, ordered by id (or alias); pass `next_page_token` back
/// to get the next page; `None` means this was the last page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    /// At most the requested number of items (and never more than [`MAX_PAGE_SIZE`]).
    pub items: Vec<T>,
    /// Where the next page starts; `None` on the last page.
    pub next_page_token: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_id_validation() {
        let id = KeyId::from_random([0xab; 16]);
        assert_eq!(id.as_str(), "key-abababababababababababababababab");
        assert!(KeyId::parse(id.as_str()).is_ok());
        for bad in [
            "",
            "key-",
            "key-ABABABABABABABABABABABABABABABAB",
            "kex-abababababababababababababababab",
            "key-abababababababababababababababa",
            "key-abababababababababababababababab0",
            "key-ababababababababababababababag",
        ] {
            assert!(KeyId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn wrapped_kek_debug_shows_lengths_never_bytes() {
        let kek = KekHandle::Wrapped {
            root_epoch: 3,
            mechanism: 0x2109,
            blob: vec![0x5a; 40],
            mac: [0xc3; 32],
        };
        let debug = format!("{kek:?}");
        assert_eq!(
            debug,
            "Wrapped { root_epoch: 3, mechanism: 0x2109, blob: [40 bytes], mac: [32 bytes] }"
        );
        for leak in ["5a5a", "c3c3", "90, 90", "195, 195"] {
            assert!(!debug.contains(leak), "{debug}");
        }
        // The alternate form must not leak either.
        assert!(!format!("{kek:#?}").contains("5a5a"));
    }

    /// Golden vectors of the origin field: old records (no field) decode as
    /// `Kms` and re-encode without it; `External` is written as below.
    #[test]
    fn origin_is_absent_for_kms_and_pinned_for_external() {
        let old_key = r#"{"id":"key-000000000000000000000000000000e1","description":"","tags":{},"spec":"AES_256_GCM","state":{"state":"Enabled"},"primary_version":null,"latest_version":0,"rotation":{"policy":"Manual"},"next_rotation_at_ms":null,"created_at_ms":1,"updated_at_ms":1}"#;
        let mut key: KeyRecord = serde_json::from_str(old_key).expect("old key record");
        assert_eq!(key.origin, KeyOrigin::Kms);
        assert_eq!(serde_json::to_string(&key).expect("encode"), old_key);
        key.origin = KeyOrigin::External;
        let external_key = r#"{"id":"key-000000000000000000000000000000e1","description":"","tags":{},"spec":"AES_256_GCM","state":{"state":"Enabled"},"primary_version":null,"latest_version":0,"rotation":{"policy":"Manual"},"next_rotation_at_ms":null,"created_at_ms":1,"updated_at_ms":1,"origin":"EXTERNAL"}"#;
        assert_eq!(serde_json::to_string(&key).expect("encode"), external_key);
        assert_eq!(
            serde_json::from_str::<KeyRecord>(external_key).expect("decode"),
            key
        );

        let old_version = r#"{"key_id":"key-000000000000000000000000000000e1","version":1,"state":{"state":"Enabled"},"kek":{"kind":"Wrapped","root_epoch":1,"mechanism":8457,"blob":"aa","mac":"0000000000000000000000000000000000000000000000000000000000000000"},"created_at_ms":2,"updated_at_ms":2}"#;
        let mut version: VersionRecord = serde_json::from_str(old_version).expect("old version");
        assert_eq!(version.origin, KeyOrigin::Kms);
        assert_eq!(
            serde_json::to_string(&version).expect("encode"),
            old_version
        );
        version.origin = KeyOrigin::External;
        let external_version = r#"{"key_id":"key-000000000000000000000000000000e1","version":1,"state":{"state":"Enabled"},"kek":{"kind":"Wrapped","root_epoch":1,"mechanism":8457,"blob":"aa","mac":"0000000000000000000000000000000000000000000000000000000000000000"},"origin":"EXTERNAL","created_at_ms":2,"updated_at_ms":2}"#;
        assert_eq!(
            serde_json::to_string(&version).expect("encode"),
            external_version
        );
        assert_eq!(
            serde_json::from_str::<VersionRecord>(external_version).expect("decode"),
            version
        );
    }

    /// Golden vectors of every version state's encoding: a format change
    /// must be deliberate (`ReEncryptOnly` is new in issue 18; the others
    /// are pinned so that adding it changed none of them).
    #[test]
    fn version_state_encodings_are_pinned() {
        let cases = [
            (VersionState::Pending, r#"{"state":"Pending"}"#),
            (VersionState::Enabled, r#"{"state":"Enabled"}"#),
            (VersionState::Disabled, r#"{"state":"Disabled"}"#),
            (
                VersionState::ScheduledDestruction { destroy_at_ms: 7 },
                r#"{"state":"ScheduledDestruction","destroy_at_ms":7}"#,
            ),
            (
                VersionState::Destroyed { destroyed_at_ms: 9 },
                r#"{"state":"Destroyed","destroyed_at_ms":9}"#,
            ),
            (VersionState::ReEncryptOnly, r#"{"state":"ReEncryptOnly"}"#),
        ];
        for (state, json) in cases {
            assert_eq!(serde_json::to_string(&state).expect("encode"), json);
            assert_eq!(
                serde_json::from_str::<VersionState>(json).expect("decode"),
                state
            );
        }
        let record = r#"{"key_id":"key-000000000000000000000000000000e1","version":2,"state":{"state":"ReEncryptOnly"},"kek":{"kind":"HsmObject","object_id":"6b2f7632"},"created_at_ms":2,"updated_at_ms":3}"#;
        let decoded: VersionRecord = serde_json::from_str(record).expect("decode record");
        assert_eq!(decoded.state, VersionState::ReEncryptOnly);
        assert_eq!(serde_json::to_string(&decoded).expect("encode"), record);
    }

    #[test]
    fn alias_validation() {
        assert!(Alias::parse("alias/app-1/db_main").is_ok());
        for bad in ["alias/", "alias", "app", "alias/a b", "alias/é"] {
            assert!(Alias::parse(bad).is_err(), "{bad}");
        }
        assert!(Alias::parse(&format!("alias/{}", "a".repeat(250))).is_ok());
        assert!(Alias::parse(&format!("alias/{}", "a".repeat(251))).is_err());
    }
}
