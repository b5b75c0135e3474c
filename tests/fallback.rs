//! Every way preflight can fail to activate SOCI must leave a containerd
//! config that the real containerd accepts (`config dump`), with the CRI on
//! its own snapshotter, exit 0 (unless `on_failure = "fail"`), and a status
//! file that names the reason. Run against real containerd binaries:
//! 2.1 (config v3) and 1.7/1.6 (config v2).

mod support;

use std::fs;
use std::process::Command;
use std::time::Duration;
use support::*;

/// The checks every fallback shares; returns the status.
#[track_caller]
fn assert_fallback(fx: &Fixture, run: &Run, code: &str) -> serde_json::Value {
    run.assert_code(0);
    let st = fx.status();
    assert_eq!(st["state"], "fallback", "{run}\nstatus: {st:#}");
    let codes = reason_codes(&st);
    assert!(
        codes.iter().any(|c| c == code),
        "reason {code:?} expected, got {codes:?}\n{st:#}"
    );
    assert_not_soci(fx);
    st
}

/// containerd accepts its config and the CRI does not use soci.
#[track_caller]
fn assert_not_soci(fx: &Fixture) -> toml::Table {
    let dump = fx
        .config_dump()
        .unwrap_or_else(|e| panic!("containerd rejects its config after preflight: {e}"));
    let snap = toml_str(&dump, fx.ctd.cri_snapshotter_key());
    assert_eq!(snap, Some("overlayfs"), "CRI snapshotter after a fallback");
    assert!(
        !transfer_unpack_snapshotters(&dump).contains(&"soci".to_string()),
        "transfer unpack config still names soci"
    );
    dump
}

const BOTH: [Ctd; 2] = [Ctd::V21, Ctd::V17];

#[test]
fn no_fuse() {
    for v in BOTH {
        let fx = Fixture::new(v);
        let original = fx.read(CONTAINERD_CONFIG);
        fs::remove_file(fx.path("/dev/fuse")).unwrap();
        let run = fx.preflight(&[]);
        let st = assert_fallback(&fx, &run, "no-fuse");
        assert!(
            reason_message(&st, "no-fuse")
                .unwrap()
                .contains("/dev/fuse"),
            "{st:#}"
        );
        assert_eq!(fx.read(CONTAINERD_CONFIG), original, "{v:?}");
        assert!(!fx.path(SOCI_CONFIG).exists(), "{v:?}: SOCI config written");
    }
}

#[test]
fn missing_soci_binary() {
    for v in BOTH {
        let fx = Fixture::new(v);
        let original = fx.read(CONTAINERD_CONFIG);
        fs::remove_file(fx.path("/usr/bin/soci-snapshotter-grpc")).unwrap();
        let run = fx.preflight(&[]);
        assert_fallback(&fx, &run, "soci-binary");
        assert_eq!(fx.read(CONTAINERD_CONFIG), original, "{v:?}");
    }
}

#[test]
fn crashing_soci_binary() {
    for v in BOTH {
        let fx = Fixture::new(v);
        let original = fx.read(CONTAINERD_CONFIG);
        fx.replace_binary(
            "/usr/bin/soci-snapshotter-grpc",
            "#!/bin/sh\necho 'SIGSEGV: segmentation violation (test)' >&2\nexit 139\n",
        );
        let run = fx.preflight(&[]);
        let st = assert_fallback(&fx, &run, "soci-binary");
        let msg = reason_message(&st, "soci-binary").unwrap();
        assert!(
            msg.contains("segmentation violation") || msg.contains("139"),
            "the reason should say how the binary failed: {msg}"
        );
        assert_eq!(fx.read(CONTAINERD_CONFIG), original, "{v:?}");
    }
}

#[test]
fn unparsable_containerd_config_is_left_alone() {
    for v in BOTH {
        let fx = Fixture::new(v);
        // A blind append of a table that exists: "duplicated tables".
        let mut text = fx.read(CONTAINERD_CONFIG);
        let at = text.len();
        text.push_str("\n[grpc]\n  address = \"/run/other.sock\"\n");
        let dup_line = text[..at + 1].matches('\n').count() + 1;
        fx.write(CONTAINERD_CONFIG, &text);
        assert!(
            fx.config_dump().is_err(),
            "precondition: containerd rejects a duplicated table too"
        );

        let run = fx.preflight(&[]);
        run.assert_code(0);
        let st = fx.status();
        assert_eq!(st["state"], "fallback", "{run}\n{st:#}");
        let msg = reason_message(&st, "containerd-config")
            .unwrap_or_else(|| panic!("no containerd-config reason: {st:#}"));
        assert!(msg.contains(CONTAINERD_CONFIG), "names the file: {msg}");
        // `file:line:column` or "line N, column M"; the duplicate header is
        // in column 1.
        let compact = format!("{CONTAINERD_CONFIG}:{dup_line}:1");
        let spelled = format!("line {dup_line}, column 1");
        assert!(
            msg.contains(&compact) || msg.contains(&spelled),
            "names line {dup_line} and column 1 of the file: {msg}"
        );
        assert_eq!(
            fx.read(CONTAINERD_CONFIG),
            text,
            "{v:?}: an unparsable file must stay byte-identical"
        );
        assert!(!fx.path(SOCI_CONFIG).exists());
    }
}

/// `/etc` read-only (bind-mounted ro in a private mount namespace): no
/// config can be written, containerd's stays as it was, and the status
/// still lands under /run.
#[test]
fn read_only_etc() {
    let fx = Fixture::new(Ctd::V16);
    let original = fx.read(CONTAINERD_CONFIG);
    let etc = fx.path("/etc");
    let script = r#"mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" || exit 90
if touch "$1/probe" 2>/dev/null; then exit 91; fi
exec "$2" --root "$3" preflight"#;
    let run = run_cmd(
        Command::new(require_tool("unshare"))
            .args(["-m", "sh", "-c", script, "sh"])
            .arg(&etc)
            .arg(SOCI_NODE)
            .arg(&fx.root),
        Duration::from_secs(60),
    );
    assert_ne!(run.code, Some(90), "could not make /etc read-only: {run}");
    assert_ne!(run.code, Some(91), "/etc was still writable: {run}");
    run.assert_code(0);
    let st = fx.status();
    assert_eq!(st["state"], "fallback", "{run}\n{st:#}");
    let all = st["reasons"].to_string().to_lowercase();
    assert!(
        all.contains("read-only"),
        "the reason should say the file system is read-only: {all}"
    );
    assert_eq!(fx.read(CONTAINERD_CONFIG), original);
    assert!(!fx.path(SOCI_CONFIG).exists());
    assert_not_soci(&fx);
}

#[test]
fn disk_below_threshold() {
    for v in BOTH {
        let mut fx = Fixture::new(v);
        let original = fx.read(CONTAINERD_CONFIG);
        fx.set("storage.min_free_gib", 1_000_000);
        let run = fx.preflight(&[]);
        let st = assert_fallback(&fx, &run, "disk-space");
        assert!(
            reason_message(&st, "disk-space")
                .unwrap()
                .contains("min_free_gib"),
            "{st:#}"
        );
        assert_eq!(fx.read(CONTAINERD_CONFIG), original);
    }
}

#[test]
fn on_failure_fail_exits_1() {
    let mut fx = Fixture::new(Ctd::V16);
    let original = fx.read(CONTAINERD_CONFIG);
    fx.set("on_failure", "fail");
    fs::remove_file(fx.path("/dev/fuse")).unwrap();
    let run = fx.preflight(&[]);
    run.assert_code(1);
    let st = fx.status();
    assert_eq!(st["state"], "fallback", "{st:#}");
    assert!(reason_codes(&st).contains(&"no-fuse".to_string()));
    assert_eq!(fx.read(CONTAINERD_CONFIG), original);
    assert_not_soci(&fx);
}

/// Activated by an earlier boot, then FUSE disappears: the CRI goes back to
/// the snapshotter it had before soci-node, and comes back to soci when
/// FUSE does.
#[test]
fn fallback_after_activation_restores_the_original_snapshotter() {
    for v in BOTH {
        let fx = Fixture::new(v);
        let original = fx.read(CONTAINERD_CONFIG);
        let run = fx.preflight(&[]);
        run.assert_code(0);
        assert_eq!(fx.status()["state"], "active", "{run}");
        let dump = fx.config_dump().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(toml_str(&dump, v.cri_snapshotter_key()), Some("soci"));

        fs::remove_file(fx.path("/dev/fuse")).unwrap();
        let run = fx.preflight(&[]);
        assert_fallback(&fx, &run, "no-fuse");
        // Everything soci-node set goes back to the original (the backup):
        // for containerd's own default config that is byte for byte.
        assert_eq!(fx.read(CONTAINERD_CONFIG), original, "{v:?}");
        // Idempotent in fallback too.
        let before = fx.read(CONTAINERD_CONFIG);
        let run = fx.preflight(&[]);
        assert_fallback(&fx, &run, "no-fuse");
        assert_eq!(fx.read(CONTAINERD_CONFIG), before);

        fs::write(fx.path("/dev/fuse"), "").unwrap();
        let run = fx.preflight(&[]);
        run.assert_code(0);
        assert_eq!(fx.status()["state"], "active", "{run}");
        let dump = fx.config_dump().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(toml_str(&dump, v.cri_snapshotter_key()), Some("soci"));
    }
}

#[test]
fn unknown_settings_key_is_named() {
    let fx = Fixture::new(Ctd::V17);
    let original = fx.read(CONTAINERD_CONFIG);
    let mut text = toml::to_string(&fx.settings).unwrap();
    text.push_str("\n[storage]\nmin_fre_gib = 5\n");
    fx.write(SETTINGS, &text);
    // Settings that do not parse mean defaults, and the default IMDS
    // endpoint is not loopback: run in an empty network namespace so
    // nothing leaves this machine.
    let run = run_cmd(
        Command::new(require_tool("unshare"))
            .arg("-n")
            .arg(SOCI_NODE)
            .arg("--root")
            .arg(&fx.root)
            .arg("preflight"),
        Duration::from_secs(60),
    );
    let st = assert_fallback(&fx, &run, "settings");
    let msg = reason_message(&st, "settings").unwrap();
    assert!(msg.contains("min_fre_gib"), "names the key: {msg}");
    assert!(msg.contains(SETTINGS), "names the file: {msg}");
    assert_eq!(fx.read(CONTAINERD_CONFIG), original);
}

/// IMDS only informs the decision (instance type, for logs and tuning):
/// an IMDS that hangs or fails must cost at most its timeout and must not
/// stop SOCI from being activated.
#[test]
fn imds_that_hangs_or_fails_is_bounded_and_only_informs() {
    let silent = LoopbackServer::silent();
    let failing = LoopbackServer::http_status(500);
    let timeout_ms: u64 = 300;
    for (what, server) in [("silent", &silent), ("500", &failing)] {
        let mut fx = Fixture::new(Ctd::V21);
        fx.set("imds.enabled", true);
        fx.set("imds.endpoint", server.url());
        fx.set("imds.timeout_ms", timeout_ms as i64);
        let run = fx.preflight(&[]);
        run.assert_code(0);
        let st = fx.status();
        assert_eq!(st["state"], "active", "{what}: {run}\n{st:#}");
        let imds = &st["facts"]["imds"];
        assert!(
            imds["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{what}: facts.imds.error should say what went wrong: {imds:#}"
        );
        let elapsed = imds["elapsed_ms"]
            .as_u64()
            .unwrap_or_else(|| panic!("{what}: facts.imds.elapsed_ms missing: {imds:#}"));
        // The promise: IMDS costs at most its timeout plus a small margin.
        assert!(
            elapsed <= timeout_ms + 150,
            "{what}: IMDS took {elapsed} ms with timeout_ms = {timeout_ms}"
        );
        eprintln!(
            "[timing] IMDS {what}: {elapsed} ms (timeout {timeout_ms} ms), preflight {} ms",
            run.elapsed.as_millis()
        );
    }
}

/// 20 preflights at once on one root: the lock serialises them, the result
/// is one valid, fully patched config, no temp files are left behind, and
/// the backup is the original, not a half-patched copy.
#[test]
fn concurrent_preflights() {
    let mut fx = Fixture::new(Ctd::V21);
    // 20 runs start 60 `--version` probes at once on 2 cores; give them
    // room so a slow probe under this load is not mistaken for a broken
    // binary (that is not what this test is about).
    fx.set("binaries.timeout_ms", 30_000);
    let original = fx.read(CONTAINERD_CONFIG);
    let children: Vec<_> = (0..20)
        .map(|_| {
            let mut c = fx.soci_node();
            c.arg("preflight")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            c.spawn().expect("spawn soci-node")
        })
        .collect();
    let start = std::time::Instant::now();
    let mut outputs = Vec::new();
    for child in children {
        let out = child.wait_with_output().expect("wait");
        outputs.push(output_to_run(
            "soci-node preflight".into(),
            out,
            start.elapsed(),
        ));
    }
    for r in &outputs {
        r.assert_code(0);
        assert!(r.stdout.contains("active"), "{r}");
    }
    let st = fx.status();
    assert_eq!(st["state"], "active", "{st:#}");
    let dump = fx.config_dump().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        toml_str(&dump, Ctd::V21.cri_snapshotter_key()),
        Some("soci")
    );
    assert!(transfer_unpack_snapshotters(&dump).contains(&"soci".to_string()));
    assert_eq!(
        toml_str(&dump, &["proxy_plugins", "soci", "address"]),
        Some(fx.soci_sock.to_str().unwrap())
    );
    for dir in ["/etc/containerd", "/etc/soci-snapshotter-grpc"] {
        let leftovers: Vec<_> = fs::read_dir(fx.path(dir))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".soci-node"))
            .collect();
        assert!(
            leftovers.is_empty(),
            "temp files left in {dir}: {leftovers:?}"
        );
    }
    let backup = fs::read_to_string(fx.path(&format!("{BACKUP_DIR}{CONTAINERD_CONFIG}")))
        .expect("backup of containerd's config");
    assert!(backup == original, "the backup is not the original file");
    eprintln!(
        "[timing] 20 concurrent preflights finished in {} ms",
        start.elapsed().as_millis()
    );
}

/// `--dry-run` shows the diff and writes nothing at all.
#[test]
fn dry_run_prints_a_diff_and_writes_nothing() {
    for v in [Ctd::V21, Ctd::V16] {
        let fx = Fixture::new(v);
        let before = fx.tree();
        let run = fx.preflight(&["--dry-run"]);
        run.assert_code(0);
        let after = fx.tree();
        let diff = tree_diff(&before, &after);
        assert!(diff.is_empty(), "{v:?}: dry run wrote:\n{diff}\n{run}");
        assert!(!fx.path(STATUS).exists());
        assert!(
            run.stdout.contains("--- a/etc/containerd/config.toml")
                && run.stdout.contains("+++ b/etc/containerd/config.toml"),
            "{v:?}: unified diff naming /etc/containerd/config.toml expected:\n{run}"
        );
        assert!(
            run.stdout
                .lines()
                .any(|l| l.starts_with('+') && l.contains("soci")),
            "{v:?}: the diff should add soci:\n{run}"
        );
        assert!(
            run.stdout.lines().any(|l| l.starts_with("@@")),
            "{v:?}: hunks expected:\n{run}"
        );
    }
}
