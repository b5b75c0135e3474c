//! `soci-node apply`: make a running node use SOCI (AWS SSM Run Command).
//!
//! preflight, then restart soci-snapshotter and containerd (in that order,
//! through D-Bus, each job's result awaited), check containerd lists the
//! soci snapshotter as ok, deal with images that exist only in overlayfs,
//! and prime the sandbox image.
//!
//! The overlayfs trap: after the switch the CRI still lists images that were
//! unpacked only in overlayfs. A new container from one of them needs the
//! layers in the soci snapshotter; when containerd discarded the compressed
//! layers after unpacking (EKS sets `discard_unpacked_layers = true`) that
//! fails with "failed to get reader from content store". The default policy
//! removes such image records (running containers keep their snapshots;
//! kubelet pulls again on the next start, now through SOCI), which never
//! leaves an image the CRI believes present but cannot use.

use crate::containerd;
use crate::prime;
use crate::run;
use crate::systemd::UnitControl;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Duration;

pub const SNAPSHOTTER_UNIT: &str = "soci-snapshotter.service";
pub const CONTAINERD_UNIT: &str = "containerd.service";
const NAMESPACE: &str = "k8s.io";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ImagesPolicy {
    /// Report them and leave them (new containers from them may fail).
    Keep,
    /// Remove the image records; kubelet pulls them again through SOCI.
    Remove,
    /// Pull them again into the soci snapshotter now (needs the registry).
    Reimport,
}

/// containerd as `apply` needs it; real via `ctr`, fake in tests.
pub trait Runtime {
    fn plugin_ok(&self) -> Result<bool, String>;
    fn overlay_only_images(&self) -> Result<Vec<String>, String>;
    fn remove_image(&self, image: &str) -> Result<(), String>;
    fn reimport_image(&self, image: &str) -> Result<(), String>;
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    pub preflight_state: String,
    pub preflight_reasons: Vec<String>,
    pub files_changed: bool,
    pub restarted: Vec<String>,
    pub plugin_ok: Option<bool>,
    pub overlay_only_images: Vec<String>,
    pub image_actions: Vec<String>,
    pub prime: Option<String>,
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
    pub exit_code: i32,
}

pub struct Inputs {
    pub active: bool,
    pub reasons: Vec<String>,
    pub files_changed: bool,
    pub restart: bool,
    pub images: ImagesPolicy,
    pub restart_timeout: Duration,
    /// How long to wait for containerd to list the soci plugin as ok.
    pub plugin_wait: Duration,
}

/// Everything after preflight, with the side effects behind traits.
pub fn orchestrate(i: &Inputs, units: &dyn UnitControl, rt: &dyn Runtime) -> Report {
    let mut r = Report {
        preflight_state: if i.active { "active" } else { "not active" }.into(),
        preflight_reasons: i.reasons.clone(),
        files_changed: i.files_changed,
        ..Default::default()
    };
    if !i.active {
        // Nothing to switch to: restarting would only disturb the node.
        r.errors.push(format!(
            "SOCI was not activated, no unit restarted: {}",
            i.reasons.join("; ")
        ));
        r.exit_code = 2;
        return r;
    }
    let live_before = rt.plugin_ok().unwrap_or(false);
    if i.restart && (i.files_changed || !live_before) {
        for unit in [SNAPSHOTTER_UNIT, CONTAINERD_UNIT] {
            match units.restart(unit, i.restart_timeout) {
                Ok(()) => r.restarted.push(unit.to_string()),
                Err(e) => {
                    r.errors.push(e.to_string());
                    r.exit_code = 2;
                    return r;
                }
            }
        }
    } else if !i.restart && i.files_changed {
        r.warnings.push(format!(
            "--no-restart: the new configs take effect at the next restart of {SNAPSHOTTER_UNIT} and {CONTAINERD_UNIT}"
        ));
    }
    // containerd answers a moment after its unit is "active".
    let waited = std::time::Instant::now();
    let mut ok = rt.plugin_ok();
    while !matches!(ok, Ok(true)) && waited.elapsed() < i.plugin_wait {
        std::thread::sleep(Duration::from_millis(250));
        ok = rt.plugin_ok();
    }
    match ok {
        Ok(true) => r.plugin_ok = Some(true),
        Ok(false) => {
            r.plugin_ok = Some(false);
            let msg = "containerd does not list the soci snapshotter as ok (`ctr plugins ls`): check `journalctl -u soci-snapshotter`";
            if i.restart || !i.files_changed {
                r.errors.push(msg.into());
            } else {
                r.warnings.push(msg.into());
            }
        }
        Err(e) => r
            .errors
            .push(format!("cannot ask containerd for its plugins: {e}")),
    }
    if r.plugin_ok == Some(true) {
        match rt.overlay_only_images() {
            Ok(images) => {
                for img in &images {
                    let done = match i.images {
                        ImagesPolicy::Keep => {
                            r.warnings.push(format!(
                                "{img} is unpacked only in overlayfs: new containers from it may fail with \"failed to get reader from content store\" (--images=remove or reimport)"
                            ));
                            continue;
                        }
                        ImagesPolicy::Remove => {
                            rt.remove_image(img).map(|_| format!("removed {img}"))
                        }
                        ImagesPolicy::Reimport => {
                            rt.reimport_image(img).map(|_| format!("reimported {img}"))
                        }
                    };
                    match done {
                        Ok(a) => r.image_actions.push(a),
                        Err(e) => r.errors.push(format!("{img}: {e}")),
                    }
                }
                r.overlay_only_images = images;
            }
            Err(e) => r.warnings.push(format!("cannot list images: {e}")),
        }
    }
    r.exit_code = if !r.errors.is_empty() {
        2
    } else if !r.warnings.is_empty() {
        1
    } else {
        0
    };
    r
}

pub fn render(r: &Report) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(o, "preflight:   {}", r.preflight_state);
    for x in &r.preflight_reasons {
        let _ = writeln!(o, "  reason:    {x}");
    }
    let _ = writeln!(
        o,
        "configs:     {}",
        if r.files_changed {
            "changed"
        } else {
            "unchanged"
        }
    );
    let _ = writeln!(
        o,
        "restarted:   {}",
        if r.restarted.is_empty() {
            "nothing".to_string()
        } else {
            r.restarted.join(", ")
        }
    );
    if let Some(ok) = r.plugin_ok {
        let _ = writeln!(o, "soci plugin: {}", if ok { "ok" } else { "NOT ok" });
    }
    for a in &r.image_actions {
        let _ = writeln!(o, "image:       {a}");
    }
    if let Some(p) = &r.prime {
        let _ = writeln!(o, "prime:       {p}");
    }
    for w in &r.warnings {
        let _ = writeln!(o, "warning:     {w}");
    }
    for e in &r.errors {
        let _ = writeln!(o, "error:       {e}");
    }
    let _ = writeln!(
        o,
        "result:      {}",
        match r.exit_code {
            0 => "ok",
            1 => "ok, with warnings",
            _ => "FAILED",
        }
    );
    o
}

/// The real containerd, through `ctr`.
pub struct CtrRuntime {
    pub ctr: PathBuf,
    pub address: String,
    pub plain_http: bool,
}

impl CtrRuntime {
    fn ctr(&self, args: &[&str], timeout: Duration) -> Result<String, String> {
        let mut all = vec!["--address", self.address.as_str()];
        all.extend_from_slice(args);
        run::run(&self.ctr, &all, timeout)
            .map(|o| o.stdout)
            .map_err(|e| e.to_string())
    }

    fn has_snapshot(&self, snapshotter: &str, key: &str) -> bool {
        self.ctr(
            &[
                "-n",
                NAMESPACE,
                "snapshots",
                "--snapshotter",
                snapshotter,
                "info",
                key,
            ],
            Duration::from_secs(10),
        )
        .is_ok()
    }
}

impl Runtime for CtrRuntime {
    fn plugin_ok(&self) -> Result<bool, String> {
        let out = self.ctr(&["plugins", "ls"], Duration::from_secs(10))?;
        Ok(parse_plugin_ok(
            &out,
            "io.containerd.snapshotter.v1",
            containerd::SOCI,
        ))
    }

    fn overlay_only_images(&self) -> Result<Vec<String>, String> {
        let ls = self.ctr(
            &["-n", NAMESPACE, "images", "ls", "-q"],
            Duration::from_secs(30),
        )?;
        let arch = crate::facts::go_arch(std::env::consts::ARCH);
        let mut out = Vec::new();
        for image in ls
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("sha256:"))
        {
            let get = |d: &str| prime_content(self, d);
            let Some(chain) = prime::chain_id_with(&get, image, arch, |img: &str| {
                self.ctr(
                    &["-n", NAMESPACE, "images", "ls", &format!("name=={img}")],
                    Duration::from_secs(10),
                )
                .ok()
            }) else {
                continue;
            };
            if self.has_snapshot("overlayfs", &chain)
                && !self.has_snapshot(containerd::SOCI, &chain)
            {
                out.push(image.to_string());
            }
        }
        Ok(out)
    }

    fn remove_image(&self, image: &str) -> Result<(), String> {
        self.ctr(
            &["-n", NAMESPACE, "images", "rm", image],
            Duration::from_secs(60),
        )
        .map(|_| ())
    }

    fn reimport_image(&self, image: &str) -> Result<(), String> {
        let platform = format!("linux/{}", crate::facts::go_arch(std::env::consts::ARCH));
        let mut args = vec!["-n".to_string(), NAMESPACE.to_string()];
        args.extend(prime::pull_args(&platform, self.plain_http, image));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.ctr(&args, Duration::from_secs(600)).map(|_| ())
    }
}

fn prime_content(rt: &CtrRuntime, digest: &str) -> Option<serde_json::Value> {
    serde_json::from_str(
        &rt.ctr(
            &["-n", NAMESPACE, "content", "get", digest],
            Duration::from_secs(10),
        )
        .ok()?,
    )
    .ok()
}

/// `ctr plugins ls`: TYPE ID PLATFORMS STATUS; true when the row for
/// type/id says ok.
pub fn parse_plugin_ok(ls: &str, ty: &str, id: &str) -> bool {
    ls.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.first() == Some(&ty) && f.get(1) == Some(&id) && f.last() == Some(&"ok")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::systemd::fake::FakeUnits;
    use std::cell::RefCell;

    #[derive(Default)]
    struct FakeRt {
        ok: bool,
        overlay: Vec<String>,
        removed: RefCell<Vec<String>>,
        reimported: RefCell<Vec<String>>,
    }

    impl Runtime for FakeRt {
        fn plugin_ok(&self) -> Result<bool, String> {
            Ok(self.ok)
        }
        fn overlay_only_images(&self) -> Result<Vec<String>, String> {
            Ok(self.overlay.clone())
        }
        fn remove_image(&self, image: &str) -> Result<(), String> {
            self.removed.borrow_mut().push(image.into());
            Ok(())
        }
        fn reimport_image(&self, image: &str) -> Result<(), String> {
            self.reimported.borrow_mut().push(image.into());
            Ok(())
        }
    }

    fn inputs(files_changed: bool) -> Inputs {
        Inputs {
            active: true,
            reasons: vec![],
            files_changed,
            restart: true,
            images: ImagesPolicy::Remove,
            restart_timeout: Duration::from_secs(5),
            plugin_wait: Duration::ZERO,
        }
    }

    #[test]
    fn restarts_snapshotter_then_containerd_when_configs_changed() {
        let units = FakeUnits::default();
        let rt = FakeRt {
            ok: true,
            ..Default::default()
        };
        let r = orchestrate(&inputs(true), &units, &rt);
        assert_eq!(
            *units.restarted.borrow(),
            [SNAPSHOTTER_UNIT, CONTAINERD_UNIT]
        );
        assert_eq!(r.exit_code, 0, "{r:?}");
        assert_eq!(r.plugin_ok, Some(true));
    }

    #[test]
    fn nothing_changed_and_live_means_no_restart() {
        let units = FakeUnits::default();
        let rt = FakeRt {
            ok: true,
            ..Default::default()
        };
        let r = orchestrate(&inputs(false), &units, &rt);
        assert!(units.restarted.borrow().is_empty());
        assert_eq!(r.exit_code, 0);
    }

    #[test]
    fn fallback_restarts_nothing_and_fails() {
        let units = FakeUnits::default();
        let rt = FakeRt::default();
        let mut i = inputs(true);
        i.active = false;
        i.reasons = vec!["no-fuse: /dev/fuse is missing".into()];
        let r = orchestrate(&i, &units, &rt);
        assert!(units.restarted.borrow().is_empty());
        assert_eq!(r.exit_code, 2);
        assert!(render(&r).contains("no-fuse"), "{}", render(&r));
    }

    #[test]
    fn a_failed_restart_stops_and_names_the_unit() {
        let units = FakeUnits {
            failing: vec![SNAPSHOTTER_UNIT.into()],
            ..Default::default()
        };
        let rt = FakeRt {
            ok: true,
            ..Default::default()
        };
        let r = orchestrate(&inputs(true), &units, &rt);
        assert_eq!(
            *units.restarted.borrow(),
            [SNAPSHOTTER_UNIT],
            "containerd must not be restarted"
        );
        assert_eq!(r.exit_code, 2);
        assert!(
            r.errors[0].contains(SNAPSHOTTER_UNIT) && r.errors[0].contains("failed"),
            "{r:?}"
        );
    }

    #[test]
    fn image_policies() {
        let overlay = vec!["docker.io/library/nginx:1".to_string()];
        for (policy, removed, reimported, code) in [
            (ImagesPolicy::Remove, 1, 0, 0),
            (ImagesPolicy::Reimport, 0, 1, 0),
            (ImagesPolicy::Keep, 0, 0, 1),
        ] {
            let rt = FakeRt {
                ok: true,
                overlay: overlay.clone(),
                ..Default::default()
            };
            let mut i = inputs(true);
            i.images = policy;
            let r = orchestrate(&i, &FakeUnits::default(), &rt);
            assert_eq!(rt.removed.borrow().len(), removed, "{policy:?}");
            assert_eq!(rt.reimported.borrow().len(), reimported, "{policy:?}");
            assert_eq!(r.exit_code, code, "{policy:?} {r:?}");
            assert_eq!(r.overlay_only_images, overlay);
        }
    }

    #[test]
    fn no_restart_warns_and_plugin_not_live_is_an_error_after_restart() {
        let units = FakeUnits::default();
        let rt = FakeRt {
            ok: false,
            ..Default::default()
        };
        let mut i = inputs(true);
        i.restart = false;
        let r = orchestrate(&i, &units, &rt);
        assert!(units.restarted.borrow().is_empty());
        assert_eq!(r.exit_code, 1, "{r:?}");
        let r = orchestrate(&inputs(true), &units, &rt);
        assert_eq!(r.plugin_ok, Some(false));
        assert_eq!(r.exit_code, 2);
    }

    #[test]
    fn plugins_ls_parsing() {
        let ls = "TYPE                                   ID                       PLATFORMS      STATUS\n\
io.containerd.snapshotter.v1           overlayfs                linux/amd64    ok\n\
io.containerd.snapshotter.v1           soci                     -              ok\n\
io.containerd.snapshotter.v1           btrfs                    linux/amd64    skip\n";
        assert!(parse_plugin_ok(ls, "io.containerd.snapshotter.v1", "soci"));
        assert!(!parse_plugin_ok(
            ls,
            "io.containerd.snapshotter.v1",
            "btrfs"
        ));
        assert!(!parse_plugin_ok(
            &ls.replace("-              ok", "-              error"),
            "io.containerd.snapshotter.v1",
            "soci"
        ));
    }
}
