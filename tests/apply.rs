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

/// ctr in the root, containerd's private socket, and the sandbox image as an
/// archive at /etc/eks/pause.tar (so prime imports it: nothing leaves this
/// machine).
fn setup() -> Fixture {
    let mut fx = Fixture::new(Ctd::V21);
    symlink(Ctd::V21.ctr(), fx.path("/usr/bin/ctr")).unwrap();
    fx.set("containerd.address", fx.ctd_sock.display().to_string());
    fx.set("prime.plain_http", true);
    let dump = fx.config_dump().unwrap();
    let sandbox = toml_str(&dump, Ctd::V21.sandbox_key()).unwrap().to_string();
    fx.pause_tarball(&sandbox);
    fx
}

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
    let fx = setup();
    let registry = Registry::start(&fx.dir.join("registry"));
    let img = build_image(
        &fx.dir.join("img"),
        "v1",
        &[&[("app", "hello\n")], &[("etc/x", "y\n")]],
    );
    let app = img.push(&registry, "app");

    // A node running on overlayfs, with an image already pulled.
    let (ctd, _) = fx.start_containerd();
    let pull = fx.ctr(&["-n", "k8s.io", "images", "pull", "--plain-http", &app]);
    assert!(pull.ok(), "{pull}");
    assert!(!snapshot_keys(
        &fx.ctr(&[
            "-n",
            "k8s.io",
            "snapshots",
            "--snapshotter",
            "overlayfs",
            "ls"
        ])
        .stdout
    )
    .is_empty());

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
    assert_eq!(run.code, Some(0), "{run}");
    assert_eq!(r["plugin_ok"], true, "{run}");
    assert_eq!(r["files_changed"], false, "{run}");
    assert_eq!(
        r["restarted"].as_array().unwrap().len(),
        0,
        "nothing changed, plugin live: no restart\n{run}"
    );
    assert_eq!(r["overlay_only_images"], serde_json::json!([app]), "{run}");
    assert_eq!(
        r["image_actions"],
        serde_json::json!([format!("removed {app}")]),
        "{run}"
    );
    let ls = fx.ctr(&["-n", "k8s.io", "images", "ls", "-q"]);
    assert!(!ls.stdout.lines().any(|l| l == app), "{ls}");

    // The image comes back through SOCI; apply then finds nothing to do.
    let pull = fx.ctr(&[
        "-n",
        "k8s.io",
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        "soci",
        &app,
    ]);
    assert!(pull.ok(), "{pull}");
    let (run, r) = apply(&fx, &["--images", "keep"]);
    assert_eq!(r["overlay_only_images"], serde_json::json!([]), "{run}");
    assert_eq!(run.code, Some(0), "{run}");
    assert!(
        r["prime"].as_str().unwrap().contains("already"),
        "primed by the first apply: {run}"
    );
}

#[test]
fn apply_on_a_fallback_restarts_nothing() {
    let mut fx = Fixture::new(Ctd::V21);
    std::fs::remove_file(fx.path("/dev/fuse")).unwrap();
    fx.set("containerd.address", fx.ctd_sock.display().to_string());
    let (run, r) = apply(&fx, &[]);
    assert_eq!(run.code, Some(2), "{run}");
    assert_eq!(r["restarted"].as_array().unwrap().len(), 0);
    assert!(
        r["errors"][0].as_str().unwrap().contains("no-fuse"),
        "{run}"
    );
}

/// The trap itself, for real: a node that discards layers after unpacking
/// (as EKS configures containerd) pulls an image through the CRI on
/// overlayfs; after a plain switch to SOCI a new container from that image
/// fails; with `apply` the stale record is removed, the CRI pulls again
/// through SOCI, and the container is created.
#[test]
fn the_overlayfs_trap_without_and_with_apply() {
    let fx = setup();
    let cfg = fx.read(CONTAINERD_CONFIG);
    assert!(cfg.contains("discard_unpacked_layers = false"));
    fx.write(
        CONTAINERD_CONFIG,
        &cfg.replace(
            "discard_unpacked_layers = false",
            "discard_unpacked_layers = true",
        )
        // The CRI's own pull path honours discard_unpacked_layers; 2.1's
        // transfer-service path keeps the layers.
        .replace(
            "use_local_image_pull = false",
            "use_local_image_pull = true",
        ),
    );
    let registry = Registry::start(&fx.dir.join("registry"));
    let img = build_image(&fx.dir.join("img"), "v1", &[&[("app", "hello\n")]]);
    let app = img.push(&registry, "app");

    let (ctd, _) = fx.start_containerd();
    cri_pull(&fx.ctd_sock, &app, &fx.dir).unwrap_or_else(|e| panic!("{e}"));

    // Switch without apply's image handling: preflight and the restarts.
    fx.preflight(&[]).assert_code(0);
    drop(ctd);
    let (_soci, _) = fx.start_soci();
    let (ctd, _) = fx.start_containerd();
    // containerd's garbage collector removes the discarded layer shortly
    // after start; wait until only the manifest and config are left.
    let gone = wait_until(Duration::from_secs(20), Duration::from_millis(100), || {
        let ls = fx.ctr(&["-n", "k8s.io", "content", "ls", "-q"]);
        (ls.ok() && ls.stdout.lines().count() == 2).then_some(())
    });
    assert!(
        gone.is_some(),
        "{}",
        fx.ctr(&["-n", "k8s.io", "content", "ls"])
    );
    let create = |name: &str| {
        fx.ctr(&[
            "-n",
            "k8s.io",
            "containers",
            "create",
            "--snapshotter",
            "soci",
            &app,
            name,
        ])
    };
    let broken = create("before");
    assert!(
        !broken.ok(),
        "a container from the stale image must fail: {broken}"
    );
    eprintln!("without apply: {}", broken.stderr.trim());
    assert!(
        broken.stderr.contains("content digest") || broken.stderr.contains("failed to get reader"),
        "{broken}"
    );

    let (run, r) = apply(&fx, &["--images", "remove"]);
    assert_eq!(run.code, Some(0), "{run}");
    let removed: Vec<&str> = r["image_actions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    // The CRI records the tag and the digest reference: both go.
    assert!(
        removed.contains(&format!("removed {app}").as_str()),
        "{run}"
    );
    assert_eq!(removed.len(), 2, "{run}");
    // kubelet's next pull of the image goes through the CRI, now on SOCI.
    cri_pull(&fx.ctd_sock, &app, &fx.dir).unwrap_or_else(|e| panic!("{e}"));
    let fixed = create("after");
    assert!(fixed.ok(), "{fixed}");
    drop(ctd);
}
