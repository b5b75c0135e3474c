//! The one place where host paths become real paths.
//!
//! Every file soci-node reads or writes is named by its path on the node
//! (`/etc/containerd/config.toml`) and resolved here against `--root`, so any
//! command can run against a fixture tree and nothing is hard-wired to `/`.

use std::path::{Component, Path, PathBuf};

/// Host paths soci-node knows about. Kept together so a reader sees every
/// file the tool may touch in one place.
pub mod known {
    pub const SETTINGS: &str = "/etc/soci-node/config.toml";
    pub const CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";
    pub const SOCI_CONFIG: &str = "/etc/soci-snapshotter-grpc/config.toml";
    pub const KUBELET_DROPIN_DIR: &str = "/etc/kubernetes/kubelet/config.json.d";
    pub const KUBELET_DROPIN_NAME: &str = "40-soci-node-image-service.conf";
    pub const STATE_DIR: &str = "/var/lib/soci-node";
    pub const BACKUP_DIR: &str = "/var/lib/soci-node/backup";
    pub const RUN_DIR: &str = "/run/soci-node";
    pub const STATUS: &str = "/run/soci-node/status.json";
    pub const LOCK: &str = "/run/soci-node/lock";
    pub const SOCI_ADDRESS: &str = "/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock";
    pub const SOCI_ROOT: &str = "/var/lib/soci-snapshotter-grpc";
    pub const CONTAINERD_ROOT: &str = "/var/lib/containerd";
    pub const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";
    pub const CONTAINERD_BIN: &str = "/usr/bin/containerd";
    pub const CTR_BIN: &str = "/usr/bin/ctr";
    pub const EKS_PAUSE_TAR: &str = "/etc/eks/pause.tar";
    pub const SOCI_GRPC_BIN: &str = "/usr/bin/soci-snapshotter-grpc";
    pub const SOCI_BIN: &str = "/usr/bin/soci";
    pub const NODEADM_BIN: &str = "/usr/bin/nodeadm";
    pub const FUSE_DEV: &str = "/dev/fuse";
    pub const PROC_MDSTAT: &str = "/proc/mdstat";
    pub const PROC_MOUNTINFO: &str = "/proc/self/mountinfo";
    pub const PROC_MEMINFO: &str = "/proc/meminfo";
    pub const SYS_BLOCK: &str = "/sys/block";
    pub const SYS_CPU_ONLINE: &str = "/sys/devices/system/cpu/online";
    pub const DISK_BY_ID: &str = "/dev/disk/by-id";
    pub const DOCKER_CONFIG: &str = "/root/.docker/config.json";
    pub const KUBECONFIG: &str = "/var/lib/kubelet/kubeconfig";
    pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    root: PathBuf,
}

impl Host {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Host { root: root.into() }
    }

    /// The live node: every path is used as is.
    pub fn live() -> Self {
        Host::new("/")
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// True when paths are not redirected (the command acts on this machine).
    pub fn is_live(&self) -> bool {
        self.root == Path::new("/")
    }

    /// Resolve a host path (absolute, as seen on the node) under the root.
    /// Relative paths are taken as relative to the host's `/`. `..` cannot
    /// climb out of the root.
    pub fn path(&self, host_path: impl AsRef<Path>) -> PathBuf {
        let mut out = self.root.clone();
        for c in host_path.as_ref().components() {
            match c {
                Component::Normal(p) => out.push(p),
                Component::ParentDir => {
                    if out != self.root {
                        out.pop();
                    }
                }
                Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            }
        }
        out
    }

    /// The host path of a real path under the root (inverse of [`Host::path`]),
    /// for messages that should name the file as an operator knows it.
    pub fn host_path_of(&self, real: &Path) -> PathBuf {
        match real.strip_prefix(&self.root) {
            Ok(rest) => Path::new("/").join(rest),
            Err(_) => real.to_path_buf(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_root_is_identity() {
        let h = Host::live();
        assert_eq!(
            h.path("/etc/containerd/config.toml"),
            PathBuf::from("/etc/containerd/config.toml")
        );
        assert!(h.is_live());
    }

    #[test]
    fn fixture_root_prefixes_and_cannot_escape() {
        let h = Host::new("/tmp/r");
        assert_eq!(h.path("/etc/x"), PathBuf::from("/tmp/r/etc/x"));
        assert_eq!(h.path("etc/x"), PathBuf::from("/tmp/r/etc/x"));
        assert_eq!(h.path("/../../etc/x"), PathBuf::from("/tmp/r/etc/x"));
        assert_eq!(h.path("/etc/../var/y"), PathBuf::from("/tmp/r/var/y"));
        assert!(!h.is_live());
        assert_eq!(
            h.host_path_of(Path::new("/tmp/r/etc/x")),
            PathBuf::from("/etc/x")
        );
    }
}
