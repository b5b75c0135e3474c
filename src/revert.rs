//! `soci-node revert`: put back every file soci-node changed, byte for byte.
//!
//! The backups under `/var/lib/soci-node/backup/` mirror host paths: the
//! original of `/etc/containerd/config.toml` is at
//! `/var/lib/soci-node/backup/etc/containerd/config.toml`, and an empty
//! `<path>.absent` marker means soci-node created that file (so reverting
//! removes it). Originals are written back atomically with the backup's mode;
//! created files are removed; then the backup tree goes, so the next
//! preflight (if the package is still installed) takes fresh backups of what
//! it finds then.
//!
//! Order matters for a node that may crash mid-way: originals are restored
//! first (containerd's config among them: that is the switch back to its
//! own snapshotter), created files (SOCI's config, kubelet's drop-in) are
//! removed after, and the backup tree only when everything else succeeded,
//! so a failed revert can simply be run again.
//!
//! Restarting units is the caller's business (`revert` without
//! `--no-restart` in the CLI).

use crate::fsio::{self, FsError};
use crate::hostpath::{known, Host};
use serde::Serialize;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const LOCK_TIMEOUT: Duration = Duration::from_secs(60);
const ABSENT_SUFFIX: &str = ".absent";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RevertReport {
    /// Host paths written back from their backups.
    pub restored: Vec<String>,
    /// Host paths soci-node had created, now removed.
    pub removed: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RevertError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("{path}: cannot read the backup tree: {source}; check its permissions (nothing was changed after this point; run revert again once fixed)")]
    Walk {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot read this backup: {source}; restore it by hand from {backup} (the backup tree is kept)")]
    ReadBackup {
        path: String,
        backup: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot set mode {mode:o}: {source} (the backup tree is kept)")]
    Mode {
        path: String,
        mode: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot remove the backup tree: {source}; remove it by hand, or the next preflight keeps these old originals")]
    RemoveBackups {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// One entry of the backup tree.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    /// `backup` holds the original of `host_path`.
    Original { host_path: String, backup: PathBuf },
    /// `host_path` did not exist before soci-node.
    Created { host_path: String },
}

/// Restore every backed-up file, remove every file soci-node created, and
/// remove the backup tree. Takes soci-node's lock, so it never interleaves
/// with a preflight. With no backups it does nothing and succeeds.
pub fn revert(host: &Host) -> Result<RevertReport, RevertError> {
    let _lock = fsio::lock(&host.path(known::LOCK), LOCK_TIMEOUT)?;
    let backup_root = host.path(known::BACKUP_DIR);
    let entries = scan(&backup_root)?;
    let mut report = RevertReport::default();

    // Originals first: containerd's config going back is the switch away
    // from SOCI; SOCI's own files go after it.
    for e in &entries {
        if let Entry::Original { host_path, backup } = e {
            restore_one(host, host_path, backup)?;
            tracing::info!(path = %host_path, "restored from backup");
            report.restored.push(host_path.clone());
        }
    }
    for e in &entries {
        if let Entry::Created { host_path } = e {
            if fsio::remove(&host.path(host_path))? {
                tracing::info!(path = %host_path, "removed (created by soci-node)");
                report.removed.push(host_path.clone());
            }
        }
    }
    match std::fs::remove_dir_all(&backup_root) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(RevertError::RemoveBackups {
                path: known::BACKUP_DIR.into(),
                source,
            })
        }
    }
    Ok(report)
}

fn restore_one(host: &Host, host_path: &str, backup: &Path) -> Result<(), RevertError> {
    let shown_backup = host.host_path_of(backup).display().to_string();
    let read_err = |source| RevertError::ReadBackup {
        path: host_path.to_string(),
        backup: shown_backup.clone(),
        source,
    };
    let bytes = std::fs::read(backup).map_err(read_err)?;
    let mode = std::fs::metadata(backup)
        .map_err(read_err)?
        .permissions()
        .mode()
        & 0o7777;
    let real = host.path(host_path);
    fsio::write_atomic(&real, &bytes, mode)?;
    // write_atomic keeps the mode of a file it replaces; the original's
    // mode is the backup's.
    let now = std::fs::metadata(&real)
        .map(|m| m.permissions().mode() & 0o7777)
        .ok();
    if now != Some(mode) {
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(mode)).map_err(
            |source| RevertError::Mode {
                path: host_path.to_string(),
                mode,
                source,
            },
        )?;
    }
    Ok(())
}

/// Every entry of the backup tree, sorted by host path. A missing tree is
/// an empty list.
fn scan(backup_root: &Path) -> Result<Vec<Entry>, RevertError> {
    let mut out = Vec::new();
    walk(backup_root, backup_root, &mut out)?;
    out.sort_by(|a, b| key(a).cmp(key(b)));
    Ok(out)
}

fn key(e: &Entry) -> &str {
    match e {
        Entry::Original { host_path, .. } | Entry::Created { host_path } => host_path,
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<Entry>) -> Result<(), RevertError> {
    let walk_err = |p: &Path| {
        let path = p.display().to_string();
        move |source| RevertError::Walk { path, source }
    };
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir == root => return Ok(()),
        Err(e) => return Err(walk_err(dir)(e)),
    };
    for ent in rd {
        let ent = ent.map_err(walk_err(dir))?;
        let p = ent.path();
        let ft = ent.file_type().map_err(walk_err(&p))?;
        if ft.is_dir() {
            walk(root, &p, out)?;
            continue;
        }
        if !ft.is_file() {
            // soci-node only ever writes regular files there.
            tracing::warn!(path = %p.display(), "not a regular file in the backup tree; ignored");
            continue;
        }
        let Ok(rel) = p.strip_prefix(root) else {
            continue;
        };
        let host_path = format!("/{}", rel.display());
        // Temp files of an interrupted write_atomic are not backups.
        let name = ent.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(".soci-node.") && name.ends_with(".tmp") {
            continue;
        }
        // Markers are empty; a backed-up original whose name happens to end
        // in `.absent` has content (or a marker for itself beside it).
        let is_marker = host_path.ends_with(ABSENT_SUFFIX)
            && ent.metadata().map(|m| m.len() == 0).unwrap_or(false);
        if is_marker {
            let target = host_path[..host_path.len() - ABSENT_SUFFIX.len()].to_string();
            // A marker and an original for the same path cannot both be
            // right; backup_once writes one or the other. Trust the original.
            let original = name.strip_suffix(ABSENT_SUFFIX).unwrap_or(&name);
            if !p.with_file_name(original).is_file() {
                out.push(Entry::Created { host_path: target });
                continue;
            }
        }
        out.push(Entry::Original {
            host_path,
            backup: p,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn host() -> (tempfile::TempDir, Host) {
        let d = tempfile::tempdir().unwrap();
        let h = Host::new(d.path());
        (d, h)
    }

    fn write(h: &Host, host_path: &str, text: &str, mode: u32) {
        let p = h.path(host_path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, text).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn restores_originals_removes_created_files_and_the_backup_tree() {
        let (_d, h) = host();
        let cfg = "/etc/containerd/config.toml";
        let soci = "/etc/soci-snapshotter-grpc/config.toml";
        let dropin = "/etc/kubernetes/kubelet/config.json.d/40-soci-node-image-service.conf";
        write(&h, cfg, "version = 2\n# original, no newline at end", 0o600);
        assert_eq!(fsio::backup_once(&h, cfg).unwrap(), fsio::Backup::Saved);
        assert_eq!(
            fsio::backup_once(&h, soci).unwrap(),
            fsio::Backup::MarkedAbsent
        );
        assert_eq!(
            fsio::backup_once(&h, dropin).unwrap(),
            fsio::Backup::MarkedAbsent
        );
        // What a preflight does afterwards.
        write(&h, cfg, "patched\n", 0o644);
        write(&h, soci, "generated\n", 0o644);
        write(&h, dropin, "{}\n", 0o644);

        let r = revert(&h).unwrap();
        assert_eq!(r.restored, [cfg]);
        assert_eq!(r.removed, [dropin, soci]);
        assert_eq!(
            fs::read(h.path(cfg)).unwrap(),
            b"version = 2\n# original, no newline at end"
        );
        assert_eq!(mode(&h.path(cfg)), 0o600, "the original's mode");
        assert!(!h.path(soci).exists());
        assert!(!h.path(dropin).exists());
        assert!(!h.path(known::BACKUP_DIR).exists());
        // Nothing left but directories (and the lock).
        let leftovers: Vec<_> = walkdir(h.root())
            .into_iter()
            .filter(|p| p.is_file() && !p.ends_with("run/soci-node/lock"))
            .collect();
        assert_eq!(leftovers, [h.path(cfg)]);
    }

    fn walkdir(p: &Path) -> Vec<PathBuf> {
        let mut v = vec![];
        if let Ok(rd) = fs::read_dir(p) {
            for e in rd.flatten() {
                v.push(e.path());
                if e.path().is_dir() {
                    v.extend(walkdir(&e.path()));
                }
            }
        }
        v
    }

    #[test]
    fn second_revert_and_no_backups_do_nothing() {
        let (_d, h) = host();
        assert_eq!(revert(&h).unwrap(), RevertReport::default());
        write(&h, "/etc/a.toml", "a", 0o644);
        fsio::backup_once(&h, "/etc/a.toml").unwrap();
        write(&h, "/etc/a.toml", "b", 0o644);
        assert_eq!(revert(&h).unwrap().restored, ["/etc/a.toml"]);
        assert_eq!(revert(&h).unwrap(), RevertReport::default());
        assert_eq!(fs::read_to_string(h.path("/etc/a.toml")).unwrap(), "a");
    }

    #[test]
    fn a_created_file_already_gone_and_an_unchanged_original_are_fine() {
        let (_d, h) = host();
        fsio::backup_once(&h, "/etc/new.conf").unwrap();
        write(&h, "/etc/same.toml", "same", 0o640);
        fsio::backup_once(&h, "/etc/same.toml").unwrap();
        let ino = fs::metadata(h.path("/etc/same.toml")).unwrap();
        let r = revert(&h).unwrap();
        // Not there: nothing to remove, nothing reported.
        assert!(r.removed.is_empty(), "{r:?}");
        assert_eq!(r.restored, ["/etc/same.toml"]);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            fs::metadata(h.path("/etc/same.toml")).unwrap().ino(),
            ino.ino(),
            "identical file rewritten"
        );
    }

    #[test]
    fn an_original_whose_name_ends_in_absent_is_restored_not_removed() {
        let (_d, h) = host();
        write(&h, "/etc/x.absent", "real content", 0o644);
        fsio::backup_once(&h, "/etc/x.absent").unwrap();
        write(&h, "/etc/x.absent", "changed", 0o644);
        let r = revert(&h).unwrap();
        assert_eq!(r.restored, ["/etc/x.absent"]);
        assert!(r.removed.is_empty());
        assert_eq!(
            fs::read_to_string(h.path("/etc/x.absent")).unwrap(),
            "real content"
        );
    }

    #[test]
    fn leftover_temp_files_are_ignored() {
        let (_d, h) = host();
        let tmp = h.path(known::BACKUP_DIR).join("etc/.soci-node.abc.tmp");
        fs::create_dir_all(tmp.parent().unwrap()).unwrap();
        fs::write(&tmp, "partial").unwrap();
        assert_eq!(revert(&h).unwrap(), RevertReport::default());
        assert!(!h.path("/etc/.soci-node.abc").exists());
    }

    #[test]
    fn waits_for_the_lock() {
        let (_d, h) = host();
        let held = fsio::lock(&h.path(known::LOCK), Duration::from_secs(1)).unwrap();
        let h2 = h.clone();
        let t = std::thread::spawn(move || {
            let started = std::time::Instant::now();
            revert(&h2).unwrap();
            started.elapsed()
        });
        std::thread::sleep(Duration::from_millis(300));
        drop(held);
        assert!(t.join().unwrap() >= Duration::from_millis(250));
    }

    #[test]
    fn a_failure_keeps_the_backup_tree() {
        let (_d, h) = host();
        write(&h, "/etc/ro/a.toml", "orig", 0o644);
        fsio::backup_once(&h, "/etc/ro/a.toml").unwrap();
        // The target is a directory now: it cannot be replaced by a file.
        fs::remove_file(h.path("/etc/ro/a.toml")).unwrap();
        fs::create_dir_all(h.path("/etc/ro/a.toml/x")).unwrap();
        let e = revert(&h).unwrap_err();
        assert!(e.to_string().contains("a.toml"), "{e}");
        assert!(fsio::backup_path(&h, "/etc/ro/a.toml").is_file());
    }
}
