//! `kiln df` and `kiln prune`: what kiln's state takes on disk, and reclaiming what nothing
//! uses. The daemon measures and removes (`GET /v1/system/df`, `POST /v1/system/prune`);
//! this file only renders its reports.

use kiln_api_types::{DiskUsage, PruneItem, PruneReport};
use kiln_client::Client;

use crate::image::human_bytes;

/// `kiln df`: one line per category, then the items prune would remove (every item with
/// `verbose`).
pub async fn df(client: &Client, json: bool, verbose: bool) -> anyhow::Result<i32> {
    let usage = client.system_df().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&usage)?);
    } else {
        print!("{}", render_df(&usage, verbose));
    }
    Ok(0)
}

/// `kiln prune`: exit code 1 when something could not be removed.
pub async fn prune(client: &Client, dry_run: bool, json: bool) -> anyhow::Result<i32> {
    let report = client.system_prune(dry_run).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render_prune(&report));
    }
    Ok(if report.failed.is_empty() { 0 } else { 1 })
}

fn render_df(usage: &DiskUsage, verbose: bool) -> String {
    let mut out = format!(
        "{:<18} {:>6} {:>11} {:>11} {:>12}\n",
        "CATEGORY", "ITEMS", "APPARENT", "ON DISK", "RECLAIMABLE"
    );
    for c in &usage.categories {
        out.push_str(&format!(
            "{:<18} {:>6} {:>11} {:>11} {:>12}\n",
            c.kind.as_str(),
            c.items.len(),
            human_bytes(c.apparent_bytes),
            human_bytes(c.disk_bytes),
            human_bytes(c.reclaimable_disk_bytes)
        ));
    }
    out.push_str(&format!(
        "{:<18} {:>6} {:>11} {:>11} {:>12}\n",
        "total",
        "",
        human_bytes(usage.apparent_bytes),
        human_bytes(usage.disk_bytes),
        human_bytes(usage.reclaimable_disk_bytes)
    ));
    for c in &usage.categories {
        let items: Vec<_> = c
            .items
            .iter()
            .filter(|i| verbose || i.reclaimable)
            .collect();
        if items.is_empty() {
            continue;
        }
        out.push_str(&format!("\n{}:\n", c.kind.as_str()));
        for i in items {
            out.push_str(&format!(
                "  {} {:<44} {:>11}  {}{}\n",
                if i.reclaimable { "*" } else { " " },
                i.path,
                human_bytes(i.disk_bytes),
                i.why,
                i.incomplete
                    .as_deref()
                    .map(|e| format!(" (incomplete: {e})"))
                    .unwrap_or_default()
            ));
        }
    }
    if usage.reclaimable_disk_bytes > 0 {
        out.push_str(&format!(
            "\n* reclaimable: `kiln prune` frees {} on disk\n",
            human_bytes(usage.reclaimable_disk_bytes)
        ));
    }
    out
}

fn render_prune(report: &PruneReport) -> String {
    let line = |verb: &str, i: &PruneItem| {
        format!(
            "{verb:<15} {:<44} {:>11}  {}\n",
            i.path,
            human_bytes(i.disk_bytes),
            i.why
        )
    };
    let mut out = String::new();
    let verb = if report.dry_run {
        "would remove"
    } else {
        "removed"
    };
    for i in &report.reclaimed {
        out.push_str(&line(verb, i));
    }
    for i in &report.kept {
        out.push_str(&line("kept", i));
    }
    for i in &report.failed {
        out.push_str(&line("not removed", i));
    }
    out.push_str(&format!(
        "{} {} on disk ({} apparent) in {} item{}{}\n",
        if report.dry_run {
            "would reclaim"
        } else {
            "reclaimed"
        },
        human_bytes(report.reclaimed_disk_bytes),
        human_bytes(report.reclaimed_apparent_bytes),
        report.reclaimed.len(),
        if report.reclaimed.len() == 1 { "" } else { "s" },
        if report.failed.is_empty() {
            String::new()
        } else {
            format!("; {} could not be removed", report.failed.len())
        }
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_api_types::{UsageCategory, UsageItem, UsageKind};

    #[test]
    fn render_prune_dry_run_says_would_and_lists_failures() {
        let item = PruneItem {
            kind: UsageKind::WarmSnapshots,
            name: "warm-x".into(),
            path: "snapshots/warm-x".into(),
            apparent_bytes: 2048,
            disk_bytes: 1024,
            why: "its image x is gone".into(),
        };
        let mut report = PruneReport {
            dry_run: true,
            reclaimed: vec![item.clone()],
            kept: Vec::new(),
            failed: Vec::new(),
            reclaimed_apparent_bytes: 2048,
            reclaimed_disk_bytes: 1024,
        };
        let text = render_prune(&report);
        assert!(text.starts_with("would remove"), "{text}");
        assert!(text.contains("would reclaim 1.0 KiB on disk"), "{text}");
        report.dry_run = false;
        report.failed.push(PruneItem {
            why: "permission denied".into(),
            ..item
        });
        let text = render_prune(&report);
        assert!(text.contains("not removed"), "{text}");
        assert!(text.contains("1 could not be removed"), "{text}");
    }

    #[test]
    fn render_df_marks_reclaimable_items_and_hides_the_rest_unless_verbose() {
        let item = |path: &str, reclaimable| UsageItem {
            name: path.into(),
            path: path.into(),
            apparent_bytes: 10,
            disk_bytes: 4096,
            reclaimable,
            why: "why".into(),
            incomplete: None,
        };
        let usage = DiskUsage {
            home: "/k".into(),
            categories: vec![UsageCategory {
                kind: UsageKind::Logs,
                apparent_bytes: 20,
                disk_bytes: 8192,
                reclaimable_apparent_bytes: 10,
                reclaimable_disk_bytes: 4096,
                items: vec![item("logs/gone", true), item("logs/kept", false)],
            }],
            apparent_bytes: 20,
            disk_bytes: 8192,
            reclaimable_apparent_bytes: 10,
            reclaimable_disk_bytes: 4096,
        };
        let text = render_df(&usage, false);
        assert!(text.contains("* logs/gone"), "{text}");
        assert!(!text.contains("logs/kept"), "{text}");
        assert!(render_df(&usage, true).contains("logs/kept"));
    }
}
