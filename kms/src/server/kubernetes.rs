//! The Kubernetes KMS v2 plugin sockets (`[[kubernetes]]`): creating each
//! socket file safely, serving `v2.KeyManagementService` on it under the
//! server's request timeout, drain and admission limits, and removing it
//! again at shutdown.
//!
//! The socket file's rules:
//! - It is created with its final mode and owner before anyone can connect:
//!   bound inside a fresh private directory (0700) next to the target,
//!   chmod/chown'ed there, then hard-linked into place (`link(2)` never
//!   replaces an existing file) and the private name removed.
//! - An existing file at the path is replaced only if it is a socket that
//!   nobody answers on (left by a crashed run): a regular file, a directory
//!   or a symlink is never touched, and a socket with a live listener is
//!   an error ("in use").
//! - At shutdown kms removes the socket only if the path still holds the
//!   very file it created (same device and inode): never a socket another
//!   process put there meanwhile.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::config::KubernetesListener;

/// Why a plugin socket could not be created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SocketError {
    /// Something that is not a socket is at the path: never removed.
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    /// A socket at the path accepts connections: another process serves it.
    #[error("{path} is in use: a process is listening on it")]
    InUse { path: PathBuf },
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_error<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> SocketError + 'a {
    move |source| SocketError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// The socket file this process created; dropping it removes the file if
/// the path still holds that file (same device and inode).
#[derive(Debug)]
pub struct PluginSocket {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl PluginSocket {
    /// Where the socket file is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PluginSocket {
    fn drop(&mut self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if meta.dev() == self.dev && meta.ino() == self.ino => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the Kubernetes plugin socket");
                }
            }
            Ok(_) => tracing::warn!(
                path = %self.path.display(),
                "the Kubernetes plugin socket was replaced by another file; leaving it"
            ),
            Err(_) => {}
        }
    }
}

/// Creates the listener's socket (module doc) and returns the listening
/// socket (non-blocking, for tokio) with its file's guard.
///
/// # Errors
/// [`SocketError::NotASocket`] or [`SocketError::InUse`] for an occupied
/// path; [`SocketError::Io`] naming the step that failed (the directory
/// does not exist or is not writable, chown without the privilege, ...).
pub fn bind(
    settings: &KubernetesListener,
) -> Result<(std::os::unix::net::UnixListener, PluginSocket), SocketError> {
    let path = settings.socket.as_path();
    clear_stale(path)?;
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("/"));
    let staging = Staging::create(parent)?;
    let staged = staging.dir.join("s");
    let listener =
        std::os::unix::net::UnixListener::bind(&staged).map_err(io_error("bind", &staged))?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(settings.mode))
        .map_err(io_error("set the mode of", &staged))?;
    if settings.owner_uid.is_some() || settings.group_gid.is_some() {
        std::os::unix::fs::chown(&staged, settings.owner_uid, settings.group_gid)
            .map_err(io_error("change the owner of", &staged))?;
    }
    std::fs::hard_link(&staged, path).map_err(|source| {
        if source.kind() == io::ErrorKind::AlreadyExists {
            // Someone created a file there since `clear_stale`.
            SocketError::InUse {
                path: path.to_owned(),
            }
        } else {
            SocketError::Io {
                action: "link the socket to",
                path: path.to_owned(),
                source,
            }
        }
    })?;
    let meta = std::fs::symlink_metadata(path).map_err(io_error("inspect", path))?;
    let socket = PluginSocket {
        path: path.to_owned(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    drop(staging);
    listener
        .set_nonblocking(true)
        .map_err(io_error("configure", path))?;
    Ok((listener, socket))
}

/// Removes a stale socket at `path` (one nobody listens on); refuses
/// anything else that is there.
fn clear_stale(path: &Path) -> Result<(), SocketError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error("inspect", path)(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(SocketError::NotASocket {
            path: path.to_owned(),
        });
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(SocketError::InUse {
            path: path.to_owned(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::warn!(path = %path.display(), "replacing a stale Kubernetes plugin socket (nothing listens on it)");
            std::fs::remove_file(path).map_err(io_error("remove the stale socket", path))
        }
        Err(e) => Err(io_error("probe the existing socket", path)(e)),
    }
}

/// A private directory (mode 0700) beside the socket, removed on drop.
struct Staging {
    dir: PathBuf,
}

impl Staging {
    fn create(parent: &Path) -> Result<Staging, SocketError> {
        use ring::rand::SecureRandom;
        let mut bytes = [0u8; 6];
        // Uniqueness only; the directory's mode is the protection.
        let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
        let dir = parent.join(format!(".kms-{}", hex::encode(bytes)));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(io_error("create a private directory", &dir))?;
        Ok(Staging { dir })
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.dir.join("s"));
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory removed with everything in it on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir =
                std::env::temp_dir().join(format!("kms-socket-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("scratch dir");
            Scratch(dir)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn listener(path: &Path, mode: u32) -> KubernetesListener {
        KubernetesListener {
            socket: path.to_owned(),
            key: "alias/kubernetes".into(),
            owner_uid: None,
            group_gid: None,
            mode,
        }
    }

    #[test]
    fn the_socket_gets_its_mode_and_is_removed_only_while_it_is_ours() {
        let dir = Scratch::new("mode");
        let path = dir.path().join("k.sock");
        let (_listener, socket) = bind(&listener(&path, 0o600)).expect("bind");
        let meta = std::fs::symlink_metadata(&path).expect("socket");
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.mode() & 0o7777, 0o600);
        // Nothing but the socket is left in the directory.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["k.sock"]);
        // A live socket is not replaced.
        assert!(matches!(
            bind(&listener(&path, 0o600)),
            Err(SocketError::InUse { .. })
        ));
        drop(socket);
        assert!(!path.exists());

        // Someone else's file at the path survives our shutdown.
        let (_listener, socket) = bind(&listener(&path, 0o660)).expect("bind again");
        assert_eq!(
            std::fs::symlink_metadata(&path).expect("meta").mode() & 0o777,
            0o660
        );
        std::fs::remove_file(&path).expect("remove");
        std::fs::write(&path, b"not ours").expect("write");
        drop(socket);
        assert_eq!(std::fs::read(&path).expect("kept"), b"not ours");
    }

    #[test]
    fn a_stale_socket_is_replaced_and_other_files_are_refused() {
        let dir = Scratch::new("stale");
        let path = dir.path().join("k.sock");
        // A socket whose listener is gone (a crashed run).
        drop(std::os::unix::net::UnixListener::bind(&path).expect("stale"));
        assert!(path.exists());
        let (_listener, socket) = bind(&listener(&path, 0o600)).expect("replace stale");
        std::os::unix::net::UnixStream::connect(&path).expect("ours answers");
        drop(socket);

        std::fs::write(&path, b"data").expect("regular file");
        assert!(matches!(
            bind(&listener(&path, 0o600)),
            Err(SocketError::NotASocket { .. })
        ));
        assert_eq!(std::fs::read(&path).expect("untouched"), b"data");
    }
}
