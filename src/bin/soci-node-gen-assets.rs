//! Build-time helper (not shipped): writes soci-node's man page and shell
//! completions from the same clap definition the binary uses, so they can
//! never drift from `--help`.
//!
//!     soci-node-gen-assets OUT_DIR
//!
//! produces OUT_DIR/soci-node.8 (plus soci-node-<command>.8),
//! OUT_DIR/completions/{soci-node.bash,_soci-node,soci-node.fish}.

use clap::CommandFactory;
use clap_complete::Shell;
use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let out = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| {
        eprintln!("usage: soci-node-gen-assets OUT_DIR");
        std::process::exit(2)
    }));
    std::fs::create_dir_all(out.join("completions"))?;
    let cmd = soci_node::cli::Cli::command();
    // Section 8: system administration commands.
    let man = clap_mangen::Man::new(cmd.clone()).section("8");
    let mut buf = Vec::new();
    man.render(&mut buf)?;
    std::fs::write(out.join("soci-node.8"), buf)?;
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        let name = format!("soci-node-{}", sub.get_name());
        let sub = sub.clone().name(name.clone()).bin_name(name.clone());
        let mut buf = Vec::new();
        clap_mangen::Man::new(sub).section("8").render(&mut buf)?;
        std::fs::write(out.join(format!("{name}.8")), buf)?;
    }
    for (shell, file) in [
        (Shell::Bash, "soci-node.bash"),
        (Shell::Zsh, "_soci-node"),
        (Shell::Fish, "soci-node.fish"),
    ] {
        let mut cmd = soci_node::cli::Cli::command();
        let mut f = std::fs::File::create(out.join("completions").join(file))?;
        clap_complete::generate(shell, &mut cmd, "soci-node", &mut f);
    }
    Ok(())
}
