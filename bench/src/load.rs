//! The closed-loop load drivers: N tokio tasks (gRPC rows) or N OS threads
//! (raw-HSM rows), each repeating one call back to back, with one measuring
//! window shared by both so that every row of the table is counted the same way.
//!
//! A row runs a warm-up (calls made, not counted), then measures until the
//! duration is over or `max_calls` calls are counted, whichever comes first.
//! A call counts when it started after the warm-up and before the end (the
//! window then stretches to the end of the last counted call); latency is recorded per call in nanoseconds in an HDR histogram
//! (3 significant digits). Everything is bounded: no row runs past its deadline
//! plus the time one in-flight call takes to return.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Barrier, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::server::CpuProbe;

/// Largest latency recorded exactly; above it, the histogram saturates.
const MAX_LATENCY_NS: u64 = 60_000_000_000;

/// How long a row warms up and measures.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub warmup: Duration,
    pub duration: Duration,
    /// Calls counted per row at most (a batch call is one call).
    pub max_calls: u64,
}

/// What a row measured.
#[derive(Debug)]
pub struct Measurement {
    /// Calls counted in the window.
    pub calls: u64,
    /// Items those calls carried (= calls except for batch rows).
    pub items: u64,
    /// Length of the window: from the end of the warm-up to the deadline,
    /// or to the call that reached `max_calls`.
    pub elapsed: Duration,
    /// Per-call latency, nanoseconds.
    pub latency: Histogram<u64>,
    /// Failed calls (not counted as calls), and the first failure's message.
    pub errors: u64,
    pub first_error: Option<String>,
    /// CPU time over the window, in clock ticks of 10 ms (USER_HZ).
    pub client_cpu_ticks: u64,
    pub server_cpu_ticks: Option<u64>,
}

fn histogram() -> Histogram<u64> {
    // 1 ns .. 60 s at 3 significant digits; the bounds are constants that
    // hdrhistogram accepts, so this cannot fail.
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3)
        .unwrap_or_else(|_| unreachable!("valid histogram bounds"))
}

/// The measuring window, shared by every task or thread of a row.
#[derive(Debug)]
struct Window {
    warmup_end: Instant,
    deadline: Instant,
    max_calls: u64,
    counted: AtomicU64,
    stopped_at: OnceLock<Instant>,
    stopping: AtomicBool,
    /// End of the latest counted call, in ns after `warmup_end`: a call
    /// started before the deadline counts even if it ends after it (a slow
    /// batch call on a loaded machine must not leave a row with no calls),
    /// and the window then stretches to its end.
    last_end_ns: AtomicU64,
}

impl Window {
    fn new(limits: &Limits) -> Window {
        let warmup_end = Instant::now() + limits.warmup;
        Window {
            warmup_end,
            deadline: warmup_end + limits.duration,
            max_calls: limits.max_calls,
            counted: AtomicU64::new(0),
            stopped_at: OnceLock::new(),
            stopping: AtomicBool::new(false),
            last_end_ns: AtomicU64::new(0),
        }
    }

    fn running(&self) -> bool {
        !self.stopping.load(Ordering::Relaxed) && Instant::now() < self.deadline
    }

    /// Whether a call that ran from `start` to `end` counts.
    fn counts(&self, start: Instant, end: Instant) -> bool {
        if start < self.warmup_end || start >= self.deadline {
            return false;
        }
        let end_ns = u64::try_from(end.saturating_duration_since(self.warmup_end).as_nanos())
            .unwrap_or(u64::MAX);
        self.last_end_ns.fetch_max(end_ns, Ordering::Relaxed);
        let before = self.counted.fetch_add(1, Ordering::Relaxed);
        if before >= self.max_calls {
            return false;
        }
        if before + 1 == self.max_calls {
            let _ = self.stopped_at.set(end);
            self.stopping.store(true, Ordering::Relaxed);
        }
        true
    }

    fn elapsed(&self) -> Duration {
        let window = self
            .stopped_at
            .get()
            .copied()
            .unwrap_or(self.deadline)
            .saturating_duration_since(self.warmup_end);
        if self.stopped_at.get().is_some() {
            return window;
        }
        window.max(Duration::from_nanos(
            self.last_end_ns.load(Ordering::Relaxed),
        ))
    }
}

/// One task's or thread's tally.
#[derive(Debug)]
struct Tally {
    calls: u64,
    items: u64,
    latency: Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            calls: 0,
            items: 0,
            latency: histogram(),
            errors: 0,
            first_error: None,
        }
    }

    fn record(&mut self, window: &Window, start: Instant, outcome: Result<u64, String>) {
        let end = Instant::now();
        match outcome {
            Ok(items) => {
                if window.counts(start, end) {
                    self.calls += 1;
                    self.items += items;
                    let ns = u64::try_from((end - start).as_nanos()).unwrap_or(u64::MAX);
                    self.latency.saturating_record(ns.max(1));
                }
            }
            Err(message) => {
                self.errors += 1;
                self.first_error.get_or_insert(message);
            }
        }
    }

    fn merge(&mut self, other: Tally) {
        self.calls += other.calls;
        self.items += other.items;
        // Same bounds on both sides: adding cannot fail.
        let _ = self.latency.add(&other.latency);
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    fn into_measurement(self, window: &Window, cpu: (u64, Option<u64>)) -> Measurement {
        Measurement {
            calls: self.calls,
            items: self.items,
            elapsed: window.elapsed(),
            latency: self.latency,
            errors: self.errors,
            first_error: self.first_error,
            client_cpu_ticks: cpu.0,
            server_cpu_ticks: cpu.1,
        }
    }
}

/// The repeated call of one async task. Returns the number of items the
/// call carried, or a message describing the failure.
pub trait AsyncCall: Send + 'static {
    fn call(&mut self) -> impl Future<Output = Result<u64, String>> + Send + '_;
}

/// Runs one task per element of `calls` on the current tokio runtime.
pub async fn drive_async<C: AsyncCall>(
    calls: Vec<C>,
    limits: &Limits,
    probe: &CpuProbe,
) -> anyhow::Result<Measurement> {
    let window = std::sync::Arc::new(Window::new(limits));
    let mut tasks = tokio::task::JoinSet::new();
    for mut call in calls {
        let window = std::sync::Arc::clone(&window);
        tasks.spawn(async move {
            let mut tally = Tally::new();
            while window.running() {
                let start = Instant::now();
                let outcome = call.call().await;
                tally.record(&window, start, outcome);
            }
            tally
        });
    }
    tokio::time::sleep_until(window.warmup_end.into()).await;
    let before = probe.sample();
    let mut total = Tally::new();
    while let Some(tally) = tasks.join_next().await {
        total.merge(tally?);
    }
    let after = probe.sample();
    Ok(total.into_measurement(&window, after.since(&before)))
}

/// Runs `threads` OS threads, each making its worker with `make` (before the
/// clock starts) and then repeating `call` on it.
pub fn drive_threads<W, M, C>(
    threads: usize,
    limits: &Limits,
    probe: &CpuProbe,
    make: M,
    call: C,
) -> anyhow::Result<Measurement>
where
    M: Fn(usize) -> anyhow::Result<W> + Sync,
    C: Fn(&mut W) -> Result<u64, String> + Sync,
{
    let ready = Barrier::new(threads + 1);
    let go = Barrier::new(threads + 1);
    let window: OnceLock<Window> = OnceLock::new();
    let setup_error: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let (tally, cpu) = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|index| {
                let (ready, go, window, make, call) = (&ready, &go, &window, &make, &call);
                let setup_error = &setup_error;
                scope.spawn(move || {
                    let mut tally = Tally::new();
                    let worker = make(index);
                    ready.wait();
                    go.wait();
                    let (mut worker, Some(window)) = (
                        match worker {
                            Ok(worker) => worker,
                            Err(e) => {
                                if let Ok(mut slot) = setup_error.lock() {
                                    slot.get_or_insert(e);
                                }
                                return tally;
                            }
                        },
                        window.get(),
                    ) else {
                        return tally;
                    };
                    while window.running() {
                        let start = Instant::now();
                        let outcome = call(&mut worker);
                        tally.record(window, start, outcome);
                    }
                    tally
                })
            })
            .collect();
        ready.wait();
        let _ = window.set(Window::new(limits));
        go.wait();
        let warmup_end = window.get().map(|w| w.warmup_end);
        if let Some(end) = warmup_end {
            std::thread::sleep(end.saturating_duration_since(Instant::now()));
        }
        let before = probe.sample();
        let mut total = Tally::new();
        for handle in handles {
            match handle.join() {
                Ok(tally) => total.merge(tally),
                Err(_) => {
                    total.errors += 1;
                    total
                        .first_error
                        .get_or_insert("worker thread panicked".into());
                }
            }
        }
        let after = probe.sample();
        (total, after.since(&before))
    });
    if let Some(e) = setup_error.into_inner().ok().flatten() {
        return Err(e);
    }
    let window = window
        .get()
        .ok_or_else(|| anyhow::anyhow!("measuring window not set"))?;
    Ok(tally.into_measurement(window, cpu))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_calls: u64) -> Limits {
        Limits {
            warmup: Duration::from_millis(5),
            duration: Duration::from_secs(10),
            max_calls,
        }
    }

    #[test]
    fn a_row_stops_at_max_calls_and_counts_exactly_that_many() {
        let m = drive_threads(
            3,
            &limits(500),
            &CpuProbe::new(None),
            |_| Ok(()),
            |_: &mut ()| Ok(2),
        )
        .expect("drive");
        assert_eq!(m.calls, 500);
        assert_eq!(m.items, 1000);
        assert_eq!(m.latency.len(), 500);
        assert!(m.elapsed < Duration::from_secs(10));
        assert_eq!(m.errors, 0);
    }

    #[test]
    fn failures_are_counted_apart_and_keep_their_message() {
        let m = drive_threads(
            1,
            &Limits {
                warmup: Duration::ZERO,
                duration: Duration::from_millis(20),
                max_calls: u64::MAX,
            },
            &CpuProbe::new(None),
            |_| Ok(()),
            |_: &mut ()| Err("boom".to_owned()),
        )
        .expect("drive");
        assert_eq!(m.calls, 0);
        assert!(m.errors > 0);
        assert_eq!(m.first_error.as_deref(), Some("boom"));
    }

    #[test]
    fn a_worker_that_cannot_be_made_fails_the_row() {
        let err = drive_threads(
            2,
            &limits(10),
            &CpuProbe::new(None),
            |i| {
                if i == 1 {
                    anyhow::bail!("no session")
                }
                Ok(())
            },
            |_: &mut ()| Ok(1),
        )
        .expect_err("setup failure");
        assert!(err.to_string().contains("no session"), "{err}");
    }
}
