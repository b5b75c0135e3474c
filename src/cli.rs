//! Command line: parsing, dispatch, exit codes.

use crate::hostpath::{known, Host};
use crate::settings::Settings;
use crate::{apply, logging, preflight, prime, status, systemd};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

const ABOUT: &str = "Make the SOCI snapshotter active on a Kubernetes node before its first image pull, and keep the node bootable.";

const LONG_ABOUT: &str = "\
Make the SOCI snapshotter active on a Kubernetes node before its first image pull, and keep the node bootable.

soci-node-preflight.service runs `soci-node preflight` before every containerd start. It checks FUSE, the SOCI and containerd binaries, the instance-store disks and free space, decides a pull mode (parallel pull on instance-store RAID0 with SOCI >= 0.11, lazy loading otherwise), writes /etc/soci-snapshotter-grpc/config.toml, patches /etc/containerd/config.toml in place (comments and unrelated settings kept, original backed up under /var/lib/soci-node/backup/), and records the decision in /run/soci-node/status.json. If anything is wrong it falls back to containerd's own snapshotter and says why; the node always boots.";

const AFTER_HELP: &str = "\
Examples:
  soci-node preflight --dry-run        show what would change, change nothing
  soci-node status                     what the last preflight decided and why
  soci-node --root ./node preflight    run against a copy of a node's files
  soci-node apply                      switch a running node (SSM Run Command)
  soci-node apply --no-restart --json  write configs only; machine-readable report

Files: /etc/soci-node/config.toml (settings), /run/soci-node/status.json (last decision).
Logs: journalctl -u soci-node-preflight";

/// `0.1.0 (bundled SOCI 0.4.1)`: scripts/package.sh sets
/// SOCI_NODE_BUNDLED_SOCI at build time to the version it packs.
pub fn version() -> String {
    match option_env!("SOCI_NODE_BUNDLED_SOCI") {
        Some(v) => format!("{} (bundled SOCI {v})", env!("CARGO_PKG_VERSION")),
        None => env!("CARGO_PKG_VERSION").to_string(),
    }
}

#[derive(Debug, Parser)]
#[command(name = "soci-node", version = version(), about = ABOUT, long_about = LONG_ABOUT, after_help = AFTER_HELP)]
pub struct Cli {
    /// Treat DIR as the node's `/`: every host path (/etc, /sys, /proc, /run,
    /// /var/lib, /dev, and the binaries) is read and written under it.
    #[arg(
        long,
        global = true,
        value_name = "DIR",
        default_value = "/",
        env = "SOCI_NODE_ROOT"
    )]
    pub root: PathBuf,

    /// soci-node's settings file [default: /etc/soci-node/config.toml under --root].
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// More log detail (-v debug, -vv trace). SOCI_NODE_LOG takes a full filter.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot oneshot: check the node, decide, write configs, record the status.
    ///
    /// Exits 0 when SOCI is activated and when it deliberately falls back to
    /// overlayfs (the reason is in the status and the journal); exits 1 on a
    /// fallback only with on_failure = "fail"; 2 on usage errors.
    Preflight(PreflightArgs),
    /// Show what the last preflight decided and why.
    Status(StatusArgs),
    /// After containerd is up: put the sandbox image into the SOCI snapshotter.
    ///
    /// Runs as containerd's ExecStartPost, so kubelet's first sandbox needs
    /// no pull. Imports prime.sandbox_tarball (EKS: /etc/eks/pause.tar) when
    /// it exists, pulls otherwise; a no-op when already done or when SOCI is
    /// not the CRI snapshotter. Bounded by prime.timeout_ms. Exits 0 when the
    /// image is ready or nothing is to be done, 1 when it could not be made
    /// ready (the unit ignores that: containerd keeps running).
    Prime(PrimeArgs),
    /// Live install (SSM Run Command): preflight, restart soci-snapshotter
    /// then containerd through systemd's D-Bus API, check the plugin, handle
    /// images unpacked only in overlayfs, prime.
    ///
    /// Restarts only when a config changed or the plugin is not live, and
    /// never when SOCI could not be activated. Exits 0 ok, 1 ok with
    /// warnings, 2 failed (the reason is printed).
    Apply(ApplyArgs),
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// Write the configs but restart nothing (they take effect at the next
    /// containerd restart).
    #[arg(long)]
    pub no_restart: bool,
    /// What to do with images unpacked only in overlayfs (after the switch
    /// the CRI lists them, but new containers from them can fail with
    /// "failed to get reader from content store").
    #[arg(long, value_enum, default_value = "remove")]
    pub images: apply::ImagesPolicy,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct PrimeArgs {
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct PreflightArgs {
    /// Print a unified diff of what would change and the decision; write nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print the status file as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn main() -> i32 {
    let cli = Cli::parse();
    let host = Host::new(&cli.root);
    logging::init(cli.verbose, host.is_live());
    match dispatch(&cli, &host) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("soci-node: {e:#}");
            3
        }
    }
}

/// systemd on the system bus, connected on first use.
#[derive(Default)]
struct LazyBus(std::sync::OnceLock<Result<systemd::Dbus, String>>);

impl LazyBus {
    fn get(&self) -> Result<&systemd::Dbus, systemd::UnitError> {
        self.0
            .get_or_init(|| systemd::Dbus::system().map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| systemd::UnitError::Bus(e.clone()))
    }
}

impl systemd::UnitControl for LazyBus {
    fn restart(&self, unit: &str, timeout: std::time::Duration) -> Result<(), systemd::UnitError> {
        self.get()?.restart(unit, timeout)
    }
    fn describe(&self, unit: &str) -> String {
        self.get()
            .map(|b| b.describe(unit))
            .unwrap_or_else(|e| e.to_string())
    }
}

/// Where soci-node's settings are read from, and how to name them.
fn settings_path(cli: &Cli, host: &Host) -> (PathBuf, String) {
    match &cli.config {
        Some(p) => (p.clone(), p.display().to_string()),
        None => (host.path(known::SETTINGS), known::SETTINGS.to_string()),
    }
}

fn dispatch(cli: &Cli, host: &Host) -> anyhow::Result<i32> {
    match &cli.command {
        Command::Preflight(a) => {
            let (settings_real, settings_shown) = settings_path(cli, host);
            let out = preflight::run(
                host,
                &preflight::Options {
                    dry_run: a.dry_run,
                    settings_real,
                    settings_shown,
                },
            )?;
            if let Some(diff) = &out.diff {
                if diff.is_empty() {
                    println!("# no changes");
                } else {
                    print!("{diff}");
                }
                println!("# decision (dry run, nothing written)");
            }
            print!("{}", status::render(&out.status));
            Ok(out.exit_code)
        }
        Command::Prime(a) => {
            let (real, shown) = settings_path(cli, host);
            let settings = Settings::load(&real, &shown)?;
            match prime::prime(host, &settings) {
                Ok(r) => {
                    if a.json {
                        println!("{}", serde_json::to_string_pretty(&r)?);
                    } else {
                        println!(
                            "prime: {} {} ({} ms)",
                            r.image.as_deref().unwrap_or("-"),
                            r.message,
                            r.elapsed_ms
                        );
                    }
                    Ok(0)
                }
                Err(e) => {
                    tracing::error!("prime failed: {e}");
                    eprintln!("soci-node prime: {e}");
                    Ok(1)
                }
            }
        }
        Command::Apply(a) => {
            let (settings_real, settings_shown) = settings_path(cli, host);
            let settings = Settings::load(&settings_real, &settings_shown)?;
            let out = preflight::run(
                host,
                &preflight::Options {
                    dry_run: false,
                    settings_real,
                    settings_shown,
                },
            )?;
            let st = &out.status;
            let inputs = apply::Inputs {
                active: st.state == status::StateOut::Active,
                reasons: st
                    .reasons
                    .iter()
                    .map(|r| format!("{}: {}", r.code, r.message))
                    .collect(),
                files_changed: st
                    .files
                    .iter()
                    .any(|f| !matches!(f.action, status::FileAction::Unchanged)),
                restart: !a.no_restart,
                images: a.images,
                restart_timeout: std::time::Duration::from_secs(180),
                plugin_wait: std::time::Duration::from_secs(20),
            };
            let rt = apply::CtrRuntime {
                ctr: host.path(&settings.binaries.ctr),
                address: settings.containerd.address.clone(),
                plain_http: settings.prime.plain_http,
            };
            // The bus is only dialled when a restart is really needed.
            let bus = LazyBus::default();
            let mut report = apply::orchestrate(&inputs, &bus, &rt);
            if report.plugin_ok == Some(true) {
                match prime::prime(host, &settings) {
                    Ok(p) => {
                        report.prime =
                            Some(format!("{} {}", p.image.unwrap_or_default(), p.message))
                    }
                    Err(e) => {
                        report.errors.push(format!("prime: {e}"));
                        report.exit_code = 2;
                    }
                }
            }
            if a.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", apply::render(&report));
            }
            Ok(report.exit_code)
        }
        Command::Status(a) => {
            let s = status::read(host)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", status::render(&s));
            }
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_after_the_subcommand() {
        let c = Cli::try_parse_from([
            "soci-node",
            "preflight",
            "--dry-run",
            "--root",
            "/tmp/r",
            "-v",
        ])
        .unwrap();
        assert_eq!(c.root, PathBuf::from("/tmp/r"));
        assert_eq!(c.verbose, 1);
        assert!(matches!(
            c.command,
            Command::Preflight(PreflightArgs { dry_run: true })
        ));
        assert!(Cli::try_parse_from(["soci-node", "frobnicate"]).is_err());
    }
}
