//! Running the node's binaries (`containerd --version`, `config dump`, ...)
//! with a hard time bound: a hung binary must not hang the boot.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use wait_timeout::ChildExt;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(
        "{program}: not found; install it or set its path in /etc/soci-node/config.toml [binaries]"
    )]
    NotFound { program: String },
    #[error("{program}: cannot run: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} {args}: still running after {timeout_ms} ms; killed")]
    Timeout {
        program: String,
        args: String,
        timeout_ms: u64,
    },
    #[error("{program} {args}: exited with {status}: {stderr}")]
    Failed {
        program: String,
        args: String,
        status: String,
        stderr: String,
    },
}

#[derive(Debug, Clone)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

/// Run `program args...`, capturing output, killing it after `timeout`.
/// A non-zero exit is an error carrying the last lines of stderr.
pub fn run(program: &Path, args: &[&str], timeout: Duration) -> Result<Output, RunError> {
    let shown = program.display().to_string();
    let started = Instant::now();
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => RunError::NotFound {
                program: shown.clone(),
            },
            _ => RunError::Spawn {
                program: shown.clone(),
                source: e,
            },
        })?;
    // Drain pipes on threads so a chatty child cannot block on a full pipe
    // while we wait for it. Their results come back over a channel, so a
    // grandchild that keeps the pipes open cannot hold us past the bound.
    let (tx, rx) = std::sync::mpsc::channel::<(bool, Vec<u8>)>();
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        let _ = tx.send((true, s));
    });
    std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        let _ = tx2.send((false, s));
    });
    let timed_out = || RunError::Timeout {
        program: shown.clone(),
        args: args.join(" "),
        timeout_ms: timeout.as_millis() as u64,
    };
    let status = match child.wait_timeout(timeout).map_err(|e| RunError::Spawn {
        program: shown.clone(),
        source: e,
    })? {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(timed_out());
        }
    };
    let (mut stdout, mut stderr) = (String::new(), String::new());
    for _ in 0..2 {
        let left = timeout
            .saturating_sub(started.elapsed())
            .max(Duration::from_millis(50));
        match rx.recv_timeout(left) {
            Ok((is_out, bytes)) => {
                let text = String::from_utf8_lossy(&bytes).into_owned();
                if is_out {
                    stdout = text;
                } else {
                    stderr = text;
                }
            }
            Err(_) => return Err(timed_out()),
        }
    }
    if !status.success() {
        return Err(RunError::Failed {
            program: shown,
            args: args.join(" "),
            status: status.to_string(),
            stderr: tail(&stderr, 5),
        });
    }
    Ok(Output {
        stdout,
        stderr,
        elapsed: started.elapsed(),
    })
}

fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.trim_end().lines().collect();
    v[v.len().saturating_sub(lines)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_output() {
        let o = run(
            Path::new("/bin/sh"),
            &["-c", "echo out; echo err >&2"],
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(o.stdout, "out\n");
        assert_eq!(o.stderr, "err\n");
    }

    #[test]
    fn kills_hung_child_within_bound() {
        let t = Instant::now();
        let e = run(
            Path::new("/bin/sh"),
            &["-c", "sleep 30"],
            Duration::from_millis(200),
        )
        .unwrap_err();
        assert!(matches!(e, RunError::Timeout { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_grandchild_holding_the_pipe_does_not_hold_us() {
        let t = Instant::now();
        let e = run(
            Path::new("/bin/sh"),
            &["-c", "sleep 30 & echo started"],
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(matches!(e, RunError::Timeout { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn failure_carries_stderr_and_missing_is_not_found() {
        let e = run(
            Path::new("/bin/sh"),
            &["-c", "echo boom >&2; exit 3"],
            Duration::from_secs(5),
        )
        .unwrap_err();
        assert!(e.to_string().contains("boom"), "{e}");
        let e = run(
            Path::new("/nonexistent/containerd"),
            &["--version"],
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(matches!(e, RunError::NotFound { .. }), "{e}");
    }
}
