//! `[lifecycle]`: rules for retiring key versions (issue 18 item 2).

use serde::Deserialize;

use super::{ConfigError, invalid};

/// `lifecycle.version_destruction_quiet_period_days` unless configured.
pub const DEFAULT_VERSION_DESTRUCTION_QUIET_PERIOD_DAYS: u32 = 30;
/// The largest quiet period accepted, days (ten years).
pub const MAX_VERSION_DESTRUCTION_QUIET_PERIOD_DAYS: u32 = 3650;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLifecycle {
    version_destruction_quiet_period_days: Option<u32>,
}

/// Key-version retirement settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleSettings {
    /// `lifecycle.version_destruction_quiet_period_days`: the guard of
    /// ScheduleKeyVersionDestruction. A version that decrypted (Decrypt,
    /// data-key unwraps, ReEncrypt source) within this many days is not
    /// scheduled unless the request sets `override_recent_use`. 0 turns
    /// the guard off; at most [`MAX_VERSION_DESTRUCTION_QUIET_PERIOD_DAYS`].
    pub version_destruction_quiet_period_days: u32,
}

impl Default for LifecycleSettings {
    fn default() -> Self {
        LifecycleSettings {
            version_destruction_quiet_period_days: DEFAULT_VERSION_DESTRUCTION_QUIET_PERIOD_DAYS,
        }
    }
}

pub(super) fn validate(raw: RawLifecycle) -> Result<LifecycleSettings, ConfigError> {
    let days = raw
        .version_destruction_quiet_period_days
        .unwrap_or(DEFAULT_VERSION_DESTRUCTION_QUIET_PERIOD_DAYS);
    if days > MAX_VERSION_DESTRUCTION_QUIET_PERIOD_DAYS {
        return Err(invalid(
            "lifecycle.version_destruction_quiet_period_days",
            format!("must be 0 (no guard) to {MAX_VERSION_DESTRUCTION_QUIET_PERIOD_DAYS}"),
        ));
    }
    Ok(LifecycleSettings {
        version_destruction_quiet_period_days: days,
    })
}
