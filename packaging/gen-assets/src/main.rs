//! chatd-gen-assets: writes the man pages and shell completions of chatd, chatctl and
//! chat-client from their clap definitions, so the Debian package never ships text that
//! drifted from the real command lines.
//!
//! Usage: `chatd-gen-assets OUT_DIR` (the packaging step uses `packaging/generated`, which git
//! ignores). Writes `OUT_DIR/man/*.{1,8}` and `OUT_DIR/completions/{bash,zsh,fish}/…`.
//!
//! Each program's arguments live in a file that depends only on clap and std, included here by
//! path: the same source the program itself compiles.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;

#[allow(dead_code)]
#[path = "../../../chatd/src/cli.rs"]
mod chatd_cli;

#[allow(dead_code)]
#[path = "../../../chatctl/src/cli.rs"]
mod chatctl_cli;

#[allow(dead_code)]
#[path = "../../../chat-client/src/cli.rs"]
mod client_cli;

/// One program: its clap command and its manual section (8: system administration, 1: user).
fn programs() -> Vec<(clap::Command, &'static str)> {
    vec![
        (chatd_cli::Args::command(), "8"),
        (chatctl_cli::Cli::command(), "8"),
        (client_cli::Cli::command(), "1"),
    ]
}

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        eprintln!("usage: chatd-gen-assets OUT_DIR");
        return ExitCode::from(2);
    };
    match generate(Path::new(&out)) {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("chatd-gen-assets: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Writes every man page and completion script under `out`; returns the files written.
fn generate(out: &Path) -> std::io::Result<Vec<PathBuf>> {
    let man_dir = out.join("man");
    std::fs::create_dir_all(&man_dir)?;
    let mut written = Vec::new();
    for (cmd, section) in programs() {
        let mut cmd = cmd;
        cmd.build();
        written.extend(man_pages(&cmd, section, &man_dir, None)?);
        let name = cmd.get_name().to_owned();
        for (shell, dir) in [
            (Shell::Bash, "bash"),
            (Shell::Zsh, "zsh"),
            (Shell::Fish, "fish"),
        ] {
            let dir = out.join("completions").join(dir);
            std::fs::create_dir_all(&dir)?;
            written.push(clap_complete::generate_to(
                shell,
                &mut cmd.clone(),
                &name,
                &dir,
            )?);
        }
    }
    Ok(written)
}

/// The page of `cmd` and, recursively, one page per subcommand (`chatctl-kick.8`), the way
/// git and systemd document theirs.
fn man_pages(
    cmd: &clap::Command,
    section: &str,
    dir: &Path,
    parent: Option<&str>,
) -> std::io::Result<Vec<PathBuf>> {
    let (name, usage) = match parent {
        Some(p) => (
            format!("{p}-{}", cmd.get_name()),
            format!("{} {}", p.replace('-', " "), cmd.get_name()),
        ),
        None => (cmd.get_name().to_owned(), cmd.get_name().to_owned()),
    };
    // A subcommand's page is titled with its full name (chatctl-kick) and its synopsis shows
    // how it is typed (chatctl kick).
    let page_cmd = cmd.clone().display_name(name.clone()).bin_name(usage);
    let path = dir.join(format!("{name}.{section}"));
    let mut buf = Vec::new();
    clap_mangen::Man::new(page_cmd)
        .section(section)
        .manual("chatd")
        .source(format!("chatd {}", env!("CARGO_PKG_VERSION")))
        .render(&mut buf)?;
    std::fs::write(&path, buf)?;
    let mut out = vec![path];
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        out.extend(man_pages(sub, section, dir, Some(&name))?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_definitions_are_consistent() {
        for (cmd, _) in programs() {
            cmd.debug_assert();
        }
    }

    #[test]
    fn writes_pages_and_completions_for_every_program() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = generate(dir.path()).expect("generate");
        for want in [
            "man/chatd.8",
            "man/chatctl.8",
            "man/chatctl-kick.8",
            "man/chat-client.1",
            "completions/bash/chatctl.bash",
            "completions/zsh/_chat-client",
            "completions/fish/chatd.fish",
        ] {
            let p = dir.path().join(want);
            assert!(files.contains(&p), "{want} not reported in {files:?}");
            let text = std::fs::read_to_string(&p).expect("readable");
            assert!(!text.is_empty(), "{want} is empty");
        }
        let page = std::fs::read_to_string(dir.path().join("man/chatd.8")).expect("page");
        assert!(
            page.contains("check\\-config"),
            "chatd.8 lacks --check-config"
        );
        let kick = std::fs::read_to_string(dir.path().join("man/chatctl-kick.8")).expect("kick");
        assert!(kick.contains("chatctl\\-kick"), "{kick}");
    }
}
