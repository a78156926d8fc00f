//! The server under test: a `kms serve --dev` child process on 127.0.0.1
//! (client and server then share the machine's cores as in production, and
//! its memory and CPU can be read from /proc), plus the /proc readings.
//!
//! The child is killed when `ServerProcess` drops: a bench never leaves a
//! server behind.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;

/// A running `kms serve --dev` child.
#[derive(Debug)]
pub struct ServerProcess {
    child: Child,
    pub addr: std::net::SocketAddr,
    /// The metrics endpoint, if the server serves one (`--metrics-listen`).
    pub metrics: Option<std::net::SocketAddr>,
}

impl ServerProcess {
    /// Starts `kms serve --dev --data-dir DIR --listen 127.0.0.1:0` and waits
    /// for its "kms listening on ADDR (…)" line.
    pub fn start(kms: &Path, data_dir: &Path, audit_synced: bool) -> anyhow::Result<Self> {
        Self::start_with(kms, data_dir, audit_synced, &[])
    }

    /// As [`ServerProcess::start`], with more `kms serve --dev` arguments.
    pub fn start_with(
        kms: &Path,
        data_dir: &Path,
        audit_synced: bool,
        extra: &[String],
    ) -> anyhow::Result<Self> {
        let mut command = Command::new(kms);
        command
            .args(["serve", "--dev", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .env("KMS_LOG", "warn,cryptoki::mechanism=off")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if !audit_synced {
            command.arg("--unsafe-audit-no-sync");
        }
        command.args(extra);
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {}", kms.display()))?;
        let Some(stdout) = child.stdout.take() else {
            let _ = child.kill();
            anyhow::bail!("no stdout from {}", kms.display());
        };
        // The server prints nothing else on stdout; the pipe is read once.
        let mut line = String::new();
        let read = std::io::BufReader::new(stdout).read_line(&mut line);
        let addr = line
            .strip_prefix("kms listening on ")
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok());
        // "…, metrics on http://ADDR/metrics)" when it serves metrics.
        let metrics = line
            .split_once("metrics on http://")
            .and_then(|(_, rest)| rest.split_once("/metrics"))
            .and_then(|(a, _)| a.parse().ok());
        match (read, addr) {
            (Ok(_), Some(addr)) => Ok(ServerProcess {
                child,
                addr,
                metrics,
            }),
            _ => {
                let _ = child.kill();
                let status = child.wait().ok();
                anyhow::bail!(
                    "{} did not start (first line {line:?}, exit {status:?})",
                    kms.display()
                )
            }
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `kms` binary: `--kms-binary` if given, else the one next to this
/// executable (cargo puts both in the same target directory).
pub fn locate_kms_binary(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        anyhow::ensure!(path.is_file(), "--kms-binary {} not found", path.display());
        return Ok(path.to_owned());
    }
    let exe = std::env::current_exe().context("locating kms-bench")?;
    let candidate = exe
        .parent()
        .map(|dir| dir.join("kms"))
        .context("kms-bench has no parent directory")?;
    anyhow::ensure!(
        candidate.is_file(),
        "{} not found: build the workspace (cargo build --workspace) or pass --kms-binary",
        candidate.display()
    );
    Ok(candidate)
}

/// VmRSS of a process in KiB, from /proc/<pid>/status.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_field(pid, "VmRSS:")
}

/// VmHWM (peak RSS) of a process in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_field(pid, "VmHWM:")
}

fn status_field(pid: u32, name: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

/// user + system CPU time of a process in clock ticks (USER_HZ, 100 per
/// second on Linux), from /proc/<pid>/stat; `None` for this process means "self".
fn cpu_ticks(pid: Option<u32>) -> Option<u64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name (field 2) may contain spaces; fields restart after ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is index 0, so utime (field 14) is 11 and stime 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Length of one clock tick of /proc CPU times.
pub const CPU_TICK: Duration = Duration::from_millis(10);

/// Reads the CPU time of this process and of the server, if it is a child.
#[derive(Debug, Clone, Copy)]
pub struct CpuProbe {
    server_pid: Option<u32>,
}

#[derive(Debug, Clone, Copy)]
pub struct CpuSample {
    client: u64,
    server: Option<u64>,
}

impl CpuProbe {
    pub fn new(server_pid: Option<u32>) -> Self {
        CpuProbe { server_pid }
    }

    pub fn sample(&self) -> CpuSample {
        CpuSample {
            client: cpu_ticks(None).unwrap_or(0),
            server: self.server_pid.and_then(|pid| cpu_ticks(Some(pid))),
        }
    }
}

impl CpuSample {
    /// (client ticks, server ticks) elapsed since `earlier`.
    pub fn since(&self, earlier: &CpuSample) -> (u64, Option<u64>) {
        let server = match (self.server, earlier.server) {
            (Some(now), Some(then)) => Some(now.saturating_sub(then)),
            _ => None,
        };
        (self.client.saturating_sub(earlier.client), server)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_an_rss_and_cpu_time() {
        let pid = std::process::id();
        assert!(rss_kib(pid).is_some_and(|kib| kib > 0));
        assert!(peak_rss_kib(pid).is_some_and(|kib| kib > 0));
        // Spin a little so that at least the reading itself works.
        assert!(cpu_ticks(Some(pid)).is_some());
        assert!(cpu_ticks(None).is_some());
    }
}
