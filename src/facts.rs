//! What the node is: binaries and their versions, CPUs and memory, FUSE,
//! EC2 instance (IMDSv2), nodeadm, disks. Gathered fast and bounded; every
//! failure is recorded as a fact, never raised, so the decision can explain it.

use crate::hostpath::{known, Host};
use crate::imds::{self, ImdsFacts};
use crate::nodeadm::{self, NodeadmFacts};
use crate::run;
use crate::settings::Settings;
use crate::storage::{self, StorageFacts};
use crate::version::Version;
use serde::Serialize;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct BinaryFact {
    /// The path as configured (a host path).
    pub path: String,
    pub version: Option<Version>,
    /// First line of `--version`.
    pub raw: Option<String>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Facts {
    pub containerd: BinaryFact,
    pub soci_snapshotter_grpc: BinaryFact,
    pub soci: BinaryFact,
    pub cpus: Option<u32>,
    pub memory_bytes: Option<u64>,
    /// Go-style architecture name (amd64, arm64), as containerd platforms use.
    pub arch: String,
    pub fuse: bool,
    pub docker_config: bool,
    pub imds: ImdsFacts,
    pub nodeadm: NodeadmFacts,
    pub storage: StorageFacts,
}

/// Step name and duration, for the status file.
pub type Timings = Vec<(String, u64)>;

pub fn gather(host: &Host, s: &Settings, timings: &mut Timings) -> Facts {
    let timeout = Duration::from_millis(s.binaries.timeout_ms);
    let mut step =
        |name: &str, t: Instant| timings.push((name.to_string(), t.elapsed().as_millis() as u64));

    // The three --version runs and IMDS are independent and each may take a
    // while on a cold boot; run them side by side.
    let t = Instant::now();
    let (containerd, soci_snapshotter_grpc, soci, imds) = std::thread::scope(|sc| {
        let a = sc.spawn(|| binary(host, &s.binaries.containerd, timeout));
        let b = sc.spawn(|| binary(host, &s.binaries.soci_snapshotter_grpc, timeout));
        let c = sc.spawn(|| binary(host, &s.binaries.soci, timeout));
        let d = sc.spawn(|| imds::query(&s.imds));
        (
            a.join().unwrap_or_default(),
            b.join().unwrap_or_default(),
            c.join().unwrap_or_default(),
            d.join().unwrap_or_default(),
        )
    });
    step("facts.binaries_and_imds", t);

    let t = Instant::now();
    let (cpus, memory_bytes) = cpu_and_memory(host);
    let fuse = host.path(known::FUSE_DEV).exists();
    let docker_config = host.path(known::DOCKER_CONFIG).exists();
    let nodeadm = nodeadm::gather(host, &s.binaries.nodeadm);
    step("facts.node", t);

    let t = Instant::now();
    let storage = storage::gather(
        host,
        &s.storage.instance_store_model,
        &s.soci.root,
        &s.containerd.root,
    );
    step("facts.storage", t);

    Facts {
        containerd,
        soci_snapshotter_grpc,
        soci,
        cpus,
        memory_bytes,
        arch: go_arch(std::env::consts::ARCH).to_string(),
        fuse,
        docker_config,
        imds,
        nodeadm,
        storage,
    }
}

fn binary(host: &Host, configured: &str, timeout: Duration) -> BinaryFact {
    let mut f = BinaryFact {
        path: configured.to_string(),
        ..Default::default()
    };
    match run::run(&host.path(configured), &["--version"], timeout) {
        Ok(out) => {
            let first = out.stdout.lines().next().unwrap_or("").trim().to_string();
            f.version = Version::find_in(&first);
            if f.version.is_none() {
                f.error = Some(format!(
                    "{configured} --version printed {first:?}, which has no version; reinstall it"
                ));
            }
            f.raw = Some(first);
        }
        Err(e) => f.error = Some(e.to_string()),
    }
    f
}

/// CPU count and memory. On the live node sysinfo asks the kernel; under a
/// fixture root they come from the tree (`/sys/devices/system/cpu/online`,
/// `/proc/meminfo`), and are unknown when the tree has none.
fn cpu_and_memory(host: &Host) -> (Option<u32>, Option<u64>) {
    if host.is_live() {
        let mut sys = sysinfo::System::new();
        sys.refresh_memory();
        let cpus = std::thread::available_parallelism()
            .ok()
            .map(|n| n.get() as u32);
        return (cpus, Some(sys.total_memory()).filter(|m| *m > 0));
    }
    let cpus = std::fs::read_to_string(host.path(known::SYS_CPU_ONLINE))
        .ok()
        .and_then(|s| parse_cpu_list(&s));
    let mem = std::fs::read_to_string(host.path(known::PROC_MEMINFO))
        .ok()
        .and_then(|s| parse_meminfo_total(&s));
    (cpus, mem)
}

/// `0-3,8,10-11` -> 7.
pub fn parse_cpu_list(s: &str) -> Option<u32> {
    let mut n = 0;
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                n += b.checked_sub(a)? + 1;
            }
            None => {
                part.parse::<u32>().ok()?;
                n += 1;
            }
        }
    }
    (n > 0).then_some(n)
}

pub fn parse_meminfo_total(s: &str) -> Option<u64> {
    let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn go_arch(rust_arch: &str) -> &str {
    match rust_arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-3\n"), Some(4));
        assert_eq!(parse_cpu_list("0-3,8,10-11"), Some(7));
        assert_eq!(parse_cpu_list("0"), Some(1));
        assert_eq!(parse_cpu_list(""), None);
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
    }

    #[test]
    fn meminfo() {
        assert_eq!(
            parse_meminfo_total("MemTotal:       16084900 kB\nMemFree: 1 kB\n"),
            Some(16084900 * 1024)
        );
        assert_eq!(parse_meminfo_total("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn binary_fact_reads_version_and_reports_broken_binaries() {
        let d = tempfile::tempdir().unwrap();
        let host = Host::new(d.path());
        let bin = host.path("/usr/bin/fake");
        std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
        std::fs::write(
            &bin,
            "#!/bin/sh\necho 'soci-snapshotter-grpc version v0.11.1 abc'\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let f = binary(&host, "/usr/bin/fake", Duration::from_secs(5));
        assert_eq!(f.version, Some(Version::new(0, 11, 1)), "{f:?}");
        std::fs::write(&bin, "#!/bin/sh\necho 'Segmentation fault' >&2; exit 139\n").unwrap();
        let f = binary(&host, "/usr/bin/fake", Duration::from_secs(5));
        assert!(
            f.version.is_none() && f.error.as_deref().unwrap().contains("Segmentation"),
            "{f:?}"
        );
        let f = binary(&host, "/usr/bin/missing", Duration::from_secs(5));
        assert!(f.error.as_deref().unwrap().contains("not found"), "{f:?}");
    }
}
