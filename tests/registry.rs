//! `registry::soci_index` against the real docker-registry (distribution
//! 2.8) on 127.0.0.1, with an index made and pushed by the real `soci` 0.4.1
//! CLI.
//!
//! What this proves about these versions: registry 2.8 has no referrers API
//! (`GET /v2/<repo>/referrers/<digest>` answers 404), and `soci push` 0.4.1
//! (oras-go 2.2.1) pushes the SOCI index as an OCI image manifest whose
//! `subject` is the image manifest and, since the registry does not
//! acknowledge the subject (no `OCI-Subject` header), also writes the
//! referrers tag `sha256-<hex>`: an OCI image index listing the SOCI index
//! with `artifactType: application/vnd.amazon.soci.index.v1+json`. So the tag
//! fallback path is the one exercised here, for real; the referrers API path
//! is covered by the unit tests' fake registry.
//!
//! `soci` 0.4.1 keeps its artifacts under the hard-wired
//! /var/lib/soci-snapshotter-grpc (no flag moves it); the CLI runs in a
//! private mount namespace (`unshare -m`) with a test directory bound over
//! that path, so nothing of this test lands on the machine's own copy. It
//! needs only containerd (the image must be in containerd's content store),
//! not the snapshotter daemon.

mod support;

use soci_node::registry::{soci_index, RegistryOptions, Via, SOCI_INDEX_V1};
use std::process::Command;
use std::time::Duration;
use support::*;

const SOCI_ROOT: &str = "/var/lib/soci-snapshotter-grpc";

fn opts() -> RegistryOptions {
    RegistryOptions {
        plain_http: true,
        ..Default::default()
    }
}

/// Deterministic incompressible-ish text, so the gzip layer has real spans.
fn noise(len: usize, seed: u64) -> String {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    let mut s = String::with_capacity(len);
    while s.len() < len {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        s.push_str(&format!("{:016x}", x));
    }
    s
}

/// Build a one-layer image and push it with gzip layers (SOCI indexes gzip
/// layers only); returns the reference.
fn push_gzip_image(fx: &Fixture, registry: &Registry, repo: &str, seed: u64) -> String {
    let data = noise(256 * 1024, seed);
    let img = build_image(
        &fx.dir.join(format!("img-{repo}")),
        "v1",
        &[&[("data.txt", data.as_str()), ("etc/hostname", "soci\n")]],
    );
    let reference = format!("{}/{repo}:v1", registry.addr);
    let run = run_cmd(
        Command::new(require_tool("skopeo"))
            .args([
                "--insecure-policy",
                "copy",
                "--dest-tls-verify=false",
                "--dest-compress",
                "--dest-compress-format",
                "gzip",
            ])
            .arg(format!("oci:{}:{}", img.layout.display(), img.tag))
            .arg(format!("docker://{reference}")),
        Duration::from_secs(60),
    );
    assert!(run.ok(), "skopeo push failed: {run}");
    reference
}

/// `soci <args>` against the fixture's containerd, in a private mount
/// namespace where `dir` is SOCI's root.
fn soci_cli(fx: &Fixture, dir: &std::path::Path, args: &[&str]) -> Run {
    std::fs::create_dir_all(dir).unwrap();
    // The mount point must exist; on a machine without SOCI installed this
    // creates the (empty) directory, which is what the package ships anyway.
    std::fs::create_dir_all(SOCI_ROOT).unwrap();
    let script = "mount --bind \"$1\" \"$2\" || exit 97; shift 2; exec \"$@\"";
    run_cmd(
        Command::new(require_tool("unshare"))
            .args(["-m", "--propagation", "private", "sh", "-c", script, "sh"])
            .arg(dir)
            .arg(SOCI_ROOT)
            .arg(soci_cli_bin())
            .arg("--address")
            .arg(&fx.ctd_sock)
            .args(["--namespace", "k8s.io"])
            .args(args),
        Duration::from_secs(120),
    )
}

#[test]
fn plain_image_has_no_index_and_soci_pushed_index_is_found_through_the_tag() {
    let fx = Fixture::new(Ctd::V21);
    let registry = Registry::start(&fx.dir.join("registry"));

    // A plain image: no SOCI index.
    let plain = push_gzip_image(&fx, &registry, "plain", 1);
    let r = soci_index(&plain, &opts()).unwrap();
    eprintln!("plain: {}", r.message);
    assert!(!r.lazy, "{r:?}");
    assert!(r.indexes.is_empty());
    assert_eq!(
        r.referrers_api,
        Some(false),
        "registry 2.8 has no referrers API"
    );
    assert!(r.message.starts_with("no SOCI index"), "{}", r.message);
    assert!(r.message.ends_with("full pull"), "{}", r.message);

    // An image indexed by the real soci CLI.
    let indexed = push_gzip_image(&fx, &registry, "indexed", 2);
    let (_ctd, _) = fx.start_containerd();
    let pull = fx.ctr(&["-n", "k8s.io", "images", "pull", "--plain-http", &indexed]);
    assert!(pull.ok(), "{pull}");
    let soci_dir = fx.dir.join("soci-cli");
    // Layers under 10 MiB get no zTOC by default; index this small one.
    let create = soci_cli(
        &fx,
        &soci_dir,
        &["create", "--min-layer-size", "0", &indexed],
    );
    assert!(create.ok(), "soci create failed: {create}");
    assert!(create.stdout.contains("-> ztoc sha256:"), "{create}");
    let push = soci_cli(&fx, &soci_dir, &["push", "--plain-http", &indexed]);
    assert!(push.ok(), "soci push failed: {push}");
    eprintln!("soci push:\n{}", push.stdout.trim());
    let pushed = push
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("pushing soci index with digest: "))
        .unwrap_or_else(|| panic!("no index digest in: {push}"))
        .trim()
        .to_string();

    let r = soci_index(&indexed, &opts()).unwrap();
    eprintln!("indexed: {}", r.message);
    assert!(r.lazy, "{r:?}");
    assert_eq!(r.referrers_api, Some(false));
    assert_eq!(r.indexes.len(), 1, "{r:?}");
    assert_eq!(r.indexes[0].via, Via::Tag);
    assert_eq!(r.indexes[0].artifact_type, SOCI_INDEX_V1);
    assert_eq!(r.indexes[0].digest, pushed, "the index soci pushed");
    assert!(r.message.starts_with("SOCI index found"), "{}", r.message);
    assert!(r.message.ends_with("pull will be lazy"), "{}", r.message);

    // What the registry holds, read raw: the fallback tag is an image index
    // listing the SOCI index with its artifact type.
    let tag = r.digest.replacen(':', "-", 1);
    let raw = run_cmd(
        Command::new(require_tool("curl"))
            .args(["-sSf", "-H"])
            .arg("Accept: application/vnd.oci.image.index.v1+json")
            .arg(format!(
                "http://{}/v2/indexed/manifests/{tag}",
                registry.addr
            )),
        Duration::from_secs(20),
    );
    assert!(raw.ok(), "{raw}");
    let list: serde_json::Value = serde_json::from_str(&raw.stdout).unwrap();
    eprintln!("{tag}: {}", raw.stdout.trim());
    assert_eq!(list["mediaType"], "application/vnd.oci.image.index.v1+json");
    assert_eq!(list["manifests"][0]["digest"], pushed.as_str());
    assert_eq!(list["manifests"][0]["artifactType"], SOCI_INDEX_V1);
    let (code, _) = http_request(
        &registry.addr,
        "GET",
        &format!("/v2/indexed/referrers/{}", r.digest),
    )
    .unwrap();
    assert_eq!(code, 404, "registry 2.8 grew a referrers API?");

    // The same image named by digest.
    let by_digest = format!("{}/indexed@{}", registry.addr, r.digest);
    let r2 = soci_index(&by_digest, &opts()).unwrap();
    assert!(r2.lazy && r2.digest == r.digest, "{r2:?}");
    // And the plain image is still plain.
    assert!(!soci_index(&plain, &opts()).unwrap().lazy);
}
