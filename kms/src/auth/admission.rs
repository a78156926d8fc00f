//! Admission control, applied after authentication and before any work:
//! a global cap on requests in flight, and per principal a cap on requests
//! in flight and a token-bucket rate limit. A refused request costs a map
//! lookup and is answered RESOURCE_EXHAUSTED at once, never queued, so one
//! noisy caller cannot starve the others or pile up memory.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Mutex, RwLock};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Per-principal limits (None: unlimited).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrincipalLimits {
    pub requests_per_second: Option<f64>,
    /// Bucket size: how many requests may arrive at once after a quiet spell.
    pub burst: f64,
    pub max_in_flight: Option<usize>,
}

impl Default for PrincipalLimits {
    fn default() -> Self {
        PrincipalLimits {
            requests_per_second: None,
            burst: 1.0,
            max_in_flight: None,
        }
    }
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the server is at its limit of concurrent requests; retry later")]
    ServerBusy,
    #[error("too many concurrent requests from this principal; retry later")]
    PrincipalBusy,
    #[error("request rate limit exceeded for this principal; retry later")]
    RateLimited,
}

/// Held while a request runs; dropping it frees the slots.
#[derive(Debug)]
pub struct Permit {
    _global: OwnedSemaphorePermit,
    _principal: Option<OwnedSemaphorePermit>,
}

#[derive(Debug)]
struct PrincipalState {
    tokens: f64,
    refilled_at: Instant,
    in_flight: Option<Arc<Semaphore>>,
}

/// Beyond this many tracked principals, idle ones are forgotten.
const MAX_TRACKED_PRINCIPALS: usize = 10_000;

/// The admission limits in force. [`Admission::reconfigure`] (configuration
/// reload) replaces them for every later request.
#[derive(Debug)]
pub struct Admission {
    current: RwLock<Arc<Regime>>,
}

/// One set of limits with its counters.
#[derive(Debug)]
struct Regime {
    global: Arc<Semaphore>,
    limits: PrincipalLimits,
    principals: Mutex<HashMap<String, PrincipalState>>,
}

impl Admission {
    /// `max_in_flight`: requests in flight across all principals (≥ 1).
    pub fn new(max_in_flight: usize, limits: PrincipalLimits) -> Self {
        Admission {
            current: RwLock::new(Arc::new(Regime::new(max_in_flight, limits))),
        }
    }

    /// Puts new limits in force for every later request. Their counters
    /// start afresh: requests already admitted hold slots of the old limits
    /// (released as they finish) and do not count against the new ones, and
    /// every principal's bucket starts full. A reload is an operator's act,
    /// so this brief leniency is the price of never blocking a request on it.
    pub fn reconfigure(&self, max_in_flight: usize, limits: PrincipalLimits) {
        *self.current.write() = Arc::new(Regime::new(max_in_flight, limits));
    }

    pub fn admit(&self, principal: &str) -> Result<Permit, Refusal> {
        self.admit_at(principal, Instant::now())
    }

    fn admit_at(&self, principal: &str, now: Instant) -> Result<Permit, Refusal> {
        let regime = Arc::clone(&self.current.read());
        regime.admit_at(principal, now)
    }

    /// Principals currently tracked (for tests and metrics).
    pub fn tracked_principals(&self) -> usize {
        self.current.read().principals.lock().len()
    }
}

impl Regime {
    fn new(max_in_flight: usize, limits: PrincipalLimits) -> Self {
        Regime {
            global: Arc::new(Semaphore::new(max_in_flight)),
            limits,
            principals: Mutex::new(HashMap::new()),
        }
    }

    fn admit_at(&self, principal: &str, now: Instant) -> Result<Permit, Refusal> {
        let principal_permit =
            if self.limits.requests_per_second.is_some() || self.limits.max_in_flight.is_some() {
                self.admit_principal(principal, now)?
            } else {
                None
            };
        let global = Arc::clone(&self.global)
            .try_acquire_owned()
            .map_err(|_| Refusal::ServerBusy)?;
        Ok(Permit {
            _global: global,
            _principal: principal_permit,
        })
    }

    fn admit_principal(
        &self,
        principal: &str,
        now: Instant,
    ) -> Result<Option<OwnedSemaphorePermit>, Refusal> {
        let mut principals = self.principals.lock();
        if principals.len() >= MAX_TRACKED_PRINCIPALS && !principals.contains_key(principal) {
            self.forget_idle(&mut principals, now);
        }
        let limits = self.limits;
        let state = principals
            .entry(principal.to_owned())
            .or_insert_with(|| PrincipalState {
                tokens: limits.burst,
                refilled_at: now,
                in_flight: limits.max_in_flight.map(|n| Arc::new(Semaphore::new(n))),
            });
        // Take the concurrency slot first: a request refused for concurrency
        // must not also burn a rate token.
        let permit = match &state.in_flight {
            Some(semaphore) => Some(
                Arc::clone(semaphore)
                    .try_acquire_owned()
                    .map_err(|_| Refusal::PrincipalBusy)?,
            ),
            None => None,
        };
        if let Some(rate) = limits.requests_per_second {
            let elapsed = now
                .saturating_duration_since(state.refilled_at)
                .as_secs_f64();
            state.tokens = (state.tokens + elapsed * rate).min(limits.burst);
            state.refilled_at = now;
            if state.tokens < 1.0 {
                return Err(Refusal::RateLimited);
            }
            state.tokens -= 1.0;
        }
        Ok(permit)
    }

    /// Drops principals with a full bucket and nothing in flight: forgetting
    /// them changes nothing they could observe.
    fn forget_idle(&self, principals: &mut HashMap<String, PrincipalState>, now: Instant) {
        let limits = self.limits;
        principals.retain(|_, state| {
            let refilled = match limits.requests_per_second {
                Some(rate) => {
                    state.tokens
                        + now
                            .saturating_duration_since(state.refilled_at)
                            .as_secs_f64()
                            * rate
                        >= limits.burst
                }
                None => true,
            };
            let idle = match (&state.in_flight, limits.max_in_flight) {
                (Some(semaphore), Some(max)) => semaphore.available_permits() == max,
                _ => true,
            };
            !(refilled && idle)
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_global_cap_refuses_instead_of_queueing() {
        let admission = Admission::new(2, PrincipalLimits::default());
        let a = admission.admit("a").expect("first");
        let _b = admission.admit("b").expect("second");
        assert_eq!(admission.admit("c").err(), Some(Refusal::ServerBusy));
        drop(a);
        assert!(admission.admit("c").is_ok());
    }

    #[test]
    fn per_principal_concurrency_is_separate_for_each_principal() {
        let limits = PrincipalLimits {
            max_in_flight: Some(1),
            ..PrincipalLimits::default()
        };
        let admission = Admission::new(100, limits);
        let held = admission.admit("a").expect("first");
        assert_eq!(admission.admit("a").err(), Some(Refusal::PrincipalBusy));
        assert!(
            admission.admit("b").is_ok(),
            "another principal is unaffected"
        );
        drop(held);
        assert!(admission.admit("a").is_ok());
    }

    #[test]
    fn the_token_bucket_allows_the_burst_then_the_rate() {
        let limits = PrincipalLimits {
            requests_per_second: Some(10.0),
            burst: 3.0,
            max_in_flight: None,
        };
        let admission = Admission::new(100, limits);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(admission.admit_at("a", t0).is_ok());
        }
        assert_eq!(
            admission.admit_at("a", t0).err(),
            Some(Refusal::RateLimited)
        );
        assert!(
            admission.admit_at("b", t0).is_ok(),
            "buckets are per principal"
        );
        // 100 ms at 10/s refills one token.
        let t1 = t0 + Duration::from_millis(100);
        assert!(admission.admit_at("a", t1).is_ok());
        assert_eq!(
            admission.admit_at("a", t1).err(),
            Some(Refusal::RateLimited)
        );
        // A long pause refills only up to the burst.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(admission.admit_at("a", t2).is_ok());
        }
        assert_eq!(
            admission.admit_at("a", t2).err(),
            Some(Refusal::RateLimited)
        );
    }

    #[test]
    fn idle_principals_are_forgotten_when_the_table_is_full() {
        let limits = PrincipalLimits {
            requests_per_second: Some(1000.0),
            burst: 1.0,
            max_in_flight: Some(4),
        };
        let admission = Admission::new(100_000, limits);
        let t0 = Instant::now();
        for i in 0..MAX_TRACKED_PRINCIPALS {
            drop(admission.admit_at(&format!("p{i}"), t0));
        }
        assert_eq!(admission.tracked_principals(), MAX_TRACKED_PRINCIPALS);
        let later = t0 + Duration::from_secs(1);
        assert!(admission.admit_at("newcomer", later).is_ok());
        assert_eq!(admission.tracked_principals(), 1);
    }

    #[test]
    fn reconfigured_limits_apply_to_later_requests() {
        let admission = Admission::new(1, PrincipalLimits::default());
        let held = admission.admit("a").expect("first");
        assert_eq!(admission.admit("b").err(), Some(Refusal::ServerBusy));
        admission.reconfigure(
            2,
            PrincipalLimits {
                max_in_flight: Some(1),
                ..PrincipalLimits::default()
            },
        );
        let b = admission.admit("b").expect("the new global cap");
        assert_eq!(admission.admit("b").err(), Some(Refusal::PrincipalBusy));
        drop((held, b));
    }
}
