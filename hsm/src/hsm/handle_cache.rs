//! The object-handle cache: CKA_ID → object handle, so that the hot path
//! never searches the token once warm.
//!
//! A handle is only valid in the module generation it was found in (a
//! re-initialization may renumber every handle), so entries carry their
//! generation and the whole cache is dropped whenever a session or the device
//! is lost. This module never opens sessions; it searches on the session the
//! caller already holds.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use parking_lot::RwLock;

use super::Hsm;
use crate::error::{HsmError, Operation, Result, ReturnCode, from_cryptoki};
use crate::module::ModuleState;
use crate::objects::ObjectId;

/// Object handles by CKA_ID, for one module generation.
#[derive(Debug, Default)]
pub(super) struct HandleCache {
    inner: RwLock<Generation>,
}

#[derive(Debug, Default)]
struct Generation {
    generation: u64,
    handles: HashMap<ObjectId, ObjectHandle>,
}

impl HandleCache {
    /// The cached handle of `id`, if it was found in `generation`.
    fn get(&self, id: &ObjectId, generation: u64) -> Option<ObjectHandle> {
        let cache = self.inner.read();
        if cache.generation != generation {
            return None;
        }
        cache.handles.get(id).copied()
    }

    /// Remembers `handle` for `id`, forgetting every older generation's entry.
    fn insert(&self, id: &ObjectId, handle: ObjectHandle, generation: u64) {
        let mut cache = self.inner.write();
        if cache.generation != generation {
            cache.handles.clear();
            cache.generation = generation;
        }
        cache.handles.insert(id.clone(), handle);
    }

    /// Forgets `id` (its object was destroyed).
    pub(super) fn remove(&self, id: &ObjectId) {
        self.inner.write().handles.remove(id);
    }

    /// Forgets everything (a session or the device was lost).
    pub(super) fn clear(&self) {
        self.inner.write().handles.clear();
    }
}

impl Hsm {
    /// The cached object handle for `id`, searching the token only on a miss.
    pub(super) fn handle(
        &self,
        session: &Session,
        state: &ModuleState,
        id: &ObjectId,
    ) -> Result<ObjectHandle> {
        if let Some(handle) = self.handles.get(id, state.generation()) {
            return Ok(handle);
        }
        let found = self.find(session, id)?;
        let handle = match found.as_slice() {
            [handle] => *handle,
            [] if self.token_storage_missing() => {
                // SoftHSM2 answers searches from its directory: with the
                // directory gone every object is "missing". That is the
                // device going away (fail closed, recover), not a lost key.
                return Err(HsmError::Unavailable {
                    operation: Operation::FindObjects,
                    code: ReturnCode::token_not_present(),
                });
            }
            [] => return Err(HsmError::ObjectNotFound { id: id.to_string() }),
            many => {
                return Err(HsmError::ObjectAmbiguous {
                    id: id.to_string(),
                    count: many.len(),
                });
            }
        };
        self.handles.insert(id, handle, state.generation());
        Ok(handle)
    }

    /// Every secret-key object carrying CKA_ID `id` (a token search: counted,
    /// because it must not happen on the hot path).
    pub(super) fn find(&self, session: &Session, id: &ObjectId) -> Result<Vec<ObjectHandle>> {
        self.object_searches.fetch_add(1, Ordering::Relaxed);
        session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Id(id.as_bytes().to_vec()),
            ])
            .map_err(|e| from_cryptoki(Operation::FindObjects, e))
    }
}
