//! Configuration of the HSM layer and the PIN, which is a secret.
//!
//! The PIN comes from a file or an environment variable, never from a
//! command-line argument (visible in `ps`), and is never printed: `Pin` has a
//! redacted Debug and is zeroized on drop.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use crate::error::{HsmError, Result};

/// Where the user PIN of the token comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinSource {
    /// A file whose first line is the PIN (trailing newline ignored).
    File(PathBuf),
    /// An environment variable holding the PIN.
    Env(String),
}

impl fmt::Display for PinSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PinSource::File(path) => write!(f, "file {}", path.display()),
            PinSource::Env(var) => write!(f, "environment variable {var}"),
        }
    }
}

impl PinSource {
    /// Reads the PIN now: the first line of the file or the variable's value.
    ///
    /// # Errors
    /// `HsmError::PinUnavailable` if the source cannot be read or the PIN is
    /// empty. Errors name the source, never the value.
    pub fn read(&self) -> Result<Pin> {
        let unavailable = |reason: String| HsmError::PinUnavailable {
            source_description: self.to_string(),
            reason,
        };
        let raw = match self {
            PinSource::File(path) => zeroize::Zeroizing::new(
                std::fs::read_to_string(path).map_err(|e| unavailable(e.kind().to_string()))?,
            ),
            PinSource::Env(var) => zeroize::Zeroizing::new(
                std::env::var(var).map_err(|_| unavailable("not set or not UTF-8".into()))?,
            ),
        };
        let line = raw.lines().next().unwrap_or("");
        if line.is_empty() {
            return Err(unavailable("the PIN is empty".into()));
        }
        Ok(Pin(SecretString::from(line)))
    }
}

/// A token PIN. Never printed, zeroized on drop.
pub struct Pin(SecretString);

impl Pin {
    /// Wraps a PIN the caller already holds (token initialization, tests).
    pub fn new(pin: &str) -> Self {
        Pin(SecretString::from(pin))
    }

    pub(crate) fn to_auth_pin(&self) -> cryptoki::types::AuthPin {
        cryptoki::types::AuthPin::new(self.0.expose_secret().into())
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pin([REDACTED])")
    }
}

/// How to reach the token and how to use it.
#[derive(Debug, Clone)]
pub struct HsmConfig {
    /// Path of the PKCS#11 module (e.g. /usr/lib/softhsm/libsofthsm2.so).
    pub module_path: PathBuf,
    /// Label of the token; tokens are found by label because slot ids move.
    pub token_label: String,
    /// Where the user PIN comes from.
    pub pin: PinSource,
    /// Number of sessions used for cryptographic work (one more is kept open
    /// idle so that the login persists). SoftHSM2 does not scale with
    /// sessions; real HSMs do.
    pub pool_size: usize,
    /// How long a request waits for a free session before failing.
    pub session_wait: Duration,
    /// SoftHSM2 never fsyncs its object files: when set, the files of this
    /// token directory are synced after every key creation or destruction.
    pub sync_token_dir: Option<PathBuf>,
    /// First delay between attempts to re-initialize a lost device; doubles up
    /// to `reconnect_backoff_max`.
    pub reconnect_backoff_min: Duration,
    /// Longest delay between attempts to re-initialize a lost device.
    pub reconnect_backoff_max: Duration,
}

impl HsmConfig {
    /// A configuration with the defaults for everything but the essentials:
    /// 4 sessions, a 5 s session wait, no token-directory sync, reconnect
    /// backoff from 50 ms to 5 s. Nothing is checked until `Hsm::open`.
    pub fn new(
        module_path: impl Into<PathBuf>,
        token_label: impl Into<String>,
        pin: PinSource,
    ) -> Self {
        HsmConfig {
            module_path: module_path.into(),
            token_label: token_label.into(),
            pin,
            pool_size: 4,
            session_wait: Duration::from_secs(5),
            sync_token_dir: None,
            reconnect_backoff_min: Duration::from_millis(50),
            reconnect_backoff_max: Duration::from_secs(5),
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, reason: &str| {
            Err(HsmError::Config {
                field,
                reason: reason.to_owned(),
            })
        };
        if self.token_label.is_empty() || self.token_label.len() > 32 {
            return bad("token_label", "must be 1 to 32 bytes (PKCS#11 label size)");
        }
        if self.pool_size == 0 || self.pool_size > 1024 {
            return bad("pool_size", "must be between 1 and 1024");
        }
        if self.reconnect_backoff_min.is_zero()
            || self.reconnect_backoff_min > self.reconnect_backoff_max
        {
            return bad(
                "reconnect_backoff",
                "min must be positive and not above max",
            );
        }
        if !Path::new(&self.module_path).is_file() {
            return bad("module_path", "no such file");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_debug_is_redacted() {
        let pin = Pin::new("123456-secret");
        assert_eq!(format!("{pin:?}"), "Pin([REDACTED])");
    }

    #[test]
    fn pin_from_file_takes_first_line_and_errors_never_show_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pin");
        std::fs::write(&path, "s3cret-pin\n").expect("write");
        let pin = PinSource::File(path.clone()).read().expect("read");
        assert_eq!(pin.0.expose_secret(), "s3cret-pin");

        std::fs::write(&path, "\n").expect("write");
        let err = PinSource::File(path).read().expect_err("empty PIN");
        assert!(err.to_string().contains("empty"), "{err}");

        let err = PinSource::File(dir.path().join("missing"))
            .read()
            .expect_err("missing file");
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn pin_from_missing_env_var_names_the_variable() {
        let err = PinSource::Env("KMS_TEST_SURELY_UNSET_PIN_VAR".into())
            .read()
            .expect_err("unset");
        assert!(err.to_string().contains("KMS_TEST_SURELY_UNSET_PIN_VAR"));
    }
}
