//! Logs: the journal when it is there (structured fields survive), stderr
//! for people at a terminal and for test roots.

use crate::hostpath::known;
use std::path::Path;
use tracing_subscriber::{filter::EnvFilter, prelude::*};

pub fn init(verbose: u8, live: bool) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter =
        EnvFilter::try_from_env("SOCI_NODE_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    // Under systemd stderr already goes to the journal: send events there
    // once, with their fields. At a terminal, print them too.
    let under_systemd = std::env::var_os("JOURNAL_STREAM").is_some();
    let journald = if live && Path::new(known::JOURNAL_SOCKET).exists() {
        tracing_journald::layer()
            .ok()
            .map(|l| l.with_syslog_identifier("soci-node".into()))
    } else {
        None
    };
    let stderr = (journald.is_none() || !under_systemd).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_target(false)
            .without_time()
            .compact()
    });
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(journald)
        .with(stderr)
        .try_init();
}
