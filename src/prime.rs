//! `soci-node prime`: the sandbox image unpacked in the SOCI snapshotter
//! before kubelet starts.
//!
//! Runs as containerd's `ExecStartPost=-` (the `-`: a failure here must not
//! stop containerd). It talks to containerd through `ctr`, not a gRPC crate:
//! `ctr` ships with every containerd, speaks exactly its server's version
//! (import and pull go through the transfer service on 2.x and client-side
//! on 1.x, which ctr already handles), and a Rust containerd client would
//! pull tokio, tonic and prost (~100 crates) into a boot-path binary. Every
//! call is bounded; output is parsed defensively (column by name, JSON by
//! field).
//!
//! "Primed" means the snapshot of the image's top layer (its chain ID)
//! exists in the soci snapshotter, which is what the CRI checks before it
//! creates a sandbox. That test works on containerd 1.6 too, which has no
//! `ctr images usage`.

use crate::containerd;
use crate::hostpath::Host;
use crate::run::{self, RunError};
use crate::settings::Settings;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const NAMESPACE: &str = "k8s.io";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    AlreadyPrimed,
    Imported,
    Pulled,
    /// SOCI is not the CRI snapshotter: nothing to do.
    Skipped,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub image: Option<String>,
    pub action: Action,
    pub attempts: u32,
    pub elapsed_ms: u64,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PrimeError {
    #[error("cannot read containerd's effective config: {0}")]
    Config(String),
    #[error("containerd at {address} did not answer within {waited_ms} ms: {last}; check `systemctl status containerd`")]
    NotReady {
        address: String,
        waited_ms: u64,
        last: String,
    },
    #[error("sandbox image {image} is not in the soci snapshotter after {attempts} attempt(s): {last}; kubelet's first sandbox will fail until it is (check the registry or {tarball})")]
    Failed {
        image: String,
        attempts: u32,
        tarball: String,
        last: String,
    },
    #[error("ran out of time (prime.timeout_ms = {0}) before the sandbox image was ready")]
    Timeout(u64),
}

struct Ctr {
    bin: PathBuf,
    address: String,
    deadline: Instant,
    step: Duration,
}

impl Ctr {
    fn run(&self, args: &[&str]) -> Result<String, RunError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        let mut all = vec!["--address", self.address.as_str(), "--namespace", NAMESPACE];
        all.extend_from_slice(args);
        run::run(
            &self.bin,
            &all,
            left.min(self.step).max(Duration::from_millis(100)),
        )
        .map(|o| o.stdout)
    }
}

pub fn prime(host: &Host, s: &Settings) -> Result<Report, PrimeError> {
    let started = Instant::now();
    let deadline = started + Duration::from_millis(s.prime.timeout_ms);
    let report = |image: Option<String>, action, attempts, message: String| Report {
        image,
        action,
        attempts,
        elapsed_ms: started.elapsed().as_millis() as u64,
        message,
    };

    // The effective config (imports applied) says whether SOCI is the CRI
    // snapshotter and which image is the sandbox.
    let dump = containerd::config_dump(
        &host.path(&s.binaries.containerd),
        &host.path(&s.containerd.config),
        Duration::from_millis(s.binaries.timeout_ms),
    )
    .map_err(|e| PrimeError::Config(e.to_string()))?;
    let inspection = containerd::inspect("containerd config dump", &dump)
        .map_err(|e| PrimeError::Config(e.to_string()))?;
    if inspection.cri_snapshotter.as_deref() != Some(containerd::SOCI) {
        return Ok(report(
            inspection.sandbox_image,
            Action::Skipped,
            0,
            format!(
                "the CRI snapshotter is {}, not soci: nothing to prime",
                inspection
                    .cri_snapshotter
                    .as_deref()
                    .unwrap_or("containerd's default")
            ),
        ));
    }
    let image = inspection
        .sandbox_image
        .ok_or_else(|| PrimeError::Config("no sandbox image in containerd's config".into()))?;

    let ctr = Ctr {
        bin: host.path(&s.binaries.ctr),
        // A runtime path, used as is (like soci.address).
        address: s.containerd.address.clone(),
        deadline,
        step: Duration::from_secs(60),
    };
    wait_ready(&ctr, deadline)?;

    let arch = crate::facts::go_arch(std::env::consts::ARCH);
    if is_primed(&ctr, &image, arch) {
        return Ok(report(
            Some(image),
            Action::AlreadyPrimed,
            0,
            "already in the soci snapshotter".into(),
        ));
    }

    let tarball = host.path(&s.prime.sandbox_tarball);
    let use_tarball = tarball.exists();
    let platform = format!("linux/{arch}");
    let mut last = String::new();
    for attempt in 1..=s.prime.attempts {
        if Instant::now() >= deadline {
            return Err(PrimeError::Timeout(s.prime.timeout_ms));
        }
        let res = if use_tarball {
            let file = tarball.display().to_string();
            ctr.run(&[
                "images",
                "import",
                "--snapshotter",
                containerd::SOCI,
                "--platform",
                &platform,
                &file,
            ])
        } else {
            let args = pull_args(&platform, s.prime.plain_http, &image);
            ctr.run(&args.iter().map(String::as_str).collect::<Vec<_>>())
        };
        match res {
            Ok(_) if is_primed(&ctr, &image, arch) => {
                let (action, how) = if use_tarball {
                    (
                        Action::Imported,
                        format!("imported from {}", s.prime.sandbox_tarball),
                    )
                } else {
                    (Action::Pulled, "pulled".to_string())
                };
                tracing::info!(image = %image, attempt, "sandbox image {how} into the soci snapshotter");
                return Ok(report(Some(image), action, attempt, how));
            }
            Ok(_) => {
                last = if use_tarball {
                    format!(
                        "{} does not contain {image} for {platform}",
                        s.prime.sandbox_tarball
                    )
                } else {
                    format!("pulled, but no {platform} snapshot of {image} in the soci snapshotter")
                }
            }
            Err(e) => last = e.to_string(),
        }
        tracing::warn!(image = %image, attempt, "prime attempt failed: {last}");
        if attempt < s.prime.attempts {
            let pause = Duration::from_secs(1 << (attempt - 1).min(4));
            std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
        }
    }
    Err(PrimeError::Failed {
        image,
        attempts: s.prime.attempts,
        tarball: s.prime.sandbox_tarball.clone(),
        last,
    })
}

fn wait_ready(ctr: &Ctr, deadline: Instant) -> Result<(), PrimeError> {
    let started = Instant::now();
    loop {
        let err = match run::run(
            &ctr.bin,
            &["--address", &ctr.address, "version"],
            Duration::from_secs(5),
        ) {
            Ok(_) => return Ok(()),
            Err(e) => e.to_string(),
        };
        if Instant::now() + Duration::from_millis(100) >= deadline {
            return Err(PrimeError::NotReady {
                address: ctr.address.clone(),
                waited_ms: started.elapsed().as_millis() as u64,
                last: err,
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Is the image's top-layer snapshot in the soci snapshotter?
fn is_primed(ctr: &Ctr, image: &str, arch: &str) -> bool {
    let ls = |img: &str| ctr.run(&["images", "ls", &format!("name=={img}")]).ok();
    let get = |d: &str| serde_json::from_str(&ctr.run(&["content", "get", d]).ok()?).ok();
    let Some(chain) = chain_id_with(&get, image, arch, ls) else {
        return false;
    };
    ctr.run(&[
        "snapshots",
        "--snapshotter",
        containerd::SOCI,
        "info",
        &chain,
    ])
    .is_ok()
}

/// The chain ID of `image`'s top layer for linux/`arch`, from `ctr images
/// ls name==IMAGE` output (`ls`) and content by digest (`get`).
pub fn chain_id_with(
    get: &dyn Fn(&str) -> Option<serde_json::Value>,
    image: &str,
    arch: &str,
    ls: impl Fn(&str) -> Option<String>,
) -> Option<String> {
    let digest = parse_image_digest(&ls(image)?, image)?;
    let mut doc = get(&digest)?;
    if let Some(manifests) = doc.get("manifests").and_then(|m| m.as_array()) {
        let d = pick_platform(manifests, arch)?;
        doc = get(&d)?;
    }
    let config = get(doc["config"]["digest"].as_str()?)?;
    let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
        .as_array()?
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    chain_id(&diff_ids)
}

/// `images pull` into the soci snapshotter for one platform.
pub fn pull_args(platform: &str, plain_http: bool, image: &str) -> Vec<String> {
    let mut a: Vec<String> = [
        "images",
        "pull",
        "--snapshotter",
        containerd::SOCI,
        "--platform",
        platform,
    ]
    .map(String::from)
    .to_vec();
    if plain_http {
        a.push("--plain-http".into());
    }
    a.push(image.into());
    a
}

/// The DIGEST column of `ctr images ls` for `image` (header names the columns).
pub fn parse_image_digest(ls: &str, image: &str) -> Option<String> {
    let mut lines = ls.lines();
    let header: Vec<&str> = lines.next()?.split_whitespace().collect();
    let col = header.iter().position(|h| *h == "DIGEST")?;
    lines
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.first() == Some(&image))
        .and_then(|f| f.get(col).map(|d| d.to_string()))
        .filter(|d| d.starts_with("sha256:"))
}

/// The manifest for linux/<arch> in an image index.
pub fn pick_platform(manifests: &[serde_json::Value], arch: &str) -> Option<String> {
    manifests
        .iter()
        .find(|m| m["platform"]["os"] == "linux" && m["platform"]["architecture"] == arch)
        .and_then(|m| m["digest"].as_str().map(str::to_string))
}

/// OCI chain ID: ChainID(L0) = DiffID(L0); ChainID(L0..n) =
/// sha256(ChainID(L0..n-1) + " " + DiffID(Ln)).
pub fn chain_id(diff_ids: &[String]) -> Option<String> {
    let mut it = diff_ids.iter();
    let mut chain = it.next()?.clone();
    for d in it {
        let h = Sha256::digest(format!("{chain} {d}").as_bytes());
        chain = format!("sha256:{}", hex(&h));
    }
    Some(chain)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids() {
        let a = "sha256:aaaa".to_string();
        let b = "sha256:bbbb".to_string();
        assert_eq!(chain_id(std::slice::from_ref(&a)), Some(a.clone()));
        let want = format!(
            "sha256:{}",
            hex(&Sha256::digest(b"sha256:aaaa sha256:bbbb"))
        );
        assert_eq!(chain_id(&[a, b]), Some(want));
        assert_eq!(chain_id(&[]), None);
    }

    #[test]
    fn image_ls_parsing_by_column_name() {
        let ls = "REF                               TYPE                                                 DIGEST                                                                  SIZE      PLATFORMS   LABELS\n\
localhost/kubernetes/pause:latest application/vnd.docker.distribution.manifest.v2+json sha256:0d3b8f3bb1e3c7c5d9fe3f2f4ae3c2b4b1d0f1e1c6e1a0d3a5b8e8d2c1f0e9a8 299.5 KiB linux/amd64 -\n";
        assert_eq!(
            parse_image_digest(ls, "localhost/kubernetes/pause:latest").as_deref(),
            Some("sha256:0d3b8f3bb1e3c7c5d9fe3f2f4ae3c2b4b1d0f1e1c6e1a0d3a5b8e8d2c1f0e9a8")
        );
        assert_eq!(parse_image_digest(ls, "other:latest"), None);
        assert_eq!(parse_image_digest("", "x"), None);
        assert_eq!(parse_image_digest("REF TYPE\nx y\n", "x"), None);
    }

    #[test]
    fn platform_choice() {
        let m: Vec<serde_json::Value> = serde_json::from_str(
            r#"[{"digest":"sha256:arm","platform":{"os":"linux","architecture":"arm64"}},
                {"digest":"sha256:amd","platform":{"os":"linux","architecture":"amd64"}}]"#,
        )
        .unwrap();
        assert_eq!(pick_platform(&m, "amd64").as_deref(), Some("sha256:amd"));
        assert_eq!(pick_platform(&m, "arm64").as_deref(), Some("sha256:arm"));
        assert_eq!(pick_platform(&m, "s390x"), None);
    }
}
