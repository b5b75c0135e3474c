//! soci-node against the real thing: containerd 1.6, 1.7 and 2.1 and
//! soci-snapshotter-grpc 0.4.1 from Debian (installed into .deps/ by
//! `scripts/test-deps.sh`), a loopback registry and an image built here.
//!
//! Per containerd version: preflight activates SOCI; containerd's own
//! `config dump` accepts the result and shows the CRI switched to `soci`; a
//! second preflight changes nothing; the daemons start on the written
//! configs; a CRI PullImage (what kubelet sends, naming no snapshotter) lands
//! the image's layers in the soci snapshotter and none in overlayfs (on 2.1
//! also a transfer-service pull by ctr, which follows `unpack_config`).

mod support;

use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};
use support::*;

#[test]
fn containerd_1_6_activates_soci_and_pulls_through_it() {
    activate_and_pull(Ctd::V16);
}

#[test]
fn containerd_1_7_activates_soci_and_pulls_through_it() {
    activate_and_pull(Ctd::V17);
}

#[test]
fn containerd_2_1_activates_soci_and_pulls_through_it() {
    activate_and_pull(Ctd::V21);
}

fn activate_and_pull(v: Ctd) {
    let fx = Fixture::new(v);
    let original = fx.read(CONTAINERD_CONFIG);
    let dump_before = fx
        .config_dump()
        .expect("containerd rejects its own default config");
    assert_eq!(
        toml_str(&dump_before, v.cri_snapshotter_key()),
        Some("overlayfs"),
        "precondition: the default CRI snapshotter"
    );

    // --- first preflight: activate --------------------------------------
    let run = fx.preflight(&[]);
    run.assert_code(0);
    let preflight_ms = run.elapsed.as_millis();
    let st = fx.status();
    assert_eq!(st["state"], "active", "{run}\nstatus: {st:#}");
    assert_eq!(
        st["mode"], "lazy",
        "SOCI 0.4.1 has no parallel pull: {st:#}"
    );
    let actions = file_actions(&st);
    assert!(
        actions.contains(&(CONTAINERD_CONFIG.into(), "updated".into())),
        "{actions:?}"
    );
    assert!(
        actions.contains(&(SOCI_CONFIG.into(), "created".into())),
        "{actions:?}"
    );

    // containerd itself is the validator of what was written.
    let dump = fx
        .config_dump()
        .unwrap_or_else(|e| panic!("containerd rejects the patched config: {e}"));
    assert_eq!(
        toml_str(&dump, v.cri_snapshotter_key()),
        Some("soci"),
        "CRI snapshotter in the dump"
    );
    let mut annotations_key = v.cri_snapshotter_key().to_vec();
    *annotations_key.last_mut().unwrap() = "disable_snapshot_annotations";
    assert_eq!(
        toml_get(&dump, &annotations_key).and_then(|v| v.as_bool()),
        Some(false),
        "SOCI needs the CRI's snapshot annotations (lazy loading)"
    );
    assert_eq!(
        toml_str(&dump, &["proxy_plugins", "soci", "type"]),
        Some("snapshot")
    );
    assert_eq!(
        toml_str(&dump, &["proxy_plugins", "soci", "address"]),
        Some(fx.soci_sock.to_str().unwrap())
    );
    if v != Ctd::V16 {
        // containerd 1.6 has no proxy-plugin exports; newer ones need the
        // root for GC and disk accounting.
        assert_eq!(
            toml_str(&dump, &["proxy_plugins", "soci", "exports", "root"]),
            Some(fx.soci_root.to_str().unwrap()),
            "proxy_plugins.soci.exports.root"
        );
    }
    if v == Ctd::V21 {
        // containerd >= 2.1 pulls CRI images through the transfer service,
        // whose unpack config picks the snapshotter.
        assert!(
            transfer_unpack_snapshotters(&dump).contains(&"soci".to_string()),
            "transfer unpack_config: {:?}",
            toml_get(
                &dump,
                &[
                    "plugins",
                    "io.containerd.transfer.v1.local",
                    "unpack_config"
                ]
            )
        );
    }
    assert_eq!(
        toml_get(&dump, v.sandbox_key()),
        toml_get(&dump_before, v.sandbox_key()),
        "sandbox image must not change"
    );
    assert!(toml_get(&dump, v.sandbox_key()).is_some());
    assert_eq!(
        fs::read_to_string(fx.path(&format!("{BACKUP_DIR}{CONTAINERD_CONFIG}"))).ok(),
        Some(original.clone()),
        "the backup must be the original, byte for byte"
    );

    // --- second preflight: nothing changes ------------------------------
    let mut before = fx.tree();
    before.retain(|p, _| !p.starts_with("run"));
    let run2 = fx.preflight(&[]);
    run2.assert_code(0);
    let second_ms = run2.elapsed.as_millis();
    let mut after = fx.tree();
    after.retain(|p, _| !p.starts_with("run"));
    let diff = tree_diff(&before, &after);
    assert!(
        diff.is_empty(),
        "second preflight changed files:\n{diff}\n{run2}"
    );
    let st2 = fx.status();
    assert_eq!(st2["state"], "active", "{st2:#}");
    let actions2 = file_actions(&st2);
    assert!(!actions2.is_empty());
    for (path, action) in &actions2 {
        assert_eq!(
            action, "unchanged",
            "{path} on the second run: {actions2:?}"
        );
    }

    // --- live: registry, SOCI, containerd, CRI pull -----------------------
    let registry = Registry::start(&fx.dir.join("reg"));
    let image = build_image(
        &fx.dir.join("img"),
        "v1",
        &[
            &[
                ("etc/os-release", "ID=soci-node-test\n"),
                ("bin/hello", "hi\n"),
            ],
            &[
                ("app/data.txt", "layer two\n"),
                ("app/more/readme", "x\n"),
                ("app/config.json", "{}\n"),
            ],
        ],
    );
    let reference = image.push(&registry, "soci-node/test");

    let (mut soci, soci_ready) = fx.start_soci();
    let (mut containerd, ctd_ready) = fx.start_containerd();

    let plugins = fx.ctr(&["plugins", "ls"]);
    assert!(plugins.ok(), "{plugins}");
    let soci_line = plugins
        .stdout
        .lines()
        .find(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.first() == Some(&"io.containerd.snapshotter.v1") && f.get(1) == Some(&"soci")
        })
        .unwrap_or_else(|| panic!("no soci snapshotter plugin:\n{}", plugins.stdout));
    assert_eq!(
        soci_line.split_whitespace().last(),
        Some("ok"),
        "soci plugin status: {soci_line}\n{}",
        containerd.log_tail(30)
    );

    // containerd 2.1: the CRI pulls through its local path while
    // `disable_snapshot_annotations = false` (which soci-node sets; the
    // transfer service is skipped then), but ctr and other clients use the
    // transfer service, whose `unpack_config` picks the snapshotter. Pull
    // the image that way too, in the `default` namespace, naming no
    // snapshotter, alongside the CRI pull (both mostly wait on SOCI).
    let transfer_pull = (v == Ctd::V21).then(|| {
        let mut cmd = Command::new(v.ctr());
        cmd.arg("--address").arg(&fx.ctd_sock).args([
            "-n",
            "default",
            "images",
            "pull",
            "--plain-http",
            &reference,
        ]);
        std::thread::spawn(move || run_cmd(&mut cmd, Duration::from_secs(170)))
    });

    // A real CRI pull: the CRI plugin picks the snapshotter from the config
    // soci-node wrote. SOCI 0.4.1 looks for a SOCI index over HTTPS only and
    // retries for ~8 s per layer against this plain-HTTP registry before it
    // hands the layer back to containerd to unpack (into the soci
    // snapshotter); that is most of the pull time here.
    let pull_start = Instant::now();
    let pulled = cri_pull(&fx.ctd_sock, &reference, &fx.dir);
    let pull_ms = pull_start.elapsed().as_millis();
    let image_ref = pulled.unwrap_or_else(|e| {
        panic!(
            "{e}\n--- containerd ---\n{}\n--- soci ---\n{}\n{:?} {:?}",
            containerd.log_tail(30),
            soci.log_tail(30),
            containerd.alive(),
            soci.alive()
        )
    });
    assert!(image_ref.starts_with("sha256:"), "{image_ref}");

    let images = fx.ctr(&["-n", "k8s.io", "images", "ls", "-q"]);
    assert!(
        images.stdout.lines().any(|l| l == reference),
        "{reference} not in the CRI namespace: {images}"
    );
    assert_layers_in_soci(&fx, "k8s.io", image.layer_count);

    if let Some(handle) = transfer_pull {
        let run = handle.join().expect("ctr pull thread");
        assert!(
            run.ok(),
            "ctr (transfer service) pull failed: {run}\n{}",
            containerd.log_tail(30)
        );
        assert_layers_in_soci(&fx, "default", image.layer_count);
    }
    containerd.alive().expect("containerd died");
    soci.alive().expect("soci-snapshotter-grpc died");

    eprintln!(
        "[timing] {}: preflight (activate) {preflight_ms} ms wall (status total_ms {}), \
         second preflight {second_ms} ms; soci-snapshotter-grpc start-to-ready {} ms; \
         containerd start-to-ready {} ms; CRI pull of {} layers {pull_ms} ms",
        v.dir_name(),
        st["total_ms"],
        soci_ready.as_millis(),
        ctd_ready.as_millis(),
        image.layer_count
    );
    drop(containerd);
    drop(soci);
    drop(registry);
}

/// `credentials.mode = "cri"`: SOCI gets `[cri_keychain]` and kubelet a
/// drop-in pointing its image service at SOCI's socket; back to "docker"
/// removes the drop-in again.
#[test]
fn cri_credentials_write_and_remove_the_kubelet_dropin() {
    let mut fx = Fixture::new(Ctd::V21);
    fx.set("credentials.mode", "cri");
    let run = fx.preflight(&[]);
    run.assert_code(0);
    let st = fx.status();
    assert_eq!(st["state"], "active", "{run}\n{st:#}");
    assert_eq!(st["credentials"], "cri", "{st:#}");

    let dropins = conf_files(&fx);
    assert_eq!(dropins.len(), 1, "one kubelet drop-in: {dropins:?}");
    let text = fs::read_to_string(&dropins[0]).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("drop-in is not JSON: {e}\n{text}"));
    assert_eq!(
        json["imageServiceEndpoint"],
        format!("unix://{}", fx.soci_sock.display()),
        "{text}"
    );
    assert_eq!(json["kind"], "KubeletConfiguration", "{text}");

    let soci_cfg: toml::Table = toml::from_str(&fx.read(SOCI_CONFIG)).unwrap();
    assert_eq!(
        toml_get(&soci_cfg, &["cri_keychain", "enable_keychain"]).and_then(|v| v.as_bool()),
        Some(true),
        "{soci_cfg:#?}"
    );
    let dump = fx.config_dump().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        toml_str(&dump, Ctd::V21.cri_snapshotter_key()),
        Some("soci")
    );

    // Back to docker credentials: the drop-in goes, the keychain goes.
    fx.set("credentials.mode", "docker");
    let run = fx.preflight(&[]);
    run.assert_code(0);
    let st = fx.status();
    assert_eq!(st["state"], "active", "{run}\n{st:#}");
    assert_eq!(st["credentials"], "docker");
    assert!(conf_files(&fx).is_empty(), "{:?}", conf_files(&fx));
    assert!(
        file_actions(&st)
            .iter()
            .any(|(p, a)| p.starts_with(KUBELET_DROPIN_DIR) && a == "removed"),
        "{:?}",
        file_actions(&st)
    );
    let soci_cfg: toml::Table = toml::from_str(&fx.read(SOCI_CONFIG)).unwrap();
    assert_ne!(
        toml_get(&soci_cfg, &["cri_keychain", "enable_keychain"]).and_then(|v| v.as_bool()),
        Some(true),
        "{soci_cfg:#?}"
    );
    fx.config_dump().unwrap_or_else(|e| panic!("{e}"));
}

/// `layers` committed snapshots in the soci snapshotter, none in overlayfs.
fn assert_layers_in_soci(fx: &Fixture, namespace: &str, layers: usize) {
    let soci = fx.ctr(&["-n", namespace, "snapshots", "--snapshotter", "soci", "ls"]);
    assert!(soci.ok(), "{soci}");
    assert_eq!(
        snapshot_keys(&soci.stdout).len(),
        layers,
        "{namespace}: one committed soci snapshot per layer:\n{}",
        soci.stdout
    );
    assert!(
        soci.stdout
            .lines()
            .skip(1)
            .all(|l| l.trim_end().ends_with("Committed")),
        "{namespace}: {}",
        soci.stdout
    );
    let overlay = fx.ctr(&[
        "-n",
        namespace,
        "snapshots",
        "--snapshotter",
        "overlayfs",
        "ls",
    ]);
    assert!(overlay.ok(), "{overlay}");
    assert!(
        snapshot_keys(&overlay.stdout).is_empty(),
        "{namespace}: the image must not be in overlayfs:\n{}",
        overlay.stdout
    );
}

fn conf_files(fx: &Fixture) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = fs::read_dir(fx.path(KUBELET_DROPIN_DIR))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "conf"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}
