//! `kms-test-root`: SO-imports a known 32-byte root value as `kms-root/<epoch>`
//! on one SoftHSM2 token, so that several tokens (one per kms node of a local
//! cluster) hold the same root. For tests and `scripts/cluster-demo.sh` only:
//! a root whose value exists outside the HSM protects nothing. It lives in the
//! test crate on purpose, so that neither the `kms` binary nor any
//! configuration can reach it (design note `hierarchy-and-cluster.md` §1.5.1
//! note *2; `kms_hsm::testing::import_test_root`).
//!
//! Usage (SoftHSM2 reads `SOFTHSM2_CONF` as usual):
//!   kms-test-root --module LIB --token-label LABEL --so-pin-file F \
//!                 --pin-file F --value-file F [--epoch N]
//! The value file holds exactly 32 bytes; the PIN files one PIN each.
//! Exits 0 on success (printing nothing), 2 on a usage error, 1 otherwise.

use std::path::PathBuf;
use std::process::ExitCode;

use kms_hsm::PinSource;

struct Args {
    module: PathBuf,
    token_label: String,
    so_pin_file: PathBuf,
    pin_file: PathBuf,
    value_file: PathBuf,
    epoch: u32,
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let (mut module, mut token_label, mut so_pin_file, mut pin_file, mut value_file) =
        (None, None, None, None, None);
    let mut epoch = 1;
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--module" => module = Some(PathBuf::from(value()?)),
            "--token-label" => token_label = Some(value()?),
            "--so-pin-file" => so_pin_file = Some(PathBuf::from(value()?)),
            "--pin-file" => pin_file = Some(PathBuf::from(value()?)),
            "--value-file" => value_file = Some(PathBuf::from(value()?)),
            "--epoch" => {
                epoch = value()?
                    .parse()
                    .map_err(|_| "--epoch needs a number".to_owned())?;
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let need = |name: &str| format!("{name} is required");
    Ok(Args {
        module: module.ok_or_else(|| need("--module"))?,
        token_label: token_label.ok_or_else(|| need("--token-label"))?,
        so_pin_file: so_pin_file.ok_or_else(|| need("--so-pin-file"))?,
        pin_file: pin_file.ok_or_else(|| need("--pin-file"))?,
        value_file: value_file.ok_or_else(|| need("--value-file"))?,
        epoch,
    })
}

fn run(args: &Args) -> Result<(), String> {
    let mut bytes = std::fs::read(&args.value_file)
        .map_err(|e| format!("{}: {e}", args.value_file.display()))?;
    let value: Result<[u8; 32], _> = bytes.as_slice().try_into();
    let length = bytes.len();
    wipe(&mut bytes);
    let Ok(mut value) = value else {
        return Err(format!(
            "{} must hold exactly 32 bytes, not {length}",
            args.value_file.display()
        ));
    };
    let so_pin = PinSource::File(args.so_pin_file.clone())
        .read()
        .map_err(|e| e.to_string())?;
    let user_pin = PinSource::File(args.pin_file.clone())
        .read()
        .map_err(|e| e.to_string())?;
    let imported = kms_hsm::testing::import_test_root(
        &args.module,
        &args.token_label,
        &so_pin,
        &user_pin,
        args.epoch,
        &value,
    )
    .map_err(|e| format!("importing the test root on {:?}: {e}", args.token_label));
    wipe(&mut value);
    imported
}

/// Overwrites a copy of the root value (kms-tests has no `zeroize`; a
/// development root is not worth a new dependency, but need not linger).
fn wipe(bytes: &mut [u8]) {
    bytes.fill(0);
    std::hint::black_box(bytes);
}

fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(usage) => {
            eprintln!("kms-test-root: {usage}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("kms-test-root: {error}");
            ExitCode::FAILURE
        }
    }
}
