//! The recovery policy every PKCS#11 call of `Hsm` runs under:
//!
//! - session or login lost → reconnect (new sessions, log in) and retry once;
//! - device or token lost (or the token's storage gone) → fail closed with
//!   `Unavailable`, then, on later calls, try to reconnect (and, failing that,
//!   re-initialize the module) with exponential backoff, recovering without a
//!   restart when the token returns;
//! - never any fallback to software keys.
//!
//! Failures are classified by `FailureClass` (typed PKCS#11 return codes),
//! never by message text. Logs carry operations, return codes and the token
//! label only.

use std::time::{Duration, Instant};

use cryptoki::session::Session;
use parking_lot::Mutex;

use super::Hsm;
use crate::error::{HsmError, Operation, Result, ReturnCode, from_cryptoki};
use crate::module::ModuleState;
use crate::return_code::FailureClass;

/// Whether the HSM is considered down, and when to try again.
#[derive(Debug)]
pub(super) struct Recovery {
    /// Set while the HSM is considered unreachable.
    down: Mutex<Option<DownState>>,
    backoff_min: Duration,
    backoff_max: Duration,
}

#[derive(Debug)]
struct DownState {
    next_attempt: Instant,
    backoff: Duration,
    /// The module generation the failure was seen in: re-initialization is
    /// skipped if another thread has already done it since.
    generation_seen: u64,
}

impl Recovery {
    /// Up, with the backoff bounds of the configuration.
    pub(super) fn new(backoff_min: Duration, backoff_max: Duration) -> Self {
        Recovery {
            down: Mutex::new(None),
            backoff_min,
            backoff_max,
        }
    }

    /// Whether the layer currently fails closed.
    pub(super) fn is_down(&self) -> bool {
        self.down.lock().is_some()
    }
}

/// `Unavailable` without a return code of the token's own.
pub(super) fn unavailable(operation: Operation) -> HsmError {
    HsmError::Unavailable {
        operation,
        code: ReturnCode::token_not_present(),
    }
}

impl Hsm {
    /// Runs `work` on a pooled session under the recovery policy, and records
    /// its latency under `operation`.
    pub(super) fn run<T>(
        &self,
        operation: Operation,
        mut work: impl FnMut(&Session, &ModuleState) -> Result<T>,
    ) -> Result<T> {
        self.recover_if_due(operation)?;
        let started = Instant::now();
        let result = self.run_with_recovery(operation, &mut work);
        self.record_timing(operation, started.elapsed());
        result
    }

    fn run_with_recovery<T>(
        &self,
        operation: Operation,
        work: &mut impl FnMut(&Session, &ModuleState) -> Result<T>,
    ) -> Result<T> {
        let mut retried = false;
        loop {
            let state = self.module.read();
            let generation = state.generation();
            let pooled = match self.pool.check_out(&state) {
                Ok(pooled) => pooled,
                Err(e) => {
                    drop(state);
                    return Err(self.fail(operation, e, generation));
                }
            };
            match work(pooled.session(), &state) {
                Ok(value) => {
                    self.pool.check_in(pooled);
                    return Ok(value);
                }
                Err(e) => match e.class() {
                    FailureClass::SessionLost if !retried => {
                        tracing::warn!(%operation, error = %e, "HSM session lost; reconnecting once");
                        retried = true;
                        self.pool.discard(pooled);
                        self.handles.clear();
                        if let Err(e) = self.pool.reconnect(&state) {
                            drop(state);
                            return Err(self.fail(operation, e, generation));
                        }
                    }
                    FailureClass::DeviceLost | FailureClass::SessionLost => {
                        self.pool.discard(pooled);
                        drop(state);
                        return Err(self.fail(operation, e, generation));
                    }
                    FailureClass::Other => {
                        self.pool.check_in(pooled);
                        if matches!(e, HsmError::TokenNotFound { .. }) {
                            return Err(self.fail(operation, e, generation));
                        }
                        return Err(e);
                    }
                },
            }
        }
    }

    /// Records a failure; device-level failures put the layer in the "down"
    /// state (fail closed) and come back as `Unavailable`.
    pub(super) fn fail(&self, operation: Operation, error: HsmError, generation: u64) -> HsmError {
        let device_level = matches!(
            error,
            HsmError::Unavailable { .. } | HsmError::TokenNotFound { .. }
        ) || error.class() != FailureClass::Other;
        if !device_level {
            return error;
        }
        {
            let mut down = self.recovery.down.lock();
            if down.is_none() {
                tracing::error!(%operation, %error, token = %self.label, "HSM unavailable; failing closed until it returns");
                *down = Some(DownState {
                    next_attempt: Instant::now() + self.recovery.backoff_min,
                    backoff: self.recovery.backoff_min,
                    generation_seen: generation,
                });
            }
        }
        self.handles.clear();
        match error {
            HsmError::Unavailable { .. } => error,
            HsmError::Pkcs11 { code, .. } => HsmError::Unavailable { operation, code },
            _ => unavailable(operation),
        }
    }

    /// While down: fail fast until the backoff expires, then try to come back
    /// (reconnect; if the token is still unreachable, re-initialize the module).
    fn recover_if_due(&self, operation: Operation) -> Result<()> {
        let mut guard = self.recovery.down.lock();
        let Some(down) = guard.as_mut() else {
            return Ok(());
        };
        if Instant::now() < down.next_attempt {
            return Err(unavailable(operation));
        }
        match self.try_reconnect(down.generation_seen) {
            Ok(()) => {
                tracing::info!(token = %self.label, "HSM reachable again; resuming");
                *guard = None;
                Ok(())
            }
            Err(e) => {
                down.backoff = (down.backoff * 2).min(self.recovery.backoff_max);
                down.next_attempt = Instant::now() + down.backoff;
                down.generation_seen = self.module.generation();
                tracing::warn!(error = %e, retry_in_ms = down.backoff.as_millis() as u64, "HSM still unavailable");
                Err(unavailable(operation))
            }
        }
    }

    fn try_reconnect(&self, generation_seen: u64) -> Result<()> {
        self.handles.clear();
        let attempt = || -> Result<()> {
            let state = self.module.read();
            self.pool.reconnect(&state)?;
            let pooled = self.pool.check_out(&state)?;
            let probe = pooled
                .session()
                .generate_random_vec(1)
                .map_err(|e| from_cryptoki(Operation::GenerateRandom, e));
            match probe {
                Ok(_) => {
                    self.pool.check_in(pooled);
                    // A module that answers from memory is not enough: the
                    // token's storage must be back too.
                    self.sync_token_directory()
                }
                Err(e) => {
                    self.pool.discard(pooled);
                    Err(e)
                }
            }
        };
        match attempt() {
            Ok(()) => Ok(()),
            Err(first) => {
                tracing::debug!(error = %first, "reconnect failed; re-initializing the module");
                self.module.reinitialize(generation_seen)?;
                attempt()
            }
        }
    }

    /// Whether the configured token directory (SoftHSM2) is gone.
    pub(super) fn token_storage_missing(&self) -> bool {
        self.sync_token_dir
            .as_ref()
            .is_some_and(|dir| !dir.is_dir())
    }

    fn sync_token_directory(&self) -> Result<()> {
        match &self.sync_token_dir {
            Some(dir) => crate::token_sync::sync_tree(dir),
            None => Ok(()),
        }
    }

    /// Makes a token change durable. If the token's storage is gone or
    /// failing, the module may still have accepted the change in memory
    /// (SoftHSM2 does), but nothing it records is durable any more: fail
    /// closed exactly as for a lost device, until recovery finds the storage.
    pub(super) fn sync_or_fail(&self, operation: Operation) -> Result<()> {
        self.sync_token_directory().map_err(|e| {
            let cause = std::error::Error::source(&e).map(ToString::to_string);
            tracing::error!(%operation, error = %e, cause, "the token's storage is unusable");
            self.fail(operation, unavailable(operation), self.module.generation())
        })
    }
}
