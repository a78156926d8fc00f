//! SoftHSM2, defined once: where its module is, the `softhsm2.conf` text, where
//! it and its token directory live in a SoftHSM2 home directory, and the one
//! place in kms that sets `SOFTHSM2_CONF`. Dev mode (`kms serve --dev`), the
//! test harness (feature `testing`) and `kms-bench` all go through here.
//!
//! SoftHSM2 reads its configuration once, at C_Initialize, and only from the
//! file `$SOFTHSM2_CONF` names. Setting that variable is the only `unsafe` in
//! this module; it must happen before any other thread of the process exists
//! and before any PKCS#11 module is loaded. This module never reads a PIN.

use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use crate::error::{HsmError, Result};

/// Where Debian's softhsm2 package installs the module.
pub const DEBIAN_SOFTHSM2_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// The SoftHSM2 module path: `$KMS_SOFTHSM2_MODULE` if set, else Debian's.
pub fn softhsm2_module_path() -> PathBuf {
    std::env::var_os("KMS_SOFTHSM2_MODULE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEBIAN_SOFTHSM2_MODULE))
}

/// The environment variable SoftHSM2 reads its configuration path from.
pub const CONF_ENV: &str = "SOFTHSM2_CONF";

/// File name of the configuration inside a [`SoftHsmHome`].
const CONF_FILE: &str = "softhsm2.conf";
/// Directory name of the token directory inside a [`SoftHsmHome`].
const TOKENS_DIR: &str = "tokens";

/// The configuration text for a token directory: file object store (one
/// file per object, which `token_sync` fsyncs), errors-only logging, and
/// fixed slots.
pub fn config_text(tokens_dir: &Path) -> String {
    format!(
        "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
        tokens_dir.display()
    )
}

/// A directory holding one SoftHSM2 configuration and the token directory
/// it names:
///
/// ```text
/// <root>/softhsm2.conf   written by `create`, naming <root>/tokens
/// <root>/tokens/         one subdirectory per initialized token
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SoftHsmHome {
    root: PathBuf,
}

impl SoftHsmHome {
    /// The home at `root` (nothing is created yet).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        SoftHsmHome { root: root.into() }
    }

    /// The home directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/softhsm2.conf`.
    pub fn conf_path(&self) -> PathBuf {
        self.root.join(CONF_FILE)
    }

    /// `<root>/tokens`, SoftHSM2's `directories.tokendir`.
    pub fn tokens_dir(&self) -> PathBuf {
        self.root.join(TOKENS_DIR)
    }

    /// Creates the home and token directories (mode 0700) if missing, and
    /// writes the configuration if it does not exist yet, with a first
    /// comment line saying `written_by`. An existing configuration is left as
    /// it is (an operator may have edited it).
    ///
    /// # Errors
    /// `HsmError::SoftHsmSetup` with the path and the I/O error.
    pub fn create(&self, written_by: &str) -> Result<()> {
        let setup = |path: &Path| {
            let path = path.to_owned();
            move |source| HsmError::SoftHsmSetup { path, source }
        };
        let tokens_dir = self.tokens_dir();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&tokens_dir)
            .map_err(setup(&tokens_dir))?;
        let conf = self.conf_path();
        let text = format!("# Written by {written_by}.\n{}", config_text(&tokens_dir));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&conf)
        {
            Ok(mut file) => file
                .write_all(text.as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(setup(&conf)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(setup(&conf)(e)),
        }
    }

    /// Points SoftHSM2 at this home's configuration (see [`use_config`]).
    ///
    /// # Errors
    /// As [`use_config`].
    pub fn use_config(&self) -> Result<()> {
        use_config(&self.conf_path())
    }
}

/// Points SoftHSM2 at the configuration file `conf` by setting
/// `SOFTHSM2_CONF` for this process.
///
/// Call it before any other thread of the process exists (dev mode and the
/// bench call it from `main` before the async runtime starts; the test harness
/// from its one-time initializer, before any test loads a module) and before
/// any PKCS#11 module is loaded, since SoftHSM2 reads the variable only at
/// C_Initialize. Setting the value it already has does nothing.
///
/// # Errors
/// `HsmError::Config` (field `SOFTHSM2_CONF`) if a PKCS#11 module is already
/// loaded in this process: SoftHSM2 would silently keep its old configuration.
pub fn use_config(conf: &Path) -> Result<()> {
    if std::env::var_os(CONF_ENV).is_some_and(|current| current == conf.as_os_str()) {
        return Ok(());
    }
    if crate::module::any_loaded() {
        return Err(HsmError::Config {
            field: "SOFTHSM2_CONF",
            reason: "set after a PKCS#11 module was loaded; SoftHSM2 reads it only at C_Initialize"
                .into(),
        });
    }
    set_conf_env(conf);
    Ok(())
}

#[allow(unsafe_code)]
fn set_conf_env(conf: &Path) {
    // SAFETY: set_var races with a concurrent getenv in another thread. The
    // rule of `use_config` is that it runs before any other thread exists:
    // `kms serve --dev` and `kms-bench run` call it from `main` before the
    // async runtime is built. The test harness calls it once, inside a
    // OnceLock initializer, before any PKCS#11 module is loaded in the
    // process; other test threads may exist there, but none of our code reads
    // the environment concurrently, and nextest (our runner) gives each test
    // its own process. SoftHSM2 offers no other way to choose its
    // configuration.
    unsafe { std::env::set_var(CONF_ENV, conf) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_names_the_token_directory_and_the_file_backend() {
        let text = config_text(Path::new("/data/softhsm/tokens"));
        assert_eq!(
            text,
            "directories.tokendir = /data/softhsm/tokens\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n"
        );
    }

    #[test]
    fn create_writes_once_and_keeps_an_existing_configuration() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let home = SoftHsmHome::new(dir.path().join("softhsm"));
        home.create("a test").expect("create");
        let written = std::fs::read_to_string(home.conf_path()).expect("read");
        assert_eq!(
            written,
            format!("# Written by a test.\n{}", config_text(&home.tokens_dir()))
        );
        assert!(home.tokens_dir().is_dir());
        let mode = std::fs::metadata(home.tokens_dir())
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);

        std::fs::write(home.conf_path(), "# edited\n").expect("edit");
        home.create("a second run").expect("create again");
        assert_eq!(
            std::fs::read_to_string(home.conf_path()).expect("read"),
            "# edited\n"
        );
    }
}
