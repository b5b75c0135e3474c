//! The decision: one pure function from facts and settings to a plan.
//!
//! No I/O here, so every branch is tested with constructed facts. The plan
//! says whether SOCI is activated, in which mode, with which credentials, and
//! why; `preflight` turns it into file changes.

use crate::facts::Facts;
use crate::hostpath::known;
use crate::settings::{CredentialSetting, PullModeSetting, Settings};
use crate::soci::{self, Credentials, Mode, ParallelTuning, SociPlan};
use crate::version::Version;
use serde::Serialize;

/// containerd versions whose CRI pulls go through the transfer service,
/// which needs its own unpack_config to use a proxy snapshotter.
pub const TRANSFER_UNPACK_SINCE: Version = Version::new(2, 1, 0);
/// Earliest containerd soci-node supports (config v2).
pub const CONTAINERD_MIN: Version = Version::new(1, 6, 0);
const GIB: f64 = (1u64 << 30) as f64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// SOCI is the CRI snapshotter.
    Active,
    /// SOCI could not be activated; containerd uses its own snapshotter.
    Fallback,
    /// Turned off by settings; containerd uses its own snapshotter.
    Disabled,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reason {
    /// Stable, for alerting and tests.
    pub code: String,
    /// What happened and what to do, for an operator.
    pub message: String,
}

impl Reason {
    pub fn new(code: &str, message: impl Into<String>) -> Reason {
        Reason {
            code: code.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    pub state: State,
    /// Why SOCI is not active (fallback/disabled).
    pub reasons: Vec<Reason>,
    /// Things that shaped an active plan (mode degraded, coexistence).
    pub notes: Vec<Reason>,
    /// Present when active.
    pub soci: Option<SociPlan>,
    /// `linux/<arch>` for containerd >= 2.1's transfer-service unpack config.
    pub transfer_platform: Option<String>,
    /// Whether kubelet must be pointed at SOCI's socket (CRI credentials).
    pub kubelet_dropin: bool,
}

impl Plan {
    pub fn mode(&self) -> Option<Mode> {
        self.soci.as_ref().map(|s| s.mode)
    }

    /// The same plan turned into a fallback with one more reason: used when
    /// a later step (parsing, validation, writing) fails.
    pub fn fall_back(&self, reason: Reason) -> Plan {
        let mut reasons = self.reasons.clone();
        reasons.push(reason);
        Plan {
            state: State::Fallback,
            reasons,
            notes: self.notes.clone(),
            soci: None,
            transfer_platform: None,
            kubelet_dropin: false,
        }
    }
}

pub fn decide(f: &Facts, s: &Settings) -> Plan {
    let mut notes = Vec::new();
    if f.nodeadm.fast_image_pull == Some(true) {
        notes.push(Reason::new(
            "nodeadm-fast-image-pull",
            "nodeadm's FastImagePull feature is on; soci-node runs after nodeadm-config and its settings win. Turn one of them off to keep one owner",
        ));
    }
    if !s.enabled || s.pull_mode == PullModeSetting::Off {
        let why = if !s.enabled {
            "enabled = false"
        } else {
            "pull_mode = \"off\""
        };
        return Plan {
            state: State::Disabled,
            reasons: vec![Reason::new(
                "disabled",
                format!(
                    "{why} in {}; containerd keeps its own snapshotter",
                    known::SETTINGS
                ),
            )],
            notes,
            soci: None,
            transfer_platform: None,
            kubelet_dropin: false,
        };
    }

    let mut reasons = Vec::new();
    if !f.fuse {
        reasons.push(Reason::new(
            "no-fuse",
            format!("{} is missing: SOCI mounts layers with FUSE; load the module (modprobe fuse) or check that it is not blacklisted", known::FUSE_DEV),
        ));
    }
    let soci_version = f.soci_snapshotter_grpc.version;
    if soci_version.is_none() {
        reasons.push(Reason::new(
            "soci-binary",
            format!(
                "soci-snapshotter-grpc is not usable: {}; reinstall soci-node",
                f.soci_snapshotter_grpc
                    .error
                    .as_deref()
                    .unwrap_or("no version")
            ),
        ));
    }
    match f.containerd.version {
        None => reasons.push(Reason::new(
            "containerd-binary",
            format!(
                "containerd is not usable: {}; check binaries.containerd in {}",
                f.containerd.error.as_deref().unwrap_or("no version"),
                known::SETTINGS
            ),
        )),
        Some(v) if v < CONTAINERD_MIN => reasons.push(Reason::new(
            "containerd-version",
            format!("containerd {v} is older than {CONTAINERD_MIN}; upgrade containerd"),
        )),
        Some(_) => {}
    }
    let soci_free = f.storage.soci_root.free_bytes;
    if let Some(free) = soci_free {
        if (free as f64) < s.storage.min_free_gib * GIB {
            reasons.push(Reason::new(
                "disk-space",
                format!(
                    "{:.1} GiB free on {} (mounted at {}), below storage.min_free_gib = {}; free space or attach a larger disk",
                    free as f64 / GIB,
                    s.soci.root,
                    f.storage.soci_root.mount_point.as_deref().unwrap_or("?"),
                    s.storage.min_free_gib
                ),
            ));
        }
    }
    if !reasons.is_empty() {
        return Plan {
            state: State::Fallback,
            reasons,
            notes,
            soci: None,
            transfer_platform: None,
            kubelet_dropin: false,
        };
    }
    let soci_version = soci_version.expect("checked above");
    let containerd_version = f.containerd.version.expect("checked above");

    let mode = choose_mode(f, s, soci_version, &mut notes);
    let credentials = match s.credentials.mode {
        CredentialSetting::Auto | CredentialSetting::Docker => {
            if !f.docker_config {
                notes.push(Reason::new(
                    "no-docker-config",
                    format!("{} does not exist: SOCI pulls anonymously unless the registry is public; add a credential helper (ecr-login) there or set credentials.mode", known::DOCKER_CONFIG),
                ));
            }
            Credentials::Docker
        }
        CredentialSetting::Cri => Credentials::Cri {
            image_service_path: known::CONTAINERD_SOCKET.into(),
        },
        CredentialSetting::Kubeconfig => Credentials::Kubeconfig {
            kubeconfig_path: s.credentials.kubeconfig_path.clone(),
        },
    };
    let kubelet_dropin = matches!(credentials, Credentials::Cri { .. });
    let tuning = (mode == Mode::Parallel).then(|| ParallelTuning::for_node(f.cpus, f.memory_bytes));
    Plan {
        state: State::Active,
        reasons: vec![],
        notes,
        soci: Some(SociPlan {
            version: soci_version,
            mode,
            enable_v1: s.soci.enable_v1_indexes,
            credentials,
            tuning,
            extra: s.soci.extra.clone(),
        }),
        transfer_platform: (containerd_version >= TRANSFER_UNPACK_SINCE)
            .then(|| format!("linux/{}", f.arch)),
        kubelet_dropin,
    }
}

fn choose_mode(f: &Facts, s: &Settings, soci_version: Version, notes: &mut Vec<Reason>) -> Mode {
    let wanted = match s.pull_mode {
        PullModeSetting::Lazy => return Mode::Lazy,
        PullModeSetting::Parallel => "parallel",
        PullModeSetting::Auto => "auto",
        PullModeSetting::Off => unreachable!("handled by decide"),
    };
    let st = &f.storage;
    let mut why_not = Vec::new();
    if soci_version < soci::PARALLEL_SINCE {
        why_not.push(format!(
            "SOCI {soci_version} has no parallel pull (needs >= {})",
            soci::PARALLEL_SINCE
        ));
    }
    if st.instance_store_disks.is_empty() {
        why_not.push(format!(
            "no instance-store disk (model {:?})",
            s.storage.instance_store_model
        ));
    } else {
        for (name, p) in [
            ("SOCI root", &st.soci_root),
            ("containerd root", &st.containerd_root),
        ] {
            if !p.on_instance_store {
                why_not.push(format!(
                    "{name} {} is on {}, not on instance store",
                    p.host_path,
                    p.source.as_deref().unwrap_or("an unknown device")
                ));
            }
        }
    }
    if let Some(free) = st.soci_root.free_bytes {
        if (free as f64) < s.storage.parallel_min_free_gib * GIB {
            why_not.push(format!(
                "{:.1} GiB free on {}, below storage.parallel_min_free_gib = {}",
                free as f64 / GIB,
                st.soci_root.host_path,
                s.storage.parallel_min_free_gib
            ));
        }
    }
    if why_not.is_empty() {
        return Mode::Parallel;
    }
    let code = if wanted == "parallel" {
        "parallel-unavailable"
    } else {
        "lazy-mode"
    };
    notes.push(Reason::new(
        code,
        format!(
            "lazy loading instead of parallel pull: {}",
            why_not.join("; ")
        ),
    ));
    Mode::Lazy
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::facts::BinaryFact;
    use crate::storage::{BlockDevice, Placement, StorageFacts};

    fn placement(path: &str, on_store: bool, free_gib: u64) -> Placement {
        Placement {
            host_path: path.into(),
            mount_point: Some("/".into()),
            fstype: Some("xfs".into()),
            source: Some(
                if on_store {
                    "/dev/md127"
                } else {
                    "/dev/nvme0n1p1"
                }
                .into(),
            ),
            device: Some((9, 127)),
            on_instance_store: on_store,
            backing: None,
            free_bytes: Some(free_gib << 30),
            total_bytes: Some(1000 << 30),
        }
    }

    fn bin(v: Option<Version>) -> BinaryFact {
        BinaryFact {
            path: "/usr/bin/x".into(),
            version: v,
            raw: None,
            error: v.is_none().then(|| "exited with signal 11".to_string()),
        }
    }

    /// A big EC2 node with a RAID0 instance store and SOCI 0.11.
    fn node() -> Facts {
        Facts {
            containerd: bin(Some(Version::new(2, 2, 0))),
            soci_snapshotter_grpc: bin(Some(Version::new(0, 11, 1))),
            soci: bin(Some(Version::new(0, 11, 1))),
            cpus: Some(32),
            memory_bytes: Some(128 << 30),
            arch: "amd64".into(),
            fuse: true,
            docker_config: true,
            imds: Default::default(),
            nodeadm: Default::default(),
            storage: StorageFacts {
                instance_store_disks: vec![BlockDevice {
                    name: "nvme1n1".into(),
                    model: Some("Amazon EC2 NVMe Instance Storage".into()),
                    size_bytes: Some(900 << 30),
                    dev: Some((259, 1)),
                }],
                arrays: vec![],
                soci_root: placement("/var/lib/soci-snapshotter-grpc", true, 800),
                containerd_root: placement("/var/lib/containerd", true, 800),
                notes: vec![],
            },
        }
    }

    fn codes(v: &[Reason]) -> Vec<&str> {
        v.iter().map(|r| r.code.as_str()).collect()
    }

    #[test]
    fn big_node_gets_parallel_with_tuning_and_transfer_platform() {
        let p = decide(&node(), &Settings::default());
        assert_eq!(p.state, State::Active);
        assert_eq!(p.mode(), Some(Mode::Parallel));
        let t = p.soci.as_ref().unwrap().tuning.clone().unwrap();
        assert_eq!(t.max_concurrent_downloads_per_image, 20);
        assert_eq!(p.transfer_platform.as_deref(), Some("linux/amd64"));
        assert!(!p.kubelet_dropin);
        assert!(p.notes.is_empty(), "{:?}", p.notes);
    }

    #[test]
    fn no_instance_store_means_lazy_with_a_note() {
        let mut f = node();
        f.storage.instance_store_disks.clear();
        let p = decide(&f, &Settings::default());
        assert_eq!(p.mode(), Some(Mode::Lazy));
        assert_eq!(codes(&p.notes), ["lazy-mode"]);
        assert!(p.notes[0].message.contains("no instance-store disk"));
        assert!(p.soci.unwrap().tuning.is_none());
    }

    #[test]
    fn roots_off_the_array_or_old_soci_mean_lazy() {
        let mut f = node();
        f.storage.containerd_root.on_instance_store = false;
        let p = decide(&f, &Settings::default());
        assert_eq!(p.mode(), Some(Mode::Lazy));
        assert!(
            p.notes[0].message.contains("containerd root"),
            "{:?}",
            p.notes
        );

        let mut f = node();
        f.soci_snapshotter_grpc.version = Some(Version::new(0, 4, 1));
        let s = Settings {
            pull_mode: PullModeSetting::Parallel,
            ..Default::default()
        };
        let p = decide(&f, &s);
        assert_eq!(p.mode(), Some(Mode::Lazy));
        assert_eq!(codes(&p.notes), ["parallel-unavailable"]);
    }

    #[test]
    fn little_free_space_on_the_array_means_lazy_and_none_means_fallback() {
        let mut f = node();
        f.storage.soci_root.free_bytes = Some(20 << 30);
        let p = decide(&f, &Settings::default());
        assert_eq!((p.state, p.mode()), (State::Active, Some(Mode::Lazy)));
        f.storage.soci_root.free_bytes = Some(1 << 30);
        let p = decide(&f, &Settings::default());
        assert_eq!(p.state, State::Fallback);
        assert_eq!(codes(&p.reasons), ["disk-space"]);
        assert!(
            p.reasons[0].message.contains("1.0 GiB free"),
            "{}",
            p.reasons[0].message
        );
    }

    #[test]
    fn lazy_setting_wins_over_a_perfect_disk() {
        let s = Settings {
            pull_mode: PullModeSetting::Lazy,
            ..Default::default()
        };
        let p = decide(&node(), &s);
        assert_eq!(p.mode(), Some(Mode::Lazy));
        assert!(p.notes.is_empty());
    }

    #[test]
    fn every_hard_failure_is_reported_at_once() {
        let mut f = node();
        f.fuse = false;
        f.soci_snapshotter_grpc = bin(None);
        f.containerd.version = Some(Version::new(1, 5, 9));
        let p = decide(&f, &Settings::default());
        assert_eq!(p.state, State::Fallback);
        assert_eq!(
            codes(&p.reasons),
            ["no-fuse", "soci-binary", "containerd-version"]
        );
        assert!(p.reasons[1].message.contains("signal 11"));
        assert!(p.soci.is_none() && !p.kubelet_dropin);
    }

    #[test]
    fn disabled_by_settings() {
        let mut s = Settings {
            enabled: false,
            ..Default::default()
        };
        let mut f = node();
        f.fuse = false;
        let p = decide(&f, &s);
        assert_eq!(p.state, State::Disabled);
        assert_eq!(codes(&p.reasons), ["disabled"]);
        s.enabled = true;
        s.pull_mode = PullModeSetting::Off;
        assert_eq!(decide(&node(), &s).state, State::Disabled);
    }

    #[test]
    fn credential_modes() {
        let mut s = Settings::default();
        let mut f = node();
        f.docker_config = false;
        let p = decide(&f, &s);
        assert_eq!(p.soci.as_ref().unwrap().credentials, Credentials::Docker);
        assert_eq!(codes(&p.notes), ["no-docker-config"]);
        s.credentials.mode = CredentialSetting::Cri;
        let p = decide(&node(), &s);
        assert!(p.kubelet_dropin);
        assert!(matches!(
            p.soci.unwrap().credentials,
            Credentials::Cri { .. }
        ));
        s.credentials.mode = CredentialSetting::Kubeconfig;
        s.credentials.kubeconfig_path = "/etc/k.conf".into();
        let p = decide(&node(), &s);
        assert!(!p.kubelet_dropin);
        assert_eq!(
            p.soci.unwrap().credentials,
            Credentials::Kubeconfig {
                kubeconfig_path: "/etc/k.conf".into()
            }
        );
    }

    #[test]
    fn transfer_platform_only_from_containerd_2_1() {
        let mut f = node();
        f.containerd.version = Some(Version::new(2, 0, 5));
        assert_eq!(decide(&f, &Settings::default()).transfer_platform, None);
        f.containerd.version = Some(Version::new(1, 7, 27));
        f.arch = "arm64".into();
        assert_eq!(decide(&f, &Settings::default()).transfer_platform, None);
        f.containerd.version = Some(Version::new(2, 1, 0));
        assert_eq!(
            decide(&f, &Settings::default())
                .transfer_platform
                .as_deref(),
            Some("linux/arm64")
        );
    }

    #[test]
    fn nodeadm_fast_image_pull_is_noted() {
        let mut f = node();
        f.nodeadm.fast_image_pull = Some(true);
        let p = decide(&f, &Settings::default());
        assert_eq!(p.state, State::Active);
        assert_eq!(codes(&p.notes), ["nodeadm-fast-image-pull"]);
    }

    #[test]
    fn fall_back_keeps_reasons() {
        let p =
            decide(&node(), &Settings::default()).fall_back(Reason::new("containerd-config", "x"));
        assert_eq!(p.state, State::Fallback);
        assert!(p.soci.is_none());
        assert_eq!(codes(&p.reasons), ["containerd-config"]);
    }
}
