//! The PKCS#11 calls cryptoki 0.12 cannot express: `C_GenerateKey` with
//! array-valued attributes (`CKA_WRAP_TEMPLATE`, `CKA_UNWRAP_TEMPLATE`) in its
//! template, reading such an attribute back (the three-call
//! `C_GetAttributeValue` dance; design note `hierarchy-and-cluster.md` §1.4
//! option a, §1.7 item 8), `C_CreateObject` with such attributes (feature
//! `testing` only: the same known root value on several SoftHSM2 tokens,
//! §1.5.1 note *2), and `C_GetTokenInfo` for a token whose
//! `CK_TOKEN_INFO` cryptoki cannot parse (openCryptoki 3.8 puts "hh:mm:ss"
//! in `utcTime`; `crate::token_info`).
//!
//! This is the only module of kms-hsm with `unsafe` PKCS#11 calls. It calls the
//! already loaded and initialized module through its own function list
//! (`C_GetFunctionList` of the same shared library: `dlopen` of a loaded
//! library returns the loaded copy), on the raw handle of a cryptoki
//! `Session` the caller holds, and never keeps a pointer beyond one call.
//! Every scalar attribute is a cryptoki `Attribute`, converted by cryptoki's
//! own `From<&Attribute> for CK_ATTRIBUTE`; only the nesting is done here.
//!
//! What it must never do: read `CKA_VALUE`, keep a `CK_ATTRIBUTE` array
//! alive past the call it was built for, or call into a module that the
//! caller has not locked against re-initialization (callers hold the
//! module's read lock, `crate::module::Module::read`).

#![allow(unsafe_code)]

use std::ffi::c_void;
use std::path::Path;
use std::ptr;

use cryptoki::context::Function;
use cryptoki::error::Rv;
use cryptoki::object::{Attribute, ObjectHandle};
use cryptoki::session::Session;
use cryptoki_sys::{
    CK_ATTRIBUTE, CK_ATTRIBUTE_TYPE, CK_FUNCTION_LIST, CK_MECHANISM, CK_MECHANISM_TYPE,
    CK_OBJECT_HANDLE, CK_ULONG, CKR_OK,
};

use crate::error::{HsmError, Operation, Result, from_cryptoki};

/// Largest number of attributes accepted in a template attribute read back
/// from the token (a sanity bound on what the token reports).
const MAX_TEMPLATE_ATTRIBUTES: usize = 64;

/// One attribute of a raw template: a plain cryptoki attribute, or an
/// attribute whose value is itself an array of attributes.
#[derive(Debug, Clone)]
pub(crate) enum RawAttribute {
    /// A scalar or byte-string attribute, as cryptoki expresses it.
    Plain(Attribute),
    /// An array-of-attributes attribute (`CKA_WRAP_TEMPLATE`,
    /// `CKA_UNWRAP_TEMPLATE`); the inner attributes in order.
    Template(CK_ATTRIBUTE_TYPE, Vec<Attribute>),
}

/// The loaded PKCS#11 library and its function list, for one call sequence.
pub(crate) struct RawModule {
    /// Keeps the library (and so the function list) mapped while in use.
    _library: cryptoki_sys::Pkcs11,
    functions: CK_FUNCTION_LIST,
}

impl std::fmt::Debug for RawModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RawModule")
    }
}

impl RawModule {
    /// Opens the function list of the module at `path`, which this process
    /// has already loaded and initialized (`crate::module::module`).
    ///
    /// # Errors
    /// `ModuleLoad` if the library cannot be opened or has no
    /// `C_GetFunctionList`; the PKCS#11 error of `C_GetFunctionList`.
    pub(crate) fn load(path: &Path) -> Result<RawModule> {
        let load_error = |reason: String| HsmError::ModuleLoad {
            path: path.to_owned(),
            reason,
        };
        // SAFETY: loading a PKCS#11 library runs its initialisers; this is the
        // library kms already loaded through cryptoki (same canonical path), so
        // dlopen returns the mapped copy and runs nothing new.
        let library =
            unsafe { cryptoki_sys::Pkcs11::new(path) }.map_err(|e| load_error(e.to_string()))?;
        if library.C_GetFunctionList.is_err() {
            return Err(load_error("no C_GetFunctionList symbol".into()));
        }
        let mut list: *mut CK_FUNCTION_LIST = ptr::null_mut();
        // SAFETY: the symbol exists (checked above); `list` is a valid out
        // pointer for the duration of the call.
        let rv = unsafe { library.C_GetFunctionList(&mut list) };
        check(rv, Operation::LoadModule, Function::GetFunctionList)?;
        if list.is_null() {
            return Err(load_error("C_GetFunctionList returned NULL".into()));
        }
        // SAFETY: a successful C_GetFunctionList points `list` at the module's
        // static function table, valid while the library is mapped (we keep
        // `library`); we copy the table of function pointers.
        let functions = unsafe { *list };
        Ok(RawModule {
            _library: library,
            functions,
        })
    }

    /// `C_GenerateKey(mechanism, template)` on `session`, where the template
    /// may hold array-valued attributes. Returns the raw handle of the new
    /// object (callers find it again by `CKA_ID` for a cryptoki handle).
    ///
    /// # Errors
    /// The PKCS#11 error of `C_GenerateKey`, classified as usual.
    pub(crate) fn generate_key(
        &self,
        session: &Session,
        mechanism: CK_MECHANISM_TYPE,
        template: &[RawAttribute],
    ) -> Result<CK_OBJECT_HANDLE> {
        let generate = self.functions.C_GenerateKey.ok_or(HsmError::Wrapper {
            operation: Operation::GenerateKey,
            reason: "the module has no C_GenerateKey".into(),
        })?;
        let built = BuiltTemplate::new(template)?;
        let mut mech = CK_MECHANISM {
            mechanism,
            pParameter: ptr::null_mut(),
            ulParameterLen: 0,
        };
        let mut handle: CK_OBJECT_HANDLE = 0;
        // SAFETY: `built` owns the outer CK_ATTRIBUTE array and every inner
        // array it points to, and every scalar value is owned by `template`,
        // which is borrowed for the whole call; `mech` and `handle` are live
        // locals. The module only reads the template and writes `handle`.
        let rv = unsafe {
            generate(
                session.handle(),
                &mut mech,
                built.outer.as_ptr().cast_mut(),
                built.count()?,
                &mut handle,
            )
        };
        check(rv, Operation::GenerateKey, Function::GenerateKey)?;
        Ok(handle)
    }

    /// `C_CreateObject(template)` on `session`, where the template may hold
    /// array-valued attributes: the test-only import of a known root value
    /// (`crate::testing::import_test_root`). Returns the raw handle of the
    /// new object.
    ///
    /// # Errors
    /// The PKCS#11 error of `C_CreateObject`, classified as usual (reported
    /// as `Operation::GenerateKey`, like the other key creations).
    #[cfg(feature = "testing")]
    pub(crate) fn create_object(
        &self,
        session: &Session,
        template: &[RawAttribute],
    ) -> Result<CK_OBJECT_HANDLE> {
        let create = self.functions.C_CreateObject.ok_or(HsmError::Wrapper {
            operation: Operation::GenerateKey,
            reason: "the module has no C_CreateObject".into(),
        })?;
        let built = BuiltTemplate::new(template)?;
        let mut handle: CK_OBJECT_HANDLE = 0;
        // SAFETY: as in `generate_key`: `built` owns the outer CK_ATTRIBUTE
        // array and every inner array it points to, every scalar value is
        // owned by `template`, borrowed for the whole call, and `handle` is a
        // live local. The module only reads the template and writes `handle`.
        let rv = unsafe {
            create(
                session.handle(),
                built.outer.as_ptr().cast_mut(),
                built.count()?,
                &mut handle,
            )
        };
        check(rv, Operation::GenerateKey, Function::CreateObject)?;
        Ok(handle)
    }

    /// Reads the array-valued attribute `which` of `object` and returns its
    /// inner attributes, or `None` if the object does not carry it (or the
    /// token cannot report it). Never reads `CKA_VALUE` (a template holds
    /// attribute constraints, not key material).
    ///
    /// # Errors
    /// The PKCS#11 error of `C_GetAttributeValue` other than "type invalid"
    /// or "sensitive"; `Wrapper` if the token reports an inner attribute
    /// cryptoki cannot decode or more than 64 of them.
    pub(crate) fn read_template(
        &self,
        session: &Session,
        object: ObjectHandle,
        which: CK_ATTRIBUTE_TYPE,
    ) -> Result<Option<Vec<Attribute>>> {
        let get = self
            .functions
            .C_GetAttributeValue
            .ok_or(HsmError::Wrapper {
                operation: Operation::GetAttributes,
                reason: "the module has no C_GetAttributeValue".into(),
            })?;
        let call = |attribute: &mut CK_ATTRIBUTE| -> Result<bool> {
            // SAFETY: `attribute` is one valid CK_ATTRIBUTE whose pValue is
            // either NULL or an array the caller keeps alive across this call
            // with room for ulValueLen bytes.
            let rv = unsafe { get(session.handle(), object.handle(), attribute, 1) };
            match Rv::from(rv).into_result(Function::GetAttributeValue) {
                Ok(()) => Ok(true),
                Err(cryptoki::error::Error::Pkcs11(
                    cryptoki::error::RvError::AttributeTypeInvalid
                    | cryptoki::error::RvError::AttributeSensitive,
                    _,
                )) => Ok(false),
                Err(e) => Err(from_cryptoki(Operation::GetAttributes, e)),
            }
        };
        let wrapper = |reason: &str| HsmError::Wrapper {
            operation: Operation::GetAttributes,
            reason: reason.into(),
        };

        // 1. The size of the array, in bytes.
        let mut outer = CK_ATTRIBUTE {
            type_: which,
            pValue: ptr::null_mut(),
            ulValueLen: 0,
        };
        if !call(&mut outer)? || outer.ulValueLen == cryptoki_sys::CK_UNAVAILABLE_INFORMATION {
            return Ok(None);
        }
        let bytes = usize::try_from(outer.ulValueLen).map_err(|_| wrapper("length overflow"))?;
        let size = std::mem::size_of::<CK_ATTRIBUTE>();
        if bytes % size != 0 || bytes / size > MAX_TEMPLATE_ATTRIBUTES {
            return Err(wrapper("template attribute has an impossible length"));
        }
        let count = bytes / size;

        // 2. The type and length of each inner attribute.
        let mut inner: Vec<CK_ATTRIBUTE> = (0..count)
            .map(|_| CK_ATTRIBUTE {
                type_: 0,
                pValue: ptr::null_mut(),
                ulValueLen: 0,
            })
            .collect();
        outer.pValue = inner.as_mut_ptr().cast::<c_void>();
        if !call(&mut outer)? {
            return Ok(None);
        }

        // 3. The values, into buffers owned here.
        let mut buffers: Vec<Vec<u8>> = Vec::with_capacity(count);
        for attribute in &inner {
            if attribute.ulValueLen == cryptoki_sys::CK_UNAVAILABLE_INFORMATION {
                return Err(wrapper("token reports an inner attribute without a length"));
            }
            let len =
                usize::try_from(attribute.ulValueLen).map_err(|_| wrapper("length overflow"))?;
            if len > 4096 {
                return Err(wrapper("inner template attribute longer than 4096 bytes"));
            }
            buffers.push(vec![0u8; len]);
        }
        for (attribute, buffer) in inner.iter_mut().zip(buffers.iter_mut()) {
            attribute.pValue = buffer.as_mut_ptr().cast::<c_void>();
        }
        outer.pValue = inner.as_mut_ptr().cast::<c_void>();
        if !call(&mut outer)? {
            return Ok(None);
        }
        // `inner` points into `buffers`, both alive until the end of this function.
        inner
            .iter()
            .map(|raw| {
                Attribute::try_from(*raw)
                    .map_err(|e| wrapper(&format!("undecodable inner attribute: {e}")))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}

/// A template converted to `CK_ATTRIBUTE`s. The inner arrays are allocated
/// first and never touched again, so the pointers into them stay valid as
/// long as this value lives; scalar values point into the caller's
/// `Attribute`s, which must outlive it (enforced by the borrow in `new`).
struct BuiltTemplate<'a> {
    outer: Vec<CK_ATTRIBUTE>,
    /// Owns the arrays the outer `Template` entries point to.
    _inner: Vec<Vec<CK_ATTRIBUTE>>,
    _borrow: std::marker::PhantomData<&'a [RawAttribute]>,
}

impl<'a> BuiltTemplate<'a> {
    fn new(template: &'a [RawAttribute]) -> Result<BuiltTemplate<'a>> {
        let inner: Vec<Vec<CK_ATTRIBUTE>> = template
            .iter()
            .map(|a| match a {
                RawAttribute::Plain(_) => Vec::new(),
                RawAttribute::Template(_, attributes) => {
                    attributes.iter().map(CK_ATTRIBUTE::from).collect()
                }
            })
            .collect();
        let mut outer = Vec::with_capacity(template.len());
        for (attribute, array) in template.iter().zip(&inner) {
            outer.push(match attribute {
                RawAttribute::Plain(plain) => CK_ATTRIBUTE::from(plain),
                RawAttribute::Template(kind, _) => CK_ATTRIBUTE {
                    type_: *kind,
                    // The module only reads templates; cast_mut is for the C signature.
                    pValue: array.as_ptr().cast_mut().cast::<c_void>(),
                    ulValueLen: CK_ULONG::try_from(std::mem::size_of_val(array.as_slice()))
                        .map_err(|_| HsmError::InvalidArgument("template too large"))?,
                },
            });
        }
        Ok(BuiltTemplate {
            outer,
            _inner: inner,
            _borrow: std::marker::PhantomData,
        })
    }

    fn count(&self) -> Result<CK_ULONG> {
        CK_ULONG::try_from(self.outer.len())
            .map_err(|_| HsmError::InvalidArgument("template too large"))
    }
}

/// Turns a raw return code into the layer's error for `operation`.
impl RawModule {
    /// `C_GetTokenInfo(slot_id)`: the raw `CK_TOKEN_INFO`, whatever its
    /// fields hold (callers read only what they need and trust none of it).
    ///
    /// # Errors
    /// `Wrapper` if the function list has no `C_GetTokenInfo`; the PKCS#11
    /// error of the call (e.g. `CKR_TOKEN_NOT_PRESENT`).
    pub(crate) fn token_info(&self, slot_id: u64) -> Result<cryptoki_sys::CK_TOKEN_INFO> {
        let get_token_info = self
            .functions
            .C_GetTokenInfo
            .ok_or_else(|| HsmError::Wrapper {
                operation: Operation::TokenInfo,
                reason: "the module's function list has no C_GetTokenInfo".to_owned(),
            })?;
        let mut info = cryptoki_sys::CK_TOKEN_INFO::default();
        // SAFETY: `info` is a properly sized and aligned, writable
        // CK_TOKEN_INFO that outlives the call; the module is initialized and
        // cannot be finalized concurrently because the caller holds the
        // module's read lock (`crate::module`); C_GetTokenInfo is thread-safe
        // in a module initialized with CKF_OS_LOCKING_OK.
        let rv = unsafe { get_token_info(slot_id, &mut info) };
        check(rv, Operation::TokenInfo, Function::GetTokenInfo)?;
        Ok(info)
    }
}

fn check(rv: cryptoki_sys::CK_RV, operation: Operation, function: Function) -> Result<()> {
    if rv == CKR_OK {
        return Ok(());
    }
    Rv::from(rv)
        .into_result(function)
        .map_err(|e| from_cryptoki(operation, e))
}
