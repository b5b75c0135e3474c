//! soci-node's own settings (`/etc/soci-node/config.toml`).
//!
//! Parsed once, strictly: an unknown key is an error naming the key, line and
//! column, because a typo in a boot-path setting must not silently do nothing.
//! A missing file means the defaults, which are what most nodes want.

use crate::hostpath::known;
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error(
        "cannot read {path}: {source}; fix the file's permissions or remove it to use the defaults"
    )]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}\nremedy: fix or remove that key (see `man soci-node` or packaging/config.toml for every setting)")]
    Parse { path: String, message: String },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// Fall back to overlayfs and exit 0: the node must boot.
    #[default]
    Fallback,
    /// Exit non-zero after falling back, for image builds and canaries that
    /// must notice.
    Fail,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PullModeSetting {
    /// Parallel pull on enough instance-store disk with SOCI >= 0.11, lazy
    /// loading otherwise.
    #[default]
    Auto,
    Parallel,
    Lazy,
    /// Leave containerd on its own snapshotter.
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CredentialSetting {
    /// docker config (credential helpers such as ecr-login): adds no new
    /// failure mode to kubelet's image path.
    #[default]
    Auto,
    Docker,
    Cri,
    Kubeconfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub enabled: bool,
    pub on_failure: OnFailure,
    pub pull_mode: PullModeSetting,
    pub credentials: Credentials,
    pub storage: Storage,
    pub binaries: Binaries,
    pub imds: Imds,
    pub containerd: Containerd,
    pub soci: Soci,
    pub prime: Prime,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Credentials {
    pub mode: CredentialSetting,
    pub kubeconfig_path: String,
    pub kubelet_config_dir: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Storage {
    /// sysfs `device/model` of instance-store NVMe disks.
    pub instance_store_model: String,
    /// Below this many GiB free on SOCI's root, SOCI is not activated.
    pub min_free_gib: f64,
    /// Parallel pull needs at least this many GiB free on its disk.
    pub parallel_min_free_gib: f64,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Binaries {
    pub containerd: String,
    /// containerd's CLI, used by `prime` (it matches the server's version).
    pub ctr: String,
    pub soci_snapshotter_grpc: String,
    pub soci: String,
    pub nodeadm: String,
    /// Upper bound for `--version` and `config dump` runs.
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Imds {
    pub enabled: bool,
    pub endpoint: String,
    pub connect_timeout_ms: u64,
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Containerd {
    pub config: String,
    /// containerd's gRPC socket (for `prime`).
    pub address: String,
    pub root: String,
    /// Validate every patched config with `containerd config dump` before
    /// it replaces the old one.
    pub validate: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Soci {
    pub config: String,
    pub root: String,
    pub address: String,
    /// Also lazily load images indexed with SOCI v1 indexes (off by default
    /// upstream since v0.10, which makes such nodes silently pull in full).
    pub enable_v1_indexes: bool,
    /// Extra tables and keys merged into the generated SOCI config last, for
    /// settings soci-node does not model (they win over generated ones).
    pub extra: toml::Table,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Prime {
    /// Image archive of the sandbox image, imported instead of pulling when
    /// it exists (EKS AMIs ship the pause image there).
    pub sandbox_tarball: String,
    /// Bound on the whole of `prime`; containerd's ExecStartPost waits for it.
    pub timeout_ms: u64,
    /// Tries for an import or pull that fails.
    pub attempts: u32,
    /// Pull the sandbox image over plain HTTP (local test registries only).
    pub plain_http: bool,
}

impl Default for Prime {
    fn default() -> Self {
        Prime {
            sandbox_tarball: known::EKS_PAUSE_TAR.into(),
            timeout_ms: 120_000,
            attempts: 3,
            plain_http: false,
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            enabled: true,
            on_failure: OnFailure::default(),
            pull_mode: PullModeSetting::default(),
            credentials: Credentials::default(),
            storage: Storage::default(),
            binaries: Binaries::default(),
            imds: Imds::default(),
            containerd: Containerd::default(),
            soci: Soci::default(),
            prime: Prime::default(),
        }
    }
}

impl Default for Credentials {
    fn default() -> Self {
        Credentials {
            mode: CredentialSetting::default(),
            kubeconfig_path: known::KUBECONFIG.into(),
            kubelet_config_dir: known::KUBELET_DROPIN_DIR.into(),
        }
    }
}

impl Default for Storage {
    fn default() -> Self {
        Storage {
            instance_store_model: "Amazon EC2 NVMe Instance Storage".into(),
            min_free_gib: 5.0,
            parallel_min_free_gib: 50.0,
        }
    }
}

impl Default for Binaries {
    fn default() -> Self {
        Binaries {
            containerd: known::CONTAINERD_BIN.into(),
            ctr: known::CTR_BIN.into(),
            soci_snapshotter_grpc: known::SOCI_GRPC_BIN.into(),
            soci: known::SOCI_BIN.into(),
            nodeadm: known::NODEADM_BIN.into(),
            timeout_ms: 3000,
        }
    }
}

impl Default for Imds {
    fn default() -> Self {
        Imds {
            enabled: true,
            endpoint: "http://169.254.169.254".into(),
            connect_timeout_ms: 150,
            timeout_ms: 400,
        }
    }
}

impl Default for Containerd {
    fn default() -> Self {
        Containerd {
            config: known::CONTAINERD_CONFIG.into(),
            address: known::CONTAINERD_SOCKET.into(),
            root: known::CONTAINERD_ROOT.into(),
            validate: true,
        }
    }
}

impl Default for Soci {
    fn default() -> Self {
        Soci {
            config: known::SOCI_CONFIG.into(),
            root: known::SOCI_ROOT.into(),
            address: known::SOCI_ADDRESS.into(),
            enable_v1_indexes: true,
            extra: toml::Table::new(),
        }
    }
}

impl Settings {
    /// Parse settings text; `path` is only used in messages.
    pub fn parse(text: &str, path: &str) -> Result<Settings, SettingsError> {
        let s: Settings = toml::from_str(text).map_err(|e| SettingsError::Parse {
            path: path.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        s.validate(path)?;
        Ok(s)
    }

    /// Load from a real path; a missing file means defaults.
    pub fn load(real_path: &Path, shown_path: &str) -> Result<Settings, SettingsError> {
        match std::fs::read_to_string(real_path) {
            Ok(text) => Settings::parse(&text, shown_path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Settings::default()),
            Err(e) => Err(SettingsError::Read {
                path: shown_path.to_string(),
                source: e,
            }),
        }
    }

    fn validate(&self, path: &str) -> Result<(), SettingsError> {
        let bad = |message: String| {
            Err(SettingsError::Invalid {
                path: path.to_string(),
                message,
            })
        };
        for (key, value) in [
            ("binaries.containerd", &self.binaries.containerd),
            ("binaries.ctr", &self.binaries.ctr),
            ("containerd.address", &self.containerd.address),
            ("prime.sandbox_tarball", &self.prime.sandbox_tarball),
            (
                "binaries.soci_snapshotter_grpc",
                &self.binaries.soci_snapshotter_grpc,
            ),
            ("binaries.soci", &self.binaries.soci),
            ("binaries.nodeadm", &self.binaries.nodeadm),
            ("containerd.config", &self.containerd.config),
            ("containerd.root", &self.containerd.root),
            ("soci.config", &self.soci.config),
            ("soci.root", &self.soci.root),
            ("soci.address", &self.soci.address),
            (
                "credentials.kubelet_config_dir",
                &self.credentials.kubelet_config_dir,
            ),
            (
                "credentials.kubeconfig_path",
                &self.credentials.kubeconfig_path,
            ),
        ] {
            if !value.starts_with('/') {
                return bad(format!("`{key}` must be an absolute path, got {value:?}"));
            }
        }
        if !(self.storage.min_free_gib >= 0.0 && self.storage.parallel_min_free_gib >= 0.0) {
            return bad(
                "`storage.min_free_gib` and `storage.parallel_min_free_gib` must be >= 0".into(),
            );
        }
        if self.imds.timeout_ms == 0 || self.imds.timeout_ms > 5000 {
            return bad(format!(
                "`imds.timeout_ms` = {} is outside 1..=5000; IMDS sits on the boot path, keep it well under a second",
                self.imds.timeout_ms
            ));
        }
        if self.prime.attempts == 0 || self.prime.timeout_ms == 0 {
            return bad("`prime.attempts` and `prime.timeout_ms` must be > 0".into());
        }
        if self.binaries.timeout_ms == 0 {
            return bad("`binaries.timeout_ms` must be > 0".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_defaults() {
        assert_eq!(Settings::parse("", "/x").unwrap(), Settings::default());
    }

    #[test]
    fn shipped_example_parses_to_defaults() {
        // The commented example must stay in step with the real defaults:
        // uncommenting every setting (`#key`, `#[table]`; prose is `# text`)
        // gives the same settings as no file.
        let example = include_str!("../packaging/config.toml");
        let uncommented: String = example
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest) if rest.starts_with(|c: char| c.is_ascii_lowercase() || c == '[') => {
                    rest
                }
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n");
        assert!(uncommented.contains("[imds]"), "example lost its settings");
        assert_eq!(
            Settings::parse(&uncommented, "example").unwrap(),
            Settings::default()
        );
        assert_eq!(
            Settings::parse(example, "example").unwrap(),
            Settings::default()
        );
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let err = Settings::parse(
            "enabled = true\n[imds]\ntimout_ms = 3\n",
            "/etc/soci-node/config.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("/etc/soci-node/config.toml"), "{err}");
        assert!(err.contains("timout_ms"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn wrong_enum_value_is_rejected() {
        let err = Settings::parse("pull_mode = \"fast\"\n", "/c")
            .unwrap_err()
            .to_string();
        assert!(err.contains("fast") && err.contains("line 1"), "{err}");
    }

    #[test]
    fn relative_paths_and_huge_timeouts_are_rejected() {
        assert!(Settings::parse("[soci]\nroot = \"var/lib\"\n", "/c").is_err());
        assert!(Settings::parse("[imds]\ntimeout_ms = 60000\n", "/c").is_err());
    }

    #[test]
    fn values_are_read() {
        let s = Settings::parse(
            "on_failure = \"fail\"\npull_mode = \"lazy\"\n[credentials]\nmode = \"cri\"\n[soci.extra.fuse]\nattr_timeout = 5\n",
            "/c",
        )
        .unwrap();
        assert_eq!(s.on_failure, OnFailure::Fail);
        assert_eq!(s.pull_mode, PullModeSetting::Lazy);
        assert_eq!(s.credentials.mode, CredentialSetting::Cri);
        assert_eq!(s.soci.extra["fuse"]["attr_timeout"].as_integer(), Some(5));
    }
}
