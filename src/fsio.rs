//! Safe file changes: atomic replace, backups of originals, one lock.
//!
//! A node's configs must never be left half-written: a new version goes to a
//! temp file in the same directory, is synced, renamed over the old one, and
//! the directory is synced, so after a crash either the old or the new file
//! is there. Mode and owner of the old file are kept.

use crate::hostpath::{known, Host};
use nix::fcntl::{Flock, FlockArg};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("{path}: {what}: {source}; {remedy}")]
    Io {
        path: String,
        what: &'static str,
        remedy: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: another soci-node run held the lock for {waited_ms} ms; check `systemctl status soci-node-preflight` and for a hung soci-node process")]
    LockTimeout { path: String, waited_ms: u64 },
}

const FIX_PERMS: &str = "check that the file system is writable and has space";

fn io(
    path: &Path,
    what: &'static str,
    remedy: &'static str,
) -> impl FnOnce(std::io::Error) -> FsError {
    let path = path.display().to_string();
    move |source| FsError::Io {
        path,
        what,
        remedy,
        source,
    }
}

/// Exclusive lock held for the life of the value, so two runs (boot
/// preflight and an SSM `apply`, say) never interleave their writes.
pub struct Lock {
    _flock: Flock<File>,
}

pub fn lock(real_path: &Path, timeout: Duration) -> Result<Lock, FsError> {
    if let Some(dir) = real_path.parent() {
        fs::create_dir_all(dir).map_err(io(dir, "cannot create lock directory", FIX_PERMS))?;
    }
    let started = Instant::now();
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(real_path)
        .map_err(io(real_path, "cannot open lock file", FIX_PERMS))?;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(flock) => return Ok(Lock { _flock: flock }),
            Err((f, nix::errno::Errno::EWOULDBLOCK)) | Err((f, nix::errno::Errno::EINTR)) => {
                if started.elapsed() >= timeout {
                    return Err(FsError::LockTimeout {
                        path: real_path.display().to_string(),
                        waited_ms: started.elapsed().as_millis() as u64,
                    });
                }
                file = f;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err((_, e)) => {
                return Err(FsError::Io {
                    path: real_path.display().to_string(),
                    what: "cannot lock",
                    remedy: FIX_PERMS,
                    source: e.into(),
                })
            }
        }
    }
}

/// Read a text file; `None` when it does not exist.
pub fn read_optional(path: &Path) -> Result<Option<String>, FsError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(String::from_utf8(bytes).map_err(|e| FsError::Io {
            path: path.display().to_string(),
            what: "is not UTF-8 text",
            remedy: "restore the file from its backup or your image",
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path, "cannot read", "check the file's permissions")(e)),
    }
}

/// Replace `path` with `contents` atomically. Returns false (and touches
/// nothing) when the file already has exactly these bytes. A new file gets
/// `new_mode`; an existing one keeps its mode and owner.
pub fn write_atomic(path: &Path, contents: &[u8], new_mode: u32) -> Result<bool, FsError> {
    let existing = fs::metadata(path).ok();
    if existing.is_some() && fs::read(path).ok().as_deref() == Some(contents) {
        return Ok(false);
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(dir).map_err(io(dir, "cannot create directory", FIX_PERMS))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".soci-node.")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(io(dir, "cannot create a temp file", FIX_PERMS))?;
    tmp.write_all(contents)
        .map_err(io(tmp.path(), "cannot write", FIX_PERMS))?;
    let (mode, owner) = match &existing {
        Some(m) => (m.permissions().mode() & 0o7777, Some((m.uid(), m.gid()))),
        None => (new_mode, None),
    };
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io(tmp.path(), "cannot set mode", FIX_PERMS))?;
    if let Some((uid, gid)) = owner {
        // Only when it differs: the preflight unit runs without CAP_CHOWN,
        // and root-owned files (the usual case) need no chown at all.
        let tmp_meta =
            tmp.as_file()
                .metadata()
                .map_err(io(tmp.path(), "cannot stat", FIX_PERMS))?;
        if (tmp_meta.uid(), tmp_meta.gid()) != (uid, gid) {
            std::os::unix::fs::fchown(tmp.as_file(), Some(uid), Some(gid)).map_err(io(
                tmp.path(),
                "cannot set owner",
                FIX_PERMS,
            ))?;
        }
    }
    tmp.as_file()
        .sync_all()
        .map_err(io(tmp.path(), "cannot sync", FIX_PERMS))?;
    tmp.persist(path)
        .map_err(|e| io(path, "cannot rename the new version into place", FIX_PERMS)(e.error))?;
    sync_dir(dir)?;
    Ok(true)
}

/// Remove a file we created; absent is fine.
pub fn remove(path: &Path) -> Result<bool, FsError> {
    match fs::remove_file(path) {
        Ok(()) => {
            sync_dir(path.parent().unwrap_or(Path::new("/")))?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io(path, "cannot remove", FIX_PERMS)(e)),
    }
}

fn sync_dir(dir: &Path) -> Result<(), FsError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir, "cannot sync directory", FIX_PERMS))
}

/// Where the original of `host_path` is kept: the same path under the
/// backup directory.
pub fn backup_path(host: &Host, host_path: &str) -> PathBuf {
    host.path(known::BACKUP_DIR)
        .join(host_path.trim_start_matches('/'))
}

/// Marker meaning "this file did not exist before soci-node": revert removes it.
pub fn absent_marker(host: &Host, host_path: &str) -> PathBuf {
    let mut p = backup_path(host, host_path).into_os_string();
    p.push(".absent");
    PathBuf::from(p)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backup {
    /// The original was copied now.
    Saved,
    /// The file did not exist; a marker was recorded now.
    MarkedAbsent,
    /// A backup was taken by an earlier run and is kept: the first original
    /// is the one `revert` must restore.
    AlreadyKept,
}

/// Keep the original of `host_path` once, before soci-node first changes it.
pub fn backup_once(host: &Host, host_path: &str) -> Result<Backup, FsError> {
    let saved = backup_path(host, host_path);
    let marker = absent_marker(host, host_path);
    if saved.exists() || marker.exists() {
        return Ok(Backup::AlreadyKept);
    }
    let real = host.path(host_path);
    match fs::read(&real) {
        Ok(bytes) => {
            let mode = fs::metadata(&real)
                .map(|m| m.permissions().mode() & 0o7777)
                .unwrap_or(0o644);
            write_atomic(&saved, &bytes, mode)?;
            Ok(Backup::Saved)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            write_atomic(&marker, b"", 0o644)?;
            Ok(Backup::MarkedAbsent)
        }
        Err(e) => Err(io(
            &real,
            "cannot read for backup",
            "check the file's permissions",
        )(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_keeps_mode_and_reports_no_change() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a/b.toml");
        assert!(write_atomic(&p, b"one", 0o600).unwrap());
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        let ino = fs::metadata(&p).unwrap().ino();
        assert!(!write_atomic(&p, b"one", 0o600).unwrap());
        assert_eq!(
            fs::metadata(&p).unwrap().ino(),
            ino,
            "unchanged file was replaced"
        );
        assert!(write_atomic(&p, b"two", 0o600).unwrap());
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o640
        );
        let leftovers: Vec<_> = fs::read_dir(p.parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "temp files left behind");
    }

    #[test]
    fn backup_is_taken_once() {
        let d = tempfile::tempdir().unwrap();
        let host = Host::new(d.path());
        let cfg = host.path("/etc/containerd/config.toml");
        fs::create_dir_all(cfg.parent().unwrap()).unwrap();
        fs::write(&cfg, "original").unwrap();
        assert_eq!(
            backup_once(&host, "/etc/containerd/config.toml").unwrap(),
            Backup::Saved
        );
        fs::write(&cfg, "patched").unwrap();
        assert_eq!(
            backup_once(&host, "/etc/containerd/config.toml").unwrap(),
            Backup::AlreadyKept
        );
        assert_eq!(
            fs::read_to_string(backup_path(&host, "/etc/containerd/config.toml")).unwrap(),
            "original"
        );
        assert_eq!(
            backup_once(&host, "/etc/new.conf").unwrap(),
            Backup::MarkedAbsent
        );
        assert!(absent_marker(&host, "/etc/new.conf").exists());
    }

    #[test]
    fn lock_excludes_and_times_out() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("run/lock");
        let held = lock(&p, Duration::from_secs(1)).unwrap();
        let t = Instant::now();
        let e = lock(&p, Duration::from_millis(100)).err().unwrap();
        assert!(matches!(e, FsError::LockTimeout { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(2));
        drop(held);
        lock(&p, Duration::from_millis(100)).unwrap();
    }
}
