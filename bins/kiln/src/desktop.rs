//! `kiln desktop ...`: drive a desktop sandbox — screenshots, one action as JSON (`act`) or
//! its short forms (`click`, `move`, `drag`, `scroll`, `type`, `key`, `wait`) — and
//! `kiln review export`: its review bundle. Every form goes through the one actions route, so
//! the CLI and an agent speaking the API do exactly the same.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};
use base64::Engine as _;
use clap::{Args, Subcommand};
use kiln_api_types::{
    ActionQuery, ActionReceipt, DesktopAction, MouseButton, Point, ReviewExportRequest,
};
use kiln_client::Client;

use crate::ps::resolve;

/// `kiln desktop ...`.
#[derive(Debug, Subcommand)]
pub enum DesktopCmd {
    /// Save a PNG of the screen (`-o -` writes it to stdout).
    Screenshot {
        /// Sandbox id or name.
        id: String,
        /// Where to write the PNG [default: screenshot-ID.png].
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Scale to this width in pixels.
        #[arg(long)]
        width: Option<u32>,
    },
    /// Do one action given as JSON, e.g. '{"kind":"mouse_click","x":100,"y":200}'.
    Act {
        /// Sandbox id or name.
        id: String,
        /// The action.
        action: String,
        #[command(flatten)]
        opts: ActOpts,
    },
    /// Click at X Y.
    Click {
        /// Sandbox id or name.
        id: String,
        /// Column.
        x: u32,
        /// Row.
        y: u32,
        /// left, middle or right.
        #[arg(long, default_value = "left")]
        button: String,
        /// Clicks (2: double click).
        #[arg(long, default_value_t = 1)]
        count: u32,
        #[command(flatten)]
        opts: ActOpts,
    },
    /// Move the pointer to X Y.
    Move {
        /// Sandbox id or name.
        id: String,
        /// Column.
        x: u32,
        /// Row.
        y: u32,
        #[command(flatten)]
        opts: ActOpts,
    },
    /// Drag from X1 Y1 to X2 Y2.
    Drag {
        /// Sandbox id or name.
        id: String,
        /// Start column.
        x1: u32,
        /// Start row.
        y1: u32,
        /// End column.
        x2: u32,
        /// End row.
        y2: u32,
        #[command(flatten)]
        opts: ActOpts,
    },
    /// Turn the wheel: --dy steps down (negative: up), --dx steps right.
    Scroll {
        /// Sandbox id or name.
        id: String,
        /// Steps down.
        #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
        dy: i32,
        /// Steps right.
        #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
        dx: i32,
        #[command(flatten)]
        opts: ActOpts,
    },
    /// Type text (any Unicode).
    Type {
        /// Sandbox id or name.
        id: String,
        /// The text.
        text: String,
        #[command(flatten)]
        opts: ActOpts,
    },
    /// Press a key or combination, e.g. Return, ctrl+l, ctrl+shift+t.
    Key {
        /// Sandbox id or name.
        id: String,
        /// The keys.
        keys: String,
        #[command(flatten)]
        opts: ActOpts,
    },
    /// Print a link that opens the screen in a browser (view only unless --control).
    View(crate::desktop_view::ViewArgs),
}

/// What every action form takes.
#[derive(Debug, Args)]
pub struct ActOpts {
    /// Wait for the screen to settle and save a screenshot of it here.
    #[arg(long, value_name = "FILE")]
    screenshot: Option<PathBuf>,
    /// Longest wait for the screen to settle, ms [default: 3000].
    #[arg(long)]
    settle_ms: Option<u64>,
    /// Print the receipt as JSON.
    #[arg(long)]
    json: bool,
}

/// `kiln review ...`.
#[derive(Debug, Subcommand)]
pub enum ReviewCmd {
    /// Write a desktop's review bundle (timeline, screenshots, index.html); it survives
    /// `kiln rm`.
    Export {
        /// Sandbox id or name (a removed sandbox: its full id).
        id: String,
        /// Directory to write it into (must not exist, or be empty) [default: a new
        /// directory in kiln's exports].
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn button(name: &str) -> anyhow::Result<MouseButton> {
    match name {
        "left" => Ok(MouseButton::Left),
        "middle" => Ok(MouseButton::Middle),
        "right" => Ok(MouseButton::Right),
        other => bail!("--button {other:?}: expected left, middle or right"),
    }
}

/// Runs a `kiln desktop` subcommand.
pub async fn run(client: &Client, cmd: &DesktopCmd) -> anyhow::Result<i32> {
    let (id, action, opts) = match cmd {
        DesktopCmd::View(args) => return crate::desktop_view::view(client, args).await,
        DesktopCmd::Screenshot { id, output, width } => {
            let sid = resolve(client, id).await?;
            let png = client.desktop_screenshot(&sid, *width).await?;
            let path = output
                .clone()
                .unwrap_or_else(|| PathBuf::from(format!("screenshot-{sid}.png")));
            if path.as_os_str() == "-" {
                std::io::stdout().write_all(&png)?;
            } else {
                std::fs::write(&path, &png)
                    .with_context(|| format!("writing {}", path.display()))?;
                eprintln!("{} ({} bytes)", path.display(), png.len());
            }
            return Ok(0);
        }
        DesktopCmd::Act { id, action, opts } => {
            let action: DesktopAction = serde_json::from_str(action)
                .map_err(|e| anyhow::anyhow!("the action is not valid: {e}"))?;
            (id, action, opts)
        }
        DesktopCmd::Click {
            id,
            x,
            y,
            button: b,
            count,
            opts,
        } => (
            id,
            DesktopAction::MouseClick {
                x: Some(*x),
                y: Some(*y),
                button: button(b)?,
                count: *count,
            },
            opts,
        ),
        DesktopCmd::Move { id, x, y, opts } => {
            (id, DesktopAction::MouseMove { x: *x, y: *y }, opts)
        }
        DesktopCmd::Drag {
            id,
            x1,
            y1,
            x2,
            y2,
            opts,
        } => (
            id,
            DesktopAction::MouseDrag {
                from: Point { x: *x1, y: *y1 },
                to: Point { x: *x2, y: *y2 },
                button: MouseButton::Left,
            },
            opts,
        ),
        DesktopCmd::Scroll { id, dy, dx, opts } => (
            id,
            DesktopAction::Scroll {
                x: None,
                y: None,
                dx: *dx,
                dy: *dy,
            },
            opts,
        ),
        DesktopCmd::Type { id, text, opts } => (
            id,
            DesktopAction::TypeText {
                text: Some(text.clone()),
                secret: None,
            },
            opts,
        ),
        DesktopCmd::Key { id, keys, opts } => {
            (id, DesktopAction::KeyPress { keys: keys.clone() }, opts)
        }
    };
    let sid = resolve(client, id).await?;
    let q = ActionQuery {
        screenshot: opts.screenshot.is_some(),
        width: None,
        settle_ms: opts.settle_ms,
    };
    let receipt = client.desktop_act(&sid, &action, &q).await?;
    if let (Some(path), Some(shot)) = (&opts.screenshot, &receipt.screenshot) {
        let png = base64::engine::general_purpose::STANDARD
            .decode(&shot.png_base64)
            .context("the receipt's screenshot is not base64")?;
        std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))?;
    }
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&receipt)?);
    } else {
        println!("{}", summary(&receipt));
    }
    Ok(0)
}

/// One line of what a receipt says.
fn summary(r: &ActionReceipt) -> String {
    let mut s = format!("{} ({:.1} ms of input", r.done, r.input_ms);
    if r.typed_in_guest > 0 {
        s.push_str(&format!(
            ", {} characters typed by the guest",
            r.typed_in_guest
        ));
    }
    if let Some(settle) = &r.settle {
        if !settle.changed {
            s.push_str("; the screen did not change");
        } else if settle.settled {
            s.push_str(&format!("; settled after {} ms", settle.after_ms));
        } else {
            s.push_str(&format!("; still changing after {} ms", settle.after_ms));
        }
    }
    s.push(')');
    s
}

/// Runs a `kiln review` subcommand.
pub async fn review(client: &Client, cmd: &ReviewCmd) -> anyhow::Result<i32> {
    match cmd {
        ReviewCmd::Export { id, output, json } => {
            // A removed sandbox cannot be resolved: its full id is used as given.
            let sid = match resolve(client, id).await {
                Ok(sid) => sid,
                Err(e) => id.parse().map_err(|_| e)?,
            };
            let dest = match output {
                Some(p) => Some(
                    std::path::absolute(p)
                        .with_context(|| format!("--output {}", p.display()))?
                        .display()
                        .to_string(),
                ),
                None => None,
            };
            let export = client
                .review_export(&sid, &ReviewExportRequest { dest })
                .await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&export)?);
            } else {
                println!(
                    "{}/index.html ({} events, {} screenshots, {} bytes)",
                    export.path, export.events, export.screenshots, export.bytes
                );
            }
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_says_what_was_done_and_how_it_settled() {
        let r = ActionReceipt {
            action_id: "a-1".into(),
            kind: "mouse_click".into(),
            done: "clicked left at (1, 2)".into(),
            started_unix_ms: 0,
            input_ms: 3.25,
            events: 4,
            typed_in_guest: 0,
            settle: Some(kiln_api_types::Settle {
                settled: true,
                changed: true,
                after_ms: 420,
                frames: 9,
            }),
            screenshot: None,
        };
        assert_eq!(
            summary(&r),
            "clicked left at (1, 2) (3.2 ms of input; settled after 420 ms)"
        );
        assert!(button("up").is_err());
    }
}
