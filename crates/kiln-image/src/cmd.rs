//! Running host tools (apt-cache, apt-get, dpkg-deb, mmdebstrap, mkfs.ext4, xz, zstd).
//!
//! Owns: spawning a command, streaming its merged stdout+stderr line by line to a callback on
//! the *calling* thread (so callbacks need not be `Send`), and turning a failure into an
//! [`ImageError`] that names the command, its exit status and the tail of its output.
//! Invariant: no command is run through a shell; arguments are passed verbatim.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};

use crate::error::ImageError;

/// How many trailing output lines an error keeps.
const TAIL_LINES: usize = 20;

/// Renders a command line for messages: program and arguments, quoting those with spaces.
pub(crate) fn display(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    for arg in cmd.get_args() {
        let arg = arg.to_string_lossy();
        if arg.is_empty() || arg.contains(char::is_whitespace) {
            parts.push(format!("'{arg}'"));
        } else {
            parts.push(arg.into_owned());
        }
    }
    parts.join(" ")
}

/// Runs `cmd` to completion with stdin closed, calling `on_line` for every line it prints on
/// stdout or stderr (merged, in the order the child wrote them).
///
/// Returns an error naming the command, its status and its last lines if it exits non-zero.
pub(crate) fn run_streaming(
    mut cmd: Command,
    on_line: &mut dyn FnMut(&str),
) -> Result<(), ImageError> {
    let command = display(&cmd);
    let spawn_err = |source| ImageError::Spawn {
        command: command.clone(),
        source,
    };
    let (reader, writer) = std::io::pipe().map_err(spawn_err)?;
    let writer2 = writer.try_clone().map_err(spawn_err)?;
    cmd.stdin(Stdio::null()).stdout(writer).stderr(writer2);
    let mut child = cmd.spawn().map_err(spawn_err)?;
    // The Command holds our copies of the pipe's write end: drop them so EOF arrives when the
    // child (and any grandchild that inherited the pipe) exits.
    drop(cmd);

    let mut tail: VecDeque<String> = VecDeque::with_capacity(TAIL_LINES);
    let mut buf = BufReader::new(reader);
    let mut raw = Vec::new();
    loop {
        raw.clear();
        match buf.read_until(b'\n', &mut raw) {
            Ok(0) => break,
            Ok(_) => {
                let line = String::from_utf8_lossy(&raw);
                let line = line.trim_end_matches(['\n', '\r']);
                on_line(line);
                if tail.len() == TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line.to_owned());
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    let status = child.wait().map_err(spawn_err)?;
    if status.success() {
        Ok(())
    } else {
        Err(ImageError::CommandFailed {
            command,
            status: status.to_string(),
            output_tail: Vec::from(tail).join("\n"),
        })
    }
}

/// Runs `cmd` and returns its stdout; on failure the error carries the tail of stderr.
pub(crate) fn run_capture(cmd: &mut Command) -> Result<Vec<u8>, ImageError> {
    let command = display(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| ImageError::Spawn {
            command: command.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(ImageError::CommandFailed {
            command,
            status: out.status.to_string(),
            output_tail: tail_of(&out.stderr),
        })
    }
}

/// Runs `cmd` with its stdout copied into `sink` (e.g. a decompressor writing a file).
pub(crate) fn run_to_writer(
    cmd: &mut Command,
    sink: &mut dyn std::io::Write,
) -> Result<(), ImageError> {
    let command = display(cmd);
    let spawn_err = |source| ImageError::Spawn {
        command: command.clone(),
        source,
    };
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    let copied = match child.stdout.take() {
        Some(mut out) => std::io::copy(&mut out, sink).map(|_| ()),
        None => Ok(()),
    };
    let mut stderr = Vec::new();
    if let Some(mut err) = child.stderr.take() {
        // Best effort: the stderr tail is only context for an error message.
        let _ = err.read_to_end(&mut stderr);
    }
    let status = child.wait().map_err(spawn_err)?;
    if !status.success() {
        return Err(ImageError::CommandFailed {
            command,
            status: status.to_string(),
            output_tail: tail_of(&stderr),
        });
    }
    copied.map_err(|source| ImageError::Io {
        action: "write the output of",
        path: command.into(),
        source,
    })
}

/// The last [`TAIL_LINES`] lines of `bytes`, lossily decoded.
fn tail_of(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(TAIL_LINES);
    lines[start..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_streaming_failure_reports_status_and_tail() {
        let mut lines = Vec::new();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo out; echo err >&2; exit 3"]);
        let err =
            run_streaming(cmd, &mut |l| lines.push(l.to_owned())).expect_err("exit 3 must fail");
        assert_eq!(lines.len(), 2, "{lines:?}");
        match err {
            ImageError::CommandFailed {
                command,
                status,
                output_tail,
            } => {
                assert!(command.starts_with("sh -c"), "{command}");
                assert!(status.contains('3'), "{status}");
                assert!(output_tail.contains("err"), "{output_tail}");
            }
            other => panic!("unexpected error {other:?}"),
        }
    }

    #[test]
    fn run_capture_missing_program_is_spawn_error() {
        let err =
            run_capture(&mut Command::new("/nonexistent/kiln-tool")).expect_err("missing program");
        assert!(matches!(err, ImageError::Spawn { .. }), "{err:?}");
    }

    #[test]
    fn display_quotes_arguments_with_spaces() {
        let mut cmd = Command::new("mmdebstrap");
        cmd.args(["bookworm", "deb http://x bookworm main"]);
        assert_eq!(
            display(&cmd),
            "mmdebstrap bookworm 'deb http://x bookworm main'"
        );
    }
}
