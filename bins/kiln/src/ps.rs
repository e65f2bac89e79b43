//! `kiln ps` and `kiln rm`: list and destroy sandboxes.

use kiln_api_types::{SandboxId, SandboxList};
use kiln_client::Client;

/// `kiln ps`.
pub async fn ps(client: &Client, json: bool) -> anyhow::Result<i32> {
    let list: SandboxList = client.sandbox_list().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(0);
    }
    println!(
        "{:<16} {:<8} {:<8} {:>4} {:>7} {:<4} {:>8}  CREATED",
        "ID", "IMAGE", "STATE", "CPUS", "MEM", "ACC", "BOOT"
    );
    for s in &list.sandboxes {
        println!(
            "{:<16} {:<8} {:<8} {:>4} {:>7} {:<4} {:>8}  {}",
            s.id,
            s.image,
            s.state.as_str(),
            s.cpus,
            format!("{}M", s.memory_mib),
            s.accel,
            s.boot_ms
                .map(|m| format!("{m}ms"))
                .unwrap_or_else(|| "-".into()),
            ago(s.created_unix)
        );
        if let Some(err) = &s.error {
            println!("    error: {}", err.lines().next().unwrap_or(""));
        }
    }
    Ok(0)
}

/// `kiln rm ID...`: every id is tried; the exit code is non-zero if any failed.
pub async fn rm(client: &Client, ids: &[String]) -> anyhow::Result<i32> {
    let mut code = 0;
    for raw in ids {
        let res = match raw.parse::<SandboxId>() {
            Ok(id) => client
                .sandbox_delete(&id)
                .await
                .map_err(anyhow::Error::from),
            Err(e) => Err(e.into()),
        };
        match res {
            Ok(()) => println!("{raw}"),
            Err(e) => {
                eprintln!("kiln: rm {raw}: {e:#}");
                code = 1;
            }
        }
    }
    Ok(code)
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
