//! The behavioural start-up probe of design note `hierarchy-and-cluster.md`
//! §1.5.5: whether a root may be used, decided by what it lets a PIN holder
//! do, not by reading its templates, so that it works on any vendor.
//! Every object the probe makes (or that an attack it plays made) is
//! destroyed before it returns.

use cryptoki::context::Pkcs11;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::slot::Slot;

use super::{RootVariant, find_root};
use crate::error::{HsmError, Operation, Result, from_cryptoki};
use crate::objects::KeyPurpose;
use crate::wrapped;

/// Names of the probe's checks, as `HsmError::RootCheckFailed` reports them.
pub(crate) mod check {
    pub const MECHANISM: &str = "CKM_AES_KEY_WRAP advertises wrap and unwrap";
    pub const TRUSTED: &str =
        "a WRAP_WITH_TRUSTED version wraps under the root (the root is CKA_TRUSTED)";
    pub const WRAPS: &str = "a version wraps under the root";
    pub const UNWRAPS: &str = "the blob unwraps into a working key that reads back as its template";
    pub const NOT_UNDER_ORDINARY: &str = "a version does not wrap under an ordinary user key";
    pub const NOT_SENSITIVE: &str = "unwrapping a blob as non-sensitive is refused";
    pub const NOT_TRUSTED_ONLY: &str = "unwrapping a blob with WRAP_WITH_TRUSTED=false is refused";
    pub const EXTRACTABLE: &str = "unwrapping a blob as extractable is refused";
    pub const TOKEN: &str = "unwrapping a blob as a token object is refused";
    pub const DECRYPT: &str = "C_Decrypt with the root is refused";
    pub const ENCRYPT: &str = "C_Encrypt with the root is refused";
    pub const NO_CRYPT_FLAGS: &str = "the root reads back CKA_ENCRYPT=false and CKA_DECRYPT=false";
}

/// Session objects destroyed when the probe returns, whatever happens.
struct Scratch<'s> {
    session: &'s Session,
    objects: Vec<ObjectHandle>,
}

impl Scratch<'_> {
    fn keep(&mut self, handle: ObjectHandle) -> ObjectHandle {
        self.objects.push(handle);
        handle
    }
}

impl Drop for Scratch<'_> {
    fn drop(&mut self) {
        for handle in self.objects.drain(..) {
            // Best effort: the objects are session objects and die with the
            // session anyway.
            let _ = self.session.destroy_object(handle);
        }
    }
}

/// The behavioural start-up probe of design note §1.5.5, on a logged-in
/// user `session`: decides whether the root of `epoch` may be used, without
/// reading its templates, so that it works on any vendor.
///
/// With `expected = Some(v)` the root must implement variant `v`; with
/// `None` the variant is detected (T if a `WRAP_WITH_TRUSTED` version wraps
/// under it, else N) and then fully checked. Every throw-away object is
/// destroyed, including any an attack unwrap that should have failed did
/// create.
///
/// # Errors
/// `RootCheckFailed` naming the first check that failed;
/// `ObjectNotFound`/`ObjectAmbiguous` for the root; `Unavailable` or the
/// PKCS#11 error of a call that is not itself a check.
pub(crate) fn verify_root(
    session: &Session,
    context: &Pkcs11,
    slot: Slot,
    epoch: u32,
    expected: Option<RootVariant>,
) -> Result<RootVariant> {
    let failed = |check: &'static str| HsmError::RootCheckFailed { epoch, check };
    let info = context
        .get_mechanism_list(slot)
        .map_err(|e| from_cryptoki(Operation::MechanismList, e))?;
    if !info.contains(&MechanismType::AES_KEY_WRAP) {
        return Err(failed(check::MECHANISM));
    }
    let info = context
        .get_mechanism_info(slot, MechanismType::AES_KEY_WRAP)
        .map_err(|e| from_cryptoki(Operation::MechanismList, e))?;
    if !(info.wrap() && info.unwrap()) {
        return Err(failed(check::MECHANISM));
    }
    let root = find_root(session, epoch)?;
    let mut scratch = Scratch {
        session,
        objects: Vec::new(),
    };
    let purpose = KeyPurpose::Kek;

    // Which variant, and a blob of a throw-away version under the root.
    let mut detected = None;
    if expected != Some(RootVariant::NonExtractable) {
        let version = scratch.keep(wrapped::generate_raw(
            session,
            purpose,
            RootVariant::Trusted,
        )?);
        match session.wrap_key(&Mechanism::AesKeyWrap, root, version) {
            Ok(blob) => detected = Some((RootVariant::Trusted, blob, Some(version))),
            Err(_) if expected == Some(RootVariant::Trusted) => {
                return Err(failed(check::TRUSTED));
            }
            Err(_) => {}
        }
    }
    let (variant, blob, trusted_version) = match detected {
        Some(found) => found,
        None => {
            let version = scratch.keep(wrapped::generate_raw(
                session,
                purpose,
                RootVariant::NonExtractable,
            )?);
            let blob = session
                .wrap_key(&Mechanism::AesKeyWrap, root, version)
                .map_err(|_| failed(check::WRAPS))?;
            (RootVariant::NonExtractable, blob, None)
        }
    };

    // The blob unwraps under the working template and reads back as it says.
    let working = match wrapped::unwrap_raw(session, root, &blob, purpose, variant, None) {
        Ok(handle) => scratch.keep(handle),
        Err(_) => return Err(failed(check::UNWRAPS)),
    };
    if wrapped::check_working(session, working, purpose, variant, wrapped::Stage::Unwrap).is_err() {
        return Err(failed(check::UNWRAPS));
    }

    // An ordinary user key (wrap/unwrap, no trust) must not be able to
    // export a version: the generated one (T) or a working copy (T and N).
    let ordinary = scratch.keep(
        session
            .generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::ValueLen(32.into()),
                    Attribute::Token(false),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Wrap(true),
                    Attribute::Unwrap(true),
                ],
            )
            .map_err(|e| from_cryptoki(Operation::GenerateKey, e))?,
    );
    for exported in trusted_version.into_iter().chain([working]) {
        if session
            .wrap_key(&Mechanism::AesKeyWrap, ordinary, exported)
            .is_ok()
        {
            return Err(failed(check::NOT_UNDER_ORDINARY));
        }
    }

    // The attacks of §1.5.5: each unwrap must fail; anything it made is destroyed.
    let mut attacks = vec![(Attribute::Sensitive(false), check::NOT_SENSITIVE)];
    match variant {
        RootVariant::Trusted => {
            attacks.push((Attribute::WrapWithTrusted(false), check::NOT_TRUSTED_ONLY));
        }
        RootVariant::NonExtractable => {
            attacks.push((Attribute::Extractable(true), check::EXTRACTABLE));
        }
    }
    attacks.push((Attribute::Token(true), check::TOKEN));
    for (altered, name) in attacks {
        if let Ok(handle) =
            wrapped::unwrap_raw(session, root, &blob, purpose, variant, Some(&altered))
        {
            scratch.keep(handle);
            return Err(failed(name));
        }
    }

    // The wrap/decrypt attack (§1.7 item 3): the root must not decrypt its
    // own blobs nor encrypt, with any mechanism.
    // KW decrypts whole blobs; ECB any multiple of 16 bytes.
    for (mechanism, input) in [
        (Mechanism::AesKeyWrap, &blob[..]),
        (Mechanism::AesEcb, &blob[..32]),
    ] {
        if session.decrypt(&mechanism, root, input).is_ok() {
            return Err(failed(check::DECRYPT));
        }
        if session.encrypt(&mechanism, root, &blob[..32]).is_ok() {
            return Err(failed(check::ENCRYPT));
        }
    }
    let flags = session
        .get_attributes(root, &[AttributeType::Encrypt, AttributeType::Decrypt])
        .map_err(|e| from_cryptoki(Operation::GetAttributes, e))?;
    let off = |want: Attribute| flags.contains(&want);
    if !(off(Attribute::Encrypt(false)) && off(Attribute::Decrypt(false))) {
        return Err(failed(check::NO_CRYPT_FLAGS));
    }
    drop(scratch);
    Ok(variant)
}
