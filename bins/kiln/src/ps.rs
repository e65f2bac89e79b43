//! `kiln ps`, `kiln inspect`, `kiln rm`, `kiln pause`/`resume`, `kiln ttl` and
//! `kiln events`: find, describe, change and destroy sandboxes.
//!
//! Wherever a sandbox is named, its id, its name or an unambiguous id prefix works; the
//! daemon resolves it ([`resolve`]).

use anyhow::bail;
use kiln_api_types::{SandboxFilter, SandboxId, SandboxInfo, SandboxList};
use kiln_client::Client;

/// The id of the sandbox `key` names (id, name or unambiguous id prefix), asked of the daemon.
pub async fn resolve(client: &Client, key: &str) -> anyhow::Result<SandboxId> {
    Ok(client.sandbox_find(path_key(key)?).await?.id)
}

/// `key` as one path segment: ids, names and prefixes only ever use these characters, so
/// anything else is refused here rather than reaching the URL.
fn path_key(key: &str) -> anyhow::Result<&str> {
    if key.is_empty()
        || key.len() > 128
        || !key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        bail!("invalid sandbox id or name {key:?}");
    }
    Ok(key)
}

/// The sandboxes passing `filters` (checked here first, so a typo fails fast).
async fn list(client: &Client, filters: &[String]) -> anyhow::Result<Vec<SandboxInfo>> {
    let mut check = SandboxFilter::default();
    let mut query = Vec::with_capacity(filters.len());
    for f in filters {
        check.add(f).map_err(|e| anyhow::anyhow!("--filter: {e}"))?;
        query.push(f.split_once('=').unwrap_or((f, "")));
    }
    Ok(client.sandbox_list(&query).await?.sandboxes)
}

/// `kiln ps [--filter C]... [--json]`.
pub async fn ps(client: &Client, filters: &[String], json: bool) -> anyhow::Result<i32> {
    let sandboxes = list(client, filters).await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&SandboxList { sandboxes })?
        );
        return Ok(0);
    }
    println!(
        "{:<16} {:<12} {:<8} {:<8} {:>4} {:>7} {:<4} {:>8}  CREATED",
        "ID", "NAME", "IMAGE", "STATE", "CPUS", "MEM", "ACC", "BOOT"
    );
    for s in &sandboxes {
        let st = &s.status;
        println!(
            "{:<16} {:<12} {:<8} {:<8} {:>4} {:>7} {:<4} {:>8}  {}",
            s.id,
            s.spec.name.as_ref().map_or("-", |n| n.as_str()),
            st.image,
            st.state.as_str(),
            st.cpus,
            format!("{}M", st.memory_mib),
            st.accel,
            st.boot_ms
                .map(|m| format!("{m}ms"))
                .unwrap_or_else(|| "-".into()),
            ago(st.created_unix)
        );
        if let Some(err) = &st.error {
            println!("    error: {}", err.lines().next().unwrap_or(""));
        }
    }
    Ok(0)
}

/// `kiln inspect ID...`: the sandboxes as JSON (an array, like `docker inspect`).
pub async fn inspect(client: &Client, keys: &[String]) -> anyhow::Result<i32> {
    let mut out = Vec::new();
    for key in keys {
        out.push(client.sandbox_find(path_key(key)?).await?);
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(0)
}

/// `kiln rm ID... | --all [--filter C]...`: every sandbox is tried; the exit code is
/// non-zero if any failed.
pub async fn rm(
    client: &Client,
    keys: &[String],
    all: bool,
    filters: &[String],
    json: bool,
) -> anyhow::Result<i32> {
    let targets: Vec<String> = if all {
        if !keys.is_empty() {
            bail!("give either sandbox ids or --all, not both");
        }
        list(client, filters)
            .await?
            .into_iter()
            .map(|s| s.id.to_string())
            .collect()
    } else {
        if !filters.is_empty() {
            bail!("--filter selects sandboxes for --all; add --all");
        }
        if keys.is_empty() {
            bail!("give sandbox ids (or --all)");
        }
        keys.to_vec()
    };
    let mut code = 0;
    let mut removed = Vec::new();
    for raw in &targets {
        let res = async {
            let id = resolve(client, raw).await?;
            client.sandbox_delete(&id).await?;
            Ok::<_, anyhow::Error>(id)
        }
        .await;
        match res {
            Ok(id) => {
                if !json {
                    println!("{raw}");
                }
                removed.push(id);
            }
            Err(e) => {
                eprintln!("kiln: rm {raw}: {e:#}");
                code = 1;
            }
        }
    }
    if json {
        println!("{}", serde_json::json!({ "removed": removed }));
    }
    Ok(code)
}

/// `kiln pause ID` / `kiln resume ID`.
pub async fn pause_resume(
    client: &Client,
    key: &str,
    pause: bool,
    json: bool,
) -> anyhow::Result<i32> {
    let id = resolve(client, key).await?;
    let info = if pause {
        client.sandbox_pause(&id).await?
    } else {
        client.sandbox_resume(&id).await?
    };
    print_info(&info, json)
}

/// `kiln stop ID`: saved, VM stopped.
pub async fn stop(client: &Client, key: &str, json: bool) -> anyhow::Result<i32> {
    let id = resolve(client, key).await?;
    let info = client.sandbox_stop(&id).await?;
    print_info(&info, json)
}

/// `kiln start ID [--secret ...]`: back from its save.
pub async fn start(
    client: &Client,
    key: &str,
    secrets: &[String],
    json: bool,
) -> anyhow::Result<i32> {
    let id = resolve(client, key).await?;
    let req = kiln_api_types::SandboxStartRequest {
        secrets: crate::run::parse_secrets(secrets)?,
    };
    let info = client.sandbox_start(&id, &req).await?;
    print_info(&info, json)
}

/// `kiln ttl ID DURATION`: the sandbox now lives DURATION from now.
pub async fn ttl(client: &Client, key: &str, duration: &str, json: bool) -> anyhow::Result<i32> {
    let ttl_secs = kiln_api_types::parse_duration_secs(duration)?;
    let id = resolve(client, key).await?;
    let info = client
        .sandbox_ttl_set(&id, &kiln_api_types::TtlRequest { ttl_secs })
        .await?;
    print_info(&info, json)
}

fn print_info(info: &SandboxInfo, json: bool) -> anyhow::Result<i32> {
    if json {
        println!("{}", serde_json::to_string_pretty(info)?);
    } else {
        println!("{}", info.id);
    }
    Ok(0)
}

/// `kiln events [--json]`: follows the daemon's event stream until interrupted.
pub async fn events(client: &Client, json: bool) -> anyhow::Result<i32> {
    client
        .event_stream(
            || eprintln!("kiln: following events"),
            |ev| -> Result<bool, serde_json::Error> {
                if json {
                    println!("{}", serde_json::to_string(&ev)?);
                } else {
                    println!("{}", describe_event(&ev));
                }
                Ok(true)
            },
            |missed| eprintln!("kiln: {missed} events were missed (this client fell behind)"),
        )
        .await?;
    Ok(0)
}

/// One human-readable line per event.
fn describe_event(ev: &kiln_api_types::Event) -> String {
    use kiln_api_types::EventKind;
    let what = match &ev.kind {
        EventKind::State { state, reason } => match reason {
            Some(r) => format!("{state}: {}", r.lines().next().unwrap_or("")),
            None => state.to_string(),
        },
        EventKind::Removed { reason } => format!("removed ({reason})"),
        EventKind::ExecStarted { argv } => format!("exec {}", argv.join(" ")),
        EventKind::ExecEnded { status } => format!("exec ended (exit {})", status.shell_code()),
        EventKind::Warning { message } => format!("warning: {message}"),
        EventKind::NetworkRefused { refusal } => format!(
            "network refused {} {} ({})",
            refusal.protocol,
            refusal.destination,
            refusal.reason.describe()
        ),
    };
    format!("{} {} {what}", ev.time_unix_ms, ev.sandbox)
}

/// "5s ago"-style age of a Unix time.
pub fn ago(unix: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let d = now.saturating_sub(unix);
    match d {
        0..60 => format!("{d}s ago"),
        60..3600 => format!("{}m ago", d / 60),
        3600..86400 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_key_refuses_url_tricks() {
        assert!(path_key("sb-0123456789ab").is_ok());
        assert!(path_key("web.1").is_ok());
        for bad in ["", "a/b", "a?b=c", "..%2f", "a b", &"x".repeat(129)] {
            assert!(path_key(bad).is_err(), "{bad}");
        }
    }
}
