//! `soci-node preflight`: check, decide, write configs, record status.
//!
//! Runs before containerd at every start. Whatever goes wrong, the result is
//! a containerd config that is valid and a status file that says why; the
//! exit code is 0 unless the operator asked for `on_failure = "fail"`.
//! File order matters: the SOCI config first, containerd's config (the
//! switch) second, kubelet's drop-in last, so a failure part-way never leaves
//! containerd pointing at a snapshotter without its config.

use crate::containerd::{self, PatchOptions};
use crate::decide::{self, Plan, Reason, State};
use crate::facts::{self, Facts, Timings};
use crate::fsio;
use crate::hostpath::{known, Host};
use crate::kubelet;
use crate::run;
use crate::settings::{OnFailure, Settings};
use crate::soci::{self, Credentials};
use crate::status::{self, FileAction, FileRecord, Status, Timing, Versions};
use crate::version::Version;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const LOCK_TIMEOUT: Duration = Duration::from_secs(60);
const STATUS_SCHEMA: u32 = 1;

pub struct Options {
    pub dry_run: bool,
    /// soci-node's settings file: where to read it, and how to name it.
    pub settings_real: PathBuf,
    pub settings_shown: String,
}

pub struct Outcome {
    pub status: Status,
    /// Unified diff of what would change (dry run only).
    pub diff: Option<String>,
    pub exit_code: i32,
}

/// One file soci-node wants in a given state. `new == None` removes it.
#[derive(Debug, Clone)]
struct Change {
    host_path: String,
    old: Option<String>,
    new: Option<String>,
}

impl Change {
    fn is_noop(&self) -> bool {
        self.old == self.new
    }
}

pub fn run(host: &Host, opts: &Options) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let started_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut timings: Timings = Vec::new();

    let _lock = if opts.dry_run {
        None
    } else {
        let t = Instant::now();
        let l = fsio::lock(&host.path(known::LOCK), LOCK_TIMEOUT)?;
        timings.push(("lock".into(), t.elapsed().as_millis() as u64));
        Some(l)
    };

    let t = Instant::now();
    let (settings, settings_error) = match Settings::load(&opts.settings_real, &opts.settings_shown)
    {
        Ok(s) => (s, None),
        // Safe defaults, but no network call: IMDS only informs, and a
        // broken settings file may be on a machine that is not EC2.
        Err(e) => {
            let mut s = Settings::default();
            s.imds.enabled = false;
            (s, Some(e))
        }
    };
    timings.push(("settings".into(), t.elapsed().as_millis() as u64));

    let facts = facts::gather(host, &settings, &mut timings);

    let t = Instant::now();
    let mut plan = decide::decide(&facts, &settings);
    if let Some(e) = &settings_error {
        // Unknown or broken settings: do the safe thing, and say which key.
        plan = plan.fall_back(Reason::new("settings", e.to_string()));
    }
    timings.push(("decide".into(), t.elapsed().as_millis() as u64));

    let t = Instant::now();
    let mut changes = match build_changes(host, &settings, &facts, &plan) {
        Ok(c) => c,
        Err(reason) => {
            plan = plan.fall_back(reason);
            build_changes(host, &settings, &facts, &plan).unwrap_or_default()
        }
    };
    timings.push(("render".into(), t.elapsed().as_millis() as u64));

    if plan.state == State::Active {
        let t = Instant::now();
        if let Err(reason) = validate(host, &settings, &facts, &plan, &changes, opts.dry_run) {
            plan = plan.fall_back(reason);
            changes = build_changes(host, &settings, &facts, &plan).unwrap_or_default();
        }
        timings.push(("validate".into(), t.elapsed().as_millis() as u64));
    }

    let mut diff = None;
    let files;
    if opts.dry_run {
        diff = Some(render_diff(&changes));
        files = changes
            .iter()
            .map(|c| FileRecord {
                path: c.host_path.clone(),
                action: if c.is_noop() {
                    FileAction::Unchanged
                } else {
                    FileAction::Skipped
                },
            })
            .collect();
    } else {
        let t = Instant::now();
        files = match apply(host, &changes) {
            Ok(f) => f,
            Err((done, reason)) => {
                tracing::error!(code = %reason.code, "{}", reason.message);
                plan = plan.fall_back(reason);
                let fallback = build_changes(host, &settings, &facts, &plan).unwrap_or_default();
                let mut files = done;
                match apply(host, &fallback) {
                    Ok(f) => merge_records(&mut files, f),
                    Err((f, r)) => {
                        merge_records(&mut files, f);
                        plan.reasons.push(Reason::new(
                            "fallback-write",
                            format!("could not undo the SOCI settings either: {}", r.message),
                        ));
                    }
                }
                files
            }
        };
        timings.push(("write".into(), t.elapsed().as_millis() as u64));
    }

    let status = Status {
        schema: STATUS_SCHEMA,
        soci_node_version: env!("CARGO_PKG_VERSION").into(),
        started_at,
        state: plan.state.into(),
        mode: plan.mode().map(Into::into),
        credentials: plan
            .soci
            .as_ref()
            .map(|s| credential_name(&s.credentials).to_string()),
        reasons: plan.reasons.iter().map(Into::into).collect(),
        notes: plan.notes.iter().map(Into::into).collect(),
        versions: Versions {
            containerd: facts.containerd.version.map(|v| v.to_string()),
            soci_snapshotter_grpc: facts.soci_snapshotter_grpc.version.map(|v| v.to_string()),
            soci: facts.soci.version.map(|v| v.to_string()),
        },
        files,
        timings: timings
            .into_iter()
            .map(|(step, ms)| Timing { step, ms })
            .collect(),
        total_ms: started.elapsed().as_millis() as u64,
        facts: serde_json::to_value(&facts).unwrap_or_default(),
    };
    log_decision(&plan, &status);
    if !opts.dry_run {
        if let Err(e) = status::write(host, &status) {
            // The decision is already applied; a missing status file is
            // reported but must not turn a good boot into a failed unit.
            tracing::error!(path = known::STATUS, "cannot record status: {e}");
        }
    }
    let exit_code = match (plan.state, settings.on_failure) {
        (State::Fallback, OnFailure::Fail) => 1,
        _ => 0,
    };
    Ok(Outcome {
        status,
        diff,
        exit_code,
    })
}

pub fn credential_name(c: &Credentials) -> &'static str {
    match c {
        Credentials::Docker => "docker",
        Credentials::Cri { .. } => "cri",
        Credentials::Kubeconfig { .. } => "kubeconfig",
    }
}

fn log_decision(plan: &Plan, status: &Status) {
    let reasons: Vec<&str> = plan.reasons.iter().map(|r| r.code.as_str()).collect();
    let notes: Vec<&str> = plan.notes.iter().map(|r| r.code.as_str()).collect();
    let mode = plan
        .mode()
        .map(|m| format!("{m:?}").to_lowercase())
        .unwrap_or_default();
    let summary = plan
        .reasons
        .iter()
        .map(|r| r.message.as_str())
        .collect::<Vec<_>>()
        .join("; ");
    match plan.state {
        State::Active => tracing::info!(
            target: "soci_node::decision",
            state = "active", mode = %mode, notes = ?notes, total_ms = status.total_ms,
            "SOCI snapshotter active ({mode})"
        ),
        State::Fallback => tracing::warn!(
            target: "soci_node::decision",
            state = "fallback", reasons = ?reasons, total_ms = status.total_ms,
            "SOCI not activated, containerd keeps its own snapshotter: {summary}"
        ),
        State::Disabled => tracing::info!(
            target: "soci_node::decision",
            state = "disabled", reasons = ?reasons, total_ms = status.total_ms,
            "soci-node disabled: {summary}"
        ),
    }
}

fn read(host: &Host, host_path: &str) -> Result<Option<String>, Reason> {
    fsio::read_optional(&host.path(host_path)).map_err(|e| Reason::new("read", e.to_string()))
}

/// Every file in the state the plan wants. Active: SOCI config, patched
/// containerd config, kubelet drop-in in CRI mode. Otherwise: containerd
/// config unpatched if an earlier run patched it, our drop-in removed.
fn build_changes(host: &Host, s: &Settings, f: &Facts, plan: &Plan) -> Result<Vec<Change>, Reason> {
    let mut out = Vec::new();
    let active = plan.state == State::Active;

    if let (true, Some(soci_plan)) = (active, &plan.soci) {
        let new = soci::render(soci_plan).map_err(|e| Reason::new("soci-config", e.to_string()))?;
        out.push(Change {
            host_path: s.soci.config.clone(),
            old: read(host, &s.soci.config)?,
            new: Some(new),
        });
    }

    match containerd_change(host, s, f, plan) {
        Ok(Some(c)) => out.push(c),
        Ok(None) => {}
        Err(r) if active => return Err(r),
        // Falling back with a containerd config we cannot read or parse:
        // leave it exactly as it is (containerd will report it too).
        Err(r) => tracing::warn!(code = %r.code, "{}", r.message),
    }

    let dropin = format!(
        "{}/{}",
        s.credentials.kubelet_config_dir.trim_end_matches('/'),
        known::KUBELET_DROPIN_NAME
    );
    let old = read(host, &dropin)?;
    let new =
        (active && plan.kubelet_dropin).then(|| kubelet::image_service_dropin(&s.soci.address));
    if old.is_some() || new.is_some() {
        out.push(Change {
            host_path: dropin,
            old,
            new,
        });
    }
    Ok(out)
}

fn containerd_change(
    host: &Host,
    s: &Settings,
    f: &Facts,
    plan: &Plan,
) -> Result<Option<Change>, Reason> {
    let main = s.containerd.config.as_str();
    let cfg_err = |e: containerd::ContainerdError| Reason::new("containerd-config", e.to_string());
    let main_old = read(host, main)?;
    let active = plan.state == State::Active;
    let main_text = match (&main_old, active) {
        (Some(t), _) => t.clone(),
        (None, false) => return Ok(None),
        // No config: containerd runs on built-in defaults; start from an
        // empty config of the schema this containerd reads.
        (None, true) => match f.containerd.version {
            Some(v) if v >= Version::new(2, 0, 0) => "version = 3\n".to_string(),
            _ => "version = 2\n".to_string(),
        },
    };
    let inspection = containerd::inspect(main, &main_text).map_err(cfg_err)?;
    let imports = read_imports(host, main, &inspection.imports)?;
    let target = containerd::patch_target(main, &main_text, &imports).map_err(cfg_err)?;
    let (target_old, target_text) = if target == main {
        (main_old, main_text)
    } else {
        let t = imports
            .iter()
            .find(|(p, _)| *p == target)
            .map(|(_, t)| t.clone())
            .unwrap_or_default();
        (Some(t.clone()), t)
    };
    // Imported files without `version` are read with the main file's.
    let schema = inspection.schema;
    let patched = if active {
        containerd::patch_with_schema(&target, &target_text, &patch_options(s, plan), schema)
            .map_err(cfg_err)?
    } else {
        let original = std::fs::read_to_string(fsio::backup_path(host, &target)).ok();
        let restore = containerd::Restore::from_original(&target, original.as_deref());
        containerd::unpatch_to(&target, &target_text, &restore, schema).map_err(cfg_err)?
    };
    Ok(Some(Change {
        host_path: target,
        old: target_old,
        new: Some(patched.text),
    }))
}

fn patch_options(s: &Settings, plan: &Plan) -> PatchOptions {
    PatchOptions {
        address: s.soci.address.clone(),
        root: s.soci.root.clone(),
        transfer_platform: plan.transfer_platform.clone(),
    }
}

/// Imported files in containerd's merge order. Patterns may be globs in
/// the last path component and relative to the main config's directory.
fn read_imports(
    host: &Host,
    main: &str,
    patterns: &[String],
) -> Result<Vec<(String, String)>, Reason> {
    let base = Path::new(main).parent().unwrap_or(Path::new("/"));
    let mut out = Vec::new();
    for pat in patterns {
        let pat_path = if Path::new(pat).is_absolute() {
            PathBuf::from(pat)
        } else {
            base.join(pat)
        };
        let name = pat_path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let dir = pat_path.parent().unwrap_or(Path::new("/"));
        let mut matches: Vec<String> = if name.contains(['*', '?', '[']) {
            match std::fs::read_dir(host.path(dir)) {
                Ok(rd) => rd
                    .filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| glob_match(name, n))
                    .map(|n| dir.join(n).display().to_string())
                    .collect(),
                Err(_) => vec![],
            }
        } else {
            vec![pat_path.display().to_string()]
        };
        matches.sort();
        for m in matches {
            if let Some(text) = read(host, &m)? {
                out.push((m, text));
            }
        }
    }
    Ok(out)
}

/// Shell-style `*` and `?` matching, enough for containerd's import globs.
fn glob_match(pat: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(pat.as_bytes(), name.as_bytes())
}

/// Real validators before anything is replaced: `containerd config dump` on
/// the candidate containerd config, and `soci-snapshotter-grpc config dump`
/// where the installed SOCI has it.
fn validate(
    host: &Host,
    s: &Settings,
    f: &Facts,
    plan: &Plan,
    changes: &[Change],
    dry_run: bool,
) -> Result<(), Reason> {
    if !s.containerd.validate {
        return Ok(());
    }
    let timeout = Duration::from_millis(s.binaries.timeout_ms);
    for c in changes.iter().filter(|c| !c.is_noop()) {
        let Some(new) = &c.new else { continue };
        let (bin, code, what) = if c.host_path == s.containerd.config {
            (&s.binaries.containerd, "containerd-validate", "containerd")
        } else if c.host_path == s.soci.config
            && f.soci_snapshotter_grpc.version >= Some(soci::CONFIG_DUMP_SINCE)
        {
            (
                &s.binaries.soci_snapshotter_grpc,
                "soci-validate",
                "soci-snapshotter-grpc",
            )
        } else {
            continue;
        };
        // Candidate beside the real file (relative imports resolve the same);
        // a dry run writes nothing on the node, so it uses the temp dir.
        let dir = if dry_run {
            std::env::temp_dir()
        } else {
            host.path(Path::new(&c.host_path).parent().unwrap_or(Path::new("/")))
        };
        std::fs::create_dir_all(&dir)
            .map_err(|e| Reason::new("write", format!("{}: {e}", dir.display())))?;
        let tmp = tempfile::Builder::new()
            .prefix(".soci-node-validate.")
            .suffix(".toml")
            .tempfile_in(&dir)
            .map_err(|e| {
                Reason::new(
                    "write",
                    format!("{}: cannot create a temp file: {e}", dir.display()),
                )
            })?;
        std::fs::write(tmp.path(), new)
            .map_err(|e| Reason::new("write", format!("{}: {e}", tmp.path().display())))?;
        let tmp_path = tmp.path().display().to_string();
        let res = run::run(
            &host.path(bin),
            &["--config", &tmp_path, "config", "dump"],
            timeout,
        );
        let dump = res.map_err(|e| {
            Reason::new(
                code,
                format!(
                    "{what} rejects the config soci-node would write for {}: {e}; the file was left as it was; report this with `soci-node preflight --dry-run` output",
                    c.host_path
                ),
            )
        })?;
        // Accepted is not enough: containerd may silently drop keys (a
        // version 2 file on containerd 2.x loses the CRI snapshotter when
        // its CRI table has no runtimes). Check what it would really use.
        if what == "containerd" {
            let problems = containerd::dump_problems(&dump.stdout, &patch_options(s, plan));
            if !problems.is_empty() {
                return Err(Reason::new(
                    code,
                    format!(
                        "containerd would not use SOCI with the config soci-node would write for {}: {}; the file was left as it was (for a version 2 file on containerd 2.x: `containerd config migrate`)",
                        c.host_path,
                        problems.join("; ")
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Write the changes in order, backing up each original once. On failure
/// returns what was done so far and why it stopped.
fn apply(host: &Host, changes: &[Change]) -> Result<Vec<FileRecord>, (Vec<FileRecord>, Reason)> {
    let mut files = Vec::new();
    for c in changes {
        let rec = |action| FileRecord {
            path: c.host_path.clone(),
            action,
        };
        if c.is_noop() {
            files.push(rec(FileAction::Unchanged));
            continue;
        }
        let res = fsio::backup_once(host, &c.host_path).and_then(|_| match &c.new {
            Some(new) => {
                fsio::write_atomic(&host.path(&c.host_path), new.as_bytes(), 0o644).map(|_| {
                    if c.old.is_some() {
                        FileAction::Updated
                    } else {
                        FileAction::Created
                    }
                })
            }
            None => fsio::remove(&host.path(&c.host_path)).map(|_| FileAction::Removed),
        });
        match res {
            Ok(action) => {
                tracing::info!(path = %c.host_path, action = ?action, "file written");
                files.push(rec(action));
            }
            Err(e) => {
                files.push(rec(FileAction::Skipped));
                return Err((files, Reason::new("write", e.to_string())));
            }
        }
    }
    Ok(files)
}

fn merge_records(into: &mut Vec<FileRecord>, more: Vec<FileRecord>) {
    for r in more {
        match into.iter_mut().find(|x| x.path == r.path) {
            Some(x) if r.action != FileAction::Unchanged => *x = r,
            Some(_) => {}
            None => into.push(r),
        }
    }
}

fn render_diff(changes: &[Change]) -> String {
    let mut out = String::new();
    for c in changes.iter().filter(|c| !c.is_noop()) {
        let old = c.old.as_deref().unwrap_or("");
        let new = c.new.as_deref().unwrap_or("");
        let a = if c.old.is_some() {
            format!("a{}", c.host_path)
        } else {
            "/dev/null".into()
        };
        let b = if c.new.is_some() {
            format!("b{}", c.host_path)
        } else {
            "/dev/null".into()
        };
        let d = similar::TextDiff::from_lines(old, new);
        out.push_str(
            &d.unified_diff()
                .context_radius(3)
                .header(&a, &b)
                .to_string(),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("*.toml", "10-soci.toml"));
        assert!(!glob_match("*.toml", "10-soci.toml.bak"));
        assert!(glob_match("a?c", "abc"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("x*", "yx"));
    }

    #[test]
    fn diff_names_files_and_handles_creation_and_removal() {
        let d = render_diff(&[
            Change {
                host_path: "/etc/a.toml".into(),
                old: Some("x = 1\n".into()),
                new: Some("x = 2\n".into()),
            },
            Change {
                host_path: "/etc/new.toml".into(),
                old: None,
                new: Some("y = 1\n".into()),
            },
            Change {
                host_path: "/etc/gone.conf".into(),
                old: Some("z\n".into()),
                new: None,
            },
            Change {
                host_path: "/etc/same".into(),
                old: Some("s\n".into()),
                new: Some("s\n".into()),
            },
        ]);
        assert!(d.contains("--- a/etc/a.toml\n+++ b/etc/a.toml\n"), "{d}");
        assert!(d.contains("-x = 1\n+x = 2\n"), "{d}");
        assert!(d.contains("--- /dev/null\n+++ b/etc/new.toml"), "{d}");
        assert!(d.contains("--- a/etc/gone.conf\n+++ /dev/null"), "{d}");
        assert!(!d.contains("/etc/same"), "{d}");
    }
}
