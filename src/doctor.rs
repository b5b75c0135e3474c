//! `soci-node doctor`: is this node really pulling through SOCI, and if not,
//! what to do about it. A list of checks, each pass/warn/fail/skip with a
//! one-line remedy.
//!
//! Every check is a pure function of what was gathered (facts, the status
//! file, containerd's effective config, files, `ctr` output), so each is
//! unit-tested without a node; [`run`] only gathers. Checks that need a
//! running containerd are skipped (not failed) under a fixture root where
//! containerd is not running; on the live node a containerd that does not
//! answer is a failure. A check whose prerequisite failed is skipped rather
//! than failed again, so the first failure is the one to fix.

use crate::containerd::{self, PatchOptions};
use crate::decide::{self, TRANSFER_UNPACK_SINCE};
use crate::facts::{self, Facts};
use crate::fsio;
use crate::hostpath::{known, Host};
use crate::nodeadm::NodeadmFacts;
use crate::prime;
use crate::registry::{self, IndexReport, RegistryError, RegistryOptions, SOCI_INDEX_V2};
use crate::run;
use crate::settings::Settings;
use crate::soci;
use crate::status::{self, ModeOut, StateOut, Status, StatusError};
use crate::storage::StorageFacts;
use crate::version::Version;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Duration;

const NAMESPACE: &str = "k8s.io";
const GIB: f64 = (1u64 << 30) as f64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckStatus {
    Pass,
    Skip,
    Warn,
    Fail,
}

impl CheckStatus {
    pub fn label(self) -> &'static str {
        match self {
            CheckStatus::Pass => "PASS",
            CheckStatus::Skip => "SKIP",
            CheckStatus::Warn => "WARN",
            CheckStatus::Fail => "FAIL",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub id: &'static str,
    pub status: CheckStatus,
    pub message: String,
    /// What to do; absent for passes (and for most skips).
    pub remedy: Option<String>,
}

impl Check {
    fn new(id: &'static str, status: CheckStatus, message: impl Into<String>) -> Check {
        Check {
            id,
            status,
            message: message.into(),
            remedy: None,
        }
    }
    pub fn pass(id: &'static str, message: impl Into<String>) -> Check {
        Check::new(id, CheckStatus::Pass, message)
    }
    pub fn skip(id: &'static str, message: impl Into<String>) -> Check {
        Check::new(id, CheckStatus::Skip, message)
    }
    pub fn warn(id: &'static str, message: impl Into<String>, remedy: impl Into<String>) -> Check {
        Check::new(id, CheckStatus::Warn, message).with_remedy(remedy)
    }
    pub fn fail(id: &'static str, message: impl Into<String>, remedy: impl Into<String>) -> Check {
        Check::new(id, CheckStatus::Fail, message).with_remedy(remedy)
    }
    fn with_remedy(mut self, remedy: impl Into<String>) -> Check {
        self.remedy = Some(remedy.into());
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    /// 0: everything passed (skips allowed); 1: warnings; 2: failures.
    pub fn exit_code(&self) -> i32 {
        match self.checks.iter().map(|c| c.status).max() {
            Some(CheckStatus::Fail) => 2,
            Some(CheckStatus::Warn) => 1,
            _ => 0,
        }
    }

    pub fn get(&self, id: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.id == id)
    }

    /// One line per check (`PASS  id  message`), the remedy under each
    /// check that did not pass, and a summary line.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let width = self.checks.iter().map(|c| c.id.len()).max().unwrap_or(0);
        let mut o = String::new();
        for c in &self.checks {
            let _ = writeln!(o, "{}  {:<width$}  {}", c.status.label(), c.id, c.message);
            if let (Some(r), false) = (&c.remedy, c.status == CheckStatus::Pass) {
                let _ = writeln!(o, "      remedy: {r}");
            }
        }
        let count = |s| self.checks.iter().filter(|c| c.status == s).count();
        let _ = writeln!(
            o,
            "result: {} passed, {} warning(s), {} failed, {} skipped",
            count(CheckStatus::Pass),
            count(CheckStatus::Warn),
            count(CheckStatus::Fail),
            count(CheckStatus::Skip)
        );
        o
    }
}

#[derive(Debug, Clone)]
pub struct DoctorOptions {
    /// containerd's socket (a runtime path, used as is).
    pub containerd_address: String,
    /// containerd's CLI (a host path, resolved under the root).
    pub ctr_bin: String,
    /// SOCI's socket (a runtime path, used as is).
    pub soci_address: String,
    /// Ask the registry whether this image has a SOCI index.
    pub image: Option<String>,
    /// Talk to that registry over plain HTTP (loopback test registries).
    pub plain_http: bool,
    /// Bound on the registry check.
    pub registry_timeout: Duration,
    /// Bound on each `ctr` call.
    pub ctr_timeout: Duration,
}

impl DoctorOptions {
    pub fn from_settings(s: &Settings) -> DoctorOptions {
        DoctorOptions {
            containerd_address: s.containerd.address.clone(),
            ctr_bin: s.binaries.ctr.clone(),
            soci_address: s.soci.address.clone(),
            image: None,
            plain_http: false,
            registry_timeout: Duration::from_secs(10),
            ctr_timeout: Duration::from_secs(10),
        }
    }
}

// ---------------------------------------------------------------------------
// Gathering

pub fn run(host: &Host, settings: &Settings, opts: &DoctorOptions) -> Report {
    let mut checks = Vec::new();
    let mut timings = Vec::new();
    let facts = facts::gather(host, settings, &mut timings);
    let st = status::read(host);
    let st_ok = st.as_ref().ok();
    let state = st_ok.map(|s| s.state);
    let disabled = state == Some(StateOut::Disabled);

    checks.push(check_binaries(&facts, st_ok));
    checks.push(check_fuse(facts.fuse, disabled));
    checks.push(check_status(&st));

    // containerd's effective config (imports applied, migrations done).
    let dump = containerd::config_dump(
        &host.path(&settings.binaries.containerd),
        &host.path(&settings.containerd.config),
        Duration::from_millis(settings.binaries.timeout_ms),
    )
    .map_err(|e| e.to_string());
    let popts = PatchOptions {
        address: settings.soci.address.clone(),
        root: settings.soci.root.clone(),
        transfer_platform: facts
            .containerd
            .version
            .filter(|v| *v >= TRANSFER_UNPACK_SINCE)
            .map(|_| format!("linux/{}", facts.arch)),
    };
    checks.push(check_containerd_config(
        dump.as_deref(),
        &popts,
        state,
        &settings.containerd.config,
    ));

    let soci_text =
        fsio::read_optional(&host.path(&settings.soci.config)).map_err(|e| e.to_string());
    let plan = decide::decide(&facts, settings);
    let expected = plan
        .soci
        .as_ref()
        .filter(|_| plan.state == decide::State::Active)
        .and_then(|p| soci::render(p).ok());
    checks.push(check_soci_config(
        soci_text.as_ref().map(|o| o.as_deref()),
        facts.soci_snapshotter_grpc.version,
        expected.as_deref(),
        settings.soci.enable_v1_indexes,
        state,
        &settings.soci.config,
    ));

    let dir = settings
        .credentials
        .kubelet_config_dir
        .trim_end_matches('/');
    let main_kubelet = dir.strip_suffix(".d").map(String::from);
    let kubelet = KubeletFiles {
        main: main_kubelet.as_ref().and_then(|p| {
            std::fs::read_to_string(host.path(p))
                .ok()
                .map(|t| (p.clone(), t))
        }),
        dropins: read_dropins(host, dir),
        dir: dir.to_string(),
    };
    let soci_cfg_text = soci_text.as_ref().ok().cloned().flatten();
    checks.push(check_credentials(
        st_ok.and_then(|s| s.credentials.as_deref()),
        state,
        &kubelet,
        &settings.soci.address,
        soci_cfg_text.as_deref(),
    ));
    checks.push(check_disks(
        &facts.storage,
        settings,
        st_ok.and_then(|s| s.mode),
    ));
    checks.push(check_nodeadm(&facts.nodeadm));

    if host.is_live() {
        checks.push(check_units(unit_states()));
    } else {
        checks.push(Check::skip(
            "units",
            "not checked under a fixture root (systemd units belong to the live node)",
        ));
    }

    checks.extend(live_checks(
        host,
        settings,
        opts,
        state,
        dump.as_deref().ok(),
    ));

    if let Some(image) = &opts.image {
        let ro = RegistryOptions {
            timeout: opts.registry_timeout,
            plain_http: opts.plain_http,
            docker_config: Some(host.path(known::DOCKER_CONFIG)),
            helper_dirs: if host.is_live() {
                Vec::new()
            } else {
                ["/usr/local/bin", "/usr/bin", "/bin"]
                    .iter()
                    .map(|d| host.path(d))
                    .collect()
            },
            arch: facts.arch.clone(),
            ..Default::default()
        };
        checks.push(check_image(
            image,
            &registry::soci_index(image, &ro),
            facts.soci_snapshotter_grpc.version,
            settings.soci.enable_v1_indexes,
        ));
    }
    Report { checks }
}

fn read_dropins(host: &Host, dir: &str) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = std::fs::read_dir(host.path(dir))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().into_string().ok()?;
                    let text = std::fs::read_to_string(e.path()).ok()?;
                    Some((name, text))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// `ctr` against the live containerd.
struct Ctr {
    bin: PathBuf,
    address: String,
    timeout: Duration,
}

impl Ctr {
    fn run(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["--address", self.address.as_str()];
        all.extend_from_slice(args);
        run::run(&self.bin, &all, self.timeout)
            .map(|o| o.stdout)
            .map_err(|e| e.to_string())
    }

    fn ns(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["--namespace", NAMESPACE];
        all.extend_from_slice(args);
        self.run(&all)
    }
}

fn live_checks(
    host: &Host,
    s: &Settings,
    opts: &DoctorOptions,
    state: Option<StateOut>,
    dump: Option<&str>,
) -> Vec<Check> {
    let ctr = Ctr {
        bin: host.path(&opts.ctr_bin),
        address: opts.containerd_address.clone(),
        timeout: opts.ctr_timeout,
    };
    let probe = ctr.run(&["version"]);
    let containerd = check_containerd_live(&probe, &opts.containerd_address, host.is_live());
    let ids = ["soci-plugin", "soci-socket", "sandbox-image"];
    if containerd.status != CheckStatus::Pass {
        let why = if containerd.status == CheckStatus::Skip {
            "containerd is not running (fixture root)"
        } else {
            "containerd does not answer"
        };
        let mut out = vec![containerd];
        out.extend(ids.iter().map(|id| Check::skip(id, why)));
        return out;
    }
    let mut out = vec![containerd];
    if state != Some(StateOut::Active) {
        out.extend(
            ids.iter()
                .map(|id| Check::skip(id, "SOCI is not active on this node")),
        );
        return out;
    }
    out.push(check_plugin(&ctr.run(&["plugins", "ls"])));
    let socket = check_soci_socket(
        std::os::unix::net::UnixStream::connect(&opts.soci_address).map(|_| ()),
        &opts.soci_address,
    );
    let socket_ok = socket.status == CheckStatus::Pass;
    out.push(socket);
    let image = dump
        .and_then(|d| containerd::inspect("containerd config dump", d).ok())
        .and_then(|i| i.sandbox_image);
    if !socket_ok {
        out.push(Check::skip(
            "sandbox-image",
            "the SOCI snapshotter is unreachable",
        ));
    } else {
        let arch = facts::go_arch(std::env::consts::ARCH);
        let probe = image.as_deref().map(|img| sandbox_probe(&ctr, img, arch));
        out.push(check_sandbox(
            image.as_deref(),
            probe.as_ref(),
            &s.prime.sandbox_tarball,
        ));
    }
    out
}

/// What `ctr` says about the sandbox image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SandboxProbe {
    /// `ctr images ls` failed.
    ListFailed(String),
    /// No image record in the k8s.io namespace.
    NotListed,
    /// Listed, but its layers' chain ID could not be worked out.
    Unknown(String),
    /// The top-layer snapshot, and where it exists.
    Snapshot {
        chain_id: String,
        in_soci: bool,
        in_overlayfs: bool,
    },
}

fn sandbox_probe(ctr: &Ctr, image: &str, arch: &str) -> SandboxProbe {
    let ls = match ctr.ns(&["images", "ls", &format!("name=={image}")]) {
        Ok(o) => o,
        Err(e) => return SandboxProbe::ListFailed(e),
    };
    if prime::parse_image_digest(&ls, image).is_none() {
        return SandboxProbe::NotListed;
    }
    let get = |d: &str| -> Option<serde_json::Value> {
        serde_json::from_str(&ctr.ns(&["content", "get", d]).ok()?).ok()
    };
    let Some(chain) = prime::chain_id_with(&get, image, arch, |_| Some(ls.clone())) else {
        return SandboxProbe::Unknown(format!(
            "its manifest, config or linux/{arch} platform could not be read from the content store"
        ));
    };
    let has = |snapshotter: &str| {
        ctr.ns(&["snapshots", "--snapshotter", snapshotter, "info", &chain])
            .is_ok()
    };
    SandboxProbe::Snapshot {
        in_soci: has(containerd::SOCI),
        in_overlayfs: has("overlayfs"),
        chain_id: chain,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitState {
    pub unit: String,
    pub active: String,
    pub file_state: String,
}

fn unit_states() -> Result<Vec<UnitState>, String> {
    let conn = zbus::blocking::Connection::system().map_err(|e| e.to_string())?;
    let mgr = zbus::blocking::Proxy::new(
        &conn,
        "org.freedesktop.systemd1",
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
    )
    .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for unit in [
        "soci-node-preflight.service",
        crate::apply::SNAPSHOTTER_UNIT,
        crate::apply::CONTAINERD_UNIT,
    ] {
        let path: zbus::zvariant::OwnedObjectPath = mgr
            .call("LoadUnit", &(unit,))
            .map_err(|e| format!("{unit}: {e}"))?;
        let u = zbus::blocking::Proxy::new(
            &conn,
            "org.freedesktop.systemd1",
            path,
            "org.freedesktop.systemd1.Unit",
        )
        .map_err(|e| e.to_string())?;
        let active: String = u.get_property("ActiveState").map_err(|e| e.to_string())?;
        let file_state: String = u.get_property("UnitFileState").unwrap_or_default();
        out.push(UnitState {
            unit: unit.to_string(),
            active,
            file_state,
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Checks (pure)

pub fn check_binaries(f: &Facts, st: Option<&Status>) -> Check {
    const ID: &str = "binaries";
    let show = |b: &facts::BinaryFact| {
        b.version
            .map(|v| v.to_string())
            .unwrap_or_else(|| "unusable".into())
    };
    let summary = format!(
        "containerd {}, soci-snapshotter-grpc {}, soci {}",
        show(&f.containerd),
        show(&f.soci_snapshotter_grpc),
        show(&f.soci)
    );
    let mut fails = Vec::new();
    match f.containerd.version {
        None => fails.push(format!(
            "containerd ({}): {}",
            f.containerd.path,
            f.containerd.error.as_deref().unwrap_or("no version")
        )),
        Some(v) if v < decide::CONTAINERD_MIN => fails.push(format!(
            "containerd {v} is older than {}",
            decide::CONTAINERD_MIN
        )),
        Some(_) => {}
    }
    if f.soci_snapshotter_grpc.version.is_none() {
        fails.push(format!(
            "soci-snapshotter-grpc ({}): {}",
            f.soci_snapshotter_grpc.path,
            f.soci_snapshotter_grpc
                .error
                .as_deref()
                .unwrap_or("no version")
        ));
    }
    if !fails.is_empty() {
        return Check::fail(
            ID,
            fails.join("; "),
            "reinstall soci-node (it ships soci-snapshotter-grpc) or fix [binaries] in /etc/soci-node/config.toml; containerd must be >= 1.6",
        );
    }
    let mut warns = Vec::new();
    if f.soci.version.is_none() {
        warns.push(format!(
            "the soci CLI ({}) is unusable: {}",
            f.soci.path,
            f.soci.error.as_deref().unwrap_or("no version")
        ));
    }
    if let Some(st) = st {
        let now = [
            ("containerd", &f.containerd),
            ("soci-snapshotter-grpc", &f.soci_snapshotter_grpc),
        ];
        let then = [
            st.versions.containerd.as_deref(),
            st.versions.soci_snapshotter_grpc.as_deref(),
        ];
        for ((name, b), was) in now.iter().zip(then) {
            let is = b.version.map(|v| v.to_string());
            if was.is_some() && is.as_deref() != was {
                warns.push(format!(
                    "{name} is {} now but was {} at the last preflight",
                    is.as_deref().unwrap_or("unusable"),
                    was.unwrap_or("?")
                ));
            }
        }
    }
    if warns.is_empty() {
        Check::pass(ID, summary)
    } else {
        Check::warn(
            ID,
            format!("{summary}; {}", warns.join("; ")),
            "restart containerd (preflight runs before it and writes configs for the installed versions), or reinstall soci-node for the CLI",
        )
    }
}

pub fn check_fuse(fuse: bool, disabled: bool) -> Check {
    const ID: &str = "fuse";
    if fuse {
        Check::pass(ID, format!("{} exists", known::FUSE_DEV))
    } else if disabled {
        Check::skip(
            ID,
            format!("{} is missing (soci-node is disabled)", known::FUSE_DEV),
        )
    } else {
        Check::fail(
            ID,
            format!(
                "{} is missing: SOCI mounts layers with FUSE",
                known::FUSE_DEV
            ),
            "modprobe fuse; check that the module is not blacklisted",
        )
    }
}

/// The remedy for a status reason code (the README's table).
pub fn remedy_for(code: &str) -> &'static str {
    match code {
        "no-fuse" => "modprobe fuse; check module blacklists",
        "soci-binary" => "reinstall soci-node",
        "containerd-binary" | "containerd-version" => {
            "fix binaries.containerd in /etc/soci-node/config.toml; upgrade containerd to >= 1.6"
        }
        "disk-space" => "free space on SOCI's root or grow the disk",
        "settings" => "fix /etc/soci-node/config.toml: the message names the key and line",
        "containerd-config" => "fix containerd's config (the message names file, line, column); soci-node leaves it untouched",
        "containerd-validate" | "soci-validate" => {
            "report it with the output of `soci-node preflight --dry-run`"
        }
        "soci-config" => "fix [soci.extra] in /etc/soci-node/config.toml",
        "read" | "write" => "the message names the file; check permissions and a read-only /etc",
        _ => "see `soci-node status` and `journalctl -u soci-node-preflight`",
    }
}

pub fn check_status(st: &Result<Status, StatusError>) -> Check {
    const ID: &str = "status";
    let s = match st {
        Ok(s) => s,
        Err(e @ StatusError::Missing { .. }) => {
            return Check::fail(
                ID,
                e.to_string(),
                "run `soci-node preflight` (or restart containerd, which runs it first)",
            )
        }
        Err(e) => {
            return Check::fail(
                ID,
                e.to_string(),
                "run `soci-node preflight` to write it again",
            )
        }
    };
    match s.state {
        StateOut::Active => {
            let mode = match s.mode {
                Some(ModeOut::Parallel) => "parallel pull",
                _ => "lazy loading",
            };
            Check::pass(
                ID,
                format!(
                    "active ({mode}), credentials {}",
                    s.credentials.as_deref().unwrap_or("docker")
                ),
            )
        }
        StateOut::Disabled => Check::skip(
            ID,
            format!(
                "disabled by settings: {}",
                s.reasons
                    .iter()
                    .map(|r| r.message.as_str())
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        ),
        StateOut::Fallback => {
            let reasons: Vec<String> = s
                .reasons
                .iter()
                .map(|r| format!("[{}] {}", r.code, r.message))
                .collect();
            let mut remedies: Vec<&str> = s.reasons.iter().map(|r| remedy_for(&r.code)).collect();
            remedies.dedup();
            Check::fail(
                ID,
                format!(
                    "fallback: containerd uses its own snapshotter: {}",
                    reasons.join("; ")
                ),
                format!(
                    "{}; then restart containerd (preflight runs again first)",
                    remedies.join("; ")
                ),
            )
        }
    }
}

pub fn check_containerd_config(
    dump: Result<&str, &String>,
    opts: &PatchOptions,
    state: Option<StateOut>,
    config_path: &str,
) -> Check {
    const ID: &str = "containerd-config";
    let dump = match dump {
        Ok(d) => d,
        Err(e) => {
            return Check::fail(
                ID,
                format!("containerd cannot read its config: {e}"),
                format!("fix {config_path} (containerd --config {config_path} config dump shows the error); containerd will not start with it"),
            )
        }
    };
    let snap = containerd::inspect("config dump", dump)
        .ok()
        .and_then(|i| i.cri_snapshotter);
    let soci_configured = snap.as_deref() == Some(containerd::SOCI);
    // Without a status (not written since boot) the config speaks for
    // itself: if it uses soci, check it as if active.
    let checked = state == Some(StateOut::Active) || (state.is_none() && soci_configured);
    if !checked {
        // Not active: the CRI must simply not point at soci.
        return if soci_configured {
            Check::fail(
                ID,
                "SOCI is not active, yet the CRI snapshotter in containerd's effective config is soci: image pulls fail while the snapshotter is not running",
                "run `soci-node preflight` (it puts the original snapshotter back) or `soci-node revert`",
            )
        } else {
            Check::skip(
                ID,
                format!(
                    "SOCI is not active; the CRI snapshotter is {}",
                    snap.as_deref().unwrap_or("containerd's default")
                ),
            )
        };
    }
    if let Ok(i) = containerd::inspect("config dump", dump) {
        if i.cri_disabled {
            return Check::fail(
                ID,
                "the CRI plugin is disabled in containerd's config: kubelet cannot use containerd at all",
                format!("remove the CRI plugin from disabled_plugins in {config_path}"),
            );
        }
    }
    let problems = containerd::dump_problems(dump, opts);
    if problems.is_empty() {
        Check::pass(
            ID,
            "the CRI snapshotter is soci in containerd's effective config (config dump), proxy plugin as configured",
        )
    } else {
        Check::fail(
            ID,
            format!("containerd's effective config: {}", problems.join("; ")),
            format!("{config_path} was changed after preflight (nodeadm rewrites it at boot): run `soci-node apply`, or restart containerd so preflight patches it again"),
        )
    }
}

/// Top-level keys of soci-snapshotter-grpc's config (0.4 to 0.15, from
/// upstream's config package); SOCI ignores anything else.
const SOCI_TOP_LEVEL: &[&str] = &[
    "metrics_address",
    "metrics_network",
    "no_prometheus",
    "debug_address",
    "metadata_store",
    "metadata_db_no_sync",
    "metadata_insertion_chunk_size",
    "skip_check_snapshotter_supported",
    "http_cache_type",
    "filesystem_cache_type",
    "resolve_result_entry",
    "debug",
    "allow_no_verification",
    "disable_verification",
    "max_concurrency",
    "mount_timeout_sec",
    "fuse_metrics_emit_wait_duration_sec",
    "http",
    "blob",
    "directory_cache",
    "fuse",
    "background_fetch",
    "content_store",
    "prefetch",
    "pull_modes",
    "kubeconfig_keychain",
    "cri_keychain",
    "resolver",
    "snapshotter",
];

const PULL_MODE_KEYS: &[(&str, &[&str])] = &[
    ("soci_v1", &["enable"]),
    ("soci_v2", &["enable"]),
    (
        "parallel_pull_unpack",
        &[
            "enable",
            "max_concurrent_downloads",
            "max_concurrent_downloads_per_image",
            "concurrent_download_chunk_size",
            "max_concurrent_unpacks",
            "max_concurrent_unpacks_per_image",
            "discard_unpacked_layers",
            "decompress_streams",
            "experimental_parallel_pull_as_fallback",
        ],
    ),
];

/// SOCI's config, read as the installed version reads it.
/// `expected` is what preflight would write now (None when it would not).
pub fn check_soci_config(
    text: Result<Option<&str>, &String>,
    version: Option<Version>,
    expected: Option<&str>,
    enable_v1_setting: bool,
    state: Option<StateOut>,
    path: &str,
) -> Check {
    const ID: &str = "soci-config";
    if state != Some(StateOut::Active) {
        return Check::skip(ID, "SOCI is not active on this node");
    }
    let text = match text {
        Err(e) => return Check::fail(ID, e.clone(), "check the file's permissions"),
        Ok(None) => {
            return Check::fail(
                ID,
                format!("{path} is missing: soci-snapshotter-grpc runs on its defaults (from 0.10 that means SOCI v1 indexes are ignored)"),
                "restart containerd (preflight writes it first) or run `soci-node apply`",
            )
        }
        Ok(Some(t)) => t,
    };
    let doc: toml::Table = match text.parse() {
        Ok(d) => d,
        Err(e) => {
            return Check::fail(
                ID,
                format!("{path} is not valid TOML: {}", e.to_string().trim()),
                "remove it and restart containerd (preflight writes it again); put extra settings under [soci.extra] in /etc/soci-node/config.toml",
            )
        }
    };
    let mut fails: Vec<String> = Vec::new();
    let mut warns: Vec<String> = Vec::new();
    let unknown: Vec<&String> = doc
        .keys()
        .filter(|k| !SOCI_TOP_LEVEL.contains(&k.as_str()))
        .collect();
    if !unknown.is_empty() {
        warns.push(format!(
            "keys SOCI does not know (it ignores them silently): {}",
            unknown
                .iter()
                .map(|k| k.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let modes = doc.get("pull_modes").and_then(|v| v.as_table());
    match version {
        Some(v) if v < soci::PULL_MODES_SINCE => {
            if modes.is_some() {
                warns.push(format!(
                    "[pull_modes] is ignored by SOCI {v} (pull modes arrive in {})",
                    soci::PULL_MODES_SINCE
                ));
            }
        }
        Some(v) => {
            let enabled = |m: &str| {
                modes
                    .and_then(|t| t.get(m))
                    .and_then(|t| t.get("enable"))
                    .and_then(|e| e.as_bool())
            };
            if enabled("soci_v1").is_none() || enabled("soci_v2").is_none() {
                warns.push(format!(
                    "[pull_modes.soci_v1] / [pull_modes.soci_v2] enable not set: SOCI {v}'s defaults apply (v1 indexes off, v2 on)"
                ));
            }
            // Upstream's defaults (config/defaults.go): v1 off, v2 on,
            // parallel off.
            let (v1, v2, par) = (
                Some(enabled("soci_v1").unwrap_or(false)),
                Some(enabled("soci_v2").unwrap_or(true)),
                Some(enabled("parallel_pull_unpack").unwrap_or(false)),
            );
            if v1 != Some(true) && v2 != Some(true) && par != Some(true) {
                fails.push(
                    "no pull mode is enabled (soci_v1, soci_v2, parallel_pull_unpack): every pull is a plain full pull".into(),
                );
            } else if enable_v1_setting && par != Some(true) && v1 == Some(false) {
                warns.push("soci_v1 is disabled although soci.enable_v1_indexes is on: images indexed with SOCI v1 are pulled in full".into());
            }
            if enabled("parallel_pull_unpack").is_some() && v < soci::PARALLEL_SINCE {
                warns.push(format!(
                    "[pull_modes.parallel_pull_unpack] is ignored by SOCI {v} (needs {})",
                    soci::PARALLEL_SINCE
                ));
            }
            if let Some(m) = modes {
                for (k, val) in m {
                    match PULL_MODE_KEYS.iter().find(|(name, _)| name == k) {
                        None => warns.push(format!("unknown pull mode [pull_modes.{k}]")),
                        Some((_, keys)) => {
                            for sub in val.as_table().map(|t| t.keys()).into_iter().flatten() {
                                if !keys.contains(&sub.as_str()) {
                                    warns.push(format!("unknown key pull_modes.{k}.{sub}"));
                                }
                            }
                        }
                    }
                }
            }
        }
        None => warns
            .push("the SOCI version is unknown: the config cannot be checked against it".into()),
    }
    if let Some(exp) = expected {
        if exp != text {
            warns.push(format!(
                "{path} differs from what preflight would write now (edited by hand, or the node changed since the last preflight)"
            ));
        }
    }
    let v = version.map(|v| v.to_string()).unwrap_or_else(|| "?".into());
    if !fails.is_empty() {
        fails.extend(warns);
        Check::fail(
            ID,
            fails.join("; "),
            "check [soci.extra] in /etc/soci-node/config.toml, then restart containerd (preflight rewrites the file)",
        )
    } else if !warns.is_empty() {
        Check::warn(
            ID,
            warns.join("; "),
            "settings belong under [soci.extra] in /etc/soci-node/config.toml (preflight rewrites this file at every containerd start); restart containerd to regenerate it",
        )
    } else {
        Check::pass(
            ID,
            format!("{path} is valid for SOCI {v} and is what preflight would write"),
        )
    }
}

pub struct KubeletFiles {
    /// The drop-in directory (host path).
    pub dir: String,
    /// kubelet's main config beside it, when present.
    pub main: Option<(String, String)>,
    /// `(file name, text)` of the directory's entries, sorted.
    pub dropins: Vec<(String, String)>,
}

/// `imageServiceEndpoint` as kubelet ends up with it (drop-ins ending in
/// `.conf` merged in name order over the main config), and which file said
/// so. JSON, or YAML's `key: value` line form.
pub fn effective_image_endpoint(k: &KubeletFiles) -> (Option<(String, String)>, Vec<String>) {
    let mut unreadable = Vec::new();
    let mut found: Option<(String, String)> = None;
    let mut consider = |path: String, text: &str| {
        let value = match serde_json::from_str::<serde_json::Value>(text) {
            Ok(v) => v["imageServiceEndpoint"].as_str().map(String::from),
            Err(_) => {
                let yaml = text.lines().find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    (k.trim() == "imageServiceEndpoint")
                        .then(|| v.trim().trim_matches(['"', '\'']).to_string())
                });
                if yaml.is_none() && text.trim_start().starts_with('{') {
                    unreadable.push(path.clone());
                }
                yaml
            }
        };
        if let Some(v) = value {
            found = Some((v, path));
        }
    };
    if let Some((p, t)) = &k.main {
        consider(p.clone(), t);
    }
    for (name, text) in &k.dropins {
        if name.ends_with(".conf") {
            consider(format!("{}/{name}", k.dir), text);
        }
    }
    (found, unreadable)
}

pub fn check_credentials(
    mode: Option<&str>,
    state: Option<StateOut>,
    k: &KubeletFiles,
    soci_address: &str,
    soci_config: Option<&str>,
) -> Check {
    const ID: &str = "credentials";
    let ours = format!("{}/{}", k.dir, known::KUBELET_DROPIN_NAME);
    let have_ours = k
        .dropins
        .iter()
        .any(|(n, _)| n == known::KUBELET_DROPIN_NAME);
    let want = format!("unix://{soci_address}");
    let (endpoint, unreadable) = effective_image_endpoint(k);
    let points_at_soci = endpoint
        .as_ref()
        .is_some_and(|(v, _)| v.trim_end_matches('/') == want);
    let active = state == Some(StateOut::Active);
    let cri = active && mode == Some("cri");
    let mut problems = Vec::new();
    if !unreadable.is_empty() {
        problems.push(format!("cannot read {}", unreadable.join(", ")));
    }
    if cri {
        if !have_ours {
            return Check::fail(
                ID,
                format!("kubelet endpoint mismatch: CRI credential mode, but {ours} is missing, so kubelet sends image requests (and pull secrets) to containerd, not to SOCI"),
                "restart containerd (preflight writes the drop-in) and then kubelet, or set credentials.mode = \"docker\"",
            );
        }
        if !points_at_soci {
            let (v, from) =
                endpoint.unwrap_or(("containerd's socket (default)".into(), "-".into()));
            return Check::fail(
                ID,
                format!("kubelet endpoint mismatch: CRI credential mode, but kubelet's imageServiceEndpoint is {v} (set by {from}), not {want}"),
                format!("remove the imageServiceEndpoint from {from}, or give {ours} the last name in the directory; restart kubelet"),
            );
        }
        let keychain = soci_config
            .and_then(|t| t.parse::<toml::Table>().ok())
            .and_then(|t| t.get("cri_keychain")?.get("enable_keychain")?.as_bool());
        if keychain != Some(true) {
            return Check::fail(
                ID,
                "CRI credential mode, but [cri_keychain] enable_keychain is not true in SOCI's config: SOCI does not proxy kubelet's image service",
                "restart containerd so preflight rewrites SOCI's config",
            );
        }
        return Check::pass(
            ID,
            format!("CRI mode: kubelet's imageServiceEndpoint is {want} ({ours}); SOCI's cri_keychain is on"),
        );
    }
    if have_ours {
        problems.push(format!(
            "{ours} exists although the credential mode is {}: kubelet sends every image request through SOCI",
            if active { mode.unwrap_or("docker") } else { "not in use (SOCI not active)" }
        ));
    } else if points_at_soci {
        let from = endpoint.map(|(_, f)| f).unwrap_or_default();
        problems.push(format!(
            "kubelet's imageServiceEndpoint points at SOCI's socket ({from}) but the credential mode is {}: if SOCI is not serving the CRI image service every image operation fails",
            mode.unwrap_or("not cri")
        ));
    }
    if problems.is_empty() {
        Check::pass(
            ID,
            format!(
                "{} mode: kubelet talks to containerd for images",
                if active {
                    mode.unwrap_or("docker")
                } else {
                    "SOCI not active"
                }
            ),
        )
    } else {
        Check::fail(
            ID,
            problems.join("; "),
            "run `soci-node preflight` (it removes its drop-in when not in CRI mode) and restart kubelet",
        )
    }
}

pub fn check_disks(st: &StorageFacts, s: &Settings, mode: Option<ModeOut>) -> Check {
    const ID: &str = "disks";
    let root = &st.soci_root;
    let Some(free) = root.free_bytes else {
        return Check::warn(
            ID,
            format!("free space on {} is unknown", root.host_path),
            format!("check that {} (or its parent) exists", root.host_path),
        );
    };
    let free_gib = free as f64 / GIB;
    let on = root
        .backing
        .as_deref()
        .or(root.source.as_deref())
        .unwrap_or("an unknown device");
    let summary = format!(
        "{} on {on}{}, {free_gib:.1} GiB free",
        root.host_path,
        if root.on_instance_store {
            " (instance store)"
        } else {
            ""
        }
    );
    if free_gib < s.storage.min_free_gib {
        return Check::fail(
            ID,
            format!(
                "{summary}: below storage.min_free_gib = {}",
                s.storage.min_free_gib
            ),
            "free space (crictl rmi --prune) or grow the disk; preflight falls back below this",
        );
    }
    let mut warns = Vec::new();
    if mode == Some(ModeOut::Parallel) && free_gib < s.storage.parallel_min_free_gib {
        warns.push(format!(
            "parallel pull with less than storage.parallel_min_free_gib = {} GiB free",
            s.storage.parallel_min_free_gib
        ));
    }
    if !st.instance_store_disks.is_empty() {
        for p in [&st.soci_root, &st.containerd_root] {
            if !p.on_instance_store {
                warns.push(format!(
                    "{} is not on the instance-store disks ({}) but on {}",
                    p.host_path,
                    st.instance_store_disks
                        .iter()
                        .map(|d| d.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    p.source.as_deref().unwrap_or("an unknown device")
                ));
            }
        }
    }
    for a in &st.arrays {
        let backs_soci = root.device.is_some() && a.dev == root.device;
        if !backs_soci {
            continue;
        }
        if !a.active {
            warns.push(format!("{} is not active", a.name));
        }
        if let Some(level) = &a.level {
            if level != "raid0" {
                warns.push(format!(
                    "{} is {level}, not raid0: parallel pull wants striping for throughput",
                    a.name
                ));
            }
        }
    }
    if warns.is_empty() {
        Check::pass(ID, summary)
    } else {
        Check::warn(
            ID,
            format!("{summary}; {}", warns.join("; ")),
            "put /var/lib/soci-snapshotter-grpc and /var/lib/containerd on an instance-store RAID0 (nodeadm: localStorage strategy RAID0, i.e. setup-local-disks raid0) before containerd starts",
        )
    }
}

pub fn check_nodeadm(n: &NodeadmFacts) -> Check {
    const ID: &str = "nodeadm";
    if !n.present {
        return Check::pass(
            ID,
            "no nodeadm on this node: soci-node is the only owner of SOCI's config",
        );
    }
    if n.fast_image_pull == Some(true) {
        return Check::warn(
            ID,
            format!(
                "nodeadm's FastImagePull is configuring SOCI too ({}); soci-node runs after nodeadm-config and its settings win",
                n.evidence.join("; ")
            ),
            "keep one owner: turn FastImagePull off in the NodeConfig featureGates, or set enabled = false in /etc/soci-node/config.toml",
        );
    }
    Check::pass(ID, "nodeadm present, FastImagePull off")
}

pub fn check_units(states: Result<Vec<UnitState>, String>) -> Check {
    const ID: &str = "units";
    let states = match states {
        Ok(s) => s,
        Err(e) => {
            return Check::warn(
                ID,
                format!("cannot ask systemd: {e}"),
                "run doctor on the node itself, as root",
            )
        }
    };
    let mut fails = Vec::new();
    let mut warns = Vec::new();
    let mut shown = Vec::new();
    for u in &states {
        shown.push(format!("{} {}/{}", u.unit, u.active, u.file_state));
        let oneshot = u.unit == "soci-node-preflight.service";
        if oneshot {
            if u.active == "failed" {
                fails.push(format!("{} failed", u.unit));
            }
        } else if u.active != "active" {
            fails.push(format!("{} is {}", u.unit, u.active));
        }
        if matches!(
            u.file_state.as_str(),
            "disabled" | "masked" | "masked-runtime"
        ) {
            warns.push(format!("{} is {}", u.unit, u.file_state));
        }
    }
    if !fails.is_empty() {
        fails.extend(warns);
        Check::fail(
            ID,
            fails.join("; "),
            "systemctl status <unit>; journalctl -u <unit>",
        )
    } else if !warns.is_empty() {
        Check::warn(
            ID,
            format!("{}; {}", shown.join(", "), warns.join("; ")),
            "systemctl preset soci-node-preflight.service soci-snapshotter.service",
        )
    } else {
        Check::pass(ID, shown.join(", "))
    }
}

pub fn check_containerd_live(probe: &Result<String, String>, address: &str, live: bool) -> Check {
    const ID: &str = "containerd";
    match probe {
        Ok(out) => {
            let server = out
                .lines()
                .skip_while(|l| !l.trim_start().starts_with("Server"))
                .find_map(|l| {
                    l.trim()
                        .strip_prefix("Version:")
                        .map(|v| v.trim().to_string())
                });
            Check::pass(
                ID,
                format!(
                    "containerd {} answers at {address}",
                    server.as_deref().unwrap_or("(version unknown)")
                ),
            )
        }
        Err(e) if !live => Check::skip(
            ID,
            format!("containerd is not running at {address} under this fixture root ({e})"),
        ),
        Err(e) => Check::fail(
            ID,
            format!("containerd does not answer at {address}: {e}"),
            "systemctl status containerd; journalctl -u containerd",
        ),
    }
}

pub fn check_plugin(ls: &Result<String, String>) -> Check {
    const ID: &str = "soci-plugin";
    let ls = match ls {
        Ok(l) => l,
        Err(e) => {
            return Check::fail(
                ID,
                format!("`ctr plugins ls` failed: {e}"),
                "journalctl -u containerd",
            )
        }
    };
    let row = ls.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.first() == Some(&"io.containerd.snapshotter.v1") && f.get(1) == Some(&containerd::SOCI))
            .then(|| f.last().copied().unwrap_or("").to_string())
    });
    match row.as_deref() {
        Some("ok") => Check::pass(ID, "containerd lists io.containerd.snapshotter.v1 soci ok"),
        Some(other) => Check::fail(
            ID,
            format!("containerd lists the soci snapshotter with status {other:?}"),
            "journalctl -u containerd -u soci-snapshotter; restart soci-snapshotter then containerd (`soci-node apply`)",
        ),
        None => Check::fail(
            ID,
            "the running containerd has no soci snapshotter: it was started before its config was patched",
            "`soci-node apply` (restarts soci-snapshotter, then containerd)",
        ),
    }
}

pub fn check_soci_socket(connect: std::io::Result<()>, address: &str) -> Check {
    const ID: &str = "soci-socket";
    match connect {
        Ok(()) => Check::pass(ID, format!("{address} accepts connections")),
        Err(e) => Check::fail(
            ID,
            format!("the SOCI snapshotter does not accept connections at {address}: {e}; every pull and container start on soci fails"),
            "systemctl restart soci-snapshotter; journalctl -u soci-snapshotter",
        ),
    }
}

pub fn check_sandbox(image: Option<&str>, probe: Option<&SandboxProbe>, tarball: &str) -> Check {
    const ID: &str = "sandbox-image";
    let Some(image) = image else {
        return Check::warn(
            ID,
            "containerd's config names no sandbox image",
            "set sandbox_image (v2) / pinned_images.sandbox (v3) in containerd's config",
        );
    };
    let prime = format!(
        "run `soci-node prime` (containerd's ExecStartPost does it; it imports {tarball} or pulls)"
    );
    match probe {
        None => Check::skip(ID, format!("{image}: not probed")),
        Some(SandboxProbe::ListFailed(e)) => Check::fail(
            ID,
            format!("cannot list images: {e}"),
            "journalctl -u containerd",
        ),
        Some(SandboxProbe::NotListed) => Check::fail(
            ID,
            format!("sandbox image {image} is not in containerd's {NAMESPACE} namespace: kubelet's first pod needs a pull"),
            prime,
        ),
        Some(SandboxProbe::Unknown(why)) => Check::warn(
            ID,
            format!("{image} is listed, but {why}"),
            prime,
        ),
        Some(SandboxProbe::Snapshot {
            in_soci: true,
            chain_id,
            ..
        }) => Check::pass(
            ID,
            format!("{image} is unpacked in the soci snapshotter ({})", short(chain_id)),
        ),
        Some(SandboxProbe::Snapshot {
            in_overlayfs: true,
            ..
        }) => Check::fail(
            ID,
            format!("{image} is unpacked in overlayfs only (pulled before SOCI became the snapshotter): new sandboxes fail with \"failed to get reader from content store\" or pull again"),
            "`soci-node apply` (handles overlayfs-only images), or `ctr -n k8s.io images rm` it and run `soci-node prime`",
        ),
        Some(SandboxProbe::Snapshot { .. }) => Check::fail(
            ID,
            format!("{image} is listed but not unpacked in the soci snapshotter"),
            prime,
        ),
    }
}

fn short(d: &str) -> String {
    d.chars().take(19).collect()
}

pub fn check_image(
    image: &str,
    result: &Result<IndexReport, RegistryError>,
    soci_version: Option<Version>,
    enable_v1_setting: bool,
) -> Check {
    const ID: &str = "image-index";
    let r = match result {
        Ok(r) => r,
        Err(e) => {
            return Check::warn(
                ID,
                format!("{image}: cannot ask the registry: {e}"),
                "check the reference, the network path and the docker config credentials",
            )
        }
    };
    if !r.lazy {
        return Check::warn(
            ID,
            format!("{}: {}", r.reference, r.message),
            "create and push a SOCI index for the image (soci create + soci push; SOCI >= 0.10: soci convert), e.g. from the image build pipeline",
        );
    }
    let usable: Vec<&registry::FoundIndex> =
        r.indexes.iter().filter(|i| i.subject == r.digest).collect();
    let only_v2 = usable.iter().all(|i| i.artifact_type == SOCI_INDEX_V2);
    let only_v1 = usable.iter().all(|i| i.artifact_type != SOCI_INDEX_V2);
    if let Some(v) = soci_version {
        if only_v2 && v < soci::PULL_MODES_SINCE {
            return Check::warn(
                ID,
                format!(
                    "{}: only a SOCI v2 index, which SOCI {v} cannot read: full pull",
                    r.reference
                ),
                format!(
                    "install SOCI >= {} or push a v1 index too",
                    soci::PULL_MODES_SINCE
                ),
            );
        }
        if only_v1 && v >= soci::PULL_MODES_SINCE && !enable_v1_setting {
            return Check::warn(
                ID,
                format!("{}: only a SOCI v1 index, and soci.enable_v1_indexes = false: full pull", r.reference),
                "set soci.enable_v1_indexes = true or convert the image to a SOCI v2 index (soci convert)",
            );
        }
    }
    Check::pass(ID, format!("{}: {}", r.reference, r.message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::facts::BinaryFact;
    use crate::status::{ReasonOut, Versions};
    use crate::storage::{BlockDevice, MdArray, Placement};

    fn bin(v: Option<Version>) -> BinaryFact {
        BinaryFact {
            path: "/usr/bin/x".into(),
            version: v,
            raw: None,
            error: v.is_none().then(|| "exited with signal 11".to_string()),
        }
    }

    fn facts() -> Facts {
        Facts {
            containerd: bin(Some(Version::new(2, 1, 9))),
            soci_snapshotter_grpc: bin(Some(Version::new(0, 4, 1))),
            soci: bin(Some(Version::new(0, 4, 1))),
            cpus: Some(4),
            memory_bytes: Some(16 << 30),
            arch: "amd64".into(),
            fuse: true,
            docker_config: true,
            imds: Default::default(),
            nodeadm: Default::default(),
            storage: storage(false, 100),
        }
    }

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
            device: Some(if on_store { (9, 127) } else { (259, 1) }),
            on_instance_store: on_store,
            backing: on_store.then(|| "md127 (raid0: nvme1n1, nvme2n1)".to_string()),
            free_bytes: Some(free_gib << 30),
            total_bytes: Some(1000 << 30),
        }
    }

    fn storage(on_store: bool, free_gib: u64) -> StorageFacts {
        StorageFacts {
            instance_store_disks: if on_store {
                vec![BlockDevice {
                    name: "nvme1n1".into(),
                    model: None,
                    size_bytes: None,
                    dev: Some((259, 3)),
                }]
            } else {
                vec![]
            },
            arrays: if on_store {
                vec![MdArray {
                    name: "md127".into(),
                    level: Some("raid0".into()),
                    raid_disks: Some(2),
                    members: vec!["nvme1n1".into(), "nvme2n1".into()],
                    active: true,
                    dev: Some((9, 127)),
                }]
            } else {
                vec![]
            },
            soci_root: placement("/var/lib/soci-snapshotter-grpc", on_store, free_gib),
            containerd_root: placement("/var/lib/containerd", on_store, free_gib),
            notes: vec![],
        }
    }

    fn status(state: StateOut, credentials: Option<&str>) -> Status {
        Status {
            schema: 1,
            soci_node_version: "0.1.0".into(),
            started_at: 1,
            state,
            mode: (state == StateOut::Active).then_some(ModeOut::Lazy),
            credentials: credentials.map(String::from),
            reasons: if state == StateOut::Fallback {
                vec![ReasonOut {
                    code: "no-fuse".into(),
                    message: "/dev/fuse is missing".into(),
                }]
            } else {
                vec![]
            },
            notes: vec![],
            versions: Versions {
                containerd: Some("2.1.9".into()),
                soci_snapshotter_grpc: Some("0.4.1".into()),
                soci: Some("0.4.1".into()),
            },
            files: vec![],
            timings: vec![],
            total_ms: 1,
            facts: serde_json::json!({}),
        }
    }

    #[test]
    fn report_exit_codes_and_rendering() {
        let mut r = Report {
            checks: vec![Check::pass("a", "fine"), Check::skip("bb", "n/a")],
        };
        assert_eq!(r.exit_code(), 0);
        r.checks.push(Check::warn("ccc", "meh", "do x"));
        assert_eq!(r.exit_code(), 1);
        r.checks.push(Check::fail("d", "bad", "do y"));
        assert_eq!(r.exit_code(), 2);
        let text = r.render();
        assert!(text.starts_with("PASS  a    fine\nSKIP  bb   n/a\nWARN  ccc  meh\n      remedy: do x\nFAIL  d    bad\n      remedy: do y\n"), "{text}");
        assert!(
            text.ends_with("result: 1 passed, 1 warning(s), 1 failed, 1 skipped\n"),
            "{text}"
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["checks"][3]["status"], "fail");
        assert_eq!(json["checks"][0]["remedy"], serde_json::Value::Null);
    }

    #[test]
    fn binaries() {
        let st = status(StateOut::Active, None);
        let c = check_binaries(&facts(), Some(&st));
        assert_eq!(c.status, CheckStatus::Pass, "{c:?}");
        assert_eq!(
            c.message,
            "containerd 2.1.9, soci-snapshotter-grpc 0.4.1, soci 0.4.1"
        );
        let mut f = facts();
        f.soci_snapshotter_grpc = bin(None);
        let c = check_binaries(&f, Some(&st));
        assert_eq!(c.status, CheckStatus::Fail);
        assert!(c.message.contains("signal 11"), "{c:?}");
        let mut f = facts();
        f.containerd.version = Some(Version::new(1, 5, 0));
        assert_eq!(check_binaries(&f, None).status, CheckStatus::Fail);
        let mut f = facts();
        f.soci = bin(None);
        assert_eq!(check_binaries(&f, None).status, CheckStatus::Warn);
        // Upgraded since the last preflight.
        let mut f = facts();
        f.soci_snapshotter_grpc.version = Some(Version::new(0, 11, 1));
        let c = check_binaries(&f, Some(&st));
        assert_eq!(c.status, CheckStatus::Warn);
        assert!(
            c.message.contains("was 0.4.1 at the last preflight"),
            "{c:?}"
        );
    }

    #[test]
    fn fuse_and_status() {
        assert_eq!(check_fuse(true, false).status, CheckStatus::Pass);
        assert_eq!(check_fuse(false, false).status, CheckStatus::Fail);
        assert_eq!(check_fuse(false, true).status, CheckStatus::Skip);
        let c = check_status(&Ok(status(StateOut::Active, Some("cri"))));
        assert_eq!(c.status, CheckStatus::Pass);
        assert_eq!(c.message, "active (lazy loading), credentials cri");
        let c = check_status(&Ok(status(StateOut::Fallback, None)));
        assert_eq!(c.status, CheckStatus::Fail);
        assert!(
            c.message.contains("[no-fuse] /dev/fuse is missing"),
            "{c:?}"
        );
        assert!(c.remedy.unwrap().contains("modprobe fuse"));
        assert_eq!(
            check_status(&Ok(status(StateOut::Disabled, None))).status,
            CheckStatus::Skip
        );
        let c = check_status(&Err(StatusError::Missing {
            path: known::STATUS.into(),
        }));
        assert_eq!(c.status, CheckStatus::Fail);
        assert!(c.remedy.unwrap().contains("soci-node preflight"));
    }

    const DUMP_V3: &str = r#"version = 3
[plugins.'io.containerd.cri.v1.images']
  snapshotter = 'soci'
  disable_snapshot_annotations = false
  discard_unpacked_layers = false
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = 'localhost/kubernetes/pause:latest'
[[plugins.'io.containerd.transfer.v1.local'.unpack_config]]
  platform = 'linux/amd64'
  snapshotter = 'soci'
[proxy_plugins.soci]
  type = 'snapshot'
  address = '/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock'
  [proxy_plugins.soci.exports]
    root = '/var/lib/soci-snapshotter-grpc'
    enable_remote_snapshot_annotations = 'true'
"#;

    fn popts() -> PatchOptions {
        PatchOptions {
            address: known::SOCI_ADDRESS.into(),
            root: known::SOCI_ROOT.into(),
            transfer_platform: Some("linux/amd64".into()),
        }
    }

    #[test]
    fn containerd_config() {
        let active = Some(StateOut::Active);
        let c = check_containerd_config(Ok(DUMP_V3), &popts(), active, known::CONTAINERD_CONFIG);
        assert_eq!(c.status, CheckStatus::Pass, "{c:?}");
        let overlay = DUMP_V3.replacen("snapshotter = 'soci'", "snapshotter = 'overlayfs'", 1);
        let c = check_containerd_config(Ok(&overlay), &popts(), active, known::CONTAINERD_CONFIG);
        assert_eq!(c.status, CheckStatus::Fail);
        assert!(c.message.contains("\"overlayfs\", not \"soci\""), "{c:?}");
        // Fallback: overlayfs is right, soci would be wrong.
        let fb = Some(StateOut::Fallback);
        assert_eq!(
            check_containerd_config(Ok(&overlay), &popts(), fb, "/c").status,
            CheckStatus::Skip
        );
        assert_eq!(
            check_containerd_config(Ok(DUMP_V3), &popts(), fb, "/c").status,
            CheckStatus::Fail
        );
        // No status: a soci config is checked on its own merits.
        assert_eq!(
            check_containerd_config(Ok(DUMP_V3), &popts(), None, "/c").status,
            CheckStatus::Pass
        );
        let err = "containerd: exited with 1: failed to load TOML".to_string();
        let c = check_containerd_config(Err(&err), &popts(), active, "/c");
        assert_eq!(c.status, CheckStatus::Fail);
        assert!(c.message.contains("failed to load TOML"));
    }

    fn soci_check(text: Option<&str>, v: Version, expected: Option<&str>) -> Check {
        check_soci_config(
            Ok(text),
            Some(v),
            expected,
            true,
            Some(StateOut::Active),
            known::SOCI_CONFIG,
        )
    }

    #[test]
    fn soci_config_for_old_and_new_versions() {
        let old = Version::new(0, 4, 1);
        let new = Version::new(0, 11, 1);
        let gen = |v: Version| {
            soci::render(&soci::SociPlan {
                version: v,
                mode: soci::Mode::Lazy,
                enable_v1: true,
                credentials: soci::Credentials::Docker,
                tuning: None,
                extra: toml::Table::new(),
            })
            .unwrap()
        };
        let t = gen(old);
        assert_eq!(
            soci_check(Some(&t), old, Some(&t)).status,
            CheckStatus::Pass
        );
        let t = gen(new);
        assert_eq!(
            soci_check(Some(&t), new, Some(&t)).status,
            CheckStatus::Pass
        );
        // Missing or broken.
        assert_eq!(soci_check(None, new, None).status, CheckStatus::Fail);
        let c = soci_check(Some("[pull_modes\n"), new, None);
        assert_eq!(c.status, CheckStatus::Fail);
        assert!(c.message.contains("line 1"), "{c:?}");
        // 0.10+ without the keys: defaults (v1 off) apply.
        let c = soci_check(Some("[fuse]\nattr_timeout = 1\n"), new, None);
        assert_eq!(c.status, CheckStatus::Warn, "{c:?}");
        // Nothing enabled at all.
        let c = soci_check(
            Some("[pull_modes.soci_v1]\nenable = false\n[pull_modes.soci_v2]\nenable = false\n"),
            new,
            None,
        );
        assert_eq!(c.status, CheckStatus::Fail, "{c:?}");
        // A typo and an unknown top-level key.
        let c = soci_check(
            Some("[pull_modes.soci_v1]\nenable = true\n[pull_modes.soci_v2]\nenabel = true\n[fusee]\nx = 1\n"),
            new,
            None,
        );
        assert_eq!(c.status, CheckStatus::Warn, "{c:?}");
        assert!(c.message.contains("pull_modes.soci_v2.enabel"), "{c:?}");
        assert!(c.message.contains("fusee"), "{c:?}");
        // pull_modes on 0.4: ignored.
        let c = soci_check(Some(&gen(new)), old, None);
        assert_eq!(c.status, CheckStatus::Warn);
        assert!(c.message.contains("ignored by SOCI 0.4.1"), "{c:?}");
        // Hand-edited.
        let t = gen(old);
        let c = soci_check(
            Some(&format!("{t}[fuse]\nattr_timeout = 1\n")),
            old,
            Some(&t),
        );
        assert_eq!(c.status, CheckStatus::Warn);
        assert!(c.message.contains("differs"), "{c:?}");
        // Not active: not checked.
        assert_eq!(
            check_soci_config(
                Ok(None),
                Some(new),
                None,
                true,
                Some(StateOut::Fallback),
                "/x"
            )
            .status,
            CheckStatus::Skip
        );
    }

    fn kubelet(dropins: &[(&str, &str)]) -> KubeletFiles {
        KubeletFiles {
            dir: known::KUBELET_DROPIN_DIR.into(),
            main: Some((
                "/etc/kubernetes/kubelet/config.json".into(),
                r#"{"kind":"KubeletConfiguration","containerRuntimeEndpoint":"unix:///run/containerd/containerd.sock"}"#.into(),
            )),
            dropins: dropins
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        }
    }

    #[test]
    fn credential_modes_and_kubelet_endpoint() {
        let ours = crate::kubelet::image_service_dropin(known::SOCI_ADDRESS);
        let cri_soci = "[cri_keychain]\nenable_keychain = true\nimage_service_path = \"/run/containerd/containerd.sock\"\n";
        let active = Some(StateOut::Active);
        let k = kubelet(&[(known::KUBELET_DROPIN_NAME, &ours)]);
        let c = check_credentials(Some("cri"), active, &k, known::SOCI_ADDRESS, Some(cri_soci));
        assert_eq!(c.status, CheckStatus::Pass, "{c:?}");
        // CRI mode without the drop-in: the mismatch.
        let c = check_credentials(
            Some("cri"),
            active,
            &kubelet(&[]),
            known::SOCI_ADDRESS,
            Some(cri_soci),
        );
        assert_eq!(c.status, CheckStatus::Fail);
        assert!(c.message.contains("kubelet endpoint mismatch"), "{c:?}");
        // A later drop-in overrides ours.
        let later = r#"{"imageServiceEndpoint":"unix:///run/containerd/containerd.sock"}"#;
        let k = kubelet(&[
            (known::KUBELET_DROPIN_NAME, &ours),
            ("99-local.conf", later),
        ]);
        let c = check_credentials(Some("cri"), active, &k, known::SOCI_ADDRESS, Some(cri_soci));
        assert_eq!(c.status, CheckStatus::Fail);
        assert!(c.message.contains("99-local.conf"), "{c:?}");
        // ... but a file not ending in .conf is not read by kubelet.
        let k = kubelet(&[
            (known::KUBELET_DROPIN_NAME, &ours),
            ("99-local.conf.bak", later),
        ]);
        assert_eq!(
            check_credentials(Some("cri"), active, &k, known::SOCI_ADDRESS, Some(cri_soci)).status,
            CheckStatus::Pass
        );
        // CRI keychain off in SOCI's config.
        let k = kubelet(&[(known::KUBELET_DROPIN_NAME, &ours)]);
        assert_eq!(
            check_credentials(Some("cri"), active, &k, known::SOCI_ADDRESS, Some("")).status,
            CheckStatus::Fail
        );
        // Docker mode: no drop-in is right, ours left behind is wrong, and
        // so is any file pointing kubelet at SOCI (YAML form too).
        assert_eq!(
            check_credentials(
                Some("docker"),
                active,
                &kubelet(&[]),
                known::SOCI_ADDRESS,
                None
            )
            .status,
            CheckStatus::Pass
        );
        let c = check_credentials(Some("docker"), active, &k, known::SOCI_ADDRESS, None);
        assert_eq!(c.status, CheckStatus::Fail);
        let yaml = format!("imageServiceEndpoint: \"unix://{}\"\n", known::SOCI_ADDRESS);
        let c = check_credentials(
            Some("docker"),
            active,
            &kubelet(&[("50-x.conf", &yaml)]),
            known::SOCI_ADDRESS,
            None,
        );
        assert_eq!(c.status, CheckStatus::Fail, "{c:?}");
        assert!(c.message.contains("50-x.conf"));
        // Fallback with our drop-in left: every image operation would fail.
        assert_eq!(
            check_credentials(
                None,
                Some(StateOut::Fallback),
                &k,
                known::SOCI_ADDRESS,
                None
            )
            .status,
            CheckStatus::Fail
        );
    }

    #[test]
    fn disks() {
        let s = Settings::default();
        let c = check_disks(&storage(true, 800), &s, Some(ModeOut::Parallel));
        assert_eq!(c.status, CheckStatus::Pass, "{c:?}");
        assert!(c.message.contains("md127 (raid0"), "{c:?}");
        assert_eq!(
            check_disks(&storage(false, 100), &s, Some(ModeOut::Lazy)).status,
            CheckStatus::Pass
        );
        let c = check_disks(&storage(false, 2), &s, Some(ModeOut::Lazy));
        assert_eq!(c.status, CheckStatus::Fail);
        assert!(c.message.contains("min_free_gib"));
        let c = check_disks(&storage(true, 20), &s, Some(ModeOut::Parallel));
        assert_eq!(c.status, CheckStatus::Warn);
        let mut st = storage(true, 800);
        st.containerd_root = placement("/var/lib/containerd", false, 800);
        let c = check_disks(&st, &s, Some(ModeOut::Lazy));
        assert_eq!(c.status, CheckStatus::Warn);
        assert!(
            c.message
                .contains("/var/lib/containerd is not on the instance-store"),
            "{c:?}"
        );
        let mut st = storage(true, 800);
        st.arrays[0].level = Some("raid1".into());
        let c = check_disks(&st, &s, Some(ModeOut::Parallel));
        assert!(c.message.contains("raid1, not raid0"), "{c:?}");
        let mut st = storage(false, 100);
        st.soci_root.free_bytes = None;
        assert_eq!(check_disks(&st, &s, None).status, CheckStatus::Warn);
    }

    #[test]
    fn nodeadm_and_units() {
        assert_eq!(
            check_nodeadm(&NodeadmFacts::default()).status,
            CheckStatus::Pass
        );
        let n = NodeadmFacts {
            present: true,
            fast_image_pull: Some(true),
            evidence: vec!["x".into()],
        };
        assert_eq!(check_nodeadm(&n).status, CheckStatus::Warn);
        let u = |unit: &str, a: &str, f: &str| UnitState {
            unit: unit.into(),
            active: a.into(),
            file_state: f.into(),
        };
        let good = vec![
            u("soci-node-preflight.service", "inactive", "enabled"),
            u("soci-snapshotter.service", "active", "enabled"),
            u("containerd.service", "active", "enabled"),
        ];
        assert_eq!(check_units(Ok(good.clone())).status, CheckStatus::Pass);
        let mut bad = good.clone();
        bad[1].active = "failed".into();
        assert_eq!(check_units(Ok(bad)).status, CheckStatus::Fail);
        let mut bad = good.clone();
        bad[0].active = "failed".into();
        assert_eq!(check_units(Ok(bad)).status, CheckStatus::Fail);
        let mut meh = good;
        meh[1].file_state = "disabled".into();
        assert_eq!(check_units(Ok(meh)).status, CheckStatus::Warn);
        assert_eq!(check_units(Err("no bus".into())).status, CheckStatus::Warn);
    }

    #[test]
    fn live_checks_parse_ctr_defensively() {
        let v = "Client:\n  Version:  2.1.9\n  Revision: \n\nServer:\n  Version:  2.1.9+unknown\n  UUID: x\n";
        let c = check_containerd_live(&Ok(v.into()), "/run/c.sock", true);
        assert_eq!(c.message, "containerd 2.1.9+unknown answers at /run/c.sock");
        assert_eq!(
            check_containerd_live(&Err("connection refused".into()), "/c", false).status,
            CheckStatus::Skip
        );
        assert_eq!(
            check_containerd_live(&Err("connection refused".into()), "/c", true).status,
            CheckStatus::Fail
        );
        let ls = "TYPE                            ID       PLATFORMS  STATUS\nio.containerd.snapshotter.v1    overlayfs linux/amd64 ok\nio.containerd.snapshotter.v1    soci     -          ok\n";
        assert_eq!(check_plugin(&Ok(ls.into())).status, CheckStatus::Pass);
        let c = check_plugin(&Ok(ls.replace("-          ok", "-          error")));
        assert_eq!(c.status, CheckStatus::Fail);
        assert!(c.message.contains("\"error\""), "{c:?}");
        let c = check_plugin(&Ok(ls.lines().take(2).collect::<Vec<_>>().join("\n")));
        assert!(c.message.contains("no soci snapshotter"), "{c:?}");
        assert_eq!(check_plugin(&Ok(String::new())).status, CheckStatus::Fail);
        assert_eq!(check_soci_socket(Ok(()), "/s").status, CheckStatus::Pass);
        assert_eq!(
            check_soci_socket(
                Err(std::io::Error::from(std::io::ErrorKind::NotFound)),
                "/s"
            )
            .status,
            CheckStatus::Fail
        );
    }

    #[test]
    fn sandbox_image_states() {
        let img = Some("localhost/kubernetes/pause:latest");
        let t = known::EKS_PAUSE_TAR;
        let snap = |soci, ovl| SandboxProbe::Snapshot {
            chain_id: format!("sha256:{}", "a".repeat(64)),
            in_soci: soci,
            in_overlayfs: ovl,
        };
        assert_eq!(
            check_sandbox(img, Some(&snap(true, false)), t).status,
            CheckStatus::Pass
        );
        let c = check_sandbox(img, Some(&snap(false, true)), t);
        assert_eq!(c.status, CheckStatus::Fail);
        assert!(c.message.contains("overlayfs only"), "{c:?}");
        assert_eq!(
            check_sandbox(img, Some(&snap(false, false)), t).status,
            CheckStatus::Fail
        );
        let c = check_sandbox(img, Some(&SandboxProbe::NotListed), t);
        assert_eq!(c.status, CheckStatus::Fail);
        assert!(c.remedy.unwrap().contains("soci-node prime"));
        assert_eq!(check_sandbox(None, None, t).status, CheckStatus::Warn);
    }

    fn report(lazy: bool, types: &[&str]) -> IndexReport {
        IndexReport {
            reference: "r/app:1".into(),
            digest: "sha256:m".into(),
            index_digest: None,
            platform: "linux/amd64".into(),
            indexes: types
                .iter()
                .map(|t| registry::FoundIndex {
                    digest: "sha256:i".into(),
                    artifact_type: t.to_string(),
                    via: registry::Via::Tag,
                    subject: "sha256:m".into(),
                })
                .collect(),
            referrers_api: Some(false),
            lazy,
            message: if lazy {
                "SOCI index found (x): pull will be lazy"
            } else {
                "no SOCI index for y: full pull"
            }
            .into(),
        }
    }

    #[test]
    fn image_index_check() {
        let v04 = Some(Version::new(0, 4, 1));
        let v11 = Some(Version::new(0, 11, 1));
        let c = check_image(
            "r/app:1",
            &Ok(report(true, &[registry::SOCI_INDEX_V1])),
            v04,
            true,
        );
        assert_eq!(c.status, CheckStatus::Pass);
        assert!(c.message.contains("SOCI index found"), "{c:?}");
        let c = check_image("r/app:1", &Ok(report(false, &[])), v04, true);
        assert_eq!(c.status, CheckStatus::Warn);
        assert!(c.message.contains("no SOCI index"), "{c:?}");
        // v2 only on a SOCI that cannot read it; v1 only with v1 turned off.
        assert_eq!(
            check_image("r", &Ok(report(true, &[SOCI_INDEX_V2])), v04, true).status,
            CheckStatus::Warn
        );
        assert_eq!(
            check_image("r", &Ok(report(true, &[SOCI_INDEX_V2])), v11, true).status,
            CheckStatus::Pass
        );
        assert_eq!(
            check_image(
                "r",
                &Ok(report(true, &[registry::SOCI_INDEX_V1])),
                v11,
                false
            )
            .status,
            CheckStatus::Warn
        );
        let e = RegistryError::Deadline { ms: 10 };
        assert_eq!(
            check_image("r", &Err(e), v04, true).status,
            CheckStatus::Warn
        );
    }

    #[test]
    fn fixture_root_without_daemons_skips_live_checks() {
        let d = tempfile::tempdir().unwrap();
        let host = Host::new(d.path());
        let s = Settings {
            imds: crate::settings::Imds {
                enabled: false,
                ..Default::default()
            },
            ..Default::default()
        };
        let r = run(&host, &s, &DoctorOptions::from_settings(&s));
        for id in [
            "units",
            "containerd",
            "soci-plugin",
            "soci-socket",
            "sandbox-image",
        ] {
            assert_eq!(
                r.get(id).unwrap().status,
                CheckStatus::Skip,
                "{id}: {}",
                r.render()
            );
        }
        // An empty root: no binaries, no status.
        assert_eq!(r.get("binaries").unwrap().status, CheckStatus::Fail);
        assert_eq!(r.get("status").unwrap().status, CheckStatus::Fail);
        assert_eq!(r.exit_code(), 2);
    }
}
