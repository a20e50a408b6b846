//! Creating the QMP unix socket: owner-only from the first instant.
//!
//! A unix socket file takes its mode from the umask at `bind()` time, and
//! the umask is process-wide, so changing it would race with every other
//! thread creating files. Instead the socket is bound inside a fresh
//! private directory (mode 0700, so nobody else can reach it whatever the
//! socket's own mode), chmod-ed to 0600 there, and then renamed onto the
//! requested path. `rename()` is atomic, so the path is either absent, the
//! old file, or the finished 0600 socket; it also replaces a stale socket
//! file left by a crashed process. A socket that still has a listener is
//! not replaced (another Ferry owns it), and neither is anything that is
//! not a socket.

use std::fs::{self, DirBuilder, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Longest path `bind()` takes (`sizeof(sun_path)` minus the NUL).
const SUN_PATH_MAX: usize = 107;

/// Identifies the socket file we created, so shutdown removes only our own file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketFile {
    dev: u64,
    ino: u64,
}

/// Binds a listening unix socket at `path` with mode 0600, replacing a stale socket file.
pub fn bind_private(path: &Path) -> io::Result<(UnixListener, SocketFile)> {
    check_replaceable(path)?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp_dir = private_dir(&parent)?;
    let result = bind_in(&tmp_dir, path);
    // The directory is empty again on success (the socket was renamed away).
    let _ = fs::remove_file(tmp_dir.join("s"));
    let _ = fs::remove_dir(&tmp_dir);
    result
}

fn bind_in(tmp_dir: &Path, path: &Path) -> io::Result<(UnixListener, SocketFile)> {
    let direct = tmp_dir.join("s");
    // Long directories: reach the private directory through /proc instead.
    let dir_handle;
    let bind_path = if direct.as_os_str().len() <= SUN_PATH_MAX {
        direct
    } else {
        dir_handle = File::open(tmp_dir)?;
        PathBuf::from(format!("/proc/self/fd/{}/s", dir_handle.as_raw_fd()))
    };
    let listener = UnixListener::bind(&bind_path)?;
    fs::set_permissions(&bind_path, fs::Permissions::from_mode(0o600))?;
    fs::rename(&bind_path, path)?;
    let meta = fs::symlink_metadata(path)?;
    Ok((
        listener,
        SocketFile {
            dev: meta.dev(),
            ino: meta.ino(),
        },
    ))
}

/// Creates a fresh 0700 directory beside the target.
fn private_dir(parent: &Path) -> io::Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = parent.join(format!(".ferry-qmp-{}-{n}", std::process::id()));
        match DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Fails unless `path` is absent or a socket nobody listens on.
fn check_replaceable(path: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; not replacing it",
                path.display()
            ),
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{} is in use by a running server", path.display()),
        )),
        // Refused (or anything else): nobody is serving it, so it is stale.
        Err(_) => Ok(()),
    }
}

/// Removes `path` if it is still the socket file we created.
pub fn remove_if_ours(path: &Path, ours: SocketFile) {
    if let Ok(meta) = fs::symlink_metadata(path) {
        if meta.dev() == ours.dev && meta.ino() == ours.ino {
            let _ = fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("ferry-qmp-listener-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn socket_is_created_with_mode_0600_and_removed_only_if_ours() {
        let dir = temp_dir("mode");
        let path = dir.join("qmp.sock");
        let (listener, ours) = bind_private(&path).unwrap();
        let meta = fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // Reachable under the final name, and no temporary directory left behind.
        let _client = UnixStream::connect(&path).unwrap();
        assert!(listener.accept().is_ok());
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        remove_if_ours(&path, ours);
        assert!(!path.exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stale_socket_is_replaced_but_live_socket_and_files_are_not() {
        let dir = temp_dir("stale");
        let path = dir.join("qmp.sock");
        drop(UnixListener::bind(&path).unwrap()); // leaves a stale file
        let (live, ours) = bind_private(&path).unwrap();
        let err = bind_private(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        drop(live);
        remove_if_ours(&path, ours);
        fs::write(&path, b"precious").unwrap();
        let err = bind_private(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&path).unwrap(), b"precious");
        // A foreign socket file at the path is not removed by shutdown.
        fs::remove_file(&path).unwrap();
        let (_l, ours) = bind_private(&path).unwrap();
        fs::remove_file(&path).unwrap();
        let _other = UnixListener::bind(&path).unwrap();
        remove_if_ours(&path, ours);
        assert!(path.exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn long_directory_paths_bind_through_proc() {
        let dir = temp_dir("long");
        // The final path fits in sun_path, the temporary one beside it does not.
        let filler = 100 - dir.as_os_str().len() - 1;
        let deep = dir.join("d".repeat(filler));
        fs::create_dir_all(&deep).unwrap();
        let path = deep.join("q");
        assert!(path.as_os_str().len() <= SUN_PATH_MAX);
        let tmp = deep.join(format!(".ferry-qmp-{}-0/s", std::process::id()));
        assert!(tmp.as_os_str().len() > SUN_PATH_MAX);
        let (listener, _) = bind_private(&path).unwrap();
        let _client = UnixStream::connect(&path).unwrap();
        assert!(listener.accept().is_ok());
        fs::remove_dir_all(&dir).unwrap();
    }
}
