//! `kms hsm init-root`: creates the root key in a ceremony, with the PIN
//! from a file as well.
//!
//! `kms hsm rotate-root`: root rotation's ceremony (SO and user PINs from
//! files). `kms hsm roots` and `kms hsm destroy-root` go to the running
//! server (kms-cli).
//!
//! `kms hsm init-token`: initializes a PKCS#11 token slot for kms with PINs
//! read from files, so that no PIN ever appears on a command line (visible
//! in `ps`), as it would with softhsm2-util, which takes its PINs as arguments. Local:
//! talks to the PKCS#11 module, not to a server.

use std::path::PathBuf;

use anyhow::Context;
use kms_hsm::{HsmError, PinSource, RootSpec, RootVariant};

/// `kms hsm` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum HsmCommand {
    /// Initialize a token in the first free slot (SoftHSM2; most HSMs have
    /// their own provisioning tools).
    InitToken(InitTokenArgs),
    /// Create the root key `kms-root/<epoch>` (the key ceremony, design note
    /// §1.5.1): new key versions are then stored wrapped under it. Run it
    /// while no kms server uses the token (it logs in as the security
    /// officer). Every start-up verifies the root by behaviour.
    InitRoot(InitRootArgs),
    /// Root rotation's ceremony: create root `kms-root/<e+1>` (e = the
    /// highest epoch on the token) with the variant of root e, and verify
    /// it by behaviour. Safe while the server runs; it starts wrapping new
    /// key versions under the new root at its next `kms admin reload` (or
    /// SIGHUP, or its periodic root check) and re-wraps the older ones in
    /// the background (`kms hsm roots` shows the progress). Refused for a
    /// variant-N root: rotation needs trusted wrapping.
    RotateRoot(RotateRootArgs),
    #[command(flatten)]
    Server(kms_cli::HsmCommand),
}

/// Arguments of `kms hsm rotate-root`.
#[derive(Debug, clap::Args)]
pub struct RotateRootArgs {
    /// The PKCS#11 module (for SoftHSM2 the token directory comes from
    /// SOFTHSM2_CONF in the environment).
    #[arg(long, default_value = "/usr/lib/softhsm/libsofthsm2.so")]
    pub module: PathBuf,
    /// The label of the token kms uses.
    #[arg(long)]
    pub label: String,
    /// File holding the security officer PIN (first line): creates the
    /// trusted root.
    #[arg(long)]
    pub so_pin_file: PathBuf,
    /// File holding the user PIN (first line): the behavioural check of the
    /// current and the new root unwraps, which needs the user's login.
    #[arg(long)]
    pub pin_file: PathBuf,
    /// Make the new root a private object (CKA_PRIVATE), as on real HSMs;
    /// SoftHSM2 refuses private objects made by the security officer.
    #[arg(long)]
    pub private: bool,
}

/// Which trust model the root implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RootVariantArg {
    /// Variant T: trusted root (set by the security officer); working keys
    /// can leave the HSM only wrapped under a trusted root; root rotation works.
    Trusted,
    /// Variant N, for HSMs without trusted wrapping: created by the user;
    /// working keys can never leave the HSM; no root rotation.
    NonExtractable,
}

/// Arguments of `kms hsm init-root`.
#[derive(Debug, clap::Args)]
pub struct InitRootArgs {
    /// The PKCS#11 module (for SoftHSM2 the token directory comes from
    /// SOFTHSM2_CONF in the environment).
    #[arg(long, default_value = "/usr/lib/softhsm/libsofthsm2.so")]
    pub module: PathBuf,
    /// The label of the token kms uses.
    #[arg(long)]
    pub label: String,
    /// The root's epoch (>= 1): its CKA_ID is `kms-root/<epoch>`. The
    /// highest epoch on the token is the active one.
    #[arg(long, default_value_t = 1)]
    pub epoch: u32,
    /// The variant.
    #[arg(long, value_enum, default_value_t = RootVariantArg::Trusted)]
    pub variant: RootVariantArg,
    /// File holding the security officer PIN (first line); variant T.
    #[arg(long, required_if_eq("variant", "trusted"))]
    pub so_pin_file: Option<PathBuf>,
    /// File holding the user PIN (first line); variant N.
    #[arg(long, required_if_eq("variant", "non-extractable"))]
    pub user_pin_file: Option<PathBuf>,
    /// Make the root a private object (CKA_PRIVATE). Use it on real HSMs;
    /// SoftHSM2 refuses private objects made by the security officer, so
    /// the default follows SoftHSM2 (T public, N private).
    #[arg(long)]
    pub private: bool,
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
pub fn run(command: HsmCommand, client: &kms_cli::ClientOptions) -> anyhow::Result<()> {
    match command {
        HsmCommand::Server(command) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(kms_cli::run_hsm(command, client))
        }
        HsmCommand::RotateRoot(args) => {
            let so = PinSource::File(args.so_pin_file).read()?;
            let user = PinSource::File(args.pin_file).read()?;
            match kms_hsm::rotate_root(&args.module, &args.label, &so, &user, args.private) {
                Ok(rotated) => {
                    eprintln!(
                        "created root key kms-root/{} ({:?}) on token {:?}; kms-root/{} stays until no record references it.\n\
                         Next: `kms admin reload` (or SIGHUP) so the server wraps new versions under it \
                         (a server without a configuration file, as in dev mode, adopts it by itself within \
                         rotation.scheduler_interval, 60 s in dev mode), \
                         then watch `kms hsm roots` until epoch {} holds 0 versions and 0 service keys, \
                         then `kms hsm destroy-root --epoch {}`.",
                        rotated.epoch,
                        rotated.variant,
                        args.label,
                        rotated.previous,
                        rotated.previous,
                        rotated.previous
                    );
                    Ok(())
                }
                Err(HsmError::PinRejected) => anyhow::bail!(
                    "the token refused a PIN (security officer PIN from --so-pin-file, or user PIN from --pin-file); no root was created"
                ),
                Err(e) => Err(anyhow::Error::new(e).context("root rotation failed")),
            }
        }
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
        HsmCommand::InitRoot(args) => {
            if args.epoch == 0 {
                anyhow::bail!("--epoch must be at least 1");
            }
            let (variant, pin_file) = match args.variant {
                RootVariantArg::Trusted => (RootVariant::Trusted, args.so_pin_file),
                RootVariantArg::NonExtractable => (RootVariant::NonExtractable, args.user_pin_file),
            };
            let pin_file = pin_file.context("the PIN file for this variant is required")?;
            let pin = PinSource::File(pin_file).read()?;
            let mut spec = RootSpec::for_softhsm(args.epoch, variant);
            spec.private |= args.private;
            match kms_hsm::init_root(&args.module, &args.label, &pin, &spec) {
                Ok(()) => {
                    eprintln!(
                        "created root key kms-root/{} ({:?}) on token {:?}",
                        args.epoch, variant, args.label
                    );
                    Ok(())
                }
                Err(HsmError::ObjectExists { .. }) => anyhow::bail!(
                    "the token {:?} already holds a root of epoch {}",
                    args.label,
                    args.epoch
                ),
                Err(e) => Err(e.into()),
            }
        }
    }
}
