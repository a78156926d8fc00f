//! Process hardening for `kms serve`, applied before the HSM PIN is read or
//! any key material is handled: no core dumps (a crash must not write data
//! keys or plaintext in flight to disk) and no ptrace attach by other
//! processes of the same user (PR_SET_DUMPABLE=0 also makes /proc/<pid>/mem
//! and friends root-only).

/// What was applied, for the start-up log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hardening {
    pub core_dumps_disabled: bool,
    pub not_dumpable: bool,
}

/// Applies both measures; failing one is logged and reported, not fatal
/// (e.g. under an unusual seccomp profile), and the other still applies.
pub fn harden_process() -> Hardening {
    use rustix::process::{DumpableBehavior, Resource, Rlimit, set_dumpable_behavior, setrlimit};
    let core_dumps_disabled = setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )
    .map_err(|e| tracing::warn!(error = %e, "cannot set RLIMIT_CORE to 0"))
    .is_ok();
    let not_dumpable = set_dumpable_behavior(DumpableBehavior::NotDumpable)
        .map_err(|e| tracing::warn!(error = %e, "cannot set PR_SET_DUMPABLE to 0"))
        .is_ok();
    Hardening {
        core_dumps_disabled,
        not_dumpable,
    }
}
