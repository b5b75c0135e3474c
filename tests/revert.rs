//! `revert` after a real `soci-node preflight`: every golden containerd
//! config (tests/fixtures/containerd/*.toml, not the *.expected.toml) and
//! the real `containerd config default` of 1.7 and 2.1 are activated by the
//! real binary, then reverted through the library; every file under the
//! root must be byte-identical (content and mode) to before the preflight,
//! and the files soci-node created (SOCI's config, kubelet's drop-in in CRI
//! mode) must be gone. A fixture that cannot be activated (CRI disabled)
//! must have been left unchanged by preflight instead.
//!
//! What revert deliberately leaves: the directories preflight created (it
//! does not know whether an empty directory existed before) and
//! /run/soci-node/ (the last preflight's status and the lock, runtime state
//! that is gone at the next boot).

mod support;

use soci_node::hostpath::Host;
use soci_node::revert::revert;
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use support::*;

const DROPIN: &str = "/etc/kubernetes/kubelet/config.json.d/40-soci-node-image-service.conf";

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/containerd")
}

/// Source fixtures: `(name, text)`, sorted.
fn source_fixtures() -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = fs::read_dir(fixtures_dir())
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            (name.ends_with(".toml") && !name.ends_with(".expected.toml"))
                .then(|| (name.clone(), fs::read_to_string(e.path()).unwrap()))
        })
        .collect();
    v.sort();
    v
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap().flatten() {
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            fs::copy(e.path(), &target).unwrap();
        }
    }
}

fn ctd_for(text: &str) -> Ctd {
    let t: toml::Table = text.parse().expect("fixture is TOML");
    match t.get("version").and_then(|v| v.as_integer()) {
        Some(3) => Ctd::V21,
        _ => Ctd::V17,
    }
}

/// A fixture root with `config` as containerd's config (and the fixture's
/// drop-in directories beside it), in `cred` credential mode.
fn node(ctd: Ctd, config: &str, cri: bool) -> Fixture {
    let mut fx = Fixture::new(ctd);
    fx.write(CONTAINERD_CONFIG, config);
    for d in ["imports-v2.d", "imports-v3.d"] {
        copy_dir(
            &fixtures_dir().join(d),
            &fx.path(&format!("/etc/containerd/{d}")),
        );
    }
    if cri {
        fx.set("credentials.mode", "cri");
    }
    fx
}

/// Differences between two trees that revert must not leave: every file
/// and link as before; only empty directories and /run/soci-node may be new.
fn unexpected(before: &BTreeMap<PathBuf, Node>, after: &BTreeMap<PathBuf, Node>) -> String {
    let mut out = String::new();
    let brief = |n: &Node| match n {
        Node::Dir(m) => format!("dir {m:o}"),
        Node::File(b, m) => format!("file {m:o}, {} bytes", b.len()),
        Node::Link(t) => format!("link to {}", t.display()),
    };
    for (k, v) in before {
        if k.starts_with("run/soci-node") {
            continue;
        }
        match after.get(k) {
            None => out.push_str(&format!("missing: {}\n", k.display())),
            Some(w) if w != v => out.push_str(&format!(
                "changed: {} ({} -> {})\n",
                k.display(),
                brief(v),
                brief(w)
            )),
            _ => {}
        }
    }
    for (k, v) in after {
        if before.contains_key(k) || k.starts_with("run/soci-node") {
            continue;
        }
        if !matches!(v, Node::Dir(_)) {
            out.push_str(&format!("added: {}\n", k.display()));
        }
    }
    out
}

/// Preflight, check it patched, revert, check byte-identical. Returns
/// whether the config was activated.
fn activate_and_revert(what: &str, fx: &Fixture, cri: bool) -> bool {
    let before = fx.tree();
    let original = fx.read(CONTAINERD_CONFIG);
    let run = fx.preflight(&[]);
    run.assert_code(0);
    let st = fx.status();
    let files = file_actions(&st);
    if st["state"] != "active" {
        // Not activatable: preflight must not have touched anything but
        // its own runtime state.
        assert_eq!(
            unexpected(&before, &fx.tree()),
            "",
            "{what}: a fallback changed files\n{run}"
        );
        assert_eq!(fx.read(CONTAINERD_CONFIG), original);
        eprintln!(
            "{what}: not activated ({:?}), left unchanged",
            reason_codes(&st)
        );
        return false;
    }
    assert!(
        files.iter().any(|(_, a)| a == "updated" || a == "created"),
        "{what}: nothing patched: {files:?}"
    );
    assert!(fx.path(SOCI_CONFIG).is_file(), "{what}");
    assert_eq!(
        fx.path(DROPIN).is_file(),
        cri,
        "{what}: drop-in in cri={cri}"
    );
    // The CRI now uses soci in containerd's effective config.
    let dump = fx.config_dump().unwrap();
    assert_eq!(
        toml_str(&dump, fx.ctd.cri_snapshotter_key()),
        Some("soci"),
        "{what}"
    );

    let host = Host::new(&fx.root);
    let report = revert(&host).unwrap_or_else(|e| panic!("{what}: revert failed: {e}"));
    let diff = unexpected(&before, &fx.tree());
    assert_eq!(
        diff, "",
        "{what}: not byte-identical after revert ({report:?})"
    );
    assert!(!fx.path(SOCI_CONFIG).exists(), "{what}");
    assert!(!fx.path(DROPIN).exists(), "{what}");
    assert!(!fx.path(BACKUP_DIR).exists(), "{what}: backups left");
    let mut removed = vec![SOCI_CONFIG.to_string()];
    if cri {
        removed.insert(0, DROPIN.to_string());
    }
    assert_eq!(report.removed, removed, "{what}");
    assert!(!report.restored.is_empty(), "{what}: {report:?}");
    // Idempotent.
    assert_eq!(
        revert(&host).unwrap(),
        Default::default(),
        "{what}: second revert"
    );
    eprintln!(
        "{what}: restored {:?}, removed {:?}",
        report.restored, report.removed
    );
    true
}

#[test]
fn every_golden_fixture_reverts_byte_for_byte() {
    let fixtures = source_fixtures();
    assert!(fixtures.len() >= 10, "fixtures not found: {fixtures:?}");
    let mut activated = 0;
    let mut not = Vec::new();
    for (i, (name, text)) in fixtures.iter().enumerate() {
        // Alternate credential modes so both file sets are exercised on
        // every schema.
        let cri = i % 2 == 0;
        let fx = node(ctd_for(text), text, cri);
        if activate_and_revert(&format!("{name} (cri={cri})"), &fx, cri) {
            activated += 1;
        } else {
            not.push(name.clone());
        }
    }
    // Only the CRI-disabled fixture cannot be activated.
    assert_eq!(not, ["disabled-cri-v2.toml"], "activated {activated}");
}

#[test]
fn containerd_default_configs_revert_in_both_credential_modes() {
    for ctd in [Ctd::V17, Ctd::V21] {
        for cri in [false, true] {
            let fx = node(ctd, &ctd.default_config(), cri);
            assert!(activate_and_revert(
                &format!("{ctd:?} config default (cri={cri})"),
                &fx,
                cri
            ));
        }
    }
}

#[test]
fn mode_is_restored_and_a_later_preflight_takes_fresh_backups() {
    let fx = node(Ctd::V21, &Ctd::V21.default_config(), false);
    let cfg = fx.path(CONTAINERD_CONFIG);
    fs::set_permissions(&cfg, fs::Permissions::from_mode(0o600)).unwrap();
    assert!(activate_and_revert("2.1 default, mode 0600", &fx, false));
    assert_eq!(
        fs::metadata(&cfg).unwrap().permissions().mode() & 0o7777,
        0o600
    );

    // The operator edits the config after the revert; the next preflight
    // backs up that version, and a revert returns to it.
    let edited = format!("{}\n# edited after revert\n", fx.read(CONTAINERD_CONFIG));
    fx.write(CONTAINERD_CONFIG, &edited);
    assert!(activate_and_revert("2.1 default, edited", &fx, false));
    assert_eq!(fx.read(CONTAINERD_CONFIG), edited);
}
