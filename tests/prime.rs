//! `soci-node prime` against real containerd (1.7, 2.1) and a real
//! soci-snapshotter-grpc: the sandbox image, imported from an image archive
//! as EKS ships it (/etc/eks/pause.tar), lands in the soci snapshotter; a
//! second run is a no-op; with SOCI not the CRI snapshotter it does nothing.

mod support;

use std::os::unix::fs::symlink;
use std::time::Duration;
use support::*;

fn sandbox_image(fx: &Fixture) -> String {
    let dump = fx.config_dump().unwrap();
    toml_str(&dump, fx.ctd.sandbox_key()).unwrap().to_string()
}

fn prime(fx: &Fixture) -> (Run, serde_json::Value) {
    let run = run_cmd(
        fx.soci_node().args(["prime", "--json"]),
        Duration::from_secs(180),
    );
    let v = serde_json::from_str(&run.stdout).unwrap_or(serde_json::Value::Null);
    (run, v)
}

fn setup(ctd: Ctd) -> Fixture {
    let mut fx = Fixture::new(ctd);
    symlink(ctd.ctr(), fx.path("/usr/bin/ctr")).unwrap();
    let addr = fx.ctd_sock.display().to_string();
    fx.set("containerd.address", addr);
    fx.set("prime.timeout_ms", 120_000);
    fx
}

fn primes_from_the_tarball(ctd: Ctd) {
    let fx = setup(ctd);
    fx.preflight(&[]).assert_code(0);
    let image = sandbox_image(&fx);
    fx.pause_tarball(&image);
    let (_soci, _) = fx.start_soci();
    let (_ctd, _) = fx.start_containerd();

    let (run, first) = prime(&fx);
    run.assert_code(0);
    assert_eq!(first["action"], "imported", "{run}");
    assert_eq!(first["image"], image.as_str());
    // The image's layer snapshot is committed in the soci snapshotter...
    let soci = fx.ctr(&["-n", "k8s.io", "snapshots", "--snapshotter", "soci", "ls"]);
    assert!(soci.ok(), "{soci}");
    assert_eq!(snapshot_keys(&soci.stdout).len(), 1, "{soci}");
    // ...and not in overlayfs.
    let ovl = fx.ctr(&[
        "-n",
        "k8s.io",
        "snapshots",
        "--snapshotter",
        "overlayfs",
        "ls",
    ]);
    assert!(snapshot_keys(&ovl.stdout).is_empty(), "{ovl}");

    let (run, second) = prime(&fx);
    run.assert_code(0);
    assert_eq!(second["action"], "already-primed", "{run}");
    eprintln!(
        "prime on containerd {:?}: first run {} ms (import), no-op run {} ms",
        ctd, first["elapsed_ms"], second["elapsed_ms"]
    );
    assert_eq!(
        fx.ctr(&["-n", "k8s.io", "snapshots", "--snapshotter", "soci", "ls"])
            .stdout,
        soci.stdout,
        "a no-op run changes nothing"
    );
}

#[test]
fn containerd_1_7_primes_from_the_tarball() {
    primes_from_the_tarball(Ctd::V17);
}

#[test]
fn containerd_2_1_primes_from_the_tarball() {
    primes_from_the_tarball(Ctd::V21);
}

#[test]
fn nothing_to_do_when_soci_is_not_the_snapshotter() {
    // No preflight: containerd's default config, overlayfs.
    let fx = setup(Ctd::V21);
    let (run, r) = prime(&fx);
    run.assert_code(0);
    assert_eq!(r["action"], "skipped", "{run}");
    assert!(
        r["message"].as_str().unwrap().contains("overlayfs"),
        "{run}"
    );
}

#[test]
fn a_tarball_without_the_image_fails_bounded_and_says_why() {
    let mut fx = setup(Ctd::V21);
    fx.preflight(&[]).assert_code(0);
    fx.pause_tarball("example.invalid/not-the-sandbox:1");
    fx.set("prime.attempts", 2);
    let (_soci, _) = fx.start_soci();
    let (_ctd, _) = fx.start_containerd();
    let (run, _) = prime(&fx);
    run.assert_code(1);
    assert!(run.stderr.contains("does not contain"), "{run}");
    assert!(run.stderr.contains("2 attempt"), "{run}");
}

#[test]
fn containerd_down_is_reported_within_the_bound() {
    let mut fx = setup(Ctd::V21);
    fx.preflight(&[]).assert_code(0);
    fx.set("prime.timeout_ms", 1500);
    let (run, _) = prime(&fx);
    run.assert_code(1);
    assert!(run.stderr.contains("did not answer"), "{run}");
    assert!(run.elapsed < Duration::from_secs(10), "{run}");
}
