//! The host terminal for `kiln exec -t`, `kiln run -t` and `kiln shell`: raw mode and size.
//!
//! Owns: [`RawMode`] (a guard that puts kiln's stdin terminal in raw mode and restores the
//! saved settings when dropped) and [`stdin_size`].
//!
//! Must not: write to the terminal, or leave it in raw mode on any exit path. The guard
//! restores on drop, which covers returns, `?` errors and panics (unwinding); the only other
//! ways out are signals, and `stream_exec` turns SIGTERM and SIGHUP into returns while a
//! guard is alive (the keyboard's SIGINT/SIGQUIT/SIGTSTP do not exist in raw mode: those
//! keys travel to the guest as bytes).
//!
//! Why rustix: its `termios` module wraps `tcgetattr`/`tcsetattr`/`TIOCGWINSZ` safely, so
//! this binary stays free of `unsafe`; the workspace already depends on it (kiln-vmm,
//! kiln-image), and `nix` would be a second crate for the same syscalls.

use std::io::IsTerminal;

use anyhow::{Context, bail};
use rustix::termios::{self, OptionalActions, Termios};

/// Size used when the terminal reports 0 rows or columns (a terminal that never set one).
const FALLBACK_SIZE: (u16, u16) = (24, 80);

/// kiln's stdin terminal in raw mode while this lives; the saved settings come back on drop.
pub struct RawMode {
    saved: Termios,
}

impl RawMode {
    /// Saves stdin's terminal settings and switches it to raw mode (no echo, no line
    /// buffering, no signals from keys, bytes passed through as typed).
    pub fn enter() -> anyhow::Result<RawMode> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(&stdin).context("reading the terminal's settings")?;
        let mut raw = saved.clone();
        raw.make_raw();
        termios::tcsetattr(&stdin, OptionalActions::Now, &raw)
            .context("switching the terminal to raw mode")?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // `Drain`: output already written (the command's last lines) is shown in raw mode,
        // as it was produced, before the settings change back.
        let _ = termios::tcsetattr(std::io::stdin(), OptionalActions::Drain, &self.saved);
    }
}

/// Rows and columns of kiln's stdin terminal, clamped to what the API accepts; an error
/// naming the problem when stdin is not a terminal.
pub fn stdin_size() -> anyhow::Result<(u16, u16)> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        bail!(
            "-t/--tty needs a terminal on stdin, and stdin is not one (drop -t to pipe input \
             to the command)"
        );
    }
    let ws = termios::tcgetwinsize(&stdin).context("reading the terminal's size")?;
    Ok(clamp_size(ws.ws_row, ws.ws_col))
}

/// A reported size made acceptable: 0 (unset) becomes the fallback, more than the API's
/// maximum becomes the maximum.
pub fn clamp_size(rows: u16, cols: u16) -> (u16, u16) {
    let max = kiln_api_types::MAX_TTY_DIM;
    let pick = |n: u16, fallback: u16| if n == 0 { fallback } else { n.min(max) };
    (pick(rows, FALLBACK_SIZE.0), pick(cols, FALLBACK_SIZE.1))
}

/// `TERM` of kiln's environment if the API accepts it (else the guest's default applies).
pub fn term_name() -> Option<String> {
    let term = std::env::var("TERM").ok()?;
    let tty = kiln_api_types::ExecTty {
        rows: 1,
        cols: 1,
        term: Some(term.clone()),
    };
    tty.validate().ok().map(|()| term)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clamp_size_replaces_zero_and_caps_large() {
        assert_eq!(clamp_size(0, 0), (24, 80));
        assert_eq!(clamp_size(50, 0), (50, 80));
        assert_eq!(clamp_size(5000, 132), (1000, 132));
        assert_eq!(clamp_size(40, 100), (40, 100));
    }
}
