//! `soci-node apply` on a running node with real containerd 2.1 and
//! soci-snapshotter-grpc: the overlayfs trap (an image unpacked only in
//! overlayfs before the switch) is found and handled, the plugin is checked,
//! the sandbox image primed. systemd is not running here, so the restarts are
//! done by the test between `apply --no-restart` and `apply` (the D-Bus
//! path itself is unit-tested against a fake and proven in the VM stage).

mod support;

use std::os::unix::fs::symlink;
use std::time::Duration;
use support::*;

fn apply(fx: &Fixture, args: &[&str]) -> (Run, serde_json::Value) {
    let run = run_cmd(
        fx.soci_node().arg("apply").arg("--json").args(args),
        Duration::from_secs(300),
    );
    let v = serde_json::from_str(&run.stdout).unwrap_or(serde_json::Value::Null);
    (run, v)
}

#[test]
fn apply_finds_and_removes_overlayfs_only_images() {
    let mut fx = Fixture::new(Ctd::V21);
    symlink(Ctd::V21.ctr(), fx.path("/usr/bin/ctr")).unwrap();
    let addr = fx.ctd_sock.display().to_string();
    fx.set("containerd.address", addr);
    fx.set("prime.plain_http", true);
    let registry = Registry::start(&fx.dir.join("registry"));
    let img = build_image(&fx.dir.join("img"), "v1", &[&[("app", "hello\n")], &[("etc/x", "y\n")]]);
    let app = img.push(&registry, "app");

    // A node running on overlayfs, with an image already pulled.
    let (ctd, _) = fx.start_containerd();
    let pull = fx.ctr(&["-n", "k8s.io", "images", "pull", "--plain-http", &app]);
    assert!(pull.ok(), "{pull}");
    assert!(!snapshot_keys(&fx.ctr(&["-n", "k8s.io", "snapshots", "--snapshotter", "overlayfs", "ls"]).stdout).is_empty());

    // apply --no-restart: configs written, nothing restarted; containerd
    // still runs the old config, so the plugin is not live: a warning.
    let (run, r) = apply(&fx, &["--no-restart"]);
    assert_eq!(run.code, Some(1), "{run}");
    assert_eq!(r["files_changed"], true, "{run}");
    assert_eq!(r["restarted"].as_array().unwrap().len(), 0);
    assert_eq!(fx.status()["state"], "active");

    // The restart systemd would do: snapshotter, then containerd.
    drop(ctd);
    let (_soci, _) = fx.start_soci();
    let (_ctd, _) = fx.start_containerd();

    // Now the trap is there: the CRI lists the image, but it is unpacked
    // only in overlayfs, not in the snapshotter the CRI now uses.
    let (run, r) = apply(&fx, &[]);
    assert_eq!(r["plugin_ok"], true, "{run}");
    assert_eq!(r["files_changed"], false, "{run}");
    assert_eq!(r["restarted"].as_array().unwrap().len(), 0, "nothing changed, plugin live: no restart\n{run}");
    assert_eq!(r["overlay_only_images"], serde_json::json!([app]), "{run}");
    assert_eq!(r["image_actions"], serde_json::json!([format!("removed {app}")]), "{run}");
    let ls = fx.ctr(&["-n", "k8s.io", "images", "ls", "-q"]);
    assert!(!ls.stdout.lines().any(|l| l == app), "{ls}");

    // The image comes back through SOCI; apply then finds nothing to do.
    let pull = fx.ctr(&["-n", "k8s.io", "images", "pull", "--plain-http", "--snapshotter", "soci", &app]);
    assert!(pull.ok(), "{pull}");
    let (run, r) = apply(&fx, &["--images", "keep"]);
    assert_eq!(r["overlay_only_images"], serde_json::json!([]), "{run}");
    // The sandbox image is not available (no tarball, no registry for it):
    // prime reports it, so apply fails with the reason.
    assert_eq!(run.code, Some(2), "{run}");
    assert!(run.stdout.contains("prime"), "{run}");
}

#[test]
fn apply_on_a_fallback_restarts_nothing() {
    let mut fx = Fixture::new(Ctd::V21);
    std::fs::remove_file(fx.path("/dev/fuse")).unwrap();
    fx.set("containerd.address", fx.ctd_sock.display().to_string());
    let (run, r) = apply(&fx, &[]);
    assert_eq!(run.code, Some(2), "{run}");
    assert_eq!(r["restarted"].as_array().unwrap().len(), 0);
    assert!(r["errors"][0].as_str().unwrap().contains("no-fuse"), "{run}");
}
