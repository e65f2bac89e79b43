//! `kiln completion bash|zsh|fish`: prints a shell completion script generated from the
//! CLI's own definition (so it cannot drift from the real options).

use clap::{CommandFactory, ValueEnum};

/// Shells completion scripts are printed for.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Shell {
    /// bash (source it, or put it in /etc/bash_completion.d/kiln).
    Bash,
    /// zsh (put it as `_kiln` in a directory of `$fpath`).
    Zsh,
    /// fish (put it in ~/.config/fish/completions/kiln.fish).
    Fish,
}

/// Writes the completion script for `shell` to `out`.
pub fn write(shell: Shell, out: &mut dyn std::io::Write) {
    let shell = match shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(shell, &mut crate::Cli::command(), "kiln", out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_scripts_name_subcommands() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut out = Vec::new();
            write(shell, &mut out);
            let text = String::from_utf8(out).unwrap();
            for sub in ["run", "snapshot", "token", "completion"] {
                assert!(text.contains(sub), "{shell:?} script lacks {sub}");
            }
        }
    }
}
