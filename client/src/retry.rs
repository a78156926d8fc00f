//! Retries: only calls that are safe to repeat, only on UNAVAILABLE, with
//! capped exponential backoff and full jitter (sleep a uniform random time in
//! [0, min(max_backoff, initial_backoff × 2^(attempt−1))]), so that clients
//! that failed together do not come back together.
//!
//! Safe to repeat ([`Idempotency::Retryable`]): reads (Describe*, List*,
//! GetKeyPolicy, the Audit RPCs) and the crypto operations (Encrypt,
//! GenerateDataKey*, ReEncrypt, Decrypt, GenerateRandom, Batch*). A repeated
//! crypto call returns a new ciphertext or data key and changes no key state;
//! the only traces are an extra audit record and GCM usage count, which is the
//! truth (the first attempt may have reached the HSM). Key-management mutations
//! (Create, Rotate, Enable/Disable, deletion, aliases, tags, policies) are never
//! retried: a lost reply may hide a success, and repeating it could, for
//! example, rotate twice.

use std::time::Duration;

use aes_gcm::aead::{OsRng, rand_core::RngCore as _};

/// Whether a call may be sent again after UNAVAILABLE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idempotency {
    /// No state change a repeat could duplicate.
    Retryable,
    /// A mutation: sent once.
    Once,
}

/// Attempts and backoff for retryable calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in total, the first included (1 = no retry).
    pub max_attempts: u32,
    /// Backoff ceiling before the first retry; doubles with each retry.
    pub initial_backoff: Duration,
    /// Largest backoff ceiling.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    /// 4 attempts, 50 ms doubling up to 2 s.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    /// Never retry.
    pub fn none() -> Self {
        RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        }
    }

    /// The ceiling of the sleep after failed attempt number `attempt` (1-based):
    /// `initial_backoff × 2^(attempt−1)`, capped at `max_backoff`.
    pub fn backoff_ceiling(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(30);
        self.initial_backoff
            .saturating_mul(1u32 << doublings)
            .min(self.max_backoff)
    }

    /// A random sleep in [0, ceiling] after failed attempt `attempt` (full jitter).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let ceiling = self.backoff_ceiling(attempt);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        if nanos == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(OsRng.next_u64() % (nanos + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_and_jitter_stays_below_the_ceiling() {
        let policy = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(70),
        };
        let ceilings: Vec<u128> = (1..=6)
            .map(|a| policy.backoff_ceiling(a).as_millis())
            .collect();
        assert_eq!(ceilings, [10, 20, 40, 70, 70, 70]);
        let samples: Vec<Duration> = (0..200).map(|_| policy.backoff(3)).collect();
        assert!(samples.iter().all(|d| *d <= Duration::from_millis(40)));
        // Full jitter: not all the same, and some well below the ceiling.
        assert!(samples.iter().any(|d| *d < Duration::from_millis(20)));
        assert!(samples.iter().any(|d| *d > Duration::from_millis(20)));
        assert_eq!(policy.backoff_ceiling(u32::MAX), Duration::from_millis(70));
    }
}
