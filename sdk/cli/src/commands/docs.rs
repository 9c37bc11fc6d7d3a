//! `patchbay completions SHELL` and `patchbay man DIR`: shell completions and man pages
//! generated from the clap definitions (`clap_complete`, `clap_mangen`). The Debian
//! package installs their output (see `sdk/cli/Cargo.toml`, `[package.metadata.deb]`);
//! a cargo install can write them where the shell or `man` looks.

use std::io::Write;
use std::path::Path;

use anyhow::Context;

/// The shells `patchbay completions` writes for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    /// The shell to write completions for
    pub shell: Shell,
}

#[derive(Debug, clap::Args)]
pub struct ManArgs {
    /// Directory to write patchbay.1, patchbay-COMMAND.1 (one per command) and
    /// patchbayd.8 into (created if missing)
    #[arg(value_name = "DIR")]
    pub dir: std::path::PathBuf,
}

/// Writes the completion script of `cmd` for `shell` to `out`.
pub fn completions(shell: Shell, cmd: &mut clap::Command, out: &mut dyn Write) {
    let name = cmd.get_name().to_owned();
    match shell {
        Shell::Bash => clap_complete::generate(clap_complete::Shell::Bash, cmd, name, out),
        Shell::Zsh => clap_complete::generate(clap_complete::Shell::Zsh, cmd, name, out),
        Shell::Fish => clap_complete::generate(clap_complete::Shell::Fish, cmd, name, out),
    }
}

/// Writes the man pages of `cli` (section 1: the command and each subcommand) and of
/// `daemon` (section 8) into `dir`; returns the files written.
pub fn man(cli: clap::Command, daemon: clap::Command, dir: &Path) -> anyhow::Result<Vec<String>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut written = Vec::new();
    let mut write = |file: String, page: clap_mangen::Man| -> anyhow::Result<()> {
        let path = dir.join(&file);
        let mut buf = Vec::new();
        page.render(&mut buf)?;
        std::fs::write(&path, buf).with_context(|| format!("cannot write {}", path.display()))?;
        written.push(file);
        Ok(())
    };
    let mut cli = cli;
    cli.build();
    for sub in cli
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        let name = format!("patchbay-{}", sub.get_name());
        // `cli.build()` propagated the version; the display name titles the page.
        let page = sub
            .clone()
            .display_name(name.clone())
            .bin_name(format!("patchbay {}", sub.get_name()));
        write(format!("{name}.1"), clap_mangen::Man::new(page))?;
    }
    write("patchbay.1".into(), clap_mangen::Man::new(cli))?;
    write(
        "patchbayd.8".into(),
        clap_mangen::Man::new(daemon).section("8"),
    )?;
    Ok(written)
}
