//! `/run/soci-node/status.json`: what the last preflight decided, and why.
//!
//! Written at the end of every preflight (fallback included) so `status`,
//! `doctor` and an operator reading the file see the same story.

use crate::decide::{Reason, State};
use crate::fsio;
use crate::hostpath::{known, Host};
use crate::soci::Mode;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileAction {
    Unchanged,
    Created,
    Updated,
    Removed,
    /// Would change, but the run was a dry run or fell back before writing.
    Skipped,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileRecord {
    pub path: String,
    pub action: FileAction,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    pub step: String,
    pub ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub schema: u32,
    pub soci_node_version: String,
    /// Seconds since the epoch when preflight started.
    pub started_at: u64,
    pub state: StateOut,
    pub mode: Option<ModeOut>,
    pub credentials: Option<String>,
    pub reasons: Vec<ReasonOut>,
    pub notes: Vec<ReasonOut>,
    pub versions: Versions,
    pub files: Vec<FileRecord>,
    pub timings: Vec<Timing>,
    pub total_ms: u64,
    /// Everything preflight found, for diagnosis.
    pub facts: serde_json::Value,
}

// Mirror types so the file can be read back without the decision types
// needing Deserialize (and so the file format is spelled out in one place).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StateOut {
    Active,
    Fallback,
    Disabled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModeOut {
    Lazy,
    Parallel,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReasonOut {
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Versions {
    pub containerd: Option<String>,
    pub soci_snapshotter_grpc: Option<String>,
    pub soci: Option<String>,
}

impl From<State> for StateOut {
    fn from(s: State) -> Self {
        match s {
            State::Active => StateOut::Active,
            State::Fallback => StateOut::Fallback,
            State::Disabled => StateOut::Disabled,
        }
    }
}

impl From<Mode> for ModeOut {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Lazy => ModeOut::Lazy,
            Mode::Parallel => ModeOut::Parallel,
        }
    }
}

impl From<&Reason> for ReasonOut {
    fn from(r: &Reason) -> Self {
        ReasonOut {
            code: r.code.clone(),
            message: r.message.clone(),
        }
    }
}

impl StateOut {
    pub fn as_str(&self) -> &'static str {
        match self {
            StateOut::Active => "active",
            StateOut::Fallback => "fallback",
            StateOut::Disabled => "disabled",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("{path} does not exist: preflight has not run since boot (it runs before containerd: `systemctl status soci-node-preflight`)")]
    Missing { path: String },
    #[error("{path}: {message}; run `soci-node preflight` to write it again")]
    Bad { path: String, message: String },
    #[error(transparent)]
    Fs(#[from] fsio::FsError),
}

pub fn write(host: &Host, status: &Status) -> Result<(), StatusError> {
    let mut text = serde_json::to_string_pretty(status).map_err(|e| StatusError::Bad {
        path: known::STATUS.into(),
        message: e.to_string(),
    })?;
    text.push('\n');
    fsio::write_atomic(&host.path(known::STATUS), text.as_bytes(), 0o644)?;
    Ok(())
}

pub fn read(host: &Host) -> Result<Status, StatusError> {
    let path = host.path(known::STATUS);
    let text = fsio::read_optional(&path)?.ok_or_else(|| StatusError::Missing {
        path: known::STATUS.into(),
    })?;
    serde_json::from_str(&text).map_err(|e| StatusError::Bad {
        path: known::STATUS.into(),
        message: e.to_string(),
    })
}

/// The plain-text view (`soci-node status`, preflight's summary, SSM output).
pub fn render(s: &Status) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let mode = s
        .mode
        .map(|m| match m {
            ModeOut::Lazy => " (lazy loading)",
            ModeOut::Parallel => " (parallel pull)",
        })
        .unwrap_or("");
    let _ = writeln!(o, "state:       {}{mode}", s.state.as_str());
    if let Some(c) = &s.credentials {
        let _ = writeln!(o, "credentials: {c}");
    }
    let v = |x: &Option<String>| x.clone().unwrap_or_else(|| "unknown".into());
    let _ = writeln!(
        o,
        "versions:    containerd {}, soci-snapshotter-grpc {}, soci {}",
        v(&s.versions.containerd),
        v(&s.versions.soci_snapshotter_grpc),
        v(&s.versions.soci)
    );
    let f = &s.facts;
    let gib = |v: &serde_json::Value| {
        v.as_u64()
            .map(|b| format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64))
    };
    if f.get("cpus").is_some() {
        let node = [
            f["imds"]["instance_type"].as_str().map(str::to_string),
            f["imds"]["region"].as_str().map(str::to_string),
            f["cpus"].as_u64().map(|c| format!("{c} CPUs")),
            gib(&f["memory_bytes"]),
        ];
        let node: Vec<String> = node.into_iter().flatten().collect();
        if !node.is_empty() {
            let _ = writeln!(o, "node:        {}", node.join(", "));
        }
    }
    for key in ["soci_root", "containerd_root"] {
        let p = &f["storage"][key];
        if let Some(path) = p["host_path"].as_str() {
            let on = p["backing"]
                .as_str()
                .or(p["source"].as_str())
                .unwrap_or("unknown device");
            let store = if p["on_instance_store"].as_bool() == Some(true) {
                ", instance store"
            } else {
                ""
            };
            let free = gib(&p["free_bytes"])
                .map(|g| format!(", {g} free"))
                .unwrap_or_default();
            let _ = writeln!(o, "disk:        {path} on {on}{store}{free}");
        }
    }
    for r in &s.reasons {
        let _ = writeln!(o, "reason:      [{}] {}", r.code, r.message);
    }
    for r in &s.notes {
        let _ = writeln!(o, "note:        [{}] {}", r.code, r.message);
    }
    for f in &s.files {
        let a = match f.action {
            FileAction::Unchanged => "unchanged",
            FileAction::Created => "created",
            FileAction::Updated => "updated",
            FileAction::Removed => "removed",
            FileAction::Skipped => "not written",
        };
        let _ = writeln!(o, "file:        {a:<11} {}", f.path);
    }
    let steps: Vec<String> = s
        .timings
        .iter()
        .map(|t| format!("{} {}ms", t.step, t.ms))
        .collect();
    let _ = writeln!(o, "took:        {} ms ({})", s.total_ms, steps.join(", "));
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Status {
        Status {
            schema: 1,
            soci_node_version: "0.1.0".into(),
            started_at: 1,
            state: StateOut::Fallback,
            mode: None,
            credentials: None,
            reasons: vec![ReasonOut {
                code: "no-fuse".into(),
                message: "/dev/fuse is missing".into(),
            }],
            notes: vec![],
            versions: Versions::default(),
            files: vec![FileRecord {
                path: "/etc/containerd/config.toml".into(),
                action: FileAction::Unchanged,
            }],
            timings: vec![Timing {
                step: "facts".into(),
                ms: 3,
            }],
            total_ms: 5,
            facts: serde_json::json!({"fuse": false}),
        }
    }

    #[test]
    fn round_trip_and_render() {
        let d = tempfile::tempdir().unwrap();
        let host = Host::new(d.path());
        assert!(matches!(read(&host), Err(StatusError::Missing { .. })));
        write(&host, &sample()).unwrap();
        assert_eq!(read(&host).unwrap(), sample());
        let text = render(&sample());
        assert!(text.contains("state:       fallback"), "{text}");
        assert!(text.contains("[no-fuse] /dev/fuse is missing"), "{text}");
        std::fs::write(host.path(known::STATUS), "{").unwrap();
        assert!(read(&host).unwrap_err().to_string().contains("status.json"));
    }
}
