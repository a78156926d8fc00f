//! Root keys of the wrapped-key hierarchy: the one attribute table a root is
//! created from and read back against, the key ceremony that creates it,
//! and the behavioural start-up probe that decides whether a root may be
//! used (design note `hierarchy-and-cluster.md` §1.5.1, §1.5.5, §1.7).
//!
//! A root is an AES-256 token object `kms-root/<epoch>` that can only wrap
//! and unwrap with `CKM_AES_KEY_WRAP`; its `CKA_UNWRAP_TEMPLATE` is the
//! security boundary that stops a PIN holder from unwrapping a blob as a
//! readable key (§1.7 item 1). cryptoki cannot express that attribute, so
//! creation and template read-back go through `raw`.
//!
//! Layout: this file holds the variants, the root table and the ceremony;
//! `probe` the behavioural start-up probe; `inspect` finding roots and
//! reporting their attributes.
//!
//! What it must never do: read `CKA_VALUE`, leave a throw-away object of the
//! probe behind, or accept a root whose template did not read back exactly.

mod inspect;
mod probe;

use std::path::Path;

use cryptoki::mechanism::MechanismType;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki_sys::{CKA_UNWRAP_TEMPLATE, CKA_WRAP_TEMPLATE};

use crate::config::Pin;
use crate::error::{HsmError, Operation, Result, from_cryptoki};
use crate::objects::ObjectId;
use crate::raw::{RawAttribute, RawModule};
use inspect::find_by_id;
pub(crate) use inspect::{find_root, root_epochs, root_info};
use probe::verify_root as probe_root;
pub(crate) use probe::verify_root;

/// Which trust model a root implements (design note §1.5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RootVariant {
    /// Variant T: the root is `CKA_TRUSTED` (set by the security officer)
    /// and its unwrap template forces `CKA_WRAP_WITH_TRUSTED=true`, so a
    /// working key can leave the HSM only wrapped under a trusted root. Root
    /// rotation (re-wrapping) is possible.
    Trusted,
    /// Variant N, for HSMs without trusted wrapping: the root is not trusted
    /// and its unwrap template forces `CKA_EXTRACTABLE=false`, so a working
    /// key can never leave the HSM again. Root rotation is impossible.
    NonExtractable,
}

/// How to create a root in the key ceremony (`create_root`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RootSpec {
    /// The epoch; the root's `CKA_ID` and `CKA_LABEL` are `kms-root/<epoch>`.
    pub epoch: u32,
    /// Which variant to create.
    pub variant: RootVariant,
    /// `CKA_PRIVATE` of the root. True on real HSMs. SoftHSM2 does not let
    /// the security officer create private objects, so a variant-T root
    /// there must be public (stored unencrypted in the token file; design
    /// note §1.3, §1.5.1 note *1). Variant N is created by the user and can
    /// be private on any token.
    pub private: bool,
}

impl RootSpec {
    /// The spec that works on SoftHSM2 2.6.1: variant T public (SO-created),
    /// variant N private (user-created).
    pub fn for_softhsm(epoch: u32, variant: RootVariant) -> RootSpec {
        RootSpec {
            epoch,
            variant,
            private: variant == RootVariant::NonExtractable,
        }
    }
}

/// The `CKA_ID` (and `CKA_LABEL`) of the root of `epoch`: `kms-root/<epoch>`.
pub fn root_id(epoch: u32) -> ObjectId {
    ObjectId::from_trusted(format!("kms-root/{epoch}").into_bytes())
}

/// A deliberate defect in a root, for tests that show the probe refuses it.
#[cfg(feature = "testing")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RootDefect {
    /// No `CKA_UNWRAP_TEMPLATE` at all (design note §1.7 item 1).
    NoUnwrapTemplate,
    /// `CKA_DECRYPT=true` (and `CKA_ENCRYPT=true`): the wrap/decrypt attack (§1.7 item 3).
    DecryptAllowed,
    /// Variant T attributes but without `CKA_TRUSTED`.
    NotTrusted,
}

/// Internal form of the optional defect, so the table has one shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Defect {
    None,
    NoUnwrapTemplate,
    DecryptAllowed,
    NotTrusted,
}

/// One row of the root table.
struct RootRow {
    value: RawAttribute,
    name: &'static str,
}

fn plain(value: Attribute, name: &'static str) -> RootRow {
    RootRow {
        value: RawAttribute::Plain(value),
        name,
    }
}

/// The root's `CKA_WRAP_TEMPLATE` (§1.5.1): it wraps only secret session
/// keys that are sensitive and (variant T) exportable only under a trusted key.
pub(crate) fn wrap_template(variant: RootVariant) -> Vec<Attribute> {
    let mut template = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Token(false),
        Attribute::Sensitive(true),
    ];
    if variant == RootVariant::Trusted {
        template.push(Attribute::WrapWithTrusted(true));
    }
    template
}

/// The root's `CKA_UNWRAP_TEMPLATE` (§1.5.1): everything unwrapped under the
/// root is a private, sensitive session object that cannot wrap, unwrap or
/// derive, and (T) leaves the HSM only under a trusted key or (N) never.
pub(crate) fn unwrap_template(variant: RootVariant) -> Vec<Attribute> {
    let mut template = vec![
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
    ];
    match variant {
        RootVariant::Trusted => template.push(Attribute::WrapWithTrusted(true)),
        RootVariant::NonExtractable => template.push(Attribute::Extractable(false)),
    }
    template.extend([
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
    ]);
    template
}

/// THE root table: the generation template is every row, in order
/// (`CKA_MODIFIABLE=false` last), and the read-back check is every row.
fn root_rows(spec: &RootSpec, defect: Defect) -> Vec<RootRow> {
    let id = root_id(spec.epoch);
    let crypt = defect == Defect::DecryptAllowed;
    let mut rows = vec![
        plain(Attribute::Class(ObjectClass::SECRET_KEY), "CKA_CLASS"),
        plain(Attribute::KeyType(KeyType::AES), "CKA_KEY_TYPE"),
        plain(Attribute::ValueLen(32.into()), "CKA_VALUE_LEN"),
        plain(Attribute::Token(true), "CKA_TOKEN"),
        plain(Attribute::Private(spec.private), "CKA_PRIVATE"),
        plain(Attribute::Sensitive(true), "CKA_SENSITIVE"),
        plain(Attribute::Extractable(false), "CKA_EXTRACTABLE"),
    ];
    if spec.variant == RootVariant::Trusted && defect != Defect::NotTrusted {
        rows.push(plain(Attribute::Trusted(true), "CKA_TRUSTED"));
    }
    rows.extend([
        plain(Attribute::Copyable(false), "CKA_COPYABLE"),
        plain(Attribute::Destroyable(true), "CKA_DESTROYABLE"),
        plain(Attribute::Wrap(true), "CKA_WRAP"),
        plain(Attribute::Unwrap(true), "CKA_UNWRAP"),
        plain(Attribute::Encrypt(crypt), "CKA_ENCRYPT"),
        plain(Attribute::Decrypt(crypt), "CKA_DECRYPT"),
        plain(Attribute::Sign(false), "CKA_SIGN"),
        plain(Attribute::Verify(false), "CKA_VERIFY"),
        plain(Attribute::Derive(false), "CKA_DERIVE"),
        plain(
            Attribute::AllowedMechanisms(vec![MechanismType::AES_KEY_WRAP]),
            "CKA_ALLOWED_MECHANISMS",
        ),
        RootRow {
            value: RawAttribute::Template(CKA_WRAP_TEMPLATE, wrap_template(spec.variant)),
            name: "CKA_WRAP_TEMPLATE",
        },
    ]);
    if defect != Defect::NoUnwrapTemplate {
        rows.push(RootRow {
            value: RawAttribute::Template(CKA_UNWRAP_TEMPLATE, unwrap_template(spec.variant)),
            name: "CKA_UNWRAP_TEMPLATE",
        });
    }
    rows.extend([
        plain(Attribute::Id(id.as_bytes().to_vec()), "CKA_ID"),
        plain(Attribute::Label(id.as_bytes().to_vec()), "CKA_LABEL"),
        // Last: SoftHSM2 refuses attributes after it in some templates (§1.7 item 5).
        plain(Attribute::Modifiable(false), "CKA_MODIFIABLE"),
    ]);
    rows
}

/// Creates the root key `kms-root/<epoch>` on the token labelled
/// `token_label` in an operator ceremony (design note §1.5.1): logs in as
/// the security officer (variant T, which sets `CKA_TRUSTED`) or as the user
/// (variant N) with `pin`, generates the AES-256 key with its wrap and
/// unwrap templates, reads every attribute back (templates included), and
/// logs out. A root that does not read back as the table says is destroyed
/// and refused.
///
/// No other session of this process may be logged in to the token as the
/// other user type (PKCS#11 allows one user type per application): run the
/// ceremony before opening an `Hsm` on the token, or from another process.
///
/// # Errors
/// `ObjectExists` if the epoch is taken; `TokenNotFound`; `PinRejected`;
/// `TemplateViolation` naming the attribute that did not read back (the
/// object is destroyed again); `ModuleLoad`; or the PKCS#11 error of the
/// call that failed (e.g. `CKR_USER_ANOTHER_ALREADY_LOGGED_IN` from `C_Login`).
pub fn create_root(
    module_path: &Path,
    token_label: &str,
    pin: &Pin,
    spec: &RootSpec,
) -> Result<()> {
    create(module_path, token_label, pin, spec, Defect::None, false)
}

/// The first root of a token (`kms hsm init-root`, dev mode's first run):
/// as [`create_root`], but refused when the token already holds any root
/// the logged-in user can see, so that an operator cannot add a root of
/// another variant or out of epoch order by mistake (root rotation adds
/// the later ones). A root created with `CKA_PRIVATE` is invisible to the
/// security officer's session, so it is not seen by a variant-T ceremony.
///
/// # Errors
/// [`HsmError::RootExists`] naming the epochs found; otherwise as
/// [`create_root`].
pub fn init_root(module_path: &Path, token_label: &str, pin: &Pin, spec: &RootSpec) -> Result<()> {
    create(module_path, token_label, pin, spec, Defect::None, true)
}

/// What `rotate_root` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RotatedRoot {
    /// The epoch that was the highest (active) one before.
    pub previous: u32,
    /// The epoch of the new root, `previous + 1`: the active one from now on.
    pub epoch: u32,
    /// The variant of both (always `RootVariant::Trusted`: variant N cannot
    /// be rotated).
    pub variant: RootVariant,
}

/// Root rotation's key ceremony (design note §1.5.3 "Root rotation"): adds
/// the root `kms-root/<e+1>`, where `e` is the highest epoch on the token,
/// with the variant of root `e`, and verifies it by behaviour.
///
/// 1. As the user (`user_pin`): finds the highest epoch `e` and runs the
///    start-up probe on it, which detects its variant. Variant N is refused
///    (`RootRotationUnsupported`): its working keys are non-extractable,
///    so no version could ever be re-wrapped under the new root.
/// 2. As the security officer (`so_pin`): creates root `e+1` exactly as
///    `create_root` does (variant T, `CKA_PRIVATE = private`; table read back).
/// 3. As the user again: runs the probe on root `e+1` expecting variant T;
///    a root that fails it is destroyed again and refused.
///
/// The user PIN is needed because the probe unwraps (the unwrap template
/// forces `CKA_PRIVATE=true`), which only a logged-in user can do. Logs
/// out after each step. Safe while a kms server uses the token from another
/// process (PKCS#11 logins are per application); the server starts using
/// the new root at its next `kms admin reload`/SIGHUP or root check.
///
/// # Errors
/// `NoRoot` if the token has none; `RootRotationUnsupported` for variant N;
/// `RootCheckFailed` if root `e` (or the new root, then destroyed) fails
/// the probe; `PinRejected` for a wrong PIN; `ObjectExists` if `e+1` exists
/// (another ceremony raced this one); `TemplateViolation`; `TokenNotFound`;
/// `ModuleLoad`; `InvalidArgument` if `e` is `u32::MAX`; or the PKCS#11
/// error of the call that failed.
pub fn rotate_root(
    module_path: &Path,
    token_label: &str,
    so_pin: &Pin,
    user_pin: &Pin,
    private: bool,
) -> Result<RotatedRoot> {
    let module = crate::module::module(module_path)?;
    let state = module.read();
    let context = state.context()?;
    let slot = crate::token::find_token(context, token_label, module_path)?;
    let session = context
        .open_rw_session(slot)
        .map_err(|e| from_cryptoki(Operation::OpenSession, e))?;
    let as_user = |work: &dyn Fn() -> Result<(u32, RootVariant)>| {
        session
            .login(UserType::User, Some(&user_pin.to_auth_pin()))
            .map_err(|e| from_cryptoki(Operation::Login, e))?;
        let result = work();
        let _ = session.logout();
        result
    };
    let (previous, variant) = as_user(&|| {
        let epochs = inspect::root_epochs(&session)?;
        let epoch = *epochs.last().ok_or(HsmError::NoRoot)?;
        Ok((epoch, probe_root(&session, context, slot, epoch, None)?))
    })?;
    if variant != RootVariant::Trusted {
        return Err(HsmError::RootRotationUnsupported { epoch: previous });
    }
    let epoch = previous
        .checked_add(1)
        .ok_or(HsmError::InvalidArgument("root epochs are exhausted"))?;
    let spec = RootSpec {
        epoch,
        variant,
        private,
    };
    session
        .login(UserType::So, Some(&so_pin.to_auth_pin()))
        .map_err(|e| from_cryptoki(Operation::Login, e))?;
    let created = generate_and_check(module.path(), &session, &spec, Defect::None);
    let _ = session.logout();
    created?;
    as_user(&|| {
        let verified = probe_root(&session, context, slot, epoch, Some(variant));
        if verified.is_err() {
            // Never leave a root that failed the probe where the server
            // would find it as the highest epoch.
            if let Ok(handle) = find_root(&session, epoch) {
                let _ = session.destroy_object(handle);
            }
        }
        verified.map(|v| (epoch, v))
    })?;
    Ok(RotatedRoot {
        previous,
        epoch,
        variant,
    })
}

/// `create_root` with a deliberate defect, so tests can show that
/// `KeyHolder::verify_root` refuses such roots. Never for production use.
///
/// # Errors
/// As `create_root`.
#[cfg(feature = "testing")]
pub fn create_defective_root_for_tests(
    module_path: &Path,
    token_label: &str,
    pin: &Pin,
    spec: &RootSpec,
    defect: RootDefect,
) -> Result<()> {
    let defect = match defect {
        RootDefect::NoUnwrapTemplate => Defect::NoUnwrapTemplate,
        RootDefect::DecryptAllowed => Defect::DecryptAllowed,
        RootDefect::NotTrusted => Defect::NotTrusted,
    };
    create(module_path, token_label, pin, spec, defect, false)
}

/// The test-only import behind `crate::testing::import_test_root`: as the
/// security officer (`so_pin`), creates the variant-T root of `epoch` with
/// `C_CreateObject` from the root table (the same rows, in the same order,
/// as a generated root, with `CKA_VALUE = value` in place of
/// `CKA_VALUE_LEN`, which PKCS#11 forbids in `C_CreateObject` for AES) and
/// reads every row back; then, as the user (`user_pin`), runs the start-up
/// probe on it expecting variant T. A root that fails either is destroyed
/// again. Public (`CKA_PRIVATE=false`): SoftHSM2's SO cannot create private
/// objects (design note §1.5.1 note *1).
#[cfg(feature = "testing")]
pub(crate) fn import_root_for_tests(
    module_path: &Path,
    token_label: &str,
    so_pin: &Pin,
    user_pin: &Pin,
    epoch: u32,
    value: &[u8; 32],
) -> Result<()> {
    let spec = RootSpec::for_softhsm(epoch, RootVariant::Trusted);
    let id = root_id(epoch);
    let module = crate::module::module(module_path)?;
    let state = module.read();
    let context = state.context()?;
    let slot = crate::token::find_token(context, token_label, module_path)?;
    let session = context
        .open_rw_session(slot)
        .map_err(|e| from_cryptoki(Operation::OpenSession, e))?;
    session
        .login(UserType::So, Some(&so_pin.to_auth_pin()))
        .map_err(|e| from_cryptoki(Operation::Login, e))?;
    let imported = (|| {
        if !find_by_id(&session, &id)?.is_empty() {
            return Err(HsmError::ObjectExists { id: id.to_string() });
        }
        let rows = root_rows(&spec, Defect::None);
        let mut template: Vec<RawAttribute> = rows
            .iter()
            .map(|r| match &r.value {
                RawAttribute::Plain(Attribute::ValueLen(_)) => {
                    RawAttribute::Plain(Attribute::Value(value.to_vec()))
                }
                other => other.clone(),
            })
            .collect();
        let raw = RawModule::load(module.path())?;
        let created = raw.create_object(&session, &template);
        // The template's copy of the value is the only one this crate made.
        for attribute in &mut template {
            if let RawAttribute::Plain(Attribute::Value(bytes)) = attribute {
                zeroize::Zeroize::zeroize(bytes);
            }
        }
        created?;
        let handle = match find_by_id(&session, &id)?.as_slice() {
            [handle] => *handle,
            [] => return Err(HsmError::ObjectNotFound { id: id.to_string() }),
            many => {
                return Err(HsmError::ObjectAmbiguous {
                    id: id.to_string(),
                    count: many.len(),
                });
            }
        };
        if let Err(violation) = check_root_attributes(&raw, &session, handle, &rows, &id) {
            let _ = session.destroy_object(handle);
            return Err(violation);
        }
        Ok(())
    })();
    let _ = session.logout();
    imported?;
    session
        .login(UserType::User, Some(&user_pin.to_auth_pin()))
        .map_err(|e| from_cryptoki(Operation::Login, e))?;
    let verified = probe_root(&session, context, slot, epoch, Some(RootVariant::Trusted));
    if verified.is_err() {
        // Never leave a root that the server would refuse at start-up.
        if let Ok(handle) = find_root(&session, epoch) {
            let _ = session.destroy_object(handle);
        }
    }
    let _ = session.logout();
    verified.map(drop)
}

fn create(
    module_path: &Path,
    token_label: &str,
    pin: &Pin,
    spec: &RootSpec,
    defect: Defect,
    only_if_first: bool,
) -> Result<()> {
    let module = crate::module::module(module_path)?;
    let state = module.read();
    let context = state.context()?;
    let slot = crate::token::find_token(context, token_label, module_path)?;
    let session = context
        .open_rw_session(slot)
        .map_err(|e| from_cryptoki(Operation::OpenSession, e))?;
    let user = match spec.variant {
        RootVariant::Trusted => UserType::So,
        RootVariant::NonExtractable => UserType::User,
    };
    session
        .login(user, Some(&pin.to_auth_pin()))
        .map_err(|e| from_cryptoki(Operation::Login, e))?;
    let result = match inspect::root_epochs(&session) {
        Ok(epochs) if only_if_first && !epochs.is_empty() => Err(HsmError::RootExists { epochs }),
        Ok(_) => generate_and_check(module.path(), &session, spec, defect),
        Err(e) => Err(e),
    };
    let _ = session.logout();
    result
}

fn generate_and_check(
    module_path: &Path,
    session: &Session,
    spec: &RootSpec,
    defect: Defect,
) -> Result<()> {
    let id = root_id(spec.epoch);
    if !find_by_id(session, &id)?.is_empty() {
        return Err(HsmError::ObjectExists { id: id.to_string() });
    }
    let rows = root_rows(spec, defect);
    let template: Vec<RawAttribute> = rows.iter().map(|r| r.value.clone()).collect();
    let raw = RawModule::load(module_path)?;
    raw.generate_key(session, cryptoki_sys::CKM_AES_KEY_GEN, &template)?;
    let handle = match find_by_id(session, &id)?.as_slice() {
        [handle] => *handle,
        [] => return Err(HsmError::ObjectNotFound { id: id.to_string() }),
        many => {
            return Err(HsmError::ObjectAmbiguous {
                id: id.to_string(),
                count: many.len(),
            });
        }
    };
    if let Err(violation) = check_root_attributes(&raw, session, handle, &rows, &id) {
        // Never leave a root that breaks the table on the token.
        let _ = session.destroy_object(handle);
        return Err(violation);
    }
    Ok(())
}

/// Reads back every row of the table (templates through `raw`).
fn check_root_attributes(
    raw: &RawModule,
    session: &Session,
    handle: ObjectHandle,
    rows: &[RootRow],
    id: &ObjectId,
) -> Result<()> {
    let plain_types: Vec<AttributeType> = rows
        .iter()
        .filter_map(|r| match &r.value {
            RawAttribute::Plain(a) => Some(a.attribute_type()),
            RawAttribute::Template(..) => None,
        })
        .collect();
    let read_back = session
        .get_attributes(handle, &plain_types)
        .map_err(|e| from_cryptoki(Operation::GetAttributes, e))?;
    for row in rows {
        let ok = match &row.value {
            RawAttribute::Plain(expected) => {
                let kind = expected.attribute_type();
                read_back.iter().find(|a| a.attribute_type() == kind) == Some(expected)
            }
            RawAttribute::Template(kind, expected) => {
                same_set(raw.read_template(session, handle, *kind)?, expected)
            }
        };
        if !ok {
            return Err(HsmError::TemplateViolation {
                id: id.to_string(),
                attribute: row.name,
                expected: "the value of the root table (design note §1.5.1)",
            });
        }
    }
    Ok(())
}

/// Whether a template read back holds exactly `expected` (order aside: a
/// token may report it in its own order).
fn same_set(actual: Option<Vec<Attribute>>, expected: &[Attribute]) -> bool {
    let Some(actual) = actual else {
        return false;
    };
    actual.len() == expected.len() && expected.iter().all(|e| actual.contains(e))
}
