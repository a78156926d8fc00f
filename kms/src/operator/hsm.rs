//! `kms hsm init-token`: initializes a PKCS#11 token slot for kms with PINs
//! read from files, so that no PIN ever appears on a command line (visible
//! in `ps`), as it would with softhsm2-util, which takes its PINs as arguments. Local:
//! talks to the PKCS#11 module, not to a server.

use std::path::PathBuf;

use kms_hsm::PinSource;

/// `kms hsm` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum HsmCommand {
    /// Initialize a token in the first free slot (SoftHSM2; most HSMs have
    /// their own provisioning tools).
    InitToken(InitTokenArgs),
}

/// Arguments of `kms hsm init-token`.
#[derive(Debug, clap::Args)]
pub struct InitTokenArgs {
    /// The PKCS#11 module (for SoftHSM2 the token directory comes from
    /// SOFTHSM2_CONF in the environment).
    #[arg(long, default_value = "/usr/lib/softhsm/libsofthsm2.so")]
    pub module: PathBuf,
    /// The token label kms will find the token by (1-32 bytes).
    #[arg(long)]
    pub label: String,
    /// File holding the user PIN (first line).
    #[arg(long)]
    pub pin_file: PathBuf,
    /// File holding the security officer PIN (first line).
    #[arg(long)]
    pub so_pin_file: PathBuf,
}

/// Runs a `kms hsm` command.
///
/// # Errors
/// The module cannot be loaded, a token with the label exists already, a PIN
/// file cannot be read, or the token cannot be initialized.
pub fn run(command: HsmCommand) -> anyhow::Result<()> {
    match command {
        HsmCommand::InitToken(args) => {
            if kms_hsm::token_exists(&args.module, &args.label)? {
                anyhow::bail!("a token labelled {:?} already exists", args.label);
            }
            let user = PinSource::File(args.pin_file).read()?;
            let so = PinSource::File(args.so_pin_file).read()?;
            kms_hsm::initialize_token(&args.module, &args.label, &so, &user)?;
            eprintln!("initialized token {:?}", args.label);
            Ok(())
        }
    }
}
