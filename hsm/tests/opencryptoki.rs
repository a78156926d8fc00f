//! kms-hsm against a second PKCS#11 implementation: openCryptoki's software
//! token (Debian 12 package `opencryptoki`, 3.8), labelled `ockkms`.
//!
//! The test runs `scripts/opencryptoki-token.sh`, which starts `pkcsslotd`
//! if it is not running (as root, as CI runs) and initializes the token once;
//! it is idempotent and serialised by a lock. The test skips, printing why, only when openCryptoki is not installed or
//! pkcsslotd can neither be found running nor started; under CI (`CI=true`,
//! where `scripts/setup.sh` installs openCryptoki) skipping is a failure.
//!
//! openCryptoki 3.8 fills `CK_TOKEN_INFO.utcTime` with `hh:mm:ss` while
//! setting `CKF_CLOCK_ON_TOKEN`, which cryptoki cannot parse; and its software
//! token has no CKM_AES_GCM. So the right end of opening it is the mechanism
//! probe's refusal naming CKM_AES_GCM, not "no token with that label".

use std::path::PathBuf;
use std::process::Command;

use kms_hsm::{Hsm, HsmConfig, HsmError, PinSource, SlotRejection};

/// The prepared token, as the script reports it.
struct Ock {
    module: PathBuf,
    slot: u64,
    label: String,
    pin_file: PathBuf,
}

/// Prepares the token, or returns `None` (having printed why) when
/// openCryptoki cannot be used on this machine.
fn ock() -> Option<Ock> {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../scripts/opencryptoki-token.sh"
    );
    let output = Command::new("bash")
        .arg(script)
        .output()
        .expect("run scripts/opencryptoki-token.sh");
    let stderr = String::from_utf8_lossy(&output.stderr);
    match output.status.code() {
        Some(0) => {}
        Some(3 | 4) => {
            let reason = stderr.trim();
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI must run the openCryptoki tests (scripts/setup.sh installs it): {reason}"
            );
            // nextest shows it with --success-output=immediate (or on failure).
            eprintln!("SKIPPED: openCryptoki is not usable here: {reason}");
            return None;
        }
        _ => panic!(
            "scripts/opencryptoki-token.sh failed ({}): {stderr}",
            output.status
        ),
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let field = |key: &str| {
        stdout
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("the script printed no {key}=: {stdout}"))
            .to_owned()
    };
    Some(Ock {
        module: field("module").into(),
        slot: field("slot").parse().expect("numeric slot"),
        label: field("label"),
        pin_file: field("pin_file").into(),
    })
}

impl Ock {
    fn config(&self, label: &str) -> HsmConfig {
        let mut config =
            HsmConfig::new(&self.module, label, PinSource::File(self.pin_file.clone()));
        config.pool_size = 1;
        config
    }
}

/// One test, so that one process at a time uses openCryptoki: with several
/// processes starting at once, openCryptoki 3.8 now and then reports no slot
/// with a token present to one of them (about 1 in 20 in our runs).
///
/// The token is found by its label although cryptoki cannot parse its
/// CK_TOKEN_INFO, the user PIN is accepted, and opening stops at the
/// mechanism probe, naming CKM_AES_GCM. A label that matches nothing gets an
/// error naming every slot examined and why it was not taken: here the soft
/// token's slot with its real label.
#[test]
fn ockkms_is_found_by_label_and_refused_for_lacking_aes_gcm() {
    let Some(ock) = ock() else { return };
    assert_eq!(ock.label, "ockkms");
    assert!(
        kms_hsm::token_exists(&ock.module, &ock.label).expect("look the token up"),
        "token {:?} not found in {}",
        ock.label,
        ock.module.display()
    );

    let err = Hsm::open(ock.config(&ock.label)).expect_err("openCryptoki's soft token has no GCM");
    match &err {
        HsmError::MechanismMissing {
            label, mechanism, ..
        } => {
            assert_eq!(label, "ockkms");
            assert_eq!(*mechanism, "CKM_AES_GCM");
        }
        other => panic!("expected the mechanism probe to refuse, got: {other}"),
    }
    let message = err.to_string();
    assert!(message.contains("CKM_AES_GCM"), "{message}");
    assert!(message.contains("ockkms"), "{message}");

    let err = Hsm::open(ock.config("no-such-token")).expect_err("unknown label");
    let HsmError::TokenNotFound { examined, .. } = &err else {
        panic!("expected TokenNotFound, got: {err}");
    };
    let soft = examined
        .iter()
        .find(|slot| slot.slot_id == ock.slot)
        .unwrap_or_else(|| panic!("slot {} not among those examined: {err}", ock.slot));
    assert!(
        matches!(&soft.rejection, SlotRejection::LabelDiffers { label } if label == "ockkms"),
        "{soft:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains(&format!("slot {}: label is \"ockkms\"", ock.slot)),
        "{message}"
    );
}
