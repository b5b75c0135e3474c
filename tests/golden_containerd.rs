//! Golden tests for `soci_node::containerd` against the real containerd
//! binaries (1.6, 1.7, 2.1) installed by `scripts/test-deps.sh`.
//!
//! - Each containerd's own `config default`, generated here, is patched
//!   (twice: byte-identical) and the patched file is read back by that same
//!   containerd's `config dump`.
//! - Fixture configs under tests/fixtures/containerd/ are patched and compared
//!   byte for byte with `<name>.expected.toml` (`UPDATE_GOLDEN=1` rewrites
//!   them), then validated with `config dump` of the matching containerd
//!   versions (v2 fixtures: 1.7 and 1.6; v3 fixtures: 2.1).
//!
//! In every dump, what soci-node set is checked key by key, and everything
//! else is checked to be exactly what containerd read before the patch.

use std::path::{Path, PathBuf};
use std::time::Duration;

use soci_node::containerd::{
    self, dump_problems, inspect, patch, patch_target, patch_with_schema, PatchOptions, Schema,
};

const ADDR: &str = "/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock";
const ROOT: &str = "/var/lib/soci-snapshotter-grpc";
const PLATFORM: &str = "linux/amd64";
const TIMEOUT: Duration = Duration::from_secs(60);

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixtures() -> PathBuf {
    manifest_dir().join("tests/fixtures/containerd")
}

/// `<deps>/containerd-<version>/usr/bin/containerd`; the test fails (never
/// skips) when it is missing.
fn containerd_bin(version: &str) -> PathBuf {
    let deps = std::env::var_os("SOCI_NODE_DEPS")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir().join(".deps"));
    let bin = deps.join(format!("containerd-{version}/usr/bin/containerd"));
    assert!(
        bin.is_file(),
        "containerd {version} not found at {}: run scripts/test-deps.sh (it installs containerd 1.6, 1.7 and 2.1 into .deps/), or point SOCI_NODE_DEPS at a directory that has containerd-{version}/usr/bin/containerd",
        bin.display()
    );
    bin
}

fn opts(transfer: bool) -> PatchOptions {
    PatchOptions {
        address: ADDR.to_string(),
        root: ROOT.to_string(),
        transfer_platform: transfer.then(|| PLATFORM.to_string()),
    }
}

fn dump(version: &str, config: &Path) -> (String, toml::Table) {
    let text = containerd::config_dump(&containerd_bin(version), config, TIMEOUT)
        .unwrap_or_else(|e| panic!("containerd {version} config dump {}: {e}", config.display()));
    let table: toml::Table = text
        .parse()
        .unwrap_or_else(|e| panic!("containerd {version} dump is not TOML: {e}\n{text}"));
    (text, table)
}

fn get<'a>(t: &'a toml::Table, path: &[&str]) -> Option<&'a toml::Value> {
    let (first, rest) = path.split_first()?;
    let v = t.get(*first)?;
    if rest.is_empty() {
        Some(v)
    } else {
        get(v.as_table()?, rest)
    }
}

fn remove(t: &mut toml::Table, path: &[&str]) {
    match path {
        [] => {}
        [last] => {
            t.remove(*last);
        }
        [first, rest @ ..] => {
            if let Some(toml::Value::Table(sub)) = t.get_mut(*first) {
                remove(sub, rest);
            }
        }
    }
}

fn dump_schema(t: &toml::Table) -> Schema {
    match t.get("version").and_then(toml::Value::as_integer) {
        Some(2) => Schema::V2,
        Some(3) => Schema::V3,
        other => panic!("dump version {other:?}"),
    }
}

fn str_at<'a>(t: &'a toml::Table, path: &[&str]) -> Option<&'a str> {
    get(t, path).and_then(toml::Value::as_str)
}

/// The keys soci-node sets, read from a patched config's dump; and the rest
/// of the dump equal to the dump of the original.
fn assert_dump(
    version: &str,
    before: &toml::Table,
    after_text: &str,
    after: &toml::Table,
    o: &PatchOptions,
    cri_disabled: bool,
) {
    let schema = dump_schema(after);
    let cri = schema.snapshotter_table();
    let key = |k: &'static str| -> Vec<&'static str> {
        let mut p = cri.to_vec();
        p.push(k);
        p
    };
    let ctx = format!("containerd {version} dump:\n{after_text}");
    if cri_disabled {
        // A disabled plugin's config is not in the dump at all.
        assert_eq!(get(after, schema.cri_table().as_slice()), None, "{ctx}");
        assert_eq!(get(before, schema.cri_table().as_slice()), None, "{ctx}");
    } else {
        assert_cri(after, schema, &ctx);
    }
    assert_eq!(
        str_at(after, &["proxy_plugins", "soci", "type"]),
        Some("snapshot"),
        "{ctx}"
    );
    assert_eq!(
        str_at(after, &["proxy_plugins", "soci", "address"]),
        Some(ADDR),
        "{ctx}"
    );
    if version == "1.6" {
        // containerd 1.6 has no proxy plugin exports (GC and disk accounting
        // through exports.root need >= 1.7.16): it drops the table.
        assert_eq!(
            get(after, &["proxy_plugins", "soci", "exports"]),
            None,
            "{ctx}"
        );
    } else {
        assert_eq!(
            str_at(after, &["proxy_plugins", "soci", "exports", "root"]),
            Some(ROOT),
            "{ctx}"
        );
    }
    if let Some(platform) = &o.transfer_platform {
        assert_eq!(
            str_at(
                after,
                &[
                    "proxy_plugins",
                    "soci",
                    "exports",
                    "enable_remote_snapshot_annotations"
                ]
            ),
            Some("true"),
            "{ctx}"
        );
        let entries = get(after, &["plugins", containerd::TRANSFER, "unpack_config"])
            .and_then(toml::Value::as_array)
            .unwrap_or_else(|| panic!("no unpack_config in {ctx}"));
        assert!(
            entries.iter().any(|e| {
                e.get("platform").and_then(toml::Value::as_str) == Some(platform)
                    && e.get("snapshotter").and_then(toml::Value::as_str) == Some("soci")
            }),
            "{ctx}"
        );
    }
    if !cri_disabled {
        assert_eq!(dump_problems(after_text, o), Vec::<String>::new(), "{ctx}");
        // The sandbox image is never touched.
        assert!(str_at(after, schema.sandbox_key()).is_some(), "{ctx}");
    }
    assert_eq!(
        str_at(after, schema.sandbox_key()),
        str_at(before, schema.sandbox_key()),
        "sandbox image changed; {ctx}"
    );

    // Nothing else moved: the dumps agree once the keys soci-node owns are
    // taken out of both.
    let mut b = before.clone();
    let mut a = after.clone();
    for t in [&mut a, &mut b] {
        for k in [
            "snapshotter",
            "disable_snapshot_annotations",
            "discard_unpacked_layers",
        ] {
            remove(t, &key(k));
        }
        remove(t, &["proxy_plugins", "soci"]);
        if get(t, &["proxy_plugins"])
            .and_then(toml::Value::as_table)
            .is_some_and(|p| p.is_empty())
        {
            t.remove("proxy_plugins");
        }
        if o.transfer_platform.is_some() {
            remove(t, &["plugins", containerd::TRANSFER, "unpack_config"]);
        }
    }
    // 1.x lists the files it read, by path.
    a.remove("imports");
    b.remove("imports");
    let moved = differences(&b, &a, "");
    assert!(
        moved.is_empty(),
        "patch changed more than its keys: {moved:#?}\n{ctx}"
    );
}

/// The CRI keys soci-node sets, as containerd reads them.
fn assert_cri(dump: &toml::Table, schema: Schema, ctx: &str) {
    let key = |k: &'static str| -> Vec<&'static str> {
        let mut p = schema.snapshotter_table().to_vec();
        p.push(k);
        p
    };
    assert_eq!(str_at(dump, &key("snapshotter")), Some("soci"), "{ctx}");
    for k in ["disable_snapshot_annotations", "discard_unpacked_layers"] {
        assert_eq!(
            get(dump, &key(k)).and_then(toml::Value::as_bool),
            Some(false),
            "{k}; {ctx}"
        );
    }
}

/// Dotted paths whose values differ between two tables.
fn differences(a: &toml::Table, b: &toml::Table, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    for k in keys {
        let path = format!("{prefix}{k}");
        match (a.get(k), b.get(k)) {
            (Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) => {
                out.extend(differences(x, y, &format!("{path}.")))
            }
            (x, y) if x != y => out.push(format!("{path}: {x:?} -> {y:?}")),
            _ => {}
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Each containerd's own default config

fn default_config(version: &str, want: Schema, transfer: bool) {
    let bin = containerd_bin(version);
    let default = soci_node::run::run(&bin, &["config", "default"], TIMEOUT)
        .unwrap_or_else(|e| panic!("containerd {version} config default: {e}"))
        .stdout;
    let o = opts(transfer);
    let path = "/etc/containerd/config.toml";
    let first = patch(path, &default, &o).unwrap();
    assert_eq!(first.schema, want);
    assert!(first.changed);
    assert_eq!(first.previous_snapshotter.as_deref(), Some("overlayfs"));
    let second = patch(path, &first.text, &o).unwrap();
    assert_eq!(second.text, first.text, "second patch not byte-identical");
    assert!(!second.changed);

    // Only lines that carry soci-node's keys differ from containerd's text.
    let added: Vec<&str> = first
        .text
        .lines()
        .filter(|l| !default.lines().any(|d| d == *l))
        .collect();
    for l in &added {
        let l = l.trim();
        assert!(
            l.is_empty()
                || l.starts_with("snapshotter =")
                || l.starts_with("disable_snapshot_annotations =")
                || l.starts_with("discard_unpacked_layers =")
                || l.starts_with("[proxy_plugins.soci")
                || l.starts_with("type =")
                || l.starts_with("address =")
                || l.starts_with("root =")
                || l.starts_with("enable_remote_snapshot_annotations =")
                || l.starts_with("platform =")
                || l.contains(".unpack_config]]"),
            "unexpected new line {l:?} in:\n{}",
            first.text
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let orig = dir.path().join("default.toml");
    std::fs::write(&orig, &default).unwrap();
    let patched = dir.path().join("config.toml");
    std::fs::write(&patched, &first.text).unwrap();
    let (_, before) = dump(version, &orig);
    let (after_text, after) = dump(version, &patched);
    assert_dump(version, &before, &after_text, &after, &o, false);
}

#[test]
fn default_config_containerd_1_6() {
    default_config("1.6", Schema::V2, false);
}

#[test]
fn default_config_containerd_1_7() {
    default_config("1.7", Schema::V2, false);
}

#[test]
fn default_config_containerd_2_1_with_transfer_service() {
    default_config("2.1", Schema::V3, true);
}

#[test]
fn default_config_containerd_2_1_without_transfer_service() {
    default_config("2.1", Schema::V3, false);
}

// ---------------------------------------------------------------------------
// Fixtures

struct Fixture {
    name: &'static str,
    /// Imported files, relative to the fixtures directory, in merge order.
    imports: &'static [&'static str],
    /// The file patch_target must pick (relative), when not the main file.
    target: Option<&'static str>,
    containerd: &'static [&'static str],
    transfer: bool,
    cri_disabled: bool,
}

const V2: &[&str] = &["1.7", "1.6"];
const V3: &[&str] = &["2.1"];

fn fixture(f: &Fixture) {
    let src = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let copy = |rel: &str| -> (PathBuf, String) {
        let text = std::fs::read_to_string(src.join(rel))
            .unwrap_or_else(|e| panic!("{}: {e}", src.join(rel).display()));
        let dst = dir.path().join(rel);
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::write(&dst, &text).unwrap();
        (dst, text)
    };
    let main_rel = format!("{}.toml", f.name);
    let (main_path, main_text) = copy(&main_rel);
    let imports: Vec<(String, String)> = f
        .imports
        .iter()
        .map(|rel| {
            let (p, t) = copy(rel);
            (p.display().to_string(), t)
        })
        .collect();

    let main_str = main_path.display().to_string();
    let inspection = inspect(&main_str, &main_text).unwrap();
    assert_eq!(inspection.cri_disabled, f.cri_disabled, "{}", f.name);
    assert_eq!(
        inspection.imports.is_empty(),
        f.imports.is_empty(),
        "{}",
        f.name
    );

    let target = patch_target(&main_str, &main_text, &imports).unwrap();
    let want_target = f
        .target
        .map(|rel| dir.path().join(rel).display().to_string())
        .unwrap_or_else(|| main_str.clone());
    assert_eq!(target, want_target, "{}: patch target", f.name);
    let target_text = if target == main_str {
        main_text.clone()
    } else {
        imports
            .iter()
            .find(|(p, _)| *p == target)
            .unwrap()
            .1
            .clone()
    };

    let o = opts(f.transfer);
    let patched = patch_with_schema(&target, &target_text, &o, inspection.schema).unwrap();
    assert!(patched.changed, "{}: nothing changed", f.name);
    let again = patch_with_schema(&target, &patched.text, &o, inspection.schema).unwrap();
    assert_eq!(
        again.text, patched.text,
        "{}: second patch not byte-identical",
        f.name
    );
    assert!(!again.changed, "{}", f.name);

    // Golden file.
    let golden = src.join(format!("{}.expected.toml", f.name));
    if std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1") {
        std::fs::write(&golden, &patched.text).unwrap();
    }
    let expected = std::fs::read_to_string(&golden).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run with UPDATE_GOLDEN=1 to create it, then review it",
            golden.display()
        )
    });
    pretty_assertions::assert_eq!(
        patched.text,
        expected,
        "{}: patched output differs from {} (UPDATE_GOLDEN=1 rewrites it)",
        f.name,
        golden.display()
    );

    // The sandbox image line of the target is left exactly as it was.
    let sandbox_lines = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| {
                let l = l.trim_start();
                l.starts_with("sandbox_image") || l.starts_with("sandbox ")
            })
            .map(String::from)
            .collect()
    };
    assert_eq!(
        sandbox_lines(&patched.text),
        sandbox_lines(&target_text),
        "{}",
        f.name
    );
    // Every comment line and every table header line survives verbatim.
    for l in target_text
        .lines()
        .filter(|l| l.trim_start().starts_with('#') || l.trim_start().starts_with('['))
    {
        assert!(
            patched.text.lines().any(|p| p == l),
            "{}: lost line {l:?}",
            f.name
        );
    }

    // Real containerd: the original, then the patched tree.
    let mut before = Vec::new();
    for v in f.containerd {
        before.push(dump(v, &main_path).1);
    }
    std::fs::write(&target, &patched.text).unwrap();
    for (v, before) in f.containerd.iter().zip(&before) {
        let (after_text, after) = dump(v, &main_path);
        assert_dump(v, before, &after_text, &after, &o, f.cri_disabled);
    }
}

#[test]
fn fixture_al2023_containerd_1_7() {
    fixture(&Fixture {
        name: "al2023-containerd-1.7",
        imports: &[],
        target: None,
        containerd: V2,
        transfer: false,
        cri_disabled: false,
    });
}

#[test]
fn fixture_al2023_containerd_2_x() {
    fixture(&Fixture {
        name: "al2023-containerd-2.x",
        imports: &[],
        target: None,
        containerd: V3,
        transfer: true,
        cri_disabled: false,
    });
}

#[test]
fn fixture_al2023_containerd_2_x_fastimagepull() {
    fixture(&Fixture {
        name: "al2023-containerd-2.x-fastimagepull",
        imports: &[],
        target: None,
        containerd: V3,
        transfer: true,
        cri_disabled: false,
    });
}

#[test]
fn fixture_nodeadm_merged_v3() {
    fixture(&Fixture {
        name: "nodeadm-merged-v3",
        imports: &[],
        target: None,
        containerd: V3,
        transfer: false,
        cri_disabled: false,
    });
}

#[test]
fn fixture_comments_v2() {
    fixture(&Fixture {
        name: "comments-v2",
        imports: &[],
        target: None,
        containerd: V2,
        transfer: false,
        cri_disabled: false,
    });
}

#[test]
fn fixture_imports_v2() {
    fixture(&Fixture {
        name: "imports-v2",
        imports: &["imports-v2.d/10-cri.toml", "imports-v2.d/20-metrics.toml"],
        target: Some("imports-v2.d/10-cri.toml"),
        containerd: V2,
        transfer: false,
        cri_disabled: false,
    });
}

#[test]
fn fixture_imports_v3() {
    fixture(&Fixture {
        name: "imports-v3",
        imports: &["imports-v3.d/50-images.toml"],
        target: Some("imports-v3.d/50-images.toml"),
        containerd: V3,
        transfer: true,
        cri_disabled: false,
    });
}

#[test]
fn fixture_stargz_v2() {
    fixture(&Fixture {
        name: "stargz-v2",
        imports: &[],
        target: None,
        containerd: V2,
        transfer: false,
        cri_disabled: false,
    });
}

#[test]
fn fixture_nydus_v3() {
    fixture(&Fixture {
        name: "nydus-v3",
        imports: &[],
        target: None,
        containerd: V3,
        transfer: true,
        cri_disabled: false,
    });
}

#[test]
fn fixture_disabled_cri_v2() {
    fixture(&Fixture {
        name: "disabled-cri-v2",
        imports: &[],
        target: None,
        containerd: V2,
        transfer: false,
        cri_disabled: true,
    });
}

// ---------------------------------------------------------------------------
// containerd 2.x reading a version 2 file

/// containerd 2.x migrates `snapshotter` & co. out of a version 2 file's
/// `[plugins."io.containerd.grpc.v1.cri".containerd]` only when that table
/// also has `runtimes`: a patched minimal v2 file is silently not used.
/// `dump_problems` on the dump is how soci-node can tell.
#[test]
fn containerd_2_1_reading_v2_files() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(false);

    // The AL2023 containerd 1.7 template has runtimes: the patch survives
    // containerd 2.1's migration.
    let text = std::fs::read_to_string(fixtures().join("al2023-containerd-1.7.toml")).unwrap();
    let p = patch("c.toml", &text, &o).unwrap();
    let f = dir.path().join("al2023.toml");
    std::fs::write(&f, &p.text).unwrap();
    let (dump_text, _) = dump("2.1", &f);
    assert_eq!(
        dump_problems(&dump_text, &o),
        Vec::<String>::new(),
        "{dump_text}"
    );

    // A minimal v2 file: containerd 2.1 drops the CRI keys.
    let p = patch("c.toml", "version = 2\n", &o).unwrap();
    let f = dir.path().join("minimal.toml");
    std::fs::write(&f, &p.text).unwrap();
    let (dump_text, _) = dump("2.1", &f);
    let problems = dump_problems(&dump_text, &o);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("CRI snapshotter") && p.contains("\"overlayfs\"")),
        "{problems:?}"
    );
    // ...while containerd 1.7 reads the same file as intended.
    let (dump_text, _) = dump("1.7", &f);
    assert_eq!(dump_problems(&dump_text, &o), Vec::<String>::new());
}
