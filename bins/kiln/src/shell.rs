//! `kiln shell ID`: an interactive login shell in a running sandbox.
//!
//! Owns: the shell's command line. It is `kiln exec -it ID -- bash -l` when the guest has
//! bash and `sh -l` otherwise; the choice is made inside the guest by one `sh -c` that
//! `exec`s the shell it finds, so it costs no extra round trip and the shell is the exec's
//! process (its exit code is kiln's).
//!
//! Must not: differ from `kiln exec -it` in anything but the command (raw mode, resize and
//! Ctrl-C are `stream_exec`'s).

use clap::Args;
use kiln_api_types::{ExecRequest, ExecTty};
use kiln_client::Client;

/// What the guest runs: bash as a login shell if present, else sh.
pub const SHELL_SCRIPT: &str =
    "if command -v bash >/dev/null 2>&1; then exec bash -l; else exec sh -l; fi";

/// Options of `kiln shell`.
#[derive(Debug, Args)]
pub struct ShellArgs {
    /// Sandbox id, name or unambiguous id prefix.
    pub id: String,
    /// Working directory in the guest.
    #[arg(long)]
    pub workdir: Option<String>,
    /// Run the shell as this guest user: NAME, UID, NAME:GROUP or UID:GID (default root).
    #[arg(short = 'u', long, value_name = "USER")]
    pub user: Option<String>,
    /// Environment variable for the shell (repeatable).
    #[arg(long = "env", value_name = "K=V")]
    pub env: Vec<String>,
}

/// The exec request of a shell on a `rows` × `cols` terminal.
pub fn request(a: &ShellArgs, rows: u16, cols: u16) -> anyhow::Result<ExecRequest> {
    let mut req = ExecRequest::new(vec!["sh".into(), "-c".into(), SHELL_SCRIPT.into()]);
    for kv in &a.env {
        let Some((k, v)) = kv.split_once('=') else {
            anyhow::bail!("--env {kv:?}: expected NAME=VALUE");
        };
        req.env.insert(k.to_owned(), v.to_owned());
    }
    req.cwd = a.workdir.clone();
    req.user = a.user.clone();
    req.stdin = true;
    req.tty = Some(ExecTty {
        rows,
        cols,
        term: crate::term::term_name(),
    });
    req.validate().map_err(anyhow::Error::msg)?;
    Ok(req)
}

/// Runs `kiln shell`; returns the shell's exit code.
pub async fn run(client: &Client, a: &ShellArgs) -> anyhow::Result<i32> {
    let (rows, cols) = crate::term::stdin_size()?;
    let req = request(a, rows, cols)?;
    let id = crate::ps::resolve(client, &a.id).await?;
    let ws = client.sandbox_exec(&id).await?;
    let io = crate::run::StreamIo {
        forward_stdin: true,
        tty: true,
    };
    crate::run::stream_exec(
        client,
        ws,
        Some(serde_json::to_string(&req)?),
        io,
        crate::run::Stream::Exec,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_request_has_a_tty_and_stdin() {
        let a = ShellArgs {
            id: "x".into(),
            workdir: Some("/tmp".into()),
            user: Some("nobody".into()),
            env: vec!["A=1".into()],
        };
        let req = request(&a, 40, 100).expect("valid");
        assert!(req.stdin);
        let tty = req.tty.expect("a tty");
        assert_eq!((tty.rows, tty.cols), (40, 100));
        assert_eq!(req.argv[0], "sh");
        assert!(req.argv[2].contains("exec bash -l"));
        assert!(req.argv[2].contains("exec sh -l"));
        assert_eq!(req.cwd.as_deref(), Some("/tmp"));
        assert_eq!(req.user.as_deref(), Some("nobody"));
        let bad = ShellArgs {
            env: vec!["NOEQ".into()],
            ..a
        };
        assert!(request(&bad, 40, 100).is_err());
    }
}
