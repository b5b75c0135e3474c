//! Disks: instance-store NVMe, md RAID arrays, where SOCI's and containerd's
//! roots live, and how much space they have.
//!
//! Parsers of `/proc/mdstat` and `/proc/self/mountinfo` are pure; `gather`
//! reads the (root-relative) files and never fails: absent files mean absent
//! hardware.

use crate::hostpath::{known, Host};
use serde::Serialize;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockDevice {
    pub name: String,
    pub model: Option<String>,
    pub size_bytes: Option<u64>,
    pub dev: Option<(u32, u32)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MdArray {
    /// Kernel name, e.g. `md127`.
    pub name: String,
    pub level: Option<String>,
    pub raid_disks: Option<u32>,
    /// Member devices (kernel names, partitions included), e.g. `nvme1n1`.
    pub members: Vec<String>,
    pub active: bool,
    pub dev: Option<(u32, u32)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mount {
    pub major: u32,
    pub minor: u32,
    /// The directory of the source file system that is mounted (bind mounts
    /// of a subdirectory show it here).
    pub root: String,
    pub mount_point: String,
    pub fstype: String,
    pub source: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Placement {
    pub host_path: String,
    pub mount_point: Option<String>,
    pub fstype: Option<String>,
    pub source: Option<String>,
    pub device: Option<(u32, u32)>,
    pub on_instance_store: bool,
    /// What backs the device, e.g. `md127 (raid0: nvme1n1, nvme2n1)`.
    pub backing: Option<String>,
    pub free_bytes: Option<u64>,
    pub total_bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StorageFacts {
    pub instance_store_disks: Vec<BlockDevice>,
    pub arrays: Vec<MdArray>,
    pub soci_root: Placement,
    pub containerd_root: Placement,
    pub notes: Vec<String>,
}

/// `/proc/mdstat`: one entry per `mdN : active raid0 nvme2n1[1] nvme1n1[0]`.
pub fn parse_mdstat(text: &str) -> Vec<MdArray> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((name, rest)) = line.split_once(" : ") else {
            continue;
        };
        let name = name.trim();
        if !name.starts_with("md") {
            continue;
        }
        let mut words = rest.split_whitespace().peekable();
        let state = words.next().unwrap_or("");
        let active = state == "active";
        // Optional "(read-only)" / "(auto-read-only)" after the state.
        while words.peek().is_some_and(|w| w.starts_with('(')) {
            words.next();
        }
        let mut level = None;
        if let Some(w) = words.peek() {
            if w.starts_with("raid") || *w == "linear" || *w == "multipath" {
                level = Some(w.to_string());
                words.next();
            }
        }
        let members = words
            .filter_map(|w| w.split('[').next())
            .filter(|m| !m.is_empty())
            .map(str::to_string)
            .collect();
        out.push(MdArray {
            name: name.to_string(),
            level,
            raid_disks: None,
            members,
            active,
            dev: None,
        });
    }
    out
}

/// Decode the octal escapes the kernel uses in mountinfo (`\040` = space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `/proc/self/mountinfo` (proc(5)): `id parent major:minor root mount_point
/// options [optional fields...] - fstype source super_options`.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split_whitespace().collect();
            let r: Vec<&str> = right.split_whitespace().collect();
            if l.len() < 5 || r.len() < 2 {
                return None;
            }
            let (major, minor) = l[2].split_once(':')?;
            Some(Mount {
                major: major.parse().ok()?,
                minor: minor.parse().ok()?,
                root: unescape(l[3]),
                mount_point: unescape(l[4]),
                fstype: r[0].to_string(),
                source: unescape(r[1]),
            })
        })
        .collect()
}

/// The mount a path lives on: the longest mount point that is a
/// path-component prefix; of stacked mounts the last one wins.
pub fn mount_for<'a>(mounts: &'a [Mount], host_path: &str) -> Option<&'a Mount> {
    let path = Path::new(host_path);
    let mut best: Option<&Mount> = None;
    for m in mounts {
        if path.starts_with(&m.mount_point)
            && best.is_none_or(|b| m.mount_point.len() >= b.mount_point.len())
        {
            best = Some(m);
        }
    }
    best
}

fn read_trim(host: &Host, p: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(host.path(p))
        .ok()
        .map(|s| s.trim().to_string())
}

fn parse_dev(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

fn list_dir(host: &Host, p: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(host.path(p))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

pub fn gather(
    host: &Host,
    instance_store_model: &str,
    soci_root: &str,
    containerd_root: &str,
) -> StorageFacts {
    let mut notes = Vec::new();
    let sys_block = known::SYS_BLOCK;

    // Disks named by udev's by-id links as instance storage count too, in
    // case the model string differs (e.g. a new instance family).
    let by_id: Vec<String> = list_dir(host, known::DISK_BY_ID)
        .into_iter()
        .filter(|n| n.contains("NVMe_Instance_Storage"))
        .filter_map(|n| {
            let target =
                std::fs::read_link(host.path(format!("{}/{n}", known::DISK_BY_ID))).ok()?;
            Some(target.file_name()?.to_string_lossy().into_owned())
        })
        .collect();

    let mut disks = Vec::new();
    for name in list_dir(host, sys_block) {
        if !name.starts_with("nvme") {
            continue;
        }
        let model = read_trim(host, format!("{sys_block}/{name}/device/model"));
        let by_model = model.as_deref() == Some(instance_store_model);
        if by_model || by_id.contains(&name) {
            disks.push(BlockDevice {
                size_bytes: read_trim(host, format!("{sys_block}/{name}/size"))
                    .and_then(|s| s.parse::<u64>().ok())
                    .map(|s| s * 512),
                dev: read_trim(host, format!("{sys_block}/{name}/dev")).and_then(|s| parse_dev(&s)),
                name,
                model,
            });
        }
    }

    let mut arrays = read_trim(host, known::PROC_MDSTAT)
        .map(|t| parse_mdstat(&t))
        .unwrap_or_default();
    for a in &mut arrays {
        let base = format!("{sys_block}/{}", a.name);
        if let Some(l) = read_trim(host, format!("{base}/md/level")) {
            a.level = Some(l);
        }
        a.raid_disks =
            read_trim(host, format!("{base}/md/raid_disks")).and_then(|s| s.parse().ok());
        a.dev = read_trim(host, format!("{base}/dev")).and_then(|s| parse_dev(&s));
        let slaves = list_dir(host, &format!("{base}/slaves"));
        if !slaves.is_empty() {
            a.members = slaves;
        }
    }

    // A member is on instance store when it is such a disk or a partition
    // of one (nvme1n1p1 lives under /sys/block/nvme1n1/).
    let is_store_dev = |name: &str| {
        disks.iter().any(|d| {
            name == d.name || (name.starts_with(&d.name) && name[d.name.len()..].starts_with('p'))
        })
    };
    let mounts = read_trim(host, known::PROC_MOUNTINFO)
        .map(|t| parse_mountinfo(&t))
        .unwrap_or_default();
    if mounts.is_empty() {
        notes.push(format!(
            "{} not readable: mounts unknown",
            known::PROC_MOUNTINFO
        ));
    }

    let placement = |path: &str| -> Placement {
        let m = mount_for(&mounts, path);
        let device = m.map(|m| (m.major, m.minor));
        let mut on_store = false;
        let mut backing = None;
        if let Some(dev) = device {
            if let Some(a) = arrays.iter().find(|a| a.dev == Some(dev)) {
                on_store =
                    a.active && !a.members.is_empty() && a.members.iter().all(|m| is_store_dev(m));
                backing = Some(format!(
                    "{} ({}: {})",
                    a.name,
                    a.level.as_deref().unwrap_or("?"),
                    a.members.join(", ")
                ));
            } else if let Some(d) = disks.iter().find(|d| d.dev == Some(dev)) {
                on_store = true;
                backing = Some(d.name.clone());
            } else {
                // A partition of an instance-store disk.
                for d in &disks {
                    for part in list_dir(host, &format!("{sys_block}/{}", d.name)) {
                        if part.starts_with(&d.name)
                            && read_trim(host, format!("{sys_block}/{}/{part}/dev", d.name))
                                .and_then(|s| parse_dev(&s))
                                == Some(dev)
                        {
                            on_store = true;
                            backing = Some(part);
                        }
                    }
                }
            }
        }
        let (free_bytes, total_bytes) = space(host, path);
        Placement {
            host_path: path.to_string(),
            mount_point: m.map(|m| m.mount_point.clone()),
            fstype: m.map(|m| m.fstype.clone()),
            source: m.map(|m| m.source.clone()),
            device,
            on_instance_store: on_store,
            backing,
            free_bytes,
            total_bytes,
        }
    };
    let soci = placement(soci_root);
    let containerd = placement(containerd_root);
    StorageFacts {
        instance_store_disks: disks.clone(),
        arrays: arrays.clone(),
        soci_root: soci,
        containerd_root: containerd,
        notes,
    }
}

/// statvfs of the path, or of its nearest existing ancestor (a root that
/// does not exist yet will be created on the same file system).
fn space(host: &Host, host_path: &str) -> (Option<u64>, Option<u64>) {
    let mut p = host.path(host_path);
    loop {
        if p.exists() {
            return match nix::sys::statvfs::statvfs(&p) {
                Ok(s) => {
                    let frsize = s.fragment_size();
                    (
                        Some(s.blocks_available() * frsize),
                        Some(s.blocks() * frsize),
                    )
                }
                Err(_) => (None, None),
            };
        }
        if !p.pop() {
            return (None, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    const MDSTAT: &str = "Personalities : [raid0] \nmd127 : active raid0 nvme2n1[1] nvme1n1[0]\n      3749456896 blocks super 1.2 512k chunks\n      \nunused devices: <none>\n";

    // nodeadm's setup-local-disks: /dev/md/kubernetes (md127) as xfs on
    // /mnt/k8s-disks/0, bind-mounted over the runtime roots.
    const MOUNTINFO: &str = "\
22 1 259:1 / / rw,noatime shared:1 - xfs /dev/nvme0n1p1 rw,attr2
40 22 9:127 / /mnt/k8s-disks/0 rw,noatime shared:20 - xfs /dev/md127 rw,attr2
41 22 9:127 /kubelet /var/lib/kubelet rw,noatime shared:20 - xfs /dev/md127 rw,attr2
42 22 9:127 /containerd /var/lib/containerd rw,noatime shared:20 - xfs /dev/md127 rw,attr2
43 22 9:127 /soci-snapshotter-grpc /var/lib/soci-snapshotter-grpc rw,noatime shared:20 - xfs /dev/md127 rw,attr2
50 22 0:50 / /mnt/with\\040space rw - tmpfs tmpfs rw
";

    #[test]
    fn mdstat() {
        let a = parse_mdstat(MDSTAT);
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].name, "md127");
        assert_eq!(a[0].level.as_deref(), Some("raid0"));
        assert_eq!(a[0].members, ["nvme2n1", "nvme1n1"]);
        assert!(a[0].active);
        let inactive = parse_mdstat("md0 : inactive nvme1n1[0](S)\n");
        assert!(!inactive[0].active);
        assert_eq!(inactive[0].level, None);
        assert_eq!(inactive[0].members, ["nvme1n1"]);
        assert!(parse_mdstat("Personalities : \nunused devices: <none>\n").is_empty());
    }

    #[test]
    fn mountinfo_and_longest_prefix() {
        let m = parse_mountinfo(MOUNTINFO);
        assert_eq!(m.len(), 6);
        assert_eq!(m[5].mount_point, "/mnt/with space");
        let c = mount_for(
            &m,
            "/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs",
        )
        .unwrap();
        assert_eq!((c.major, c.minor, c.root.as_str()), (9, 127, "/containerd"));
        assert_eq!(
            mount_for(&m, "/var/lib/containerdx").unwrap().mount_point,
            "/"
        );
        assert_eq!(mount_for(&m, "/etc").unwrap().source, "/dev/nvme0n1p1");
    }

    fn write(root: &Path, p: &str, s: &str) {
        let p = root.join(p.trim_start_matches('/'));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, s).unwrap();
    }

    /// The two-disk RAID0 node as a fixture tree.
    pub(crate) fn raid0_tree(root: &Path) {
        write(root, "/proc/mdstat", MDSTAT);
        write(root, "/proc/self/mountinfo", MOUNTINFO);
        for (n, dev) in [
            ("nvme0n1", "259:0"),
            ("nvme1n1", "259:2"),
            ("nvme2n1", "259:3"),
        ] {
            let model = if n == "nvme0n1" {
                "Amazon Elastic Block Store"
            } else {
                "Amazon EC2 NVMe Instance Storage"
            };
            write(
                root,
                &format!("/sys/block/{n}/device/model"),
                &format!("{model}          \n"),
            );
            write(root, &format!("/sys/block/{n}/size"), "1875385008\n");
            write(root, &format!("/sys/block/{n}/dev"), &format!("{dev}\n"));
        }
        write(root, "/sys/block/nvme0n1/nvme0n1p1/dev", "259:1\n");
        write(root, "/sys/block/md127/dev", "9:127\n");
        write(root, "/sys/block/md127/md/level", "raid0\n");
        write(root, "/sys/block/md127/md/raid_disks", "2\n");
        write(root, "/sys/block/md127/slaves/nvme1n1", "");
        write(root, "/sys/block/md127/slaves/nvme2n1", "");
    }

    #[test]
    fn raid0_node_roots_are_on_instance_store() {
        let d = tempfile::tempdir().unwrap();
        raid0_tree(d.path());
        let host = Host::new(d.path());
        let s = gather(
            &host,
            "Amazon EC2 NVMe Instance Storage",
            "/var/lib/soci-snapshotter-grpc",
            "/var/lib/containerd",
        );
        let names: Vec<&str> = s
            .instance_store_disks
            .iter()
            .map(|d| d.name.as_str())
            .collect();
        assert_eq!(names, ["nvme1n1", "nvme2n1"]);
        assert_eq!(s.instance_store_disks[0].size_bytes, Some(1875385008 * 512));
        assert_eq!(s.arrays[0].raid_disks, Some(2));
        assert_eq!(s.arrays[0].dev, Some((9, 127)));
        assert!(s.soci_root.on_instance_store, "{:?}", s.soci_root);
        assert!(s.containerd_root.on_instance_store);
        assert_eq!(
            s.soci_root.backing.as_deref(),
            Some("md127 (raid0: nvme1n1, nvme2n1)")
        );
        assert!(
            s.soci_root.free_bytes.unwrap() > 0,
            "statvfs of the nearest existing ancestor"
        );
    }

    #[test]
    fn wrong_model_or_ebs_root_is_not_instance_store() {
        let d = tempfile::tempdir().unwrap();
        raid0_tree(d.path());
        let host = Host::new(d.path());
        let s = gather(
            &host,
            "QEMU NVMe Ctrl",
            "/var/lib/soci-snapshotter-grpc",
            "/var/lib/containerd",
        );
        assert!(s.instance_store_disks.is_empty());
        assert!(!s.soci_root.on_instance_store);
        // The model is configurable: the by-id link finds disks whatever it says.
        fs::create_dir_all(d.path().join("dev/disk/by-id")).unwrap();
        std::os::unix::fs::symlink(
            "../../nvme1n1",
            d.path()
                .join("dev/disk/by-id/nvme-Amazon_EC2_NVMe_Instance_Storage_AWS1"),
        )
        .unwrap();
        let s = gather(
            &host,
            "QEMU NVMe Ctrl",
            "/var/lib/soci-snapshotter-grpc",
            "/etc",
        );
        assert_eq!(s.instance_store_disks.len(), 1);
        assert!(
            !s.soci_root.on_instance_store,
            "only one of two members is instance store"
        );
        assert!(!s.containerd_root.on_instance_store);
        assert_eq!(s.containerd_root.source.as_deref(), Some("/dev/nvme0n1p1"));
    }

    #[test]
    fn empty_root_means_no_hardware() {
        let d = tempfile::tempdir().unwrap();
        let s = gather(
            &Host::new(d.path()),
            "x",
            "/var/lib/soci-snapshotter-grpc",
            "/var/lib/containerd",
        );
        assert!(s.instance_store_disks.is_empty() && s.arrays.is_empty());
        assert!(!s.soci_root.on_instance_store);
        assert_eq!(s.soci_root.mount_point, None);
        assert!(s.soci_root.free_bytes.is_some());
        assert_eq!(s.notes.len(), 1);
    }

    #[test]
    fn live_host_resolves_root() {
        let s = gather(
            &Host::live(),
            "Amazon EC2 NVMe Instance Storage",
            "/var/lib/soci-snapshotter-grpc",
            "/",
        );
        assert!(s.containerd_root.mount_point.is_some());
        assert!(s.containerd_root.free_bytes.is_some());
    }
}
