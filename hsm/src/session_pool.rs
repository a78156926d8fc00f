//! A fixed-size pool of logged-in PKCS#11 sessions for one token.
//!
//! `cryptoki::Session` is Send but not Sync: a session is checked out by one
//! blocking worker, used, and checked back in; it is never shared and never
//! held across an `.await` (callers are blocking code). One extra "anchor"
//! session stays open for the life of the pool, because PKCS#11 logs a token
//! out when its last session closes. Sessions are opened lazily up to the
//! configured size, so the hot path never opens a session once warm.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use parking_lot::{Condvar, Mutex};

use crate::config::Pin;
use crate::error::{HsmError, Operation, Result, from_cryptoki};
use crate::module::{Module, ModuleState};

/// A session checked out of the pool, tagged with the module generation it
/// was opened in.
#[derive(Debug)]
pub(crate) struct PooledSession {
    session: Option<Session>,
    generation: u64,
}

impl PooledSession {
    pub(crate) fn session(&self) -> &Session {
        // Always Some until the pool takes it back (check_in/discard consume self).
        self.session
            .as_ref()
            .unwrap_or_else(|| unreachable!("session taken"))
    }
}

#[derive(Debug)]
pub(crate) struct SessionPool {
    module: Arc<Module>,
    label: String,
    pin: Pin,
    size: usize,
    wait: Duration,
    inner: Mutex<PoolInner>,
    available: Condvar,
    sessions_opened: AtomicU64,
}

#[derive(Debug, Default)]
struct PoolInner {
    /// Module generation the sessions below belong to.
    generation: u64,
    /// The token's slot, found by label; `None` until connected.
    slot: Option<Slot>,
    /// Keeps the login alive; never used for work.
    anchor: Option<Session>,
    idle: Vec<Session>,
    /// Sessions open for work (idle + checked out) in this generation.
    open: usize,
}

impl PoolInner {
    /// Drops every session of an older generation without closing it:
    /// C_Finalize already closed them, and their handle numbers may since
    /// have been reused by a live session that closing would kill.
    fn forget_stale(&mut self, generation: u64) {
        if self.generation == generation {
            return;
        }
        for session in self.idle.drain(..) {
            std::mem::forget(session);
        }
        if let Some(anchor) = self.anchor.take() {
            std::mem::forget(anchor);
        }
        self.slot = None;
        self.open = 0;
        self.generation = generation;
    }
}

impl SessionPool {
    pub(crate) fn new(
        module: Arc<Module>,
        label: String,
        pin: Pin,
        size: usize,
        wait: Duration,
    ) -> Self {
        let generation = module.generation();
        SessionPool {
            module,
            label,
            pin,
            size,
            wait,
            inner: Mutex::new(PoolInner {
                generation,
                ..PoolInner::default()
            }),
            available: Condvar::new(),
            sessions_opened: AtomicU64::new(0),
        }
    }

    pub(crate) fn size(&self) -> usize {
        self.size
    }

    /// Sessions open for work and how many of them are idle: (open, idle).
    pub(crate) fn usage(&self) -> (usize, usize) {
        let inner = self.inner.lock();
        (inner.open, inner.idle.len())
    }

    /// The token's slot, connecting (find by label, open anchor, log in) if needed.
    pub(crate) fn slot(&self, state: &ModuleState) -> Result<Slot> {
        let mut inner = self.inner.lock();
        self.connect(&mut inner, state)
    }

    fn connect(&self, inner: &mut PoolInner, state: &ModuleState) -> Result<Slot> {
        inner.forget_stale(state.generation());
        if let Some(slot) = inner.slot {
            return Ok(slot);
        }
        let context = state.context()?;
        let slot = crate::token::find_token(context, &self.label, self.module.path())?;
        let anchor = self.open_session(state, slot)?;
        login(&anchor, &self.pin)?;
        inner.slot = Some(slot);
        inner.anchor = Some(anchor);
        Ok(slot)
    }

    pub(crate) fn sessions_opened(&self) -> u64 {
        self.sessions_opened.load(Ordering::Relaxed)
    }

    fn open_session(&self, state: &ModuleState, slot: Slot) -> Result<Session> {
        self.sessions_opened.fetch_add(1, Ordering::Relaxed);
        state
            .context()?
            .open_rw_session(slot)
            .map_err(|e| from_cryptoki(Operation::OpenSession, e))
    }

    /// A session outside the pool, for one-off checks; the caller closes it
    /// (by dropping) while still holding `state`.
    pub(crate) fn open_extra_session(&self, state: &ModuleState, slot: Slot) -> Result<Session> {
        self.open_session(state, slot)
    }

    /// Takes a session, opening one if fewer than `size` are open, otherwise
    /// waiting up to the configured time for one to come back.
    pub(crate) fn check_out(&self, state: &ModuleState) -> Result<PooledSession> {
        let deadline = Instant::now() + self.wait;
        let mut inner = self.inner.lock();
        loop {
            let slot = self.connect(&mut inner, state)?;
            let generation = inner.generation;
            if let Some(session) = inner.idle.pop() {
                return Ok(PooledSession {
                    session: Some(session),
                    generation,
                });
            }
            if inner.open < self.size {
                let session = self.open_session(state, slot)?;
                inner.open += 1;
                return Ok(PooledSession {
                    session: Some(session),
                    generation,
                });
            }
            if self.available.wait_until(&mut inner, deadline).timed_out() {
                return Err(HsmError::PoolExhausted {
                    size: self.size,
                    waited_ms: u64::try_from(self.wait.as_millis()).unwrap_or(u64::MAX),
                });
            }
        }
    }

    /// Returns a healthy session to the pool.
    pub(crate) fn check_in(&self, mut pooled: PooledSession) {
        let mut inner = self.inner.lock();
        if let Some(session) = pooled.session.take() {
            if pooled.generation == inner.generation {
                inner.idle.push(session);
            } else {
                std::mem::forget(session);
            }
        }
        drop(inner);
        self.available.notify_one();
    }

    /// Closes a session that failed in a way that makes it unusable.
    pub(crate) fn discard(&self, mut pooled: PooledSession) {
        let mut inner = self.inner.lock();
        if let Some(session) = pooled.session.take() {
            if pooled.generation == inner.generation {
                inner.open = inner.open.saturating_sub(1);
                // Closing may fail (the session is already gone); that is the point.
                let _ = session.close();
            } else {
                std::mem::forget(session);
            }
        }
        drop(inner);
        self.available.notify_one();
    }

    /// After a session or login loss: drop all sessions of this token and
    /// connect again (find the token, open the anchor, log in).
    pub(crate) fn reconnect(&self, state: &ModuleState) -> Result<()> {
        let mut inner = self.inner.lock();
        if inner.generation == state.generation() {
            let idle = inner.idle.len();
            inner.open = inner.open.saturating_sub(idle);
            for session in inner.idle.drain(..) {
                let _ = session.close();
            }
            if let Some(anchor) = inner.anchor.take() {
                let _ = anchor.close();
            }
            // Sessions still checked out are discarded when they come back
            // failing, or reused if they still work.
        }
        inner.slot = None;
        self.connect(&mut inner, state).map(|_| ())
    }
}

impl Drop for SessionPool {
    fn drop(&mut self) {
        let state = self.module.read();
        let inner = self.inner.get_mut();
        if inner.generation != state.generation() {
            inner.forget_stale(state.generation());
            return;
        }
        // Close work sessions first and the anchor last, which logs the token out.
        for session in inner.idle.drain(..) {
            let _ = session.close();
        }
        if let Some(anchor) = inner.anchor.take() {
            let _ = anchor.close();
        }
    }
}

/// Logs the token's user in; "already logged in" (another session of this
/// process did it) counts as success.
pub(crate) fn login(session: &Session, pin: &Pin) -> Result<()> {
    match session.login(UserType::User, Some(&pin.to_auth_pin())) {
        Ok(()) => Ok(()),
        Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {
            Ok(())
        }
        Err(e) => Err(from_cryptoki(Operation::Login, e)),
    }
}
