//! `kiln exec attach|ls|kill` and `kiln logs`: detached commands and the guest console.

use clap::Subcommand;
use kiln_api_types::{ExecId, ExecKillRequest, ExecState};
use kiln_client::Client;

/// Subcommands of `kiln exec` for detached commands (`kiln exec -d`).
#[derive(Debug, Subcommand)]
pub enum ExecCmd {
    /// Replay a detached command's kept output and follow it to its end (Ctrl-C detaches);
    /// exits with the command's code.
    Attach {
        /// The exec id `kiln exec -d` printed.
        exec_id: String,
    },
    /// List a sandbox's detached commands.
    Ls {
        /// Sandbox id, name or unambiguous id prefix.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Send a signal to a detached command's process group.
    Kill {
        /// The exec id.
        exec_id: String,
        /// Signal name or number (default TERM).
        #[arg(long, short = 's', default_value = "TERM")]
        signal: String,
        /// Print the command as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn exec_id(raw: &str) -> anyhow::Result<ExecId> {
    raw.parse().map_err(|e| anyhow::anyhow!("{e}"))
}

/// Runs one `kiln exec` subcommand.
pub async fn run(client: &Client, cmd: &ExecCmd) -> anyhow::Result<i32> {
    match cmd {
        ExecCmd::Attach { exec_id: raw } => {
            let id = exec_id(raw)?;
            // A wrong id is reported plainly before the WebSocket opens.
            client.exec_get(&id).await?;
            let ws = client.exec_attach(&id).await?;
            let io = crate::run::StreamIo {
                forward_stdin: false,
                tty: false,
            };
            crate::run::stream_exec(client, ws, None, io, crate::run::Stream::Attach).await
        }
        ExecCmd::Ls { id, json } => {
            let id = crate::ps::resolve(client, id).await?;
            let list = client.exec_list(&id).await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(0);
            }
            println!(
                "{:<16} {:<8} {:>6} {:>10}  COMMAND",
                "EXEC ID", "STATE", "EXIT", "OUTPUT"
            );
            for e in &list.execs {
                let state = match e.state {
                    ExecState::Running => "running",
                    ExecState::Exited => "exited",
                    ExecState::Lost => "lost",
                };
                let exit = e
                    .exit
                    .map(|s| s.shell_code().to_string())
                    .unwrap_or_else(|| "-".into());
                println!(
                    "{:<16} {:<8} {:>6} {:>10}  {}",
                    e.id,
                    state,
                    exit,
                    e.stdout_bytes + e.stderr_bytes,
                    e.argv.join(" ")
                );
            }
            Ok(0)
        }
        ExecCmd::Kill {
            exec_id: raw,
            signal,
            json,
        } => {
            let id = exec_id(raw)?;
            let signal = kiln_api_types::parse_signal(signal)?;
            let info = client.exec_kill(&id, &ExecKillRequest { signal }).await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            }
            Ok(0)
        }
    }
}

/// `kiln logs ID [-f]`: the guest console.
pub async fn logs(client: &Client, key: &str, follow: bool) -> anyhow::Result<i32> {
    use std::io::Write;
    let id = crate::ps::resolve(client, key).await?;
    let mut out = std::io::stdout();
    client
        .sandbox_logs(&id, follow, |chunk| -> std::io::Result<bool> {
            out.write_all(chunk)?;
            out.flush()?;
            Ok(true)
        })
        .await?;
    Ok(0)
}
