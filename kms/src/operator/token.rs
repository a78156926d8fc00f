//! `kms token new`: a bearer token for a principal and the `[[auth.tokens]]`
//! configuration entry (the token's SHA-256) that makes the server accept it.
//! Local: no server involved. The token goes to stdout alone (easy to redirect
//! into a 0600 file) and is never written anywhere else.
#![allow(clippy::print_stdout)]

/// `kms token` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Generate a bearer token for a principal and print it with the
    /// [[auth.tokens]] entry (its SHA-256) for the server's configuration.
    New(NewTokenArgs),
}

/// Arguments of `kms token new`.
#[derive(Debug, clap::Args)]
pub struct NewTokenArgs {
    /// The principal callers presenting this token will be.
    #[arg(long)]
    pub principal: String,
}

/// Runs a `kms token` command.
///
/// # Errors
/// An invalid principal (not printable ASCII, a space or `*`, over 1024
/// characters), or a failure of the system random generator.
pub fn run(command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::New(args) => {
            if !crate::auth::is_valid_principal(&args.principal) || args.principal.contains('*') {
                anyhow::bail!(
                    "--principal must be printable ASCII without spaces or '*' (at most 1024 characters)"
                );
            }
            let token = crate::auth::tokens::generate_token()
                .map_err(|_| anyhow::anyhow!("the system random generator failed"))?;
            let digest = hex::encode(crate::auth::tokens::token_digest(token.as_bytes()));
            println!("{}", token.as_str());
            eprintln!(
                "# Give the token above to {principal} (e.g. in a 0600 file read with \
                 --token-file, or KMS_TOKEN). Add this to the server configuration; the \
                 token itself is never stored there:\n[[auth.tokens]]\nprincipal = \"{principal}\"\nsha256 = \"{digest}\"",
                principal = args.principal
            );
            Ok(())
        }
    }
}
