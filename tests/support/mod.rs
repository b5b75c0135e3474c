//! Test harness for the real-component tests: fixture roots built from the
//! real containerd and SOCI binaries in `.deps/` (installed by
//! `scripts/test-deps.sh`), daemons started and stopped by PID, a loopback
//! OCI registry, a tiny locally built image, and a CRI client.
//!
//! Every path lives under a short `/tmp/sn-XXXX` directory (unix socket
//! paths must stay under 108 bytes). Daemons are killed when their handle
//! drops and mounts left under a fixture are detached before its directory
//! is removed, so a failing test leaves no processes or mounts behind.
//!
//! Each test binary uses a different subset of this module.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const SOCI_NODE: &str = env!("CARGO_BIN_EXE_soci-node");

const INSTALL_HINT: &str = "run `bash scripts/test-deps.sh` (installs containerd 1.6/1.7/2.1 and \
soci-snapshotter into .deps/ and docker-registry, skopeo, curl with apt-get), or point \
SOCI_NODE_DEPS at a directory laid out like .deps/";

// ---------------------------------------------------------------------------
// Dependencies
// ---------------------------------------------------------------------------

/// Where the real containerd/SOCI binaries are unpacked.
pub fn deps_dir() -> PathBuf {
    std::env::var_os("SOCI_NODE_DEPS")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".deps"))
}

/// A file under the deps directory; fails (never skips) when it is missing.
pub fn require_dep(rel: &str) -> PathBuf {
    let p = deps_dir().join(rel);
    assert!(p.is_file(), "{} is missing: {INSTALL_HINT}", p.display());
    p
}

/// A system tool on PATH; fails (never skips) when it is missing.
pub fn require_tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("`{name}` is not on PATH: {INSTALL_HINT}");
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ctd {
    V16,
    V17,
    V21,
}

impl Ctd {
    pub fn dir_name(self) -> &'static str {
        match self {
            Ctd::V16 => "containerd-1.6",
            Ctd::V17 => "containerd-1.7",
            Ctd::V21 => "containerd-2.1",
        }
    }

    pub fn containerd(self) -> PathBuf {
        require_dep(&format!("{}/usr/bin/containerd", self.dir_name()))
    }

    pub fn ctr(self) -> PathBuf {
        require_dep(&format!("{}/usr/bin/ctr", self.dir_name()))
    }

    /// containerd config schema: 2 for 1.x, 3 for 2.x.
    pub fn schema(self) -> i64 {
        match self {
            Ctd::V16 | Ctd::V17 => 2,
            Ctd::V21 => 3,
        }
    }

    /// Where the CRI's snapshotter lives in this version's config.
    pub fn cri_snapshotter_key(self) -> &'static [&'static str] {
        match self.schema() {
            2 => &[
                "plugins",
                "io.containerd.grpc.v1.cri",
                "containerd",
                "snapshotter",
            ],
            _ => &["plugins", "io.containerd.cri.v1.images", "snapshotter"],
        }
    }

    /// Where the sandbox (pause) image lives in this version's config.
    pub fn sandbox_key(self) -> &'static [&'static str] {
        match self.schema() {
            2 => &["plugins", "io.containerd.grpc.v1.cri", "sandbox_image"],
            _ => &[
                "plugins",
                "io.containerd.cri.v1.images",
                "pinned_images",
                "sandbox",
            ],
        }
    }

    /// The real `containerd config default` of this version (cached).
    pub fn default_config(self) -> String {
        static CACHE: OnceLock<Mutex<BTreeMap<&'static str, String>>> = OnceLock::new();
        let cache = CACHE.get_or_init(Default::default);
        if let Some(t) = cache.lock().unwrap().get(self.dir_name()) {
            return t.clone();
        }
        let out = run_cmd(
            Command::new(self.containerd()).args(["config", "default"]),
            Duration::from_secs(20),
        );
        assert!(out.ok(), "containerd config default failed: {out}");
        cache
            .lock()
            .unwrap()
            .insert(self.dir_name(), out.stdout.clone());
        out.stdout
    }
}

pub fn soci_grpc_bin() -> PathBuf {
    require_dep("soci/usr/bin/soci-snapshotter-grpc")
}

pub fn soci_cli_bin() -> PathBuf {
    require_dep("soci/usr/bin/soci")
}

/// Go's name for this machine's architecture (containerd platforms use it).
pub fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

// ---------------------------------------------------------------------------
// Running commands
// ---------------------------------------------------------------------------

/// A finished command: exit code, output, wall time.
#[derive(Debug, Clone)]
pub struct Run {
    pub what: String,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }

    #[track_caller]
    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(self.code, Some(code), "unexpected exit code: {self}");
        self
    }
}

impl fmt::Display for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` exited {:?} after {} ms\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.what,
            self.code,
            self.elapsed.as_millis(),
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Run to completion with a bound: a command still running after `timeout`
/// is killed (by its PID) and reported as such.
pub fn run_cmd(cmd: &mut Command, timeout: Duration) -> Run {
    let what = describe(cmd);
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{what}`: {e}"));
    // Drain both pipes in threads so a chatty child never blocks.
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let to = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = so.read_to_end(&mut b);
        b
    });
    let te = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = se.read_to_end(&mut b);
        b
    });
    let status = loop {
        match child.try_wait().expect("wait") {
            Some(s) => break Some(s),
            None if start.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let stdout = String::from_utf8_lossy(&to.join().unwrap()).into_owned();
    let mut stderr = String::from_utf8_lossy(&te.join().unwrap()).into_owned();
    if status.is_none() {
        stderr.push_str(&format!("\n[harness] killed after {timeout:?}"));
    }
    Run {
        what,
        code: status.and_then(|s| s.code()),
        stdout,
        stderr,
        elapsed: start.elapsed(),
    }
}

pub fn output_to_run(what: String, out: Output, elapsed: Duration) -> Run {
    Run {
        what,
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed,
    }
}

/// Poll `f` every `every` until it returns `Some`, at most `timeout`.
pub fn wait_until<T>(
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(every);
    }
}

// ---------------------------------------------------------------------------
// Daemons
// ---------------------------------------------------------------------------

/// A background process owned by the test: SIGTERM then SIGKILL on drop,
/// always reaped. Its stdout and stderr go to `log`.
pub struct Daemon {
    pub name: String,
    child: Child,
    pub log: PathBuf,
    pub started: Instant,
}

impl Daemon {
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Daemon {
        let f = fs::File::create(log).expect("daemon log");
        let f2 = f.try_clone().unwrap();
        let started = Instant::now();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(f))
            .stderr(Stdio::from(f2))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} (`{}`): {e}", describe(cmd)));
        Daemon {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
            started,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Err` with the log tail if the process has exited.
    pub fn alive(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(s)) => Err(format!(
                "{} exited ({s}); log tail:\n{}",
                self.name,
                self.log_tail(40)
            )),
            Err(e) => Err(format!("{}: {e}", self.name)),
        }
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let v: Vec<&str> = text.lines().collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }

    fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: plain kill(2) on our own child's PID, which has not been
        // reaped yet (so the PID cannot have been reused).
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let gone = wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
            matches!(self.child.try_wait(), Ok(Some(_))).then_some(())
        });
        if gone.is_none() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Minimal HTTP/1.1 request on loopback: (status, body).
pub fn http_request(addr: &str, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not HTTP: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

// ---------------------------------------------------------------------------
// Fixture root
// ---------------------------------------------------------------------------

/// A node's `/` in a temp dir, with the real binaries of one containerd
/// version and SOCI, `/dev/fuse`, containerd's real default config and
/// soci-node settings that point SOCI at private paths.
pub struct Fixture {
    pub ctd: Ctd,
    /// `/tmp/sn-XXXX`: everything of this test lives here.
    pub dir: PathBuf,
    /// The node's `/` (`<dir>/r`).
    pub root: PathBuf,
    /// SOCI's socket and root as written into containerd's config (runtime
    /// paths, not under the root).
    pub soci_sock: PathBuf,
    pub soci_root: PathBuf,
    /// containerd's runtime paths for a live start.
    pub ctd_sock: PathBuf,
    pub ctd_root: PathBuf,
    pub ctd_state: PathBuf,
    /// soci-node settings, written to `R/etc/soci-node/config.toml` by `set`.
    pub settings: toml::Table,
    // Last: removed after everything else is dropped.
    tmp: tempfile::TempDir,
}

pub const CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";
pub const SOCI_CONFIG: &str = "/etc/soci-snapshotter-grpc/config.toml";
pub const SETTINGS: &str = "/etc/soci-node/config.toml";
pub const STATUS: &str = "/run/soci-node/status.json";
pub const BACKUP_DIR: &str = "/var/lib/soci-node/backup";
pub const KUBELET_DROPIN_DIR: &str = "/etc/kubernetes/kubelet/config.json.d";

impl Fixture {
    pub fn new(ctd: Ctd) -> Fixture {
        // Look everything up first so a missing dependency fails clearly.
        let containerd = ctd.containerd();
        let grpc = soci_grpc_bin();
        let soci = soci_cli_bin();
        let default_config = ctd.default_config();

        let tmp = tempfile::Builder::new()
            .prefix("sn-")
            .tempdir_in("/tmp")
            .expect("temp dir in /tmp");
        let dir = tmp.path().to_path_buf();
        let root = dir.join("r");
        let bin = root.join("usr/bin");
        fs::create_dir_all(&bin).unwrap();
        symlink(&containerd, bin.join("containerd")).unwrap();
        symlink(&grpc, bin.join("soci-snapshotter-grpc")).unwrap();
        symlink(&soci, bin.join("soci")).unwrap();
        fs::create_dir_all(root.join("dev")).unwrap();
        fs::write(root.join("dev/fuse"), "").unwrap();
        fs::create_dir_all(root.join("etc/containerd")).unwrap();
        fs::write(root.join("etc/containerd/config.toml"), &default_config).unwrap();

        let mut fx = Fixture {
            ctd,
            soci_sock: dir.join("s.sock"),
            soci_root: dir.join("soci"),
            ctd_sock: dir.join("c.sock"),
            ctd_root: dir.join("cr"),
            ctd_state: dir.join("cs"),
            dir,
            root,
            settings: toml::Table::new(),
            tmp,
        };
        assert!(
            fx.ctd_sock.as_os_str().len() + ".ttrpc".len() < 100,
            "socket path too long: {}",
            fx.ctd_sock.display()
        );
        let (sock, soci_root) = (
            fx.soci_sock.display().to_string(),
            fx.soci_root.display().to_string(),
        );
        fx.set("imds.enabled", false);
        fx.set("soci.address", sock);
        fx.set("soci.root", soci_root);
        fx
    }

    /// The real path of a host path under the fixture root.
    pub fn path(&self, host_path: &str) -> PathBuf {
        self.root.join(host_path.trim_start_matches('/'))
    }

    pub fn read(&self, host_path: &str) -> String {
        let p = self.path(host_path);
        fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    pub fn write(&self, host_path: &str, text: &str) {
        let p = self.path(host_path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, text).unwrap();
    }

    /// Set a dotted settings key (`imds.timeout_ms`) and rewrite the file.
    pub fn set(&mut self, key: &str, value: impl Into<toml::Value>) {
        let parts: Vec<&str> = key.split('.').collect();
        let (last, tables) = parts.split_last().unwrap();
        let mut t = &mut self.settings;
        for p in tables {
            t = t
                .entry(p.to_string())
                .or_insert_with(|| toml::Value::Table(Default::default()))
                .as_table_mut()
                .unwrap_or_else(|| panic!("settings: {p} is not a table"));
        }
        t.insert(last.to_string(), value.into());
        let text = toml::to_string(&self.settings).unwrap();
        self.write(SETTINGS, &text);
    }

    /// Replace the SOCI binary with a script (e.g. a crashing one).
    pub fn replace_binary(&self, host_path: &str, script: &str) {
        let p = self.path(host_path);
        let _ = fs::remove_file(&p);
        fs::write(&p, script).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    }

    pub fn soci_node(&self) -> Command {
        let mut c = Command::new(SOCI_NODE);
        c.arg("--root").arg(&self.root);
        // Logs go to stderr under a fixture root; keep them readable.
        c.env_remove("SOCI_NODE_ROOT");
        c
    }

    /// `soci-node --root R preflight <args>`, bounded.
    pub fn preflight(&self, args: &[&str]) -> Run {
        let mut c = self.soci_node();
        c.arg("preflight").args(args);
        run_cmd(&mut c, Duration::from_secs(60))
    }

    /// The status file as JSON (panics with the file if it is not JSON).
    pub fn status(&self) -> serde_json::Value {
        let text = self.read(STATUS);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("status.json: {e}\n{text}"))
    }

    /// `containerd --config R/etc/containerd/config.toml config dump`: the
    /// real validator. `Err` carries containerd's message.
    pub fn config_dump(&self) -> Result<toml::Table, String> {
        self.config_dump_of(&self.path(CONTAINERD_CONFIG))
    }

    pub fn config_dump_of(&self, file: &Path) -> Result<toml::Table, String> {
        let run = run_cmd(
            Command::new(self.ctd.containerd())
                .arg("--config")
                .arg(file)
                .args(["config", "dump"]),
            Duration::from_secs(30),
        );
        if !run.ok() {
            return Err(run.to_string());
        }
        toml::from_str(&run.stdout)
            .map_err(|e| format!("config dump is not TOML: {e}\n{}", run.stdout))
    }

    /// Every file, directory and symlink under the root.
    pub fn tree(&self) -> BTreeMap<PathBuf, Node> {
        tree(&self.root)
    }

    /// Start `soci-snapshotter-grpc` with the config preflight wrote; returns
    /// once its socket accepts connections.
    pub fn start_soci(&self) -> (Daemon, Duration) {
        let mut d = Daemon::spawn(
            "soci-snapshotter-grpc",
            Command::new(soci_grpc_bin())
                .arg("--address")
                .arg(&self.soci_sock)
                .arg("--root")
                .arg(&self.soci_root)
                .arg("--config")
                .arg(self.path(SOCI_CONFIG))
                .args(["--log-level", "info"]),
            &self.dir.join("soci.log"),
        );
        let ready = wait_until(Duration::from_secs(20), Duration::from_millis(10), || {
            if d.alive().is_err() {
                return Some(false);
            }
            std::os::unix::net::UnixStream::connect(&self.soci_sock)
                .ok()
                .map(|_| true)
        });
        let elapsed = d.started.elapsed();
        if ready != Some(true) {
            panic!(
                "soci-snapshotter-grpc did not listen on {} within 20s: {:?}\n{}",
                self.soci_sock.display(),
                d.alive(),
                d.log_tail(40)
            );
        }
        (d, elapsed)
    }

    /// Start containerd on the fixture's (patched) config with private
    /// root, state and address (ttrpc defaults to `<address>.ttrpc` in
    /// every version); returns once `ctr version` answers.
    pub fn start_containerd(&self) -> (Daemon, Duration) {
        let mut d = Daemon::spawn(
            "containerd",
            Command::new(self.ctd.containerd())
                .arg("--config")
                .arg(self.path(CONTAINERD_CONFIG))
                .arg("--root")
                .arg(&self.ctd_root)
                .arg("--state")
                .arg(&self.ctd_state)
                .arg("--address")
                .arg(&self.ctd_sock),
            &self.dir.join("containerd.log"),
        );
        let ready = wait_until(Duration::from_secs(30), Duration::from_millis(10), || {
            if d.alive().is_err() {
                return Some(false);
            }
            run_cmd(
                Command::new(self.ctd.ctr())
                    .arg("--address")
                    .arg(&self.ctd_sock)
                    .arg("version"),
                Duration::from_secs(5),
            )
            .ok()
            .then_some(true)
        });
        let elapsed = d.started.elapsed();
        if ready != Some(true) {
            panic!(
                "containerd did not answer on {} within 30s: {:?}\n{}",
                self.ctd_sock.display(),
                d.alive(),
                d.log_tail(40)
            );
        }
        (d, elapsed)
    }

    /// A small image written as a docker-archive at /etc/eks/pause.tar
    /// under the root, named `reference` (what EKS AMIs ship for the
    /// sandbox image).
    pub fn pause_tarball(&self, reference: &str) {
        let img = build_image(
            &self.dir.join("pause"),
            "latest",
            &[&[("pause", "#!/bin/true\n")]],
        );
        let out = self.path("/etc/eks/pause.tar");
        fs::create_dir_all(out.parent().unwrap()).unwrap();
        let run = run_cmd(
            Command::new(require_tool("skopeo"))
                .args(["--insecure-policy", "copy"])
                .arg(format!("oci:{}:{}", img.layout.display(), img.tag))
                .arg(format!("docker-archive:{}:{reference}", out.display())),
            Duration::from_secs(60),
        );
        assert!(run.ok(), "{run}");
    }

    /// `ctr --address <sock> <args>` against the live containerd.
    pub fn ctr(&self, args: &[&str]) -> Run {
        run_cmd(
            Command::new(self.ctd.ctr())
                .arg("--address")
                .arg(&self.ctd_sock)
                .args(args),
            Duration::from_secs(60),
        )
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Daemons are dropped before the fixture (declared after it); detach
        // whatever they left mounted under our directory, deepest first, so
        // the temp dir can be removed.
        unmount_under(&self.dir);
    }
}

/// Lazily unmount every mount point under `dir`.
pub fn unmount_under(dir: &Path) {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        if let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) {
            // SAFETY: umount2 with a valid NUL-terminated path.
            unsafe {
                libc::umount2(c.as_ptr(), libc::MNT_DETACH);
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir(u32),
    File(Vec<u8>, u32),
    Link(PathBuf),
}

/// A comparable picture of a directory tree (paths relative to `root`).
pub fn tree(root: &Path) -> BTreeMap<PathBuf, Node> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Node>) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            let md = fs::symlink_metadata(&p).unwrap();
            let mode = md.permissions().mode() & 0o7777;
            if md.file_type().is_symlink() {
                out.insert(rel, Node::Link(fs::read_link(&p).unwrap()));
            } else if md.is_dir() {
                out.insert(rel, Node::Dir(mode));
                walk(root, &p, out);
            } else {
                out.insert(rel, Node::File(fs::read(&p).unwrap_or_default(), mode));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Human-readable difference of two trees (empty when equal).
pub fn tree_diff(a: &BTreeMap<PathBuf, Node>, b: &BTreeMap<PathBuf, Node>) -> String {
    let mut out = String::new();
    for (k, v) in a {
        match b.get(k) {
            None => out.push_str(&format!("removed: {}\n", k.display())),
            Some(w) if w != v => out.push_str(&format!("changed: {}\n", k.display())),
            _ => {}
        }
    }
    for k in b.keys().filter(|k| !a.contains_key(*k)) {
        out.push_str(&format!("added:   {}\n", k.display()));
    }
    out
}

// ---------------------------------------------------------------------------
// TOML and status helpers
// ---------------------------------------------------------------------------

pub fn toml_get<'a>(t: &'a toml::Table, path: &[&str]) -> Option<&'a toml::Value> {
    let (first, rest) = path.split_first()?;
    let mut v = t.get(*first)?;
    for k in rest {
        v = v.as_table()?.get(*k)?;
    }
    Some(v)
}

pub fn toml_str<'a>(t: &'a toml::Table, path: &[&str]) -> Option<&'a str> {
    toml_get(t, path).and_then(|v| v.as_str())
}

/// Snapshotters named by containerd >= 2.1's transfer-service unpack configs.
pub fn transfer_unpack_snapshotters(dump: &toml::Table) -> Vec<String> {
    toml_get(
        dump,
        &[
            "plugins",
            "io.containerd.transfer.v1.local",
            "unpack_config",
        ],
    )
    .and_then(|v| v.as_array())
    .map(|a| {
        a.iter()
            .filter_map(|e| e.get("snapshotter").and_then(|s| s.as_str()))
            .map(String::from)
            .collect()
    })
    .unwrap_or_default()
}

pub fn reason_codes(status: &serde_json::Value) -> Vec<String> {
    status["reasons"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|r| r["code"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// The message of the first reason with `code`.
pub fn reason_message(status: &serde_json::Value, code: &str) -> Option<String> {
    status["reasons"].as_array()?.iter().find_map(|r| {
        (r["code"].as_str() == Some(code)).then(|| r["message"].as_str().unwrap_or("").to_string())
    })
}

/// `(path, action)` of every file record in the status.
pub fn file_actions(status: &serde_json::Value) -> Vec<(String, String)> {
    status["files"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|f| {
                    (
                        f["path"].as_str().unwrap_or("").to_string(),
                        f["action"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Registry and image
// ---------------------------------------------------------------------------

/// `docker-registry serve` (distribution 2.8) on 127.0.0.1 with its
/// storage in a test directory.
pub struct Registry {
    /// `127.0.0.1:PORT`
    pub addr: String,
    daemon: Daemon,
}

impl Registry {
    pub fn start(dir: &Path) -> Registry {
        let bin = require_tool("docker-registry");
        fs::create_dir_all(dir.join("data")).unwrap();
        let mut last = String::new();
        // The port was free when chosen; retry if someone took it meanwhile.
        for attempt in 0..3 {
            let addr = format!("127.0.0.1:{}", free_port());
            let cfg = dir.join("registry.yml");
            fs::write(
                &cfg,
                format!(
                    "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
                     storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                     http:\n  addr: {addr}\n",
                    dir.join("data").display()
                ),
            )
            .unwrap();
            let mut daemon = Daemon::spawn(
                "docker-registry",
                Command::new(&bin).arg("serve").arg(&cfg),
                &dir.join(format!("registry-{attempt}.log")),
            );
            let up = wait_until(Duration::from_secs(15), Duration::from_millis(20), || {
                if daemon.alive().is_err() {
                    return Some(false);
                }
                matches!(http_request(&addr, "GET", "/v2/"), Ok((200, _))).then_some(true)
            });
            if up == Some(true) {
                return Registry { addr, daemon };
            }
            last = format!("{:?}\n{}", daemon.alive(), daemon.log_tail(20));
        }
        panic!("docker-registry did not come up: {last}");
    }

    pub fn pid(&self) -> u32 {
        self.daemon.pid()
    }
}

/// A tiny OCI image layout built here: `layers.len()` uncompressed tar
/// layers, each holding the given files, for this machine's architecture.
pub struct TestImage {
    pub layout: PathBuf,
    pub tag: String,
    pub layer_count: usize,
}

fn sha256_file(p: &Path) -> String {
    let out = run_cmd(
        Command::new(require_tool("sha256sum")).arg(p),
        Duration::from_secs(30),
    );
    assert!(out.ok(), "{out}");
    out.stdout.split_whitespace().next().unwrap().to_string()
}

/// Store `bytes` as a blob; returns (digest, size).
fn put_blob(layout: &Path, bytes: &[u8]) -> (String, usize) {
    let tmp = layout.join("blob.tmp");
    fs::write(&tmp, bytes).unwrap();
    let hex = sha256_file(&tmp);
    fs::rename(&tmp, layout.join("blobs/sha256").join(&hex)).unwrap();
    (format!("sha256:{hex}"), bytes.len())
}

pub fn build_image(dir: &Path, tag: &str, layers: &[&[(&str, &str)]]) -> TestImage {
    let tar = require_tool("tar");
    let layout = dir.join("oci");
    fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    let mut descs = Vec::new();
    for (i, files) in layers.iter().enumerate() {
        let src = dir.join(format!("layer{i}"));
        for (name, content) in files.iter() {
            let p = src.join(name);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, content).unwrap();
        }
        let tar_path = dir.join(format!("layer{i}.tar"));
        let run = run_cmd(
            Command::new(&tar)
                .args([
                    "--sort=name",
                    "--owner=0",
                    "--group=0",
                    "--numeric-owner",
                    "--mtime=@0",
                    "-C",
                ])
                .arg(&src)
                .arg("-cf")
                .arg(&tar_path)
                .arg("."),
            Duration::from_secs(30),
        );
        assert!(run.ok(), "{run}");
        let bytes = fs::read(&tar_path).unwrap();
        descs.push(put_blob(&layout, &bytes));
    }
    let config = serde_json::json!({
        "architecture": go_arch(),
        "os": "linux",
        "config": { "Cmd": ["/bin/sh"] },
        "rootfs": { "type": "layers", "diff_ids": descs.iter().map(|d| d.0.clone()).collect::<Vec<_>>() },
    });
    let (cfg_digest, cfg_size) = put_blob(&layout, &serde_json::to_vec(&config).unwrap());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_digest, "size": cfg_size },
        "layers": descs.iter().map(|(d, s)| serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": s
        })).collect::<Vec<_>>(),
    });
    let (m_digest, m_size) = put_blob(&layout, &serde_json::to_vec(&manifest).unwrap());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": m_digest, "size": m_size,
            "annotations": { "org.opencontainers.image.ref.name": tag },
        }],
    });
    fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    TestImage {
        layout,
        tag: tag.to_string(),
        layer_count: layers.len(),
    }
}

impl TestImage {
    /// `skopeo copy` the layout to `registry/repo:tag` over plain HTTP;
    /// returns the reference.
    pub fn push(&self, registry: &Registry, repo: &str) -> String {
        let reference = format!("{}/{repo}:{}", registry.addr, self.tag);
        let run = run_cmd(
            Command::new(require_tool("skopeo"))
                .args(["--insecure-policy", "copy", "--dest-tls-verify=false"])
                .arg(format!("oci:{}:{}", self.layout.display(), self.tag))
                .arg(format!("docker://{reference}")),
            Duration::from_secs(60),
        );
        assert!(run.ok(), "skopeo push failed: {run}");
        reference
    }
}

// ---------------------------------------------------------------------------
// CRI client
// ---------------------------------------------------------------------------

fn varint(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn pb_bytes(field: u8, data: &[u8], out: &mut Vec<u8>) {
    out.push((field << 3) | 2);
    varint(data.len(), out);
    out.extend_from_slice(data);
}

/// A CRI `runtime.v1.ImageService/PullImage` call on containerd's socket,
/// exactly what kubelet sends (no auth, no sandbox config), made with curl
/// over HTTP/2 (gRPC framing and the two protobuf fields done by hand, as
/// crictl is not packaged for Debian 12). Because this goes through the CRI
/// plugin, the CRI's configured snapshotter (and, on containerd >= 2.1, the
/// transfer service's unpack config) decides where the layers land; the
/// client names no snapshotter. Returns the image ref (`sha256:...`).
pub fn cri_pull(containerd_sock: &Path, image: &str, work: &Path) -> Result<String, String> {
    let curl = require_tool("curl");
    let mut spec = Vec::new();
    pb_bytes(1, image.as_bytes(), &mut spec); // ImageSpec.image
    let mut req = Vec::new();
    pb_bytes(1, &spec, &mut req); // PullImageRequest.image
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(req.len() as u32).to_be_bytes());
    frame.extend_from_slice(&req);
    let req_file = work.join("pull.req");
    let hdr_file = work.join("pull.hdr");
    let body_file = work.join("pull.body");
    fs::write(&req_file, &frame).unwrap();
    let run = run_cmd(
        Command::new(curl)
            .args(["-sS", "--http2-prior-knowledge", "--max-time", "170"])
            .arg("--unix-socket")
            .arg(containerd_sock)
            .args([
                "-X",
                "POST",
                "-H",
                "content-type: application/grpc",
                "-H",
                "te: trailers",
            ])
            .arg("--data-binary")
            .arg(format!("@{}", req_file.display()))
            .arg("-D")
            .arg(&hdr_file)
            .arg("-o")
            .arg(&body_file)
            .arg("http://localhost/runtime.v1.ImageService/PullImage"),
        Duration::from_secs(180),
    );
    if !run.ok() {
        return Err(format!("curl failed: {run}"));
    }
    // Headers and trailers (curl writes both to -D).
    let headers = fs::read_to_string(&hdr_file).unwrap_or_default();
    let field = |name: &str| {
        headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    match field("grpc-status").as_deref() {
        Some("0") => {}
        other => {
            return Err(format!(
                "PullImage failed: grpc-status {other:?}, grpc-message {:?}\n{headers}",
                field("grpc-message")
            ))
        }
    }
    // PullImageResponse { string image_ref = 1; } after the 5-byte frame.
    let body = fs::read(&body_file).unwrap_or_default();
    if body.len() < 7 || body[5] != 0x0a {
        return Err(format!("unexpected PullImage response: {body:?}"));
    }
    let len = body[6] as usize; // image refs are < 128 bytes
    let image_ref = body
        .get(7..7 + len)
        .ok_or_else(|| format!("short PullImage response: {body:?}"))?;
    Ok(String::from_utf8_lossy(image_ref).into_owned())
}

/// Snapshot keys listed by `ctr snapshots ls` (header dropped).
pub fn snapshot_keys(ls_output: &str) -> Vec<String> {
    ls_output
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect()
}

// ---------------------------------------------------------------------------
// Loopback servers for IMDS tests
// ---------------------------------------------------------------------------

/// A TCP server on 127.0.0.1 run by a thread, stopped on drop (and in any
/// case after 60 s, so it never outlives a test run).
pub struct LoopbackServer {
    pub port: u16,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl LoopbackServer {
    /// Accepts connections and never answers (holds them open).
    pub fn silent() -> LoopbackServer {
        Self::spawn(|stream, held| held.push(stream))
    }

    /// Answers every HTTP request with `code` and an empty body.
    pub fn http_status(code: u16) -> LoopbackServer {
        Self::spawn(move |mut s, _| {
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = write!(
                    s,
                    "HTTP/1.1 {code} Test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                let _ = s.shutdown(Shutdown::Both);
            });
        })
    }

    fn spawn(
        mut on_conn: impl FnMut(TcpStream, &mut Vec<TcpStream>) + Send + 'static,
    ) -> LoopbackServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = std::thread::spawn(move || {
            let start = Instant::now();
            let mut held = Vec::new();
            while !stop2.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(60) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let _ = s.set_nonblocking(false);
                        on_conn(s, &mut held);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        LoopbackServer {
            port,
            stop,
            handle: Some(handle),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for LoopbackServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
