//! The process-wide registry of loaded PKCS#11 modules.
//!
//! C_Initialize may run once per module per process (a second one crashes
//! SoftHSM2), and C_Finalize must never run while any thread is inside the
//! module. Every PKCS#11 call therefore holds a read lock on its module's
//! state; re-initialization after a device loss takes the write lock, so it
//! waits for in-flight calls and excludes new ones. Each re-initialization
//! bumps a generation number: sessions and object handles from an older
//! generation are dead and are discarded, never reused.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use parking_lot::{Mutex, RwLock, RwLockReadGuard};

use crate::error::{HsmError, Operation, Result, from_cryptoki};

/// A loaded PKCS#11 module, shared by every `Hsm` of the process that uses it.
#[derive(Debug)]
pub(crate) struct Module {
    path: PathBuf,
    state: RwLock<ModuleState>,
}

#[derive(Debug)]
pub(crate) struct ModuleState {
    /// The initialized context; `None` after a failed re-initialization.
    context: Option<Pkcs11>,
    /// Bumped by every finalize/initialize cycle.
    generation: u64,
}

impl ModuleState {
    pub(crate) fn context(&self) -> Result<&Pkcs11> {
        self.context.as_ref().ok_or(HsmError::Unavailable {
            operation: Operation::Initialize,
            code: crate::error::ReturnCode::not_initialized(),
        })
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }
}

fn registry() -> &'static Mutex<HashMap<PathBuf, Arc<Module>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<PathBuf, Arc<Module>>>> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Whether any PKCS#11 module has been loaded in this process (after which
/// SoftHSM2 no longer reads `SOFTHSM2_CONF`).
pub(crate) fn any_loaded() -> bool {
    !registry().lock().is_empty()
}

/// Returns the module at `path`, loading and initializing it on first use.
pub(crate) fn module(path: &Path) -> Result<Arc<Module>> {
    // Canonicalize so that two spellings of one library share one C_Initialize.
    let canonical = path.canonicalize().map_err(|e| HsmError::ModuleLoad {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let mut modules = registry().lock();
    if let Some(module) = modules.get(&canonical) {
        return Ok(Arc::clone(module));
    }
    let context = Pkcs11::new(&canonical).map_err(|e| HsmError::ModuleLoad {
        path: canonical.clone(),
        reason: e.to_string(),
    })?;
    initialize(&context)?;
    let module = Arc::new(Module {
        path: canonical.clone(),
        state: RwLock::new(ModuleState {
            context: Some(context),
            generation: 0,
        }),
    });
    modules.insert(canonical, Arc::clone(&module));
    Ok(module)
}

fn initialize(context: &Pkcs11) -> Result<()> {
    match context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) => Ok(()),
        // Another component of this process initialized it first: that is fine.
        Err(cryptoki::error::Error::Pkcs11(
            cryptoki::error::RvError::CryptokiAlreadyInitialized,
            _,
        )) => Ok(()),
        Err(e) => Err(from_cryptoki(Operation::Initialize, e)),
    }
}

impl Module {
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Shared access for one PKCS#11 call (or a short sequence of them).
    /// Recursive so that a session dropped by a thread inside a call cannot
    /// deadlock against a waiting re-initialization.
    pub(crate) fn read(&self) -> RwLockReadGuard<'_, ModuleState> {
        self.state.read_recursive()
    }

    pub(crate) fn generation(&self) -> u64 {
        self.state.read_recursive().generation
    }

    /// Finalizes and re-initializes the module, unless another thread already
    /// did so since `seen_generation`. Waits for every in-flight call.
    pub(crate) fn reinitialize(&self, seen_generation: u64) -> Result<()> {
        let mut state = self.state.write();
        if state.generation != seen_generation && state.context.is_some() {
            return Ok(());
        }
        tracing::warn!(module = %self.path.display(), "re-initializing PKCS#11 module");
        let context = match state.context.take() {
            Some(context) => {
                // C_Finalize closes every session of every user of the module;
                // the generation bump below tells them so.
                if let Err(e) = context.clone().finalize() {
                    tracing::warn!(error = %from_cryptoki(Operation::Finalize, e), "C_Finalize failed; continuing");
                }
                context
            }
            None => Pkcs11::new(&self.path).map_err(|e| HsmError::ModuleLoad {
                path: self.path.clone(),
                reason: e.to_string(),
            })?,
        };
        state.generation += 1;
        initialize(&context)?;
        state.context = Some(context);
        Ok(())
    }
}
