//! The CLI's documentation, generated from its definition: shell completions
//! (`xdpgate completions SHELL`, clap_complete), the man pages (`xdpgate man`, clap_mangen),
//! and the check that every command, flag and value has help text.

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use clap::Command;
use clap_complete::Shell;

/// `xdpgate completions SHELL`.
#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    ///
    /// bash: xdpgate completions bash > /etc/bash_completion.d/xdpgate
    /// zsh:  xdpgate completions zsh > "${fpath[1]}/_xdpgate"
    /// fish: xdpgate completions fish > ~/.config/fish/completions/xdpgate.fish
    #[arg(value_enum, verbatim_doc_comment)]
    pub shell: ShellArg,
}

/// The shells clap_complete writes for, each with its help text.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum ShellArg {
    /// GNU Bash (bash-completion).
    Bash,
    /// Z shell (a compdef function, `_xdpgate`).
    Zsh,
    /// fish.
    Fish,
    /// Elvish.
    Elvish,
    /// PowerShell.
    Powershell,
}

impl From<ShellArg> for Shell {
    fn from(s: ShellArg) -> Self {
        match s {
            ShellArg::Bash => Shell::Bash,
            ShellArg::Zsh => Shell::Zsh,
            ShellArg::Fish => Shell::Fish,
            ShellArg::Elvish => Shell::Elvish,
            ShellArg::Powershell => Shell::PowerShell,
        }
    }
}

/// `xdpgate man`.
#[derive(Debug, clap::Args)]
pub struct ManArgs {
    /// Write xdpgate.1 and one page per command (xdpgate-flows.1, ...) into DIR instead of
    /// printing xdpgate.1 to standard output.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// Prints the completion script for `shell`.
pub fn completions(mut cmd: Command, args: &CompletionsArgs, out: &mut dyn Write) -> Result<()> {
    let name = cmd.get_name().to_string();
    clap_complete::generate(Shell::from(args.shell), &mut cmd, name, out);
    Ok(())
}

/// Prints the main page, or writes every page into `--dir`.
pub fn man(cmd: Command, args: &ManArgs, out: &mut dyn Write) -> Result<()> {
    match &args.dir {
        None => clap_mangen::Man::new(cmd).render(out).context("writing the man page"),
        Some(dir) => {
            let written = man_pages(cmd, dir)?;
            for page in written {
                writeln!(out, "{}", page.display()).context("writing to stdout")?;
            }
            Ok(())
        }
    }
}

/// Writes `xdpgate.1` and a page per subcommand into `dir`; returns their paths.
fn man_pages(cmd: Command, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    clap_mangen::generate_to(cmd.clone(), dir)
        .with_context(|| format!("writing man pages into {}", dir.display()))?;
    let mut pages = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let prefix = cmd.get_name();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(prefix) && n.ends_with(".1"))
        {
            pages.push(path);
        }
    }
    pages.sort();
    Ok(pages)
}

/// Every command, argument and listed value of `cmd` (walked to the bottom) that has no
/// help text, as `xdpgate flows --top` or `xdpgate attach --role=external`. Clap's own
/// `--help` and `--version` are not counted.
pub fn without_help(cmd: &Command) -> Vec<String> {
    let mut missing = Vec::new();
    walk(cmd, cmd.get_name(), &mut missing);
    missing
}

fn walk(cmd: &Command, path: &str, missing: &mut Vec<String>) {
    for arg in cmd.get_arguments() {
        let id = arg.get_id().as_str();
        if id == "help" || id == "version" {
            continue;
        }
        let name = match (arg.get_long(), arg.get_short()) {
            (Some(l), _) => format!("--{l}"),
            (None, Some(s)) => format!("-{s}"),
            (None, None) => id.to_uppercase(),
        };
        if arg.get_help().is_none() && arg.get_long_help().is_none() {
            missing.push(format!("{path} {name}"));
        }
        // Flags (`--json`) list true and false without taking a value.
        let values =
            if arg.get_action().takes_values() { arg.get_possible_values() } else { vec![] };
        for value in values {
            if value.get_help().is_none() && !value.is_hide_set() {
                missing.push(format!("{path} {name}={}", value.get_name()));
            }
        }
    }
    for sub in cmd.get_subcommands() {
        let sub_path = format!("{path} {}", sub.get_name());
        if sub.get_name() != "help" && sub.get_about().is_none() {
            missing.push(sub_path.clone());
        }
        walk(sub, &sub_path, missing);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    struct Doc {
        /// Documented.
        #[arg(long)]
        good: bool,
        #[arg(long)]
        bare: bool,
        #[arg(long, value_enum)]
        pick: Option<Pick>,
        #[command(subcommand)]
        sub: Sub,
    }

    #[derive(Clone, clap::ValueEnum)]
    enum Pick {
        /// Documented.
        One,
        Two,
    }

    #[derive(clap::Subcommand)]
    enum Sub {
        /// Documented.
        Said {
            #[arg(long)]
            quiet: bool,
        },
        Unsaid,
    }

    #[test]
    fn the_walker_names_what_has_no_help() {
        use clap::CommandFactory;
        let cmd = Doc::command().name("doc");
        assert_eq!(
            without_help(&cmd),
            ["doc --bare", "doc --pick", "doc --pick=two", "doc said --quiet", "doc unsaid"]
        );
    }
}
