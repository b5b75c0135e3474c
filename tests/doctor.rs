//! `doctor` against a real node: containerd (2.1 and 1.7) and
//! soci-snapshotter-grpc 0.4.1 started by the harness, after a real
//! `soci-node preflight`, with a pause-like image imported into the soci
//! snapshotter (`ctr -n k8s.io images import --snapshotter soci` of an
//! archive built here). Doctor passes on the good node, and each injected
//! fault fails exactly the check that names it:
//!
//! - CRI snapshotter changed back to overlayfs in containerd's config
//!   -> `containerd-config`
//! - CRI credential mode without kubelet's drop-in -> `credentials`
//! - sandbox image removed -> `sandbox-image`
//! - snapshotter stopped -> `soci-socket`
//!
//! `--image` is asked about a plain image in docker-registry 2.8: a warning,
//! "no SOCI index".

mod support;

use soci_node::doctor::{self, CheckStatus, DoctorOptions, Report};
use soci_node::hostpath::Host;
use soci_node::settings::Settings;
use std::os::unix::fs::symlink;
use std::time::Instant;
use support::*;

const DROPIN: &str = "/etc/kubernetes/kubelet/config.json.d/40-soci-node-image-service.conf";

fn settings(fx: &Fixture) -> Settings {
    Settings::load(&fx.path(SETTINGS), SETTINGS).expect("fixture settings")
}

fn doctor(fx: &Fixture, image: Option<String>) -> Report {
    let s = settings(fx);
    let mut o = DoctorOptions::from_settings(&s);
    o.image = image;
    o.plain_http = true;
    let t = Instant::now();
    let r = doctor::run(&Host::new(&fx.root), &s, &o);
    eprintln!(
        "doctor ({:?}, {} ms):\n{}",
        fx.ctd,
        t.elapsed().as_millis(),
        r.render()
    );
    // The JSON form carries the same checks, statuses in lowercase.
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["checks"].as_array().unwrap().len(), r.checks.len());
    r
}

fn failing(r: &Report) -> Vec<&'static str> {
    r.checks
        .iter()
        .filter(|c| c.status == CheckStatus::Fail)
        .map(|c| c.id)
        .collect()
}

fn sandbox_image(fx: &Fixture) -> String {
    let dump = fx.config_dump().unwrap();
    toml_str(&dump, fx.ctd.sandbox_key()).unwrap().to_string()
}

/// Set the CRI snapshotter in containerd's config file (toml_edit keeps
/// everything else).
fn set_cri_snapshotter(fx: &Fixture, value: &str) {
    let text = fx.read(CONTAINERD_CONFIG);
    let mut doc: toml_edit::DocumentMut = text.parse().unwrap();
    let key = fx.ctd.cri_snapshotter_key();
    let (last, tables) = key.split_last().unwrap();
    let mut t = doc.as_table_mut() as &mut dyn toml_edit::TableLike;
    for k in tables {
        t = t.get_mut(k).unwrap().as_table_like_mut().unwrap();
    }
    t.insert(last, toml_edit::value(value));
    fx.write(CONTAINERD_CONFIG, &doc.to_string());
}

fn good_node_then_each_fault(ctd: Ctd) {
    let mut fx = Fixture::new(ctd);
    symlink(ctd.ctr(), fx.path("/usr/bin/ctr")).unwrap();
    fx.set("containerd.address", fx.ctd_sock.display().to_string());
    fx.preflight(&[]).assert_code(0);
    assert_eq!(fx.status()["state"], "active");
    let sandbox = sandbox_image(&fx);
    fx.pause_tarball(&sandbox);
    let (soci, _) = fx.start_soci();
    let (_ctd, _) = fx.start_containerd();
    let tar = fx.path("/etc/eks/pause.tar").display().to_string();
    let platform = format!("linux/{}", go_arch());
    let import = fx.ctr(&[
        "-n",
        "k8s.io",
        "images",
        "import",
        "--snapshotter",
        "soci",
        "--platform",
        &platform,
        &tar,
    ]);
    assert!(import.ok(), "{import}");

    // A good node: everything passes (units are skipped under a fixture).
    let r = doctor(&fx, None);
    assert_eq!(failing(&r), Vec::<&str>::new());
    assert_eq!(r.exit_code(), 0, "{}", r.render());
    for id in [
        "binaries",
        "fuse",
        "status",
        "containerd-config",
        "soci-config",
        "credentials",
        "containerd",
        "soci-plugin",
        "soci-socket",
        "sandbox-image",
    ] {
        assert_eq!(
            r.get(id).map(|c| c.status),
            Some(CheckStatus::Pass),
            "{id}\n{}",
            r.render()
        );
    }
    assert_eq!(r.get("units").unwrap().status, CheckStatus::Skip);

    // --image: a plain image has no SOCI index: a warning, exit 1.
    let registry = Registry::start(&fx.dir.join("registry"));
    let img = build_image(&fx.dir.join("img"), "v1", &[&[("app", "x\n")]]);
    let plain = img.push(&registry, "plain");
    let r = doctor(&fx, Some(plain));
    let c = r.get("image-index").unwrap();
    assert_eq!(c.status, CheckStatus::Warn, "{}", r.render());
    assert!(c.message.contains("no SOCI index"), "{c:?}");
    assert_eq!(r.exit_code(), 1);

    // Fault: the CRI snapshotter back to overlayfs in the config file.
    let original = fx.read(CONTAINERD_CONFIG);
    set_cri_snapshotter(&fx, "overlayfs");
    let r = doctor(&fx, None);
    assert_eq!(failing(&r), ["containerd-config"], "{}", r.render());
    assert!(
        r.get("containerd-config")
            .unwrap()
            .message
            .contains("\"overlayfs\", not \"soci\""),
        "{}",
        r.render()
    );
    assert_eq!(r.exit_code(), 2);
    fx.write(CONTAINERD_CONFIG, &original);
    assert_eq!(doctor(&fx, None).exit_code(), 0);

    // Fault: CRI credential mode, kubelet's drop-in gone.
    fx.set("credentials.mode", "cri");
    fx.preflight(&[]).assert_code(0);
    assert_eq!(fx.status()["credentials"], "cri");
    let r = doctor(&fx, None);
    assert_eq!(failing(&r), Vec::<&str>::new(), "{}", r.render());
    std::fs::remove_file(fx.path(DROPIN)).unwrap();
    let r = doctor(&fx, None);
    assert_eq!(failing(&r), ["credentials"], "{}", r.render());
    assert!(r
        .get("credentials")
        .unwrap()
        .message
        .contains("kubelet endpoint mismatch"));
    fx.set("credentials.mode", "docker");
    fx.preflight(&[]).assert_code(0);
    assert_eq!(doctor(&fx, None).exit_code(), 0);

    // Fault: the sandbox image is gone.
    let rm = fx.ctr(&["-n", "k8s.io", "images", "rm", &sandbox]);
    assert!(rm.ok(), "{rm}");
    let r = doctor(&fx, None);
    assert_eq!(failing(&r), ["sandbox-image"], "{}", r.render());
    assert!(r
        .get("sandbox-image")
        .unwrap()
        .message
        .contains("not in containerd"));
    let import = fx.ctr(&[
        "-n",
        "k8s.io",
        "images",
        "import",
        "--snapshotter",
        "soci",
        "--platform",
        &platform,
        &tar,
    ]);
    assert!(import.ok(), "{import}");
    assert_eq!(doctor(&fx, None).exit_code(), 0);

    // Fault: the snapshotter stopped.
    drop(soci);
    let r = doctor(&fx, None);
    assert_eq!(failing(&r), ["soci-socket"], "{}", r.render());
    assert_eq!(r.get("sandbox-image").unwrap().status, CheckStatus::Skip);
    assert_eq!(r.exit_code(), 2);
}

#[test]
fn containerd_2_1_good_node_and_faults() {
    good_node_then_each_fault(Ctd::V21);
}

#[test]
fn containerd_1_7_good_node_and_faults() {
    good_node_then_each_fault(Ctd::V17);
}

#[test]
fn fixture_root_without_running_daemons_skips_live_checks() {
    let mut fx = Fixture::new(Ctd::V21);
    symlink(Ctd::V21.ctr(), fx.path("/usr/bin/ctr")).unwrap();
    fx.set("containerd.address", fx.ctd_sock.display().to_string());
    fx.preflight(&[]).assert_code(0);
    let r = doctor(&fx, None);
    for id in [
        "containerd",
        "soci-plugin",
        "soci-socket",
        "sandbox-image",
        "units",
    ] {
        assert_eq!(r.get(id).unwrap().status, CheckStatus::Skip, "{id}");
    }
    assert_eq!(r.exit_code(), 0, "{}", r.render());
}

#[test]
fn fallback_fails_the_status_check_with_its_reason() {
    let fx = Fixture::new(Ctd::V21);
    std::fs::remove_file(fx.path("/dev/fuse")).unwrap();
    fx.preflight(&[]).assert_code(0);
    let r = doctor(&fx, None);
    let c = r.get("status").unwrap();
    assert_eq!(c.status, CheckStatus::Fail);
    assert!(c.message.contains("[no-fuse]"), "{c:?}");
    assert!(c.remedy.as_deref().unwrap().contains("modprobe fuse"));
    assert_eq!(failing(&r), ["fuse", "status"], "{}", r.render());
    assert_eq!(
        r.get("containerd-config").unwrap().status,
        CheckStatus::Skip,
        "overlayfs is right for a fallback"
    );
}
