//! Validated values of terminal execs (feature [`FEATURE_PTY_V1`]).
//!
//! Owns: [`TtyRequest`] (the optional `tty` of an [`crate::ExecRequest`]), [`TtySize`] and
//! [`TermName`], each checked when parsed so a bad value fails the whole message.
//!
//! Must not: touch a terminal. The agent opens the pty and applies the sizes.
//!
//! ```text
//!  host                                               guest
//!  exec{..., exec:{..., tty:{rows,cols,term}}} ───▶  openpty, TIOCSWINSZ, child: setsid,
//!                                                     TIOCSCTTY, fds 0/1/2 = pty slave
//!  ◀── exec_started{pid}
//!  STDIN(stream) keystrokes (0x03 = Ctrl-C) ───────▶  written to the pty master; the line
//!                                                     discipline signals the foreground group
//!  ◀── STDOUT(stream) everything the pty shows        (never STDERR: the pty merges them)
//!  exec_resize{stream,rows,cols} ──────────────────▶  TIOCSWINSZ on the master (the kernel
//!  ◀── resized                                         sends SIGWINCH to the foreground group)
//!  ◀── exit{stream,status}                            as for any exec
//! ```
//!
//! Invariants: rows and columns are in `1..=`[`MAX_TTY_DIM`]; a [`TermName`] is
//! 1..=[`MAX_TERM_BYTES`] bytes of `[A-Za-z0-9._+-]` (it becomes `TERM` in the child's
//! environment, so it must stay a plain name).

use std::fmt;

use serde::{Deserialize, Serialize};

/// Feature string in [`crate::AgentInfo::features`] of an agent that honours
/// [`crate::ExecRequest::tty`] and serves `exec_resize`. An agent without it ignores the
/// `tty` field (unknown fields are skipped), so a host must check for it first.
pub const FEATURE_PTY_V1: &str = "pty-v1";

/// Largest number of rows or columns of a terminal.
pub const MAX_TTY_DIM: u16 = 1000;

/// Longest `TERM` value, in bytes.
pub const MAX_TERM_BYTES: usize = 64;

/// `TERM` when a [`TtyRequest`] names none.
pub const DEFAULT_TERM: &str = "xterm-256color";

/// Why a terminal value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TtyError {
    /// Rows or columns outside `1..=MAX_TTY_DIM`.
    #[error("terminal size {rows}x{cols} is not within 1..={max} rows and columns")]
    BadSize {
        /// Rows asked for.
        rows: u32,
        /// Columns asked for.
        cols: u32,
        /// The limit.
        max: u16,
    },
    /// A `TERM` value that is empty, too long or not a plain name.
    #[error("terminal type must be 1..={max} characters of [A-Za-z0-9._+-]")]
    BadTerm {
        /// The limit.
        max: usize,
    },
}

/// A terminal size: rows and columns, each in `1..=`[`MAX_TTY_DIM`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawSize", into = "RawSize")]
pub struct TtySize {
    rows: u16,
    cols: u16,
}

#[derive(Serialize, Deserialize)]
struct RawSize {
    rows: u32,
    cols: u32,
}

impl TtySize {
    /// Validates a size (wide integers so a caller can pass what it got without casting).
    pub fn new(rows: u32, cols: u32) -> Result<TtySize, TtyError> {
        let ok = |n: u32| (1..=u32::from(MAX_TTY_DIM)).contains(&n);
        if !ok(rows) || !ok(cols) {
            return Err(TtyError::BadSize {
                rows,
                cols,
                max: MAX_TTY_DIM,
            });
        }
        // Cannot truncate: both are at most MAX_TTY_DIM.
        Ok(TtySize {
            rows: rows as u16,
            cols: cols as u16,
        })
    }

    /// Rows.
    pub fn rows(self) -> u16 {
        self.rows
    }

    /// Columns.
    pub fn cols(self) -> u16 {
        self.cols
    }
}

impl TryFrom<RawSize> for TtySize {
    type Error = TtyError;
    fn try_from(raw: RawSize) -> Result<TtySize, TtyError> {
        TtySize::new(raw.rows, raw.cols)
    }
}

impl From<TtySize> for RawSize {
    fn from(s: TtySize) -> RawSize {
        RawSize {
            rows: u32::from(s.rows),
            cols: u32::from(s.cols),
        }
    }
}

impl fmt::Display for TtySize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.rows, self.cols)
    }
}

/// A `TERM` value: 1..=[`MAX_TERM_BYTES`] bytes of `[A-Za-z0-9._+-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TermName(String);

impl TermName {
    /// Validates `name`.
    pub fn new(name: impl Into<String>) -> Result<TermName, TtyError> {
        let name = name.into();
        let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-');
        if name.is_empty() || name.len() > MAX_TERM_BYTES || !name.chars().all(plain) {
            return Err(TtyError::BadTerm {
                max: MAX_TERM_BYTES,
            });
        }
        Ok(TermName(name))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TermName {
    type Error = TtyError;
    fn try_from(s: String) -> Result<TermName, TtyError> {
        TermName::new(s)
    }
}

impl From<TermName> for String {
    fn from(t: TermName) -> String {
        t.0
    }
}

impl fmt::Display for TermName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Run the exec on a pseudo-terminal of this size and type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TtyRequest {
    /// Initial size.
    #[serde(flatten)]
    pub size: TtySize,
    /// `TERM` in the child's environment (default [`DEFAULT_TERM`]); a `TERM` in the exec's
    /// `env` wins over it.
    #[serde(default)]
    pub term: Option<TermName>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tty_size_bounds_are_inclusive() {
        assert!(TtySize::new(1, 1).is_ok());
        assert!(TtySize::new(1000, 1000).is_ok());
        for (r, c) in [(0, 80), (24, 0), (1001, 80), (24, 100_000), (u32::MAX, 1)] {
            assert!(TtySize::new(r, c).is_err(), "{r}x{c}");
        }
    }

    #[test]
    fn term_name_refuses_non_plain_names() {
        assert!(TermName::new("xterm-256color").is_ok());
        assert!(TermName::new("screen.xterm+x_y").is_ok());
        for bad in ["", "xterm\n", "a b", "x;rm", "é", &"x".repeat(65)] {
            assert!(TermName::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tty_request_json_is_flat_and_validated() {
        let req = TtyRequest {
            size: TtySize::new(24, 80).expect("valid"),
            term: Some(TermName::new("xterm").expect("valid")),
        };
        let json = serde_json::to_string(&req).expect("serialises");
        assert_eq!(json, r#"{"rows":24,"cols":80,"term":"xterm"}"#);
        let back: TtyRequest = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, req);
        let no_term: TtyRequest = serde_json::from_str(r#"{"rows":2,"cols":3}"#).expect("parses");
        assert_eq!(no_term.term, None);
        for bad in [
            r#"{"rows":0,"cols":80}"#,
            r#"{"rows":24,"cols":100000}"#,
            r#"{"rows":-1,"cols":80}"#,
            r#"{"rows":24,"cols":80,"term":"a\nb"}"#,
            r#"{"cols":80}"#,
        ] {
            assert!(serde_json::from_str::<TtyRequest>(bad).is_err(), "{bad}");
        }
    }
}
