//! What the service's background threads (the scheduler, the health probe)
//! share: waiting out their interval while staying stoppable at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Parks the calling thread for `interval` (seconds to minutes), returning
/// early when `stop` is set and the thread is unparked, so that whoever stops
/// it can join it without waiting out the interval. Returns `true` once
/// `stop` is set: the thread should end.
pub(crate) fn wait_or_stop(stop: &AtomicBool, interval: Duration) -> bool {
    let next = Instant::now() + interval;
    while !stop.load(Ordering::Acquire) {
        let left = next.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        std::thread::park_timeout(left);
    }
    true
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn waits_out_the_interval_unless_stopped() {
        let stop = AtomicBool::new(false);
        assert!(!wait_or_stop(&stop, Duration::from_millis(1)));
        stop.store(true, Ordering::Release);
        assert!(wait_or_stop(&stop, Duration::from_secs(3600)));

        // A parked waiter wakes when stopped, long before its interval ends.
        let stop = Arc::new(AtomicBool::new(false));
        let waiter = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || wait_or_stop(&stop, Duration::from_secs(3600)))
        };
        stop.store(true, Ordering::Release);
        waiter.thread().unpark();
        assert!(waiter.join().expect("waiter"));
    }
}
