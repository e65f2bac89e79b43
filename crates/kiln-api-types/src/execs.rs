//! Detached commands: commands that keep running with no client attached (`kiln exec -d`),
//! their ids, what the API says about them, and the requests that act on them.
//!
//! Must not: know how output is buffered (that is the engine's). Invariant: an [`ExecId`] is
//! `ex-` and 12 lowercase hex digits, checked on parse, so it can be used in a path as is.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::names::InvalidInput;
use crate::{ExitStatus, SandboxId};

/// Identifier of a detached command: `ex-` and 12 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ExecId(String);

impl ExecId {
    /// A new random id.
    pub fn random() -> ExecId {
        let n: u64 = rand::random::<u64>() & 0xffff_ffff_ffff;
        ExecId(format!("ex-{n:012x}"))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ExecId {
    type Err = InvalidInput;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = s.strip_prefix("ex-").is_some_and(|hex| {
            hex.len() == 12
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
        if ok {
            Ok(ExecId(s.to_owned()))
        } else {
            Err(InvalidInput::Name {
                kind: "exec id",
                value: s.to_owned(),
                rule: "expected `ex-` and 12 lowercase hex digits",
            })
        }
    }
}

impl TryFrom<String> for ExecId {
    type Error = InvalidInput;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<ExecId> for String {
    fn from(id: ExecId) -> String {
        id.0
    }
}

impl fmt::Display for ExecId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a detached command is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExecState {
    /// Still running.
    Running,
    /// It ended; `exit` says how.
    Exited,
    /// Its sandbox died or was removed under it; `error` says why.
    Lost,
}

/// What the API says about one detached command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExecInfo {
    /// Its id (`kiln exec attach`, `kiln exec kill`).
    #[schema(value_type = String, pattern = "^ex-[0-9a-f]{12}$")]
    pub id: ExecId,
    /// The sandbox it runs in.
    pub sandbox: SandboxId,
    /// Program and arguments.
    pub argv: Vec<String>,
    /// When it started, milliseconds since the Unix epoch.
    pub started_unix_ms: u64,
    /// Running, exited or lost.
    pub state: ExecState,
    /// How it ended (once `exited`).
    pub exit: Option<ExitStatus>,
    /// Why it was lost (once `lost`).
    pub error: Option<String>,
    /// Bytes it wrote to stdout so far.
    pub stdout_bytes: u64,
    /// Bytes it wrote to stderr so far.
    pub stderr_bytes: u64,
    /// Oldest output bytes no longer kept (each stream keeps its last 1 MiB).
    pub dropped_bytes: u64,
}

/// `GET /v1/sandboxes/{id}/execs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExecList {
    /// Detached commands of the sandbox, oldest first.
    pub execs: Vec<ExecInfo>,
}

/// `POST /v1/execs/{exec_id}/kill`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecKillRequest {
    /// Signal number delivered to the command's process group (default 15, SIGTERM).
    #[serde(default = "default_signal")]
    pub signal: i32,
}

impl Default for ExecKillRequest {
    fn default() -> Self {
        ExecKillRequest {
            signal: default_signal(),
        }
    }
}

fn default_signal() -> i32 {
    15
}

/// Parses a signal given as a number (`9`) or a name (`KILL`, `SIGKILL`, `term`).
pub fn parse_signal(s: &str) -> Result<i32, InvalidInput> {
    const NAMES: [(&str, i32); 12] = [
        ("HUP", 1),
        ("INT", 2),
        ("QUIT", 3),
        ("KILL", 9),
        ("USR1", 10),
        ("USR2", 12),
        ("PIPE", 13),
        ("ALRM", 14),
        ("TERM", 15),
        ("CONT", 18),
        ("STOP", 19),
        ("WINCH", 28),
    ];
    if let Ok(n) = s.parse::<i32>() {
        return if (1..=64).contains(&n) {
            Ok(n)
        } else {
            Err(InvalidInput::Range {
                field: "signal",
                min: 1,
                max: 64,
                got: n.max(0) as u64,
            })
        };
    }
    let upper = s.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    NAMES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| *v)
        .ok_or_else(|| InvalidInput::Rule(format!("unknown signal {s:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_id_round_trips_and_rejects_tricks() {
        let id = ExecId::random();
        assert_eq!(id.as_str().parse::<ExecId>().unwrap(), id);
        for bad in [
            "",
            "ex-",
            "sb-0123456789ab",
            "ex-0123456789AB",
            "ex-../../etc/x",
        ] {
            assert!(bad.parse::<ExecId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn parse_signal_names_and_numbers() {
        assert_eq!(parse_signal("9").unwrap(), 9);
        assert_eq!(parse_signal("KILL").unwrap(), 9);
        assert_eq!(parse_signal("sigterm").unwrap(), 15);
        assert_eq!(parse_signal("INT").unwrap(), 2);
        assert!(parse_signal("0").is_err());
        assert!(parse_signal("65").is_err());
        assert!(parse_signal("BOGUS").is_err());
    }
}
