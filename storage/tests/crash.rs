//! Crash safety: a child process appends under load and prints every
//! acknowledged sequence number; the parent kills it with SIGKILL at random
//! moments, then checks that every acknowledged record survived and the chain
//! verifies. The child is this very test binary, re-executed with an env var.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kms_storage::{VerifyOptions, VerifyStart};

use crate::{MAC_KEY, config, event, mac_fn, open, verify_mac};

const CHILD_ENV: &str = "KMS_STORAGE_CRASH_CHILD_DIR";
const EVERY: u64 = 25;

/// The child's body; a no-op unless run by `kill9_never_loses_acknowledged_records`.
#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let s = open(std::path::Path::new(&dir));
    let log = s.open_audit_log(config(EVERY), mac_fn(MAC_KEY)).unwrap();
    let log = &log;
    let stop = Instant::now() + Duration::from_secs(30);
    std::thread::scope(|sc| {
        for t in 0..8u64 {
            sc.spawn(move || {
                let mut i = 0u64;
                while Instant::now() < stop {
                    let seq = log.append(event(t * 1_000_000 + i)).unwrap();
                    println!("ACK {seq}");
                    i += 1;
                }
            });
        }
    });
}

/// xorshift64*, seeded from the clock: varied kill moments, no extra crates.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn kill9_never_loses_acknowledged_records() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let mut rng = Rng(seed);
    let mut total_acked = 0usize;
    let mut last_seen = 0u64;
    for round in 0..20 {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash::crash_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut acked = BTreeSet::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(n) = line.strip_prefix("ACK ") {
                    acked.insert(n.trim().parse::<u64>().unwrap());
                }
            }
            acked
        });
        std::thread::sleep(Duration::from_millis(50 + rng.next() % 400));
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
        let acked = reader.join().unwrap();
        total_acked += acked.len();

        let s = open(dir.path());
        let r = s.audit_reader();
        for &seq in &acked {
            assert!(
                r.get(seq).unwrap().is_some(),
                "round {round}: acknowledged record {seq} lost"
            );
        }
        let report = r
            .verify(
                &VerifyOptions {
                    start: VerifyStart::Genesis,
                    max_records_between_checkpoints: Some(EVERY),
                },
                &verify_mac,
            )
            .unwrap();
        assert!(report.is_ok(), "round {round}: {report:?}");
        assert!(report.last_good_seq >= acked.last().copied().unwrap_or(0));
        assert!(report.last_good_seq >= last_seen, "the log never shrinks");
        last_seen = report.last_good_seq;
    }
    eprintln!("crash test: {total_acked} acknowledged appends over 20 kills, log at {last_seen}");
    assert!(total_acked > 0, "the children never got to append anything");
}
