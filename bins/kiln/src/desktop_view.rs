//! `kiln desktop view ID [--control] [--json] [--open]`: a link to watch (or control) a
//! desktop sandbox's screen in a browser.
//!
//! The daemon mints the link (`POST /v1/sandboxes/{id}/desktop/view`); this prints it, and
//! with `--open` hands it to `xdg-open`. The link is a capability valid until its sandbox is
//! removed or its TTL (24 h by default) passes: whoever has it can watch, or with `--control`
//! type and click. Must not: talk to the viewer listener itself.

use clap::Args;
use kiln_api_types::{DesktopViewRequest, DesktopViewResponse};
use kiln_client::Client;

/// `kiln desktop view`'s arguments.
#[derive(Debug, Args)]
pub struct ViewArgs {
    /// Sandbox id, name or unambiguous id prefix.
    pub id: String,
    /// Let the viewer use the keyboard and mouse (default: view only).
    #[arg(long)]
    pub control: bool,
    /// Print the link as JSON (`url`, `control`, `expires_at_unix_ms`).
    #[arg(long)]
    pub json: bool,
    /// Also open the link in the desktop's browser (`xdg-open`).
    #[arg(long)]
    pub open: bool,
}

/// Mints a link for `args.id` and prints it (opening it with `--open`); exit code 0.
pub async fn view(client: &Client, args: &ViewArgs) -> anyhow::Result<i32> {
    let id = crate::ps::resolve(client, &args.id).await?;
    let link = client
        .desktop_view(
            &id,
            &DesktopViewRequest {
                control: args.control,
            },
        )
        .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&link)?);
    } else {
        println!("{}", link.url);
        eprintln!("{}", describe(&link));
    }
    if args.open {
        open(&link.url);
    }
    Ok(0)
}

/// The line under the URL: what the link allows and until when.
fn describe(link: &DesktopViewResponse) -> String {
    let what = if link.control {
        "control (keyboard and mouse reach the guest)"
    } else {
        "view only"
    };
    let left_secs = link.expires_at_unix_ms.saturating_sub(now_ms()) / 1000;
    format!(
        "{what}; valid for {}h{:02}m or until the sandbox is removed; anyone with the link can use it",
        left_secs / 3600,
        (left_secs % 3600) / 60
    )
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Opens `url` with `xdg-open` when there is one; says so when there is not.
fn open(url: &str) {
    match std::process::Command::new("xdg-open")
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    {
        Ok(_) => {}
        Err(e) => eprintln!("kiln: cannot run xdg-open ({e}); open the link above yourself"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_says_control_and_time_left() {
        let link = DesktopViewResponse {
            url: "http://127.0.0.1:1/view/x/vnc.html".into(),
            control: true,
            expires_at_unix_ms: now_ms() + 2 * 3600 * 1000 + 90_000,
        };
        let text = describe(&link);
        assert!(text.starts_with("control"), "{text}");
        assert!(text.contains("2h01m"), "{text}");
        let view = DesktopViewResponse {
            control: false,
            expires_at_unix_ms: 0,
            ..link
        };
        let text = describe(&view);
        assert!(
            text.starts_with("view only") && text.contains("0h00m"),
            "{text}"
        );
    }
}
